//! Writes. An update or a delete is one READ COMMITTED transaction that starts by locking
//! the dataset's row (see the module doc of `postgres` for why that is enough); a grant is
//! one that takes the owner's grant lock, counts, locks the dataset's row and writes; a
//! revoke one that locks the row, then deletes and logs in one statement. An update reads
//! the rows under the lock, lets the shared `decision` say what it writes, and writes that
//! with the same statements as a batch (`store_writes_and_commit`). Statements that do not depend on each other's results are
//! sent together (tokio-postgres pipelines them on the connection), the last ones with COMMIT
//! ([`commit`]), and each write is one statement however many records it touches.

use super::read::{record_from_row, to_i64, to_u64};
use super::{CallError, forbidden};
use crate::commitlog::{self, LogKind};
use crate::decision::{
    self, DatasetRow, DatasetState, GrantCounts, Plan, StoredRecords, upsert_records,
};
use crate::{DatasetKey, Limits, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch, now_ms};
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::tokio_postgres::{self, Row};
use deadpool_postgres::{ClientWrapper, GenericClient, Transaction};
use tandem_protocol::Access;

/// The first key of the advisory lock that serialises the creation of one owner's datasets
/// (the second is a hash of pool and owner). Distinct from the migration lock's.
pub(super) const OWNER_LOCK: i32 = 0x5444_4d01;

/// The first key of the advisory lock that serialises one owner's new grants (the second is
/// the same as [`OWNER_LOCK`]'s). Not `OWNER_LOCK` itself: an update by a grantee holds its
/// grant row `FOR SHARE` while it waits for `OWNER_LOCK`, and a grant changing that row's
/// access under `OWNER_LOCK` would wait for the update: a deadlock.
pub(super) const GRANT_LOCK: i32 = 0x5444_4d02;

/// The first key of the advisory lock that serialises the creation of a dataset's row with
/// appends to the log of its name while it has none (the second is a hash of the dataset's
/// key). A grant or revoke of a name without a row chains its entry through
/// `commit_log_heads` under this lock, and the insert of the row ([`INSERT_DATASET`]), under
/// it too, takes that head over: so no entry is chained onto a head that is being moved.
/// Taken before any row or grant lock (a grantee's update that finds no row starts again
/// with it, see [`update`]), and held only by transactions that create a row or append
/// to a rowless name.
pub(super) const CREATE_LOCK: i32 = 0x5444_4d04;

/// A dataset's row from a statement's first five columns: id, sync count, deleted, record
/// count, byte size. A row inserted to be locked, for a dataset that did not exist, looks like
/// a deleted dataset at sync count 0 (which is what a dataset that never existed is) until the
/// update commits.
pub(super) fn dataset_row(row: &Row) -> Result<DatasetRow, CallError> {
    dataset_row_at(row, 0)
}

/// [`dataset_row`] from the five columns from `at` on.
pub(super) fn dataset_row_at(row: &Row, at: usize) -> Result<DatasetRow, CallError> {
    Ok(DatasetRow {
        id: row.try_get(at)?,
        state: DatasetState {
            sync_count: to_u64(row.try_get(at + 1)?)?,
            deleted: row.try_get(at + 2)?,
            record_count: to_u64(row.try_get(at + 3)?)?,
            byte_size: to_u64(row.try_get(at + 4)?)?,
        },
    })
}

const LOCK_DATASET: &str = "
    SELECT id, sync_count, deleted, record_count, byte_size FROM datasets
    WHERE pool = $1 AND owner = $2 AND name = $3
    FOR UPDATE";

/// Inserts a dataset's placeholder row (see [`insert_or_lock_dataset`]), which takes over
/// the name's log head from `commit_log_heads` if grants logged while it had no row; the
/// caller holds [`CREATE_LOCK`].
const INSERT_DATASET: &str = "
    WITH ins AS (
        INSERT INTO datasets (pool, owner, name, sync_count, deleted, created_at,
                              last_modified, log_head, log_entries)
        SELECT $1::text, $2::text, $3::text, 0, true, $4::bigint, $4::bigint, h.head,
               coalesce(h.entries, 0)
        FROM (SELECT 1) AS one
             LEFT JOIN commit_log_heads h ON h.pool = $1 AND h.owner = $2 AND h.name = $3
        ON CONFLICT (pool, owner, name) DO NOTHING
        RETURNING id, sync_count, deleted, record_count, byte_size
    ), adopted AS (
        DELETE FROM commit_log_heads
        WHERE pool = $1 AND owner = $2 AND name = $3 AND EXISTS (SELECT 1 FROM ins)
    )
    SELECT * FROM ins";

const LOCK_GRANT: &str = "
    SELECT access FROM grants
    WHERE pool = $1 AND owner = $2 AND name = $3 AND grantee = $4
    FOR SHARE";

/// The live records and the patched keys' records (tombstones too) of a dataset.
const LOAD_RECORDS: &str = "
    SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
           device_last_modified
    FROM records WHERE dataset_id = $1 AND (value IS NOT NULL OR key = ANY($2))";

/// `LOAD_RECORDS` by the dataset's name (a deleted dataset has tombstones only), so it can
/// be sent with the row lock before the row's id is known.
const LOAD_RECORDS_BY_NAME: &str = "
    SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
           device_last_modified
    FROM records
    WHERE dataset_id = (SELECT id FROM datasets
                        WHERE pool = $1 AND owner = $2 AND name = $3)
      AND (value IS NOT NULL OR key = ANY($4))";

