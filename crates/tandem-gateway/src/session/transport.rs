//! The session's transport: the read loop that turns WebSocket messages into requests (and
//! sorts read errors into close codes), and the writer task that drains the outbox to the
//! sink in batches. Both are generic over a `Stream`/`Sink` of messages, so tests drive a
//! session through channels instead of a socket.

use super::Session;
use crate::listener::{OverBudget, Progress};
use crate::metrics::{CloseReason, Metrics, PushesSent};
use crate::outbox::{Outbox, Outgoing};
use crate::throttle::{Event, Throttle};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::{CloseCode, ErrorCode, LimitCode, ServerFrame};
use tokio_tungstenite::tungstenite;
use tokio_util::sync::CancellationToken;

/// Frames the writer sends before one flush.
const WRITE_BATCH: usize = 64;

/// Why the read loop stopped.
enum Stop {
    Close(CloseCode),
    /// The peer went away or the writer already closed the connection.
    Gone,
}

impl Session {
    /// Reads requests until the peer leaves, a deadline passes (authentication, token
    /// expiry), the node shuts down or a request ends the session; then queues the close.
    pub(super) async fn read_loop<St>(&mut self, mut stream: St, cancel: &CancellationToken)
    where
        St: Stream<Item = Result<Message, axum::Error>> + Unpin,
    {
        let stop = loop {
            let (deadline, on_deadline) = self.next_deadline();
            let message = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Stop::Close(CloseCode::GoingAway),
                _ = tokio::time::sleep_until(deadline) => break Stop::Close(on_deadline),
                message = stream.next() => message,
            };
            let close = match message {
                Some(Ok(Message::Close(_))) => break Stop::Gone,
                None => {
                    self.abrupt_disconnect("connection ended without a close frame");
                    break Stop::Gone;
                }
                // Boxed: the request handlers' state is large and only lives while one runs,
                // so an idle session keeps a small future.
                Some(Ok(Message::Text(text))) => Box::pin(self.handle_text(&text)).await,
                Some(Ok(Message::Binary(_))) => {
                    if self.admit(|| None) {
                        self.reply(ServerFrame::error(
                            None,
                            ErrorCode::BadRequest,
                            "binary frames are not supported; send json text frames",
                        ));
                    }
                    None
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) => {
                    // Too much to read: say which limit, then close (do not resend).
                    let over = if is_over_budget(&e) {
                        let max = self.gw.config.max_unauthenticated_bytes as u64;
                        let why = format!("more than {max} bytes before authenticating");
                        Some((LimitCode::MaxUnauthenticatedBytes, max, why))
                    } else if is_too_large(&e) {
                        let max = self.gw.config.max_frame_bytes as u64;
                        Some((
                            LimitCode::MaxFrameBytes,
                            max,
                            format!("frame larger than {max} bytes"),
                        ))
                    } else {
                        None
                    };
                    if let Some((limit, max, why)) = over {
                        self.reply(ServerFrame::limit_error(None, limit, max, why));
                        break Stop::Close(CloseCode::MessageTooBig);
                    }
                    if is_protocol_error(&e) {
                        if self.gw.throttle.record(Event::ProtocolError) {
                            tracing::info!(error = %e, "websocket protocol error");
                        }
                        break Stop::Close(CloseCode::ProtocolError);
                    }
                    self.abrupt_disconnect(&e.to_string());
                    break Stop::Gone;
                }
            };
            if let Some(code) = close {
                break Stop::Close(code);
            }
            // A reply found the client slow or past `max_bad_frames` and queued the close.
            if self.outbox.is_closing() {
                break Stop::Gone;
            }
        };
        if let Stop::Close(code) = stop {
            tracing::debug!(code = code.code(), "closing session");
            self.outbox.close(code);
        } else {
            // The peer is gone: stop the writer without a close frame of our own.
            self.outbox.stop();
        }
    }
}

impl Session {
    /// The peer left without closing: everyday on mobile networks, and what a flood of
    /// connect-and-drop clients looks like, so counted and logged at a bounded pace.
    fn abrupt_disconnect(&self, error: &str) {
        if self.gw.throttle.record(Event::AbruptDisconnect) {
            tracing::debug!(error, "peer left without a close frame");
        }
    }
}

fn tungstenite_error(e: &axum::Error) -> Option<&tungstenite::Error> {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(ws) = err.downcast_ref::<tungstenite::Error>() {
            return Some(ws);
        }
        source = err.source();
    }
    None
}

