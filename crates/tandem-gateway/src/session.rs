//! One WebSocket connection: authentication, then requests handled one at a time in the
//! order they arrive (so replies keep request order and an in-flight commit always
//! finishes), with a separate writer task that drains the outbox in batches.

use crate::hub::{SessionId, Subscriber};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, Outgoing};
use crate::rate::RateLimiter;
use crate::{Gateway, Identity};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tandem_fanout::Event;
use tandem_protocol::{
    ClientFrame, CloseCode, DatasetRef, ErrorCode, LimitCode, PROTOCOL_VERSION, RequestId,
    ServerFrame, decode_client_frame, validate_dataset_name,
};
use tandem_store::{DatasetKey, StoreError, UpdateOutcome, UpdateRequest, validate_identity};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Frames the writer sends before one flush.
const WRITE_BATCH: usize = 64;

pub(crate) async fn run(gw: Arc<Gateway>, socket: WebSocket, pre_auth: Option<Identity>) {
    let (number, session_name) = gw.next_session_id();
    Metrics::add(&gw.metrics.sessions_opened, 1);
    let span =
        tracing::info_span!("session", session = %session_name, identity = tracing::field::Empty);
    async move {
        let outbox = Arc::new(Outbox::new(gw.config.max_queued_replies));
        let (sink, stream) = socket.split();
        let cancel = gw.shutdown.child_token();
        // Not instrumented: the writer is polled for every push, and entering a span each
        // time costs more than its rare log lines are worth; they carry the session id.
        let writer = tokio::spawn(run_writer(
            sink,
            outbox.clone(),
            gw.config.write_timeout,
            cancel.clone(),
            session_name.clone(),
        ));
        let mut session = Session {
            gw: gw.clone(),
            number,
            name: session_name.clone(),
            outbox,
            identity: None,
            expires_at: None,
            limiter: RateLimiter::new(gw.config.max_requests_per_second),
        };
        if let Some(identity) = pre_auth {
            session.authenticated(None, identity);
        }
        session.read_loop(stream, &cancel).await;
        session.leave_all().await;
        // The writer sends what is queued, then the close frame; give it the write deadline.
        let deadline = gw.config.write_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, writer).await.is_err() {
            tracing::debug!("writer did not finish in time");
        }
        tracing::debug!("session ended");
    }
    .instrument(span)
    .await;
}

struct Session {
    gw: Arc<Gateway>,
    number: SessionId,
    name: String,
    outbox: Arc<Outbox>,
    identity: Option<Arc<str>>,
    expires_at: Option<Instant>,
    limiter: RateLimiter,
}

/// Why the read loop stopped.
enum Stop {
    Close(CloseCode),
    /// The peer went away or the writer already closed the connection.
    Gone,
}

