//! The writer thread: it owns the only write connection and applies commands with group
//! commit, because with `synchronous=FULL` the fsync at COMMIT is the cost of a write and
//! one fsync can cover every command that queued up meanwhile.
//!
//! A batch is `BEGIN IMMEDIATE`, then each command under its own SAVEPOINT (rolled back
//! when that command fails or conflicts, so the others are unaffected), then one COMMIT.
//! Replies go out only after the COMMIT; if it fails, every command in the batch fails.

use super::db_err;
use super::query::{self, DatasetRow};
use crate::model::{check_dataset_limits, totals_after};
use crate::{
    DatasetKey, Limits, Snapshot, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch, now_ms,
};
use rusqlite::{Connection, TransactionBehavior, params};
use tandem_protocol::{Access, Conflict, Record};
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
}

/// What a successful command produced.
#[derive(Debug)]
pub(super) enum Done {
    Update(UpdateOutcome),
    SyncCount(u64),
    Unit,
}

pub(super) type Reply = oneshot::Sender<Result<Done, StoreError>>;

#[derive(Debug)]
pub(super) struct Command {
    pub op: Op,
    pub reply: Reply,
}

/// Runs until every sender is gone and the queue is drained, then closes the connection.
pub(super) fn run(mut conn: Connection, limits: &Limits, mut commands_rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = commands_rx.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match commands_rx.try_recv() {
                Ok(command) => batch.push(command),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, limits, &mut batch);
    }
    if let Err((_, e)) = conn.close() {
        tracing::warn!(error = %e, "closing the sqlite write connection failed");
    }
    tracing::debug!("sqlite writer stopped");
}