const LOCK_OWNER: &str = "SELECT pg_advisory_xact_lock($1, hashtext($2))";

const COUNT_OWNED: &str =
    "SELECT count(*) FROM datasets WHERE pool = $1 AND owner = $2 AND NOT deleted";

/// Writes the stamped records of any number of updates in one statement.
pub(super) const UPSERT_RECORDS: &str = upsert_records!(
    "SELECT u.dataset_id, u.key, u.value, u.sync_count, $8, u.last_modified_by, u.device_id,
            u.device_last_modified
     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                 $7::bigint[])
       AS u (dataset_id, key, value, sync_count, last_modified_by, device_id,
             device_last_modified)"
);

/// A statement that appends commit log entries, chained (schema version 9). Its CTE `e`
/// has the entries (`id, ds, pool, owner, name, kind, sync_count, actor, device_id,
/// server_time, patches`, `ds` the dataset row's id) and `heads` answers `(id, log_prev)`
/// for each of their dataset rows, having moved the row's `log_head` to its newest entry
/// here: each entry's `prev_id` is the previous one of its dataset in the same statement,
/// or else the head the row had. The head is read through `log_prev` from the row version
/// the update wrote (not the statement's snapshot), though every writer holds the row
/// locked from an earlier statement anyway: any transaction that takes the `log_seq`
/// counter must already hold the rows it chains onto, since updates hold theirs while they
/// wait for the counter. Answers the ids.
macro_rules! append_log {
    ($ctes:expr) => {
        concat!(
            "WITH ",
            $ctes,
            "
    INSERT INTO commit_log (id, pool, owner, name, kind, sync_count, actor, device_id,
                            server_time, patches, prev_id)
    SELECT e.id, e.pool, e.owner, e.name, e.kind, e.sync_count, e.actor, e.device_id,
           e.server_time, e.patches,
           coalesce(lag(e.id) OVER (PARTITION BY e.ds ORDER BY e.id), heads.log_prev)
    FROM e JOIN heads ON heads.id = e.ds
    RETURNING id"
        )
    };
}