/// A read past the budget of a connection that has not authenticated.
fn is_over_budget(e: &axum::Error) -> bool {
    matches!(
        tungstenite_error(e),
        Some(tungstenite::Error::Io(io)) if io.get_ref().is_some_and(|inner| inner.is::<OverBudget>())
    )
}

fn is_too_large(e: &axum::Error) -> bool {
    matches!(tungstenite_error(e), Some(tungstenite::Error::Capacity(_)))
}

/// Broken frames or invalid UTF-8: the client is at fault, reconnecting will not help. A
/// connection reset without a close frame is not one: the peer is merely gone.
fn is_protocol_error(e: &axum::Error) -> bool {
    match tungstenite_error(e) {
        Some(tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        )) => false,
        Some(tungstenite::Error::Protocol(_) | tungstenite::Error::Utf8(_)) => true,
        _ => false,
    }
}

/// What the writer task needs besides the sink.
pub(super) struct Writer {
    pub outbox: Arc<Outbox>,
    /// How long a write may make no progress before the connection is closed as slow.
    pub write_timeout: Duration,
    /// What the socket took so far; without it (tests over channels) a whole batch must
    /// finish within `write_timeout`.
    pub progress: Option<Arc<Progress>>,
    pub cancel: CancellationToken,
    pub session: String,
    pub throttle: Arc<Throttle>,
    pub metrics: Arc<Metrics>,
}

impl Writer {
    /// Runs a write while it makes progress: `None` once a whole `write_timeout` passed in
    /// which the socket took not one byte. A slow reader that reads is never cut off here;
    /// what waits for it is bounded by the outbox (conflation and the reply bounds).
    async fn while_moving<F: Future>(&self, write: F) -> Option<F::Output> {
        let Some(progress) = &self.progress else {
            return tokio::time::timeout(self.write_timeout, write).await.ok();
        };
        tokio::pin!(write);
        let mut seen = progress.written();
        loop {
            match tokio::time::timeout(self.write_timeout, &mut write).await {
                Ok(done) => return Some(done),
                Err(_) => {
                    let now = progress.written();
                    if now == seen {
                        return None;
                    }
                    seen = now;
                }
            }
        }
    }
}

/// Drains the outbox into the sink until a close or stop, or until a write fails or stalls
/// (then the session is cancelled and, if stalled, closed with 4001).
pub(super) async fn run_writer<Si>(mut sink: Si, w: Writer)
where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        w.outbox.next_batch(&mut batch, WRITE_BATCH).await;
        let mut close = None;
        let mut stop = false;
        let mut pushed = PushesSent::default();
        let write = async {
            for item in batch.drain(..) {
                match item {
                    Outgoing::Frame(frame) => sink.feed(Message::Text(frame)).await?,
                    Outgoing::Push(frame, kind) => {
                        pushed.add(kind, frame.len());
                        sink.feed(Message::Text(frame)).await?;
                    }
                    Outgoing::Close(code) => {
                        close = Some(code);
                        break;
                    }
                    Outgoing::Stop => {
                        stop = true;
                        break;
                    }
                }
            }
            sink.flush().await
        };
        let written = w.while_moving(write).await;
        w.metrics.pushes_sent(&pushed);
        match written {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                if w.throttle.record(Event::AbruptDisconnect) {
                    tracing::debug!(session = %w.session, error = %e, "write failed");
                }
                w.cancel.cancel();
                return;
            }
            None => {
                if w.throttle.record(Event::SlowClient) {
                    tracing::info!(
                        session = %w.session,
                        timeout_ms = w.write_timeout.as_millis() as u64,
                        "socket took nothing for the write timeout, closing slow connection"
                    );
                }
                w.metrics.closed(CloseReason::WriteStalled);
                w.outbox.close(CloseCode::Slow);
                w.cancel.cancel();
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    send_close(&mut sink, CloseCode::Slow),
                )
                .await;
                return;
            }
        }
        if let Some(code) = close {
            w.metrics.closed(CloseReason::Code(code));
            let _ = tokio::time::timeout(w.write_timeout, send_close(&mut sink, code)).await;
            return;
        }
        if stop {
            return;
        }
    }
}

async fn send_close<Si>(sink: &mut Si, code: CloseCode)
where
    Si: Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    if sink.send(Message::Close(Some(frame))).await.is_ok() {
        let _ = sink.close().await;
    }
}
