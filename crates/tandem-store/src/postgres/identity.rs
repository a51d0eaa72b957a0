//! Identities, logins and merges in PostgreSQL; what to decide is `crate::identity`'s.
//!
//! A link or a merge first locks the identity rows it changes (`FOR UPDATE`, in id order),
//! so links and merges of one identity serialise. A login's primary key makes it name one
//! identity: a link racing another link of the same login waits for it at the insert and
//! then finds it taken. A merge then locks every dataset row of both identities in id
//! order, the order a batch of updates locks in, so it cannot deadlock with one on rows
//! that exist; then, name by name, it inserts a placeholder row where the target has none
//! (as an update does, under the name's creation lock, which it takes only for names
//! without a row: others take that lock before any row), and it moves grant rows last. Locks go identity rows → dataset
//! rows → grant rows, the order every other write keeps too (see the module doc of
//! `postgres`). Should PostgreSQL still find a deadlock (a batch creating a dataset of the
//! target while the merge creates the same name), it aborts one transaction, which is
//! `Unavailable`: nothing was written and the call may be retried.

use super::CallError;
use super::read::to_i64;
use super::write::{
    APPEND_LOG, LogColumns, commit, delete_locked, insert_or_lock_dataset, live_records_locked,
    lock_dataset,
};
use crate::commitlog::{self, LogKind};
use crate::decision::{DatasetRow, upsert_records};
use crate::identity::{self, Identity, Login, MergeOutcome, MovedDataset};
use crate::{DatasetKey, StoreError, now_ms};
use deadpool_postgres::{ClientWrapper, GenericClient, Transaction};

const INSERT_IDENTITY: &str = "
    INSERT INTO identities (pool, id, guest, created_at) VALUES ($1, $2, $3, $4)
    ON CONFLICT (pool, id) DO NOTHING";

/// The identity and its logins in one statement (one row per login, or one without).
const LOAD_IDENTITY: &str = "
    SELECT i.guest, i.merged_into, l.provider, l.subject
    FROM identities i
    LEFT JOIN logins l ON l.pool = i.pool AND l.identity = i.id
    WHERE i.pool = $1 AND i.id = $2
    ORDER BY l.provider, l.subject";

const LOCK_IDENTITIES: &str = "
    SELECT id, guest, merged_into FROM identities
    WHERE pool = $1 AND id = ANY($2)
    ORDER BY id
    FOR UPDATE";

const LINKED: &str = "
    SELECT l.provider, l.subject, l.identity
    FROM logins l
    JOIN UNNEST($2::text[], $3::text[]) AS w (provider, subject)
      ON w.provider = l.provider AND w.subject = l.subject
    WHERE l.pool = $1";

const INSERT_LOGINS: &str = "
    INSERT INTO logins (pool, provider, subject, identity, linked_at)
    SELECT $1, provider, subject, $4, $5 FROM UNNEST($2::text[], $3::text[])
      AS w (provider, subject)
    ON CONFLICT (pool, provider, subject) DO NOTHING";

const NOT_GUEST: &str = "UPDATE identities SET guest = false WHERE pool = $1 AND id = $2";

const LOCK_OWNERS_DATASETS: &str = "
    SELECT id FROM datasets WHERE pool = $1 AND owner = ANY($2) ORDER BY id FOR UPDATE";

const LIVE_NAMES: &str = "
    SELECT name FROM datasets WHERE pool = $1 AND owner = $2 AND NOT deleted ORDER BY name";

/// Makes a locked target row the moved dataset, one commit above its sync count.
const WRITE_TARGET: &str = "
    UPDATE datasets SET sync_count = $2, deleted = false, record_count = $3, byte_size = $4,
                        last_modified = $5, merge_root = $6
    WHERE id = $1";

const COPY_RECORDS: &str = upsert_records!(
    "SELECT $1::bigint, key, value, $2::bigint, last_modified, last_modified_by, device_id,
            device_last_modified
     FROM records WHERE dataset_id = $3 AND value IS NOT NULL"
);

/// The target's own grants on the name win; a grant to the target itself goes.
const MOVE_GRANTS: &str = "
    INSERT INTO grants (pool, owner, name, grantee, access, granted_at)
    SELECT pool, $4, $5, grantee, access, granted_at FROM grants
    WHERE pool = $1 AND owner = $2 AND name = $3 AND grantee <> $4
    ON CONFLICT (pool, owner, name, grantee) DO NOTHING";

const MARK_MERGED: &str = "UPDATE identities SET merged_into = $3 WHERE pool = $1 AND id = $2";

const MERGED_NAMES: &str = "
    SELECT name FROM datasets
    WHERE pool = $1 AND owner = $2 AND merge_root = $3 AND NOT deleted ORDER BY name";

