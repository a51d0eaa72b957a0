//! The node's TCP listener and what it knows of each peer before HTTP: the peer's address
//! (for the per-IP limits) and a read budget. An upgraded WebSocket that has not
//! authenticated yet may read at most `max_unauthenticated_bytes` from its socket, so a
//! crowd of anonymous connections streaming large frames holds kilobytes each, not the
//! 2 MiB a frame may have once authenticated. The budget sits under the WebSocket (the
//! WebSocket's own frame limit is fixed at the upgrade, before anyone is known).

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Bytes a connection may still read; `UNLIMITED` once authenticated or for plain HTTP.
#[derive(Debug)]
pub struct Budget(AtomicUsize);

const UNLIMITED: usize = usize::MAX;

impl Budget {
    fn new() -> Arc<Budget> {
        Arc::new(Budget(AtomicUsize::new(UNLIMITED)))
    }

    /// From now on the connection may read at most `bytes` more.
    pub(crate) fn arm(&self, bytes: usize) {
        self.0.store(bytes.min(UNLIMITED - 1), Ordering::Release);
    }

    /// No more bound (the peer authenticated).
    pub(crate) fn lift(&self) {
        self.0.store(UNLIMITED, Ordering::Release);
    }

    /// Takes `n` bytes; false when they are past the budget.
    fn take(&self, n: usize) -> bool {
        let mut left = self.0.load(Ordering::Acquire);
        loop {
            if left == UNLIMITED {
                return true;
            }
            let Some(rest) = left.checked_sub(n) else {
                return false;
            };
            match self
                .0
                .compare_exchange_weak(left, rest, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => left = now,
            }
        }
    }
}

/// Bytes the socket has taken from the node's writes. The session's writer watches it: a
/// slow reader whose socket still takes bytes is not cut off (`write_timeout` counts time
/// without progress).
#[derive(Debug, Default)]
pub struct Progress(AtomicU64);

impl Progress {
    pub(crate) fn written(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    fn add(&self, n: usize) {
        self.0.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// The error a read past the budget fails with; the session recognises it.
#[derive(Debug, thiserror::Error)]
#[error("more bytes than allowed before authentication")]
pub struct OverBudget;

/// A TCP stream that counts what it reads against its budget.
#[derive(Debug)]
pub struct BudgetIo {
    io: TcpStream,
    budget: Arc<Budget>,
    progress: Arc<Progress>,
}

impl AsyncRead for BudgetIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &poll {
            let n = buf.filled().len() - before;
            if n > 0 && !self.budget.take(n) {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, OverBudget)));
            }
        }
        poll
    }
}

impl AsyncWrite for BudgetIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &poll {
            self.progress.add(*n);
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            self.progress.add(*n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// What a request knows of its connection: `ConnectInfo<Peer>` in the router.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub(crate) budget: Arc<Budget>,
    pub(crate) progress: Arc<Progress>,
}

/// The node's listener: TCP with `TCP_NODELAY` (pushes are small and latency-bound; Nagle
/// must not hold them back) and a read budget per connection.
#[derive(Debug)]
pub struct Listener(TcpListener);

impl Listener {
    pub fn new(listener: TcpListener) -> Self {
        Listener(listener)
    }
}

impl axum::serve::Listener for Listener {
    type Io = BudgetIo;
    type Addr = Peer;

    async fn accept(&mut self) -> (BudgetIo, Peer) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        let _ = io.set_nodelay(true);
        let budget = Budget::new();
        let progress = Arc::new(Progress::default());
        let peer = Peer {
            addr,
            budget: budget.clone(),
            progress: progress.clone(),
        };
        (
            BudgetIo {
                io,
                budget,
                progress,
            },
            peer,
        )
    }

    fn local_addr(&self) -> io::Result<Peer> {
        Ok(Peer {
            addr: self.0.local_addr()?,
            budget: Budget::new(),
            progress: Arc::default(),
        })
    }
}

impl Connected<IncomingStream<'_, Listener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Listener>) -> Self {
        stream.remote_addr().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_budget_counts_reads_only_while_armed() {
        let b = Budget::new();
        assert!(b.take(1 << 30));
        b.arm(10);
        assert!(b.take(6));
        assert!(!b.take(5));
        assert!(b.take(4));
        assert!(!b.take(1));
        b.lift();
        assert!(b.take(1 << 30));
    }
}