/// Applies and commits a batch, then answers every command in it.
pub(super) fn commit_batch(conn: &mut Connection, limits: &Limits, batch: &mut Vec<Command>) {
    let size = batch.len();
    let mut replies = Vec::with_capacity(size);
    let mut ops = Vec::with_capacity(size);
    for Command { op, reply } in batch.drain(..) {
        replies.push(reply);
        ops.push(op);
    }
    match apply_batch(conn, limits, &ops) {
        Ok(results) => {
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have gone away; the commit stands either way.
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, batch = size, "sqlite group commit failed");
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

fn apply_batch(
    conn: &mut Connection,
    limits: &Limits,
    ops: &[Op],
) -> Result<Vec<Result<Done, StoreError>>, StoreError> {
    let mut tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        let mut savepoint = tx.savepoint().map_err(db_err)?;
        let result = apply(&savepoint, limits, op);
        let keep = matches!(
            result,
            Ok(Done::Update(UpdateOutcome::Committed { .. }) | Done::SyncCount(_) | Done::Unit)
        );
        if !keep {
            savepoint.rollback().map_err(db_err)?;
        }
        savepoint.commit().map_err(db_err)?;
        results.push(result);
    }
    tx.commit().map_err(db_err)?;
    Ok(results)
}

fn apply(conn: &Connection, limits: &Limits, op: &Op) -> Result<Done, StoreError> {
    match op {
        Op::Update { request, patches } => update(conn, limits, request, patches).map(Done::Update),
        Op::Delete { dataset, actor } => delete(conn, dataset, actor).map(Done::SyncCount),
        Op::Grant {
            dataset,
            grantee,
            access,
        } => grant(conn, dataset, grantee, *access).map(|()| Done::Unit),
        Op::Revoke { dataset, grantee } => revoke(conn, dataset, grantee).map(|()| Done::Unit),
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
    let row = query::load_dataset(conn, key)?;

    // A deleted dataset's records are all tombstones: a write based on an old version of
    // one of them conflicts with the tombstone.
    let mut current = Vec::with_capacity(patches.len());
    for patch in patches {
        current.push(match row {
            Some(r) => query::load_record(conn, r.id, &patch.key)?,
            None => None,
        });
    }
    let conflicts: Vec<Conflict> = patches
        .iter()
        .zip(&current)
        .filter(|(patch, record)| !patch.matches(record.as_ref()))
        .map(|(patch, record)| Conflict {
            key: patch.key.clone(),
            server: record.clone(),
        })
        .collect();
    let sync_count = row.map_or(0, |r| r.sync_count);
    if !conflicts.is_empty() {
        return Ok(UpdateOutcome::Conflict {
            sync_count,
            conflicts,
        });
    }

    // The dataset's live totals after the update, and the patches that change something.
    let (live_records, live_bytes) = row.as_ref().map_or((0, 0), DatasetRow::live_totals);
    let (records, bytes, writes) = totals_after(
        live_records,
        live_bytes,
        patches.iter().zip(current.iter().map(Option::as_ref)),
    );
    let creates = row.is_none_or(|r| r.deleted);
    check_limits(conn, limits, key, creates, records, bytes)?;

    let new_count = sync_count + 1;
    let now = now_ms();
    let dataset_id: i64 = conn
        .prepare_cached(
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
                    key.pool, key.owner, key.name, new_count, records, bytes, now
                ],
                |r| r.get(0),
            )
        })
        .map_err(db_err)?;

    let mut changed = Vec::with_capacity(writes.len());
    {
        let mut stmt = conn
            .prepare_cached(
                "INSERT INTO records (dataset_id, key, value, sync_count, last_modified,
                                      last_modified_by, device_id, device_last_modified)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (dataset_id, key) DO UPDATE SET
                     value = excluded.value,
                     sync_count = excluded.sync_count,
                     last_modified = excluded.last_modified,
                     last_modified_by = excluded.last_modified_by,
                     device_id = excluded.device_id,
                     device_last_modified = excluded.device_last_modified",
            )
            .map_err(db_err)?;
        for patch in writes {
            stmt.execute(params![
                dataset_id,
                patch.key,
                patch.value,
                new_count,
                now,
                request.actor,
                request.device_id,
                patch.device_last_modified,
            ])
            .map_err(db_err)?;
            changed.push(Record {
                key: patch.key.clone(),
                value: patch.value.clone(),
                sync_count: new_count,
                last_modified: now,
                last_modified_by: request.actor.clone(),
                device_id: request.device_id.clone(),
                device_last_modified: patch.device_last_modified,
            });
        }
    }
    changed.sort_by(|a, b| a.key.cmp(&b.key));

    Ok(UpdateOutcome::Committed {
        changed,
        snapshot: Snapshot {
            dataset: key.clone(),
            sync_count: new_count,
            records: query::live_records(conn, dataset_id)?,
            deleted: false,
        },
    })
}

fn check_limits(
    conn: &Connection,
    limits: &Limits,
    key: &DatasetKey,
    creating: bool,
    records: u64,
    bytes: u64,
) -> Result<(), StoreError> {
    let owned: Option<u64> = if creating {
        let owned = conn
            .prepare_cached(
                "SELECT count(*) FROM datasets WHERE pool = ?1 AND owner = ?2 AND deleted = 0",
            )
            .and_then(|mut stmt| stmt.query_row(params![key.pool, key.owner], |r| r.get(0)))
            .map_err(db_err)?;
        Some(owned)
    } else {
        None
    };
    check_dataset_limits(limits, key, owned, records, bytes)
}

fn delete(conn: &Connection, key: &DatasetKey, actor: &str) -> Result<u64, StoreError> {
    if actor != key.owner {
        return Err(query::forbidden(key, actor, "owner"));
    }
    let row = match query::load_dataset(conn, key)? {
        Some(row) if !row.deleted => row,
        _ => return Err(StoreError::NotFound(format!("dataset {key}"))),
    };
    let new_count = row.sync_count + 1;
    let now = now_ms();
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
                             last_modified = ?3
         WHERE id = ?1",
    )
    .and_then(|mut stmt| stmt.execute(params![row.id, new_count, now]))
    .map_err(db_err)?;
    Ok(new_count)
}

fn grant(
    conn: &Connection,
    key: &DatasetKey,
    grantee: &str,
    access: Access,
) -> Result<(), StoreError> {
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
    Ok(())
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
    Ok(())
}
