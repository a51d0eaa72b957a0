//! `SqliteStore`: the embedded, single-node store in one file, `tandem.db`, in WAL mode with
//! `synchronous=FULL` so an acknowledged commit survives a power cut.
//!
//! SQLite allows one writer at a time, so one thread owns the write connection and applies
//! writes with group commit (see `writer`); reads run on a small pool of query-only
//! connections, concurrently with the writer thanks to WAL. Writes and their fsync never
//! run on the async runtime; a read does, because it is one short statement or transaction
//! over cached pages (see `SqliteStore::read`).
//!
//! Disk use follows the data, not the traffic: the WAL file stays under
//! `Limits::sqlite_wal_max_bytes` plus one group commit (see `writer::WalBound`).

mod admin;
mod backup;
mod check;
mod compact;
mod dump;
mod identity;
mod query;
mod schema;
mod stream;
mod writer;

use crate::admin::{Expect, IdentitySummary, PoolUsage};
use crate::admin::{expected_values, validate_identity_page, validate_setting};
use crate::identity::{Identity, Login, MergeOutcome};
use crate::identity::{validate_identity_call, validate_logins_call, validate_merge};
use crate::outage::CommitOutage;
use crate::stream::{validate_letters, validate_name};
use crate::{
    CompactReport, DatasetKey, DeadLetter, Limits, LogEntry, Snapshot, Store, StoreError,
    StreamConsumer, UpdateOutcome, UpdateRequest, validate_identity, validate_update,
};
use crate::{validate_call, validate_grant, validate_revoke};
use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;
use tandem_protocol::{Access, DatasetInfo};
use tokio::sync::{Semaphore, mpsc, oneshot};
use writer::{Command, Done, Op};

pub use backup::{SqliteBackupReport, backup_sqlite, dump_sqlite};
pub use check::{SqliteCheckReport, check_sqlite, check_sqlite_file};

/// Write commands that may wait for the writer before senders wait too.
const QUEUE_DEPTH: usize = 4 * writer::MAX_BATCH;

/// How long a connection waits on a lock held by another process before `Unavailable`.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Statements a connection keeps prepared.
const STATEMENT_CACHE: usize = 64;

/// The embedded store. Cloning is cheap and shares the same database; the writer thread
/// stops when `close` is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    limits: Limits,
    closed: AtomicBool,
    commands_tx: Mutex<Option<mpsc::Sender<Command>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// The background checkpointer: dropping the sender stops it.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>>,
    /// Bounds concurrent reads to the number of read connections; closed on `close`.
    read_permits: Arc<Semaphore>,
    idle_readers: Mutex<Vec<Connection>>,
    /// Set by the writer while group commits fail; `health` reports it.
    outage: Arc<CommitOutage>,
    /// Commit log entries compaction dropped past the hard cap (`commit_log_forced_drops`).
    forced_drops: Arc<AtomicU64>,
}

impl SqliteStore {
    /// The database file's name inside the data directory.
    pub const DB_FILE: &'static str = "tandem.db";

