//! `PostgresStore`: the store that many gateway nodes share, with exactly the semantics of
//! `SqliteStore` (the conformance suite runs against both).
//!
//! Every table lives in one schema (`tandem` by default), created and migrated at
//! [`PostgresStore::connect`]; each pooled connection has its `search_path` set to it, so
//! tests and deployments can share a database and stay apart.
//!
//! # Isolation and locking
//!
//! Writes run at READ COMMITTED with explicit locks, not SERIALIZABLE with retries. Under
//! SERIALIZABLE, writers contending for one dataset would mostly fail with serialisation
//! errors and redo their work; a row lock queues them instead, and each statement after the
//! lock sees every commit that came before it (READ COMMITTED takes a fresh snapshot per
//! statement), which is all the write contract needs:
//!
//! - An update or a delete first locks the dataset's row (`SELECT … FOR UPDATE`; an update
//!   of a dataset that has no row yet inserts a placeholder with `ON CONFLICT DO NOTHING`,
//!   which waits for a concurrent insert of the same row, and then locks it). Writers to one
//!   dataset therefore serialise on that row on whichever node they run, and the stale
//!   check, the limits and the returned snapshot are computed from the latest committed
//!   state. Record writes happen only under this lock, so the snapshot after the commit is
//!   the records read under the lock with the update's own writes applied.
//! - An update that creates the dataset (or re-creates a deleted one) then takes a
//!   transaction-scoped advisory lock on (pool, owner) before counting the owner's datasets,
//!   so two concurrent creations cannot both take the last slot.
//! - A grantee's write access is checked after the row lock with `SELECT … FOR SHARE` on its
//!   grant row: a revoke committed before is seen; a revoke in flight either waits for the
//!   update to commit (it then comes after the update) or the update waits for the revoke
//!   and then finds no grant.
//! - A grant takes a transaction-scoped advisory lock on (pool, owner) of its own before it
//!   counts the owner's grants, so two new grants cannot both take the last slot of
//!   `max_grants_per_dataset` or `max_grants_per_owner`. It is not the creation lock: a
//!   grant waits for grant rows that an update holds while it waits for the creation lock.
//! - A grant or revoke locks the dataset's row too (after the grant lock, before the grant
//!   row), since its commit log entry moves the row's log head (schema version 9). For a
//!   name with no row it takes the name's creation lock (`write::CREATE_LOCK`) instead and
//!   chains its entry through `commit_log_heads`; inserting the row takes that lock first
//!   and takes the head over. A grantee's update that finds no row starts over with the
//!   creation lock first, and a merge takes it only for names without a row.
//! - Locks are always taken in the order creation lock → dataset row → advisory lock /
//!   grant row, or grant lock → dataset row (or creation lock) → grant row, and a delete
//!   takes the dataset row before it deletes grants, so these cannot deadlock; the log
//!   counter (`log_seq`) comes last, in the statement sent with COMMIT.
//!
//! Reads (`snapshot`, `changes`, `list_datasets`, `access`) are one statement each, so
//! everything a read returns (access, sync count, records) comes from one snapshot.
//!
//! # Failures
//!
//! A lost or refused connection, a pool or statement timeout, a server shutting down or out
//! of resources (a full disk, `53100`, included), a lock or serialisation failure: all are
//! `Unavailable` (retriable), anything else from the database is `Internal`. A write that
//! fails because the server cannot write (a full disk, an I/O error) starts a commit outage
//! (see `outage`): `health` reports it until a write commits again. A call never waits forever: getting a connection is
//! bounded by `connect_timeout` (waiting for a free one, then creating one), each statement
//! by the server's `statement_timeout`, and the whole call by a client-side deadline for when
//! the server stops answering at all. A commit whose answer is lost is `Unavailable`, never
//! `Ok`: the update is then either wholly applied or not at all, and the client's retry finds
//! out which (by sync count). A connection that failed is dropped, and so is every idle one
//! (a lost connection usually means the server restarted), so the next call reconnects and
//! service resumes by itself once PostgreSQL is back.

