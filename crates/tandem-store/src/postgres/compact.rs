//! Commit log compaction on PostgreSQL (see `Store::compact_log`). One node at a time: a
//! round first takes a session advisory lock with `pg_try_advisory_lock`, and a node that
//! does not get it skips the round (the node that has it does the work). The connection
//! that took the lock is closed at the end of the round, which releases the lock however
//! the round ended (an error, a timeout, a cancelled task). Each statement deletes at most
//! [`COMPACT_CHUNK`] entries and commits on its own, so no transaction runs long (a long
//! one would hold back the cleanup of every other table, the log counter's row first).

use super::{CallError, Inner, map_db_error};
use crate::commitlog::{COMPACT_CHUNK, CompactBounds, CompactReport, CompactTally};
use crate::{DatasetKey, StoreError};
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::{ClientWrapper, Object};
use std::future::Future;

/// The first key of the advisory lock that lets one node compact (the second is a hash of
/// the schema's name). Distinct from the migration, owner and grant locks.
pub(super) const COMPACT_LOCK: i32 = 0x5444_4d03;

const AGED: &str = "
    DELETE FROM commit_log WHERE id IN (
        SELECT id FROM commit_log WHERE server_time < $1 AND id <= $2 ORDER BY id LIMIT $3)
    RETURNING id";

/// The datasets with more than `$1` entries, each with the id of the oldest entry it keeps.
const OVER_CAP: &str = "
    SELECT o.pool, o.owner, o.name,
           (SELECT id FROM commit_log c
            WHERE c.pool = o.pool AND c.owner = o.owner AND c.name = o.name
            ORDER BY id DESC OFFSET $1 - 1 LIMIT 1)
    FROM (SELECT pool, owner, name FROM commit_log
          GROUP BY pool, owner, name HAVING count(*) > $1) o";

const BELOW: &str = "
    DELETE FROM commit_log WHERE id IN (
        SELECT id FROM commit_log
        WHERE pool = $1 AND owner = $2 AND name = $3 AND id < $4 AND id <= $5
        ORDER BY id LIMIT $6)
    RETURNING id";

/// Runs a compaction round as at `now`. When another node is running one, `wait` says
/// whether to wait for it to end (an explicit `Store::compact_log`, which must not come back
/// empty because the store's own minute round happened to be running) or to skip the round
/// (that minute round: the node with the lock does the work).
pub(super) async fn compact(
    inner: &Inner,
    now: i64,
    wait: bool,
) -> Result<CompactReport, StoreError> {
    let (_open, client) = inner.client().await?;
    let locked = timed(inner, async {
        if wait {
            client
                .execute(
                    "SELECT pg_advisory_lock($1, hashtext($2))",
                    &[&COMPACT_LOCK, &inner.schema],
                )
                .await?;
            return Ok(true);
        }
        let row = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, hashtext($2))",
                &[&COMPACT_LOCK, &inner.schema],
            )
            .await?;
        Ok(row.try_get::<_, bool>(0)?)
    })
    .await;
    match locked {
        Ok(true) => {}
        // Nothing is held: the connection goes back to the pool.
        Ok(false) => {
            tracing::debug!("another node is compacting the commit log");
            return Ok(CompactReport::default());
        }
        Err(e) => {
            drop(Object::take(client));
            return Err(e);
        }
    }
    let result = round(inner, &client, now).await;
    drop(Object::take(client));
    result
}

async fn round(
    inner: &Inner,
    client: &ClientWrapper,
    now: i64,
) -> Result<CompactReport, StoreError> {
    let (head, consumers) = timed(inner, async {
        let head: i64 = client
            .query_one("SELECT coalesce(max(id), 0) FROM commit_log", &[])
            .await?
            .try_get(0)?;
        let consumers = client
            .query("SELECT name, position FROM stream_consumers", &[])
            .await?
            .iter()
            .map(|r| Ok((r.try_get::<_, String>(0)?, r.try_get::<_, i64>(1)?)))
            .collect::<Result<Vec<_>, CallError>>()?;
        Ok((head, consumers))
    })
    .await?;
    let floor = consumers.iter().map(|(_, position)| *position).min();
    let bounds = CompactBounds::new(&inner.limits, now, head, floor);
    let mut tally = CompactTally::default();
    loop {
        let params: [&(dyn ToSql + Sync); 3] = [&bounds.cutoff, &bounds.keep_above, &COMPACT_CHUNK];
        let deleted = delete(inner, client, AGED, &params).await?;
        tally.add(&bounds, &deleted);
        if (deleted.len() as i64) < COMPACT_CHUNK {
            break;
        }
    }
    let over = timed(inner, async {
        client
            .query(OVER_CAP, &[&bounds.max_entries])
            .await?
            .iter()
            .map(|r| {
                Ok((
                    DatasetKey::new(
                        r.try_get::<_, String>(0)?,
                        r.try_get::<_, String>(1)?,
                        r.try_get::<_, String>(2)?,
                    ),
                    r.try_get::<_, i64>(3)?,
                ))
            })
            .collect::<Result<Vec<_>, CallError>>()
    })
    .await?;
    for (dataset, cut) in &over {
        loop {
            let params: [&(dyn ToSql + Sync); 6] = [
                &dataset.pool,
                &dataset.owner,
                &dataset.name,
                cut,
                &bounds.keep_above,
                &COMPACT_CHUNK,
            ];
            let deleted = delete(inner, client, BELOW, &params).await?;
            tally.add(&bounds, &deleted);
            if (deleted.len() as i64) < COMPACT_CHUNK {
                break;
            }
        }
    }
    Ok(tally.finish(&inner.forced_drops, &consumers))
}

/// One chunk's delete; the ids it deleted.
async fn delete(
    inner: &Inner,
    client: &ClientWrapper,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<i64>, StoreError> {
    timed(inner, async {
        let stmt = client.prepare_cached(sql).await?;
        client
            .query(&stmt, params)
            .await?
            .iter()
            .map(|r| Ok(r.try_get::<_, i64>(0)?))
            .collect()
    })
    .await
}

/// Runs one step under the call deadline and maps its error as every call does.
async fn timed<T>(
    inner: &Inner,
    step: impl Future<Output = Result<T, CallError>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(inner.call_timeout, step).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(CallError::Store(e))) => Err(e),
        Ok(Err(CallError::Db(e))) => Err(map_db_error(&e)),
        Err(_) => Err(StoreError::Unavailable(format!(
            "postgresql did not answer within {:?}",
            inner.call_timeout
        ))),
    }
}
