//! Reads. Each is one statement, so the access check, the sync count and the records it
//! returns all come from one snapshot, and none takes a lock or waits for a writer.

use super::{CallError, forbidden};
use crate::{DatasetKey, LogEntry, LogKind, Snapshot, StoreError};
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::tokio_postgres::{IsolationLevel, Row};
use deadpool_postgres::{ClientWrapper, GenericClient, Transaction};
use tandem_protocol::{Access, DatasetInfo, DatasetRef, Record};

/// A dataset read: the caller's grant, the sync count and the deleted flag in the first three
/// columns (on every row; there is always at least one), then the records that pass `$filter`
/// (none when the caller may not read), ordered by key. Parameters: pool, owner, name,
/// caller, whether the caller is the owner, then the filter's own.
macro_rules! dataset_read {
    ($filter:literal) => {
        concat!(
            "WITH d AS (SELECT id, sync_count, deleted FROM datasets
                        WHERE pool = $1 AND owner = $2 AND name = $3),
                  g AS (SELECT access FROM grants
                        WHERE pool = $1 AND owner = $2 AND name = $3 AND grantee = $4)
             SELECT (SELECT access FROM g), (SELECT sync_count FROM d), (SELECT deleted FROM d),
                    r.key, r.value, r.sync_count, r.last_modified, r.last_modified_by,
                    r.device_id, r.device_last_modified
             FROM (SELECT 1) AS one
             LEFT JOIN records r
                    ON r.dataset_id = (SELECT id FROM d)
                   AND ($5 OR EXISTS (SELECT 1 FROM g))
                   AND ",
            $filter,
            "
             ORDER BY r.key"
        )
    };
}

const SNAPSHOT: &str = dataset_read!("r.value IS NOT NULL");
const CHANGES: &str = dataset_read!("r.sync_count > $6");

/// The whole dataset (live records) as `actor` may see it.
pub(super) async fn snapshot(
    client: &ClientWrapper,
    key: &DatasetKey,
    actor: &str,
) -> Result<Snapshot, CallError> {
    let is_owner = actor == key.owner;
    let stmt = client.prepare_cached(SNAPSHOT).await?;
    let rows = client
        .query(
            &stmt,
            &[&key.pool, &key.owner, &key.name, &actor, &is_owner],
        )
        .await?;
    dataset_rows(key, actor, is_owner, &rows)
}

/// Records changed after `since`, tombstones included.
pub(super) async fn changes(
    client: &ClientWrapper,
    key: &DatasetKey,
    actor: &str,
    since: u64,
) -> Result<Snapshot, CallError> {
    let is_owner = actor == key.owner;
    // Above i64::MAX nothing can match; clamp rather than fail the conversion.
    let since = i64::try_from(since).unwrap_or(i64::MAX);
    let stmt = client.prepare_cached(CHANGES).await?;
    let rows = client
        .query(
            &stmt,
            &[&key.pool, &key.owner, &key.name, &actor, &is_owner, &since],
        )
        .await?;
    dataset_rows(key, actor, is_owner, &rows)
}

fn dataset_rows(
    key: &DatasetKey,
    actor: &str,
    is_owner: bool,
    rows: &[Row],
) -> Result<Snapshot, CallError> {
    let Some(first) = rows.first() else {
        return Err(StoreError::Internal("dataset read returned no row".into()).into());
    };
    let grant: Option<String> = first.try_get(0)?;
    if !is_owner && grant.is_none() {
        return Err(forbidden(key, actor, "read").into());
    }
    let sync_count = to_u64(first.try_get::<_, Option<i64>>(1)?.unwrap_or(0))?;
    let deleted = first.try_get::<_, Option<bool>>(2)?.unwrap_or(false);
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        if row.try_get::<_, Option<&str>>(3)?.is_some() {
            records.push(record_from_row(row, 3)?);
        }
    }
    Ok(Snapshot {
        dataset: key.clone(),
        sync_count,
        records,
        deleted,
    })
}

