//! Statements shared by the read connections and the writer: row lookups, access checks and
//! the record queries. Every statement goes through the connection's statement cache.

use super::db_err;
use crate::decision::{DatasetRow, DatasetState};
use crate::{DatasetKey, LogEntry, LogKind, Snapshot, StoreError};
use rusqlite::{Connection, OptionalExtension, Row, params};
use tandem_protocol::{Access, DatasetInfo, DatasetRef, Record};

/// The dataset's row, if it was ever written.
pub(super) fn load_dataset(
    conn: &Connection,
    key: &DatasetKey,
) -> Result<Option<DatasetRow>, StoreError> {
    conn.prepare_cached(
        "SELECT id, sync_count, deleted, record_count, byte_size FROM datasets
         WHERE pool = ?1 AND owner = ?2 AND name = ?3",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![key.pool, key.owner, key.name], |row| {
            Ok(DatasetRow {
                id: row.get(0)?,
                state: DatasetState {
                    sync_count: row.get(1)?,
                    deleted: row.get(2)?,
                    record_count: row.get(3)?,
                    byte_size: row.get(4)?,
                },
            })
        })
        .optional()
    })
    .map_err(db_err)
}

/// The identity's grant on a dataset, if any (the owner has none).
pub(super) fn grant_of(
    conn: &Connection,
    key: &DatasetKey,
    identity: &str,
) -> Result<Option<Access>, StoreError> {
    let access: Option<String> = conn
        .prepare_cached(
            "SELECT access FROM grants
             WHERE pool = ?1 AND owner = ?2 AND name = ?3 AND grantee = ?4",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![key.pool, key.owner, key.name, identity], |row| {
                row.get(0)
            })
            .optional()
        })
        .map_err(db_err)?;
    access.map(|a| parse_access(&a)).transpose()
}

/// `identity`'s access: `Owner` for the owner, else its grant.
pub(super) fn access_of(
    conn: &Connection,
    key: &DatasetKey,
    identity: &str,
) -> Result<Option<Access>, StoreError> {
    if identity == key.owner {
        return Ok(Some(Access::Owner));
    }
    grant_of(conn, key, identity)
}

pub(super) fn forbidden(key: &DatasetKey, identity: &str, needed: &'static str) -> StoreError {
    StoreError::forbidden(key, identity, needed)
}

/// `Forbidden` unless `identity` may read the dataset (any grant, or ownership).
pub(super) fn check_read(
    conn: &Connection,
    key: &DatasetKey,
    identity: &str,
) -> Result<(), StoreError> {
    match access_of(conn, key, identity)? {
        Some(_) => Ok(()),
        None => Err(forbidden(key, identity, "read")),
    }
}

/// `Forbidden` unless `identity` may write the dataset (a write grant, or ownership).
pub(super) fn check_write(
    conn: &Connection,
    key: &DatasetKey,
    identity: &str,
) -> Result<(), StoreError> {
    match access_of(conn, key, identity)? {
        Some(access) if access.can_write() => Ok(()),
        _ => Err(forbidden(key, identity, "write")),
    }
}

fn parse_access(s: &str) -> Result<Access, StoreError> {
    match Access::parse(s) {
        Some(access @ (Access::Read | Access::Write)) => Ok(access),
        _ => Err(StoreError::Internal(format!(
            "stored grant has access `{s}`"
        ))),
    }
}

fn record_from_row(row: &Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        key: row.get(0)?,
        value: row.get(1)?,
        sync_count: row.get(2)?,
        last_modified: row.get(3)?,
        last_modified_by: row.get(4)?,
        device_id: row.get(5)?,
        device_last_modified: row.get(6)?,
    })
}

/// The stored record (live or tombstone) for a key.
pub(super) fn load_record(
    conn: &Connection,
    dataset_id: i64,
    key: &str,
) -> Result<Option<Record>, StoreError> {
    conn.prepare_cached(
        "SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
                device_last_modified
         FROM records WHERE dataset_id = ?1 AND key = ?2",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![dataset_id, key], record_from_row)
            .optional()
    })
    .map_err(db_err)
}

/// Live records, ordered by key.
pub(super) fn live_records(conn: &Connection, dataset_id: i64) -> Result<Vec<Record>, StoreError> {
    conn.prepare_cached(
        "SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
                device_last_modified
         FROM records WHERE dataset_id = ?1 AND value IS NOT NULL ORDER BY key",
    )
    .and_then(|mut stmt| {
        stmt.query_map(params![dataset_id], record_from_row)?
            .collect()
    })
    .map_err(db_err)
}