/// The CTEs `seq` and `e` of [`append_log`] from the arrays `$N`..`$N+8` (dataset ids,
/// pools, owners, names, kinds, sync counts, actors, devices, patches) and the time
/// `$N+9`, ids taken from the `log_seq` counter (see [`APPEND_LOG`]).
macro_rules! log_entries {
    ($ds:literal, $pool:literal, $owner:literal, $name:literal, $kind:literal, $count:literal,
     $actor:literal, $device:literal, $patches:literal, $now:literal) => {
        concat!(
            "seq AS (
        UPDATE log_seq SET last = last + cardinality(",
            $ds,
            "::bigint[]) WHERE only_row
        RETURNING last
    ),
    e AS (
        SELECT seq.last - cardinality(",
            $ds,
            "::bigint[]) + u.n AS id,
               u.ds, u.pool, u.owner, u.name, u.kind, u.sync_count, u.actor, u.device_id,
               ",
            $now,
            "::bigint AS server_time, u.patches
        FROM seq, UNNEST(",
            $ds,
            "::bigint[], ",
            $pool,
            "::text[], ",
            $owner,
            "::text[], ",
            $name,
            "::text[], ",
            $kind,
            "::text[], ",
            $count,
            "::bigint[], ",
            $actor,
            "::text[], ",
            $device,
            "::text[], ",
            $patches,
            "::text[])
          WITH ORDINALITY AS u (ds, pool, owner, name, kind, sync_count, actor, device_id,
                                patches, n)
    ),
    per_dataset AS (SELECT ds, max(id) AS head, count(*) AS n FROM e GROUP BY ds)"
        )
    };
}

/// Sets the rows of updated datasets and appends the updates' log entries, chained onto
/// each row's `log_head`, in one statement: `$1`..`$4` the rows (ids, sync counts, record
/// counts, byte sizes), `$5` the time, `$6`..`$14` the entries as in [`LogColumns`]. The
/// row is rewritten by every commit anyway, so the head costs no write of its own (a
/// separate heads table cost a row upsert per commit, a third of what the log costs the
/// write path: docs/BENCHMARKS.md). Like [`APPEND_LOG`], it takes the `log_seq` counter, so
/// it is sent last, with COMMIT.
pub(super) const WRITE_DATASETS_AND_LOG: &str = append_log!(concat!(
    log_entries!(
        "$6", "$7", "$8", "$9", "$10", "$11", "$12", "$13", "$14", "$5"
    ),
    ",
    heads AS (
        UPDATE datasets AS d
        SET sync_count = w.sync_count, deleted = false, record_count = w.record_count,
            byte_size = w.byte_size, last_modified = $5,
            log_prev = d.log_head, log_head = coalesce(p.head, d.log_head),
            log_entries = d.log_entries + coalesce(p.n, 0)
        FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
               AS w (id, sync_count, record_count, byte_size)
             LEFT JOIN per_dataset p ON p.ds = w.id
        WHERE d.id = w.id
        RETURNING d.id, d.log_prev
    )"
));

/// Appends commit log entries (`$1`..`$9` as in [`LogColumns`], `$10` the time) to
/// datasets whose rows the transaction holds locked, their ids in the arrays' order, taken
/// from the `log_seq` counter (schema version 6). Updating the counter locks its row until
/// the transaction ends, so the next transaction to take ids waits for this one to commit
/// (or roll back) and then continues above it: ids become visible in id order, and a
/// `log_since` reader that has seen an id never later finds a smaller one. That serialises
/// the commits of transactions that log, so every writer sends this (or another statement
/// that takes ids from the counter) as its last statement in the same round trip as COMMIT
/// ([`commit`]), never waiting for its answer first: the counter is then held for the
/// commit only, not for a round trip to the node, nor, if the node's network fails in
/// between, until `idle_in_transaction_session_timeout` ends the session. The only other
/// locks taken after it are of rows the transaction already holds, and of the rowless heads
/// rows, which only holders of the counter or of the name's [`CREATE_LOCK`] take, and a
/// holder of the counter appends to a rowless name only under that lock: they never wait.
/// `WHERE only_row` finds the row by its key: with sequential scans priced out
/// (`pg_config`), a scan of the table would cost enough to be JIT-compiled, hundreds of
/// milliseconds a statement.
pub(super) const APPEND_LOG: &str = append_log!(concat!(
    log_entries!("$1", "$2", "$3", "$4", "$5", "$6", "$7", "$8", "$9", "$10"),
    ",
    heads AS (
        UPDATE datasets AS d
        SET log_prev = d.log_head, log_head = p.head, log_entries = d.log_entries + p.n
        FROM per_dataset p
        WHERE d.id = p.ds
        RETURNING d.id, d.log_prev
    )"
));

/// A statement that appends one entry of a dataset that has no row (a grant or revoke of a
/// name no one has written yet; `e` as in [`append_log`] without `ds`), chained through
/// `commit_log_heads`, which keeps the heads of such names until a row is created and takes
/// the head over ([`INSERT_DATASET`]). The caller holds the name's creation lock
/// ([`CREATE_LOCK`]), so no row appears meanwhile. The upsert reads the head from the
/// heads row's newest version and hands it out through `prev_head`.
macro_rules! append_rowless_log {
    ($ctes:expr) => {
        concat!(
            "WITH ",
            $ctes,
            ",
    heads AS (
        INSERT INTO commit_log_heads AS h (pool, owner, name, head, entries)
        SELECT pool, owner, name, id, 1 FROM e
        ON CONFLICT (pool, owner, name) DO UPDATE
            SET prev_head = h.head, head = excluded.head, entries = h.entries + 1
        RETURNING prev_head
    )
    INSERT INTO commit_log (id, pool, owner, name, kind, sync_count, actor, device_id,
                            server_time, patches, prev_id)
    SELECT e.id, e.pool, e.owner, e.name, e.kind, e.sync_count, e.actor, e.device_id,
           e.server_time, e.patches, heads.prev_head
    FROM e, heads
    RETURNING id"
        )
    };
}

/// A grant's entry (`$1`..`$3` the dataset, `$4` the time, `$5` the patches) for a dataset
/// without a row, at sync count 0; its id as in [`APPEND_LOG`].
const APPEND_ROWLESS_GRANT_LOG: &str = append_rowless_log!(
    "seq AS (UPDATE log_seq SET last = last + 1 WHERE only_row RETURNING last),
    e AS (
        SELECT seq.last AS id, $1::text AS pool, $2::text AS owner, $3::text AS name,
               'grant'::text AS kind, 0::bigint AS sync_count, $2::text AS actor,
               NULL::text AS device_id, $4::bigint AS server_time, $5::text AS patches
        FROM seq
    )"
);

/// The CTEs of a revoke that logs: `gone` deletes the grant (`$1`..`$4`), `seq` takes an id
/// from the `log_seq` counter only if it went.
macro_rules! revoke_ctes {
    () => {
        "gone AS (
        DELETE FROM grants WHERE pool = $1 AND owner = $2 AND name = $3 AND grantee = $4
        RETURNING 1
    ),
    seq AS (
        UPDATE log_seq SET last = last + 1
        WHERE only_row AND EXISTS (SELECT 1 FROM gone) RETURNING last
    ),
    "
    };
}

/// Removes a grant (`$1`..`$4`) and, only if one went, appends its entry (`$5` the time,
/// `$6` the patches, `$7` the dataset row's id, `$8` its sync count) chained onto the
/// row, which the transaction holds locked; its id as in [`APPEND_LOG`].
const REVOKE_AND_LOG: &str = append_log!(concat!(
    revoke_ctes!(),
    "e AS (
        SELECT seq.last AS id, $7::bigint AS ds, $1::text AS pool, $2::text AS owner,
               $3::text AS name, 'revoke'::text AS kind, $8::bigint AS sync_count,
               $2::text AS actor, NULL::text AS device_id, $5::bigint AS server_time,
               $6::text AS patches
        FROM seq
    ),
    heads AS (
        UPDATE datasets AS d
        SET log_prev = d.log_head, log_head = e.id, log_entries = d.log_entries + 1
        FROM e
        WHERE d.id = e.ds
        RETURNING d.id, d.log_prev
    )"
));

/// [`REVOKE_AND_LOG`] for a dataset without a row (`$1`..`$6`), at sync count 0, chained
/// as [`append_rowless_log`].
const REVOKE_ROWLESS_AND_LOG: &str = append_rowless_log!(concat!(
    revoke_ctes!(),
    "e AS (
        SELECT seq.last AS id, $1::text AS pool, $2::text AS owner, $3::text AS name,
               'revoke'::text AS kind, 0::bigint AS sync_count, $2::text AS actor,
               NULL::text AS device_id, $5::bigint AS server_time, $6::text AS patches
        FROM seq
    )"
));

