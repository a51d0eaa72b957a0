//! A loopback TCP proxy that can make its connections go silent without closing them: the
//! half-open path a client sees when a laptop sleeps or a NAT drops the flow, which no
//! close frame or RST ever reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    /// Connections accepted before this generation forward nothing.
    frozen_below: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let frozen_below = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let (frozen, gens) = (frozen_below.clone(), generation.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let generation = gens.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, generation, frozen.clone()));
                tokio::spawn(pipe(sr, cw, generation, frozen.clone()));
            }
        });
        Proxy {
            addr,
            frozen_below,
            generation,
            accept,
        }
    }

    /// The connections open now go silent both ways and stay open; new ones work.
    pub fn silence_existing(&self) {
        let next = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        self.frozen_below.store(next, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: u64,
    frozen_below: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Silenced: keep reading (so the sender sees no back-pressure or close) and drop it.
        if generation < frozen_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
