//! The change stream's consumers and dead letters (see `crate::stream`). A lease is one
//! upsert: PostgreSQL locks the consumer's row for it and evaluates the condition on the
//! newest committed version after any wait, so of nodes racing for a free or expired lease
//! exactly one gets it, whichever node each runs on.

use super::CallError;
use super::read::{to_i64, to_u64};
use crate::{DatasetKey, DeadLetter, StoreError, StreamConsumer};
use deadpool_postgres::ClientWrapper;
use deadpool_postgres::tokio_postgres::types::ToSql;

/// See `Store::stream_lease`: `RETURNING` gives no row when another node keeps the lease.
const LEASE: &str = "
    INSERT INTO stream_consumers (name, position, lease_holder, lease_until)
    VALUES ($1, (SELECT coalesce(max(id), 0) FROM commit_log), $2, $3)
    ON CONFLICT (name) DO UPDATE SET
        lease_holder = EXCLUDED.lease_holder,
        lease_until = EXCLUDED.lease_until
    WHERE stream_consumers.lease_holder IS NULL
       OR stream_consumers.lease_holder = EXCLUDED.lease_holder
       OR stream_consumers.lease_until <= $4
    RETURNING position";

pub(super) async fn lease(
    client: &ClientWrapper,
    consumer: &str,
    node: &str,
    now: i64,
    ttl: i64,
) -> Result<Option<i64>, CallError> {
    let stmt = client.prepare_cached(LEASE).await?;
    let until = now.saturating_add(ttl);
    let row = client
        .query_opt(&stmt, &[&consumer, &node, &until, &now])
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?)
}

/// See `Store::stream_ack`.
pub(super) async fn ack(
    client: &ClientWrapper,
    consumer: &str,
    node: &str,
    position: i64,
    now: i64,
) -> Result<bool, CallError> {
    let stmt = client
        .prepare_cached(
            "UPDATE stream_consumers SET position = greatest(position, $3)
             WHERE name = $1 AND lease_holder = $2 AND lease_until > $4",
        )
        .await?;
    Ok(client
        .execute(&stmt, &[&consumer, &node, &position, &now])
        .await?
        > 0)
}

/// See `Store::stream_release`.
pub(super) async fn release(
    client: &ClientWrapper,
    consumer: &str,
    node: &str,
) -> Result<(), CallError> {
    let stmt = client
        .prepare_cached(
            "UPDATE stream_consumers SET lease_holder = NULL, lease_until = 0
             WHERE name = $1 AND lease_holder = $2",
        )
        .await?;
    client.execute(&stmt, &[&consumer, &node]).await?;
    Ok(())
}

/// See `Store::stream_forget`: the consumer and its letters in one statement.
pub(super) async fn forget(client: &ClientWrapper, consumer: &str) -> Result<bool, CallError> {
    let stmt = client
        .prepare_cached(
            "WITH letters AS (DELETE FROM stream_dead_letters WHERE consumer = $1)
             DELETE FROM stream_consumers WHERE name = $1",
        )
        .await?;
    Ok(client.execute(&stmt, &[&consumer]).await? > 0)
}

const INSERT_LETTERS: &str = "
    INSERT INTO stream_dead_letters (consumer, entry_id, event, error, attempts, time)
    SELECT $1, u.entry_id, u.event, u.error, u.attempts, u.time
    FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])
      AS u (entry_id, event, error, attempts, time)
    ON CONFLICT (consumer, entry_id) DO UPDATE SET
        event = EXCLUDED.event, error = EXCLUDED.error,
        attempts = EXCLUDED.attempts, time = EXCLUDED.time";

/// The oldest letters beyond the cap. A statement of its own, after the insert, so that
/// its snapshot holds the new letters.
const TRIM_LETTERS: &str = "
    DELETE FROM stream_dead_letters WHERE consumer = $1 AND entry_id <= (
        SELECT entry_id FROM stream_dead_letters WHERE consumer = $1
        ORDER BY entry_id DESC OFFSET $2 LIMIT 1)";

