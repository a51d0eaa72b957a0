//! One authenticated WebSocket connection to a Tandem gateway.

use crate::ClientError;
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tandem_protocol::{
    Access, ClientFrame, Conflict, DatasetInfo, DatasetRef, HistoryEntry, Patch, Record, RequestId,
    ServerFrame, WriteLimits,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// How the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Closed {
    /// The close code the server sent, or `None` if the socket just ended.
    pub code: Option<u16>,
    pub reason: String,
}

/// The outcome of an update that the server processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateResult {
    Committed {
        sync_count: u64,
        records: Vec<Record>,
    },
    Conflict {
        sync_count: u64,
        conflicts: Vec<Conflict>,
    },
}

/// The reply to `subscribe`: the whole dataset, or (with `since`) only what changed after
/// the sync count the subscribe named, tombstones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub sync_count: u64,
    /// Present when `records` are the changes after this sync count.
    pub since: Option<u64>,
    pub records: Vec<Record>,
}

/// One page of a dataset's history (the reply to `history`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// The dataset's current sync count.
    pub sync_count: u64,
    /// Commits, newest first.
    pub entries: Vec<HistoryEntry>,
    /// Pass as `before` for the next (older) page; `None` on the last one.
    pub next: Option<i64>,
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<ServerFrame>>>>;