/// Runs `$call` (a future of `Result<T, CallError>` that borrows the pooled client `$client`)
/// on a pooled connection of `$inner` (an `&Inner`) under the client-side deadline. Defined
/// before the submodules so `batch` can use it too.
macro_rules! call {
    ($inner:expr, |$client:ident| $call:expr) => {{
        let inner: &Inner = $inner;
        #[allow(unused_mut, reason = "only some calls need the client mutably")]
        let (_open, mut $client) = inner.client().await?;
        let result = tokio::time::timeout(inner.call_timeout, $call).await;
        inner.finish($client, result)
    }};
}

mod admin;
mod batch;
mod compact;
mod dump;
mod identity;
mod read;
mod schema;
mod stream;
mod write;

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
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime, tokio_postgres,
};
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::{Access, DatasetInfo};
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio::time::error::Elapsed;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

/// How to reach PostgreSQL and where Tandem's tables live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// A libpq-style URL or key=value string, e.g. `postgres://tandem@127.0.0.1:5432/tandem`.
    pub url: String,
    /// The schema that holds every table; created if missing. `[a-z_][a-z0-9_]*`, at most
    /// 63 bytes, not starting with `pg_`.
    pub schema: String,
    /// The most connections this store opens.
    pub pool_size: usize,
    /// How long opening a connection (or waiting for a free one) may take.
    pub connect_timeout: Duration,
    /// The server-side limit on one statement, lock waits included.
    pub statement_timeout: Duration,
    /// The least time between the starts of two update batches. A transaction costs
    /// PostgreSQL far more CPU than the updates in it (about 0.7 ms of backend CPU on the
    /// benchmark host, see docs/BENCHMARKS.md), so under load, updates that arrive within
    /// this interval wait for each other and commit together; an update that finds no batch
    /// started in the last interval starts one at once, so a quiet store adds no latency.
    /// Zero: every free worker takes what is queued at once.
    pub batch_interval: Duration,
}

impl PostgresConfig {
    pub const DEFAULT_SCHEMA: &'static str = "tandem";
    pub const DEFAULT_POOL_SIZE: usize = 16;
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
    pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_millis(8);

    /// The defaults, for the database at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            schema: Self::DEFAULT_SCHEMA.into(),
            pool_size: Self::DEFAULT_POOL_SIZE,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            statement_timeout: Self::DEFAULT_STATEMENT_TIMEOUT,
            batch_interval: Self::DEFAULT_BATCH_INTERVAL,
        }
    }

    /// The `application_name` the store's connections report (unless the URL sets one), so
    /// an operator can find them in `pg_stat_activity`.
    pub fn application_name(&self) -> String {
        format!("tandem-{}", self.schema)
    }

    /// The longest a whole call may take before the store gives up on the server: a
    /// connection, then statements that each end by `statement_timeout` on a live server.
    fn call_timeout(&self) -> Duration {
        self.connect_timeout + 2 * self.statement_timeout
    }
}

/// The shared store. Cloning is cheap and shares the connection pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
    /// Updates go through the group-commit workers (see `batch`).
    updates: batch::Queue,
}

#[derive(Debug)]
struct Inner {
    pool: Pool,
    limits: Limits,
    schema: String,
    call_timeout: Duration,
    /// Updates committed as part of a batch of more than one (for tests and curiosity).
    batched: std::sync::atomic::AtomicU64,
    /// Commit log entries this node's compactions dropped past the hard cap.
    forced_drops: std::sync::atomic::AtomicU64,
    /// `true` once closed. Every call holds a read guard while it runs, so `close` (which
    /// takes it for writing) waits for calls in flight.
    closed: RwLock<bool>,
    /// Set while writes fail because the server cannot write; `health` reports it.
    outage: CommitOutage,
}

/// Why a call failed, before `Inner::finish` turns it into a `StoreError`: a store error to
/// return as is, or a database error to classify (and maybe drop the connection for).
#[derive(Debug)]
enum CallError {
    Store(StoreError),
    Db(tokio_postgres::Error),
}

impl From<StoreError> for CallError {
    fn from(e: StoreError) -> Self {
        CallError::Store(e)
    }
}

impl From<tokio_postgres::Error> for CallError {
    fn from(e: tokio_postgres::Error) -> Self {
        CallError::Db(e)
    }
}