    /// Opens (creating if needed) `tandem.db` in `data_dir`, creating the directory too.
    /// Blocks while it opens and migrates the database; call it before serving.
    pub fn open(data_dir: &Path, limits: Limits) -> Result<SqliteStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data directory {}: {e}",
                data_dir.display()
            ))
        })?;
        SqliteStore::open_file(&data_dir.join(SqliteStore::DB_FILE), limits)
    }

    /// Opens (creating if needed) the database at `path`; its directory must exist.
    pub fn open_file(path: &Path, limits: Limits) -> Result<SqliteStore, StoreError> {
        let mut conn = Connection::open(path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        check::at_open(&conn, path)?;
        configure_writer(&conn, limits.sqlite_wal_max_bytes)?;
        schema::migrate(&mut conn)?;

        let readers = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(2, 8);
        // One reader up front proves the file can be read the way later reads will.
        let first_reader = open_reader(path)?;

        let (commands_tx, commands_rx) = mpsc::channel(QUEUE_DEPTH);
        let writer_limits = limits.clone();
        let checkpoint_lock = CheckpointLock::default();
        let writer_checkpoint_lock = Arc::clone(&checkpoint_lock);
        let outage = Arc::new(CommitOutage::default());
        let writer_outage = Arc::clone(&outage);
        let forced_drops = Arc::new(AtomicU64::new(0));
        let writer_forced_drops = Arc::clone(&forced_drops);
        let writer = std::thread::Builder::new()
            .name("tandem-sqlite-writer".into())
            .spawn(move || {
                writer::run(
                    conn,
                    &writer_limits,
                    commands_rx,
                    writer_checkpoint_lock,
                    &writer_outage,
                    &writer_forced_drops,
                );
            })
            .map_err(|e| StoreError::Internal(format!("cannot start the writer thread: {e}")))?;
        let checkpointer = spawn_checkpointer(path, checkpoint_lock, Arc::clone(&outage))?;
        tracing::info!(path = %path.display(), readers, "sqlite store open");

        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                limits,
                closed: AtomicBool::new(false),
                commands_tx: Mutex::new(Some(commands_tx)),
                writer: Mutex::new(Some(writer)),
                checkpointer: Mutex::new(Some(checkpointer)),
                read_permits: Arc::new(Semaphore::new(readers)),
                idle_readers: Mutex::new(vec![first_reader]),
                outage,
                forced_drops,
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// Sends a write to the writer thread and waits for its durable result.
    async fn submit(&self, op: Op) -> Result<Done, StoreError> {
        let commands_tx = lock(&self.inner.commands_tx)
            .clone()
            .ok_or_else(closed_error)?;
        let (reply_tx, reply_rx) = oneshot::channel();
        commands_tx
            .send(Command {
                op,
                reply: reply_tx,
            })
            .await
            .map_err(|_| closed_error())?;
        drop(commands_tx);
        reply_rx
            .await
            .map_err(|_| StoreError::Unavailable("store writer stopped".into()))?
    }

    /// Runs `f` on a read connection, right here on the async worker. Reads are one short
    /// statement or transaction over pages that are almost always cached (a dataset is at
    /// most `max_dataset_bytes`), so the hop to a blocking thread and back cost more than the
    /// read: on a host where every context switch is expensive, connect + subscribe went
    /// from 4.0-4.7k to 5.2-5.4k per second (docs/BENCHMARKS.md). Writes keep their thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        let permit = Arc::clone(&self.inner.read_permits)
            .acquire_owned()
            .await
            .map_err(|_| closed_error())?;
        let inner = Arc::clone(&self.inner);
        let _permit = permit;
        let mut conn = match lock(&inner.idle_readers).pop() {
            Some(conn) => conn,
            None => open_reader(&inner.path)?,
        };
        let result = f(&mut conn);
        if !inner.closed.load(Ordering::Acquire) {
            lock(&inner.idle_readers).push(conn);
        }
        result
    }

    /// Runs `f` in one read transaction, so everything it reads is from one commit.
    async fn read_tx<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.read(move |conn| {
            let tx = conn.transaction().map_err(db_err)?;
            let result = f(&tx)?;
            tx.finish().map_err(db_err)?;
            Ok(result)
        })
        .await
    }
}

impl Inner {
    /// Stops accepting writes and returns the writer thread, which exits once the queue is
    /// drained.
    fn shut(&self) -> Option<JoinHandle<()>> {
        self.closed.store(true, Ordering::Release);
        self.read_permits.close();
        drop(lock(&self.commands_tx).take());
        lock(&self.writer).take()
    }