pub(super) async fn create(
    client: &ClientWrapper,
    pool: &str,
    id: &str,
    guest: bool,
) -> Result<(), CallError> {
    let stmt = client.prepare_cached(INSERT_IDENTITY).await?;
    let inserted = client
        .execute(&stmt, &[&pool, &id, &guest, &now_ms()])
        .await?;
    if inserted == 0 {
        return Err(StoreError::IdentityExists(id.to_owned()).into());
    }
    Ok(())
}

pub(super) async fn load(
    client: &impl GenericClient,
    pool: &str,
    id: &str,
) -> Result<Option<Identity>, CallError> {
    let stmt = client.prepare_cached(LOAD_IDENTITY).await?;
    let rows = client.query(&stmt, &[&pool, &id]).await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let mut logins = Vec::new();
    for row in &rows {
        let provider: Option<String> = row.try_get(2)?;
        let subject: Option<String> = row.try_get(3)?;
        if let (Some(provider), Some(subject)) = (provider, subject) {
            logins.push(Login::new(provider, subject));
        }
    }
    Ok(Some(Identity {
        id: id.to_owned(),
        guest: first.try_get(0)?,
        merged_into: first.try_get(1)?,
        logins,
    }))
}

/// Each of `logins` that is linked, with the identity it is linked to.
pub(super) async fn linked(
    client: &impl GenericClient,
    pool: &str,
    logins: &[Login],
) -> Result<Vec<(Login, String)>, CallError> {
    let (providers, subjects) = columns(logins);
    let stmt = client.prepare_cached(LINKED).await?;
    let rows = client.query(&stmt, &[&pool, &providers, &subjects]).await?;
    rows.iter()
        .map(|row| {
            Ok((
                Login::new(row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?),
                row.try_get(2)?,
            ))
        })
        .collect()
}

fn columns(logins: &[Login]) -> (Vec<&str>, Vec<&str>) {
    logins
        .iter()
        .map(|l| (l.provider.as_str(), l.subject.as_str()))
        .unzip()
}

/// The identities `ids`, locked until the transaction ends; their logins are not loaded.
async fn lock_identities(
    tx: &Transaction<'_>,
    pool: &str,
    ids: &[&str],
) -> Result<Vec<Identity>, CallError> {
    let stmt = tx.prepare_cached(LOCK_IDENTITIES).await?;
    let rows = tx.query(&stmt, &[&pool, &ids]).await?;
    rows.iter()
        .map(|row| {
            Ok(Identity {
                id: row.try_get(0)?,
                guest: row.try_get(1)?,
                merged_into: row.try_get(2)?,
                logins: Vec::new(),
            })
        })
        .collect()
}

pub(super) async fn link(
    client: &mut ClientWrapper,
    pool: &str,
    id: &str,
    logins: &[Login],
) -> Result<(), CallError> {
    let tx = client.transaction().await?;
    let locked = lock_identities(&tx, pool, &[id]).await?;
    let identity = locked
        .first()
        .ok_or_else(|| StoreError::NotFound(format!("identity {id}")))?;
    identity::check_not_merged(identity)?;
    let new = identity::logins_to_link(id, logins, &linked(&tx, pool, logins).await?)?;
    let (providers, subjects) = columns(&new);
    let stmt = tx.prepare_cached(INSERT_LOGINS).await?;
    let inserted = tx
        .execute(&stmt, &[&pool, &providers, &subjects, &id, &now_ms()])
        .await?;
    if inserted < new.len() as u64 {
        // Another identity linked one of them after it was read; this statement sees it.
        identity::logins_to_link(id, &new, &linked(&tx, pool, &new).await?)?;
        return Err(StoreError::Unavailable("a login was linked meanwhile; retry".into()).into());
    }
    let stmt = tx.prepare_cached(NOT_GUEST).await?;
    tx.execute(&stmt, &[&pool, &id]).await?;
    tx.commit().await?;
    Ok(())
}

/// One dataset a merge moves: its name and row, and the name and (locked) row it moves to.
struct MergePlan {
    name: String,
    source_key: DatasetKey,
    source: DatasetRow,
    to_name: String,
    target_key: DatasetKey,
    target: DatasetRow,
}