/// COMMIT, for a transaction's last round trip: polled right after the futures of its last
/// statements (in a `biased` join, each already prepared so it is sent on its first poll),
/// so the statement that takes commit log ids and the commit travel together (see
/// [`APPEND_LOG`]). The server runs them in order: if a statement fails, the transaction is
/// aborted and COMMIT ends it as a rollback without an error of its own, so the failed
/// statement's error is the one the join returns and nothing is written. If the answer to
/// COMMIT is lost, this fails and the caller gets `Unavailable`, as with
/// `Transaction::commit`.
///
/// A `Transaction` only ends by its own `commit`, which would wait for the statements'
/// answers first, or by its drop, which sends ROLLBACK without waiting. So COMMIT is sent
/// as a statement, followed by a BEGIN that opens an empty transaction for that ROLLBACK to
/// end (a ROLLBACK outside a transaction would make the server log a warning each time).
/// The caller sends nothing after it and drops the transaction.
pub(super) async fn commit(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    tx.batch_execute("COMMIT; BEGIN").await
}

/// Log entries to append, as the arrays of [`APPEND_LOG`] (and of
/// [`WRITE_DATASETS_AND_LOG`]).
#[derive(Default)]
pub(super) struct LogColumns<'a> {
    datasets: Vec<i64>,
    pools: Vec<&'a str>,
    owners: Vec<&'a str>,
    names: Vec<&'a str>,
    kinds: Vec<&'static str>,
    counts: Vec<i64>,
    actors: Vec<&'a str>,
    devices: Vec<Option<&'a str>>,
    patches: Vec<String>,
}

impl<'a> LogColumns<'a> {
    /// An update's entry: the records `plan` writes to the dataset row `dataset_id`, with
    /// the `stored` ones they replace.
    pub(super) fn push_update(
        &mut self,
        dataset_id: i64,
        request: &'a UpdateRequest,
        plan: &Plan,
        stored: &StoredRecords,
    ) -> Result<(), CallError> {
        let key = &request.dataset;
        self.push(
            dataset_id,
            key,
            LogKind::Update,
            plan.sync_count,
            &request.actor,
            request.device_id.as_deref(),
            commitlog::records_json(&plan.changed, stored),
        )
    }

    /// An entry of the dataset `key`, whose row (`dataset_id`) the transaction holds locked.
    #[allow(clippy::too_many_arguments, reason = "one per column of the entry")]
    pub(super) fn push(
        &mut self,
        dataset_id: i64,
        key: &'a DatasetKey,
        kind: LogKind,
        sync_count: u64,
        actor: &'a str,
        device: Option<&'a str>,
        patches: String,
    ) -> Result<(), CallError> {
        self.datasets.push(dataset_id);
        self.pools.push(&key.pool);
        self.owners.push(&key.owner);
        self.names.push(&key.name);
        self.kinds.push(kind.as_str());
        self.counts.push(to_i64(sync_count)?);
        self.actors.push(actor);
        self.devices.push(device);
        self.patches.push(patches);
        Ok(())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.pools.is_empty()
    }

    /// The entries' nine arrays.
    fn arrays(&self) -> [&(dyn ToSql + Sync); 9] {
        [
            &self.datasets,
            &self.pools,
            &self.owners,
            &self.names,
            &self.kinds,
            &self.counts,
            &self.actors,
            &self.devices,
            &self.patches,
        ]
    }

    /// The parameters of [`APPEND_LOG`].
    pub(super) fn params<'p>(&'p self, now: &'p i64) -> [&'p (dyn ToSql + Sync); 10] {
        let [a, b, c, d, e, f, g, h, i] = self.arrays();
        [a, b, c, d, e, f, g, h, i, now]
    }
}

/// A delete turns every live record into a tombstone stamped with the delete's sync count,
/// so that `changes` since an earlier count reports the deletion.
const DELETE_RECORDS: &str = "
    UPDATE records SET value = NULL, sync_count = $2, last_modified = $3,
                       last_modified_by = $4, device_id = NULL, device_last_modified = NULL
    WHERE dataset_id = $1 AND value IS NOT NULL";

const DELETE_GRANTS: &str = "DELETE FROM grants WHERE pool = $1 AND owner = $2 AND name = $3";

const MARK_DELETED: &str = "
    UPDATE datasets SET sync_count = $2, deleted = true, record_count = 0, byte_size = 0,
                        last_modified = $3, merge_root = NULL, last_deleted_sync_count = $2
    WHERE id = $1";

const UPSERT_GRANT: &str = "
    INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT (pool, owner, name, grantee) DO UPDATE SET
        access = EXCLUDED.access,
        granted_at = EXCLUDED.granted_at";

/// Whether the grantee's grant exists, the grants on the dataset name and the owner's grants.
const COUNT_GRANTS: &str = "
    SELECT count(*) FILTER (WHERE name = $3 AND grantee = $4),
           count(*) FILTER (WHERE name = $3),
           count(*)
    FROM grants WHERE pool = $1 AND owner = $2";

/// Applies an update (validated by the caller) in one transaction; see `Store::update`.
/// Nothing is written unless it returns `Committed`: any other outcome drops the
/// transaction, which rolls it back.
pub(super) async fn update(
    client: &mut ClientWrapper,
    limits: &Limits,
    request: &UpdateRequest,
    patches: &[ValidatedPatch],
) -> Result<UpdateOutcome, CallError> {
    match update_in(client, limits, request, patches, false).await? {
        Some(outcome) => Ok(outcome),
        // A grantee creating the dataset holds its grant row when it finds no dataset row;
        // it starts again with the creation lock first, since a grant or revoke of a name
        // without a row takes that lock before the grant row (see `CREATE_LOCK`).
        None => update_in(client, limits, request, patches, true)
            .await?
            .ok_or_else(|| StoreError::Internal("update found no row twice".into()).into()),
    }
}