/// How long a request waits for its reply by default before the connection is presumed dead.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Connection {
    out_tx: mpsc::UnboundedSender<Message>,
    pending: Pending,
    /// Ends the reader (and so the connection) from this side: a socket that stopped
    /// answering never reports a close of its own.
    abort: Arc<tokio::sync::Notify>,
    request_timeout: Duration,
    events_rx: mpsc::UnboundedReceiver<ServerFrame>,
    closed_rx: watch::Receiver<Option<Closed>>,
    next_id: AtomicU64,
    identity: String,
    session: String,
    expires_at: i64,
    /// The features every `auth` on this connection asks for (each `auth` sets them anew).
    wanted_features: Vec<String>,
    /// What the server turned on (`ready.features`).
    features: Vec<String>,
    /// The write limits the server announced (`ready.limits`), if it did.
    limits: Option<WriteLimits>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("identity", &self.identity)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// Connects and authenticates with an `auth` frame, asking for no features: pushes are
    /// whole `dataset` frames with full records, as in protocol version 1 without features.
    pub async fn connect(url: &str, token: &str) -> Result<Connection, ClientError> {
        Connection::connect_with_features(url, token, Vec::new()).await
    }

    /// Connects and authenticates, asking for these protocol features (`delta`, `lean`; see
    /// [`tandem_protocol::FEATURE_DELTA`]). [`Connection::features`] says which the server
    /// turned on. Records are read in either encoding whatever was asked.
    pub async fn connect_with_features(
        url: &str,
        token: &str,
        features: Vec<String>,
    ) -> Result<Connection, ClientError> {
        let mut conn = Connection::open(url, None).await?;
        conn.wanted_features = features;
        let reply = conn
            .request(|id| ClientFrame::Auth {
                id: Some(id),
                token: token.to_owned(),
                features: conn.wanted_features.clone(),
            })
            .await?;
        conn.ready(reply)?;
        Ok(conn)
    }

    /// Connects with an `Authorization: Bearer` header on the upgrade request.
    pub async fn connect_with_header(url: &str, token: &str) -> Result<Connection, ClientError> {
        let mut conn = Connection::open(url, Some(token)).await?;
        // The server greets a header-authenticated connection with `ready` unasked.
        let first = tokio::time::timeout(Duration::from_secs(10), conn.next_event())
            .await
            .map_err(|_| ClientError::Unexpected("no ready frame in time".into()))?;
        match first {
            Some(frame) => conn.ready(frame)?,
            None => return Err(conn.closed_error()),
        }
        Ok(conn)
    }

    /// Opens the socket without authenticating (for tests of the protocol's edges).
    pub async fn open(url: &str, bearer: Option<&str>) -> Result<Connection, ClientError> {
        let mut request = url
            .into_client_request()
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        if let Some(token) = bearer {
            let value = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|e| ClientError::Connect(e.to_string()))?;
            request.headers_mut().insert("authorization", value);
        }
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let (mut sink, mut stream) = socket.split();
        let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let (closed_tx, closed_rx) = watch::channel(None);
        let pending: Pending = Arc::default();

        tokio::spawn(async move {
            while let Some(message) = out_rx.recv().await {
                if sink.send(message).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        let reader_pending = pending.clone();
        let abort = Arc::new(tokio::sync::Notify::new());
        let reader_abort = abort.clone();
        tokio::spawn(async move {
            let closed = loop {
                let next = tokio::select! {
                    next = stream.next() => next,
                    () = reader_abort.notified() => {
                        break Closed {
                            code: None,
                            reason: "no reply in time; dropped by the client".into(),
                        };
                    }
                };
                match next {
                    Some(Ok(Message::Text(text))) => {
                        route(text.as_str(), &reader_pending, &events_tx);
                    }
                    Some(Ok(Message::Close(frame))) => {
                        break Closed {
                            code: frame.as_ref().map(|f| u16::from(f.code)),
                            reason: frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        };
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        break Closed {
                            code: None,
                            reason: e.to_string(),
                        };
                    }
                    None => {
                        break Closed {
                            code: None,
                            reason: "socket ended".into(),
                        };
                    }
                }
            };
            let _ = closed_tx.send(Some(closed));
            // Waiting requests learn of the close through their dropped senders.
            reader_pending.lock().clear();
        });

        Ok(Connection {
            out_tx,
            pending,
            abort,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            events_rx,
            closed_rx,
            next_id: AtomicU64::new(1),
            identity: String::new(),
            session: String::new(),
            expires_at: 0,
            wanted_features: Vec::new(),
            features: Vec::new(),
            limits: None,
        })
    }

    fn ready(&mut self, frame: ServerFrame) -> Result<(), ClientError> {
        match frame {
            ServerFrame::Ready {
                identity,
                session,
                expires_at,
                features,
                limits,
                ..
            } => {
                self.identity = identity;
                self.session = session;
                self.expires_at = expires_at;
                self.features = features;
                self.limits = limits;
                Ok(())
            }
            other => Err(unexpected(&other)),
        }
    }

    /// The identity the server authenticated.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn session(&self) -> &str {
        &self.session
    }

    /// When the session's token expires, milliseconds since the Unix epoch.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// The features the server turned on for this session (`ready.features`).
    pub fn features(&self) -> &[String] {
        &self.features
    }

    /// The write limits the server announced in `ready` (`None` from a server that does
    /// not announce them).
    pub fn limits(&self) -> Option<WriteLimits> {
        self.limits
    }

    /// Whether the server turned on `feature` for this session.
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// Re-authenticates with a fresh token for the same identity, extending the session. It
    /// asks for the features the connection was opened with (an `auth` sets them anew).
    pub async fn reauth(&self, token: &str) -> Result<i64, ClientError> {
        match self
            .request(|id| ClientFrame::Auth {
                id: Some(id),
                token: token.to_owned(),
                features: self.wanted_features.clone(),
            })
            .await?
        {
            ServerFrame::Ready { expires_at, .. } => Ok(expires_at),
            other => Err(unexpected(&other)),
        }
    }

    /// Takes the stream of non-reply frames, so that one task can consume them while others
    /// share the connection for requests. `next_event` returns `None` afterwards.
    pub fn take_events(&mut self) -> mpsc::UnboundedReceiver<ServerFrame> {
        let (_, empty) = mpsc::unbounded_channel();
        std::mem::replace(&mut self.events_rx, empty)
    }

    /// How the connection ended, if it has.
    pub fn closed(&self) -> Option<Closed> {
        self.closed_rx.borrow().clone()
    }

    /// How long a request waits for its reply before the connection is dropped (default
    /// [`DEFAULT_REQUEST_TIMEOUT`]).
    pub fn set_request_timeout(&mut self, timeout: Duration) {
        self.request_timeout = timeout;
    }

    /// Ends the connection from this side at once, as if the socket had closed.
    pub fn abort(&self) {
        self.abort.notify_one();
    }

    /// Waits until the connection ends.
    pub async fn wait_closed(&self) -> Closed {
        let mut rx = self.closed_rx.clone();
        loop {
            if let Some(closed) = rx.borrow_and_update().clone() {
                return closed;
            }
            if rx.changed().await.is_err() {
                return Closed {
                    code: None,
                    reason: "connection dropped".into(),
                };
            }
        }
    }

    fn closed_error(&self) -> ClientError {
        match self.closed() {
            Some(c) => ClientError::Closed {
                code: c.code,
                reason: c.reason,
            },
            None => ClientError::Closed {
                code: None,
                reason: "connection dropped".into(),
            },
        }
    }

    /// Sends a raw text frame (no id bookkeeping).
    pub fn send_text(&self, text: impl Into<String>) -> Result<(), ClientError> {
        self.out_tx
            .send(Message::text(text.into()))
            .map_err(|_| self.closed_error())
    }

    /// Sends a raw binary frame.
    pub fn send_binary(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.out_tx
            .send(Message::binary(bytes))
            .map_err(|_| self.closed_error())
    }

    /// The next frame that is not a reply: live pushes, `deleted`, `unsubscribed`, errors
    /// without an id. `None` once the connection has ended and all were read.
    pub async fn next_event(&mut self) -> Option<ServerFrame> {
        self.events_rx.recv().await
    }

    /// Like `next_event`, but gives up after `timeout`.
    pub async fn next_event_timeout(&mut self, timeout: Duration) -> Option<ServerFrame> {
        tokio::time::timeout(timeout, self.events_rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Sends a request built around a fresh id and waits for its reply. An `error` reply
    /// becomes `ClientError::Server`.
    pub async fn request(
        &self,
        build: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<ServerFrame, ClientError> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(n, tx);
        // The reader publishes the close and then clears `pending`: a request registered
        // after that clear would wait for a reply forever, so look once more.
        if self.closed_rx.borrow().is_some() {
            self.pending.lock().remove(&n);
            return Err(self.closed_error());
        }
        let frame = build(RequestId::Num(n));
        if self.out_tx.send(Message::text(frame.to_json())).is_err() {
            self.pending.lock().remove(&n);
            return Err(self.closed_error());
        }
        let reply = match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(reply) => reply,
            Err(_) => {
                // Silence this long means a dead path (a half-open socket); waiting longer
                // would only hang the caller, so drop the connection and say so.
                self.pending.lock().remove(&n);
                self.abort();
                return Err(ClientError::Timeout(self.request_timeout));
            }
        };
        match reply {
            Ok(ServerFrame::Error {
                code,
                message,
                limit,
                max,
                ..
            }) => Err(ClientError::Server {
                code,
                message,
                limit,
                max,
            }),
            Ok(frame) => Ok(frame),
            Err(_) => {
                // The reader clears pending before or after publishing the close; wait for it.
                let closed = tokio::time::timeout(Duration::from_secs(1), self.wait_closed()).await;
                Err(match closed {
                    Ok(c) => ClientError::Closed {
                        code: c.code,
                        reason: c.reason,
                    },
                    Err(_) => self.closed_error(),
                })
            }
        }
    }

    /// Subscribes; returns the snapshot's sync count and records (the whole dataset).
    pub async fn subscribe(&self, dataset: DatasetRef) -> Result<(u64, Vec<Record>), ClientError> {
        let snapshot = self.subscribe_since(dataset, None).await?;
        Ok((snapshot.sync_count, snapshot.records))
    }

    /// Subscribes naming the sync count of a copy the caller kept (`since`): the server may
    /// then answer with only the records changed after it (`Snapshot::since` says so).
    /// Pushes are `delta` frames if the session's `delta` feature is on.
    pub async fn subscribe_since(
        &self,
        dataset: DatasetRef,
        since: Option<u64>,
    ) -> Result<Snapshot, ClientError> {
        match self
            .request(|id| ClientFrame::Subscribe {
                id,
                dataset,
                delta: None,
                since,
            })
            .await?
        {
            ServerFrame::Snapshot {
                sync_count,
                since,
                records,
                ..
            } => Ok(Snapshot {
                sync_count,
                since,
                records,
            }),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn unsubscribe(&self, dataset: DatasetRef) -> Result<(), ClientError> {
        self.expect_ack(|id| ClientFrame::Unsubscribe { id, dataset })
            .await
    }

    /// Sends an update; a conflict is an `Ok` outcome, not an error.
    pub async fn update(
        &self,
        dataset: DatasetRef,
        device_id: Option<String>,
        patches: Vec<Patch>,
    ) -> Result<UpdateResult, ClientError> {
        match self
            .request(|id| ClientFrame::Update {
                id,
                dataset,
                device_id,
                patches,
            })
            .await?
        {
            ServerFrame::Ack {
                sync_count: Some(sync_count),
                records,
                ..
            } => Ok(UpdateResult::Committed {
                sync_count,
                records: records.unwrap_or_default(),
            }),
            ServerFrame::Conflict {
                sync_count,
                conflicts,
                ..
            } => Ok(UpdateResult::Conflict {
                sync_count,
                conflicts,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// Records changed after `since`, tombstones included.
    pub async fn changes(
        &self,
        dataset: DatasetRef,
        since: u64,
    ) -> Result<(u64, Vec<Record>), ClientError> {
        match self
            .request(|id| ClientFrame::Changes { id, dataset, since })
            .await?
        {
            ServerFrame::Changes {
                sync_count,
                records,
                ..
            } => Ok((sync_count, records)),
            other => Err(unexpected(&other)),
        }
    }

    /// A page of the dataset's commits, newest first, below entry id `before` (from the
    /// previous page's `next`), at most `limit` (the server's default and bound apply).
    pub async fn history(
        &self,
        dataset: DatasetRef,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<HistoryPage, ClientError> {
        match self
            .request(|id| ClientFrame::History {
                id,
                dataset,
                before,
                limit,
            })
            .await?
        {
            ServerFrame::History {
                sync_count,
                entries,
                next,
                ..
            } => Ok(HistoryPage {
                sync_count,
                entries,
                next,
            }),
            other => Err(unexpected(&other)),
        }
    }

    /// The dataset's live records as they were right after the commit at `sync_count`.
    pub async fn read_at(
        &self,
        dataset: DatasetRef,
        sync_count: u64,
    ) -> Result<Vec<Record>, ClientError> {
        match self
            .request(|id| ClientFrame::ReadAt {
                id,
                dataset,
                sync_count,
            })
            .await?
        {
            ServerFrame::ReadAt { records, .. } => Ok(records),
            other => Err(unexpected(&other)),
        }
    }

    /// Makes the dataset what it was at `sync_count` again, as one new commit; returns the
    /// dataset's sync count after it (the current one when nothing differed).
    pub async fn restore(
        &self,
        dataset: DatasetRef,
        sync_count: u64,
        device_id: Option<String>,
    ) -> Result<u64, ClientError> {
        match self
            .request(|id| ClientFrame::Restore {
                id,
                dataset,
                sync_count,
                device_id,
            })
            .await?
        {
            ServerFrame::Ack {
                sync_count: Some(sync_count),
                ..
            } => Ok(sync_count),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn list_datasets(&self) -> Result<Vec<DatasetInfo>, ClientError> {
        match self.request(|id| ClientFrame::ListDatasets { id }).await? {
            ServerFrame::Datasets { datasets, .. } => Ok(datasets),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn delete_dataset(&self, dataset: DatasetRef) -> Result<(), ClientError> {
        self.expect_ack(|id| ClientFrame::DeleteDataset { id, dataset })
            .await
    }

    pub async fn grant(
        &self,
        dataset: DatasetRef,
        identity: &str,
        access: Access,
    ) -> Result<(), ClientError> {
        self.expect_ack(|id| ClientFrame::Grant {
            id,
            dataset,
            identity: identity.to_owned(),
            access,
        })
        .await
    }

    pub async fn revoke(&self, dataset: DatasetRef, identity: &str) -> Result<(), ClientError> {
        self.expect_ack(|id| ClientFrame::Revoke {
            id,
            dataset,
            identity: identity.to_owned(),
        })
        .await
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        match self
            .request(|id| ClientFrame::Ping { id: Some(id) })
            .await?
        {
            ServerFrame::Pong { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn expect_ack(
        &self,
        build: impl FnOnce(RequestId) -> ClientFrame,
    ) -> Result<(), ClientError> {
        match self.request(build).await? {
            ServerFrame::Ack { .. } => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a polite close without waiting for it.
    pub fn send_close(&self) {
        let _ = self.out_tx.send(Message::Close(None));
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        let _ = self.out_tx.send(Message::Close(None));
        let _ = tokio::time::timeout(Duration::from_secs(2), self.wait_closed()).await;
    }
}

fn unexpected(frame: &ServerFrame) -> ClientError {
    let mut text = frame.to_json();
    text.truncate(200);
    ClientError::Unexpected(text)
}

/// Hands a server frame to the request waiting for its id, or to the event queue.
fn route(text: &str, pending: &Pending, events: &mpsc::UnboundedSender<ServerFrame>) {
    let frame = match ServerFrame::from_json(text) {
        Ok(frame) => frame,
        Err(e) => {
            // Unknown frame types are allowed by the protocol: skip them.
            tracing::debug!(error = %e, "skipping a frame this client does not know");
            return;
        }
    };
    let id = match &frame {
        ServerFrame::Ready { id, .. }
        | ServerFrame::Pong { id }
        | ServerFrame::Error { id, .. } => id.clone(),
        ServerFrame::Snapshot { id, .. }
        | ServerFrame::Ack { id, .. }
        | ServerFrame::Conflict { id, .. }
        | ServerFrame::Changes { id, .. }
        | ServerFrame::Datasets { id, .. }
        | ServerFrame::History { id, .. }
        | ServerFrame::ReadAt { id, .. } => Some(id.clone()),
        ServerFrame::Dataset { .. }
        | ServerFrame::Delta { .. }
        | ServerFrame::Deleted { .. }
        | ServerFrame::Unsubscribed { .. } => None,
    };
    if let Some(RequestId::Num(n)) = id
        && let Some(tx) = pending.lock().remove(&n)
    {
        let _ = tx.send(frame);
        return;
    }
    let _ = events.send(frame);
}
