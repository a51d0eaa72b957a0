//! `Client`: a connection that stays up (reconnect with backoff and jitter, re-subscription,
//! token refresh) and `Dataset` handles over the offline cache, the way Cognito Sync's
//! sync manager worked, but live and shared.

use crate::cache::{Cache, CachedDataset, DatasetCache, LocalRecord};
use crate::conflict::{ConflictCase, ConflictHandler, Resolution};
use crate::deleted::{DeletedPolicy, OnDatasetDeleted};
use crate::limits::{self, Limits, SetAside};
use crate::snapshot::{DatasetSnapshot, SnapshotCell, SnapshotListener};
use crate::status::SyncStatus;
use crate::{ClientError, Connection, UpdateResult};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tandem_protocol::{
    Access, DatasetInfo, DatasetRef, ErrorCode, FEATURE_DELTA, FEATURE_LEAN, LimitCode, Patch,
    PatchOp, Record, ServerFrame, should_reconnect, validate_dataset_name,
};
use tokio::sync::{Notify, broadcast, watch};

type TokenFuture = Pin<Box<dyn Future<Output = Result<String, ClientError>> + Send>>;
type TokenFn = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// The client's connection state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Connecting,
    Online,
    /// Disconnected; reconnecting with backoff. Local reads and writes go on.
    Offline,
    /// The server refused this client for good (a 45xx close, or another identity).
    Failed(String),
    /// `Client::pause` took the client off the network until `Client::resume`.
    Paused,
}

/// Where a change of a dataset's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeSource {
    /// This device's edit: `put`, `remove`, `put_all`, `discard`, `revert`.
    Local,
    /// The server's: a push, a subscribe's snapshot, an ack, a delete.
    Remote,
}

/// What happened to an open dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetEvent {
    /// The dataset's content changed: these keys (sorted) were edited here (`Local`: every
    /// `put`, `remove` or `put_all`, a key already pending too, and what `discard` or
    /// `revert` dropped) or changed by the server (`Remote`). `sync_count` is the copy's after
    /// it. `Dataset::snapshots` gives the content itself.
    Changed {
        sync_count: u64,
        keys: Vec<String>,
        source: ChangeSource,
    },
    /// A conflict on `key` was resolved by the handler.
    Conflict { key: String, resolution: Resolution },
    /// The owner deleted the dataset; `policy` (see `ClientBuilder::on_dataset_deleted`) said
    /// what stayed of the local copy. The client follows the dataset again at once, so a
    /// re-creation (by a sync of what was kept, or elsewhere) arrives like any change.
    Deleted {
        sync_count: u64,
        policy: DeletedPolicy,
    },
    /// The owner revoked this identity's access; the dataset no longer syncs (local data
    /// stays readable and writable) until it is shared again and followed again
    /// (`Dataset::subscribe`, reopening it, or the next reconnect).
    Revoked,
    /// The server refused `key`'s change for good, or it breaks a limit the server announced:
    /// it is kept (readable, pending) but not sent again until the key is edited again,
    /// discarded or reverted. Reported once per change.
    SetAside { key: String, reason: SetAside },
    /// The number of local changes not yet acknowledged changed (an edit, an ack, a
    /// conflict resolved, a discard, a delete's policy).
    Pending { pending: usize },
    /// A sync sent changes or resolved conflicts: what it did (also for auto-sync and the
    /// reconnect catch-up).
    Synced(SyncOutcome),
}

/// The result of a successful `sync`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncOutcome {
    /// The dataset's sync count after the sync.
    pub sync_count: u64,
    /// Records the server acknowledged.
    pub pushed: usize,
    /// Conflicts the handler resolved on the way.
    pub conflicts: usize,
    /// Keys whose changes are set aside (refused for good), not sent.
    pub set_aside: Vec<String>,
}

pub struct ClientBuilder {
    urls: Vec<String>,
    identity: String,
    token: Option<TokenFn>,
    cache_dir: Option<PathBuf>,
    device_id: Option<String>,
    min_backoff: Duration,
    max_backoff: Duration,
    max_sync_retries: usize,
    ping_interval: Duration,
    request_timeout: Duration,
    features: Vec<String>,
    on_deleted: OnDatasetDeleted,
    auto_sync: bool,
    auto_sync_delay: Duration,
    conflict_handler: ConflictHandler,
}

impl ClientBuilder {
    /// Another gateway to try when the current one cannot be reached; reconnects rotate
    /// through the URLs in order (for deployments without a load balancer in front).
    pub fn fallback_url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// A static token (no refresh).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        let token = token.into();
        self.token = Some(Arc::new(move || {
            let token = token.clone();
            Box::pin(async move { Ok(token) })
        }));
        self
    }

    /// Called for a token at every (re)connect and before the current one expires.
    pub fn token_provider<F, Fut>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, ClientError>> + Send + 'static,
    {
        self.token = Some(Arc::new(move || Box::pin(provider())));
        self
    }

    /// Keep the offline cache in files under this directory (default: memory only).
    pub fn cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    pub fn device_id(mut self, device: impl Into<String>) -> Self {
        self.device_id = Some(device.into());
        self
    }

    /// Reconnect backoff bounds (default 100 ms to 10 s; each wait is jittered).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.min_backoff = min;
        self.max_backoff = max.max(min);
        self
    }

    /// How many times `sync` resolves conflicts and retries before giving up (default 3).
    pub fn max_sync_retries(mut self, n: usize) -> Self {
        self.max_sync_retries = n;
        self
    }

    /// Heartbeat: a `ping` this often while online (default 25 s; zero turns it off). With
    /// the request timeout it notices a connection that went silent (a laptop woke up on
    /// another network, a NAT forgot the flow) and reconnects.
    pub fn ping_interval(mut self, every: Duration) -> Self {
        self.ping_interval = every;
        self
    }

    /// How long any request (a ping, a sync) waits for its reply before the connection is
    /// presumed dead, dropped and reconnected (default 30 s).
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The protocol features to ask for (docs/PROTOCOL.md §1). Default: both, `delta`
    /// (pushes carry only the records a commit changed) and `lean` (records leave out the
    /// fields their frame already says). An empty list gets whole-dataset pushes with full
    /// records; [`Client::features`] says what the server turned on.
    pub fn features<I, S>(mut self, features: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.features = features.into_iter().map(Into::into).collect();
        self
    }

    /// What a remote delete does to the local copy of a dataset (default
    /// `DeletedPolicy::KeepPending`); `Dataset::set_on_dataset_deleted` changes it for one
    /// dataset. A `DeletedPolicy` or `OnDatasetDeleted::custom(|dataset, sync_count| …)`.
    pub fn on_dataset_deleted(mut self, policy: impl Into<OnDatasetDeleted>) -> Self {
        self.on_deleted = policy.into();
        self
    }

    /// The conflict handler of datasets opened without naming one (`Client::open` with
    /// `None`); default `ConflictHandler::LatestDeviceTime`.
    pub fn conflict_handler(mut self, handler: ConflictHandler) -> Self {
        self.conflict_handler = handler;
        self
    }

    /// Auto-sync (default off): every dataset opened on this client syncs by itself, a
    /// short while after local edits (`auto_sync_delay`, debounced, so a burst of edits goes
    /// in one sync). Pending changes are sent on every reconnect either way.
    /// `Dataset::set_auto_sync` changes it for one dataset.
    pub fn auto_sync(mut self, on: bool) -> Self {
        self.auto_sync = on;
        self
    }

    /// How long auto-sync waits after the last local edit before it syncs (default 50 ms).
    pub fn auto_sync_delay(mut self, delay: Duration) -> Self {
        self.auto_sync_delay = delay;
        self
    }

    /// Starts the client. It connects in the background; datasets work offline meanwhile.
    pub fn start(self) -> Result<Client, ClientError> {
        let token = self
            .token
            .ok_or_else(|| ClientError::Connect("no token or token provider given".into()))?;
        let (status, _) = watch::channel(Status::Connecting);
        let cache = Cache::new(self.cache_dir.as_deref(), &self.identity);
        // What earlier runs left pending counts too (a sign-out must not lose it unseen).
        let pending_of: HashMap<(String, String), usize> = match cache.list() {
            Ok(list) => list
                .into_iter()
                .filter(|(_, _, data)| data.dirty_count() > 0)
                .map(|(owner, name, data)| ((owner, name), data.dirty_count()))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the offline cache");
                HashMap::new()
            }
        };
        let (sync_status, _) = watch::channel(SyncStatus {
            pending: pending_of.values().sum(),
            ..SyncStatus::default()
        });
        let (paused, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            urls: self.urls,
            cache,
            identity: self.identity,
            token,
            device_id: self.device_id,
            min_backoff: self.min_backoff,
            max_backoff: self.max_backoff,
            max_sync_retries: self.max_sync_retries,
            ping_interval: self.ping_interval,
            request_timeout: self.request_timeout,
            features: self.features,
            on_deleted: self.on_deleted,
            auto_sync: self.auto_sync,
            auto_sync_delay: self.auto_sync_delay,
            conflict_handler: self.conflict_handler,
            limits: Mutex::new(Limits::default()),
            conn: Mutex::new(None),
            datasets: Mutex::new(HashMap::new()),
            status,
            sync_status,
            pending_of: Mutex::new(pending_of),
            uploading: AtomicUsize::new(0),
            paused,
            stopped: AtomicBool::new(false),
            stop: Notify::new(),
        });
        tokio::spawn(run(inner.clone()));
        Ok(Client { inner })
    }
}

struct Inner {
    urls: Vec<String>,
    identity: String,
    token: TokenFn,
    cache: Cache,
    device_id: Option<String>,
    min_backoff: Duration,
    max_backoff: Duration,
    max_sync_retries: usize,
    ping_interval: Duration,
    request_timeout: Duration,
    features: Vec<String>,
    on_deleted: OnDatasetDeleted,
    auto_sync: bool,
    auto_sync_delay: Duration,
    /// For datasets opened without naming one.
    conflict_handler: ConflictHandler,
    /// The server's write limits as last known (kept while offline).
    limits: Mutex<Limits>,
    conn: Mutex<Option<Arc<Connection>>>,
    datasets: Mutex<HashMap<(String, String), Arc<Shared>>>,
    status: watch::Sender<Status>,
    sync_status: watch::Sender<SyncStatus>,
    /// Pending changes per cached dataset (owner, name): open ones as they change, closed
    /// ones as they were left, ones of earlier runs as read at start. Lock order: a
    /// dataset's state, then this.
    pending_of: Mutex<HashMap<(String, String), usize>>,
    /// Syncs with an update in flight.
    uploading: AtomicUsize,
    /// `Client::pause`d: no connection until `resume`.
    paused: watch::Sender<bool>,
    stopped: AtomicBool,
    stop: Notify,
}