/// [`update`], with [`CREATE_LOCK`] taken first if `create_first`; `None` when it finds no
/// row for a grantee without it (nothing written).
async fn update_in(
    client: &mut ClientWrapper,
    limits: &Limits,
    request: &UpdateRequest,
    patches: &[ValidatedPatch],
    create_first: bool,
) -> Result<Option<UpdateOutcome>, CallError> {
    let key = &request.dataset;
    let is_owner = request.actor == key.owner;
    let now = now_ms();
    let keys: Vec<&str> = patches.iter().map(|p| p.key.as_str()).collect();
    let tx = client.transaction().await?;
    if create_first {
        take_create_lock(&tx, key).await?;
    }

    // Sent together and run in this order: the grant check and the records load each take
    // their snapshot after the row lock is granted, so they see every earlier commit.
    let (lock, check, load) = tokio::try_join!(
        tx.prepare_cached(LOCK_DATASET),
        tx.prepare_cached(LOCK_GRANT),
        tx.prepare_cached(LOAD_RECORDS_BY_NAME),
    )?;
    let (locked, grant, loaded) = tokio::try_join!(
        biased;
        async {
            tx.query_opt(&lock, &[&key.pool, &key.owner, &key.name])
                .await
        },
        async {
            if is_owner {
                Ok(None)
            } else {
                tx.query_opt(&check, &[&key.pool, &key.owner, &key.name, &request.actor])
                    .await
            }
        },
        async {
            tx.query(&load, &[&key.pool, &key.owner, &key.name, &keys])
                .await
        },
    )?;
    if !is_owner {
        let grant: Option<String> = grant.map(|row| row.try_get(0)).transpose()?;
        if !grant
            .as_deref()
            .and_then(Access::parse)
            .is_some_and(Access::can_write)
        {
            return Err(forbidden(key, &request.actor, "write").into());
        }
    }

    // The dataset's live records and the stored state (tombstones too) of every patched key.
    let (row, stored) = match locked {
        Some(row) => (dataset_row(&row)?, records_by_key(&loaded)?),
        None if !is_owner && !create_first => return Ok(None),
        None => {
            // No row to lock: the records loaded above belong to no lock we hold (a
            // concurrent creation may have committed since), so load again once locked.
            let row = insert_or_lock_dataset(&tx, key, now).await?;
            let stmt = tx.prepare_cached(LOAD_RECORDS).await?;
            let stored = records_by_key(&tx.query(&stmt, &[&row.id, &keys]).await?)?;
            (row, stored)
        }
    };
    if let Some(conflict) = decision::conflict(&row.state, patches, &stored) {
        return Ok(Some(conflict));
    }
    let owned = if row.state.is_created_by_update() {
        Some(count_owned_locked(&tx, key).await?)
    } else {
        None
    };
    let plan = decision::plan(limits, request, patches, &row.state, &stored, owned, now)?;
    let mut log = LogColumns::default();
    log.push_update(row.id, request, &plan, &stored)?;
    let write = Write {
        dataset_id: row.id,
        plan,
    };
    store_writes_and_commit(tx, &[&write], &log, now).await?;
    Ok(Some(write.plan.committed(key, stored)))
}

/// An update's plan, for the dataset row it writes.
pub(super) struct Write {
    pub dataset_id: i64,
    pub plan: Plan,
}

/// Writes planned updates (to distinct datasets, whose rows the transaction holds) and
/// commits: every record in one statement, then every dataset row with the updates' commit
/// log entries (`log`) in another ([`WRITE_DATASETS_AND_LOG`]), sent together with COMMIT
/// ([`commit`]).
pub(super) async fn store_writes_and_commit(
    tx: Transaction<'_>,
    writes: &[&Write],
    log: &LogColumns<'_>,
    now: i64,
) -> Result<(), CallError> {
    let columns = WriteColumns::of(writes)?;
    let (upsert, write) = tokio::try_join!(
        tx.prepare_cached(UPSERT_RECORDS),
        tx.prepare_cached(WRITE_DATASETS_AND_LOG),
    )?;
    let upsert_params = columns.record_params(&now);
    let write_params = columns.dataset_params(log, &now);
    // Biased: the statements are sent in this order (the one that takes log ids last, then
    // COMMIT) and fail in order, and the first one's error is the cause (a full disk, say);
    // the next one's is only "current transaction is aborted".
    tokio::try_join!(
        biased;
        async {
            if columns.has_records() {
                tx.execute(&upsert, &upsert_params).await
            } else {
                Ok(0)
            }
        },
        async {
            if writes.is_empty() {
                Ok(0)
            } else {
                tx.execute(&write, &write_params).await
            }
        },
        commit(&tx),
    )?;
    Ok(())
}

/// Planned writes as the arrays of [`WRITE_DATASETS_AND_LOG`] and [`UPSERT_RECORDS`].
pub(super) struct WriteColumns<'a> {
    ds_ids: Vec<i64>,
    ds_counts: Vec<i64>,
    ds_records: Vec<i64>,
    ds_bytes: Vec<i64>,
    rec_ids: Vec<i64>,
    rec_keys: Vec<&'a str>,
    rec_values: Vec<Option<&'a str>>,
    rec_counts: Vec<i64>,
    rec_by: Vec<&'a str>,
    rec_devices: Vec<Option<&'a str>>,
    rec_device_times: Vec<Option<i64>>,
}