impl Session {
    async fn read_loop(&mut self, mut stream: SplitStream<WebSocket>, cancel: &CancellationToken) {
        let auth_deadline = Instant::now() + self.gw.config.auth_timeout;
        let stop = loop {
            let (deadline, on_deadline) = match self.expires_at {
                Some(at) => (at, CloseCode::TokenExpired),
                None => (auth_deadline, CloseCode::AuthTimeout),
            };
            let message = tokio::select! {
                biased;
                _ = cancel.cancelled() => break Stop::Close(CloseCode::GoingAway),
                _ = tokio::time::sleep_until(deadline) => break Stop::Close(on_deadline),
                message = stream.next() => message,
            };
            let text = match message {
                None | Some(Ok(Message::Close(_))) => break Stop::Gone,
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(Message::Binary(_))) => {
                    self.reply(ServerFrame::error(
                        None,
                        ErrorCode::BadRequest,
                        "binary frames are not supported; send json text frames",
                    ));
                    continue;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) => {
                    if is_too_large(&e) {
                        let max = self.gw.config.max_frame_bytes as u64;
                        self.reply(ServerFrame::limit_error(
                            None,
                            LimitCode::MaxFrameBytes,
                            max,
                            format!("frame larger than {max} bytes"),
                        ));
                        break Stop::Close(CloseCode::MessageTooBig);
                    }
                    if is_protocol_error(&e) {
                        tracing::info!(error = %e, "websocket protocol error");
                        break Stop::Close(CloseCode::ProtocolError);
                    }
                    tracing::debug!(error = %e, "read failed");
                    break Stop::Gone;
                }
            };
            // Boxed: the request handlers' state is large and only lives while one runs, so an
            // idle session keeps a small future.
            if let Some(code) = Box::pin(self.handle_text(&text)).await {
                break Stop::Close(code);
            }
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

    /// Queues a reply; a client that lets replies pile up is closed as slow.
    fn reply(&self, frame: ServerFrame) {
        if let ServerFrame::Error { code, .. } = &frame {
            self.gw.metrics.error(*code);
        }
        if self.outbox.send(Utf8Bytes::from(frame.to_json())).is_err() {
            tracing::info!("reply queue full, closing slow connection");
            self.outbox.close(CloseCode::Slow);
        }
    }

    fn authenticated(&mut self, id: Option<RequestId>, identity: Identity) {
        let sub: Arc<str> = Arc::from(identity.sub.as_str());
        tracing::Span::current().record("identity", tracing::field::display(&sub));
        // The same leeway that accepted the token keeps the session open past `exp`.
        let now_unix = tandem_store::now_ms() / 1000;
        let leeway = i64::try_from(self.gw.verifier.leeway_secs()).unwrap_or(0);
        let remaining = Duration::from_secs(
            u64::try_from(identity.expires_at + leeway - now_unix).unwrap_or(0),
        );
        self.expires_at = Some(Instant::now() + remaining);
        self.identity = Some(sub.clone());
        self.reply(ServerFrame::Ready {
            id,
            identity: sub.to_string(),
            session: self.name.clone(),
            protocol: PROTOCOL_VERSION,
            expires_at: identity.expires_at.saturating_mul(1000),
        });
    }

    /// Handles one text frame; returns a close code when the connection must end.
    async fn handle_text(&mut self, text: &str) -> Option<CloseCode> {
        // Every frame counts, also one that does not decode: each costs the node work.
        let allowed = self.limiter.take();
        let frame = match decode_client_frame(text) {
            Ok(frame) => frame,
            Err(e) => {
                self.reply(ServerFrame::error(e.id, ErrorCode::BadRequest, e.message));
                return None;
            }
        };
        if let Err(wait) = allowed {
            // Refused before anything is read or written; the client retries later.
            let max = self.gw.config.max_requests_per_second;
            self.reply(ServerFrame::limit_error(
                frame.id().cloned(),
                LimitCode::MaxRequestsPerSecond,
                u64::from(max),
                format!(
                    "more than {max} requests per second on one connection; retry in {} ms",
                    wait.as_millis().max(1)
                ),
            ));
            return None;
        }
        if let ClientFrame::Auth { id, token } = frame {
            return self.handle_auth(id, &token);
        }
        if let ClientFrame::Ping { id } = frame {
            self.reply(ServerFrame::Pong { id });
            return None;
        }
        let Some(identity) = self.identity.clone() else {
            self.reply(ServerFrame::error(
                frame.id().cloned(),
                ErrorCode::Unauthorized,
                "authenticate first: send an auth frame",
            ));
            return None;
        };
        let reply = match frame {
            ClientFrame::Subscribe { id, dataset } => {
                // The snapshot is queued by `subscribe` itself, in order with the pushes.
                match self.subscribe(id, &identity, dataset).await {
                    Some(error) => error,
                    None => return None,
                }
            }
            ClientFrame::Unsubscribe { id, dataset } => {
                self.unsubscribe(id, &identity, &dataset).await
            }
            ClientFrame::Update {
                id,
                dataset,
                device_id,
                patches,
            } => {
                self.update(id, &identity, dataset, device_id, patches)
                    .await
            }
            ClientFrame::Changes { id, dataset, since } => {
                self.changes(id, &identity, &dataset, since).await
            }
            ClientFrame::ListDatasets { id } => {
                match self
                    .gw
                    .store
                    .list_datasets(&self.gw.config.pool, &identity)
                    .await
                {
                    Ok(datasets) => ServerFrame::Datasets { id, datasets },
                    Err(e) => store_error(Some(id), &e),
                }
            }
            ClientFrame::DeleteDataset { id, dataset } => {
                self.delete(id, &identity, &dataset).await
            }
            ClientFrame::Grant {
                id,
                dataset,
                identity: grantee,
                access,
            } => match self.key(&identity, &dataset) {
                Err(e) => store_error(Some(id), &e),
                Ok(key) => match self.gw.store.grant(&key, &identity, &grantee, access).await {
                    Ok(()) => ack(id),
                    Err(e) => store_error(Some(id), &e),
                },
            },
            ClientFrame::Revoke {
                id,
                dataset,
                identity: grantee,
            } => self.revoke(id, &identity, &dataset, grantee).await,
            ClientFrame::Auth { .. } | ClientFrame::Ping { .. } => return None,
        };
        self.reply(reply);
        None
    }

    fn handle_auth(&mut self, id: Option<RequestId>, token: &str) -> Option<CloseCode> {
        match self.gw.verifier.verify(token) {
            Ok(identity) => {
                if let Some(current) = &self.identity
                    && **current != *identity.sub
                {
                    // A session belongs to one identity; a refresh may not switch it.
                    self.reply(ServerFrame::error(
                        id,
                        ErrorCode::Forbidden,
                        "a session cannot change identity; open a new connection",
                    ));
                    return None;
                }
                self.authenticated(id, identity);
                None
            }
            Err(e) => {
                tracing::info!(error = %e, "token refused");
                self.reply(ServerFrame::error(
                    id,
                    ErrorCode::Unauthorized,
                    e.to_string(),
                ));
                // A refused refresh leaves the session on its current, still valid token.
                self.identity.is_none().then_some(CloseCode::Unauthorized)
            }
        }
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

    /// Returns an error frame, or `None` when the snapshot was queued.
    async fn subscribe(
        &mut self,
        id: RequestId,
        identity: &Arc<str>,
        dataset: DatasetRef,
    ) -> Option<ServerFrame> {
        let key = match self.key(identity, &dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return Some(store_error(Some(id), &e)),
        };
        let fresh = !self.outbox.is_subscribed(&key);
        if fresh {
            let max = self.gw.config.max_subscriptions;
            if self.outbox.subscription_count() >= max {
                return Some(ServerFrame::limit_error(
                    Some(id),
                    LimitCode::MaxSubscriptions,
                    max as u64,
                    format!("more than {max} subscriptions on one connection"),
                ));
            }
        }
        // Register first, then read: a commit that lands in between is both in the snapshot
        // or pushed after it, never lost between the two.
        let key = if fresh {
            let subscriber = Subscriber {
                identity: identity.clone(),
                outbox: self.outbox.clone(),
            };
            match self.gw.hub.add(key, self.number, subscriber).await {
                Ok(shared) => {
                    self.outbox.subscribe(shared.clone());
                    shared
                }
                Err(e) => {
                    tracing::warn!(error = %e, "channel subscribe failed");
                    return Some(ServerFrame::error(Some(id), e.code(), e.to_string()));
                }
            }
        } else {
            key
        };
        match self.gw.store.snapshot(&key, identity).await {
            Ok(snapshot) => {
                let frame = ServerFrame::Snapshot {
                    id,
                    dataset: key.to_ref(),
                    sync_count: snapshot.sync_count,
                    records: snapshot.records,
                };
                self.outbox
                    .snapshot(&key, snapshot.sync_count, Utf8Bytes::from(frame.to_json()));
                tracing::debug!(dataset = %key, sync_count = snapshot.sync_count, "subscribed");
                None
            }
            Err(e) => {
                if fresh {
                    self.leave(&key).await;
                }
                Some(store_error(Some(id), &e))
            }
        }
    }

    async fn leave(&self, key: &Arc<DatasetKey>) {
        self.outbox.end_subscription(key, None);
        self.gw.hub.remove(key, self.number).await;
    }

    async fn leave_all(&self) {
        for key in self.outbox.subscriptions() {
            self.leave(&key).await;
        }
    }

    async fn unsubscribe(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
    ) -> ServerFrame {
        match self.key(identity, dataset) {
            Ok(key) => {
                let key = Arc::new(key);
                self.leave(&key).await;
                ServerFrame::Ack {
                    id,
                    dataset: Some(key.to_ref()),
                    sync_count: None,
                    records: None,
                }
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    async fn update(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: DatasetRef,
        device_id: Option<String>,
        patches: Vec<tandem_protocol::Patch>,
    ) -> ServerFrame {
        let key = match self.key(identity, &dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        let request = UpdateRequest {
            dataset: key,
            actor: identity.to_owned(),
            device_id,
            patches,
        };
        match self.gw.store.update(request).await {
            Ok(UpdateOutcome::Committed { changed, snapshot }) => {
                Metrics::add(&self.gw.metrics.commits, 1);
                let dataset = Arc::new(snapshot.dataset);
                let sync_count = snapshot.sync_count;
                let push = ServerFrame::Dataset {
                    dataset: dataset.to_ref(),
                    sync_count,
                    records: snapshot.records,
                };
                self.publish(Event::Commit {
                    dataset: dataset.clone(),
                    sync_count,
                    frame: Bytes::from(push.to_json()),
                })
                .await;
                ServerFrame::Ack {
                    id,
                    dataset: Some(dataset.to_ref()),
                    sync_count: Some(sync_count),
                    records: Some(changed),
                }
            }
            Ok(UpdateOutcome::Conflict {
                sync_count,
                conflicts,
            }) => {
                Metrics::add(&self.gw.metrics.conflicts, 1);
                ServerFrame::Conflict {
                    id,
                    dataset: DatasetRef::new(
                        dataset.owner.as_deref().unwrap_or(identity),
                        dataset.name,
                    ),
                    sync_count,
                    conflicts,
                }
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    /// Publishing is the fast path only: the commit is already durable, so a broker fault
    /// is logged and the write still acknowledged (subscribers catch up on resync).
    async fn publish(&self, event: Event) {
        if let Err(e) = self.gw.broker.publish(event).await {
            // The broker warns once per outage; this is per write.
            tracing::debug!(error = %e, "publish failed; subscribers catch up on resync");
        }
    }

    async fn changes(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        since: u64,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => key,
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.changes(&key, identity, since).await {
            Ok(snapshot) => ServerFrame::Changes {
                id,
                dataset: key.to_ref(),
                sync_count: snapshot.sync_count,
                records: snapshot.records,
            },
            Err(e) => store_error(Some(id), &e),
        }
    }

    async fn delete(&mut self, id: RequestId, identity: &str, dataset: &DatasetRef) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.delete_dataset(&key, identity).await {
            Ok(sync_count) => {
                let frame = ServerFrame::Deleted {
                    dataset: key.to_ref(),
                    sync_count,
                };
                self.publish(Event::Deleted {
                    dataset: key.clone(),
                    sync_count,
                    frame: Bytes::from(frame.to_json()),
                })
                .await;
                ServerFrame::Ack {
                    id,
                    dataset: Some(key.to_ref()),
                    sync_count: Some(sync_count),
                    records: None,
                }
            }
            Err(e) => store_error(Some(id), &e),
        }
    }

    async fn revoke(
        &mut self,
        id: RequestId,
        identity: &str,
        dataset: &DatasetRef,
        grantee: String,
    ) -> ServerFrame {
        let key = match self.key(identity, dataset) {
            Ok(key) => Arc::new(key),
            Err(e) => return store_error(Some(id), &e),
        };
        match self.gw.store.revoke(&key, identity, &grantee).await {
            Ok(()) => {
                self.publish(Event::Revoked {
                    dataset: key,
                    identity: grantee,
                })
                .await;
                ack(id)
            }
            Err(e) => store_error(Some(id), &e),
        }
    }
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
fn store_error(id: Option<RequestId>, e: &StoreError) -> ServerFrame {
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
            tracing::warn!(error = %e, "store unavailable");
            ServerFrame::error(id, ErrorCode::Unavailable, e.to_string())
        }
        _ => ServerFrame::error(id, e.code(), e.to_string()),
    }
}

fn tungstenite_error(e: &axum::Error) -> Option<&tokio_tungstenite::tungstenite::Error> {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = e.source();
    while let Some(err) = source {
        if let Some(ws) = err.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
            return Some(ws);
        }
        source = err.source();
    }
    None
}

fn is_too_large(e: &axum::Error) -> bool {
    matches!(
        tungstenite_error(e),
        Some(tokio_tungstenite::tungstenite::Error::Capacity(_))
    )
}

/// Broken frames or invalid UTF-8: the client is at fault, reconnecting will not help.
fn is_protocol_error(e: &axum::Error) -> bool {
    matches!(
        tungstenite_error(e),
        Some(
            tokio_tungstenite::tungstenite::Error::Protocol(_)
                | tokio_tungstenite::tungstenite::Error::Utf8(_)
        )
    )
}

async fn run_writer(
    mut sink: SplitSink<WebSocket, Message>,
    outbox: Arc<Outbox>,
    write_timeout: Duration,
    cancel: CancellationToken,
    session: String,
) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    loop {
        batch.clear();
        outbox.next_batch(&mut batch, WRITE_BATCH).await;
        let mut close = None;
        let mut stop = false;
        let write = async {
            for item in batch.drain(..) {
                match item {
                    Outgoing::Frame(frame) => sink.feed(Message::Text(frame)).await?,
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
        match tokio::time::timeout(write_timeout, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(session = %session, error = %e, "write failed");
                cancel.cancel();
                return;
            }
            Err(_) => {
                tracing::info!(
                    session = %session,
                    timeout_ms = write_timeout.as_millis() as u64,
                    "write deadline passed, closing slow connection"
                );
                outbox.close(CloseCode::Slow);
                cancel.cancel();
                let _ = tokio::time::timeout(
                    Duration::from_millis(100),
                    send_close(&mut sink, CloseCode::Slow),
                )
                .await;
                return;
            }
        }
        if let Some(code) = close {
            let _ = tokio::time::timeout(write_timeout, send_close(&mut sink, code)).await;
            return;
        }
        if stop {
            return;
        }
    }
}

async fn send_close(sink: &mut SplitSink<WebSocket, Message>, code: CloseCode) {
    let frame = CloseFrame {
        code: code.code(),
        reason: Utf8Bytes::from_static(code.reason()),
    };
    if sink.send(Message::Close(Some(frame))).await.is_ok() {
        let _ = sink.close().await;
    }
}
