//! A loopback TCP proxy that can make its connections go silent without closing them: the
//! half-open path a client sees when a laptop sleeps or a NAT drops the flow, which no
//! close frame or RST ever reports. It can also cut the network: close every connection
//! and refuse new ones until it is restored (a device going offline and coming back).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub addr: SocketAddr,
    /// Connections accepted before this generation forward nothing.
    frozen_below: Arc<AtomicU64>,
    generation: Arc<AtomicU64>,
    /// While set, new connections are closed at once.
    down: Arc<AtomicBool>,
    /// Bumped by `cut`: every connection open then ends.
    cuts: tokio::sync::watch::Sender<u64>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let frozen_below = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0);
        let (frozen, gens, is_down, cut_tx) = (
            frozen_below.clone(),
            generation.clone(),
            down.clone(),
            cuts.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if is_down.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let generation = gens.load(Ordering::SeqCst);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let (a, b) = (cut_tx.subscribe(), cut_tx.subscribe());
                tokio::spawn(pipe(cr, sw, generation, frozen.clone(), a));
                tokio::spawn(pipe(sr, cw, generation, frozen.clone(), b));
            }
        });
        Proxy {
            addr,
            frozen_below,
            generation,
            down,
            cuts,
            accept,
        }
    }

    /// The network goes away: every open connection is closed and new ones are refused
    /// until `restore`.
    pub fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    /// The network comes back: new connections go through again.
    pub fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
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
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // Returning drops both halves: the socket closes (a cut).
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = cut.changed() => return,
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