impl<'a> WriteColumns<'a> {
    pub(super) fn of(writes: &[&'a Write]) -> Result<Self, CallError> {
        let mut c = WriteColumns {
            ds_ids: Vec::new(),
            ds_counts: Vec::new(),
            ds_records: Vec::new(),
            ds_bytes: Vec::new(),
            rec_ids: Vec::new(),
            rec_keys: Vec::new(),
            rec_values: Vec::new(),
            rec_counts: Vec::new(),
            rec_by: Vec::new(),
            rec_devices: Vec::new(),
            rec_device_times: Vec::new(),
        };
        for w in writes {
            c.ds_ids.push(w.dataset_id);
            c.ds_counts.push(to_i64(w.plan.sync_count)?);
            c.ds_records.push(to_i64(w.plan.records)?);
            c.ds_bytes.push(to_i64(w.plan.bytes)?);
            for record in &w.plan.changed {
                c.rec_ids.push(w.dataset_id);
                c.rec_keys.push(record.key.as_str());
                c.rec_values.push(record.value.as_deref());
                c.rec_counts.push(to_i64(record.sync_count)?);
                c.rec_by.push(record.last_modified_by.as_str());
                c.rec_devices.push(record.device_id.as_deref());
                c.rec_device_times.push(record.device_last_modified);
            }
        }
        Ok(c)
    }

    /// Whether any record is written (an update may change only the sync count).
    pub(super) fn has_records(&self) -> bool {
        !self.rec_ids.is_empty()
    }

    /// The parameters of [`UPSERT_RECORDS`].
    pub(super) fn record_params<'p>(&'p self, now: &'p i64) -> [&'p (dyn ToSql + Sync); 8] {
        [
            &self.rec_ids,
            &self.rec_keys,
            &self.rec_values,
            &self.rec_counts,
            &self.rec_by,
            &self.rec_devices,
            &self.rec_device_times,
            now,
        ]
    }

    /// The parameters of [`WRITE_DATASETS_AND_LOG`], with the writes' entries.
    pub(super) fn dataset_params<'p>(
        &'p self,
        log: &'p LogColumns<'_>,
        now: &'p i64,
    ) -> [&'p (dyn ToSql + Sync); 14] {
        let [a, b, c, d, e, f, g, h, i] = log.arrays();
        [
            &self.ds_ids,
            &self.ds_counts,
            &self.ds_records,
            &self.ds_bytes,
            now,
            a,
            b,
            c,
            d,
            e,
            f,
            g,
            h,
            i,
        ]
    }
}

/// Inserts a placeholder row for a dataset that had none, and so holds its lock. An insert
/// racing another transaction's insert of the same row waits for it; if that one commits,
/// the insert does nothing and the row (now committed) is locked instead.
pub(super) async fn insert_or_lock_dataset(
    tx: &Transaction<'_>,
    key: &DatasetKey,
    now: i64,
) -> Result<DatasetRow, CallError> {
    let stmt = tx.prepare_cached(INSERT_DATASET).await?;
    take_create_lock(tx, key).await?;
    if let Some(row) = tx
        .query_opt(&stmt, &[&key.pool, &key.owner, &key.name, &now])
        .await?
    {
        return dataset_row(&row);
    }
    // Dataset rows are never removed, so the one that won the race is there to lock.
    lock_dataset(tx, key)
        .await?
        .ok_or_else(|| StoreError::Internal(format!("dataset row of {key} vanished")).into())
}

fn records_by_key(rows: &[Row]) -> Result<StoredRecords, CallError> {
    let mut records = StoredRecords::new();
    for row in rows {
        let record = record_from_row(row, 0)?;
        records.insert(record.key.clone(), record);
    }
    Ok(records)
}

pub(super) async fn lock_dataset(
    tx: &Transaction<'_>,
    key: &DatasetKey,
) -> Result<Option<DatasetRow>, CallError> {
    let stmt = tx.prepare_cached(LOCK_DATASET).await?;
    tx.query_opt(&stmt, &[&key.pool, &key.owner, &key.name])
        .await?
        .map(|row| dataset_row(&row))
        .transpose()
}

/// The owner's live datasets, counted under the owner's creation lock (held to the end of
/// the transaction): a creation that committed before is counted, one that has not yet
/// started waits for this transaction. The count is a separate statement from the lock so
/// that its snapshot is taken after the lock is granted.
async fn count_owned_locked(tx: &Transaction<'_>, key: &DatasetKey) -> Result<u64, CallError> {
    let (lock, count) = tokio::try_join!(
        tx.prepare_cached(LOCK_OWNER),
        tx.prepare_cached(COUNT_OWNED)
    )?;
    tx.execute(&lock, &[&OWNER_LOCK, &owner_lock_key(key)])
        .await?;
    let owned: i64 = tx
        .query_one(&count, &[&key.pool, &key.owner])
        .await?
        .try_get(0)?;
    to_u64(owned)
}

/// The second key of the owner's advisory locks: pool and owner, unambiguously joined.
fn owner_lock_key(key: &DatasetKey) -> String {
    format!("{}:{}/{}", key.pool.len(), key.pool, key.owner)
}

