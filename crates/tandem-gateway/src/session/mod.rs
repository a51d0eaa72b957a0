//! One WebSocket connection: authentication, then requests handled one at a time in the
//! order they arrive (so replies keep request order and an in-flight commit always
//! finishes), with a separate writer task that drains the outbox in batches.
//!
//! `transport` moves messages between the socket and the session (read loop, writer task,
//! close codes); `commands` handles one request each. This file holds the session's state
//! and what both share.

mod commands;
#[cfg(test)]
mod tests;
mod transport;

use crate::connections::Admitted;
use crate::hub::SessionId;
use crate::listener::{Budget, Progress};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::rate::RateLimiter;
use crate::throttle::Event;
use crate::{Gateway, Identity};
use axum::extract::ws::{Message, Utf8Bytes, WebSocket};
use futures_util::{Sink, Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::{
    CloseCode, DatasetRef, Encoding, ErrorCode, FEATURE_DELTA, FEATURE_LEAN, LimitCode,
    PROTOCOL_VERSION, RequestId, ServerFrame, WriteLimits, validate_dataset_name,
};
use tandem_store::{DatasetKey, StoreError, validate_identity};
use tokio::time::Instant;
use tracing::Instrument;

/// What the node counted for a connection before its upgrade, held for its life.
#[derive(Debug)]
pub(crate) struct Conn {
    pub admitted: Admitted,
    /// The read budget of a connection that has not authenticated yet.
    pub budget: Option<Arc<Budget>>,
    /// What the socket took of the writes (none behind other listeners).
    pub progress: Option<Arc<Progress>>,
}

pub(crate) async fn run(
    gw: Arc<Gateway>,
    socket: WebSocket,
    pre_auth: Option<Identity>,
    conn: Conn,
) {
    let (sink, stream) = socket.split();
    serve(gw, sink, stream, pre_auth, Some(conn)).await;
}

/// Runs a session over any sink and stream of WebSocket messages: a socket's halves in
/// production, channels in tests. `pre_auth` is the identity of an `Authorization` header.
pub(crate) async fn serve<Si, St>(
    gw: Arc<Gateway>,
    sink: Si,
    stream: St,
    pre_auth: Option<Identity>,
    conn: Option<Conn>,
) where
    Si: Sink<Message, Error = axum::Error> + Unpin + Send + 'static,
    St: Stream<Item = Result<Message, axum::Error>> + Unpin + Send,
{
    let (id, label) = gw.next_session_id();
    Metrics::add(&gw.metrics().sessions_opened, 1);
    let span = tracing::info_span!("session", session = %label, identity = tracing::field::Empty);
    async move {
        let outbox = Arc::new(Outbox::new(
            gw.config.max_queued_replies,
            gw.config.max_queued_bytes,
        ));
        let cancel = gw.shutdown.child_token();
        // Not instrumented: the writer is polled for every push, and entering a span each
        // time costs more than its rare log lines are worth; they carry the session label.
        let mut writer = tokio::spawn(transport::run_writer(
            sink,
            transport::Writer {
                outbox: outbox.clone(),
                write_timeout: gw.config.write_timeout,
                progress: conn.as_ref().and_then(|c| c.progress.clone()),
                cancel: cancel.clone(),
                session: label.clone(),
                throttle: gw.throttle.clone(),
                metrics: gw.metrics().clone(),
            },
        ));
        let now = Instant::now();
        let mut session = Session {
            gw: gw.clone(),
            id,
            label,
            outbox,
            identity: None,
            started: now,
            deadline: (after(now, gw.config.auth_timeout), CloseCode::AuthTimeout),
            last_request: now,
            conn,
            limiter: RateLimiter::per_second(gw.config.max_requests_per_second),
            bad_frames: RateLimiter::new(gw.config.max_bad_frames, gw.config.bad_frames_window),
            delta: false,
            lean: false,
        };
        let refused = match pre_auth {
            Some(identity) => session.authenticated(None, identity, Vec::new()),
            None => None,
        };
        match refused {
            Some(code) => session.outbox.close(code),
            None => session.read_loop(stream, &cancel).await,
        }
        session.drop_all_subscriptions().await;
        if let Some(identity) = &session.identity {
            gw.connections.release(identity);
        }
        // The writer sends what is queued, then the close frame; give it the write deadline.
        let deadline = gw.config.write_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, &mut writer).await.is_err() {
            // A peer that takes a byte now and then would keep a detached writer (and its
            // socket) alive past the session, uncounted by the connection limits.
            writer.abort();
            tracing::debug!("writer did not finish in time");
        }
        tracing::debug!("session ended");
    }
    .instrument(span)
    .await;
}

