//! Commit log compaction on PostgreSQL (see `Store::compact_log`). One node at a time: a
//! round first takes a session advisory lock with `pg_try_advisory_lock`, and a node that
//! does not get it skips the round (the node that has it does the work). The connection
//! that took the lock is closed at the end of the round, which releases the lock however
//! the round ended (an error, a timeout, a cancelled task). Each statement deletes at most
//! [`COMPACT_CHUNK`] entries and commits on its own, so no transaction runs long (a long
//! one would hold back the cleanup of every other table, the log counter's row first).
//! Compaction counts what it drops in `commit_log_dropped`, never in the writers' dataset
//! rows or heads rows (schema versions 8 and 9), so it neither waits for a commit nor holds
//! one up.

use super::{CallError, Inner, map_db_error};
use crate::commitlog::{COMPACT_CHUNK, CompactBounds, CompactReport, CompactTally};
use crate::{DatasetKey, StoreError};
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::{ClientWrapper, Object};
use std::future::Future;

/// The first key of the advisory lock that lets one node compact (the second is a hash of
/// the schema's name). Distinct from the migration, owner and grant locks.
pub(super) const COMPACT_LOCK: i32 = 0x5444_4d03;

/// Deletes the oldest entries past their age, up to a chunk: entries are in time order by
/// id (up to clock steps), so the aged ones are those of the first chunk by id below its
/// first recent one (no index on time: it would cost a page in every commit). What goes is
/// counted per dataset in `commit_log_dropped`, in the same statement.
const AGED: &str = "
    WITH first AS (
        SELECT id, server_time FROM commit_log WHERE id <= $2 ORDER BY id LIMIT $3
    ), stop AS (
        SELECT coalesce(min(id), $2 + 1) AS at FROM first WHERE server_time >= $1
    ), gone AS (
        DELETE FROM commit_log
        WHERE id IN (SELECT first.id FROM first, stop WHERE first.id < stop.at)
        RETURNING id, pool, owner, name
    ), counted AS (
        INSERT INTO commit_log_dropped AS d (pool, owner, name, dropped)
        SELECT pool, owner, name, count(*) FROM gone GROUP BY pool, owner, name
        ON CONFLICT (pool, owner, name) DO UPDATE SET dropped = d.dropped + excluded.dropped
    )
    SELECT id FROM gone";

/// The datasets with more than `$1` entries (the cap and a tenth: a trim walks the kept
/// entries' chain, so it waits until there is a tenth's worth to drop; the count stays
/// within 10 % of the cap between rounds, and exact for caps below ten), with their newest
/// entry.
const OVER_CAP: &str = "
    SELECT h.pool, h.owner, h.name, h.head
    FROM (SELECT pool, owner, name, log_head AS head, log_entries AS entries
          FROM datasets WHERE log_entries > $1
          UNION ALL
          SELECT pool, owner, name, head, entries
          FROM commit_log_heads WHERE entries > $1) h
         LEFT JOIN commit_log_dropped d USING (pool, owner, name)
    WHERE h.entries - coalesce(d.dropped, 0) > $1";

/// The entry `$2` links before `$1` along its chain; a walk of a large cap goes a chunk of
/// links per statement, so none runs into the statement timeout.
const NTH_BACK: &str = "
    WITH RECURSIVE chain (id, prev_id, depth) AS (
        SELECT id, prev_id, 0::bigint FROM commit_log WHERE id = $1
        UNION ALL
        SELECT c.id, c.prev_id, chain.depth + 1
        FROM chain JOIN commit_log c ON c.id = chain.prev_id
        WHERE chain.depth < $2
    )
    SELECT id FROM chain WHERE depth = $2";

/// Walks a chunk of links of a dataset's chain from `$1` down, deletes those the round may
/// ($2 `keep_above`), counts them as dropped for the dataset ($4–$6), and answers the
/// deleted ids and where the walk goes on (null at the chain's end).
const BELOW: &str = "
    WITH RECURSIVE chain (id, prev_id, depth) AS (
        SELECT id, prev_id, 1::bigint FROM commit_log WHERE id = $1
        UNION ALL
        SELECT c.id, c.prev_id, chain.depth + 1
        FROM chain JOIN commit_log c ON c.id = chain.prev_id
        WHERE chain.depth < $3
    ), gone AS (
        DELETE FROM commit_log WHERE id IN (SELECT id FROM chain WHERE id <= $2)
        RETURNING id
    ), counted AS (
        INSERT INTO commit_log_dropped AS d (pool, owner, name, dropped)
        SELECT $4, $5, $6, count(*) FROM gone HAVING count(*) > 0
        ON CONFLICT (pool, owner, name) DO UPDATE SET dropped = d.dropped + excluded.dropped
    )
    SELECT coalesce((SELECT array_agg(id) FROM gone), '{}'),
           (SELECT prev_id FROM chain WHERE depth = $3)";

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
            .query(
                OVER_CAP,
                &[&bounds.max_entries.saturating_add(bounds.max_entries / 10)],
            )
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
    for (dataset, head) in &over {
        // The newest entry to drop: `max_entries` links back from the head, if the chain
        // is that long.
        let (mut next, mut to_go) = (Some(*head), bounds.max_entries);
        while let Some(from) = next {
            if to_go == 0 {
                break;
            }
            let steps = to_go.min(COMPACT_CHUNK);
            next = timed(inner, async {
                let stmt = client.prepare_cached(NTH_BACK).await?;
                let row = client.query_opt(&stmt, &[&from, &steps]).await?;
                Ok(row.map(|r| r.try_get::<_, i64>(0)).transpose()?)
            })
            .await?;
            to_go -= steps;
        }
        while let Some(from) = next {
            let (deleted, then) = timed(inner, async {
                let stmt = client.prepare_cached(BELOW).await?;
                let row = client
                    .query_one(
                        &stmt,
                        &[
                            &from,
                            &bounds.keep_above,
                            &COMPACT_CHUNK,
                            &dataset.pool,
                            &dataset.owner,
                            &dataset.name,
                        ],
                    )
                    .await?;
                Ok((
                    row.try_get::<_, Vec<i64>>(0)?,
                    row.try_get::<_, Option<i64>>(1)?,
                ))
            })
            .await?;
            tally.add(&bounds, &deleted);
            next = then;
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