/// Takes [`CREATE_LOCK`] for `key`, held to the end of the transaction (a second time in
/// the same transaction is free).
pub(super) async fn take_create_lock(
    client: &impl GenericClient,
    key: &DatasetKey,
) -> Result<(), CallError> {
    let lock = client.prepare_cached(LOCK_OWNER).await?;
    client
        .execute(&lock, &[&CREATE_LOCK, &create_lock_key(key)])
        .await?;
    Ok(())
}

/// The second key of [`CREATE_LOCK`]: the dataset's key, unambiguously joined.
fn create_lock_key(key: &DatasetKey) -> String {
    format!(
        "{}:{}/{}:{}/{}",
        key.pool.len(),
        key.pool,
        key.owner.len(),
        key.owner,
        key.name
    )
}

/// The dataset's row, locked; or, when it has none, `None` with [`CREATE_LOCK`] held so
/// that none is created before the transaction ends. Either way a log entry appended next
/// chains onto the dataset's true head.
async fn lock_row_or_name(
    tx: &Transaction<'_>,
    key: &DatasetKey,
) -> Result<Option<DatasetRow>, CallError> {
    if let Some(row) = lock_dataset(tx, key).await? {
        return Ok(Some(row));
    }
    take_create_lock(tx, key).await?;
    // A statement after the lock: it sees a row created before the lock was granted.
    lock_dataset(tx, key).await
}

/// Deletes a dataset; see `Store::delete_dataset`.
pub(super) async fn delete(
    client: &mut ClientWrapper,
    key: &DatasetKey,
    actor: &str,
) -> Result<u64, CallError> {
    if actor != key.owner {
        return Err(forbidden(key, actor, "owner").into());
    }
    let tx = client.transaction().await?;
    let row = match lock_dataset(&tx, key).await? {
        Some(row) if !row.state.deleted => row,
        _ => return Err(StoreError::NotFound(format!("dataset {key}")).into()),
    };
    // Appends and commits.
    delete_locked(&tx, key, &row, actor, None).await
}

/// The live records of a dataset, ordered by key.
const LIVE_RECORDS: &str = "
    SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
           device_last_modified
    FROM records WHERE dataset_id = $1 AND value IS NOT NULL ORDER BY key";

/// The live records of a dataset whose row `tx` holds locked (so they cannot change).
pub(super) async fn live_records_locked(
    tx: &Transaction<'_>,
    dataset_id: i64,
) -> Result<Vec<tandem_protocol::Record>, CallError> {
    let stmt = tx.prepare_cached(LIVE_RECORDS).await?;
    tx.query(&stmt, &[&dataset_id])
        .await?
        .iter()
        .map(|row| record_from_row(row, 0))
        .collect()
}

/// Deletes a live dataset whose row `tx` holds locked; returns the delete's sync count.
/// Its log entry is appended here, last, with COMMIT ([`commit`]: the transaction is over
/// and the caller sends nothing more), or pushed to `deferred` for a caller that has more
/// to lock before it may append (see [`APPEND_LOG`]).
pub(super) async fn delete_locked<'a>(
    tx: &Transaction<'_>,
    key: &'a DatasetKey,
    row: &DatasetRow,
    actor: &'a str,
    deferred: Option<&mut LogColumns<'a>>,
) -> Result<u64, CallError> {
    // The log keeps the live records as they were, for history.
    let live = live_records_locked(tx, row.id).await?;
    let new_count = row.state.sync_count + 1;
    let new_count_db = to_i64(new_count)?;
    let now = now_ms();
    let (records, grants, mark, append) = tokio::try_join!(
        tx.prepare_cached(DELETE_RECORDS),
        tx.prepare_cached(DELETE_GRANTS),
        tx.prepare_cached(MARK_DELETED),
        tx.prepare_cached(APPEND_LOG),
    )?;
    let mut own = LogColumns::default();
    let append_here = deferred.is_none();
    deferred.unwrap_or(&mut own).push(
        row.id,
        key,
        LogKind::Delete,
        new_count,
        actor,
        None,
        commitlog::delete_json(&live),
    )?;
    let log_params = own.params(&now);
    let records_params: [&(dyn ToSql + Sync); 4] = [&row.id, &new_count_db, &now, &key.owner];
    let grants_params: [&(dyn ToSql + Sync); 3] = [&key.pool, &key.owner, &key.name];
    let mark_params: [&(dyn ToSql + Sync); 3] = [&row.id, &new_count_db, &now];
    // Biased, as in `store_writes_and_commit`: the first error is the cause.
    tokio::try_join!(
        biased;
        tx.execute(&records, &records_params),
        tx.execute(&grants, &grants_params),
        tx.execute(&mark, &mark_params),
        async {
            if append_here {
                tx.execute(&append, &log_params).await
            } else {
                Ok(0)
            }
        },
        async {
            if append_here {
                commit(tx).await
            } else {
                Ok(())
            }
        },
    )?;
    Ok(new_count)
}