/// A client that keeps its connection up and datasets in sync.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("identity", &self.inner.identity)
            .field("status", &*self.inner.status.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `url` is the gateway's `ws://host:port/v1/sync`; `identity` the user the tokens name
    /// (needed before connecting, to find the offline cache).
    pub fn builder(url: impl Into<String>, identity: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            urls: vec![url.into()],
            identity: identity.into(),
            token: None,
            cache_dir: None,
            device_id: None,
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            max_sync_retries: 3,
            ping_interval: Duration::from_secs(25),
            request_timeout: crate::connection::DEFAULT_REQUEST_TIMEOUT,
            features: vec![FEATURE_DELTA.to_owned(), FEATURE_LEAN.to_owned()],
            on_deleted: OnDatasetDeleted::default(),
            auto_sync: false,
            auto_sync_delay: Duration::from_millis(50),
            conflict_handler: ConflictHandler::default(),
        }
    }

    /// Starts a client with a token provider (the common case).
    pub fn connect<F, Fut>(
        url: &str,
        identity: &str,
        token_provider: F,
    ) -> Result<Client, ClientError>
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, ClientError>> + Send + 'static,
    {
        Client::builder(url, identity)
            .token_provider(token_provider)
            .start()
    }

    pub fn identity(&self) -> &str {
        &self.inner.identity
    }

    pub fn status(&self) -> Status {
        self.inner.status.borrow().clone()
    }

    /// The protocol features the server turned on for the current connection (empty while
    /// offline, or when none were asked for).
    pub fn features(&self) -> Vec<String> {
        self.inner
            .current()
            .map(|conn| conn.features().to_vec())
            .unwrap_or_default()
    }

    /// The server's limits on an update, as last known: from `ready.limits`, or learnt from
    /// an error that named one; kept while offline (none known before the first connection).
    /// `put` refuses a change that breaks one of them on its own, and `sync` splits updates
    /// at `max_patches` and `max_frame_bytes`.
    pub fn limits(&self) -> Limits {
        *self.inner.limits.lock()
    }

    /// Watches the connection state.
    pub fn status_changes(&self) -> watch::Receiver<Status> {
        self.inner.status.subscribe()
    }

    /// Waits until the client is online, up to `timeout`.
    pub async fn wait_online(&self, timeout: Duration) -> Result<(), ClientError> {
        let mut rx = self.inner.status.subscribe();
        let wait = async {
            loop {
                match &*rx.borrow_and_update() {
                    Status::Online => return Ok(()),
                    Status::Failed(reason) => {
                        return Err(ClientError::Closed {
                            code: None,
                            reason: reason.clone(),
                        });
                    }
                    _ => {}
                }
                if rx.changed().await.is_err() {
                    return Err(ClientError::Offline);
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| ClientError::Offline)?
    }

    /// Opens one of this identity's datasets (or another owner's, with `DatasetRef::new`).
    /// Works offline from the cache; when online it subscribes, merges the server's state and
    /// sends the changes the cache holds pending (from before a `close`, or an earlier run).
    /// Opening a dataset whose access was revoked follows it again if it was shared again;
    /// if not, the handle is returned all the same (still revoked, local data readable).
    ///
    /// `handler`: a `ConflictHandler`, or `None` for the client's default
    /// (`ClientBuilder::conflict_handler`). Opening a dataset that is open already returns
    /// the same handle (`==` to it) when no handler or the same one (see `ConflictHandler`'s
    /// `==`) is named; another one is refused with `ClientError::OtherConflictHandler`
    /// (replace it with `Dataset::set_conflict_handler`), never silently ignored.
    pub async fn open(
        &self,
        dataset: DatasetRef,
        handler: impl Into<Option<ConflictHandler>>,
    ) -> Result<Dataset, ClientError> {
        let wanted = handler.into();
        let owner = dataset
            .owner
            .clone()
            .unwrap_or_else(|| self.inner.identity.clone());
        let key = (owner.clone(), dataset.name.clone());
        // An open handle is shared; naming another handler for it is a mistake to say.
        let same = |shared: Arc<Shared>| match &wanted {
            Some(handler) if *handler != *shared.handler.lock() => {
                Err(ClientError::OtherConflictHandler {
                    owner: key.0.clone(),
                    name: key.1.clone(),
                })
            }
            _ => Ok(shared),
        };
        // A handle being closed is on its way out: a new one replaces it, loaded once the old
        // one's final write is done (loaded before, it would miss what that write saves, and
        // then write its older copy over it).
        let existing = loop {
            let entry = self.inner.datasets.lock().get(&key).cloned();
            match entry {
                Some(old) if old.closed.load(Ordering::SeqCst) => {
                    old.close_finished().await;
                    // Its close took it out of the map; look again.
                    if self
                        .inner
                        .datasets
                        .lock()
                        .get(&key)
                        .is_some_and(|e| Arc::ptr_eq(e, &old))
                    {
                        break None;
                    }
                }
                other => break other,
            }
        };
        let shared = match existing {
            Some(shared) => same(shared)?,
            None => {
                let cached = self
                    .inner
                    .cache
                    .load(&owner, &dataset.name)
                    .map_err(|e| ClientError::Cache(e.to_string()))?;
                let handler = wanted
                    .clone()
                    .unwrap_or_else(|| self.inner.conflict_handler.clone());
                let shared = Arc::new(Shared::new(
                    DatasetRef::new(owner, dataset.name),
                    cached,
                    handler,
                    self.inner.on_deleted.clone(),
                    self.inner.auto_sync,
                ));
                let (shared, new) = {
                    let mut datasets = self.inner.datasets.lock();
                    match datasets.get(&key) {
                        Some(other) if !other.closed.load(Ordering::SeqCst) => {
                            (other.clone(), false)
                        }
                        _ => {
                            datasets.insert(key.clone(), shared.clone());
                            (shared, true)
                        }
                    }
                };
                let shared = if new { shared } else { same(shared)? };
                if new {
                    let pending = shared.state.lock().dirty_count();
                    shared.last_pending.store(pending, Ordering::SeqCst);
                    self.inner.set_pending(&key, pending);
                    spawn_saver(&self.inner, &shared);
                    spawn_auto_sync(&self.inner, &shared);
                }
                shared
            }
        };
        if let Some(conn) = self.inner.current() {
            let was_revoked = shared.revoked.load(Ordering::SeqCst);
            match subscribe(&self.inner, &conn, &shared).await {
                Ok(()) => {
                    // Changes left pending (by an earlier run, or before a close) are sent
                    // now, as the reconnect does for the datasets open then.
                    if shared.state.lock().dirty_count() > 0 {
                        let (inner, shared) = (self.inner.clone(), shared.clone());
                        tokio::spawn(async move {
                            if let Err(e) = sync(&inner, &shared).await {
                                tracing::debug!(dataset = ?shared.dataset, error = %e, "sending pending changes on open failed");
                            }
                        });
                    }
                }
                Err(e) if was_revoked && e.code() == Some(ErrorCode::Forbidden) => {}
                Err(e @ ClientError::Server { .. }) => return Err(e),
                Err(e) => tracing::debug!(error = %e, "subscribe failed; staying offline"),
            }
        }
        Ok(Dataset {
            inner: self.inner.clone(),
            shared,
        })
    }

    /// A page of a dataset's commits, newest first (see `Connection::history`). Needs a
    /// connection: `Offline` otherwise.
    pub async fn history(
        &self,
        dataset: DatasetRef,
        before: Option<i64>,
        limit: Option<u32>,
    ) -> Result<crate::HistoryPage, ClientError> {
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.history(self.owned(dataset), before, limit).await
    }

    /// A dataset's live records as they were at `sync_count`. Needs a connection.
    pub async fn read_at(
        &self,
        dataset: DatasetRef,
        sync_count: u64,
    ) -> Result<Vec<Record>, ClientError> {
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.read_at(self.owned(dataset), sync_count).await
    }

    /// Restores a dataset to what it was at `sync_count`, as one new commit from this
    /// client's device; returns the sync count after it. An open `Dataset` receives it like
    /// any commit. Needs a connection and write access.
    pub async fn restore(&self, dataset: DatasetRef, sync_count: u64) -> Result<u64, ClientError> {
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.restore(
            self.owned(dataset),
            sync_count,
            self.inner.device_id.clone(),
        )
        .await
    }

    /// Gives `identity` `read` or `write` access to one of this identity's datasets (existing
    /// or not yet). Needs a connection: `Offline` otherwise.
    pub async fn grant(
        &self,
        name: &str,
        identity: &str,
        access: Access,
    ) -> Result<(), ClientError> {
        let dataset = own_dataset(name)?;
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.grant(dataset, identity, access).await
    }

    /// Takes `identity`'s access to one of this identity's datasets away; its live
    /// subscriptions end at once. Needs a connection.
    pub async fn revoke(&self, name: &str, identity: &str) -> Result<(), ClientError> {
        let dataset = own_dataset(name)?;
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.revoke(dataset, identity).await
    }

    /// This identity's datasets on the server and those shared with it, with the caller's
    /// access to each. Needs a connection (`cached_datasets` lists what is local).
    pub async fn list_datasets(&self) -> Result<Vec<DatasetInfo>, ClientError> {
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.list_datasets().await
    }

    /// Deletes one of this identity's datasets on the server; every subscriber (an open
    /// `Dataset` here too) gets `DatasetEvent::Deleted` and applies its deleted policy.
    /// Needs a connection.
    pub async fn delete_dataset(&self, name: &str) -> Result<(), ClientError> {
        let dataset = own_dataset(name)?;
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        conn.delete_dataset(dataset).await
    }

    /// Local changes not yet acknowledged by the server, across every dataset this
    /// identity's cache holds: open ones, closed ones, and ones an earlier run left.
    pub fn pending(&self) -> usize {
        self.inner.pending_of.lock().values().sum()
    }

    /// The datasets this identity's local cache holds (open ones included), by owner and
    /// name, with their pending changes: what a sign-out would wipe.
    pub async fn cached_datasets(&self) -> Result<Vec<CachedDataset>, ClientError> {
        let inner = self.inner.clone();
        let listed = tokio::task::spawn_blocking(move || inner.cache.list())
            .await
            .map_err(|e| ClientError::Cache(e.to_string()))?
            .map_err(|e| ClientError::Cache(e.to_string()))?;
        let open: Vec<Arc<Shared>> = self.inner.datasets.lock().values().cloned().collect();
        let mut out: BTreeMap<(String, String), CachedDataset> = listed
            .into_iter()
            .map(|(owner, name, data)| {
                let row = CachedDataset::of(&owner, &name, &data, false);
                ((owner, name), row)
            })
            .collect();
        // An open dataset's copy in memory may be newer than its last save.
        for shared in open {
            let key = shared.key();
            let row = CachedDataset::of(&key.0, &key.1, &shared.state.lock(), true);
            out.insert(key, row);
        }
        Ok(out.into_values().collect())
    }

    /// The sync status now (connected, uploading, pending, last synced, last error).
    pub fn sync_status(&self) -> SyncStatus {
        self.inner.sync_status.borrow().clone()
    }

    /// Watches the sync status: one value, changed as one event.
    pub fn sync_status_changes(&self) -> watch::Receiver<SyncStatus> {
        self.inner.sync_status.subscribe()
    }

    /// Waits until every change pending now in the open datasets is acknowledged by the
    /// server, sending them (as `sync` does) and waiting through disconnections and
    /// reconnects for as long as it takes; bound it with `tokio::time::timeout`. A key edited
    /// again meanwhile is waited for until its newest edit is acknowledged; a change set
    /// aside (refused for good) or discarded counts as settled, and so does a dataset closed
    /// meanwhile. `Err` when a sync fails for good (`Revoked`, `Unresolved`, a refusal that is
    /// not temporary). Closed datasets' changes are not sent until they are opened again.
    pub async fn wait_for_pending_writes(&self) -> Result<(), ClientError> {
        let open: Vec<Arc<Shared>> = self.inner.datasets.lock().values().cloned().collect();
        wait_for_pending_writes(&self.inner, open).await
    }

    /// The same as `wait_for_pending_writes` (Firebase's name for it is `waitForPendingWrites`).
    pub async fn flush(&self) -> Result<(), ClientError> {
        self.wait_for_pending_writes().await
    }

    /// Signs this identity out of the device's storage: closes every open dataset and
    /// deletes what the local cache holds for this identity (its directory under
    /// `cache_dir`, or its memory), nothing of other identities. Refused with
    /// `ClientError::PendingWrites` while changes are pending anywhere in the cache (see
    /// `pending`): `wait_for_pending_writes` first, or `wipe_forced` to drop them. The client
    /// stays usable: datasets opened afterwards start empty.
    ///
    /// The cache is read again for this (another client or run over the same directory may
    /// have left changes since this one started); `Err(Cache)` when it cannot be, as a wipe
    /// must not guess.
    ///
    /// The open datasets are checked and closed at once, so no edit slips in between; the
    /// cache is checked again once they are closed, and if something came meanwhile the wipe
    /// is refused then (the datasets stay closed).
    pub async fn wipe(&self) -> Result<(), ClientError> {
        self.wipe_with(false).await
    }

    /// `wipe`, pending changes or not: they are lost.
    pub async fn wipe_forced(&self) -> Result<(), ClientError> {
        self.wipe_with(true).await
    }

    async fn wipe_with(&self, forced: bool) -> Result<(), ClientError> {
        let listed = if forced {
            None
        } else {
            Some(self.list_cache().await?)
        };
        // No await from the check to the closes' start: no edit can come in between.
        let open: HashMap<(String, String), Arc<Shared>> = self.inner.datasets.lock().clone();
        if let Some(listed) = listed {
            let pending = pending_in(listed, &open);
            if pending > 0 {
                return Err(ClientError::PendingWrites { pending });
            }
        }
        let closing: Vec<Option<CloseDone>> = open.values().map(begin_close).collect();
        for (shared, begun) in open.values().zip(closing) {
            // The final save of each is moot; what matters is that nothing writes after.
            let closed = match begun {
                Some(done) => finish_close(&self.inner, done).await,
                // Closed elsewhere: its final write must be done before the wipe.
                None => {
                    shared.close_finished().await;
                    Ok(())
                }
            };
            if let Err(e) = closed {
                tracing::debug!(dataset = ?shared.dataset, error = %e, "closing before a wipe");
            }
        }
        if !forced {
            let open = self.inner.datasets.lock().clone();
            let pending = pending_in(self.list_cache().await?, &open);
            if pending > 0 {
                return Err(ClientError::PendingWrites { pending });
            }
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.cache.wipe())
            .await
            .map_err(|e| ClientError::Cache(e.to_string()))?
            .map_err(|e| ClientError::Cache(e.to_string()))?;
        self.inner.pending_of.lock().clear();
        self.inner.publish_pending();
        Ok(())
    }

    /// What this identity's cache holds now, read again.
    async fn list_cache(&self) -> Result<Vec<(String, String, DatasetCache)>, ClientError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.cache.list())
            .await
            .map_err(|e| ClientError::Cache(e.to_string()))?
            .map_err(|e| ClientError::Cache(e.to_string()))
    }

    /// Takes the client off the network: the connection is closed and no reconnect is tried
    /// until `resume`. Local reads and writes go on; `sync` answers `Offline`.
    pub fn pause(&self) {
        self.inner.paused.send_replace(true);
    }

    /// Back on the network after `pause`: connects at once (the backoff starts afresh),
    /// re-subscribes the open datasets and sends what is pending.
    pub fn resume(&self) {
        self.inner.paused.send_replace(false);
    }

    /// Whether `pause` is in force.
    pub fn is_paused(&self) -> bool {
        *self.inner.paused.borrow()
    }

    /// `dataset` with its owner filled in (this identity when it names none).
    fn owned(&self, dataset: DatasetRef) -> DatasetRef {
        let owner = dataset.owner.unwrap_or_else(|| self.inner.identity.clone());
        DatasetRef::new(owner, dataset.name)
    }

    /// Stops reconnecting and closes the connection. Datasets keep working offline. Returns
    /// once every open dataset's copy is written to the cache.
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.stop.notify_waiters();
        let conn = self.inner.conn.lock().take();
        if let Some(conn) = conn {
            conn.send_close();
        }
        self.inner.set_status(Status::Offline);
        let open: Vec<Arc<Shared>> = self.inner.datasets.lock().values().cloned().collect();
        for shared in open {
            let inner = self.inner.clone();
            let saved =
                tokio::task::spawn_blocking(move || write_latest(&inner, &shared, false)).await;
            if let Ok(Err(e)) = saved {
                tracing::warn!(error = %e, "cannot write the offline cache");
            }
        }
    }
}

