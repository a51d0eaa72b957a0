//! Tandem's source of truth: the `Store` trait, the data model with Cognito Sync's
//! semantics (dataset and record sync counts, tombstones, server and device timestamps,
//! last-modified-by, grants), Cognito-style identities with their logins and the merge of a
//! guest into another identity (`identity`), the configurable limits, and the backends
//! (`SqliteStore`, the embedded default; PostgreSQL for many nodes).
//!
//! Authorisation of data access lives here, checked in the same transaction as the read or
//! write it guards, so a revoke takes effect at once. What an update does (stale check,
//! limits, record stamps, outcome) is decided once, in `decision`, for every backend. The
//! store knows nothing of sockets, subscriptions or fan-out: the gateway publishes what a
//! commit returns.

mod admin;
mod commitlog;
mod decision;
pub mod dump;
mod error;
mod identity;
mod model;
mod outage;
mod postgres;
mod replay;
mod sqlite;
mod stream;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use admin::{
    Expect, IdentitySummary, MAX_IDENTITY_PAGE, MAX_SETTING_NAME, MAX_SETTING_VALUE, PoolUsage,
};
pub use commitlog::{CompactReport, LogEntry, LogKind};
pub use error::StoreError;
pub use identity::{
    Identity, Login, MAX_IDENTITY_ID, MAX_LOGIN_PART, MergeOutcome, MovedDataset,
    validate_identity_id, validate_logins,
};
pub use model::{
    DEFAULT_POOL, DatasetKey, Limits, Snapshot, UpdateOutcome, UpdateRequest, ValidatedPatch,
    now_ms, record_bytes, validate_call, validate_grant, validate_identity, validate_revoke,
    validate_update,
};
pub use postgres::{PostgresConfig, PostgresStore};
pub use replay::{ReplayReport, replay};
pub use sqlite::{
    SqliteBackupReport, SqliteCheckReport, SqliteStore, backup_sqlite, check_sqlite,
    check_sqlite_file, dump_sqlite,
};
pub use stream::{DeadLetter, StreamConsumer};

use async_trait::async_trait;
use tandem_protocol::{Access, DatasetInfo};