/// Grants (or changes) access within the grant limits; the caller checked that the actor is
/// the owner. The owner's grant lock is taken before anything else, so the counts (a
/// statement after the lock, READ COMMITTED: it sees every grant committed before) cannot
/// miss a new grant racing for the last slot, which waits for this transaction. A revoke or
/// delete racing the count only makes it high for a moment. The dataset's row is locked
/// next (before the grant row, the order updates take them in) so the entry chains onto it.
pub(super) async fn grant(
    client: &mut ClientWrapper,
    limits: &Limits,
    key: &DatasetKey,
    grantee: &str,
    access: Access,
) -> Result<(), CallError> {
    let tx = client.transaction().await?;
    let (lock, count, upsert, append, append_rowless) = tokio::try_join!(
        tx.prepare_cached(LOCK_OWNER),
        tx.prepare_cached(COUNT_GRANTS),
        tx.prepare_cached(UPSERT_GRANT),
        tx.prepare_cached(APPEND_LOG),
        tx.prepare_cached(APPEND_ROWLESS_GRANT_LOG),
    )?;
    tx.execute(&lock, &[&GRANT_LOCK, &owner_lock_key(key)])
        .await?;
    let row = tx
        .query_one(&count, &[&key.pool, &key.owner, &key.name, &grantee])
        .await?;
    let counts = GrantCounts {
        exists: row.try_get::<_, i64>(0)? > 0,
        on_dataset: to_u64(row.try_get(1)?)?,
        by_owner: to_u64(row.try_get(2)?)?,
    };
    decision::check_grant(limits, key, counts)?;
    let dataset = lock_row_or_name(&tx, key).await?;
    let now = now_ms();
    let patches = commitlog::grant_json(grantee, Some(access));
    let access = access.as_str();
    let upsert_params: [&(dyn ToSql + Sync); 6] =
        [&key.pool, &key.owner, &key.name, &grantee, &access, &now];
    // The entry goes onto the row's chain, or else through `commit_log_heads`.
    let mut log = LogColumns::default();
    let rowless_patches = match &dataset {
        Some(row) => {
            log.push(
                row.id,
                key,
                LogKind::Grant,
                row.state.sync_count,
                &key.owner,
                None,
                patches,
            )?;
            String::new()
        }
        None => patches,
    };
    let log_params = log.params(&now);
    let rowless_params: [&(dyn ToSql + Sync); 5] =
        [&key.pool, &key.owner, &key.name, &now, &rowless_patches];
    // Biased, as in `store_writes_and_commit`: the first error is the cause.
    tokio::try_join!(
        biased;
        tx.execute(&upsert, &upsert_params),
        async {
            if dataset.is_some() {
                tx.execute(&append, &log_params).await
            } else {
                tx.execute(&append_rowless, &rowless_params).await
            }
        },
        commit(&tx),
    )?;
    Ok(())
}

/// A live dataset's records as a snapshot entry, read and appended under the dataset's row
/// lock (exclusive, as updates take it: the append moves the row's log head), so the entry
/// is exactly the state between the commits before and after it. `None` for a missing or deleted dataset.
pub(super) async fn log_snapshot(
    client: &mut ClientWrapper,
    key: &DatasetKey,
) -> Result<Option<i64>, CallError> {
    let tx = client.transaction().await?;
    let (lock, records, append) = tokio::try_join!(
        // Exclusive: the append moves the row's log head.
        tx.prepare_cached(
            "SELECT id, sync_count FROM datasets
             WHERE pool = $1 AND owner = $2 AND name = $3 AND NOT deleted FOR UPDATE"
        ),
        tx.prepare_cached(
            "SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
                    device_last_modified
             FROM records WHERE dataset_id = $1 AND value IS NOT NULL ORDER BY key"
        ),
        tx.prepare_cached(APPEND_LOG),
    )?;
    let Some(row) = tx
        .query_opt(&lock, &[&key.pool, &key.owner, &key.name])
        .await?
    else {
        return Ok(None);
    };
    let (id, sync_count): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
    let live = tx
        .query(&records, &[&id])
        .await?
        .iter()
        .map(|r| super::read::record_from_row(r, 0))
        .collect::<Result<Vec<_>, CallError>>()?;
    let now = now_ms();
    let mut log = LogColumns::default();
    log.push(
        id,
        key,
        LogKind::Snapshot,
        to_u64(sync_count)?,
        &key.owner,
        None,
        commitlog::snapshot_json(&live),
    )?;
    let append_params = log.params(&now);
    let (entry, ()) = tokio::try_join!(
        biased;
        tx.query_one(&append, &append_params),
        commit(&tx),
    )?;
    Ok(Some(entry.try_get(0)?))
}

/// Removes a grant; the caller checked that the actor is the owner. The dataset's row is
/// locked first (or its name's creation lock taken) so the entry chains onto its head.
pub(super) async fn revoke(
    client: &mut ClientWrapper,
    key: &DatasetKey,
    grantee: &str,
) -> Result<(), CallError> {
    let tx = client.transaction().await?;
    let (with_row, rowless) = tokio::try_join!(
        tx.prepare_cached(REVOKE_AND_LOG),
        tx.prepare_cached(REVOKE_ROWLESS_AND_LOG),
    )?;
    let dataset = lock_row_or_name(&tx, key).await?;
    let patches = commitlog::grant_json(grantee, None);
    let now = now_ms();
    let (removed, ()) = match &dataset {
        Some(row) => {
            let count = to_i64(row.state.sync_count)?;
            let params: [&(dyn ToSql + Sync); 8] = [
                &key.pool, &key.owner, &key.name, &grantee, &now, &patches, &row.id, &count,
            ];
            tokio::try_join!(biased; tx.execute(&with_row, &params), commit(&tx))?
        }
        None => {
            let params: [&(dyn ToSql + Sync); 6] =
                [&key.pool, &key.owner, &key.name, &grantee, &now, &patches];
            tokio::try_join!(biased; tx.execute(&rowless, &params), commit(&tx))?
        }
    };
    if removed == 0 {
        return Err(StoreError::NotFound(format!("grant of {key} to {grantee}")).into());
    }
    Ok(())
}