/// Pending changes in the cache as `listed`, with the open datasets' copies in memory in
/// place of their files.
fn pending_in(
    listed: Vec<(String, String, DatasetCache)>,
    open: &HashMap<(String, String), Arc<Shared>>,
) -> usize {
    let in_memory: usize = open.values().map(|s| s.state.lock().dirty_count()).sum();
    let on_disk: usize = listed
        .into_iter()
        .filter(|(owner, name, _)| !open.contains_key(&(owner.clone(), name.clone())))
        .map(|(_, _, data)| data.dirty_count())
        .sum();
    in_memory + on_disk
}

/// One of the caller's datasets by name, checked as the server checks it.
fn own_dataset(name: &str) -> Result<DatasetRef, ClientError> {
    validate_dataset_name(name)
        .map_err(|e| ClientError::InvalidInput(format!("dataset name {name:?} {e}")))?;
    Ok(DatasetRef::own(name))
}

impl Inner {
    fn current(&self) -> Option<Arc<Connection>> {
        self.conn.lock().clone()
    }

    /// The dataset's copy changed (called with its state locked): its pending count is
    /// accounted and told, its snapshot renewed if its content changed, and the background
    /// saver writes it soon, off the lock, several changes in one write when they come faster
    /// than the disk.
    fn changed(&self, shared: &Shared, state: &DatasetCache, source: ChangeSource) {
        self.accounted(shared, state, source);
        shared.save_kick.notify_one();
    }

    /// `changed` without the background save: the caller writes it itself.
    fn accounted(&self, shared: &Shared, state: &DatasetCache, source: ChangeSource) {
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if !shared.closed.load(Ordering::SeqCst) {
            shared.snapshot.offer(state, source == ChangeSource::Remote);
        }
        let pending = state.dirty_count();
        if shared.last_pending.swap(pending, Ordering::SeqCst) != pending {
            // A closed handle's late changes do not overwrite a reopened one's count.
            if !shared.closed.load(Ordering::SeqCst) {
                self.set_pending(&shared.key(), pending);
            }
            shared.emit(DatasetEvent::Pending { pending });
        }
    }

    fn set_pending(&self, key: &(String, String), pending: usize) {
        {
            let mut of = self.pending_of.lock();
            if pending == 0 {
                of.remove(key);
            } else {
                of.insert(key.clone(), pending);
            }
        }
        self.publish_pending();
    }

    fn publish_pending(&self) {
        let pending = self.pending_of.lock().values().sum();
        self.sync_status.send_if_modified(|s| {
            let changed = s.pending != pending;
            s.pending = pending;
            changed
        });
    }

    /// The connection state, and `connected` in the sync status with it.
    fn set_status(&self, status: Status) {
        let connected = status == Status::Online;
        // The sync status first: whoever waited for the state reads a status to match.
        self.sync_status.send_if_modified(|s| {
            let changed = s.connected != connected || (connected && s.last_error.is_some());
            s.connected = connected;
            if connected {
                s.last_error = None;
            }
            changed
        });
        self.status.send_replace(status);
    }

    /// In step with the server on some dataset now.
    fn synced_now(&self) {
        let now = now_ms();
        self.sync_status.send_modify(|s| {
            s.last_synced_at = Some(now);
            s.has_synced = true;
            s.last_error = None;
        });
    }

    fn record_error(&self, error: &ClientError) {
        let error = error.clone();
        self.sync_status.send_if_modified(|s| {
            let changed = s.last_error.as_ref() != Some(&error);
            s.last_error = Some(error);
            changed
        });
    }

    fn uploading(&self, delta: isize) {
        let now = if delta > 0 {
            self.uploading.fetch_add(1, Ordering::SeqCst) + 1
        } else {
            self.uploading.fetch_sub(1, Ordering::SeqCst) - 1
        };
        self.sync_status.send_if_modified(|s| {
            let changed = s.uploading != (now > 0);
            s.uploading = now > 0;
            changed
        });
    }
}

/// Counts a sync with an update in flight for as long as it lives.
struct Uploading<'a>(&'a Inner);

impl<'a> Uploading<'a> {
    fn start(inner: &'a Inner) -> Uploading<'a> {
        inner.uploading(1);
        Uploading(inner)
    }
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        self.0.uploading(-1);
    }
}

/// Writes the dataset's copy as it is now to the cache, unless a write of it as new was
/// already done. Saves of one dataset are serialised, so the file only moves forward. After
/// `close` nothing is written (`last`: the close's own final write), so a wipe that follows
/// stays wiped.
fn write_latest(inner: &Inner, shared: &Shared, last: bool) -> std::io::Result<()> {
    let mut written = shared.written.lock();
    if shared.closed.load(Ordering::SeqCst) && !last {
        return Ok(());
    }
    let (generation, copy) = {
        let state = shared.state.lock();
        (shared.generation.load(Ordering::SeqCst), state.clone())
    };
    if generation <= *written {
        return Ok(());
    }
    let (owner, name) = shared.key();
    inner.cache.save(&owner, &name, &copy)?;
    *written = generation;
    Ok(())
}

/// The dataset's background saver: one write after one or many changes, off the state lock.
/// Ends when the dataset is closed or dropped.
fn spawn_saver(inner: &Arc<Inner>, shared: &Arc<Shared>) {
    let (inner, weak, kick) = (
        Arc::downgrade(inner),
        Arc::downgrade(shared),
        shared.save_kick.clone(),
    );
    tokio::spawn(async move {
        loop {
            kick.notified().await;
            let (Some(inner), Some(shared)) = (inner.upgrade(), weak.upgrade()) else {
                return;
            };
            if shared.closed.load(Ordering::SeqCst) {
                return;
            }
            let saved =
                tokio::task::spawn_blocking(move || write_latest(&inner, &shared, false)).await;
            if let Ok(Err(e)) = saved {
                tracing::warn!(error = %e, "cannot write the offline cache");
            }
        }
    });
}

/// The dataset's auto-sync: a sync once no local edit came for `auto_sync_delay`.
fn spawn_auto_sync(inner: &Arc<Inner>, shared: &Arc<Shared>) {
    let (inner, weak, kick) = (
        Arc::downgrade(inner),
        Arc::downgrade(shared),
        shared.auto_kick.clone(),
    );
    tokio::spawn(async move {
        loop {
            kick.notified().await;
            let Some(delay) = inner.upgrade().map(|i| i.auto_sync_delay) else {
                return;
            };
            // Debounced: every edit meanwhile starts the wait again.
            loop {
                tokio::select! {
                    () = tokio::time::sleep(delay) => break,
                    () = kick.notified() => {}
                }
            }
            let (Some(inner), Some(shared)) = (inner.upgrade(), weak.upgrade()) else {
                return;
            };
            if shared.closed.load(Ordering::SeqCst) {
                return;
            }
            if !shared.auto_sync.load(Ordering::SeqCst)
                || shared.revoked.load(Ordering::SeqCst)
                || inner.current().is_none()
            {
                continue;
            }
            match sync(&inner, &shared).await {
                // Offline now: the reconnect's catch-up sends it.
                Ok(_) | Err(ClientError::Offline | ClientError::Revoked) => {}
                Err(e) => {
                    tracing::debug!(dataset = ?shared.dataset, error = %e, "auto-sync failed");
                }
            }
        }
    });
}

/// Closes a dataset: no more syncs or edits through its handles, unsubscribed, its copy
/// written to the cache one last time, and forgotten by the client (its pending count
/// stays in `Client::pending`). Waits for a sync in flight; a second close waits for the
/// first one.
async fn close(inner: &Arc<Inner>, shared: &Arc<Shared>) -> Result<(), ClientError> {
    match begin_close(shared) {
        Some(done) => finish_close(inner, done).await,
        None => {
            shared.close_finished().await;
            Ok(())
        }
    }
}

/// The part of a close that takes no wait: from here on no edit, sync or save goes through
/// the dataset, and its background tasks and snapshot listeners end. `None` when it was
/// closed already; otherwise `finish_close` (or dropping what this returns) ends the close.
fn begin_close(shared: &Arc<Shared>) -> Option<CloseDone> {
    if shared.closed.swap(true, Ordering::SeqCst) {
        return None;
    }
    // Let the background tasks end.
    shared.save_kick.notify_one();
    shared.auto_kick.notify_one();
    shared.closing.send_replace(true);
    // Told also when the close is dropped half-way, so that no open waits for ever.
    Some(CloseDone(shared.clone()))
}

/// The rest of a close `begin_close` began: waits for a sync in flight, unsubscribes, writes
/// the copy one last time and forgets the handle.
async fn finish_close(inner: &Arc<Inner>, done: CloseDone) -> Result<(), ClientError> {
    let shared = &done.0;
    let _no_sync = shared.sync_lock.lock().await;
    if shared.subscribed.swap(false, Ordering::SeqCst)
        && let Some(conn) = inner.current()
        && let Err(e) = conn.unsubscribe(shared.dataset.clone()).await
    {
        tracing::debug!(dataset = ?shared.dataset, error = %e, "unsubscribe on close failed");
    }
    let saved = {
        let (inner, shared) = (inner.clone(), shared.clone());
        tokio::task::spawn_blocking(move || write_latest(&inner, &shared, true)).await
    };
    {
        let key = shared.key();
        let mut datasets = inner.datasets.lock();
        let ours = datasets
            .get(&key)
            .is_none_or(|open| Arc::ptr_eq(open, shared));
        if ours {
            datasets.remove(&key);
            // Changes made while closing (an ack of the sync it waited for) were not counted:
            // the count is the final copy's. A handle opened since counts for itself.
            drop(datasets);
            let pending = shared.state.lock().dirty_count();
            inner.set_pending(&key, pending);
        }
    }
    match saved {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ClientError::Cache(e.to_string())),
        Err(e) => Err(ClientError::Cache(e.to_string())),
    }
}

/// Marks a close finished when dropped.
struct CloseDone(Arc<Shared>);

impl Drop for CloseDone {
    fn drop(&mut self) {
        self.0.close_done.send_replace(true);
    }
}

/// `Client::wait_for_pending_writes` over `datasets`.
async fn wait_for_pending_writes(
    inner: &Arc<Inner>,
    datasets: Vec<Arc<Shared>>,
) -> Result<(), ClientError> {
    // What is pending now, by dataset.
    let mut waiting: Vec<(Arc<Shared>, Vec<String>)> = datasets
        .into_iter()
        .map(|shared| {
            let keys = shared
                .state
                .lock()
                .records
                .iter()
                .filter(|(_, r)| r.dirty && r.set_aside.is_none())
                .map(|(k, _)| k.clone())
                .collect();
            (shared, keys)
        })
        .collect();
    let mut status = inner.sync_status.subscribe();
    let mut wait = inner.min_backoff;
    loop {
        waiting.retain_mut(|(shared, keys)| {
            if shared.closed.load(Ordering::SeqCst) {
                return false;
            }
            let state = shared.state.lock();
            keys.retain(|key| {
                state
                    .records
                    .get(key)
                    .is_some_and(|r| r.dirty && r.set_aside.is_none())
            });
            !keys.is_empty()
        });
        if waiting.is_empty() {
            return Ok(());
        }
        let mut retry = false;
        if inner.current().is_some() {
            for (shared, _) in &waiting {
                match sync(inner, shared).await {
                    Ok(_) => {}
                    Err(e) if temporary(&e) => retry = true,
                    Err(e) => return Err(e),
                }
            }
        }
        status.borrow_and_update();
        if retry || inner.current().is_none() {
            // Until something changes (back online, an ack from the catch-up), or a while.
            let _ = tokio::time::timeout(jitter(wait), status.changed()).await;
            wait = (wait * 2).min(inner.max_backoff);
        } else {
            wait = inner.min_backoff;
        }
    }
}

/// An error that a later try may not meet: offline, a dropped connection, a refusal for now.
fn temporary(e: &ClientError) -> bool {
    match e {
        ClientError::Offline
        | ClientError::Timeout(_)
        | ClientError::Closed { .. }
        | ClientError::Connect(_) => true,
        ClientError::Server { code, .. } => code.retriable(),
        _ => false,
    }
}