struct Session {
    gw: Arc<Gateway>,
    /// The hub's key for this session.
    id: SessionId,
    /// What the client (`ready.session`) and the logs call this session: unique per node run.
    label: String,
    outbox: Arc<Outbox>,
    /// Set once authenticated; the session is then counted in `Gateway::connections`.
    identity: Option<Arc<str>>,
    started: Instant,
    /// When the session ends by itself, and with which code: the auth timeout until
    /// authenticated, then the token's expiry or `max_session_age`, whichever comes first.
    deadline: (Instant, CloseCode),
    /// The last request other than a ping, for `idle_timeout`.
    last_request: Instant,
    /// The node's counts for this connection (none in unit tests over channels).
    conn: Option<Conn>,
    /// Every data frame takes a token, first.
    limiter: RateLimiter,
    /// Every `bad_request` answer takes a token; running out closes the connection.
    bad_frames: RateLimiter,
    /// The `delta` feature: subscriptions get `delta` pushes unless `subscribe` says not.
    delta: bool,
    /// The `lean` feature: records in this session's frames in the lean encoding.
    lean: bool,
}

impl Session {
    /// Queues a reply; a client that lets replies pile up is closed as slow, and one that
    /// gets more `bad_request` answers than `max_bad_frames` allows is closed after this one.
    fn reply(&mut self, frame: ServerFrame) {
        let bad = matches!(
            frame,
            ServerFrame::Error {
                code: ErrorCode::BadRequest,
                ..
            }
        );
        if let ServerFrame::Error { code, .. } = &frame {
            self.gw.metrics().error(*code);
        }
        if self
            .outbox
            .send(Utf8Bytes::from(frame.encode(self.encoding())))
            .is_err()
        {
            self.close_slow();
            return;
        }
        if bad && self.bad_frames.take().is_err() {
            tracing::info!(
                max = self.gw.config.max_bad_frames,
                window_ms = self.gw.config.bad_frames_window.as_millis() as u64,
                "too many bad frames, closing connection"
            );
            self.outbox.close(CloseCode::TooManyBadFrames);
        }
    }

    /// Takes a request token for a data frame before anything else looks at it. A frame over
    /// the rate is answered with `rate_limited`, carrying the request id that `id` reads from
    /// the frame if any, and must be dropped: this returns false.
    fn admit(&mut self, id: impl FnOnce() -> Option<RequestId>) -> bool {
        let Err(wait) = self.limiter.take() else {
            return true;
        };
        let max = self.gw.config.max_requests_per_second;
        self.reply(ServerFrame::limit_error(
            id(),
            LimitCode::MaxRequestsPerSecond,
            u64::from(max),
            format!(
                "more than {max} requests per second on one connection; retry in {} ms",
                wait.as_millis().max(1)
            ),
        ));
        false
    }

    fn encoding(&self) -> Encoding {
        if self.lean {
            Encoding::Lean
        } else {
            Encoding::Full
        }
    }