/// A call's result as the client-side deadline hands it over.
type Timed<T> = Result<Result<T, CallError>, Elapsed>;

impl PostgresStore {
    /// Connects, creates the schema if needed and applies pending migrations. Fails with
    /// `Unavailable` (within about `connect_timeout`) when the database cannot be reached.
    /// Safe to call from several nodes at once: migrations serialise on an advisory lock.
    pub async fn connect(config: PostgresConfig, limits: Limits) -> Result<Self, StoreError> {
        validate_schema(&config.schema)?;
        if config.pool_size == 0 {
            return Err(StoreError::BadRequest(
                "the postgresql pool needs at least one connection".into(),
            ));
        }
        let pg_config = pg_config(&config)?;
        let manager = Manager::from_config(
            pg_config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| StoreError::Internal(format!("cannot build the postgresql pool: {e}")))?;
        let inner = Inner {
            pool,
            limits,
            schema: config.schema.clone(),
            call_timeout: config.call_timeout(),
            batched: std::sync::atomic::AtomicU64::new(0),
            forced_drops: std::sync::atomic::AtomicU64::new(0),
            closed: RwLock::new(false),
            outage: CommitOutage::default(),
        };

        let mut client = inner.pool.get().await.map_err(pool_error)?;
        let result = tokio::time::timeout(
            schema::MIGRATION_TIMEOUT,
            schema::migrate(&mut client, &inner.schema),
        )
        .await;
        inner.finish(client, result)?;
        tracing::info!(
            schema = %inner.schema,
            pool_size = config.pool_size,
            version = schema::SCHEMA_VERSION,
            "postgres store open"
        );
        let inner = Arc::new(inner);
        // At most half the pool commits updates; the rest stays free for reads and other calls.
        let updates = batch::start(
            &inner,
            batch::BATCH_WORKERS.min(config.pool_size / 2),
            config.batch_interval,
        );
        spawn_compaction(&inner);
        Ok(PostgresStore { inner, updates })
    }

    /// The limits this store enforces.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The schema that holds the store's tables.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }
}

impl Inner {
    /// A pooled connection for one call, with the guard that keeps `close` waiting for it.
    async fn client(&self) -> Result<(RwLockReadGuard<'_, bool>, Object), StoreError> {
        let closed = self.closed.read().await;
        if *closed {
            return Err(closed_error());
        }
        let client = self.pool.get().await.map_err(pool_error)?;
        Ok((closed, client))
    }