struct Shared {
    dataset: DatasetRef,
    state: Mutex<DatasetCache>,
    /// Shared by every handle (`Dataset::set_conflict_handler` replaces it). Lock order: the
    /// state, then this.
    handler: Mutex<ConflictHandler>,
    /// The current snapshot of `state`, renewed with it.
    snapshot: SnapshotCell,
    on_deleted: Mutex<OnDatasetDeleted>,
    events: broadcast::Sender<DatasetEvent>,
    /// One sync at a time per dataset.
    sync_lock: tokio::sync::Mutex<()>,
    /// The owner revoked our access; cleared by the next subscribe that succeeds.
    revoked: AtomicBool,
    /// The server pushes this dataset's changes on the current connection. A sync follows a
    /// dataset that is not (after a delete, or before the reconnect's catch-up got to it).
    subscribed: AtomicBool,
    /// The next subscribe asks for the whole dataset: a discarded change needs the server's
    /// version of its key back, which a reply with `since` would not repeat.
    need_whole: AtomicBool,
    /// A `changes` catch-up after a `delta` whose base the copy lacks is running.
    catching_up: AtomicBool,
    /// The highest sync count such a `delta` announced.
    catch_up_to: AtomicU64,
    /// Closed (`Dataset::close`, a wipe): no edits, syncs or saves any more.
    closed: AtomicBool,
    /// Sync by itself after local edits.
    auto_sync: AtomicBool,
    /// Wakes the auto-sync task (a local edit).
    auto_kick: Arc<Notify>,
    /// Wakes the background saver (a change to write).
    save_kick: Arc<Notify>,
    /// Bumped on every change of `state` (with it locked).
    generation: AtomicU64,
    /// The generation last written to the cache; held while writing, so writes are in order.
    written: Mutex<u64>,
    /// The pending count last told.
    last_pending: AtomicUsize,
    /// Set when `close` begins: ends the snapshot listeners.
    closing: watch::Sender<bool>,
    /// Set once `close` is done: its final write made and the handle out of the client.
    close_done: watch::Sender<bool>,
    /// The last edit version given out. It never goes down, even when a record (and its
    /// `version`) is dropped, so an ack of an older edit of a key never matches a newer one.
    edits: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Its background tasks wait on these: let them see it is gone.
        self.save_kick.notify_one();
        self.auto_kick.notify_one();
    }
}

impl Shared {
    fn new(
        dataset: DatasetRef,
        state: DatasetCache,
        handler: ConflictHandler,
        on_deleted: OnDatasetDeleted,
        auto_sync: bool,
    ) -> Shared {
        let edits = state.records.values().map(|r| r.version).max().unwrap_or(0);
        Shared {
            dataset,
            snapshot: SnapshotCell::new(&state),
            state: Mutex::new(state),
            handler: Mutex::new(handler),
            on_deleted: Mutex::new(on_deleted),
            events: broadcast::channel(256).0,
            sync_lock: tokio::sync::Mutex::new(()),
            revoked: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            need_whole: AtomicBool::new(false),
            catching_up: AtomicBool::new(false),
            catch_up_to: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            auto_sync: AtomicBool::new(auto_sync),
            auto_kick: Arc::new(Notify::new()),
            save_kick: Arc::new(Notify::new()),
            generation: AtomicU64::new(0),
            written: Mutex::new(0),
            last_pending: AtomicUsize::new(0),
            edits: AtomicU64::new(edits),
            closing: watch::channel(false).0,
            close_done: watch::channel(false).0,
        }
    }

    /// Until a close of this handle has finished (at once if it has).
    async fn close_finished(&self) {
        let mut done = self.close_done.subscribe();
        // `self` holds the sender: the channel cannot end while this waits.
        let _ = done.wait_for(|done| *done).await.map(|_| ());
    }

    /// The version of a new local edit: above any this dataset gave out before.
    fn next_version(&self) -> u64 {
        self.edits.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// (owner, name): the dataset's key in the client and in the cache.
    fn key(&self) -> (String, String) {
        let owner = self.dataset.owner.clone().unwrap_or_default();
        (owner, self.dataset.name.clone())
    }

    fn emit(&self, event: DatasetEvent) {
        let _ = self.events.send(event);
    }

    /// A local edit happened: auto-sync, if on, syncs after the delay.
    fn schedule_auto_sync(&self) {
        if self.auto_sync.load(Ordering::SeqCst) && !self.revoked.load(Ordering::SeqCst) {
            self.auto_kick.notify_one();
        }
    }

    /// Our access is gone: stop syncing (told once); the local data stays.
    fn revoke(&self) {
        self.subscribed.store(false, Ordering::SeqCst);
        if !self.revoked.swap(true, Ordering::SeqCst) {
            self.emit(DatasetEvent::Revoked);
        }
    }

    /// The known limit a change of `key` to `value` breaks on its own.
    fn breaks(&self, inner: &Inner, key: &str, value: Option<&str>) -> Option<SetAside> {
        let limits = *inner.limits.lock();
        limits.breaks(&self.dataset, inner.device_id.as_deref(), key, value)
    }

    /// Sets a pending change aside (once): kept, reported with its key, not sent again
    /// until it is edited again. `sent`: the edit version the server refused; a newer edit
    /// made meanwhile was not refused and goes in the next update.
    fn put_aside(&self, inner: &Inner, key: &str, reason: SetAside, sent: Option<u64>) {
        {
            let mut state = self.state.lock();
            let Some(local) = state.records.get_mut(key) else {
                return;
            };
            if !local.dirty
                || local.set_aside.is_some()
                || sent.is_some_and(|sent| sent != local.version)
            {
                return;
            }
            local.set_aside = Some(reason.clone());
            inner.changed(self, &state, ChangeSource::Remote);
        }
        tracing::warn!(dataset = ?self.dataset, key, code = %reason.code, message = %reason.message, "change set aside");
        self.emit(DatasetEvent::SetAside {
            key: key.to_owned(),
            reason,
        });
    }

    /// Forgets the local change of `key`; true if there was one.
    fn drop_change(&self, state: &mut DatasetCache, key: &str) -> bool {
        let Some(local) = state.records.get(key).filter(|r| r.dirty) else {
            return false;
        };
        // The server holds a version of it this copy no longer has: fetch it again.
        if local.sync_count > 0 {
            self.need_whole.store(true, Ordering::SeqCst);
        }
        state.records.remove(key);
        true
    }

    /// Merges the server's whole dataset: clean records take the server's state, dirty ones
    /// keep their local value and the version it was based on, so the next sync surfaces
    /// any remote change as a conflict instead of overwriting it.
    fn merge(&self, sync_count: u64, records: Vec<Record>, snapshot: bool) -> Vec<String> {
        let mut state = self.state.lock();
        // Latest wins: a push must be newer; a subscribe snapshot may equal what was seen
        // (it also settles records the cache got from acks).
        if sync_count < state.sync_count || (!snapshot && sync_count == state.sync_count) {
            return Vec::new();
        }
        let mut changed = Vec::new();
        let mut seen = HashSet::with_capacity(records.len());
        for record in records {
            seen.insert(record.key.clone());
            merge_record(&mut state, record, sync_count, &mut changed);
        }
        state.records.retain(|key, local| {
            if local.dirty || seen.contains(key) || local.sync_count > sync_count {
                return true;
            }
            if local.value.is_some() {
                changed.push(key.clone());
            }
            false
        });
        state.sync_count = state.sync_count.max(sync_count);
        changed
    }

    /// Merges the records changed after `since` up to `sync_count` (a `delta`, a `changes`
    /// reply, a `snapshot` with `since`) by the rules of [`Shared::merge`], except that a key
    /// not listed is unchanged and a tombstone removes a clean key. It applies only on a copy
    /// complete at a count between `since` and `sync_count`, which it then brings to
    /// `sync_count`; `None` when it did not apply. `snapshot`: a subscribe's reply, which at
    /// the copy's own count still settles records.
    fn merge_changes(
        &self,
        since: u64,
        sync_count: u64,
        records: Vec<Record>,
        snapshot: bool,
    ) -> Option<Vec<String>> {
        let mut state = self.state.lock();
        if since > state.sync_count
            || sync_count < state.sync_count
            || (!snapshot && sync_count == state.sync_count)
        {
            return None;
        }
        let mut changed = Vec::new();
        for record in records {
            merge_record(&mut state, record, sync_count, &mut changed);
        }
        state.sync_count = sync_count;
        Some(changed)
    }

    /// A whole snapshot below the `since` this copy sent: the server no longer has the
    /// history the copy was built on (its store restored from an older backup, or started
    /// afresh), so the snapshot replaces the copy, lower sync count and all. Clean records
    /// take the server's state. Local edits stay pending, rebased on it: a key the server
    /// lacks is written as new (base 0), one it holds with the same value is done, and one
    /// it holds at another version goes to the handler now, as a refused update would.
    /// Returns the keys whose value changed, and the count the copy had reached past `sent`
    /// while the subscribe was in flight (a push or an ack applied on top of the stale
    /// copy), which must be fetched again.
    fn replace(
        &self,
        sent: u64,
        sync_count: u64,
        records: Vec<Record>,
    ) -> (Vec<String>, Option<u64>) {
        let mut state = self.state.lock();
        let moved = (state.sync_count > sent).then_some(state.sync_count);
        let server: BTreeMap<String, Record> =
            records.into_iter().map(|r| (r.key.clone(), r)).collect();
        let mut changed = Vec::new();
        state.records.retain(|key, local| {
            if server.contains_key(key) {
                return true;
            }
            if local.dirty {
                local.sync_count = 0;
                return true;
            }
            if local.value.is_some() {
                changed.push(key.clone());
            }
            false
        });
        let mut stale = Vec::new();
        for (key, record) in &server {
            match state.records.get_mut(key) {
                Some(local) if local.dirty && local.value == record.value => {
                    local.dirty = false;
                    local.sync_count = record.sync_count;
                    local.take_metadata(record);
                }
                Some(local) if local.dirty => {
                    // A base equal to the server's version is what the server accepts.
                    if local.sync_count != record.sync_count {
                        stale.push(key.clone());
                    }
                }
                Some(local) => {
                    if local.value != record.value {
                        changed.push(key.clone());
                    }
                    local.take_server(record);
                }
                None => {
                    changed.push(key.clone());
                    state
                        .records
                        .insert(key.clone(), LocalRecord::from_server(record, 0));
                }
            }
        }
        for key in stale {
            let resolution = resolve_conflict(self, &mut state, &key, server.get(&key));
            if resolution == Some(Resolution::TakeRemote) {
                changed.push(key);
            }
        }
        state.sync_count = sync_count;
        changed.sort();
        (changed, moved)
    }
}

/// Sets aside the pending changes that break a known limit on their own; a removal of a key
/// too long for the server is only a local undo, dropped.
fn set_aside_broken(inner: &Arc<Inner>, shared: &Arc<Shared>) {
    let candidates: Vec<(String, Option<String>)> = shared
        .state
        .lock()
        .records
        .iter()
        .filter(|(_, r)| r.dirty && r.set_aside.is_none())
        .map(|(k, r)| (k.clone(), r.value.clone()))
        .collect();
    let mut undone = Vec::new();
    for (key, value) in candidates {
        let Some(broken) = shared.breaks(inner, &key, value.as_deref()) else {
            continue;
        };
        if value.is_none() && broken.limit == Some(LimitCode::MaxKeyLength) {
            if shared.drop_change(&mut shared.state.lock(), &key) {
                undone.push(key);
            }
        } else {
            shared.put_aside(inner, &key, broken, None);
        }
    }
    if !undone.is_empty() {
        after_drop(inner, shared, undone);
    }
}

/// After the local changes of `keys` were dropped: save, tell (a local change, as in the JS
/// SDK), and get the server's versions of those keys back (a whole subscribe, now when
/// online; otherwise the next one is whole).
fn after_drop(inner: &Arc<Inner>, shared: &Arc<Shared>, mut keys: Vec<String>) {
    let sync_count = {
        let state = shared.state.lock();
        inner.changed(shared, &state, ChangeSource::Local);
        state.sync_count
    };
    keys.sort();
    shared.emit(DatasetEvent::Changed {
        sync_count,
        keys,
        source: ChangeSource::Local,
    });
    if !shared.need_whole.load(Ordering::SeqCst) || !shared.subscribed.load(Ordering::SeqCst) {
        return;
    }
    let (Some(conn), Ok(runtime)) = (inner.current(), tokio::runtime::Handle::try_current()) else {
        return;
    };
    let (inner, shared) = (inner.clone(), shared.clone());
    runtime.spawn(async move {
        match subscribe(&inner, &conn, &shared).await {
            Ok(()) | Err(ClientError::DatasetClosed) => {}
            Err(e) => {
                tracing::warn!(dataset = ?shared.dataset, error = %e, "fetching the server's versions of discarded keys failed");
            }
        }
    });
}

/// One server record into the local copy, from a frame at `sync_count`. Dirty records keep
/// their local value unless the server already holds exactly it; a tombstone removes a clean
/// record.
fn merge_record(
    state: &mut DatasetCache,
    record: Record,
    sync_count: u64,
    changed: &mut Vec<String>,
) {
    match state.records.get_mut(&record.key) {
        // The server already holds exactly this local change (our own commit whose ack is on
        // its way or was lost): it is done, not pending.
        Some(local) if local.dirty && local.value == record.value => {
            if local.value.is_none() {
                state.records.remove(&record.key);
            } else {
                local.dirty = false;
                local.sync_count = local.sync_count.max(record.sync_count);
                local.take_metadata(&record);
            }
        }
        Some(local) if local.dirty => {}
        // A clean record stamped later than this frame (an ack that beat the push) is newer.
        Some(local) if local.sync_count > sync_count => {}
        Some(local) if record.value.is_none() => {
            if local.value.is_some() {
                changed.push(record.key.clone());
            }
            state.records.remove(&record.key);
        }
        // The same version: only its metadata may be new to this copy (a cache written
        // before it kept any).
        Some(local) if local.value == record.value && local.sync_count == record.sync_count => {
            local.take_metadata(&record);
        }
        Some(local) => {
            local.take_server(&record);
            changed.push(record.key);
        }
        None if record.value.is_none() => {}
        None => {
            changed.push(record.key.clone());
            state
                .records
                .insert(record.key.clone(), LocalRecord::from_server(&record, 0));
        }
    }
}

/// A dataset handle: reads and writes hit the local cache; `sync` reconciles with the server.
#[derive(Clone)]
pub struct Dataset {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("dataset", &self.shared.dataset)
            .finish_non_exhaustive()
    }
}

