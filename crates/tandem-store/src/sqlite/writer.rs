//! The writer thread: it owns the only write connection and applies commands with group
//! commit, because with `synchronous=FULL` the fsync at COMMIT is the cost of a write and
//! one fsync can cover every command that queued up meanwhile.
//!
//! A batch is `BEGIN IMMEDIATE`, then each command under its own SAVEPOINT (rolled back
//! when that command fails or conflicts, so the others are unaffected), then one COMMIT.
//! Replies go out only after the COMMIT; if it fails, every command in the batch fails, and
//! the store is in a commit outage (see `outage`) until a batch that writes commits.
//!
//! Between batches the writer also keeps the WAL bounded ([`WalBound`]).

use super::compact::Compaction;
use super::{CheckpointLock, db_err, lock};
use super::{identity, query, stream};
use crate::commitlog::{self, CompactReport, LogKind};
use crate::decision::{self, DatasetState, GrantCounts, StoredRecords, upsert_records};
use crate::dump::{BatchOutcome, ImportBatch};
use crate::identity::{Login, MergeOutcome};
use crate::outage::CommitOutage;
use crate::{
    DatasetKey, DeadLetter, Limits, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch,
    now_ms,
};
use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};
use tandem_protocol::Access;
use tokio::sync::{mpsc, oneshot};

/// The most commands one COMMIT covers.
pub(super) const MAX_BATCH: usize = 256;

/// A write, validated by the caller as far as it can be without the database.
#[derive(Debug)]
pub(super) enum Op {
    Update {
        request: UpdateRequest,
        patches: Vec<ValidatedPatch>,
    },
    Delete {
        dataset: DatasetKey,
        actor: String,
    },
    Grant {
        dataset: DatasetKey,
        grantee: String,
        access: Access,
    },
    Revoke {
        dataset: DatasetKey,
        grantee: String,
    },
    CreateIdentity {
        pool: String,
        id: String,
        guest: bool,
    },
    LinkLogins {
        pool: String,
        id: String,
        logins: Vec<Login>,
    },
    Merge {
        pool: String,
        from: String,
        into: String,
    },
    /// Appends a snapshot entry of a live dataset.
    LogSnapshot {
        dataset: DatasetKey,
    },
    /// Compacts the commit log as at `now` (ms): not part of a batch, but run a step at a
    /// time between batches (see `compact`).
    CompactLog {
        now: i64,
    },
    StreamLease {
        consumer: String,
        node: String,
        now: i64,
        ttl: i64,
    },
    StreamAck {
        consumer: String,
        node: String,
        position: i64,
        now: i64,
    },
    StreamRelease {
        consumer: String,
        node: String,
    },
    StreamForget {
        consumer: String,
    },
    StreamDeadLetter {
        consumer: String,
        letters: Vec<DeadLetter>,
    },
    PutPoolSetting(super::admin::PutSetting),
    /// A batch of `tandem import` (see `dump`).
    Import(Box<ImportBatch>),
}

/// What a successful command produced.
#[derive(Debug)]
pub(super) enum Done {
    Update(UpdateOutcome),
    SyncCount(u64),
    Merge(MergeOutcome),
    Compacted(CompactReport),
    /// A lease's position, if it was granted.
    Lease(Option<i64>),
    Bool(bool),
    /// A log entry appended (its id), or none.
    Entry(Option<i64>),
    Import(BatchOutcome),
    Unit,
}

pub(super) type Reply = oneshot::Sender<Result<Done, StoreError>>;

#[derive(Debug)]
pub(super) struct Command {
    pub op: Op,
    pub reply: Reply,
}