    /// Stops the checkpointer and waits for it (at most one passive checkpoint).
    fn stop_checkpointer(&self) {
        if let Some((stop, thread)) = lock(&self.checkpointer).take() {
            drop(stop);
            if thread.join().is_err() {
                tracing::error!("sqlite checkpointer thread panicked");
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // No caller is left (they hold the Arc), so the queue holds at most commands whose
        // callers gave up: the writer finishes them quickly and closes the file.
        if let Some(writer) = self.shut()
            && writer.join().is_err()
        {
            tracing::error!("sqlite writer thread panicked");
        }
        self.stop_checkpointer();
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn snapshot(&self, dataset: &DatasetKey, actor: &str) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        let (dataset, actor) = (dataset.clone(), actor.to_owned());
        self.read_tx(move |conn| query::snapshot(conn, &dataset, &actor))
            .await
    }

    async fn changes(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        since: u64,
    ) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        let (dataset, actor) = (dataset.clone(), actor.to_owned());
        self.read_tx(move |conn| query::changes(conn, &dataset, &actor, since))
            .await
    }

    async fn update(&self, request: UpdateRequest) -> Result<UpdateOutcome, StoreError> {
        let patches = validate_update(&self.inner.limits, &request)?;
        match self.submit(Op::Update { request, patches }).await? {
            Done::Update(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    async fn delete_dataset(&self, dataset: &DatasetKey, actor: &str) -> Result<u64, StoreError> {
        validate_call(dataset, actor)?;
        let op = Op::Delete {
            dataset: dataset.clone(),
            actor: actor.to_owned(),
        };
        match self.submit(op).await? {
            Done::SyncCount(n) => Ok(n),
            other => Err(unexpected(&other)),
        }
    }

    async fn list_datasets(
        &self,
        pool: &str,
        identity: &str,
    ) -> Result<Vec<DatasetInfo>, StoreError> {
        validate_identity(identity)?;
        let (pool, identity) = (pool.to_owned(), identity.to_owned());
        self.read_tx(move |conn| query::list_datasets(conn, &pool, &identity))
            .await
    }

    async fn grant(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
        access: Access,
    ) -> Result<(), StoreError> {
        validate_grant(dataset, actor, grantee, access)?;
        let op = Op::Grant {
            dataset: dataset.clone(),
            grantee: grantee.to_owned(),
            access,
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn revoke(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
    ) -> Result<(), StoreError> {
        validate_revoke(dataset, actor, grantee)?;
        let op = Op::Revoke {
            dataset: dataset.clone(),
            grantee: grantee.to_owned(),
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn access(
        &self,
        dataset: &DatasetKey,
        identity: &str,
    ) -> Result<Option<Access>, StoreError> {
        dataset.validate()?;
        validate_identity(identity)?;
        let (dataset, identity) = (dataset.clone(), identity.to_owned());
        self.read(move |conn| query::access_of(conn, &dataset, &identity))
            .await
    }

    async fn create_identity(&self, pool: &str, id: &str, guest: bool) -> Result<(), StoreError> {
        validate_identity_call(pool, id)?;
        let op = Op::CreateIdentity {
            pool: pool.to_owned(),
            id: id.to_owned(),
            guest,
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn identity(&self, pool: &str, id: &str) -> Result<Option<Identity>, StoreError> {
        validate_identity_call(pool, id)?;
        let (pool, id) = (pool.to_owned(), id.to_owned());
        self.read_tx(move |conn| identity::load(conn, &pool, &id))
            .await
    }

    async fn link_logins(&self, pool: &str, id: &str, logins: &[Login]) -> Result<(), StoreError> {
        validate_identity_call(pool, id)?;
        validate_logins_call(pool, logins)?;
        let op = Op::LinkLogins {
            pool: pool.to_owned(),
            id: id.to_owned(),
            logins: logins.to_vec(),
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn identity_for_logins(
        &self,
        pool: &str,
        logins: &[Login],
    ) -> Result<Option<String>, StoreError> {
        validate_logins_call(pool, logins)?;
        let (pool, logins) = (pool.to_owned(), logins.to_vec());
        self.read_tx(move |conn| {
            crate::identity::one_identity(&identity::linked(conn, &pool, &logins)?)
        })
        .await
    }

    async fn merge_identity(
        &self,
        pool: &str,
        from_guest: &str,
        into: &str,
    ) -> Result<MergeOutcome, StoreError> {
        validate_merge(pool, from_guest, into)?;
        let op = Op::Merge {
            pool: pool.to_owned(),
            from: from_guest.to_owned(),
            into: into.to_owned(),
        };
        match self.submit(op).await? {
            Done::Merge(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    async fn merged_dataset_names(&self, dataset: &DatasetKey) -> Result<Vec<String>, StoreError> {
        dataset.validate()?;
        let dataset = dataset.clone();
        self.read_tx(move |conn| identity::merged_names(conn, &dataset))
            .await
    }

    async fn last_deleted_sync_count(&self, dataset: &DatasetKey) -> Result<u64, StoreError> {
        dataset.validate()?;
        let dataset = dataset.clone();
        self.read_tx(move |conn| identity::last_deleted_sync_count(conn, &dataset))
            .await
    }

    async fn log(
        &self,
        dataset: &DatasetKey,
        after_sync_count: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        dataset.validate()?;
        let dataset = dataset.clone();
        self.read(move |conn| query::log(conn, &dataset, after_sync_count, limit))
            .await
    }

    async fn history(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        validate_call(dataset, actor)?;
        let (dataset, actor) = (dataset.clone(), actor.to_owned());
        self.read_tx(move |conn| query::history(conn, &dataset, &actor, before_id, limit))
            .await
    }

    async fn read_at(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        sync_count: u64,
    ) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        let (dataset, actor) = (dataset.clone(), actor.to_owned());
        self.read_tx(move |conn| query::read_at(conn, &dataset, &actor, sync_count))
            .await
    }

    async fn log_since(&self, after_id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        self.read(move |conn| query::log_since(conn, after_id, limit))
            .await
    }

    async fn compact_log(&self, now: i64) -> Result<CompactReport, StoreError> {
        match self.submit(Op::CompactLog { now }).await? {
            Done::Compacted(report) => Ok(report),
            other => Err(unexpected(&other)),
        }
    }

    async fn log_snapshot(&self, dataset: &DatasetKey) -> Result<Option<i64>, StoreError> {
        dataset.validate()?;
        let op = Op::LogSnapshot {
            dataset: dataset.clone(),
        };
        match self.submit(op).await? {
            Done::Entry(id) => Ok(id),
            other => Err(unexpected(&other)),
        }
    }

    fn commit_log_forced_drops(&self) -> u64 {
        self.inner.forced_drops.load(Ordering::Relaxed)
    }

    async fn stream_lease(
        &self,
        consumer: &str,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StoreError> {
        validate_name("consumer", consumer)?;
        validate_name("node", node)?;
        let op = Op::StreamLease {
            consumer: consumer.to_owned(),
            node: node.to_owned(),
            now: now_ms,
            ttl: ttl_ms,
        };
        match self.submit(op).await? {
            Done::Lease(position) => Ok(position),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_ack(
        &self,
        consumer: &str,
        node: &str,
        position: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        validate_name("consumer", consumer)?;
        validate_name("node", node)?;
        let op = Op::StreamAck {
            consumer: consumer.to_owned(),
            node: node.to_owned(),
            position,
            now: now_ms,
        };
        match self.submit(op).await? {
            Done::Bool(held) => Ok(held),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_release(&self, consumer: &str, node: &str) -> Result<(), StoreError> {
        validate_name("consumer", consumer)?;
        validate_name("node", node)?;
        let op = Op::StreamRelease {
            consumer: consumer.to_owned(),
            node: node.to_owned(),
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_consumers(&self) -> Result<Vec<StreamConsumer>, StoreError> {
        self.read(|conn| stream::consumers(conn)).await
    }

    async fn stream_forget(&self, consumer: &str) -> Result<bool, StoreError> {
        validate_name("consumer", consumer)?;
        let op = Op::StreamForget {
            consumer: consumer.to_owned(),
        };
        match self.submit(op).await? {
            Done::Bool(existed) => Ok(existed),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_dead_letter(
        &self,
        consumer: &str,
        letters: &[DeadLetter],
    ) -> Result<(), StoreError> {
        validate_name("consumer", consumer)?;
        validate_letters(letters)?;
        if letters.is_empty() {
            return Ok(());
        }
        let op = Op::StreamDeadLetter {
            consumer: consumer.to_owned(),
            letters: letters.to_vec(),
        };
        match self.submit(op).await? {
            Done::Unit => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    async fn stream_dead_letters(
        &self,
        consumer: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        validate_name("consumer", consumer)?;
        let consumer = consumer.to_owned();
        self.read(move |conn| stream::dead_letters(conn, &consumer, after_id, limit))
            .await
    }

    async fn log_head(&self) -> Result<i64, StoreError> {
        self.read(|conn| stream::log_head(conn)).await
    }

    async fn datasets_after(
        &self,
        after: Option<&DatasetKey>,
        limit: usize,
    ) -> Result<Vec<(DatasetKey, u64)>, StoreError> {
        let after = after.cloned();
        self.read(move |conn| stream::datasets_after(conn, after.as_ref(), limit))
            .await
    }

    async fn identities(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<IdentitySummary>, StoreError> {
        validate_identity_page(pool, after, limit)?;
        let (pool, after) = (pool.to_owned(), after.map(str::to_owned));
        self.read_tx(move |conn| admin::identities(conn, &pool, after.as_deref(), limit))
            .await
    }

    async fn identity_summary(
        &self,
        pool: &str,
        id: &str,
    ) -> Result<Option<IdentitySummary>, StoreError> {
        validate_identity_call(pool, id)?;
        let (pool, id) = (pool.to_owned(), id.to_owned());
        self.read_tx(move |conn| admin::identity_summary(conn, &pool, &id))
            .await
    }

    async fn pool_usage(&self, pool: &str) -> Result<PoolUsage, StoreError> {
        validate_identity(pool)?;
        let pool = pool.to_owned();
        self.read_tx(move |conn| admin::pool_usage(conn, &pool))
            .await
    }

    async fn pool_setting(&self, pool: &str, name: &str) -> Result<Option<String>, StoreError> {
        validate_setting(pool, name, &[])?;
        let (pool, name) = (pool.to_owned(), name.to_owned());
        self.read(move |conn| admin::setting(conn, &pool, &name))
            .await
    }

    async fn put_pool_setting(
        &self,
        pool: &str,
        name: &str,
        value: Option<&str>,
        expect: Expect<'_>,
    ) -> Result<bool, StoreError> {
        validate_setting(pool, name, &[value, expected_values(&expect)])?;
        let op = Op::PutPoolSetting(admin::PutSetting::new(pool, name, value, expect));
        match self.submit(op).await? {
            Done::Bool(wrote) => Ok(wrote),
            other => Err(unexpected(&other)),
        }
    }

    async fn dump(&self) -> Result<crate::dump::DumpStream, StoreError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(closed_error());
        }
        dump::spawn_dump(&self.inner.path)
    }

    async fn import_status(&self) -> Result<crate::dump::ImportStatus, StoreError> {
        self.read_tx(dump::status).await
    }

    async fn import_batch(
        &self,
        batch: crate::dump::ImportBatch,
    ) -> Result<crate::dump::BatchOutcome, StoreError> {
        match self.submit(Op::Import(Box::new(batch))).await? {
            Done::Import(outcome) => Ok(outcome),
            other => Err(unexpected(&other)),
        }
    }

    async fn health(&self) -> Result<(), StoreError> {
        self.inner.outage.check()?;
        match lock(&self.inner.commands_tx).as_ref() {
            None => return Err(closed_error()),
            Some(commands_tx) if commands_tx.is_closed() => {
                return Err(StoreError::Unavailable("store writer stopped".into()));
            }
            Some(_) => {}
        }
        self.read(|conn| {
            conn.query_row("SELECT count(*) FROM datasets", [], |_| Ok(()))
                .map_err(db_err)
        })
        .await
    }

    async fn close(&self) {
        let Some(writer) = self.inner.shut() else {
            return;
        };
        match tokio::task::spawn_blocking(move || writer.join()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => tracing::error!("sqlite writer thread panicked"),
            Err(e) => tracing::error!(error = %e, "waiting for the sqlite writer failed"),
        }
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || inner.stop_checkpointer()).await;
        lock(&self.inner.idle_readers).clear();
        tracing::info!(path = %self.inner.path.display(), "sqlite store closed");
    }
}

/// WAL mode, durable commits, no automatic checkpoints, and the WAL file truncated to
/// `wal_max_bytes` whenever the log restarts (see `writer::WalBound`).
fn configure_writer(conn: &Connection, wal_max_bytes: u64) -> Result<(), StoreError> {
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(db_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Internal(format!(
            "sqlite refused wal mode (journal mode is {mode})"
        )));
    }
    // Checkpoints run on their own thread (`spawn_checkpointer`): an automatic one would
    // run inside a commit on the writer thread and stall every caller in that batch. The
    // writer checkpoints only when the WAL has passed its bound, between batches.
    conn.execute_batch(
        "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA wal_autocheckpoint = 0;",
    )
    .map_err(db_err)?;
    let limit = i64::try_from(wal_max_bytes).unwrap_or(i64::MAX);
    conn.query_row(&format!("PRAGMA journal_size_limit = {limit}"), [], |_| {
        Ok(())
    })
    .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(())
}

/// Held while a checkpoint runs: SQLite refuses a second one at once rather than wait, so the
/// checkpointer and the writer's truncating checkpoint take turns on this.
type CheckpointLock = Arc<Mutex<()>>;

/// How often the checkpointer copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(250);

/// Copies committed WAL frames into the database file in the background with PASSIVE
/// checkpoints, which never block the writer or readers, so commits never pay for a
/// checkpoint and the log restarts from its beginning whenever writes pause. Under writes
/// that never pause it cannot restart the log: the writer bounds it (`writer::WalBound`).
fn spawn_checkpointer(
    path: &Path,
    checkpoint_lock: CheckpointLock,
    outage: Arc<CommitOutage>,
) -> Result<(std::sync::mpsc::Sender<()>, JoinHandle<()>), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("tandem-sqlite-checkpoint".into())
        .spawn(move || {
            // Failures are logged once per run of them, not every 250 ms, and not at all
            // while commits fail too: that outage is logged already, for the same cause.
            let mut warned = false;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stop_rx.recv_timeout(CHECKPOINT_EVERY)
            {
                let _checkpointing = lock(&checkpoint_lock);
                match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    Err(e) if !warned && !outage.is_down() => {
                        tracing::warn!(error = %e, "sqlite checkpoints fail; retrying quietly");
                        warned = true;
                    }
                    Err(e) => tracing::debug!(error = %e, "sqlite checkpoint failed"),
                    Ok(()) if warned => {
                        tracing::info!("sqlite checkpoints work again");
                        warned = false;
                    }
                    Ok(()) => {}
                }
            }
        })
        .map_err(|e| StoreError::Internal(format!("cannot start the checkpointer: {e}")))?;
    Ok((stop_tx, thread))
}

/// A connection that may only read; it never creates the file.
fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    conn.execute_batch("PRAGMA query_only = ON;")
        .map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}

/// Maps a SQLite failure: a locked or unopenable database, a full disk or an I/O error is
/// `Unavailable` (nothing was written; retry later), anything else `Internal`.
#[expect(
    clippy::needless_pass_by_value,
    reason = "a `map_err` adapter: it takes what `map_err` hands it"
)]
fn db_err(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode as Code;
    match e.sqlite_error_code() {
        Some(Code::DatabaseBusy | Code::DatabaseLocked) => {
            StoreError::Unavailable(format!("database busy: {e}"))
        }
        Some(Code::CannotOpen) => StoreError::Unavailable(format!("cannot open database: {e}")),
        Some(Code::DiskFull | Code::SystemIoFailure) => {
            StoreError::Unavailable(format!("sqlite cannot write: {e}"))
        }
        _ => StoreError::Internal(format!("sqlite: {e}")),
    }
}

fn closed_error() -> StoreError {
    StoreError::Unavailable("store closed".into())
}

fn unexpected(done: &Done) -> StoreError {
    StoreError::Internal(format!("unexpected writer reply {done:?}"))
}

/// Locks a mutex; a panic elsewhere does not make the guarded state unusable here.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests;