/// `identity`'s access: `Owner` for the owner, else its grant; on a pooled client or in a
/// transaction.
pub(super) async fn access_of<C: GenericClient>(
    client: &C,
    key: &DatasetKey,
    identity: &str,
) -> Result<Option<Access>, CallError> {
    if identity == key.owner {
        return Ok(Some(Access::Owner));
    }
    let stmt = client
        .prepare_cached(
            "SELECT access FROM grants
             WHERE pool = $1 AND owner = $2 AND name = $3 AND grantee = $4",
        )
        .await?;
    let row = client
        .query_opt(&stmt, &[&key.pool, &key.owner, &key.name, &identity])
        .await?;
    match row {
        Some(row) => Ok(Some(parse_access(row.try_get(0)?)?)),
        None => Ok(None),
    }
}

/// The identity's own live datasets and the live datasets shared with it, by owner then
/// name.
pub(super) async fn list_datasets(
    client: &ClientWrapper,
    pool: &str,
    identity: &str,
) -> Result<Vec<DatasetInfo>, CallError> {
    let stmt = client
        .prepare_cached(
            r#"SELECT owner, name, sync_count, record_count, byte_size, last_modified, access
               FROM (
                   SELECT owner, name, sync_count, record_count, byte_size, last_modified,
                          'owner' AS access
                   FROM datasets WHERE pool = $1 AND owner = $2 AND NOT deleted
                   UNION ALL
                   SELECT d.owner, d.name, d.sync_count, d.record_count, d.byte_size,
                          d.last_modified, g.access
                   FROM grants g
                   JOIN datasets d ON d.pool = g.pool AND d.owner = g.owner AND d.name = g.name
                   WHERE g.pool = $1 AND g.grantee = $2 AND NOT d.deleted
               ) AS listed
               ORDER BY owner COLLATE "C", name COLLATE "C""#,
        )
        .await?;
    let rows = client.query(&stmt, &[&pool, &identity]).await?;
    rows.iter()
        .map(|row| {
            let access: &str = row.try_get(6)?;
            let access = match access {
                "owner" => Access::Owner,
                other => parse_access(other)?,
            };
            Ok(DatasetInfo {
                dataset: DatasetRef::new(
                    row.try_get::<_, String>(0)?,
                    row.try_get::<_, String>(1)?,
                ),
                sync_count: to_u64(row.try_get(2)?)?,
                records: to_u64(row.try_get(3)?)?,
                bytes: to_u64(row.try_get(4)?)?,
                access,
                last_modified: row.try_get(5)?,
            })
        })
        .collect()
}

/// A record from `row`'s columns `at..at + 7`: key, value, sync count, last modified, last
/// modified by, device id, device last modified.
pub(super) fn record_from_row(row: &Row, at: usize) -> Result<Record, CallError> {
    Ok(Record {
        key: row.try_get(at)?,
        value: row.try_get(at + 1)?,
        sync_count: to_u64(row.try_get(at + 2)?)?,
        last_modified: row.try_get(at + 3)?,
        last_modified_by: row.try_get(at + 4)?,
        device_id: row.try_get(at + 5)?,
        device_last_modified: row.try_get(at + 6)?,
    })
}

fn parse_access(s: &str) -> Result<Access, CallError> {
    match Access::parse(s) {
        Some(access @ (Access::Read | Access::Write)) => Ok(access),
        _ => Err(StoreError::Internal(format!("stored grant has access `{s}`")).into()),
    }
}

/// A stored count (never negative: the schema checks it).
pub(super) fn to_u64(n: i64) -> Result<u64, CallError> {
    u64::try_from(n)
        .map_err(|_| StoreError::Internal(format!("stored count {n} is negative")).into())
}

/// A count to store.
pub(super) fn to_i64(n: u64) -> Result<i64, CallError> {
    i64::try_from(n)
        .map_err(|_| StoreError::Internal(format!("count {n} is too large to store")).into())
}

const LOG_COLUMNS: &str =
    "id, pool, owner, name, kind, sync_count, actor, device_id, server_time, patches";

fn log_entry(row: &Row) -> Result<LogEntry, CallError> {
    let kind: String = row.try_get(4)?;
    Ok(LogEntry {
        id: row.try_get(0)?,
        dataset: DatasetKey::new(
            row.try_get::<_, String>(1)?,
            row.try_get::<_, String>(2)?,
            row.try_get::<_, String>(3)?,
        ),
        kind: LogKind::parse(&kind)
            .ok_or_else(|| StoreError::Internal(format!("unknown commit log kind {kind}")))?,
        sync_count: to_u64(row.try_get(5)?)?,
        actor: row.try_get(6)?,
        device_id: row.try_get(7)?,
        server_time: row.try_get(8)?,
        patches: row.try_get(9)?,
    })
}

