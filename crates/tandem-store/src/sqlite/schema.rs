//! The SQLite schema and its migrations, applied in order at open and tracked in
//! `PRAGMA user_version`, so an old data directory is brought up to date in place and a
//! newer one is refused rather than misread.

use super::db_err;
use crate::StoreError;
use rusqlite::{Connection, TransactionBehavior};

/// Migration `i` takes the schema from version `i` to version `i + 1`.
///
/// Datasets keep their row (with `deleted = 1` and their sync count) after a delete, so a
/// re-created dataset continues above it. `record_count` and `byte_size` are the live
/// records' aggregates, kept up to date by every commit so limit checks never scan. Records
/// hang off the dataset row's id (which carries the pool); grants are keyed by name since
/// a grant may exist before its dataset does.
const MIGRATIONS: &[&str] = &["
CREATE TABLE datasets (
    id            INTEGER PRIMARY KEY,
    pool          TEXT    NOT NULL,
    owner         TEXT    NOT NULL,
    name          TEXT    NOT NULL,
    sync_count    INTEGER NOT NULL,
    deleted       INTEGER NOT NULL DEFAULT 0,
    record_count  INTEGER NOT NULL DEFAULT 0,
    byte_size     INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    last_modified INTEGER NOT NULL,
    UNIQUE (pool, owner, name)
);

CREATE TABLE records (
    dataset_id           INTEGER NOT NULL REFERENCES datasets (id),
    key                  TEXT    NOT NULL,
    value                TEXT,
    sync_count           INTEGER NOT NULL,
    last_modified        INTEGER NOT NULL,
    last_modified_by     TEXT    NOT NULL,
    device_id            TEXT,
    device_last_modified INTEGER,
    PRIMARY KEY (dataset_id, key)
) WITHOUT ROWID;

CREATE INDEX records_by_sync_count ON records (dataset_id, sync_count);

CREATE TABLE grants (
    pool       TEXT    NOT NULL,
    owner      TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    grantee    TEXT    NOT NULL,
    access     TEXT    NOT NULL CHECK (access IN ('read', 'write')),
    granted_at INTEGER NOT NULL,
    PRIMARY KEY (pool, owner, name, grantee)
) WITHOUT ROWID;

CREATE INDEX grants_by_grantee ON grants (pool, grantee);
"];

/// The schema version this build writes.
pub(super) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database up to `SCHEMA_VERSION`, each step in its own transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let current: i64 = tx
        .query_row("PRAGMA user_version", [], |row| row.get(0))
        .map_err(db_err)?;
    if current > SCHEMA_VERSION {
        return Err(StoreError::Internal(format!(
            "database schema version {current} is newer than this build supports \
             ({SCHEMA_VERSION})"
        )));
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current.max(0) as usize) {
        tx.execute_batch(sql).map_err(db_err)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)
            .map_err(db_err)?;
        tracing::info!(version = version + 1, "sqlite schema migrated");
    }
    tx.commit().map_err(db_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_schema_migrate_is_idempotent_and_refuses_newer() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        assert!(matches!(
            migrate(&mut conn),
            Err(StoreError::Internal(m)) if m.contains("newer")
        ));
    }
}