/// Runs until every sender is gone, the queue is drained and compactions are done, then
/// closes the connection.
pub(super) fn run(
    mut conn: Connection,
    limits: &Limits,
    mut commands_rx: mpsc::Receiver<Command>,
    checkpoint_lock: CheckpointLock,
    outage: &CommitOutage,
    forced_drops: &AtomicU64,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut wal = WalBound::new(&conn, limits.sqlite_wal_max_bytes, checkpoint_lock);
    let mut compacted_at = Instant::now();
    // Compaction rounds run one step (one statement) after each batch, so commits go on
    // between the steps; the writer waits for commands only when none is in progress.
    let mut compactions: VecDeque<Compaction> = VecDeque::new();
    loop {
        if compactions.is_empty() {
            match commands_rx.blocking_recv() {
                Some(first) => batch.push(first),
                None => break,
            }
        }
        while batch.len() < MAX_BATCH {
            match commands_rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        for command in take_compactions(&mut batch) {
            compactions.push_back(command);
        }
        if !batch.is_empty() {
            commit_batch(&mut conn, limits, &mut batch, outage);
            wal.after_commit(&conn);
        }
        if let Some(compaction) = compactions.front_mut() {
            let result = compaction.step(&conn, limits, forced_drops);
            wal.after_commit(&conn);
            let finished = match result {
                Ok(None) => None,
                Ok(Some(report)) => Some(Ok(Done::Compacted(report))),
                Err(e) => {
                    outage.failed("sqlite", &e);
                    Some(Err(e))
                }
            };
            if let Some(result) = finished
                && let Some(done) = compactions.pop_front()
            {
                match (&result, done.reply) {
                    (_, Some(reply)) => {
                        let _ = reply.send(result);
                    }
                    (Err(e), None) => tracing::warn!(error = %e, "commit log compaction failed"),
                    (Ok(done), None) => tracing::debug!(?done, "commit log compacted"),
                }
            }
        }
        // Only writes add entries, so compacting after batches keeps the log bounded;
        // entries only past their age wait for the next write.
        if compacted_at.elapsed() >= commitlog::COMPACT_EVERY && compactions.is_empty() {
            compacted_at = Instant::now();
            compactions.push_back(Compaction::new(now_ms(), None));
        }
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the sqlite write connection failed");
    }
    tracing::debug!("sqlite writer stopped");
}

/// Takes the compaction requests out of a batch: they run a step at a time after it.
fn take_compactions(batch: &mut Vec<Command>) -> Vec<Compaction> {
    let mut taken = Vec::new();
    let mut i = 0;
    while i < batch.len() {
        if let Op::CompactLog { now } = batch[i].op {
            let command = batch.remove(i);
            taken.push(Compaction::new(now, Some(command.reply)));
        } else {
            i += 1;
        }
    }
    taken
}

/// How long the writer waits before it tries again a truncating checkpoint that could not
/// finish (readers kept using the WAL for the whole busy timeout, or an I/O error).
const CHECKPOINT_RETRY: Duration = Duration::from_secs(1);

/// Keeps the WAL file under `max_bytes` plus one group commit. The checkpointer thread's
/// PASSIVE checkpoints copy frames back but never reset the log while the writer keeps
/// appending, so under a steady write flood the WAL grew without end (289 MB beside an
/// 8.6 MB database). When the file has passed `max_bytes` after a commit, the writer itself
/// runs `wal_checkpoint(TRUNCATE)` between batches: it holds no transaction then, so the
/// checkpoint needs no write lock it would have to win against a writer that retakes it at
/// once (a RESTART from another connection could starve); it waits (up to the busy timeout)
/// only for readers still on old frames, which are short. It takes the checkpointer's lock
/// first: SQLite refuses a checkpoint while another runs, without waiting. `journal_size_limit`
/// truncates the file the same way when the log restarts on its own.
struct WalBound {
    /// The `-wal` file beside the database (where SQLite puts it: symlinks resolved).
    wal: Option<PathBuf>,
    max_bytes: u64,
    /// After a checkpoint that could not finish: when to try again.
    retry_at: Option<Instant>,
    checkpoint_lock: CheckpointLock,
}

impl WalBound {
    fn new(conn: &Connection, max_bytes: u64, checkpoint_lock: CheckpointLock) -> Self {
        WalBound {
            wal: conn.path().map(|db| PathBuf::from(format!("{db}-wal"))),
            max_bytes,
            retry_at: None,
            checkpoint_lock,
        }
    }

    fn after_commit(&mut self, conn: &Connection) {
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let Some(size) = self
            .wal
            .as_deref()
            .and_then(|wal| std::fs::metadata(wal).ok())
            .map(|m| m.len())
        else {
            return;
        };
        if size <= self.max_bytes {
            return;
        }
        let _checkpointing = lock(&self.checkpoint_lock);
        // Columns: busy (1 when it could not finish), frames in the log, frames copied back.
        let result = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
            row.get::<_, i64>(0)
        });
        match result {
            Ok(0) => {
                self.retry_at = None;
                tracing::debug!(wal_bytes = size, "sqlite wal checkpointed and truncated");
            }
            Ok(_) => {
                self.retry_at = Some(Instant::now() + CHECKPOINT_RETRY);
                tracing::debug!(
                    wal_bytes = size,
                    "sqlite wal checkpoint busy; retrying later"
                );
            }
            Err(e) => {
                self.retry_at = Some(Instant::now() + CHECKPOINT_RETRY);
                tracing::debug!(error = %e, wal_bytes = size, "sqlite wal checkpoint failed");
            }
        }
    }
}