/// See `Store::merge_identity`.
pub(super) async fn merge(
    client: &mut ClientWrapper,
    pool: &str,
    from: &str,
    into: &str,
) -> Result<MergeOutcome, CallError> {
    let tx = client.transaction().await?;
    let locked = lock_identities(&tx, pool, &[from, into]).await?;
    let find = |id: &str| locked.iter().find(|i| i.id == id);
    identity::check_merge(find(from), find(into), from, into)?;
    let (lock_all, names, write_target, copy_records, move_grants) = tokio::try_join!(
        tx.prepare_cached(LOCK_OWNERS_DATASETS),
        tx.prepare_cached(LIVE_NAMES),
        tx.prepare_cached(WRITE_TARGET),
        tx.prepare_cached(COPY_RECORDS),
        tx.prepare_cached(MOVE_GRANTS),
    )?;
    tx.execute(&lock_all, &[&pool, &[from, into].as_slice()])
        .await?;
    let names: Vec<String> = tx
        .query(&names, &[&pool, &from])
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    let now = now_ms();
    // Every row is locked before the log is appended to (`write::APPEND_LOG`): the targets
    // first, then the writes, then every entry at once.
    let mut plans: Vec<MergePlan> = Vec::with_capacity(names.len());
    for name in names {
        let source_key = DatasetKey::new(pool, from, name.as_str());
        // Locked already, with every row of both identities: this reads it.
        let source = lock_dataset(&tx, &source_key)
            .await?
            .ok_or_else(|| StoreError::Internal(format!("dataset {source_key} vanished")))?;
        // Each name tried is locked (a placeholder row where there is none, as an update
        // inserts) so no update can create it before this commits.
        let mut free = None;
        for candidate in identity::merge_target_names(&name, from) {
            // Taken by an earlier name of this merge (written below, live by then).
            if plans.iter().any(|p| p.to_name == candidate) {
                continue;
            }
            let key = DatasetKey::new(pool, into, candidate.as_str());
            // A row is locked as it is (held already); only a name without one takes the
            // creation lock, which is taken before any row elsewhere (`write::CREATE_LOCK`):
            // taking it for a held row could wait in a cycle with a grant of that name.
            let row = match lock_dataset(&tx, &key).await? {
                Some(row) => row,
                None => insert_or_lock_dataset(&tx, &key, now).await?,
            };
            if row.state.deleted {
                free = Some((candidate, row));
                break;
            }
        }
        let Some((to_name, target)) = free else {
            return Err(StoreError::Internal(format!(
                "every name for the merged copy of {source_key} is a live dataset"
            ))
            .into());
        };
        let target_key = DatasetKey::new(pool, into, to_name.as_str());
        plans.push(MergePlan {
            name,
            source_key,
            source,
            to_name,
            target_key,
            target,
        });
    }
    let mut moved = Vec::with_capacity(plans.len());
    let mut log = LogColumns::default();
    for MergePlan {
        name,
        source_key,
        source,
        to_name,
        target_key,
        target,
    } in &plans
    {
        let sync_count = target.state.sync_count + 1;
        let merge_root = (to_name != name).then_some(name.as_str());
        tx.execute(
            &write_target,
            &[
                &target.id,
                &to_i64(sync_count)?,
                &to_i64(source.state.record_count)?,
                &to_i64(source.state.byte_size)?,
                &now,
                &merge_root,
            ],
        )
        .await?;
        // The merge entry names the keys it writes: the source's live records.
        let keys = live_records_locked(&tx, source.id)
            .await?
            .into_iter()
            .map(|r| r.key)
            .collect();
        tx.execute(
            &copy_records,
            &[&target.id, &to_i64(sync_count)?, &source.id],
        )
        .await?;
        tx.execute(&move_grants, &[&pool, &from, &name, &into, &to_name])
            .await?;
        log.push(
            target.id,
            target_key,
            LogKind::Merge,
            sync_count,
            into,
            None,
            commitlog::merge_json(from, name, keys),
        )?;
        delete_locked(&tx, source_key, source, from, Some(&mut log)).await?;
        moved.push(MovedDataset {
            from_name: name.clone(),
            to_name: to_name.clone(),
            sync_count,
        });
    }
    let stmt = tx.prepare_cached(MARK_MERGED).await?;
    tx.execute(&stmt, &[&pool, &from, &into]).await?;
    if log.is_empty() {
        tx.commit().await?;
    } else {
        // The append and COMMIT in one round trip (see `write::commit`).
        let append = tx.prepare_cached(APPEND_LOG).await?;
        let log_params = log.params(&now);
        tokio::try_join!(
            biased;
            tx.execute(&append, &log_params),
            commit(&tx),
        )?;
    }
    Ok(MergeOutcome { moved })
}

pub(super) async fn last_deleted_sync_count(
    client: &ClientWrapper,
    key: &DatasetKey,
) -> Result<u64, CallError> {
    let stmt = client.prepare_cached(LAST_DELETED).await?;
    let row = client
        .query_opt(&stmt, &[&key.pool, &key.owner, &key.name])
        .await?;
    Ok(match row {
        Some(row) => u64::try_from(row.try_get::<_, i64>(0)?).unwrap_or(0),
        None => 0,
    })
}

const LAST_DELETED: &str = "
    SELECT last_deleted_sync_count FROM datasets WHERE pool = $1 AND owner = $2 AND name = $3";

pub(super) async fn merged_names(
    client: &ClientWrapper,
    key: &DatasetKey,
) -> Result<Vec<String>, CallError> {
    let stmt = client.prepare_cached(MERGED_NAMES).await?;
    client
        .query(&stmt, &[&key.pool, &key.owner, &key.name])
        .await?
        .iter()
        .map(|row| row.try_get(0).map_err(CallError::from))
        .collect()
}
