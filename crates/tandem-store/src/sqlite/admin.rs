//! A pool's developer views and settings in SQLite (see `crate::admin`). Reads run on a
//! read connection in one transaction; a setting is written on the writer thread, which
//! holds the only write connection, so its compare-and-swap is atomic against every other
//! write.

use super::db_err;
use crate::admin::{Expect, IdentitySummary, PoolUsage};
use crate::{StoreError, now_ms};
use rusqlite::{Connection, OptionalExtension, params};

const SUMMARY: &str = "
    SELECT i.id, i.created_at,
           max(i.created_at, coalesce((SELECT max(l.linked_at) FROM logins l
                                       WHERE l.pool = i.pool AND l.identity = i.id), 0))
    FROM identities i";

fn summaries(
    conn: &Connection,
    pool: &str,
    sql: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<IdentitySummary>, StoreError> {
    let rows: Vec<(String, i64, i64)> = conn
        .prepare_cached(sql)
        .and_then(|mut stmt| {
            stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                .collect()
        })
        .map_err(db_err)?;
    let mut providers = conn
        .prepare_cached(
            "SELECT DISTINCT provider FROM logins WHERE pool = ?1 AND identity = ?2
             ORDER BY provider",
        )
        .map_err(db_err)?;
    rows.into_iter()
        .map(|(id, created_at, last_modified)| {
            let providers = providers
                .query_map(params![pool, id], |r| r.get(0))
                .and_then(|rows| rows.collect::<Result<Vec<String>, _>>())
                .map_err(db_err)?;
            Ok(IdentitySummary {
                id,
                providers,
                created_at,
                last_modified,
            })
        })
        .collect()
}

/// See `Store::identities`.
pub(super) fn identities(
    conn: &Connection,
    pool: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<IdentitySummary>, StoreError> {
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let sql = format!(
        "{SUMMARY} WHERE i.pool = ?1 AND i.merged_into IS NULL AND i.id > ?2
         ORDER BY i.id LIMIT ?3"
    );
    summaries(conn, pool, &sql, &[&pool, &after.unwrap_or(""), &limit])
}

/// See `Store::identity_summary`.
pub(super) fn identity_summary(
    conn: &Connection,
    pool: &str,
    id: &str,
) -> Result<Option<IdentitySummary>, StoreError> {
    let sql = format!("{SUMMARY} WHERE i.pool = ?1 AND i.id = ?2 AND i.merged_into IS NULL");
    Ok(summaries(conn, pool, &sql, &[&pool, &id])?.pop())
}

/// See `Store::pool_usage`.
pub(super) fn pool_usage(conn: &Connection, pool: &str) -> Result<PoolUsage, StoreError> {
    let (datasets, bytes, last_modified): (i64, i64, Option<i64>) = conn
        .prepare_cached(
            "SELECT count(*), coalesce(sum(byte_size), 0), max(last_modified) FROM datasets
             WHERE pool = ?1 AND deleted = 0",
        )
        .and_then(|mut stmt| {
            stmt.query_row(params![pool], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        })
        .map_err(db_err)?;
    let identities: i64 = conn
        .prepare_cached("SELECT count(*) FROM identities WHERE pool = ?1 AND merged_into IS NULL")
        .and_then(|mut stmt| stmt.query_row(params![pool], |r| r.get(0)))
        .map_err(db_err)?;
    Ok(PoolUsage {
        identities: u64::try_from(identities).unwrap_or(0),
        datasets: u64::try_from(datasets).unwrap_or(0),
        bytes: u64::try_from(bytes).unwrap_or(0),
        last_modified,
    })
}

/// See `Store::pool_setting`.
pub(super) fn setting(
    conn: &Connection,
    pool: &str,
    name: &str,
) -> Result<Option<String>, StoreError> {
    conn.prepare_cached("SELECT value FROM pool_settings WHERE pool = ?1 AND name = ?2")
        .and_then(|mut stmt| stmt.query_row(params![pool, name], |r| r.get(0)).optional())
        .map_err(db_err)
}

/// A setting write, as the writer thread applies it.
#[derive(Debug)]
pub(super) struct PutSetting {
    pub pool: String,
    pub name: String,
    pub value: Option<String>,
    /// `None`: whatever it holds; `Some(v)`: exactly `v`.
    pub expect: Option<Option<String>>,
}

impl PutSetting {
    pub(super) fn new(pool: &str, name: &str, value: Option<&str>, expect: Expect<'_>) -> Self {
        PutSetting {
            pool: pool.to_owned(),
            name: name.to_owned(),
            value: value.map(str::to_owned),
            expect: match expect {
                Expect::Any => None,
                Expect::Value(v) => Some(v.map(str::to_owned)),
            },
        }
    }
}

/// See `Store::put_pool_setting`: the writer thread reads and writes with nothing between.
pub(super) fn put_setting(conn: &Connection, put: &PutSetting) -> Result<bool, StoreError> {
    if let Some(expected) = &put.expect
        && setting(conn, &put.pool, &put.name)? != *expected
    {
        return Ok(false);
    }
    match &put.value {
        Some(value) => conn
            .prepare_cached(
                "INSERT INTO pool_settings (pool, name, value, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (pool, name) DO UPDATE SET
                     value = excluded.value, updated_at = excluded.updated_at",
            )
            .and_then(|mut stmt| stmt.execute(params![put.pool, put.name, value, now_ms()])),
        None => conn
            .prepare_cached("DELETE FROM pool_settings WHERE pool = ?1 AND name = ?2")
            .and_then(|mut stmt| stmt.execute(params![put.pool, put.name])),
    }
    .map_err(db_err)?;
    Ok(true)
}