/// Applies and commits a batch, then answers every command in it.
pub(super) fn commit_batch(
    conn: &mut Connection,
    limits: &Limits,
    batch: &mut Vec<Command>,
    outage: &CommitOutage,
) {
    let size = batch.len();
    let mut replies = Vec::with_capacity(size);
    let mut ops = Vec::with_capacity(size);
    for Command { op, reply } in batch.drain(..) {
        replies.push(reply);
        ops.push(op);
    }
    match apply_batch(conn, limits, &ops) {
        Ok((results, wrote)) => {
            // A batch that wrote nothing committed without touching the disk: it says
            // nothing about whether writes work.
            if wrote {
                outage.succeeded("sqlite");
            }
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have gone away; the commit stands either way.
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, batch = size, "sqlite group commit failed");
            outage.failed("sqlite", &e);
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// Each command's result, and whether any of them wrote.
type BatchResults = (Vec<Result<Done, StoreError>>, bool);

fn apply_batch(
    conn: &mut Connection,
    limits: &Limits,
    ops: &[Op],
) -> Result<BatchResults, StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let mut results = Vec::with_capacity(ops.len());
    let mut wrote = false;
    for op in ops {
        let mut savepoint = tx.savepoint().map_err(db_err)?;
        let result = apply(&savepoint, limits, op);
        let keep = matches!(
            result,
            Ok(Done::Update(UpdateOutcome::Committed { .. })
                | Done::SyncCount(_)
                | Done::Merge(_)
                | Done::Lease(_)
                | Done::Bool(_)
                | Done::Entry(_)
                | Done::Import(BatchOutcome::Committed(_))
                | Done::Unit)
        );
        if !keep {
            savepoint.rollback().map_err(db_err)?;
        }
        savepoint.commit().map_err(db_err)?;
        wrote |= keep;
        results.push(result);
    }
    tx.commit().map_err(db_err)?;
    Ok((results, wrote))
}

fn apply(conn: &Connection, limits: &Limits, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::Update { request, patches } => update(conn, limits, request, patches).map(Done::Update),
        Op::Delete { dataset, actor } => delete(conn, dataset, actor).map(Done::SyncCount),
        Op::Grant {
            dataset,
            grantee,
            access,
        } => grant(conn, limits, dataset, grantee, *access).map(|()| Done::Unit),
        Op::Revoke { dataset, grantee } => revoke(conn, dataset, grantee).map(|()| Done::Unit),
        Op::CreateIdentity { pool, id, guest } => {
            identity::create(conn, pool, id, *guest).map(|()| Done::Unit)
        }
        Op::LinkLogins { pool, id, logins } => {
            identity::link(conn, pool, id, logins).map(|()| Done::Unit)
        }
        Op::Merge { pool, from, into } => identity::merge(conn, pool, from, into).map(Done::Merge),
        Op::LogSnapshot { dataset } => log_snapshot(conn, dataset).map(Done::Entry),
        Op::CompactLog { .. } => Err(StoreError::Internal(
            "a compaction runs between batches, not in one".into(),
        )),
        Op::StreamLease {
            consumer,
            node,
            now,
            ttl,
        } => stream::lease(conn, consumer, node, *now, *ttl).map(Done::Lease),
        Op::StreamAck {
            consumer,
            node,
            position,
            now,
        } => stream::ack(conn, consumer, node, *position, *now).map(Done::Bool),
        Op::StreamRelease { consumer, node } => {
            stream::release(conn, consumer, node).map(|()| Done::Unit)
        }
        Op::StreamForget { consumer } => stream::forget(conn, consumer).map(Done::Bool),
        Op::StreamDeadLetter { consumer, letters } => {
            stream::dead_letter(conn, consumer, letters, limits.stream_dead_letter_max)
                .map(|()| Done::Unit)
        }
        Op::PutPoolSetting(put) => super::admin::put_setting(conn, put).map(Done::Bool),
        Op::Import(batch) => super::dump::import_batch(conn, batch).map(Done::Import),
    }
}