/// Records (tombstones included) changed after sync count `since`, ordered by key.
fn records_since(
    conn: &Connection,
    dataset_id: i64,
    since: u64,
) -> Result<Vec<Record>, StoreError> {
    // Above i64::MAX nothing can match; clamp rather than fail the conversion.
    let since = i64::try_from(since).unwrap_or(i64::MAX);
    conn.prepare_cached(
        "SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
                device_last_modified
         FROM records WHERE dataset_id = ?1 AND sync_count > ?2 ORDER BY key",
    )
    .and_then(|mut stmt| {
        stmt.query_map(params![dataset_id, since], record_from_row)?
            .collect()
    })
    .map_err(db_err)
}

/// The whole dataset as `actor` may see it; run inside a read transaction.
pub(super) fn snapshot(
    conn: &Connection,
    key: &DatasetKey,
    actor: &str,
) -> Result<Snapshot, StoreError> {
    check_read(conn, key, actor)?;
    let (sync_count, records, deleted) = match load_dataset(conn, key)? {
        Some(row) if !row.state.deleted => {
            (row.state.sync_count, live_records(conn, row.id)?, false)
        }
        Some(row) => (row.state.sync_count, Vec::new(), true),
        None => (0, Vec::new(), false),
    };
    Ok(Snapshot {
        dataset: key.clone(),
        sync_count,
        records,
        deleted,
    })
}

/// Records changed after `since`, tombstones included; run inside a read transaction.
pub(super) fn changes(
    conn: &Connection,
    key: &DatasetKey,
    actor: &str,
    since: u64,
) -> Result<Snapshot, StoreError> {
    check_read(conn, key, actor)?;
    let (sync_count, records, deleted) = match load_dataset(conn, key)? {
        // A deleted dataset's records are tombstones: they report the deletion.
        Some(row) => (
            row.state.sync_count,
            records_since(conn, row.id, since)?,
            row.state.deleted,
        ),
        None => (0, Vec::new(), false),
    };
    Ok(Snapshot {
        dataset: key.clone(),
        sync_count,
        records,
        deleted,
    })
}

/// The identity's own live datasets and the live datasets shared with it, by owner then
/// name.
pub(super) fn list_datasets(
    conn: &Connection,
    pool: &str,
    identity: &str,
) -> Result<Vec<DatasetInfo>, StoreError> {
    let rows: Vec<(String, String, u64, u64, u64, i64, String)> = conn
        .prepare_cached(
            "SELECT owner, name, sync_count, record_count, byte_size, last_modified,
                    'owner' AS access
             FROM datasets WHERE pool = ?1 AND owner = ?2 AND deleted = 0
             UNION ALL
             SELECT d.owner, d.name, d.sync_count, d.record_count, d.byte_size,
                    d.last_modified, g.access
             FROM grants g
             JOIN datasets d ON d.pool = g.pool AND d.owner = g.owner AND d.name = g.name
             WHERE g.pool = ?1 AND g.grantee = ?2 AND d.deleted = 0
             ORDER BY 1, 2",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![pool, identity], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                    row.get(5)?,
                    row.get(6)?,
                ))
            })?
            .collect()
        })
        .map_err(db_err)?;
    rows.into_iter()
        .map(
            |(owner, name, sync_count, records, bytes, last_modified, access)| {
                let access = match access.as_str() {
                    "owner" => Access::Owner,
                    other => parse_access(other)?,
                };
                Ok(DatasetInfo {
                    dataset: DatasetRef::new(owner, name),
                    sync_count,
                    records,
                    bytes,
                    access,
                    last_modified,
                })
            },
        )
        .collect()
}

const LOG_COLUMNS: &str =
    "id, pool, owner, name, kind, sync_count, actor, device_id, server_time, patches";

fn log_entry(row: &rusqlite::Row<'_>) -> rusqlite::Result<LogEntry> {
    let kind: String = row.get(4)?;
    Ok(LogEntry {
        id: row.get(0)?,
        dataset: DatasetKey::new(
            row.get::<_, String>(1)?,
            row.get::<_, String>(2)?,
            row.get::<_, String>(3)?,
        ),
        kind: LogKind::parse(&kind).ok_or_else(|| {
            rusqlite::Error::FromSqlConversionFailure(
                4,
                rusqlite::types::Type::Text,
                format!("unknown commit log kind {kind}").into(),
            )
        })?,
        sync_count: row.get(5)?,
        actor: row.get(6)?,
        device_id: row.get(7)?,
        server_time: row.get(8)?,
        patches: row.get(9)?,
    })
}