/// The same handle: clones of one, or what `Client::open` returned again for the dataset
/// while it was open.
impl PartialEq for Dataset {
    fn eq(&self, other: &Dataset) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }
}

impl Eq for Dataset {}

impl Dataset {
    pub fn dataset(&self) -> &DatasetRef {
        &self.shared.dataset
    }

    /// The dataset's conflict handler (shared by every handle of it).
    pub fn conflict_handler(&self) -> ConflictHandler {
        self.shared.handler.lock().clone()
    }

    /// Replaces the conflict handler, for every handle of the dataset; from now on
    /// `Client::open` naming this handler returns this handle.
    pub fn set_conflict_handler(&self, handler: ConflictHandler) {
        *self.shared.handler.lock() = handler;
    }

    /// The current snapshot: the same `Arc` until something visible changes (records,
    /// pending count, sync count), then a new one with a higher version.
    pub fn snapshot(&self) -> Arc<DatasetSnapshot> {
        self.shared.snapshot.current(&self.shared.state.lock())
    }

    /// Watches the snapshots: the receiver holds the current one and sees each new one, made
    /// by local edits, remote changes, acks, conflict resolutions and deletes, each with a
    /// higher version. It is a `watch`: a receiver that falls behind sees the latest (what
    /// a UI renders), not every one in between. Dropping it stops watching. After `close` no
    /// new snapshot comes; `changed()` ends with an error once every handle is dropped. Clone
    /// the `Arc` out of `borrow()` before calling the dataset: a change waits for the borrow.
    pub fn snapshots(&self) -> watch::Receiver<Arc<DatasetSnapshot>> {
        self.shared.snapshot.watch(&self.shared.state.lock())
    }

    /// Calls `listener` with the current snapshot now, then (from a task) with each new one
    /// as `snapshots` sees them, until the returned `SnapshotListener` is dropped or stopped
    /// or the dataset is closed. Needs a Tokio runtime.
    pub fn on_snapshot(
        &self,
        listener: impl Fn(&Arc<DatasetSnapshot>) + Send + Sync + 'static,
    ) -> SnapshotListener {
        let mut rx = self.snapshots();
        // Cloned out: the listener may read the dataset, which must not wait on this borrow.
        let now = rx.borrow_and_update().clone();
        listener(&now);
        let stopped = Arc::new(AtomicBool::new(false));
        let flag = stopped.clone();
        let mut closing = self.shared.closing.subscribe();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() {
                        return;
                    },
                    // Closed (or gone): no new snapshot comes.
                    _ = closing.wait_for(|closing| *closing) => return,
                }
                let snapshot = rx.borrow_and_update().clone();
                if flag.load(Ordering::SeqCst) {
                    return;
                }
                listener(&snapshot);
            }
        });
        SnapshotListener { stopped, task }
    }

    pub fn get(&self, key: &str) -> Option<String> {
        self.shared
            .state
            .lock()
            .records
            .get(key)
            .and_then(|r| r.value.clone())
    }

    /// The live (not removed) records as this device sees them.
    pub fn records(&self) -> BTreeMap<String, String> {
        self.shared
            .state
            .lock()
            .records
            .iter()
            .filter_map(|(k, r)| r.value.clone().map(|v| (k.clone(), v)))
            .collect()
    }

    /// The local record with its sync bookkeeping.
    pub fn record(&self, key: &str) -> Option<LocalRecord> {
        self.shared.state.lock().records.get(key).cloned()
    }

    /// Sets `key` locally (pending until the server acknowledges it) and writes the cache
    /// before returning.
    pub fn put(&self, key: impl Into<String>, value: impl Into<String>) -> Result<(), ClientError> {
        self.write(vec![(key.into(), Some(value.into()))])
    }

    pub fn remove(&self, key: impl Into<String>) -> Result<(), ClientError> {
        self.write(vec![(key.into(), None)])
    }

    /// Puts several keys at once: each is checked first (an empty key, the server's limits)
    /// and, if one is refused, none is written; then they are written to the cache in one
    /// save. They go to the server in as few updates as its limits allow, like any pending
    /// changes.
    pub fn put_all<I, K, V>(&self, entries: I) -> Result<(), ClientError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let edits = entries
            .into_iter()
            .map(|(k, v)| (k.into(), Some(v.into())))
            .collect();
        self.write(edits)
    }

    /// Local edits: checked (all before any), applied, written to the cache; auto-sync told.
    fn write(&self, edits: Vec<(String, Option<String>)>) -> Result<(), ClientError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::DatasetClosed);
        }
        let mut undo = Vec::new();
        let mut apply = Vec::with_capacity(edits.len());
        for (key, value) in edits {
            if key.is_empty() {
                return Err(ClientError::InvalidInput("a key must not be empty".into()));
            }
            let Some(broken) = self.shared.breaks(&self.inner, &key, value.as_deref()) else {
                apply.push((key, value));
                continue;
            };
            let (Some(limit), Some(max)) = (broken.limit, broken.max) else {
                return Err(ClientError::InvalidInput(broken.message));
            };
            // A key the server cannot hold: removing it only undoes the local edit.
            if value.is_none() && limit == LimitCode::MaxKeyLength {
                undo.push(key);
                continue;
            }
            return Err(ClientError::TooLarge {
                key,
                limit,
                max,
                message: broken.message,
            });
        }
        if !undo.is_empty() {
            let dropped: Vec<String> = {
                let mut state = self.shared.state.lock();
                undo.into_iter()
                    .filter(|key| self.shared.drop_change(&mut state, key))
                    .collect()
            };
            if !dropped.is_empty() {
                after_drop(&self.inner, &self.shared, dropped);
            }
        }
        if apply.is_empty() {
            return Ok(());
        }
        // Every edit is told, a key already pending too: what shows it must follow.
        let mut keys: Vec<String> = apply.iter().map(|(k, _)| k.clone()).collect();
        keys.sort();
        keys.dedup();
        let sync_count = {
            let mut state = self.shared.state.lock();
            let now = now_ms();
            for (key, value) in apply {
                let record = state.records.entry(key).or_insert_with(LocalRecord::blank);
                record.value = value;
                record.dirty = true;
                record.device_last_modified = Some(now);
                record.version = self.shared.next_version();
                // A new edit is tried again.
                record.set_aside = None;
                // Ours until the server stamps it with its time.
                record.last_modified = None;
                record.last_modified_by = Some(self.inner.identity.clone());
                record.device_id = self.inner.device_id.clone();
            }
            self.inner
                .accounted(&self.shared, &state, ChangeSource::Local);
            state.sync_count
        };
        self.shared.emit(DatasetEvent::Changed {
            sync_count,
            keys,
            source: ChangeSource::Local,
        });
        self.shared.schedule_auto_sync();
        // Written off the state lock. The edit stays (in memory, and it syncs), but the
        // caller learns it would not survive a restart.
        write_latest(&self.inner, &self.shared, false)
            .map_err(|e| ClientError::Cache(e.to_string()))
    }

    /// Local changes not yet acknowledged by the server.
    pub fn pending(&self) -> usize {
        self.shared.state.lock().dirty_count()
    }

    /// The highest dataset sync count seen from the server.
    pub fn sync_count(&self) -> u64 {
        self.shared.state.lock().sync_count
    }

    /// Changes (local edits and remote ones), conflicts, deletion, revocation, changes set
    /// aside, the pending count and what each sync did, as they happen. A receiver that falls
    /// more than 256 events behind loses the oldest (`RecvError::Lagged`); `snapshots` never
    /// loses the latest content.
    pub fn events(&self) -> broadcast::Receiver<DatasetEvent> {
        self.shared.events.subscribe()
    }

    /// The changes set aside (refused for good by the server, or breaking a limit it
    /// announced), by key: kept, readable and pending, but not sent until the key is edited
    /// again, discarded or reverted.
    pub fn set_aside(&self) -> Vec<(String, SetAside)> {
        self.shared
            .state
            .lock()
            .records
            .iter()
            .filter(|(_, r)| r.dirty)
            .filter_map(|(k, r)| r.set_aside.clone().map(|why| (k.clone(), why)))
            .collect()
    }

    /// Drops the local change of `key` (set aside or only pending): the key goes back to the
    /// server's version, fetched again when online. Returns whether there was one.
    pub fn discard(&self, key: &str) -> bool {
        let had = self.shared.drop_change(&mut self.shared.state.lock(), key);
        if had {
            after_drop(&self.inner, &self.shared, vec![key.to_owned()]);
        }
        had
    }

    /// Drops every local change not yet acknowledged, set aside or not (see `discard`).
    /// Returns the keys dropped.
    pub fn revert(&self) -> Vec<String> {
        let dropped: Vec<String> = {
            let mut state = self.shared.state.lock();
            let dirty: Vec<String> = state
                .records
                .iter()
                .filter(|(_, r)| r.dirty)
                .map(|(k, _)| k.clone())
                .collect();
            dirty
                .into_iter()
                .filter(|k| self.shared.drop_change(&mut state, k))
                .collect()
        };
        if !dropped.is_empty() {
            after_drop(&self.inner, &self.shared, dropped.clone());
        }
        dropped
    }

    /// Whether the owner revoked this identity's access (until the dataset is followed
    /// again after a re-grant).
    pub fn is_revoked(&self) -> bool {
        self.shared.revoked.load(Ordering::SeqCst)
    }

    /// Follows the dataset again now: subscribes and merges the server's state. After
    /// `Revoked`, once the owner shared the dataset again, this is what lets it sync again
    /// (`Err(Server { code: Forbidden, .. })` while it is still not shared). `Offline`
    /// without a connection (the reconnect then tries by itself).
    pub async fn subscribe(&self) -> Result<(), ClientError> {
        if self.shared.closed.load(Ordering::SeqCst) {
            return Err(ClientError::DatasetClosed);
        }
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        subscribe(&self.inner, &conn, &self.shared).await
    }

    /// Stops following the dataset and forgets this handle (and its clones): the server
    /// stops pushing it, auto-sync stops, and edits or syncs through it answer
    /// `DatasetClosed` (reads go on). Waits for a sync in flight and writes the copy to the
    /// cache one last time; its pending changes stay there, counted by `Client::pending`,
    /// and are sent when the dataset is opened again. `Err(Cache)` if that write failed.
    pub async fn close(&self) -> Result<(), ClientError> {
        close(&self.inner, &self.shared).await
    }

    /// Whether `close` was called (on this handle or a clone, or by a wipe).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::SeqCst)
    }

    /// Turns auto-sync on or off for this dataset (default: the client's
    /// `ClientBuilder::auto_sync`). Turned on with changes pending, it syncs them soon.
    pub fn set_auto_sync(&self, on: bool) {
        self.shared.auto_sync.store(on, Ordering::SeqCst);
        if on && self.pending() > 0 {
            self.shared.schedule_auto_sync();
        }
    }

    pub fn auto_sync(&self) -> bool {
        self.shared.auto_sync.load(Ordering::SeqCst)
    }

    /// `Client::wait_for_pending_writes` for this dataset alone.
    pub async fn wait_for_pending_writes(&self) -> Result<(), ClientError> {
        wait_for_pending_writes(&self.inner, vec![self.shared.clone()]).await
    }

    /// What a remote delete does to this dataset's local copy (default: the client's
    /// `ClientBuilder::on_dataset_deleted`).
    pub fn set_on_dataset_deleted(&self, policy: impl Into<OnDatasetDeleted>) {
        *self.shared.on_deleted.lock() = policy.into();
    }

    /// Sends every local change with the sync counts it was based on. Conflicts go to the
    /// dataset's handler and the update is retried, up to the client's retry bound.
    ///
    /// Updates are split at the server's `max_patches` and `max_frame_bytes`; a change the
    /// server refuses for good is set aside (`DatasetEvent::SetAside`) and the others go on.
    /// `Err(Revoked)` after the owner revoked access; a dataset not followed on this
    /// connection (after a remote delete, say) is subscribed first.
    pub async fn sync(&self) -> Result<SyncOutcome, ClientError> {
        sync(&self.inner, &self.shared).await
    }
}