/// Walks a dataset's entries newest first along its chain (schema versions 8 and 9): from
/// the entry `$1`, or if null from the head of the dataset `$6`, `$7`, `$8` (its row's
/// `log_head`, or `commit_log_heads` for a name without a row; in the same statement, so
/// head and walk are of one snapshot), while their sync count is at least
/// `$2`, with ids below `$3`, leaving out replay snapshots if `$4`, at most `$5`.
/// PostgreSQL evaluates a recursive query only as far as its reader fetches, so a page
/// walks only about as many links as it answers. Each row ends with its `prev_id`, where
/// the next page starts. The walk goes on past grants and revokes whatever their sync
/// count: under schema version 8 theirs was the dataset's as their statement's snapshot saw
/// it, taken before the statement waited for the log counter, so it can be below that of an
/// update just before them on the chain (since version 9 they hold the dataset's row, as
/// updates, deletes and merges do, so counts only go up along the chain).
const CHAIN: &str = "
    WITH RECURSIVE chain AS (
        SELECT id, pool, owner, name, kind, sync_count, actor, device_id, server_time,
               patches, prev_id
        FROM commit_log
        WHERE id = coalesce($1::bigint,
                            (SELECT log_head FROM datasets
                             WHERE pool = $6 AND owner = $7 AND name = $8),
                            (SELECT head FROM commit_log_heads
                             WHERE pool = $6 AND owner = $7 AND name = $8))
          AND (sync_count >= $2 OR kind IN ('grant', 'revoke'))
        UNION ALL
        SELECT c.id, c.pool, c.owner, c.name, c.kind, c.sync_count, c.actor, c.device_id,
               c.server_time, c.patches, c.prev_id
        FROM chain JOIN commit_log c ON c.id = chain.prev_id
        WHERE c.sync_count >= $2 OR c.kind IN ('grant', 'revoke')
    )
    SELECT * FROM chain
    WHERE sync_count >= $2 AND id < $3 AND NOT ($4 AND kind = 'snapshot')
    LIMIT $5";

/// Where a walk along a dataset's chain is (`from: None`: at its head), and what it keeps.
struct Walk<'k> {
    from: Option<i64>,
    dataset: &'k DatasetKey,
    min_sync_count: i64,
    below: i64,
    skip_snapshots: bool,
}

impl Walk<'_> {
    /// The next page of up to `limit` entries (newest first), and where the walk goes on
    /// (`None` at the chain's end, or when the page was short).
    async fn page(
        &self,
        client: &impl GenericClient,
        limit: i64,
    ) -> Result<(Vec<LogEntry>, Option<i64>), CallError> {
        let stmt = client.prepare_cached(CHAIN).await?;
        let key = self.dataset;
        let params: [&(dyn ToSql + Sync); 8] = [
            &self.from,
            &self.min_sync_count,
            &self.below,
            &self.skip_snapshots,
            &limit,
            &key.pool,
            &key.owner,
            &key.name,
        ];
        let rows = client.query(&stmt, &params).await?;
        let next = match rows.last() {
            Some(last) if rows.len() as i64 == limit => last.try_get::<_, Option<i64>>(10)?,
            _ => None,
        };
        let entries = rows.iter().map(log_entry).collect::<Result<_, _>>()?;
        Ok((entries, next))
    }
}

/// See `Store::log`: walks back to the first entry at or below `after_sync_count` (sync
/// counts never go down along a dataset's chain), then answers oldest first.
pub(super) async fn log(
    client: &impl GenericClient,
    key: &DatasetKey,
    after_sync_count: u64,
    limit: usize,
) -> Result<Vec<LogEntry>, CallError> {
    let walk = Walk {
        from: None,
        dataset: key,
        min_sync_count: to_i64(after_sync_count)?.saturating_add(1),
        below: i64::MAX,
        skip_snapshots: false,
    };
    let mut entries = walk.page(client, i64::MAX).await?.0;
    entries.reverse();
    entries.truncate(limit);
    Ok(entries)
}