/// A cheap-to-share handle to a store; every method is one transaction.
///
/// Access rules, the same for every backend:
/// - the owner may do anything with its datasets, existing or not;
/// - a `read` grant allows `snapshot`, `changes`, `history` and `read_at`; a `write` grant
///   also allows `update`;
/// - only the owner may `delete_dataset`, `grant` and `revoke`;
/// - without a grant, every call on another identity's dataset is `Forbidden` (never
///   `NotFound`, so datasets do not leak their existence).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The whole dataset: live records, ordered by key. A dataset that was never written (or
    /// was deleted) has no records and its last sync count (0 if never written).
    async fn snapshot(&self, dataset: &DatasetKey, actor: &str) -> Result<Snapshot, StoreError>;

    /// Records whose sync count is above `since`, tombstones included, ordered by key.
    async fn changes(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        since: u64,
    ) -> Result<Snapshot, StoreError>;

    /// Applies all patches atomically or none. Returns `Conflict` (nothing written) when any
    /// patch's sync count is stale. Returns only after the commit is durable.
    async fn update(&self, request: UpdateRequest) -> Result<UpdateOutcome, StoreError>;

    /// Deletes a dataset: its records and grants go, its sync count is kept (and bumped by
    /// one) so that a re-created dataset continues above it. Returns that sync count.
    /// `NotFound` if the dataset does not exist.
    async fn delete_dataset(&self, dataset: &DatasetKey, actor: &str) -> Result<u64, StoreError>;

    /// The identity's own datasets and the existing datasets shared with it, with its access.
    async fn list_datasets(
        &self,
        pool: &str,
        identity: &str,
    ) -> Result<Vec<DatasetInfo>, StoreError>;

    /// Grants (or changes) `grantee`'s access to a dataset, existing or not. `access` must be
    /// `Read` or `Write`.
    async fn grant(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
        access: Access,
    ) -> Result<(), StoreError>;

    /// Removes `grantee`'s grant; `NotFound` if it had none.
    async fn revoke(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        grantee: &str,
    ) -> Result<(), StoreError>;

    /// `identity`'s access to a dataset, or `None`.
    async fn access(
        &self,
        dataset: &DatasetKey,
        identity: &str,
    ) -> Result<Option<Access>, StoreError>;

    /// Creates identity `id` (`<region>:<lowercase uuid>`) in `pool`, a guest or not;
    /// `IdentityExists` if the id is taken. An identity is linked to logins with
    /// [`Store::link_logins`] (which also makes a guest an authenticated identity).
    async fn create_identity(&self, pool: &str, id: &str, guest: bool) -> Result<(), StoreError>;

    /// The identity with its logins, merged or not, or `None` if it was never created.
    async fn identity(&self, pool: &str, id: &str) -> Result<Option<Identity>, StoreError>;

    /// Links `logins` to `id` in one transaction: `LoginLinked` (nothing linked) if one is
    /// linked to another identity; logins already linked to `id` are left as they are.
    /// `NotFound` for an unknown identity, `IdentityMerged` for a merged one. A guest with a
    /// login is a guest no more.
    async fn link_logins(&self, pool: &str, id: &str, logins: &[Login]) -> Result<(), StoreError>;

    /// The identity the logins are linked to: `None` if none is linked, `LoginsConflict` if
    /// they are linked to two identities.
    async fn identity_for_logins(
        &self,
        pool: &str,
        logins: &[Login],
    ) -> Result<Option<String>, StoreError>;

    /// Merges guest `from_guest` into `into`, in one transaction. Each live dataset `d` of the
    /// guest moves to `into`: as `d` if `into` has no live `d`, else as the copy
    /// `d.<guest's uuid>` (cut to 128 characters; see `identity::merge_target_names` for
    /// long names) whose merge root is `d`. Each is written as
    /// one commit on its target, whose sync count continues above a deleted dataset of that
    /// name, with every live record stamped with that count (their other fields kept); the
    /// guest's dataset is deleted as `delete_dataset` would. The grants on a moved dataset
    /// move with it (a grant to `into` itself is dropped; `into`'s own grants on the target
    /// name win). Copies may take `into` past `max_datasets`: a login never fails on a
    /// limit. The guest is then marked merged into `into`.
    async fn merge_identity(
        &self,
        pool: &str,
        from_guest: &str,
        into: &str,
    ) -> Result<MergeOutcome, StoreError>;

    /// The live copies merged into `dataset` (ListRecords' `MergedDatasetNames`), by name;
    /// a copy deleted (even if re-created later) is no longer reported. The caller checks
    /// that whoever asks is the owner.
    async fn merged_dataset_names(&self, dataset: &DatasetKey) -> Result<Vec<String>, StoreError>;

    /// The sync count of the dataset's last delete, 0 if it was never deleted; kept when the
    /// dataset is re-created (ListRecords' `DatasetDeletedAfterRequestedSyncCount`). The
    /// caller checks that whoever asks is the owner.
    async fn last_deleted_sync_count(&self, dataset: &DatasetKey) -> Result<u64, StoreError>;

    /// The dataset's commit log entries whose sync count is above `after_sync_count`, in
    /// commit order, at most `limit`. Grants and revokes carry the dataset's sync count at
    /// the time, so they follow the update they came after. The caller checks access.
    async fn log(
        &self,
        dataset: &DatasetKey,
        after_sync_count: u64,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The dataset's commits (update, delete, grant, revoke and merge entries of its log;
    /// entries of kinds that record no commit are left out) with an id below `before_id`
    /// (all when `None`), newest first, at most `limit`: its history, a page at a time.
    /// Needs read access. A dataset never written has none.
    async fn history(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        before_id: Option<i64>,
        limit: usize,
    ) -> Result<Vec<LogEntry>, StoreError>;

    /// The dataset's live records as they were right after the commit at `sync_count`
    /// (`deleted` when that commit was a delete; no records at 0), read backwards from the
    /// current state by undoing the later commits with the before-images their log entries
    /// carry. `HistoryUnavailable` when the log no longer holds every later commit (see
    /// `commit_log_max_*`) or one predates before-images; `BadRequest` above the current
    /// sync count. Needs read access. The records keep the stamps they had then.
    async fn read_at(
        &self,
        dataset: &DatasetKey,
        actor: &str,
        sync_count: u64,
    ) -> Result<Snapshot, StoreError>;

    /// Every dataset's commit log entries with an id above `after_id`, by id, at most
    /// `limit`: what a change stream consumer reads.
    async fn log_since(&self, after_id: i64, limit: usize) -> Result<Vec<LogEntry>, StoreError>;

    /// Deletes the commit log entries older than `commit_log_max_age_secs` before `now` (ms)
    /// and, per dataset, all but the newest `commit_log_max_entries_per_dataset`, but never
    /// the store's newest entry (so no id is reused) nor an entry above the smallest change
    /// stream consumer position (one a consumer has not acknowledged) unless it is more than
    /// `commit_log_hard_cap_entries` below the newest id: those go as retention says, are
    /// counted as forced drops ([`Store::commit_log_forced_drops`]) and logged as a warning
    /// naming the consumers that lost them. Deletes at most 1,000 entries a statement; on
    /// SQLite other writes commit between them; on PostgreSQL one node at a time compacts
    /// (a call waits for another node's round to end; the store's own round, about every
    /// minute, skips instead). Tests call it with their own `now`.
    async fn compact_log(&self, now: i64) -> Result<CompactReport, StoreError>;

    /// Entries compaction has deleted although a consumer had not acknowledged them (past
    /// the hard cap), since this store was opened (on PostgreSQL: by this node).
    fn commit_log_forced_drops(&self) -> u64;

    /// Claims (or renews, if `node` holds it) `consumer`'s delivery lease until
    /// `now_ms + ttl_ms`. `Some(position)`: `node` holds the lease; `position` is the last
    /// log id the consumer acknowledged. `None`: another node holds an unexpired lease. A
    /// consumer seen for the first time is created at the store's newest log id (it gets
    /// what commits from then on). One atomic step on every backend: of nodes racing for a
    /// free or expired lease, exactly one gets it.
    async fn stream_lease(
        &self,
        consumer: &str,
        node: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<Option<i64>, StoreError>;

    /// Moves `consumer`'s position forward to `position` if `node` holds an unexpired lease
    /// at `now_ms` (the lease is not renewed); `Ok(false)`, nothing moved, otherwise. Never
    /// moves backwards (an older position is acknowledged and ignored).
    async fn stream_ack(
        &self,
        consumer: &str,
        node: &str,
        position: i64,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// Gives up `consumer`'s lease if `node` holds it (a clean shutdown, so another node
    /// takes over at once); does nothing otherwise.
    async fn stream_release(&self, consumer: &str, node: &str) -> Result<(), StoreError>;

    /// Every consumer, by name.
    async fn stream_consumers(&self) -> Result<Vec<StreamConsumer>, StoreError>;

    /// Removes a consumer and its dead letters (it no longer holds back compaction);
    /// whether it existed.
    async fn stream_forget(&self, consumer: &str) -> Result<bool, StoreError>;

    /// Keeps events `consumer` gave up delivering, one per entry id (a later letter for the
    /// same entry replaces the earlier); at most `Limits::stream_dead_letter_max` per
    /// consumer, the oldest (lowest entry ids) go.
    async fn stream_dead_letter(
        &self,
        consumer: &str,
        letters: &[DeadLetter],
    ) -> Result<(), StoreError>;

    /// `consumer`'s dead letters with `entry_id > after_id`, by entry id, at most `limit`.
    async fn stream_dead_letters(
        &self,
        consumer: &str,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    /// The newest commit log id, 0 if the log is empty.
    async fn log_head(&self) -> Result<i64, StoreError>;

    /// Live (not deleted) datasets after `after` in (pool, owner, name) order (bytewise), at
    /// most `limit`, with their sync counts: what `tandem stream replay` walks. The caller
    /// checks that whoever asks may see them all.
    async fn datasets_after(
        &self,
        after: Option<&DatasetKey>,
        limit: usize,
    ) -> Result<Vec<(DatasetKey, u64)>, StoreError>;

    /// Appends a `Snapshot` entry holding the dataset's live records at its sync count, in
    /// one transaction with reading them (so it sits between the commits before and after
    /// it), and returns its id; `None` (nothing appended) for a dataset that does not exist
    /// or is deleted. For `tandem stream replay`; the caller checks who may.
    async fn log_snapshot(&self, dataset: &DatasetKey) -> Result<Option<i64>, StoreError>;

    /// The live (not merged-away) identities of `pool` whose id is above `after` (bytewise),
    /// by id, at most `limit` (1 to [`MAX_IDENTITY_PAGE`]): a developer's listing, a page at
    /// a time. An identity created meanwhile shows on a later page if its id sorts after the
    /// cursor, and never twice.
    async fn identities(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<IdentitySummary>, StoreError>;

    /// One live identity as [`Store::identities`] lists it; `None` if it was never created
    /// or was merged away.
    async fn identity_summary(
        &self,
        pool: &str,
        id: &str,
    ) -> Result<Option<IdentitySummary>, StoreError>;

    /// The pool's live identities and live datasets, counted in one read.
    async fn pool_usage(&self, pool: &str) -> Result<PoolUsage, StoreError>;

    /// The pool's setting `name`, or `None` if unset.
    async fn pool_setting(&self, pool: &str, name: &str) -> Result<Option<String>, StoreError>;

    /// Sets (`Some`) or clears (`None`) the pool's setting `name` if it holds what `expect`
    /// says, in one atomic step on every backend: of callers racing with the same
    /// expectation, exactly one writes. Whether it wrote.
    async fn put_pool_setting(
        &self,
        pool: &str,
        name: &str,
        value: Option<&str>,
        expect: Expect<'_>,
    ) -> Result<bool, StoreError>;
    /// Every identity, login, dataset (deleted ones too), record (tombstones too) and grant,
    /// in dump order (see `dump`), read from one consistent snapshot and streamed through a
    /// bounded channel; an error ends the stream. Not the commit log, not stream consumers.
    async fn dump(&self) -> Result<dump::DumpStream, StoreError>;

    /// Whether the store holds data, and the progress of the import that wrote into it.
    async fn import_status(&self) -> Result<dump::ImportStatus, StoreError>;

    /// Writes a batch of dumped items exactly as they are (ids, sync counts, tombstones,
    /// times, devices, merge roots), with the batch's progress, in one transaction, or
    /// nothing: `Rejected` names the first item that is invalid or already exists (unless
    /// the merge policy skips it), `OutOfStep` says the held progress is not the batch's
    /// `after`. A record's dataset must exist (an earlier item created it). Limits are not
    /// enforced (a copy keeps what the source held) and no commit log entry is written.
    async fn import_batch(
        &self,
        batch: dump::ImportBatch,
    ) -> Result<dump::BatchOutcome, StoreError>;

    /// Whether the store answers now (for `/ready`).
    async fn health(&self) -> Result<(), StoreError>;

    /// Finishes in-flight commits and closes the store; later calls fail with `Unavailable`.
    async fn close(&self);
}