/// Sends the pending changes in as many updates as the server's limits need (`max_patches`,
/// `max_frame_bytes`), each with the sync counts its changes were based on. Conflicts go to
/// the handler and that update is retried, up to the retry bound per update. A change the
/// server refuses for good is set aside and the others go on.
async fn sync(inner: &Arc<Inner>, shared: &Arc<Shared>) -> Result<SyncOutcome, ClientError> {
    let result = sync_once(inner, shared).await;
    match &result {
        Ok(outcome) => {
            if outcome.pushed > 0 || outcome.conflicts > 0 {
                shared.emit(DatasetEvent::Synced(outcome.clone()));
            }
        }
        Err(ClientError::Offline | ClientError::DatasetClosed) => {}
        Err(e) => inner.record_error(e),
    }
    result
}

async fn sync_once(inner: &Arc<Inner>, shared: &Arc<Shared>) -> Result<SyncOutcome, ClientError> {
    let _one_at_a_time = shared.sync_lock.lock().await;
    if shared.closed.load(Ordering::SeqCst) {
        return Err(ClientError::DatasetClosed);
    }
    if shared.revoked.load(Ordering::SeqCst) {
        return Err(ClientError::Revoked);
    }
    let conn = inner.current().ok_or(ClientError::Offline)?;
    // Not followed on this connection (deleted, or the reconnect has not got to it yet):
    // follow it first, so that what this sync commits is not the last thing we hear of it.
    if !shared.subscribed.load(Ordering::SeqCst) {
        subscribe(inner, &conn, shared).await?;
    }
    set_aside_broken(inner, shared);
    let mut conflicts_resolved = 0;
    let mut rounds = 0;
    let mut pushed = 0;
    let mut last_count = None;
    // Keys acknowledged in this run: edited again meanwhile, they wait for the next one.
    let mut done = HashSet::new();
    // After the refusal of a whole update that may be one key's fault: one key per update.
    let mut one_by_one = false;
    loop {
        let (patches, versions) = batch(inner, shared, &done, one_by_one);
        let Some(first) = patches.first().map(|p| p.key.clone()) else {
            break;
        };
        let sent = patches.len();
        let reply = {
            let _uploading = Uploading::start(inner);
            conn.update(shared.dataset.clone(), inner.device_id.clone(), patches)
                .await
        };
        match reply {
            Err(ClientError::Server {
                code,
                message,
                limit,
                max,
            }) => {
                // A limit the server did not announce: learnt from `max`, then split or set
                // aside by it.
                let learnt = match (limit, max) {
                    (Some(limit), Some(max)) => inner.limits.lock().learn(limit, max),
                    _ => false,
                };
                if learnt {
                    set_aside_broken(inner, shared);
                    continue;
                }
                if limits::refused_for_good(code, limit) {
                    if sent > 1 {
                        one_by_one = true;
                    } else {
                        let reason = SetAside {
                            code,
                            limit,
                            max,
                            message,
                        };
                        let sent = versions.get(&first).copied();
                        shared.put_aside(inner, &first, reason, sent);
                    }
                    continue;
                }
                return Err(ClientError::Server {
                    code,
                    message,
                    limit,
                    max,
                });
            }
            Err(e) => return Err(e),
            Ok(UpdateResult::Committed {
                sync_count,
                records,
            }) => {
                apply_ack(inner, shared, sync_count, records, &versions);
                pushed += sent;
                last_count = Some(sync_count);
                done.extend(versions.into_keys());
                rounds = 0; // the retries are counted per update
            }
            Ok(UpdateResult::Conflict { conflicts, .. }) => {
                {
                    let mut state = shared.state.lock();
                    for conflict in conflicts {
                        let server = conflict.server.as_ref();
                        if resolve_conflict(shared, &mut state, &conflict.key, server).is_some() {
                            conflicts_resolved += 1;
                        }
                    }
                    inner.changed(shared, &state, ChangeSource::Remote);
                }
                rounds += 1;
                if rounds > inner.max_sync_retries {
                    let keys = shared
                        .state
                        .lock()
                        .records
                        .iter()
                        .filter(|(k, r)| r.dirty && r.set_aside.is_none() && !done.contains(*k))
                        .map(|(k, _)| k.clone())
                        .collect();
                    return Err(ClientError::Unresolved { keys });
                }
            }
        }
    }
    let state = shared.state.lock();
    let set_aside = state
        .records
        .iter()
        .filter(|(_, r)| r.dirty && r.set_aside.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    Ok(SyncOutcome {
        sync_count: last_count.unwrap_or(state.sync_count),
        pushed,
        conflicts: conflicts_resolved,
        set_aside,
    })
}

/// The next update's patches: the first pending changes not yet done or set aside, as many
/// as `max_patches` allows and as fit in a frame of `max_frame_bytes` (at least one), with
/// the edit version each carried.
fn batch(
    inner: &Inner,
    shared: &Shared,
    done: &HashSet<String>,
    one_by_one: bool,
) -> (Vec<Patch>, HashMap<String, u64>) {
    let known = *inner.limits.lock();
    let most = if one_by_one {
        1
    } else {
        known
            .max_patches
            .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
    };
    // Room for the frame around the patches.
    let mut room = known.max_frame_bytes.map_or(usize::MAX, |max| {
        let frame = limits::frame_bytes(&shared.dataset, inner.device_id.as_deref(), &[]);
        usize::try_from(max)
            .unwrap_or(usize::MAX)
            .saturating_sub(frame)
    });
    let state = shared.state.lock();
    let mut patches = Vec::new();
    let mut versions = HashMap::new();
    let pending = state
        .records
        .iter()
        .filter(|(k, r)| r.dirty && r.set_aside.is_none() && !done.contains(*k));
    for (key, local) in pending {
        if patches.len() >= most {
            break;
        }
        let patch = Patch {
            op: if local.value.is_some() {
                PatchOp::Replace
            } else {
                PatchOp::Remove
            },
            key: key.clone(),
            value: local.value.clone(),
            sync_count: local.sync_count,
            device_last_modified: local.device_last_modified,
        };
        let bytes = limits::patch_bytes(&patch);
        if !patches.is_empty() && bytes > room {
            break;
        }
        room = room.saturating_sub(bytes);
        patches.push(patch);
        versions.insert(key.clone(), local.version);
    }
    (patches, versions)
}

/// An update's ack: the server holds what was sent, at the counts it stored.
fn apply_ack(
    inner: &Inner,
    shared: &Shared,
    sync_count: u64,
    records: Vec<Record>,
    versions: &HashMap<String, u64>,
) {
    let mut state = shared.state.lock();
    let stored: HashMap<String, Record> = records.into_iter().map(|r| (r.key.clone(), r)).collect();
    let mut changed = Vec::new();
    for (key, version) in versions {
        let Some(local) = state.records.get_mut(key) else {
            // Discarded while the update was on its way, but committed all the same: the
            // server's record is what this copy holds now.
            if let Some(rec) = stored.get(key).filter(|r| r.value.is_some()) {
                state
                    .records
                    .insert(key.clone(), LocalRecord::from_server(rec, 0));
                changed.push(key.clone());
            }
            continue;
        };
        // The server now holds what was sent, at this count; a newer local edit made while
        // it was in flight is based on it and stays dirty. A removal of a key the server did
        // not have writes nothing: the key is absent (0).
        local.sync_count = stored.get(key).map_or(0, |r| r.sync_count);
        if local.version != *version {
            continue;
        }
        local.dirty = false;
        if let Some(rec) = stored.get(key) {
            local.take_metadata(rec);
        }
        if local.value.is_none() {
            state.records.remove(key);
        }
    }
    // Only a commit right after the last one seen moves the dataset's count: if others
    // committed in between, their push must still be applied.
    if sync_count == state.sync_count + 1 {
        state.sync_count = sync_count;
    }
    inner.changed(shared, &state, ChangeSource::Remote);
    drop(state);
    inner.synced_now();
    if !changed.is_empty() {
        changed.sort();
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: changed,
            source: ChangeSource::Remote,
        });
    }
}

/// One local change the server would refuse as stale, against the server's record for its
/// key (`None`: no record): nothing to decide when the server holds the very same value (say,
/// this client's own write whose ack was lost); otherwise the dataset's handler decides and
/// the edit is rebased on the server's version. Returns the handler's decision, already
/// emitted, or `None` when there was nothing to decide.
fn resolve_conflict(
    shared: &Shared,
    state: &mut DatasetCache,
    key: &str,
    server: Option<&Record>,
) -> Option<Resolution> {
    let local = state.records.get(key).filter(|r| r.dirty).cloned()?;
    let base = server.map_or(0, |r| r.sync_count);
    let server_value = server.and_then(|r| r.value.clone());
    if server_value == local.value {
        if local.value.is_none() {
            state.records.remove(key);
        } else if let Some(l) = state.records.get_mut(key) {
            l.sync_count = base;
            l.dirty = false;
            if let Some(server) = server {
                l.take_metadata(server);
            }
        }
        return None;
    }
    // Cloned out: the app's function runs without the handler's lock.
    let handler = shared.handler.lock().clone();
    let resolution = handler.resolve(&ConflictCase {
        key,
        local: &local,
        server,
    });
    match &resolution {
        Resolution::KeepLocal => {
            if let Some(l) = state.records.get_mut(key) {
                l.sync_count = base;
            }
        }
        Resolution::Merge(value) => {
            if let Some(l) = state.records.get_mut(key) {
                l.sync_count = base;
                l.value = value.clone();
                // The merged value is a new edit of this device's (as in the JS SDK).
                l.device_last_modified = Some(now_ms());
                l.version = shared.next_version();
                l.last_modified = None;
            }
        }
        Resolution::TakeRemote => match server {
            Some(server) if server.value.is_some() => {
                state.records.insert(
                    key.to_owned(),
                    LocalRecord::from_server(server, shared.next_version()),
                );
            }
            _ => {
                state.records.remove(key);
            }
        },
    }
    shared.emit(DatasetEvent::Conflict {
        key: key.to_owned(),
        resolution: resolution.clone(),
    });
    Some(resolution)
}

async fn subscribe(
    inner: &Arc<Inner>,
    conn: &Arc<Connection>,
    shared: &Arc<Shared>,
) -> Result<(), ClientError> {
    // A closed dataset is followed no more: the tasks that follow it again (after a discard,
    // a remote delete, a reconnect) may run after its close.
    if shared.closed.load(Ordering::SeqCst) {
        return Err(ClientError::DatasetClosed);
    }
    // The copy is complete at its sync count (every frame applied in order, own edits kept
    // apart as dirty), so the server need only send what changed after it; unless a change
    // was discarded, whose key needs the server's version again.
    let whole = shared.need_whole.swap(false, Ordering::SeqCst);
    let held = shared.state.lock().sync_count;
    let sent = (held > 0 && !whole).then_some(held);
    let snapshot = match conn.subscribe_since(shared.dataset.clone(), sent).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            if whole {
                shared.need_whole.store(true, Ordering::SeqCst);
            }
            return Err(e);
        }
    };
    // Closed while the subscribe was on its way: the close's unsubscribe may have gone
    // before it, so this one undoes it.
    if shared.closed.load(Ordering::SeqCst) {
        if let Err(e) = conn.unsubscribe(shared.dataset.clone()).await {
            tracing::debug!(dataset = ?shared.dataset, error = %e, "unsubscribe of a closed dataset failed");
        }
        return Err(ClientError::DatasetClosed);
    }
    // Followed again: a re-grant (or a re-creation) takes effect.
    shared.revoked.store(false, Ordering::SeqCst);
    shared.subscribed.store(true, Ordering::SeqCst);
    let sync_count = snapshot.sync_count;
    let mut refetch = None;
    let changed = match (snapshot.since, sent) {
        (Some(since), _) => shared
            .merge_changes(since, sync_count, snapshot.records, true)
            .unwrap_or_default(),
        // Whole and below what we named: the server never had this copy's history.
        (None, Some(sent)) if sync_count < sent => {
            let (changed, moved) = shared.replace(sent, sync_count, snapshot.records);
            refetch = moved;
            changed
        }
        (None, _) => shared.merge(sync_count, snapshot.records, true),
    };
    inner.changed(shared, &shared.state.lock(), ChangeSource::Remote);
    inner.synced_now();
    if !changed.is_empty() {
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: changed,
            source: ChangeSource::Remote,
        });
    }
    if let Some(target) = refetch {
        catch_up_gap(inner, conn, shared.clone(), target);
    }
    Ok(())
}

fn find(inner: &Inner, dataset: &DatasetRef) -> Option<Arc<Shared>> {
    let owner = dataset
        .owner
        .clone()
        .unwrap_or_else(|| inner.identity.clone());
    inner
        .datasets
        .lock()
        .get(&(owner, dataset.name.clone()))
        .cloned()
}