/// See `Store::log_since`.
pub(super) async fn log_since(
    client: &ClientWrapper,
    after_id: i64,
    limit: usize,
) -> Result<Vec<LogEntry>, CallError> {
    let stmt = client
        .prepare_cached(&format!(
            "SELECT {LOG_COLUMNS} FROM commit_log WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = client.query(&stmt, &[&after_id, &limit]).await?;
    rows.iter().map(log_entry).collect()
}

/// A read-only transaction whose statements all read one snapshot, for a read that takes
/// more than one statement.
async fn one_snapshot(client: &mut ClientWrapper) -> Result<Transaction<'_>, CallError> {
    Ok(client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

/// The whole dataset as `actor` may see it, in `tx`.
async fn snapshot_in(
    tx: &Transaction<'_>,
    key: &DatasetKey,
    actor: &str,
) -> Result<Snapshot, CallError> {
    let is_owner = actor == key.owner;
    let stmt = tx.prepare_cached(SNAPSHOT).await?;
    let rows = tx
        .query(
            &stmt,
            &[&key.pool, &key.owner, &key.name, &actor, &is_owner],
        )
        .await?;
    dataset_rows(key, actor, is_owner, &rows)
}

/// See `Store::history`. A page after the first starts from the entry before `before_id`
/// when that entry is still there and the dataset's; otherwise (compacted, or not this
/// dataset's) from the head, skipping newer ids.
pub(super) async fn history(
    client: &mut ClientWrapper,
    key: &DatasetKey,
    actor: &str,
    before_id: Option<i64>,
    limit: usize,
) -> Result<Vec<LogEntry>, CallError> {
    let tx = one_snapshot(client).await?;
    if access_of(&tx, key, actor).await?.is_none() {
        return Err(forbidden(key, actor, "read").into());
    }
    let from_cursor = match before_id {
        Some(id) => {
            let stmt = tx
                .prepare_cached("SELECT pool, owner, name, prev_id FROM commit_log WHERE id = $1")
                .await?;
            match tx.query_opt(&stmt, &[&id]).await? {
                Some(row)
                    if row.try_get::<_, &str>(0)? == key.pool
                        && row.try_get::<_, &str>(1)? == key.owner
                        && row.try_get::<_, &str>(2)? == key.name =>
                {
                    Some(row.try_get::<_, Option<i64>>(3)?)
                }
                _ => None,
            }
        }
        None => None,
    };
    let entries = match from_cursor {
        // The cursor's entry began the chain.
        Some(None) => Vec::new(),
        from => {
            let walk = Walk {
                from: from.flatten(),
                dataset: key,
                min_sync_count: 0,
                below: before_id.unwrap_or(i64::MAX),
                skip_snapshots: true,
            };
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            walk.page(&tx, limit).await?.0
        }
    };
    tx.commit().await?;
    Ok(entries)
}

/// Log entries `read_at` undoes per round trip: memory holds the dataset and one page.
const REWIND_PAGE: i64 = 64;

/// See `Store::read_at`: the current state and the log entries undone from it are read in
/// one snapshot, the entries newest first along the dataset's chain a page at a time.
pub(super) async fn read_at(
    client: &mut ClientWrapper,
    key: &DatasetKey,
    actor: &str,
    sync_count: u64,
) -> Result<Snapshot, CallError> {
    let tx = one_snapshot(client).await?;
    let mut rewind =
        crate::commitlog::Rewind::new(snapshot_in(&tx, key, actor).await?, sync_count)?;
    let mut walk = Walk {
        from: None,
        dataset: key,
        min_sync_count: to_i64(sync_count)?,
        below: i64::MAX,
        skip_snapshots: false,
    };
    let mut more = rewind.wants_more();
    while more {
        let (entries, then) = walk.page(&tx, REWIND_PAGE).await?;
        more = then.is_some();
        walk.from = then;
        for entry in &entries {
            if matches!(
                entry.kind,
                LogKind::Update | LogKind::Delete | LogKind::Merge
            ) {
                rewind.undo(entry)?;
            }
            if !rewind.wants_more() {
                more = false;
                break;
            }
        }
    }
    tx.commit().await?;
    Ok(rewind.finish()?)
}
