//! Export and import for SQLite (see `crate::dump`). The export reads on its own connection
//! in one read transaction (WAL gives it a snapshot, and the writer goes on meanwhile, but
//! the WAL cannot be checkpointed past that snapshot until the export ends). An import batch
//! is a writer command, so it commits like any write, with its progress in the table
//! `import_progress`, which the first batch creates: it belongs to the import, not the
//! schema's migrations.

use super::{db_err, open_reader};
use crate::dump::{
    ApplyState, BatchOutcome, DUMP_DATASETS, DUMP_GRANTS, DUMP_IDENTITIES, DUMP_LOGINS,
    DUMP_READ_AHEAD, DUMP_SETTINGS, DumpDataset, DumpGrant, DumpIdentity, DumpItem, DumpLogin,
    DumpRecord, DumpSetting, DumpStream, GrantAccess, ImportBatch, ImportProgress, ImportStatus,
    in_step, live_bytes, progress_from_json, progress_json,
};
use crate::{DatasetKey, StoreError};
use rusqlite::{Connection, OptionalExtension, Row, params};
use std::collections::HashMap;
use std::path::Path;
use tokio::sync::mpsc;

const PROGRESS_TABLE: &str = "CREATE TABLE IF NOT EXISTS import_progress (
    only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
    state    TEXT    NOT NULL
)";

/// Starts the export thread on a read connection of its own.
pub(super) fn spawn_dump(path: &Path) -> Result<DumpStream, StoreError> {
    let conn = open_reader(path)?;
    let (items_tx, items_rx) = mpsc::channel(DUMP_READ_AHEAD);
    std::thread::Builder::new()
        .name("tandem-sqlite-dump".into())
        .spawn(move || {
            let mut conn = conn;
            if let Err(e) = dump_all(&mut conn, &items_tx) {
                let _ = items_tx.blocking_send(Err(e));
            }
        })
        .map_err(|e| StoreError::Internal(format!("cannot start the dump thread: {e}")))?;
    Ok(items_rx)
}

/// Sends every item; stops early (Ok) when the receiver is gone.
fn dump_all(
    conn: &mut Connection,
    items_tx: &mpsc::Sender<Result<DumpItem, StoreError>>,
) -> Result<(), StoreError> {
    let tx = conn.transaction().map_err(db_err)?;
    let send = |item: DumpItem| items_tx.blocking_send(Ok(item)).is_ok();
    let mut stmt = tx.prepare(DUMP_IDENTITIES).map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
        let item = DumpIdentity {
            pool: row.get(0).map_err(db_err)?,
            id: row.get(1).map_err(db_err)?,
            guest: row.get(2).map_err(db_err)?,
            merged_into: row.get(3).map_err(db_err)?,
            created_at: row.get(4).map_err(db_err)?,
        };
        if !send(DumpItem::Identity(item)) {
            return Ok(());
        }
    }
    drop(rows);
    drop(stmt);
    let mut stmt = tx.prepare(DUMP_LOGINS).map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
        let item = DumpLogin {
            pool: row.get(0).map_err(db_err)?,
            provider: row.get(1).map_err(db_err)?,
            subject: row.get(2).map_err(db_err)?,
            identity: row.get(3).map_err(db_err)?,
            linked_at: row.get(4).map_err(db_err)?,
        };
        if !send(DumpItem::Login(item)) {
            return Ok(());
        }
    }
    drop(rows);
    drop(stmt);
    let mut stmt = tx.prepare(DUMP_DATASETS).map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    let mut current: Option<DatasetKey> = None;
    while let Some(row) = rows.next().map_err(db_err)? {
        let dataset = dataset_of(row).map_err(db_err)?;
        let key = dataset.key();
        if current.as_ref() != Some(&key) {
            current = Some(key.clone());
            if !send(DumpItem::Dataset(dataset)) {
                return Ok(());
            }
        }
        if let Some(record) = record_of(row).map_err(db_err)?
            && !send(DumpItem::Record {
                dataset: key,
                record,
            })
        {
            return Ok(());
        }
    }
    drop(rows);
    drop(stmt);
    let mut stmt = tx.prepare(DUMP_GRANTS).map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
        let access: String = row.get(4).map_err(db_err)?;
        let item = DumpGrant {
            pool: row.get(0).map_err(db_err)?,
            owner: row.get(1).map_err(db_err)?,
            name: row.get(2).map_err(db_err)?,
            grantee: row.get(3).map_err(db_err)?,
            access: GrantAccess::parse(&access)?,
            granted_at: row.get(5).map_err(db_err)?,
        };
        if !send(DumpItem::Grant(item)) {
            return Ok(());
        }
    }
    drop(rows);
    drop(stmt);
    let mut stmt = tx.prepare(DUMP_SETTINGS).map_err(db_err)?;
    let mut rows = stmt.query([]).map_err(db_err)?;
    while let Some(row) = rows.next().map_err(db_err)? {
        let item = DumpSetting {
            pool: row.get(0).map_err(db_err)?,
            name: row.get(1).map_err(db_err)?,
            value: row.get(2).map_err(db_err)?,
            updated_at: row.get(3).map_err(db_err)?,
        };
        if !send(DumpItem::Setting(item)) {
            return Ok(());
        }
    }
    Ok(())
}