/// See `Store::stream_dead_letter`: the insert and the trim in one transaction, sent
/// together. An entry id repeated within `letters` keeps its last letter.
pub(super) async fn dead_letter(
    client: &mut ClientWrapper,
    consumer: &str,
    letters: &[DeadLetter],
    max: u64,
) -> Result<(), CallError> {
    // ON CONFLICT cannot touch one row twice in a statement: the last letter per entry wins.
    let mut by_entry = std::collections::BTreeMap::new();
    for l in letters {
        by_entry.insert(l.entry_id, l);
    }
    let ids: Vec<i64> = by_entry.keys().copied().collect();
    let events: Vec<&str> = by_entry.values().map(|l| l.event.as_str()).collect();
    let errors: Vec<&str> = by_entry.values().map(|l| l.error.as_str()).collect();
    let attempts: Vec<i64> = by_entry.values().map(|l| i64::from(l.attempts)).collect();
    let times: Vec<i64> = by_entry.values().map(|l| l.time).collect();
    let max = to_i64(max)?;
    let tx = client.transaction().await?;
    let (insert, trim) = tokio::try_join!(
        tx.prepare_cached(INSERT_LETTERS),
        tx.prepare_cached(TRIM_LETTERS)
    )?;
    let insert_params: [&(dyn ToSql + Sync); 6] =
        [&consumer, &ids, &events, &errors, &attempts, &times];
    let trim_params: [&(dyn ToSql + Sync); 2] = [&consumer, &max];
    tokio::try_join!(
        biased;
        tx.execute(&insert, &insert_params),
        tx.execute(&trim, &trim_params),
    )?;
    tx.commit().await?;
    Ok(())
}

/// See `Store::stream_consumers`.
pub(super) async fn consumers(client: &ClientWrapper) -> Result<Vec<StreamConsumer>, CallError> {
    let stmt = client
        .prepare_cached(
            "SELECT name, position, lease_holder, lease_until FROM stream_consumers
             ORDER BY name",
        )
        .await?;
    client
        .query(&stmt, &[])
        .await?
        .iter()
        .map(|r| {
            Ok(StreamConsumer {
                name: r.try_get(0)?,
                position: r.try_get(1)?,
                lease_holder: r.try_get(2)?,
                lease_until: r.try_get(3)?,
            })
        })
        .collect()
}

/// See `Store::stream_dead_letters`.
pub(super) async fn dead_letters(
    client: &ClientWrapper,
    consumer: &str,
    after_id: i64,
    limit: usize,
) -> Result<Vec<DeadLetter>, CallError> {
    let stmt = client
        .prepare_cached(
            "SELECT entry_id, event, error, attempts, time FROM stream_dead_letters
             WHERE consumer = $1 AND entry_id > $2 ORDER BY entry_id LIMIT $3",
        )
        .await?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(&stmt, &[&consumer, &after_id, &limit])
        .await?
        .iter()
        .map(|r| {
            let attempts: i64 = r.try_get(3)?;
            Ok(DeadLetter {
                entry_id: r.try_get(0)?,
                event: r.try_get(1)?,
                error: r.try_get(2)?,
                attempts: u32::try_from(attempts).map_err(|_| {
                    StoreError::Internal(format!("stored attempts {attempts} out of range"))
                })?,
                time: r.try_get(4)?,
            })
        })
        .collect()
}

/// See `Store::log_head`.
pub(super) async fn log_head(client: &ClientWrapper) -> Result<i64, CallError> {
    let stmt = client
        .prepare_cached("SELECT coalesce(max(id), 0) FROM commit_log")
        .await?;
    Ok(client.query_one(&stmt, &[]).await?.try_get(0)?)
}

/// See `Store::datasets_after`, in the "C" collation's (bytewise) order, on the unique
/// index.
pub(super) async fn datasets_after(
    client: &ClientWrapper,
    after: Option<&DatasetKey>,
    limit: usize,
) -> Result<Vec<(DatasetKey, u64)>, CallError> {
    let stmt = client
        .prepare_cached(
            "SELECT pool, owner, name, sync_count FROM datasets
             WHERE NOT deleted AND (pool, owner, name) > ($1, $2, $3)
             ORDER BY pool, owner, name LIMIT $4",
        )
        .await?;
    // Every key is above ('', '', ''), which no dataset has.
    let (pool, owner, name) = after.map_or(("", "", ""), |k| {
        (k.pool.as_str(), k.owner.as_str(), k.name.as_str())
    });
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    client
        .query(&stmt, &[&pool, &owner, &name, &limit])
        .await?
        .iter()
        .map(|r| {
            Ok((
                DatasetKey::new(
                    r.try_get::<_, String>(0)?,
                    r.try_get::<_, String>(1)?,
                    r.try_get::<_, String>(2)?,
                ),
                to_u64(r.try_get(3)?)?,
            ))
        })
        .collect()
}