fn update(
    conn: &Connection,
    limits: &Limits,
    request: &UpdateRequest,
    patches: &[ValidatedPatch],
) -> Result<UpdateOutcome, StoreError> {
    let key = &request.dataset;
    query::check_write(conn, key, &request.actor)?;
    // The writer thread holds the only write connection inside `BEGIN IMMEDIATE`, so what it
    // reads here is what the update is decided and written against.
    let row = query::load_dataset(conn, key)?;
    let state = row.map_or(DatasetState::ABSENT, |r| r.state);
    let mut stored = StoredRecords::new();
    if let Some(row) = row {
        for patch in patches {
            if let Some(record) = query::load_record(conn, row.id, &patch.key)? {
                stored.insert(record.key.clone(), record);
            }
        }
    }
    if let Some(conflict) = decision::conflict(&state, patches, &stored) {
        return Ok(conflict);
    }
    let owned = if state.is_created_by_update() {
        Some(count_owned(conn, key)?)
    } else {
        None
    };
    let now = now_ms();
    let plan = decision::plan(limits, request, patches, &state, &stored, owned, now)?;
    // The rest of the dataset, for the committed snapshot.
    if let Some(row) = row {
        for record in query::live_records(conn, row.id)? {
            stored.entry(record.key.clone()).or_insert(record);
        }
    }

    let dataset_id = upsert_dataset(conn, key, plan.sync_count, plan.records, plan.bytes, now)?;
    let mut stmt = conn
        .prepare_cached(upsert_records!("VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"))
        .map_err(db_err)?;
    for record in &plan.changed {
        stmt.execute(params![
            dataset_id,
            record.key,
            record.value,
            record.sync_count,
            record.last_modified,
            record.last_modified_by,
            record.device_id,
            record.device_last_modified,
        ])
        .map_err(db_err)?;
    }
    append_log(
        conn,
        key,
        LogKind::Update,
        Some(plan.sync_count),
        &request.actor,
        request.device_id.as_deref(),
        now,
        &commitlog::records_json(&plan.changed, &stored),
    )?;
    Ok(plan.committed(key, stored))
}

