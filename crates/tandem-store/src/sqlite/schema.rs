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
///
/// Version 2 adds identities, the logins linked to them (a login names one identity per
/// pool) and a dataset's `merge_root`: the name of the dataset a merged copy was made
/// beside, kept until the copy is deleted (see `crate::identity`).
///
/// Version 3 adds a dataset's `last_deleted_sync_count`: the sync count of its last delete,
/// kept when it is re-created (Cognito's `DatasetDeletedAfterRequestedSyncCount`).
///
/// Version 4 adds the commit log (see `crate::commitlog`), keyed by dataset name since a
/// grant may precede its dataset and entries outlive a delete. Ids are rowids, which
/// SQLite never reuses while the newest row stays, and compaction always keeps it, so a
/// consumer's position stays valid (AUTOINCREMENT and an index on time cost pages in every
/// group commit). Commits before the upgrade have no entries.
///
/// Version 5 adds the change stream's consumers (their position in the log and the
/// delivery lease) and their dead letters (see `crate::stream`).
///
/// Version 6 replaces the log's per-dataset index by a chain: each entry keeps the id of
/// its dataset's previous entry, and `commit_log_heads` the newest id and the entry count
/// per dataset. The index on three strings took a random leaf page per busy dataset in
/// every group commit, 45 % of the saturated write throughput (docs/BENCHMARKS.md); the
/// heads row is one small row per dataset. History walks the chain newest first, which is
/// the order every reader wants.
///
/// Version 7 adds a pool's settings, named values every node reads (see `crate::admin`).
const MIGRATIONS: &[&str] = &[
    "
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
",
    "
ALTER TABLE datasets ADD COLUMN merge_root TEXT;

CREATE INDEX datasets_by_merge_root ON datasets (pool, owner, merge_root)
    WHERE merge_root IS NOT NULL;

CREATE TABLE identities (
    pool        TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    guest       INTEGER NOT NULL,
    merged_into TEXT,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (pool, id)
) WITHOUT ROWID;

CREATE TABLE logins (
    pool      TEXT    NOT NULL,
    provider  TEXT    NOT NULL,
    subject   TEXT    NOT NULL,
    identity  TEXT    NOT NULL,
    linked_at INTEGER NOT NULL,
    PRIMARY KEY (pool, provider, subject)
) WITHOUT ROWID;

CREATE INDEX logins_by_identity ON logins (pool, identity);
",
    "
ALTER TABLE datasets ADD COLUMN last_deleted_sync_count INTEGER NOT NULL DEFAULT 0;

UPDATE datasets SET last_deleted_sync_count = sync_count WHERE deleted = 1;
",
    "
CREATE TABLE commit_log (
    id          INTEGER PRIMARY KEY,
    pool        TEXT    NOT NULL,
    owner       TEXT    NOT NULL,
    name        TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    sync_count  INTEGER NOT NULL,
    actor       TEXT    NOT NULL,
    device_id   TEXT,
    server_time INTEGER NOT NULL,
    patches     TEXT    NOT NULL
);

CREATE INDEX commit_log_by_dataset ON commit_log (pool, owner, name, id);
",
    "
CREATE TABLE stream_consumers (
    name         TEXT    PRIMARY KEY,
    position     INTEGER NOT NULL,
    lease_holder TEXT,
    lease_until  INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

CREATE TABLE stream_dead_letters (
    consumer TEXT    NOT NULL,
    entry_id INTEGER NOT NULL,
    event    TEXT    NOT NULL,
    error    TEXT    NOT NULL,
    attempts INTEGER NOT NULL,
    time     INTEGER NOT NULL,
    PRIMARY KEY (consumer, entry_id)
) WITHOUT ROWID;
",
    "
ALTER TABLE commit_log ADD COLUMN prev_id INTEGER;

CREATE TABLE commit_log_heads (
    pool    TEXT    NOT NULL,
    owner   TEXT    NOT NULL,
    name    TEXT    NOT NULL,
    head    INTEGER NOT NULL,
    entries INTEGER NOT NULL,
    PRIMARY KEY (pool, owner, name)
) WITHOUT ROWID;

UPDATE commit_log SET prev_id = (
    SELECT max(p.id) FROM commit_log p
    WHERE p.pool = commit_log.pool AND p.owner = commit_log.owner
      AND p.name = commit_log.name AND p.id < commit_log.id);

INSERT INTO commit_log_heads (pool, owner, name, head, entries)
    SELECT pool, owner, name, max(id), count(*) FROM commit_log GROUP BY pool, owner, name;

DROP INDEX commit_log_by_dataset;
",
    "
CREATE TABLE pool_settings (
    pool       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    value      TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (pool, name)
) WITHOUT ROWID;
",
];

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

    #[test]
    fn test_schema_migrate_upgrades_a_version_1_database_in_place() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO datasets (pool, owner, name, sync_count, created_at, last_modified)
             VALUES ('default', 'u', 'd', 7, 0, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let (count, root): (i64, Option<String>) = conn
            .query_row("SELECT sync_count, merge_root FROM datasets", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((count, root), (7, None));
        let identities: i64 = conn
            .query_row("SELECT count(*) FROM identities", [], |r| r.get(0))
            .unwrap();
        assert_eq!(identities, 0);
    }

    #[test]
    fn test_schema_migrate_adds_the_commit_log_to_a_version_3_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute(
            "INSERT INTO datasets (pool, owner, name, sync_count, created_at, last_modified)
             VALUES ('default', 'u', 'd', 7, 0, 0)",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let count: i64 = conn
            .query_row("SELECT sync_count FROM datasets", [], |r| r.get(0))
            .unwrap();
        assert_eq!(count, 7);
        let entries: i64 = conn
            .query_row("SELECT count(*) FROM commit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(entries, 0);
    }

    #[test]
    fn test_schema_migrate_adds_stream_consumers_to_a_version_4_database() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..4] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 4).unwrap();
        conn.execute(
            "INSERT INTO commit_log (pool, owner, name, kind, sync_count, actor, server_time,
                                     patches)
             VALUES ('default', 'u', 'd', 'update', 1, 'u', 0, '[]')",
            [],
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let entries: i64 = conn
            .query_row("SELECT count(*) FROM commit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(entries, 1);
        let consumers: i64 = conn
            .query_row(
                "SELECT count(*) FROM stream_consumers, stream_dead_letters",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(consumers, 0);
    }

    #[test]
    fn test_schema_migrate_chains_a_version_5_commit_log() {
        let mut conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 9)
             INSERT INTO commit_log (pool, owner, name, kind, sync_count, actor, server_time,
                                     patches)
             SELECT 'default', 'u', 'd' || (i % 2), 'update', i, 'u', 0, '[]' FROM n;",
        )
        .unwrap();
        migrate(&mut conn).unwrap();
        let links: Vec<(i64, Option<i64>)> = conn
            .prepare("SELECT id, prev_id FROM commit_log ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let expected: Vec<(i64, Option<i64>)> =
            (1..=9).map(|id| (id, (id > 2).then_some(id - 2))).collect();
        assert_eq!(links, expected);
        let heads: Vec<(String, i64, i64)> = conn
            .prepare("SELECT name, head, entries FROM commit_log_heads ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(heads, [("d0".to_owned(), 8, 4), ("d1".to_owned(), 9, 5)]);
    }
}
