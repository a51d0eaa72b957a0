//! The change stream's consumers and dead letters (see `crate::stream`). Writes run on the
//! writer thread, which holds the only write connection, so each is atomic against every
//! other: two callers racing for a lease are applied one after the other.

use super::db_err;
use crate::{DatasetKey, DeadLetter, StoreError, StreamConsumer};
use rusqlite::{Connection, OptionalExtension, params};

/// See `Store::stream_lease`. The upsert takes the lease only where it is free, expired or
/// `node`'s own; `RETURNING` gives no row when another node keeps it.
pub(super) fn lease(
    conn: &Connection,
    consumer: &str,
    node: &str,
    now: i64,
    ttl: i64,
) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached(
        "INSERT INTO stream_consumers (name, position, lease_holder, lease_until)
         VALUES (?1, (SELECT coalesce(max(id), 0) FROM commit_log), ?2, ?3)
         ON CONFLICT (name) DO UPDATE SET
             lease_holder = excluded.lease_holder,
             lease_until = excluded.lease_until
         WHERE lease_holder IS NULL OR lease_holder = excluded.lease_holder
               OR lease_until <= ?4
         RETURNING position",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![consumer, node, now.saturating_add(ttl), now], |r| {
            r.get(0)
        })
        .optional()
    })
    .map_err(db_err)
}

/// See `Store::stream_ack`.
pub(super) fn ack(
    conn: &Connection,
    consumer: &str,
    node: &str,
    position: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let held = conn
        .prepare_cached(
            "UPDATE stream_consumers SET position = max(position, ?3)
             WHERE name = ?1 AND lease_holder = ?2 AND lease_until > ?4",
        )
        .and_then(|mut stmt| stmt.execute(params![consumer, node, position, now]))
        .map_err(db_err)?;
    Ok(held > 0)
}

/// See `Store::stream_release`.
pub(super) fn release(conn: &Connection, consumer: &str, node: &str) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE stream_consumers SET lease_holder = NULL, lease_until = 0
         WHERE name = ?1 AND lease_holder = ?2",
    )
    .and_then(|mut stmt| stmt.execute(params![consumer, node]))
    .map_err(db_err)?;
    Ok(())
}

/// See `Store::stream_forget`.
pub(super) fn forget(conn: &Connection, consumer: &str) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM stream_dead_letters WHERE consumer = ?1")
        .and_then(|mut stmt| stmt.execute(params![consumer]))
        .map_err(db_err)?;
    let removed = conn
        .prepare_cached("DELETE FROM stream_consumers WHERE name = ?1")
        .and_then(|mut stmt| stmt.execute(params![consumer]))
        .map_err(db_err)?;
    Ok(removed > 0)
}

/// See `Store::stream_dead_letter`: the letters, then the oldest beyond `max` go.
pub(super) fn dead_letter(
    conn: &Connection,
    consumer: &str,
    letters: &[DeadLetter],
    max: u64,
) -> Result<(), StoreError> {
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO stream_dead_letters (consumer, entry_id, event, error, attempts, time)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)
             ON CONFLICT (consumer, entry_id) DO UPDATE SET
                 event = excluded.event, error = excluded.error,
                 attempts = excluded.attempts, time = excluded.time",
        )
        .map_err(db_err)?;
    for l in letters {
        insert
            .execute(params![
                consumer, l.entry_id, l.event, l.error, l.attempts, l.time
            ])
            .map_err(db_err)?;
    }
    let max = i64::try_from(max).unwrap_or(i64::MAX);
    conn.prepare_cached(
        "DELETE FROM stream_dead_letters WHERE consumer = ?1 AND entry_id <= (
             SELECT entry_id FROM stream_dead_letters WHERE consumer = ?1
             ORDER BY entry_id DESC LIMIT 1 OFFSET ?2)",
    )
    .and_then(|mut stmt| stmt.execute(params![consumer, max]))
    .map_err(db_err)?;
    Ok(())
}

/// See `Store::stream_consumers`.
pub(super) fn consumers(conn: &Connection) -> Result<Vec<StreamConsumer>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT name, position, lease_holder, lease_until FROM stream_consumers
             ORDER BY name",
        )
        .map_err(db_err)?;
    stmt.query_map([], |r| {
        Ok(StreamConsumer {
            name: r.get(0)?,
            position: r.get(1)?,
            lease_holder: r.get(2)?,
            lease_until: r.get(3)?,
        })
    })
    .and_then(|rows| rows.collect())
    .map_err(db_err)
}

/// See `Store::stream_dead_letters`.
pub(super) fn dead_letters(
    conn: &Connection,
    consumer: &str,
    after_id: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut stmt = conn
        .prepare_cached(
            "SELECT entry_id, event, error, attempts, time FROM stream_dead_letters
             WHERE consumer = ?1 AND entry_id > ?2 ORDER BY entry_id LIMIT ?3",
        )
        .map_err(db_err)?;
    stmt.query_map(params![consumer, after_id, limit], |r| {
        Ok(DeadLetter {
            entry_id: r.get(0)?,
            event: r.get(1)?,
            error: r.get(2)?,
            attempts: r.get(3)?,
            time: r.get(4)?,
        })
    })
    .and_then(|rows| rows.collect())
    .map_err(db_err)
}

/// See `Store::log_head`.
pub(super) fn log_head(conn: &Connection) -> Result<i64, StoreError> {
    conn.prepare_cached("SELECT coalesce(max(id), 0) FROM commit_log")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(db_err)
}

/// See `Store::datasets_after`. SQLite compares text bytewise, as PostgreSQL's "C"
/// collation does, so both walk in the same order.
pub(super) fn datasets_after(
    conn: &Connection,
    after: Option<&DatasetKey>,
    limit: usize,
) -> Result<Vec<(DatasetKey, u64)>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let (pool, owner, name) = after.map_or(("", "", ""), |k| {
        (k.pool.as_str(), k.owner.as_str(), k.name.as_str())
    });
    // Every key is above ('', '', '') except that one, which no dataset has.
    let mut stmt = conn
        .prepare_cached(
            "SELECT pool, owner, name, sync_count FROM datasets
             WHERE deleted = 0 AND (pool, owner, name) > (?1, ?2, ?3)
             ORDER BY pool, owner, name LIMIT ?4",
        )
        .map_err(db_err)?;
    stmt.query_map(params![pool, owner, name, limit], |r| {
        Ok((
            DatasetKey::new(
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ),
            r.get(3)?,
        ))
    })
    .and_then(|rows| rows.collect())
    .map_err(db_err)
}