/// Writes a dataset's row as one commit left it (live, at `sync_count`, with its live
/// records' totals), creating it if it has none; returns its id.
pub(super) fn upsert_dataset(
    conn: &Connection,
    key: &DatasetKey,
    sync_count: u64,
    records: u64,
    bytes: u64,
    now: i64,
) -> Result<i64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO datasets (pool, owner, name, sync_count, deleted, record_count,
                                   byte_size, created_at, last_modified)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?7)
             ON CONFLICT (pool, owner, name) DO UPDATE SET
                 sync_count = excluded.sync_count,
                 deleted = 0,
                 record_count = excluded.record_count,
                 byte_size = excluded.byte_size,
                 last_modified = excluded.last_modified
             RETURNING id",
    )
    .and_then(|mut stmt| {
        stmt.query_row(
            params![
                key.pool, key.owner, key.name, sync_count, records, bytes, now
            ],
            |r| r.get(0),
        )
    })
    .map_err(db_err)
}

/// The owner's live datasets (the writer connection holds the write lock, so no creation
/// can race this count).
fn count_owned(conn: &Connection, key: &DatasetKey) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "SELECT count(*) FROM datasets WHERE pool = ?1 AND owner = ?2 AND deleted = 0",
    )
    .and_then(|mut stmt| stmt.query_row(params![key.pool, key.owner], |r| r.get(0)))
    .map_err(db_err)
}

pub(super) fn delete(conn: &Connection, key: &DatasetKey, actor: &str) -> Result<u64, StoreError> {
    if actor != key.owner {
        return Err(query::forbidden(key, actor, "owner"));
    }
    let row = match query::load_dataset(conn, key)? {
        Some(row) if !row.state.deleted => row,
        _ => return Err(StoreError::NotFound(format!("dataset {key}"))),
    };
    let new_count = row.state.sync_count + 1;
    let now = now_ms();
    // The log keeps them as they were, for history.
    let live = query::live_records(conn, row.id)?;
    // Live records become tombstones stamped with the delete's sync count, so that
    // `changes` since an earlier count reports the deletion.
    conn.prepare_cached(
        "UPDATE records SET value = NULL, sync_count = ?2, last_modified = ?3,
                            last_modified_by = ?4, device_id = NULL, device_last_modified = NULL
         WHERE dataset_id = ?1 AND value IS NOT NULL",
    )
    .and_then(|mut stmt| stmt.execute(params![row.id, new_count, now, key.owner]))
    .map_err(db_err)?;
    conn.prepare_cached("DELETE FROM grants WHERE pool = ?1 AND owner = ?2 AND name = ?3")
        .and_then(|mut stmt| stmt.execute(params![key.pool, key.owner, key.name]))
        .map_err(db_err)?;
    conn.prepare_cached(
        "UPDATE datasets SET sync_count = ?2, deleted = 1, record_count = 0, byte_size = 0,
                             last_modified = ?3, merge_root = NULL,
                             last_deleted_sync_count = ?2
         WHERE id = ?1",
    )
    .and_then(|mut stmt| stmt.execute(params![row.id, new_count, now]))
    .map_err(db_err)?;
    append_log(
        conn,
        key,
        LogKind::Delete,
        Some(new_count),
        actor,
        None,
        now,
        &commitlog::delete_json(&live),
    )?;
    Ok(new_count)
}

/// A live dataset's records as a snapshot entry; `None` for a missing or deleted dataset.
fn log_snapshot(conn: &Connection, key: &DatasetKey) -> Result<Option<i64>, StoreError> {
    let Some(row) = query::load_dataset(conn, key)?.filter(|r| !r.state.deleted) else {
        return Ok(None);
    };
    let records = query::live_records(conn, row.id)?;
    append_log(
        conn,
        key,
        LogKind::Snapshot,
        Some(row.state.sync_count),
        &key.owner,
        None,
        now_ms(),
        &commitlog::snapshot_json(&records),
    )?;
    Ok(Some(conn.last_insert_rowid()))
}