fn handle_event(inner: &Arc<Inner>, conn: &Arc<Connection>, frame: ServerFrame) {
    match frame {
        ServerFrame::Delta {
            dataset,
            base_sync_count,
            sync_count,
            records,
        } => {
            let Some(shared) = find(inner, &dataset) else {
                return;
            };
            let held = shared.state.lock().sync_count;
            if sync_count <= held {
                return; // old
            }
            if base_sync_count > held {
                // Something this copy never applied came before: fetch it.
                catch_up_gap(inner, conn, shared, sync_count);
                return;
            }
            // Usually the base is exactly our count. A base below it (a conflated delta
            // whose first commit this copy already has from its own ack) is as good: the
            // delta holds the newest version of every key changed after its base.
            if let Some(changed) = shared.merge_changes(base_sync_count, sync_count, records, false)
            {
                inner.changed(&shared, &shared.state.lock(), ChangeSource::Remote);
                if !changed.is_empty() {
                    shared.emit(DatasetEvent::Changed {
                        sync_count,
                        keys: changed,
                        source: ChangeSource::Remote,
                    });
                }
            }
        }
        ServerFrame::Dataset {
            dataset,
            sync_count,
            records,
        } => {
            if let Some(shared) = find(inner, &dataset) {
                let changed = shared.merge(sync_count, records, false);
                // Also when no value changed: a pending change the server now holds is done.
                inner.changed(&shared, &shared.state.lock(), ChangeSource::Remote);
                if !changed.is_empty() {
                    shared.emit(DatasetEvent::Changed {
                        sync_count,
                        keys: changed,
                        source: ChangeSource::Remote,
                    });
                }
            }
        }
        ServerFrame::Deleted {
            dataset,
            sync_count,
        } => {
            if let Some(shared) = find(inner, &dataset) {
                on_deleted(inner, conn, shared, sync_count);
            }
        }
        ServerFrame::Unsubscribed { dataset, .. } => {
            if let Some(shared) = find(inner, &dataset) {
                shared.revoke();
            }
        }
        other => tracing::debug!(frame = ?other, "ignoring event"),
    }
}

/// The owner deleted the dataset and the subscription ended. The dataset's policy decides
/// what stays of the local copy; then it is followed again at once, so that a re-creation
/// (by a sync of what was kept, here, or elsewhere) arrives live. A grantee lost its grant
/// with the dataset: that subscribe is refused and the dataset is revoked.
fn on_deleted(inner: &Arc<Inner>, conn: &Arc<Connection>, shared: Arc<Shared>, sync_count: u64) {
    shared.subscribed.store(false, Ordering::SeqCst);
    let decide = shared.on_deleted.lock().clone();
    let policy = decide.decide(&shared.dataset, sync_count);
    let dropped = {
        let mut state = shared.state.lock();
        let dropped =
            crate::deleted::apply(&mut state, policy, sync_count, || shared.next_version());
        inner.changed(&shared, &state, ChangeSource::Remote);
        dropped
    };
    // What the server had is gone: nothing to fetch back.
    shared.need_whole.store(false, Ordering::SeqCst);
    shared.emit(DatasetEvent::Deleted { sync_count, policy });
    if !dropped.is_empty() {
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: dropped,
            source: ChangeSource::Remote,
        });
    }
    let (inner, conn) = (inner.clone(), conn.clone());
    tokio::spawn(async move {
        match subscribe(&inner, &conn, &shared).await {
            // What the policy kept is pending: auto-sync re-creates the dataset with it.
            Ok(()) => {
                if shared.state.lock().dirty_count() > 0 {
                    shared.schedule_auto_sync();
                }
            }
            Err(e) if e.code() == Some(ErrorCode::Forbidden) => shared.revoke(),
            // The reconnect follows it again.
            Err(e) => {
                tracing::debug!(dataset = ?shared.dataset, error = %e, "following a deleted dataset again failed")
            }
        }
    });
}

/// A `delta` said the dataset reached `target` from a base this copy lacks: fetch `changes`
/// since the copy's count and apply them, again while newer deltas announced more (a few
/// rounds at most; the next delta or re-subscribe picks up the rest).
fn catch_up_gap(inner: &Arc<Inner>, conn: &Arc<Connection>, shared: Arc<Shared>, target: u64) {
    shared.catch_up_to.fetch_max(target, Ordering::SeqCst);
    if shared.catching_up.swap(true, Ordering::SeqCst) {
        return;
    }
    let (inner, conn) = (inner.clone(), conn.clone());
    tokio::spawn(async move {
        for _ in 0..3 {
            let since = shared.state.lock().sync_count;
            if shared.catch_up_to.load(Ordering::SeqCst) <= since {
                shared.catching_up.store(false, Ordering::SeqCst);
                // A delta may have raised the target between the check and the store.
                if shared.catch_up_to.load(Ordering::SeqCst) <= shared.state.lock().sync_count
                    || shared.catching_up.swap(true, Ordering::SeqCst)
                {
                    return;
                }
                continue;
            }
            match conn.changes(shared.dataset.clone(), since).await {
                Ok((sync_count, records)) => {
                    if let Some(changed) = shared.merge_changes(since, sync_count, records, false) {
                        inner.changed(&shared, &shared.state.lock(), ChangeSource::Remote);
                        if !changed.is_empty() {
                            shared.emit(DatasetEvent::Changed {
                                sync_count,
                                keys: changed,
                                source: ChangeSource::Remote,
                            });
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(dataset = ?shared.dataset, error = %e, "catching up after a missed delta failed");
                    break;
                }
            }
        }
        shared.catching_up.store(false, Ordering::SeqCst);
    });
}

/// Keeps a connection up until the client is shut down or refused for good.
async fn run(inner: Arc<Inner>) {
    let mut backoff = inner.min_backoff;
    let mut next_url = 0;
    let mut paused = inner.paused.subscribe();
    while !inner.stopped.load(Ordering::SeqCst) {
        if *paused.borrow_and_update() {
            inner.set_status(Status::Paused);
            tokio::select! {
                () = paused_is(&mut paused, false) => {}
                _ = inner.stop.notified() => break,
            }
            // Resumed: connect at once, from the first gateway's backoff.
            backoff = inner.min_backoff;
            continue;
        }
        inner.set_status(Status::Connecting);
        let url = &inner.urls[next_url % inner.urls.len()];
        // The next attempt, after this connection ends or fails, tries the next gateway.
        next_url += 1;
        let attempt = async {
            let token = (inner.token)().await?;
            Connection::connect_with_features(url, &token, inner.features.clone()).await
        };
        match attempt.await {
            Ok(mut conn) => {
                if conn.identity() != inner.identity {
                    let reason = format!(
                        "token names `{}`, the client was built for `{}`",
                        conn.identity(),
                        inner.identity
                    );
                    inner.record_error(&ClientError::Connect(reason.clone()));
                    inner.set_status(Status::Failed(reason));
                    return;
                }
                backoff = inner.min_backoff;
                conn.set_request_timeout(inner.request_timeout);
                if let Some(announced) = conn.limits() {
                    inner.limits.lock().announce(&announced);
                }
                let events = conn.take_events();
                let conn = Arc::new(conn);
                *inner.conn.lock() = Some(conn.clone());
                let stop_for_good = serve_connection(&inner, &conn, events).await;
                *inner.conn.lock() = None;
                // The subscriptions ended with the connection; the next one follows anew.
                for shared in inner.datasets.lock().values() {
                    shared.subscribed.store(false, Ordering::SeqCst);
                }
                if let Some(reason) = stop_for_good {
                    inner.record_error(&ClientError::Closed {
                        code: None,
                        reason: reason.clone(),
                    });
                    inner.set_status(Status::Failed(reason));
                    return;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "connect failed");
                inner.record_error(&e);
            }
        }
        if inner.stopped.load(Ordering::SeqCst) {
            break;
        }
        if *paused.borrow_and_update() {
            continue;
        }
        inner.set_status(Status::Offline);
        let wait = jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            () = paused_is(&mut paused, true) => continue,
            _ = inner.stop.notified() => break,
        }
        backoff = (backoff * 2).min(inner.max_backoff);
    }
}

/// After a reconnect: resubscribes one dataset (a revoked one too: it may have been shared
/// again meanwhile) and pushes its pending changes. A retriable
/// refusal (the server's store briefly `unavailable`, `rate_limited` after a burst of
/// resubscriptions, `internal`) is tried again with backoff (up to the client's maximum) for
/// as long as this connection lasts, so offline edits reach the server without the app
/// calling `sync` again.
async fn catch_up(inner: &Arc<Inner>, conn: &Arc<Connection>, shared: &Arc<Shared>) {
    let mut wait = inner.min_backoff;
    let mut subscribed = false;
    loop {
        let result = if subscribed {
            if shared.state.lock().dirty_count() == 0 {
                return;
            }
            sync(inner, shared).await.map(drop)
        } else {
            subscribe(inner, conn, shared).await
        };
        match result {
            Ok(()) if subscribed => return,
            Ok(()) => subscribed = true,
            Err(e) if e.code() == Some(ErrorCode::Forbidden) => {
                // Revoked while we were away (or still, for a dataset revoked before).
                shared.revoke();
                return;
            }
            Err(ClientError::Revoked | ClientError::DatasetClosed) => return,
            Err(e) => {
                let retriable = e.code().is_some_and(|code| code.retriable());
                let what = if subscribed { "sync" } else { "resubscribe" };
                inner.record_error(&e);
                tracing::warn!(dataset = ?shared.dataset, error = %e, retriable, "{what} after reconnect failed");
                if !retriable || conn.closed().is_some() {
                    return;
                }
                tokio::select! {
                    () = tokio::time::sleep(jitter(wait)) => {}
                    _ = conn.wait_closed() => return,
                }
                wait = (wait * 2).min(inner.max_backoff);
            }
        }
    }
}

/// Resubscribes, syncs what is pending, then applies pushes until the connection ends.
/// Returns a reason if the client must not reconnect.
async fn serve_connection(
    inner: &Arc<Inner>,
    conn: &Arc<Connection>,
    mut events: tokio::sync::mpsc::UnboundedReceiver<ServerFrame>,
) -> Option<String> {
    let mut paused = inner.paused.subscribe();
    if *paused.borrow_and_update() {
        // Paused while this connection was being made.
        conn.send_close();
        return None;
    }
    let datasets: Vec<Arc<Shared>> = inner.datasets.lock().values().cloned().collect();
    // Pushes queue up in `events` meanwhile; they are applied in order afterwards.
    // Online only now: datasets opened from here on subscribe themselves, the ones above
    // are the reconnect's to catch up.
    inner.set_status(Status::Online);
    // One task per dataset: one that keeps being refused must not hold up the others.
    for shared in datasets {
        let (inner, conn) = (inner.clone(), conn.clone());
        tokio::spawn(async move { catch_up(&inner, &conn, &shared).await });
    }
    let mut heartbeat = (!inner.ping_interval.is_zero()).then(|| {
        let mut every = tokio::time::interval(inner.ping_interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every
    });
    loop {
        let refresh_in = refresh_delay(conn.expires_at());
        tokio::select! {
            // Off the loop, so pushes keep flowing while it waits; a ping that times out
            // drops the connection, which ends `events` below.
            _ = async { heartbeat.as_mut()?.tick().await; Some(()) }, if heartbeat.is_some() => {
                let conn = conn.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.ping().await {
                        tracing::debug!(error = %e, "heartbeat failed");
                    }
                });
            }
            frame = events.recv() => match frame {
                Some(frame) => handle_event(inner, conn, frame),
                None => break,
            },
            _ = tokio::time::sleep(refresh_in) => {
                match (inner.token)().await {
                    Ok(token) => if let Err(e) = conn.reauth(&token).await {
                        tracing::warn!(error = %e, "token refresh refused");
                    },
                    Err(e) => tracing::warn!(error = %e, "token provider failed"),
                }
            }
            _ = inner.stop.notified() => return None,
            () = paused_is(&mut paused, true) => {
                conn.send_close();
                return None;
            }
        }
    }
    let closed = conn.wait_closed().await;
    match closed.code {
        Some(code) if !should_reconnect(code) => Some(format!(
            "server closed the connection with {code}: {}",
            closed.reason
        )),
        _ => None,
    }
}

/// Until `Client::pause` is in force (`true`) or lifted (`false`).
async fn paused_is(paused: &mut watch::Receiver<bool>, want: bool) {
    // The guard `wait_for` returns must not live across an await of the caller.
    let _ = paused.wait_for(|p| *p == want).await.map(|_| ());
}

/// Refresh the token 30 s before it expires (at least 1 s from now).
fn refresh_delay(expires_at_ms: i64) -> Duration {
    let remaining = expires_at_ms - now_ms() - 30_000;
    Duration::from_millis(u64::try_from(remaining).unwrap_or(0).max(1000))
}