    /// Takes the features an `auth` frame asked for; returns those this server supports.
    fn set_features(&mut self, asked: &[String]) -> Vec<String> {
        self.delta = asked.iter().any(|f| f == FEATURE_DELTA);
        self.lean = asked.iter().any(|f| f == FEATURE_LEAN);
        self.outbox.set_lean(self.lean);
        [(self.delta, FEATURE_DELTA), (self.lean, FEATURE_LEAN)]
            .into_iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| name.to_owned())
            .collect()
    }

    /// Queues a subscribe reply in order with the dataset's pushes, under the same bound.
    fn snapshot_reply(&self, key: &Arc<DatasetKey>, sync_count: u64, frame: ServerFrame) {
        if self
            .outbox
            .snapshot(
                key,
                sync_count,
                Utf8Bytes::from(frame.encode(self.encoding())),
            )
            .is_err()
        {
            self.close_slow();
        }
    }

    fn close_slow(&self) {
        if self.gw.throttle.record(Event::SlowClient) {
            tracing::info!("reply queue full, closing slow connection");
        }
        self.outbox.close(CloseCode::Slow);
    }

    /// Takes a verified identity: counts the session for it (the first time) and sets the
    /// session's deadline. Returns a close code when the identity holds too many sessions.
    fn authenticated(
        &mut self,
        id: Option<RequestId>,
        identity: Identity,
        features: Vec<String>,
    ) -> Option<CloseCode> {
        let sub: Arc<str> = Arc::from(identity.sub.as_str());
        if self.identity.is_none() {
            if !self.gw.connections.acquire(&sub) {
                let max = self.gw.config.max_connections_per_identity;
                if self.gw.throttle.record(Event::ConnectionLimit) {
                    tracing::info!(identity = %sub, max, "too many sessions for one identity");
                }
                self.reply(ServerFrame::limit_error(
                    id,
                    LimitCode::MaxConnectionsPerIdentity,
                    max as u64,
                    format!("at most {max} connections per identity on this node"),
                ));
                return Some(CloseCode::TooManyConnections);
            }
            tracing::Span::current().record("identity", tracing::field::display(&sub));
            if let Some(conn) = &mut self.conn {
                conn.admitted.authenticated();
                if let Some(budget) = conn.budget.take() {
                    budget.lift();
                }
            }
        }
        // The same leeway that accepted the token keeps the session open past `exp`.
        let now_unix = tandem_store::now_ms() / 1000;
        let leeway = i64::try_from(self.gw.verifier.leeway_secs()).unwrap_or(0);
        let remaining = Duration::from_secs(
            u64::try_from(
                identity
                    .expires_at
                    .saturating_add(leeway)
                    .saturating_sub(now_unix),
            )
            .unwrap_or(0),
        );
        let now = Instant::now();
        // A token may claim to live for ever; the session does not.
        let age_left =
            after(self.started, self.gw.config.max_session_age).saturating_duration_since(now);
        self.deadline = if remaining <= age_left {
            (after(now, remaining), CloseCode::TokenExpired)
        } else {
            (after(now, age_left), CloseCode::SessionAge)
        };
        self.identity = Some(sub.clone());
        self.reply(ServerFrame::Ready {
            id,
            identity: sub.to_string(),
            session: self.label.clone(),
            protocol: PROTOCOL_VERSION,
            expires_at: identity.expires_at.saturating_mul(1000),
            features,
            limits: self.gw.config.store_limits.as_ref().map(|l| WriteLimits {
                max_key_length: l.max_key_length,
                max_patches: l.max_patches,
                max_records: l.max_records,
                max_dataset_bytes: l.max_dataset_bytes,
                max_device_id_length: l.max_device_id_length,
                max_frame_bytes: u64::try_from(self.gw.config.max_frame_bytes).unwrap_or(u64::MAX),
            }),
        });
        None
    }

    /// When and how the session ends if nothing else happens: its deadline, or sooner the
    /// idle timeout of an authenticated session without subscriptions.
    fn next_deadline(&self) -> (Instant, CloseCode) {
        if self.identity.is_some() && self.outbox.subscription_count() == 0 {
            let idle = after(self.last_request, self.gw.config.idle_timeout);
            if idle < self.deadline.0 {
                return (idle, CloseCode::Idle);
            }
        }
        self.deadline
    }

    /// Resolves a wire dataset reference for this caller (owner defaults to the caller).
    fn key(&self, identity: &str, dataset: &DatasetRef) -> Result<DatasetKey, StoreError> {
        validate_dataset_name(&dataset.name).map_err(|reason| StoreError::InvalidName {
            name: dataset.name.chars().take(64).collect(),
            reason,
        })?;
        let owner = dataset.owner.as_deref().unwrap_or(identity);
        validate_identity(owner)?;
        Ok(DatasetKey::new(
            self.gw.config.pool.clone(),
            owner,
            dataset.name.clone(),
        ))
    }

    /// Ends one of this session's subscriptions, in the outbox and in the hub.
    async fn drop_subscription(&self, key: &Arc<DatasetKey>) {
        // Without a notice it cannot be over the bound.
        let _ = self.outbox.unsubscribe(key, None);
        self.gw.hub.unsubscribe(key, self.id).await;
    }

    async fn drop_all_subscriptions(&self) {
        for key in self.outbox.subscriptions() {
            self.drop_subscription(&key).await;
        }
    }
}

/// `at + d`, or a time decades away when a setting or a token asks for more than an
/// `Instant` can hold.
fn after(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(30 * 365 * 86_400)))
        .unwrap_or(at)
}

fn ack(id: RequestId) -> ServerFrame {
    ServerFrame::Ack {
        id,
        dataset: None,
        sync_count: None,
        records: None,
    }
}

/// Turns a store error into its error frame; faults are logged here, once.
pub(crate) fn store_error(id: Option<RequestId>, e: &StoreError) -> ServerFrame {
    match e {
        StoreError::Limit {
            limit,
            max,
            message,
        } => ServerFrame::limit_error(id, *limit, *max, message.clone()),
        StoreError::Internal(_) => {
            tracing::error!(error = %e, "store fault");
            ServerFrame::error(id, ErrorCode::Internal, "internal error")
        }
        StoreError::Unavailable(_) => {
            // Once per outage, not once per request: at most one warning a minute, with the
            // number of requests refused since the last one (the store itself says when a
            // commit outage starts and ends).
            const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
            static LAST_WARNING: std::sync::Mutex<Option<std::time::Instant>> =
                std::sync::Mutex::new(None);
            static REFUSED_SINCE: std::sync::atomic::AtomicU64 =
                std::sync::atomic::AtomicU64::new(0);
            let mut last = LAST_WARNING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_none_or(|at| at.elapsed() >= WARN_EVERY) {
                *last = Some(std::time::Instant::now());
                let refused_since = REFUSED_SINCE.swap(0, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(error = %e, refused_since, "store unavailable");
            } else {
                REFUSED_SINCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(error = %e, "store unavailable");
            }
            ServerFrame::error(id, ErrorCode::Unavailable, e.to_string())
        }
        _ => ServerFrame::error(id, e.code(), e.to_string()),
    }
}