/// Appends a commit log entry for `key`, in the caller's transaction. `sync_count` `None`
/// takes the dataset's current one (0 if it has no row), for grants and revokes.
///
/// The id is the rowid, one above the largest: this thread is the only writer and holds the
/// write lock from `BEGIN IMMEDIATE` to COMMIT, so ids are handed out and become visible
/// in the same order, and a `log_since` reader (which reads one snapshot) never later finds
/// an id below one it has seen. Ids are never reused because compaction always keeps the
/// store's newest entry (`compact`). The entry links to its dataset's previous one and
/// becomes the dataset's head (schema version 6).
#[allow(clippy::too_many_arguments, reason = "one per column of the entry")]
pub(super) fn append_log(
    conn: &Connection,
    key: &DatasetKey,
    kind: LogKind,
    sync_count: Option<u64>,
    actor: &str,
    device_id: Option<&str>,
    now: i64,
    patches: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO commit_log (pool, owner, name, kind, sync_count, actor, device_id,
                                 server_time, patches, prev_id)
         VALUES (?1, ?2, ?3, ?4,
                 coalesce(?5, (SELECT sync_count FROM datasets
                               WHERE pool = ?1 AND owner = ?2 AND name = ?3), 0),
                 ?6, ?7, ?8, ?9,
                 (SELECT head FROM commit_log_heads
                  WHERE pool = ?1 AND owner = ?2 AND name = ?3))",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            key.pool,
            key.owner,
            key.name,
            kind.as_str(),
            sync_count,
            actor,
            device_id,
            now,
            patches
        ])
    })
    .map_err(db_err)?;
    conn.prepare_cached(
        "INSERT INTO commit_log_heads (pool, owner, name, head, entries)
         VALUES (?1, ?2, ?3, last_insert_rowid(), 1)
         ON CONFLICT (pool, owner, name) DO UPDATE SET
             head = excluded.head, entries = entries + 1",
    )
    .and_then(|mut stmt| stmt.execute(params![key.pool, key.owner, key.name]))
    .map_err(db_err)?;
    Ok(())
}

/// Grants (or changes) access, within the grant limits. The writer thread holds the write
/// lock, so no other grant can take the last slot between the count and the insert.
fn grant(
    conn: &Connection,
    limits: &Limits,
    key: &DatasetKey,
    grantee: &str,
    access: Access,
) -> Result<(), StoreError> {
    let counts = conn
        .prepare_cached(
            "SELECT count(*) FILTER (WHERE name = ?3 AND grantee = ?4),
                    count(*) FILTER (WHERE name = ?3),
                    count(*)
             FROM grants WHERE pool = ?1 AND owner = ?2",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![key.pool, key.owner, key.name, grantee], |r| {
                Ok(GrantCounts {
                    exists: r.get::<_, u64>(0)? > 0,
                    on_dataset: r.get(1)?,
                    by_owner: r.get(2)?,
                })
            })
        })
        .map_err(db_err)?;
    decision::check_grant(limits, key, counts)?;
    conn.prepare_cached(
        "INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (pool, owner, name, grantee) DO UPDATE SET
             access = excluded.access,
             granted_at = excluded.granted_at",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            key.pool,
            key.owner,
            key.name,
            grantee,
            access.as_str(),
            now_ms()
        ])
    })
    .map_err(db_err)?;
    append_log(
        conn,
        key,
        LogKind::Grant,
        None,
        &key.owner,
        None,
        now_ms(),
        &commitlog::grant_json(grantee, Some(access)),
    )
}

fn revoke(conn: &Connection, key: &DatasetKey, grantee: &str) -> Result<(), StoreError> {
    let removed = conn
        .prepare_cached(
            "DELETE FROM grants WHERE pool = ?1 AND owner = ?2 AND name = ?3 AND grantee = ?4",
        )
        .and_then(|mut stmt| stmt.execute(params![key.pool, key.owner, key.name, grantee]))
        .map_err(db_err)?;
    if removed == 0 {
        return Err(StoreError::NotFound(format!("grant of {key} to {grantee}")));
    }
    append_log(
        conn,
        key,
        LogKind::Revoke,
        None,
        &key.owner,
        None,
        now_ms(),
        &commitlog::grant_json(grantee, None),
    )
}