fn jitter(base: Duration) -> Duration {
    let half = base / 2;
    half + Duration::from_millis(rand::random_range(0..=half.as_millis().max(1) as u64))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn shared(sync_count: u64, records: &[(&str, &str, u64)]) -> Shared {
        let mut cache = DatasetCache {
            sync_count,
            ..DatasetCache::default()
        };
        for (key, value, sync_count) in records {
            cache.records.insert(
                (*key).to_owned(),
                LocalRecord {
                    value: Some((*value).to_owned()),
                    sync_count: *sync_count,
                    dirty: false,
                    device_last_modified: None,
                    version: 0,
                    set_aside: None,
                    last_modified: None,
                    last_modified_by: None,
                    device_id: None,
                },
            );
        }
        Shared::new(
            DatasetRef::new("alice", "list"),
            cache,
            ConflictHandler::TakeRemote,
            OnDatasetDeleted::default(),
            false,
        )
    }

    /// Remote changes are written by the background saver: the last state reaches the file,
    /// in fewer writes than changes when they come faster than the disk, and the dataset's
    /// lock is free while it writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_saver_writes_the_latest_copy_in_batches_off_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        // Never online: nothing listens there.
        let client = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
            .token("t")
            .cache_dir(dir.path())
            .backoff(Duration::from_secs(10), Duration::from_secs(10))
            .start()
            .unwrap();
        let ds = client
            .open(DatasetRef::own("list"), ConflictHandler::default())
            .await
            .unwrap();
        let (inner, shared) = (&ds.inner, &ds.shared);
        let changes: u64 = 200;
        for n in 1..=changes {
            let value = n.to_string();
            shared.merge(n, vec![record("k", Some(&value), n)], false);
            inner.changed(shared, &shared.state.lock(), ChangeSource::Remote);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let on_disk = inner.cache.load("alice", "list").unwrap();
            if on_disk.sync_count == changes {
                assert_eq!(on_disk.records["k"].value.as_deref(), Some("200"));
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the last state never got written"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let saves = inner.cache.saves.load(Ordering::SeqCst);
        assert!(
            saves < changes as usize,
            "{saves} writes for {changes} changes"
        );
        // A write in progress does not hold the dataset's lock: hold the saver's turn and
        // the state is still free.
        let turn = shared.written.lock();
        assert!(shared.state.try_lock().is_some());
        drop(turn);
        client.shutdown().await;
    }

    /// Review finding 3: the server refused `k=huge` for good while `k=small` was written
    /// here; the refusal sets aside only the edit it refused, not the newer one.
    #[tokio::test]
    async fn test_a_refusal_sets_aside_only_the_edit_it_refused() {
        let client = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
            .token("t")
            .backoff(Duration::from_secs(10), Duration::from_secs(10))
            .start()
            .unwrap();
        let ds = client.open(DatasetRef::own("list"), None).await.unwrap();
        let (inner, shared) = (&ds.inner, &ds.shared);
        ds.put("k", "huge").unwrap();
        let sent = ds.record("k").unwrap().version;
        ds.put("k", "small").unwrap();
        let reason = SetAside {
            code: ErrorCode::TooLarge,
            limit: Some(LimitCode::MaxDatasetBytes),
            max: Some(3),
            message: "dataset too large".into(),
        };
        shared.put_aside(inner, "k", reason.clone(), Some(sent));
        assert!(ds.set_aside().is_empty(), "the newer edit is still to send");
        let newer = ds.record("k").unwrap().version;
        shared.put_aside(inner, "k", reason, Some(newer));
        assert_eq!(ds.set_aside().len(), 1, "the edit refused is set aside");
        client.shutdown().await;
    }

    /// Review finding 6: opening a dataset again while its old handle is closing loads the
    /// cache after the old handle's final write, not before (missing what it saves: here an
    /// ack that lands while the close waits for the sync in flight).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_open_during_a_close_loads_the_closing_handles_final_copy() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
            .token("t")
            .cache_dir(dir.path())
            .backoff(Duration::from_secs(10), Duration::from_secs(10))
            .start()
            .unwrap();
        let old = client.open(DatasetRef::own("list"), None).await.unwrap();
        old.put("k", "v").unwrap();
        // A sync in flight: the close waits for it.
        let in_flight = old.shared.sync_lock.lock().await;
        let closing = tokio::spawn({
            let old = old.clone();
            async move { old.close().await }
        });
        while !old.is_closed() {
            tokio::task::yield_now().await;
        }
        let reopening = tokio::spawn({
            let client = client.clone();
            async move { client.open(DatasetRef::own("list"), None).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The sync's ack: `k` is settled, in the closing handle's copy only.
        {
            let mut state = old.shared.state.lock();
            state.records.get_mut("k").unwrap().dirty = false;
            state.sync_count = 1;
            old.inner.changed(&old.shared, &state, ChangeSource::Remote);
        }
        drop(in_flight);
        closing.await.unwrap().unwrap();
        let again = reopening.await.unwrap().unwrap();
        assert_ne!(again, old);
        assert_eq!(again.pending(), 0, "the final copy was loaded");
        assert_eq!(again.sync_count(), 1);
        assert_eq!(client.pending(), 0);
        client.shutdown().await;
    }

    /// Review finding 7: `wipe` checked for pending changes once and then closed the open
    /// datasets one by one, awaiting each; a dataset not closed yet took an edit meanwhile,
    /// which the wipe then deleted unseen. Now every open dataset is closed before the
    /// first wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_wipe_closes_every_open_dataset_before_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        let client = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
            .token("t")
            .cache_dir(dir.path())
            .backoff(Duration::from_secs(10), Duration::from_secs(10))
            .start()
            .unwrap();
        let a = client.open(DatasetRef::own("a"), None).await.unwrap();
        let b = client.open(DatasetRef::own("b"), None).await.unwrap();
        // A sync in flight on both: closing either waits for it.
        let in_flight_a = a.shared.sync_lock.lock().await;
        let in_flight_b = b.shared.sync_lock.lock().await;
        let wiping = tokio::spawn({
            let client = client.clone();
            async move { client.wipe().await }
        });
        // Closed one by one, the second would wait for the first's sync, held here.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !(a.is_closed() && b.is_closed()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "both closed before the wipe waits for either"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(a.put("k", "v"), Err(ClientError::DatasetClosed));
        assert_eq!(b.put("k", "v"), Err(ClientError::DatasetClosed));
        drop((in_flight_a, in_flight_b));
        wiping.await.unwrap().unwrap();
        assert!(client.cached_datasets().await.unwrap().is_empty());
        client.shutdown().await;
    }

    /// Review finding 7: an `on_snapshot` listener's task ends when the dataset is closed,
    /// not only when every handle is dropped.
    #[tokio::test]
    async fn test_on_snapshot_task_ends_at_close() {
        let client = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
            .token("t")
            .backoff(Duration::from_secs(10), Duration::from_secs(10))
            .start()
            .unwrap();
        let ds = client.open(DatasetRef::own("list"), None).await.unwrap();
        let calls = Arc::new(AtomicUsize::new(0));
        let listener = ds.on_snapshot({
            let calls = calls.clone();
            move |_| {
                calls.fetch_add(1, Ordering::SeqCst);
            }
        });
        ds.put("k", "v").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while calls.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the edit was never told"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        ds.close().await.unwrap();
        while !listener.task.is_finished() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the listener's task outlived the close"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        drop(listener);
        client.shutdown().await;
    }

    fn record(key: &str, value: Option<&str>, sync_count: u64) -> Record {
        Record {
            key: key.to_owned(),
            value: value.map(str::to_owned),
            sync_count,
            last_modified: 1,
            last_modified_by: "alice".to_owned(),
            device_id: None,
            device_last_modified: None,
        }
    }

    fn values(shared: &Shared) -> BTreeMap<String, Option<String>> {
        let state = shared.state.lock();
        state
            .records
            .iter()
            .map(|(k, r)| (k.clone(), r.value.clone()))
            .collect()
    }

    #[test]
    fn test_merge_changes_sets_and_removes_listed_keys_only() {
        let s = shared(3, &[("a", "1", 3), ("b", "2", 2), ("c", "3", 1)]);
        let changed = s
            .merge_changes(
                3,
                4,
                vec![record("a", Some("9"), 4), record("c", None, 4)],
                false,
            )
            .unwrap();
        assert_eq!(changed, ["a", "c"]);
        assert_eq!(s.state.lock().sync_count, 4);
        let want: BTreeMap<_, _> = [
            ("a".into(), Some("9".into())),
            ("b".into(), Some("2".into())),
        ]
        .into_iter()
        .collect();
        assert_eq!(values(&s), want, "b, not listed, stays");
    }

    #[test]
    fn test_merge_changes_ignores_old_and_refuses_a_gap() {
        let s = shared(5, &[("a", "1", 5)]);
        assert!(
            s.merge_changes(3, 5, vec![record("a", Some("old"), 4)], false)
                .is_none()
        );
        assert!(
            s.merge_changes(6, 7, vec![record("a", Some("new"), 7)], false)
                .is_none()
        );
        assert_eq!(s.state.lock().sync_count, 5);
        assert_eq!(s.state.lock().records["a"].value.as_deref(), Some("1"));
        // A base below our count (a conflated delta) applies: it holds every later change.
        assert!(
            s.merge_changes(4, 7, vec![record("a", Some("new"), 7)], false)
                .is_some()
        );
        assert_eq!(s.state.lock().records["a"].value.as_deref(), Some("new"));
    }

    #[test]
    fn test_merge_changes_keeps_dirty_edits_and_settles_what_the_server_holds() {
        let s = shared(2, &[("a", "1", 2), ("b", "2", 2), ("c", "3", 2)]);
        {
            let mut state = s.state.lock();
            for (key, value) in [("a", Some("mine")), ("b", None), ("c", Some("same"))] {
                let r = state.records.get_mut(key).unwrap();
                r.value = value.map(str::to_owned);
                r.dirty = true;
                r.version = 1;
            }
        }
        s.merge_changes(
            2,
            3,
            vec![
                record("a", Some("theirs"), 3),
                record("b", None, 3),
                record("c", Some("same"), 3),
            ],
            false,
        )
        .unwrap();
        let state = s.state.lock();
        // `a` keeps its value and old base, so the next sync conflicts; `b` and `c` are done.
        assert_eq!(state.records["a"].value.as_deref(), Some("mine"));
        assert!(state.records["a"].dirty);
        assert_eq!(state.records["a"].sync_count, 2);
        assert!(!state.records.contains_key("b"));
        assert!(!state.records["c"].dirty);
        assert_eq!(state.dirty_count(), 1);
    }

    /// The JS SDK's guard, in every merge path: our commit of `k` at 7 was acknowledged while
    /// the copy was at 5 (someone else committed 6); the push of 6, older than the ack, must
    /// not put back the value `k` had before.
    #[test]
    fn test_merge_keeps_a_clean_record_acked_later_than_the_frame() {
        for path in ["delta", "whole"] {
            let s = shared(5, &[("k", "acked", 7)]);
            let older = vec![record("k", Some("before"), 6), record("x", Some("1"), 6)];
            match path {
                "delta" => drop(s.merge_changes(5, 6, older, false).unwrap()),
                _ => drop(s.merge(6, older, false)),
            }
            let state = s.state.lock();
            assert_eq!(state.sync_count, 6, "{path}");
            assert_eq!(state.records["k"].value.as_deref(), Some("acked"), "{path}");
            assert_eq!(state.records["k"].sync_count, 7, "{path}");
            assert_eq!(state.records["x"].value.as_deref(), Some("1"), "{path}");
        }
    }

    #[test]
    fn test_merge_whole_removes_missing_clean_keys_but_keeps_newer_acked_ones() {
        let s = shared(3, &[("a", "1", 3), ("b", "2", 2), ("acked", "x", 6)]);
        let changed = s.merge(4, vec![record("a", Some("1"), 3)], false);
        assert_eq!(changed, ["b"]);
        assert_eq!(
            values(&s).keys().collect::<Vec<_>>(),
            ["a", "acked"],
            "a record stamped after the frame (from an ack) is newer and stays"
        );
    }

    #[test]
    fn test_replace_takes_a_lower_whole_snapshot_and_rebases_local_edits() {
        // The copy is at 9; the server, restored from an older backup, is at 4.
        let s = shared(
            9,
            &[
                ("gone", "1", 8),
                ("same", "2", 2),
                ("moved", "3", 7),
                ("mine-new", "x", 0),
                ("mine-same", "x", 5),
                ("mine-other", "x", 6),
                ("mine-based", "x", 3),
            ],
        );
        {
            let mut state = s.state.lock();
            for key in ["mine-new", "mine-same", "mine-other", "mine-based"] {
                let r = state.records.get_mut(key).unwrap();
                r.value = Some(format!("{key}!"));
                r.dirty = true;
                r.version = 1;
            }
        }
        let (changed, moved) = s.replace(
            9,
            4,
            vec![
                record("mine-based", Some("theirs"), 3),
                record("mine-other", Some("theirs"), 2),
                record("mine-same", Some("mine-same!"), 4),
                record("moved", Some("old"), 1),
                record("new", Some("n"), 4),
                record("same", Some("2"), 2),
            ],
        );
        assert_eq!(moved, None);
        // The handler (TakeRemote) was asked about `mine-other` only.
        assert_eq!(changed, ["gone", "mine-other", "moved", "new"]);
        let state = s.state.lock();
        assert_eq!(state.sync_count, 4, "the lower count is taken");
        let r = |k: &str| state.records[k].clone();
        assert_eq!((r("mine-new").dirty, r("mine-new").sync_count), (true, 0));
        assert_eq!(
            (r("mine-same").dirty, r("mine-same").sync_count),
            (false, 4)
        );
        assert_eq!(r("mine-other").value.as_deref(), Some("theirs"));
        assert!(!r("mine-other").dirty);
        assert_eq!(
            (r("mine-based").dirty, r("mine-based").sync_count),
            (true, 3),
            "a base the server accepts is kept"
        );
        assert_eq!(
            (r("moved").value.as_deref(), r("moved").sync_count),
            (Some("old"), 1)
        );
        assert!(!state.records.contains_key("gone"));
        assert_eq!(state.dirty_count(), 2);
    }
}