/// The newest id of `key`'s log chain (schema version 6), if it has entries.
fn log_head(conn: &Connection, key: &DatasetKey) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached(
        "SELECT head FROM commit_log_heads WHERE pool = ?1 AND owner = ?2 AND name = ?3",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![key.pool, key.owner, key.name], |r| r.get(0))
            .optional()
    })
    .map_err(db_err)
}

/// The entry `id` and the id of its dataset's previous entry; `None` once compaction
/// dropped it (a chain ends at its first dropped entry).
pub(super) fn log_link(
    conn: &Connection,
    id: i64,
) -> Result<Option<(LogEntry, Option<i64>)>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {LOG_COLUMNS}, prev_id FROM commit_log WHERE id = ?1"
    ))
    .and_then(|mut stmt| {
        stmt.query_row(params![id], |row| Ok((log_entry(row)?, row.get(10)?)))
            .optional()
    })
    .map_err(db_err)
}

/// A dataset's entries newest first, along the chain from `next`. Ids along a chain only
/// go down and never leave the dataset, since they are never reused.
struct Chain<'c> {
    conn: &'c Connection,
    next: Option<i64>,
}

impl Chain<'_> {
    fn next(&mut self) -> Result<Option<LogEntry>, StoreError> {
        let Some(id) = self.next else {
            return Ok(None);
        };
        Ok(log_link(self.conn, id)?.map(|(entry, prev)| {
            self.next = prev;
            entry
        }))
    }
}

/// See `Store::log`: walks back to the first entry at or below `after_sync_count` (sync
/// counts never go down along a dataset's chain), then answers oldest first.
pub(super) fn log(
    conn: &Connection,
    key: &DatasetKey,
    after_sync_count: u64,
    limit: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    let mut chain = Chain {
        conn,
        next: log_head(conn, key)?,
    };
    let mut entries = Vec::new();
    while let Some(entry) = chain.next()? {
        if entry.sync_count <= after_sync_count {
            break;
        }
        entries.push(entry);
    }
    entries.reverse();
    entries.truncate(limit);
    Ok(entries)
}

/// See `Store::log_since`.
pub(super) fn log_since(
    conn: &Connection,
    after_id: i64,
    limit: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {LOG_COLUMNS} FROM commit_log WHERE id > ?1 ORDER BY id LIMIT ?2"
        ))
        .map_err(db_err)?;
    stmt.query_map(params![after_id, limit], log_entry)
        .and_then(|rows| rows.collect())
        .map_err(db_err)
}

/// See `Store::history`; run inside a read transaction. A page after the first starts
/// from the entry before `before_id` when that entry is still there and the dataset's;
/// otherwise (compacted, or not this dataset's) from the head, skipping newer ids.
pub(super) fn history(
    conn: &Connection,
    key: &DatasetKey,
    actor: &str,
    before_id: Option<i64>,
    limit: usize,
) -> Result<Vec<LogEntry>, StoreError> {
    check_read(conn, key, actor)?;
    let from_cursor = match before_id {
        Some(id) => {
            log_link(conn, id)?.and_then(|(entry, prev)| (entry.dataset == *key).then_some(prev))
        }
        None => None,
    };
    let next = match from_cursor {
        Some(prev) => prev,
        None => log_head(conn, key)?,
    };
    let before_id = before_id.unwrap_or(i64::MAX);
    let mut chain = Chain { conn, next };
    let mut entries = Vec::new();
    while entries.len() < limit {
        let Some(entry) = chain.next()? else {
            break;
        };
        if entry.id < before_id && entry.kind != LogKind::Snapshot {
            entries.push(entry);
        }
    }
    Ok(entries)
}

/// See `Store::read_at`; run inside a read transaction, so the current state and the log
/// entries undone from it are of one commit. Entries are read one at a time, newest first
/// along the dataset's chain, so memory holds the dataset and one entry.
pub(super) fn read_at(
    conn: &Connection,
    key: &DatasetKey,
    actor: &str,
    sync_count: u64,
) -> Result<Snapshot, StoreError> {
    let mut rewind = crate::commitlog::Rewind::new(snapshot(conn, key, actor)?, sync_count)?;
    let mut chain = Chain {
        conn,
        next: log_head(conn, key)?,
    };
    while rewind.wants_more() {
        let Some(entry) = chain.next()? else {
            break;
        };
        if entry.sync_count < sync_count {
            break;
        }
        if matches!(
            entry.kind,
            LogKind::Update | LogKind::Delete | LogKind::Merge
        ) {
            rewind.undo(&entry)?;
        }
    }
    rewind.finish()
}
