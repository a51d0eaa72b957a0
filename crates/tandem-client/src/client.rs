//! `Client`: a connection that stays up (reconnect with backoff and jitter, re-subscription,
//! token refresh) and `Dataset` handles over the offline cache, the way Cognito Sync's
//! sync manager worked, but live and shared.

use crate::cache::{Cache, DatasetCache, LocalRecord};
use crate::conflict::{ConflictCase, ConflictHandler, Resolution};
use crate::deleted::{DeletedPolicy, OnDatasetDeleted};
use crate::limits::{self, Limits, SetAside};
use crate::{ClientError, Connection, UpdateResult};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tandem_protocol::{
    DatasetRef, ErrorCode, FEATURE_DELTA, FEATURE_LEAN, LimitCode, Patch, PatchOp, Record,
    ServerFrame, should_reconnect,
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
}

/// What happened to an open dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatasetEvent {
    /// Remote changes were applied to the cache (these keys changed).
    Changed { sync_count: u64, keys: Vec<String> },
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

    /// Starts the client. It connects in the background; datasets work offline meanwhile.
    pub fn start(self) -> Result<Client, ClientError> {
        let token = self
            .token
            .ok_or_else(|| ClientError::Connect("no token or token provider given".into()))?;
        let (status, _) = watch::channel(Status::Connecting);
        let inner = Arc::new(Inner {
            urls: self.urls,
            cache: Cache::new(self.cache_dir.as_deref(), &self.identity),
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
            limits: Mutex::new(Limits::default()),
            conn: Mutex::new(None),
            datasets: Mutex::new(HashMap::new()),
            status,
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
    /// The server's write limits as last known (kept while offline).
    limits: Mutex<Limits>,
    conn: Mutex<Option<Arc<Connection>>>,
    datasets: Mutex<HashMap<(String, String), Arc<Shared>>>,
    status: watch::Sender<Status>,
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
    /// Works offline from the cache; when online it subscribes and merges the server's state.
    /// Opening a dataset whose access was revoked follows it again if it was shared again;
    /// if not, the handle is returned all the same (still revoked, local data readable).
    pub async fn open(
        &self,
        dataset: DatasetRef,
        handler: ConflictHandler,
    ) -> Result<Dataset, ClientError> {
        let owner = dataset
            .owner
            .clone()
            .unwrap_or_else(|| self.inner.identity.clone());
        let key = (owner.clone(), dataset.name.clone());
        let existing = self.inner.datasets.lock().get(&key).cloned();
        let shared = match existing {
            Some(shared) => shared,
            None => {
                let cached = self
                    .inner
                    .cache
                    .load(&owner, &dataset.name)
                    .map_err(|e| ClientError::Cache(e.to_string()))?;
                let (events, _) = broadcast::channel(256);
                let shared = Arc::new(Shared {
                    dataset: DatasetRef::new(owner, dataset.name),
                    state: Mutex::new(cached),
                    handler,
                    on_deleted: Mutex::new(self.inner.on_deleted.clone()),
                    events,
                    sync_lock: tokio::sync::Mutex::new(()),
                    revoked: AtomicBool::new(false),
                    subscribed: AtomicBool::new(false),
                    need_whole: AtomicBool::new(false),
                    catching_up: AtomicBool::new(false),
                    catch_up_to: AtomicU64::new(0),
                });
                self.inner
                    .datasets
                    .lock()
                    .entry(key)
                    .or_insert(shared)
                    .clone()
            }
        };
        if let Some(conn) = self.inner.current() {
            let was_revoked = shared.revoked.load(Ordering::SeqCst);
            match subscribe(&self.inner, &conn, &shared).await {
                Ok(()) => {}
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

    /// `dataset` with its owner filled in (this identity when it names none).
    fn owned(&self, dataset: DatasetRef) -> DatasetRef {
        let owner = dataset.owner.unwrap_or_else(|| self.inner.identity.clone());
        DatasetRef::new(owner, dataset.name)
    }

    /// Stops reconnecting and closes the connection. Datasets keep working offline.
    pub async fn shutdown(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        self.inner.stop.notify_waiters();
        let conn = self.inner.conn.lock().take();
        if let Some(conn) = conn {
            conn.send_close();
        }
        self.inner.status.send_replace(Status::Offline);
    }
}

impl Inner {
    fn current(&self) -> Option<Arc<Connection>> {
        self.conn.lock().clone()
    }

    fn save(&self, shared: &Shared, state: &DatasetCache) {
        if let Err(e) = self.try_save(shared, state) {
            tracing::warn!(error = %e, "cannot write the offline cache");
        }
    }

    /// Writes the offline cache; for a local edit, whose caller must hear that it is not
    /// durable.
    fn try_save(&self, shared: &Shared, state: &DatasetCache) -> std::io::Result<()> {
        let owner = shared.dataset.owner.as_deref().unwrap_or(&self.identity);
        self.cache.save(owner, &shared.dataset.name, state)
    }
}

struct Shared {
    dataset: DatasetRef,
    state: Mutex<DatasetCache>,
    handler: ConflictHandler,
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
}

impl Shared {
    fn emit(&self, event: DatasetEvent) {
        let _ = self.events.send(event);
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
    /// until it is edited again.
    fn put_aside(&self, inner: &Inner, key: &str, reason: SetAside) {
        {
            let mut state = self.state.lock();
            let Some(local) = state.records.get_mut(key) else {
                return;
            };
            if !local.dirty || local.set_aside.is_some() {
                return;
            }
            local.set_aside = Some(reason.clone());
            inner.save(self, &state);
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
                    local.device_last_modified = record.device_last_modified;
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
                    local.value = record.value.clone();
                    local.sync_count = record.sync_count;
                    local.device_last_modified = record.device_last_modified;
                }
                None => {
                    changed.push(key.clone());
                    state.records.insert(
                        key.clone(),
                        LocalRecord {
                            value: record.value.clone(),
                            sync_count: record.sync_count,
                            dirty: false,
                            device_last_modified: record.device_last_modified,
                            version: 0,
                            set_aside: None,
                        },
                    );
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
    let mut undone = false;
    for (key, value) in candidates {
        let Some(broken) = shared.breaks(inner, &key, value.as_deref()) else {
            continue;
        };
        if value.is_none() && broken.limit == Some(LimitCode::MaxKeyLength) {
            undone |= shared.drop_change(&mut shared.state.lock(), &key);
        } else {
            shared.put_aside(inner, &key, broken);
        }
    }
    if undone {
        after_drop(inner, shared);
    }
}

/// After local changes were dropped: save, and get the server's versions of their keys back
/// (a whole subscribe, now when online; otherwise the next one is whole).
fn after_drop(inner: &Arc<Inner>, shared: &Arc<Shared>) {
    inner.save(shared, &shared.state.lock());
    if !shared.need_whole.load(Ordering::SeqCst) || !shared.subscribed.load(Ordering::SeqCst) {
        return;
    }
    let (Some(conn), Ok(runtime)) = (inner.current(), tokio::runtime::Handle::try_current()) else {
        return;
    };
    let (inner, shared) = (inner.clone(), shared.clone());
    runtime.spawn(async move {
        if let Err(e) = subscribe(&inner, &conn, &shared).await {
            tracing::warn!(dataset = ?shared.dataset, error = %e, "fetching the server's versions of discarded keys failed");
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
        Some(local) if local.value == record.value && local.sync_count == record.sync_count => {}
        Some(local) => {
            local.value = record.value;
            local.sync_count = record.sync_count;
            local.device_last_modified = record.device_last_modified;
            changed.push(record.key);
        }
        None if record.value.is_none() => {}
        None => {
            changed.push(record.key.clone());
            state.records.insert(
                record.key,
                LocalRecord {
                    value: record.value,
                    sync_count: record.sync_count,
                    dirty: false,
                    device_last_modified: record.device_last_modified,
                    version: 0,
                    set_aside: None,
                },
            );
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

impl Dataset {
    pub fn dataset(&self) -> &DatasetRef {
        &self.shared.dataset
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

    pub fn put(&self, key: impl Into<String>, value: impl Into<String>) -> Result<(), ClientError> {
        self.write(key.into(), Some(value.into()))
    }

    pub fn remove(&self, key: impl Into<String>) -> Result<(), ClientError> {
        self.write(key.into(), None)
    }

    fn write(&self, key: String, value: Option<String>) -> Result<(), ClientError> {
        if key.is_empty() {
            return Err(ClientError::InvalidInput("a key must not be empty".into()));
        }
        if let Some(broken) = self.shared.breaks(&self.inner, &key, value.as_deref()) {
            let (Some(limit), Some(max)) = (broken.limit, broken.max) else {
                return Err(ClientError::InvalidInput(broken.message));
            };
            // A key the server cannot hold: removing it only undoes the local edit.
            if value.is_none() && limit == LimitCode::MaxKeyLength {
                if self.shared.drop_change(&mut self.shared.state.lock(), &key) {
                    after_drop(&self.inner, &self.shared);
                }
                return Ok(());
            }
            return Err(ClientError::TooLarge {
                key,
                limit,
                max,
                message: broken.message,
            });
        }
        let mut state = self.shared.state.lock();
        let record = state.records.entry(key).or_insert(LocalRecord {
            value: None,
            sync_count: 0,
            dirty: false,
            device_last_modified: None,
            version: 0,
            set_aside: None,
        });
        record.value = value;
        record.dirty = true;
        record.device_last_modified = Some(now_ms());
        record.version += 1;
        // A new edit is tried again.
        record.set_aside = None;
        // The edit stays (in memory, and it syncs), but the caller learns it would not
        // survive a restart.
        self.inner
            .try_save(&self.shared, &state)
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

    /// Remote changes, conflicts, deletion, revocation and changes set aside, as they happen.
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
            after_drop(&self.inner, &self.shared);
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
            after_drop(&self.inner, &self.shared);
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
        let conn = self.inner.current().ok_or(ClientError::Offline)?;
        subscribe(&self.inner, &conn, &self.shared).await
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
    let _one_at_a_time = shared.sync_lock.lock().await;
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
        let reply = conn
            .update(shared.dataset.clone(), inner.device_id.clone(), patches)
            .await;
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
                        shared.put_aside(inner, &first, reason);
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
                    inner.save(shared, &state);
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
                state.records.insert(
                    key.clone(),
                    LocalRecord {
                        value: rec.value.clone(),
                        sync_count: rec.sync_count,
                        dirty: false,
                        device_last_modified: rec.device_last_modified,
                        version: 0,
                        set_aside: None,
                    },
                );
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
        if local.value.is_none() {
            state.records.remove(key);
        }
    }
    // Only a commit right after the last one seen moves the dataset's count: if others
    // committed in between, their push must still be applied.
    if sync_count == state.sync_count + 1 {
        state.sync_count = sync_count;
    }
    inner.save(shared, &state);
    drop(state);
    if !changed.is_empty() {
        changed.sort();
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: changed,
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
        }
        return None;
    }
    let resolution = shared.handler.resolve(&ConflictCase {
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
                l.version += 1;
            }
        }
        Resolution::TakeRemote => match server {
            Some(server) if server.value.is_some() => {
                state.records.insert(
                    key.to_owned(),
                    LocalRecord {
                        value: server.value.clone(),
                        sync_count: server.sync_count,
                        dirty: false,
                        device_last_modified: server.device_last_modified,
                        version: local.version + 1,
                        set_aside: None,
                    },
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
    inner.save(shared, &shared.state.lock());
    if !changed.is_empty() {
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: changed,
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
                inner.save(&shared, &shared.state.lock());
                if !changed.is_empty() {
                    shared.emit(DatasetEvent::Changed {
                        sync_count,
                        keys: changed,
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
                if !changed.is_empty() {
                    inner.save(&shared, &shared.state.lock());
                    shared.emit(DatasetEvent::Changed {
                        sync_count,
                        keys: changed,
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
        let dropped = crate::deleted::apply(&mut state, policy, sync_count);
        inner.save(&shared, &state);
        dropped
    };
    // What the server had is gone: nothing to fetch back.
    shared.need_whole.store(false, Ordering::SeqCst);
    shared.emit(DatasetEvent::Deleted { sync_count, policy });
    if !dropped.is_empty() {
        shared.emit(DatasetEvent::Changed {
            sync_count,
            keys: dropped,
        });
    }
    let (inner, conn) = (inner.clone(), conn.clone());
    tokio::spawn(async move {
        match subscribe(&inner, &conn, &shared).await {
            Ok(()) => {}
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
                        inner.save(&shared, &shared.state.lock());
                        if !changed.is_empty() {
                            shared.emit(DatasetEvent::Changed {
                                sync_count,
                                keys: changed,
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
    while !inner.stopped.load(Ordering::SeqCst) {
        inner.status.send_replace(Status::Connecting);
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
                    inner.status.send_replace(Status::Failed(reason));
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
                    inner.status.send_replace(Status::Failed(reason));
                    return;
                }
            }
            Err(e) => tracing::debug!(error = %e, "connect failed"),
        }
        if inner.stopped.load(Ordering::SeqCst) {
            break;
        }
        inner.status.send_replace(Status::Offline);
        let wait = jitter(backoff);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
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
            Err(ClientError::Revoked) => return,
            Err(e) => {
                let retriable = e.code().is_some_and(|code| code.retriable());
                let what = if subscribed { "sync" } else { "resubscribe" };
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
    let datasets: Vec<Arc<Shared>> = inner.datasets.lock().values().cloned().collect();
    // Pushes queue up in `events` meanwhile; they are applied in order afterwards.
    // Online only now: datasets opened from here on subscribe themselves, the ones above
    // are the reconnect's to catch up.
    inner.status.send_replace(Status::Online);
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
                },
            );
        }
        Shared {
            dataset: DatasetRef::new("alice", "list"),
            state: Mutex::new(cache),
            handler: ConflictHandler::TakeRemote,
            on_deleted: Mutex::new(OnDatasetDeleted::default()),
            events: broadcast::channel(8).0,
            sync_lock: tokio::sync::Mutex::new(()),
            revoked: AtomicBool::new(false),
            subscribed: AtomicBool::new(false),
            need_whole: AtomicBool::new(false),
            catching_up: AtomicBool::new(false),
            catch_up_to: AtomicU64::new(0),
        }
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
