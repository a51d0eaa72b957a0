//! `--stream-listen`: a change stream webhook the harness runs during a scenario, so a node
//! started with `--stream-webhook NAME=http://ADDR/` delivers the run's commits to it. Each
//! event's lag is its arrival here minus its commit's server time (`time`, ms; same host,
//! same clock); events seen again (redeliveries) are counted apart. Answers 204.

use crate::report::{Latency, StreamReport};
use crate::stats::new_histogram;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The most bytes of one request this receiver reads (the node's batches are at most
/// `--stream-batch-bytes`, 1 MiB by default).
const MAX_REQUEST: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Seen {
    ids: HashSet<String>,
    duplicates: u64,
    requests: u64,
}

pub struct StreamSink {
    lag: Arc<Mutex<Histogram<u64>>>,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl StreamSink {
    pub async fn start(addr: SocketAddr) -> std::io::Result<StreamSink> {
        let listener = TcpListener::bind(addr).await?;
        let lag = Arc::new(Mutex::new(new_histogram()));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (l, s) = (lag.clone(), seen.clone());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (l, s) = (l.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &l, &s).await;
                });
            }
        });
        Ok(StreamSink { lag, seen, task })
    }

    pub fn report(&self) -> StreamReport {
        let seen = self.seen.lock();
        StreamReport {
            requests: seen.requests,
            events: seen.ids.len() as u64,
            duplicates: seen.duplicates,
            lag_ms: Latency::from_histogram(&self.lag.lock()),
        }
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(
    mut stream: TcpStream,
    lag: &Mutex<Histogram<u64>>,
    seen: &Mutex<Seen>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if length > MAX_REQUEST {
            return Ok(());
        }
        while buf.len() < head_end + length {
            if !read_more(&mut stream, &mut buf).await? {
                return Ok(());
            }
        }
        let now_us = unix_us();
        let body: serde_json::Value =
            serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or_default();
        buf.drain(..head_end + length);
        if let Some(events) = body["events"].as_array() {
            let mut seen = seen.lock();
            let mut lag = lag.lock();
            seen.requests += 1;
            for event in events {
                let id = event["id"].as_str().unwrap_or_default().to_owned();
                if !seen.ids.insert(id) {
                    seen.duplicates += 1;
                    continue;
                }
                if let Some(time_ms) = event["time"].as_u64() {
                    lag.saturating_record(now_us.saturating_sub(time_ms * 1000).max(1));
                }
            }
        }
        stream
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
            .await?;
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    buf.reserve(65536);
    let n = stream.read_buf(buf).await?;
    Ok(n > 0)
}

fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