fn dataset_of(row: &Row<'_>) -> rusqlite::Result<DumpDataset> {
    Ok(DumpDataset {
        pool: row.get(0)?,
        owner: row.get(1)?,
        name: row.get(2)?,
        sync_count: row.get::<_, i64>(3)?.max(0) as u64,
        deleted: row.get(4)?,
        last_deleted_sync_count: row.get::<_, i64>(5)?.max(0) as u64,
        merge_root: row.get(6)?,
        created_at: row.get(7)?,
        last_modified: row.get(8)?,
    })
}

fn record_of(row: &Row<'_>) -> rusqlite::Result<Option<DumpRecord>> {
    let Some(key) = row.get::<_, Option<String>>(9)? else {
        return Ok(None);
    };
    Ok(Some(DumpRecord {
        key,
        value: row.get(10)?,
        sync_count: row.get::<_, i64>(11)?.max(0) as u64,
        last_modified: row.get(12)?,
        last_modified_by: row.get(13)?,
        device_id: row.get(14)?,
        device_last_modified: row.get(15)?,
    }))
}

/// Whether the store holds data, and the held import progress.
pub(super) fn status(conn: &Connection) -> Result<ImportStatus, StoreError> {
    let data: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM identities) OR EXISTS (SELECT 1 FROM logins)
                 OR EXISTS (SELECT 1 FROM datasets) OR EXISTS (SELECT 1 FROM grants)
                 OR EXISTS (SELECT 1 FROM pool_settings)",
            [],
            |row| row.get(0),
        )
        .map_err(db_err)?;
    let table: bool = conn
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master
                            WHERE type = 'table' AND name = 'import_progress')",
            [],
            |row| row.get(0),
        )
        .map_err(db_err)?;
    let progress = if table { held(conn)? } else { None };
    Ok(ImportStatus {
        empty: !data,
        progress,
    })
}

fn held(conn: &Connection) -> Result<Option<ImportProgress>, StoreError> {
    conn.query_row("SELECT state FROM import_progress", [], |row| {
        row.get::<_, String>(0)
    })
    .optional()
    .map_err(db_err)?
    .map(|text| progress_from_json(&text))
    .transpose()
}