    /// Ends a commit outage: a call that writes succeeded.
    fn wrote<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.is_ok() {
            self.outage.succeeded("postgresql");
        }
        result
    }

    /// Maps a call's outcome, and drops the connection (and every idle one) when it failed
    /// in a way that leaves it unusable.
    fn finish<T>(&self, client: Object, result: Timed<T>) -> Result<T, StoreError> {
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(CallError::Store(e))) => return Err(e),
            Ok(Err(CallError::Db(e))) => {
                let mapped = map_db_error(&e);
                if e.code().is_some_and(cannot_write) {
                    self.outage.failed("postgresql", &mapped);
                }
                if !(breaks_connection(&e) || client.is_closed()) {
                    return Err(mapped);
                }
                mapped
            }
            Err(_) => StoreError::Unavailable(format!(
                "postgresql did not answer within {:?}",
                self.call_timeout
            )),
        };
        tracing::debug!(error = %error, "dropping postgresql connections");
        drop(Object::take(client));
        self.pool.retain(|_, _| false);
        Err(error)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn snapshot(&self, dataset: &DatasetKey, actor: &str) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        call!(&self.inner, |client| read::snapshot(
            &client, dataset, actor
        ))
    }

    async fn changes(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        since: u64,
    ) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        call!(&self.inner, |client| read::changes(
            &client, dataset, actor, since
        ))
    }

    async fn update(&self, request: UpdateRequest) -> Result<UpdateOutcome, StoreError> {
        let patches = validate_update(&self.inner.limits, &request)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let item = batch::Item {
            request,
            patches,
            reply,
            queued: tokio::time::Instant::now(),
        };
        self.updates.try_send(item).map_err(|e| match e {
            tokio::sync::mpsc::error::TrySendError::Full(_) => StoreError::Unavailable(format!(
                "postgresql writes are backed up ({} waiting)",
                batch::QUEUE_CAPACITY
            )),
            tokio::sync::mpsc::error::TrySendError::Closed(_) => closed_error(),
        })?;
        // Queued no longer than a call may take (else it is answered without being tried),
        // then at most one call: the backstop only matters if a worker is stuck.
        match tokio::time::timeout(3 * self.inner.call_timeout, answer).await {
            Ok(Ok(result)) => {
                if let Ok(UpdateOutcome::Committed { .. }) = &result {
                    self.inner.outage.succeeded("postgresql");
                }
                result
            }
            Ok(Err(_)) => Err(StoreError::Unavailable(
                "the postgresql writer stopped before answering".into(),
            )),
            // It may still commit; like a lost COMMIT answer, the retry finds out which.
            Err(_) => Err(StoreError::Unavailable(
                "postgresql did not commit in time".into(),
            )),
        }
    }

    async fn delete_dataset(&self, dataset: &DatasetKey, actor: &str) -> Result<u64, StoreError> {
        validate_call(dataset, actor)?;
        let result = call!(&self.inner, |client| write::delete(
            &mut client,
            dataset,
            actor
        ));
        self.inner.wrote(result)
    }

    async fn list_datasets(
        &self,
        pool: &str,
        identity: &str,
    ) -> Result<Vec<DatasetInfo>, StoreError> {
        validate_identity(identity)?;
        call!(&self.inner, |client| read::list_datasets(
            &client, pool, identity
        ))
    }

    async fn grant(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
        access: Access,
    ) -> Result<(), StoreError> {
        validate_grant(dataset, actor, grantee, access)?;
        let result = call!(&self.inner, |client| write::grant(
            &mut client,
            &self.inner.limits,
            dataset,
            grantee,
            access
        ));
        self.inner.wrote(result)
    }

    async fn revoke(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
    ) -> Result<(), StoreError> {
        validate_revoke(dataset, actor, grantee)?;
        let result = call!(&self.inner, |client| write::revoke(
            &mut client,
            dataset,
            grantee
        ));
        self.inner.wrote(result)
    }

    async fn access(
        &self,
        dataset: &DatasetKey,
        identity: &str,
    ) -> Result<Option<Access>, StoreError> {
        dataset.validate()?;
        validate_identity(identity)?;
        call!(&self.inner, |client| read::access_of(
            &client, dataset, identity
        ))
    }

    async fn create_identity(&self, pool: &str, id: &str, guest: bool) -> Result<(), StoreError> {
        validate_identity_call(pool, id)?;
        let result = call!(&self.inner, |client| identity::create(
            &client, pool, id, guest
        ));
        self.inner.wrote(result)
    }

    async fn identity(&self, pool: &str, id: &str) -> Result<Option<Identity>, StoreError> {
        validate_identity_call(pool, id)?;
        call!(&self.inner, |client| identity::load(&client, pool, id))
    }

    async fn link_logins(&self, pool: &str, id: &str, logins: &[Login]) -> Result<(), StoreError> {
        validate_identity_call(pool, id)?;
        validate_logins_call(pool, logins)?;
        let result = call!(&self.inner, |client| identity::link(
            &mut client,
            pool,
            id,
            logins
        ));
        self.inner.wrote(result)
    }

    async fn identity_for_logins(
        &self,
        pool: &str,
        logins: &[Login],
    ) -> Result<Option<String>, StoreError> {
        validate_logins_call(pool, logins)?;
        let found = call!(&self.inner, |client| identity::linked(
            &client, pool, logins
        ))?;
        crate::identity::one_identity(&found)
    }

    async fn merge_identity(
        &self,
        pool: &str,
        from_guest: &str,
        into: &str,
    ) -> Result<MergeOutcome, StoreError> {
        validate_merge(pool, from_guest, into)?;
        let result = call!(&self.inner, |client| identity::merge(
            &mut client,
            pool,
            from_guest,
            into
        ));
        self.inner.wrote(result)
    }

    async fn merged_dataset_names(&self, dataset: &DatasetKey) -> Result<Vec<String>, StoreError> {
        dataset.validate()?;
        call!(&self.inner, |client| identity::merged_names(
            &client, dataset
        ))
    }

    async fn log(
        &self,
        dataset: &DatasetKey,
        after_sync_count: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        dataset.validate()?;
        call!(&self.inner, |client| read::log(
            &client,
            dataset,
            after_sync_count,
            limit
        ))
    }

    async fn history(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError> {
        validate_call(dataset, actor)?;
        call!(&self.inner, |client| read::history(
            &mut client,
            dataset,
            actor,
            before_id,
            limit
        ))
    }

    async fn read_at(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        sync_count: u64,
    ) -> Result<Snapshot, StoreError> {
        validate_call(dataset, actor)?;
        call!(&self.inner, |client| read::read_at(
            &mut client,
            dataset,
            actor,
            sync_count
        ))
    }

    async fn log_since(&self, after_id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError> {
        call!(&self.inner, |client| read::log_since(
            &client, after_id, limit
        ))
    }

    async fn compact_log(&self, now: i64) -> Result<CompactReport, StoreError> {
        let result = compact::compact(&self.inner, now, true).await;
        self.inner.wrote(result)
    }

    fn commit_log_forced_drops(&self) -> u64 {
        self.inner
            .forced_drops
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    async fn last_deleted_sync_count(&self, dataset: &DatasetKey) -> Result<u64, StoreError> {
        dataset.validate()?;
        call!(&self.inner, |client| identity::last_deleted_sync_count(
            &client, dataset
        ))
    }

    async fn log_snapshot(&self, dataset: &DatasetKey) -> Result<Option<i64>, StoreError> {
        dataset.validate()?;
        let result = call!(&self.inner, |client| write::log_snapshot(
            &mut client,
            dataset
        ));
        self.inner.wrote(result)
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
        let result = call!(&self.inner, |client| stream::lease(
            &client, consumer, node, now_ms, ttl_ms
        ));
        self.inner.wrote(result)
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
        let result = call!(&self.inner, |client| stream::ack(
            &client, consumer, node, position, now_ms
        ));
        self.inner.wrote(result)
    }

    async fn stream_release(&self, consumer: &str, node: &str) -> Result<(), StoreError> {
        validate_name("consumer", consumer)?;
        validate_name("node", node)?;
        let result = call!(&self.inner, |client| stream::release(
            &client, consumer, node
        ));
        self.inner.wrote(result)
    }

    async fn stream_consumers(&self) -> Result<Vec<StreamConsumer>, StoreError> {
        call!(&self.inner, |client| stream::consumers(&client))
    }

    async fn stream_forget(&self, consumer: &str) -> Result<bool, StoreError> {
        validate_name("consumer", consumer)?;
        let result = call!(&self.inner, |client| stream::forget(&client, consumer));
        self.inner.wrote(result)
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
        let max = self.inner.limits.stream_dead_letter_max;
        let result = call!(&self.inner, |client| stream::dead_letter(
            &mut client,
            consumer,
            letters,
            max
        ));
        self.inner.wrote(result)
    }

    async fn stream_dead_letters(
        &self,
        consumer: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        validate_name("consumer", consumer)?;
        call!(&self.inner, |client| stream::dead_letters(
            &client, consumer, after_id, limit
        ))
    }

    async fn log_head(&self) -> Result<i64, StoreError> {
        call!(&self.inner, |client| stream::log_head(&client))
    }

    async fn datasets_after(
        &self,
        after: Option<&DatasetKey>,
        limit: usize,
    ) -> Result<Vec<(DatasetKey, u64)>, StoreError> {
        call!(&self.inner, |client| stream::datasets_after(
            &client, after, limit
        ))
    }

    async fn identities(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<IdentitySummary>, StoreError> {
        validate_identity_page(pool, after, limit)?;
        call!(&self.inner, |client| admin::identities(
            &client, pool, after, limit
        ))
    }

    async fn identity_summary(
        &self,
        pool: &str,
        id: &str,
    ) -> Result<Option<IdentitySummary>, StoreError> {
        validate_identity_call(pool, id)?;
        call!(&self.inner, |client| admin::identity_summary(
            &client, pool, id
        ))
    }

    async fn pool_usage(&self, pool: &str) -> Result<PoolUsage, StoreError> {
        validate_identity(pool)?;
        call!(&self.inner, |client| admin::pool_usage(&client, pool))
    }

    async fn pool_setting(&self, pool: &str, name: &str) -> Result<Option<String>, StoreError> {
        validate_setting(pool, name, &[])?;
        call!(&self.inner, |client| admin::setting(&client, pool, name))
    }

    async fn put_pool_setting(
        &self,
        pool: &str,
        name: &str,
        value: Option<&str>,
        expect: Expect<'_>,
    ) -> Result<bool, StoreError> {
        validate_setting(pool, name, &[value, expected_values(&expect)])?;
        let result = call!(&self.inner, |client| admin::put_setting(
            &client, pool, name, value, expect
        ));
        self.inner.wrote(result)
    }

    async fn dump(&self) -> Result<crate::dump::DumpStream, StoreError> {
        let client = {
            let (_open, client) = self.inner.client().await?;
            client
        };
        Ok(dump::spawn_dump(client))
    }

    async fn import_status(&self) -> Result<crate::dump::ImportStatus, StoreError> {
        call!(&self.inner, |client| dump::status(&client))
    }

    async fn import_batch(
        &self,
        batch: crate::dump::ImportBatch,
    ) -> Result<crate::dump::BatchOutcome, StoreError> {
        let result = call!(&self.inner, |client| dump::import_batch(
            &mut client,
            &batch
        ));
        self.inner.wrote(result)
    }

    async fn health(&self) -> Result<(), StoreError> {
        call!(&self.inner, |client| async {
            client.simple_query("SELECT 1").await?;
            Ok(())
        })?;
        self.inner.outage.check()
    }

    async fn close(&self) {
        let mut closed = self.inner.closed.write().await;
        if *closed {
            return;
        }
        *closed = true;
        self.inner.pool.close();
        tracing::info!(schema = %self.inner.schema, "postgres store closed");
    }
}

/// The connection settings: the URL's, plus the store's timeouts, schema and name.
fn pg_config(config: &PostgresConfig) -> Result<tokio_postgres::Config, StoreError> {
    // The URL may hold a password: the error does not repeat it.
    let mut pg: tokio_postgres::Config = config
        .url
        .parse()
        .map_err(|e| StoreError::BadRequest(format!("invalid postgresql url: {e}")))?;
    pg.connect_timeout(config.connect_timeout);
    if pg.get_application_name().is_none() {
        pg.application_name(config.application_name());
    }
    let millis = |d: Duration| d.as_millis().max(1);
    // A transaction left idle (its client stalled) must not hold dataset locks for long.
    // Every statement of the store is a lookup by key on an index, with arrays (`UNNEST`) for
    // batches: planned afresh for each call (PostgreSQL's default for such statements), or as
    // a sequential scan when a table is small, they cost the server more CPU than running
    // them (docs/BENCHMARKS.md, "PostgreSQL under contended rooms"), so each is planned once
    // per connection, on its indexes. JIT is off: a scan that has no index to use (a tiny
    // table such as `schema_version`) is priced at 10^10 with sequential scans off, far
    // past `jit_above_cost`, and compiling it took 0.3-0.7 s, for statements that run in
    // microseconds.
    let options = format!(
        "{} -c search_path={} -c statement_timeout={} -c idle_in_transaction_session_timeout={} \
         -c plan_cache_mode=force_generic_plan -c enable_seqscan=off -c jit=off",
        pg.get_options().unwrap_or_default(),
        config.schema,
        millis(config.statement_timeout),
        millis(config.call_timeout()),
    );
    pg.options(options.trim());
    Ok(pg)
}

/// Schema names go into SQL text and connection options unquoted, so only plain lowercase
/// identifiers are accepted.
fn validate_schema(schema: &str) -> Result<(), StoreError> {
    let mut chars = schema.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let valid_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid_start && valid_rest && schema.len() <= 63 && !schema.starts_with("pg_") {
        Ok(())
    } else {
        Err(StoreError::BadRequest(format!(
            "invalid postgresql schema name `{schema}`: use [a-z_][a-z0-9_]*, at most 63 \
             bytes, not starting with pg_"
        )))
    }
}

pub(super) fn forbidden(key: &DatasetKey, identity: &str, needed: &'static str) -> StoreError {
    StoreError::forbidden(key, identity, needed)
}

fn closed_error() -> StoreError {
    StoreError::Unavailable("store closed".into())
}

fn pool_error(e: PoolError) -> StoreError {
    match e {
        PoolError::Timeout(kind) => StoreError::Unavailable(format!(
            "no postgresql connection in time ({kind:?} timed out)"
        )),
        // Whatever refused the new connection (the server is down, the database does not
        // accept connections or was dropped), nothing was written and a later try may work.
        PoolError::Backend(e) => {
            StoreError::Unavailable(format!("cannot connect to postgresql: {}", describe(&e)))
        }
        PoolError::Closed => closed_error(),
        PoolError::NoRuntimeSpecified | PoolError::PostCreateHook(_) => {
            StoreError::Internal(format!("postgresql pool: {e}"))
        }
    }
}

/// Classifies a database error: retriable (`Unavailable`) or a fault (`Internal`).
fn map_db_error(e: &tokio_postgres::Error) -> StoreError {
    let message = describe(e);
    if is_retriable(e) {
        StoreError::Unavailable(format!("postgresql: {message}"))
    } else {
        StoreError::Internal(format!("postgresql: {message}"))
    }
}

fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

/// Whether trying again later may succeed: the server or the connection failed, a timeout,
/// or a lock or serialisation failure; not a bad statement or a broken invariant.
fn is_retriable(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => is_retriable_state(code),
        None => is_connection_error(e),
    }
}

/// `is_retriable` for an error the server sent: connection failures (class 08), a lack of
/// resources (53: a full disk, memory, connections), an operator's intervention or shutdown
/// (57), a system error (58: I/O), and lock or serialisation failures.
fn is_retriable_state(code: &SqlState) -> bool {
    let class = &code.code()[..2];
    matches!(class, "08" | "53" | "57" | "58")
        || [
            SqlState::T_R_SERIALIZATION_FAILURE,
            SqlState::T_R_DEADLOCK_DETECTED,
            SqlState::LOCK_NOT_AVAILABLE,
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
        ]
        .contains(code)
}

/// Whether the server failed because it cannot write: a commit outage, not a passing fault.
fn cannot_write(code: &SqlState) -> bool {
    [SqlState::DISK_FULL, SqlState::IO_ERROR].contains(code)
}

/// Whether the connection behind `e` cannot be used any more.
fn breaks_connection(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // A cancelled statement, a lock or a serialisation failure leaves the session fine.
        Some(code) => {
            is_retriable(e)
                && ![
                    SqlState::QUERY_CANCELED,
                    SqlState::T_R_SERIALIZATION_FAILURE,
                    SqlState::T_R_DEADLOCK_DETECTED,
                    SqlState::LOCK_NOT_AVAILABLE,
                ]
                .contains(code)
        }
        None => is_connection_error(e),
    }
}

/// An error with no SQLSTATE that comes from the connection, not from our own statement: a
/// closed connection, an I/O failure, a timeout, or a message the client did not expect.
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    let text = e.to_string();
    text.starts_with("timeout waiting for server")
        || text.starts_with("unexpected message from server")
        || text.starts_with("error connecting to server")
}

#[cfg(test)]
mod tests;

/// Compacts the commit log about every minute until the store is dropped or closed. Every
/// node tries; one at a time gets the compaction lock (see `compact`), and a compaction that
/// finds nothing to delete costs an index scan.
fn spawn_compaction(inner: &Arc<Inner>) {
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut every = tokio::time::interval(crate::commitlog::COMPACT_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            every.tick().await;
            let Some(inner) = inner.upgrade() else { return };
            if *inner.closed.read().await {
                return;
            }
            match compact::compact(&inner, crate::now_ms(), false).await {
                Ok(report) if report.dropped == 0 => {}
                Ok(report) => tracing::debug!(?report, "commit log compacted"),
                Err(e) => tracing::warn!(error = %e, "commit log compaction failed"),
            }
        }
    });
}
