//! Identities, logins and merges in SQLite. The writes run on the writer thread inside its
//! `BEGIN IMMEDIATE` batch (each under its own savepoint), so what they read is what they
//! write against; the reads run on a read connection in one transaction. What to decide is
//! `crate::identity`'s; this is the SQL.

use super::db_err;
use super::query;
use super::writer;
use crate::commitlog::{self, LogKind};
use crate::decision::{DatasetState, upsert_records};
use crate::identity::{self, Identity, Login, MergeOutcome, MovedDataset};
use crate::{DatasetKey, StoreError, now_ms};
use rusqlite::{Connection, OptionalExtension, params};

pub(super) fn create(
    conn: &Connection,
    pool: &str,
    id: &str,
    guest: bool,
) -> Result<(), StoreError> {
    let inserted = conn
        .prepare_cached(
            "INSERT INTO identities (pool, id, guest, created_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (pool, id) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![pool, id, guest, now_ms()]))
        .map_err(db_err)?;
    if inserted == 0 {
        return Err(StoreError::IdentityExists(id.to_owned()));
    }
    Ok(())
}

pub(super) fn load(
    conn: &Connection,
    pool: &str,
    id: &str,
) -> Result<Option<Identity>, StoreError> {
    let row: Option<(bool, Option<String>)> = conn
        .prepare_cached("SELECT guest, merged_into FROM identities WHERE pool = ?1 AND id = ?2")
        .and_then(|mut stmt| {
            stmt.query_row(params![pool, id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(db_err)?;
    let Some((guest, merged_into)) = row else {
        return Ok(None);
    };
    let logins = conn
        .prepare_cached(
            "SELECT provider, subject FROM logins WHERE pool = ?1 AND identity = ?2
             ORDER BY provider, subject",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![pool, id], |r| {
                Ok(Login::new(r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(db_err)?;
    Ok(Some(Identity {
        id: id.to_owned(),
        guest,
        merged_into,
        logins,
    }))
}

/// Each of `logins` that is linked, with the identity it is linked to.
pub(super) fn linked(
    conn: &Connection,
    pool: &str,
    logins: &[Login],
) -> Result<Vec<(Login, String)>, StoreError> {
    let mut stmt = conn
        .prepare_cached(
            "SELECT identity FROM logins WHERE pool = ?1 AND provider = ?2 AND subject = ?3",
        )
        .map_err(db_err)?;
    let mut found = Vec::new();
    for login in logins {
        let owner: Option<String> = stmt
            .query_row(params![pool, login.provider, login.subject], |r| r.get(0))
            .optional()
            .map_err(db_err)?;
        if let Some(owner) = owner {
            found.push((login.clone(), owner));
        }
    }
    Ok(found)
}

pub(super) fn link(
    conn: &Connection,
    pool: &str,
    id: &str,
    logins: &[Login],
) -> Result<(), StoreError> {
    let identity =
        load(conn, pool, id)?.ok_or_else(|| StoreError::NotFound(format!("identity {id}")))?;
    identity::check_not_merged(&identity)?;
    let new = identity::logins_to_link(id, logins, &linked(conn, pool, logins)?)?;
    let now = now_ms();
    let mut insert = conn
        .prepare_cached(
            "INSERT INTO logins (pool, provider, subject, identity, linked_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .map_err(db_err)?;
    for login in &new {
        insert
            .execute(params![pool, login.provider, login.subject, id, now])
            .map_err(db_err)?;
    }
    conn.prepare_cached("UPDATE identities SET guest = 0 WHERE pool = ?1 AND id = ?2")
        .and_then(|mut stmt| stmt.execute(params![pool, id]))
        .map_err(db_err)?;
    Ok(())
}

/// See `Store::merge_identity`. The writer holds the write lock, so nothing changes between
/// the checks and the writes.
pub(super) fn merge(
    conn: &Connection,
    pool: &str,
    from: &str,
    into: &str,
) -> Result<MergeOutcome, StoreError> {
    identity::check_merge(
        load(conn, pool, from)?.as_ref(),
        load(conn, pool, into)?.as_ref(),
        from,
        into,
    )?;
    let names: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM datasets WHERE pool = ?1 AND owner = ?2 AND deleted = 0 ORDER BY name",
        )
        .and_then(|mut stmt| stmt.query_map(params![pool, from], |r| r.get(0))?.collect())
        .map_err(db_err)?;
    let now = now_ms();
    let mut moved = Vec::with_capacity(names.len());
    for name in names {
        let source_key = DatasetKey::new(pool, from, name.as_str());
        let source = query::load_dataset(conn, &source_key)?
            .ok_or_else(|| StoreError::Internal(format!("dataset {source_key} vanished")))?;
        let mut free = None;
        for candidate in identity::merge_target_names(&name, from) {
            let key = DatasetKey::new(pool, into, candidate.as_str());
            let state = query::load_dataset(conn, &key)?.map_or(DatasetState::ABSENT, |r| r.state);
            if state.deleted {
                free = Some((candidate, key, state));
                break;
            }
        }
        let Some((to_name, target_key, target)) = free else {
            return Err(StoreError::Internal(format!(
                "every name for the merged copy of {source_key} is a live dataset"
            )));
        };
        let sync_count = target.sync_count + 1;
        let merge_root = (to_name != name).then_some(name.as_str());
        let target_id = writer::upsert_dataset(
            conn,
            &target_key,
            sync_count,
            source.state.record_count,
            source.state.byte_size,
            now,
        )?;
        conn.prepare_cached("UPDATE datasets SET merge_root = ?2 WHERE id = ?1")
            .and_then(|mut stmt| stmt.execute(params![target_id, merge_root]))
            .map_err(db_err)?;
        let keys = query::live_records(conn, source.id)?
            .into_iter()
            .map(|r| r.key)
            .collect();
        conn.prepare_cached(upsert_records!(
            "SELECT ?1, key, value, ?2, last_modified, last_modified_by, device_id,
                    device_last_modified
             FROM records WHERE dataset_id = ?3 AND value IS NOT NULL"
        ))
        .and_then(|mut stmt| stmt.execute(params![target_id, sync_count, source.id]))
        .map_err(db_err)?;
        // The target's own grants on the name win; a grant to the target itself goes.
        conn.prepare_cached(
            "INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
             SELECT pool, ?4, ?5, grantee, access, granted_at FROM grants
             WHERE pool = ?1 AND owner = ?2 AND name = ?3 AND grantee <> ?4
             ON CONFLICT (pool, owner, name, grantee) DO NOTHING",
        )
        .and_then(|mut stmt| stmt.execute(params![pool, from, name, into, to_name]))
        .map_err(db_err)?;
        writer::append_log(
            conn,
            &target_key,
            LogKind::Merge,
            Some(sync_count),
            into,
            None,
            now,
            &commitlog::merge_json(from, &name, keys),
        )?;
        writer::delete(conn, &source_key, from)?;
        moved.push(MovedDataset {
            from_name: name,
            to_name,
            sync_count,
        });
    }
    conn.prepare_cached("UPDATE identities SET merged_into = ?3 WHERE pool = ?1 AND id = ?2")
        .and_then(|mut stmt| stmt.execute(params![pool, from, into]))
        .map_err(db_err)?;
    Ok(MergeOutcome { moved })
}

pub(super) fn last_deleted_sync_count(
    conn: &Connection,
    key: &DatasetKey,
) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "SELECT last_deleted_sync_count FROM datasets WHERE pool = ?1 AND owner = ?2 AND name = ?3",
    )
    .and_then(|mut stmt| {
        stmt.query_row(params![key.pool, key.owner, key.name], |r| r.get(0))
            .optional()
    })
    .map(Option::unwrap_or_default)
    .map_err(db_err)
}

pub(super) fn merged_names(conn: &Connection, key: &DatasetKey) -> Result<Vec<String>, StoreError> {
    conn.prepare_cached(
        "SELECT name FROM datasets
         WHERE pool = ?1 AND owner = ?2 AND merge_root = ?3 AND deleted = 0 ORDER BY name",
    )
    .and_then(|mut stmt| {
        stmt.query_map(params![key.pool, key.owner, key.name], |r| r.get(0))?
            .collect()
    })
    .map_err(db_err)
}