/// Applies a batch on the writer's connection (inside its savepoint, which the writer rolls
/// back unless the outcome is `Committed`).
pub(super) fn import_batch(
    conn: &Connection,
    batch: &ImportBatch,
) -> Result<BatchOutcome, StoreError> {
    conn.execute_batch(PROGRESS_TABLE).map_err(db_err)?;
    let held = held(conn)?;
    if !in_step(held.as_ref(), batch) {
        return Ok(BatchOutcome::OutOfStep {
            held: held.map(|p| p.checkpoint),
        });
    }
    let mut state = ApplyState::new(held, batch);
    // Live records' aggregates per dataset row, written once at the end of the batch.
    let mut aggregates: HashMap<i64, (i64, i64)> = HashMap::new();
    for (index, item) in batch.items.iter().enumerate() {
        if let Err(reason) = item.validate() {
            return Ok(BatchOutcome::Rejected { index, reason });
        }
        let inserted = match item {
            DumpItem::Record { dataset, record } => {
                if state.skipping(dataset) {
                    state.skipped_record(item);
                    continue;
                }
                let Some(id) = dataset_id(conn, dataset)? else {
                    return Ok(BatchOutcome::Rejected {
                        index,
                        reason: format!(
                            "record {:?} of {dataset}, which is not in the target",
                            record.key
                        ),
                    });
                };
                let inserted = insert_record(conn, id, record)?;
                if inserted && let Some(bytes) = live_bytes(record) {
                    let entry = aggregates.entry(id).or_default();
                    entry.0 += 1;
                    entry.1 += i64::try_from(bytes).unwrap_or(i64::MAX);
                }
                inserted
            }
            other => insert(conn, other)?,
        };
        if inserted {
            state.imported(item);
        } else if let Err(reason) = state.exists(item) {
            return Ok(BatchOutcome::Rejected { index, reason });
        }
    }
    for (id, (count, bytes)) in aggregates {
        conn.execute(
            "UPDATE datasets SET record_count = record_count + ?1, byte_size = byte_size + ?2
             WHERE id = ?3",
            params![count, bytes, id],
        )
        .map_err(db_err)?;
    }
    let progress = state.finish(batch);
    conn.execute(
        "INSERT INTO import_progress (only_row, state) VALUES (1, ?1)
         ON CONFLICT (only_row) DO UPDATE SET state = excluded.state",
        params![progress_json(&progress)],
    )
    .map_err(db_err)?;
    Ok(BatchOutcome::Committed(progress))
}

fn dataset_id(conn: &Connection, key: &DatasetKey) -> Result<Option<i64>, StoreError> {
    conn.prepare_cached("SELECT id FROM datasets WHERE pool = ?1 AND owner = ?2 AND name = ?3")
        .and_then(|mut stmt| {
            stmt.query_row(params![key.pool, key.owner, key.name], |row| row.get(0))
                .optional()
        })
        .map_err(db_err)
}

/// Inserts the item unless its key exists; whether it did.
fn insert(conn: &Connection, item: &DumpItem) -> Result<bool, StoreError> {
    let result = match item {
        DumpItem::Identity(i) => conn.execute(
            "INSERT INTO identities (pool, id, guest, merged_into, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![i.pool, i.id, i.guest, i.merged_into, i.created_at],
        ),
        DumpItem::Login(l) => conn.execute(
            "INSERT INTO logins (pool, provider, subject, identity, linked_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![l.pool, l.provider, l.subject, l.identity, l.linked_at],
        ),
        DumpItem::Dataset(d) => conn.execute(
            "INSERT INTO datasets (pool, owner, name, sync_count, deleted, record_count,
                                   byte_size, created_at, last_modified, merge_root,
                                   last_deleted_sync_count)
             VALUES (?1, ?2, ?3, ?4, ?5, 0, 0, ?6, ?7, ?8, ?9)
             ON CONFLICT DO NOTHING",
            params![
                d.pool,
                d.owner,
                d.name,
                d.sync_count as i64,
                d.deleted,
                d.created_at,
                d.last_modified,
                d.merge_root,
                d.last_deleted_sync_count as i64
            ],
        ),
        DumpItem::Grant(g) => conn.execute(
            "INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
            params![
                g.pool,
                g.owner,
                g.name,
                g.grantee,
                g.access.as_str(),
                g.granted_at
            ],
        ),
        // An existing setting is kept or refused like any existing item (the merge policy),
        // never overwritten: a copy does not change what the target holds.
        DumpItem::Setting(s) => conn.execute(
            "INSERT INTO pool_settings (pool, name, value, updated_at)
             VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            params![s.pool, s.name, s.value, s.updated_at],
        ),
        DumpItem::Record { .. } => return Ok(false),
    };
    result.map(|n| n == 1).map_err(db_err)
}

fn insert_record(conn: &Connection, dataset_id: i64, r: &DumpRecord) -> Result<bool, StoreError> {
    conn.prepare_cached(
        "INSERT INTO records (dataset_id, key, value, sync_count, last_modified,
                              last_modified_by, device_id, device_last_modified)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            dataset_id,
            r.key,
            r.value,
            r.sync_count as i64,
            r.last_modified,
            r.last_modified_by,
            r.device_id,
            r.device_last_modified
        ])
    })
    .map(|n| n == 1)
    .map_err(db_err)
}
