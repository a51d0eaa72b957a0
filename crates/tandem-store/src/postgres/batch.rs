//! Group commit for PostgreSQL: updates to different existing datasets that are queued at
//! the same moment commit in one transaction, a handful of statements for the whole batch
//! instead of six per update. PostgreSQL's cost is per statement and per commit far more
//! than per row, so under load this is what lets one database take thousands of updates a
//! second (docs/BENCHMARKS.md has the `pgbench` figures behind it).
//!
//! The semantics are those of `write::update`, update by update: each is checked against the
//! state under its dataset's row lock (stale counts, grants, limits), gets its own outcome,
//! and is acknowledged only after the batch's `COMMIT`. A refused update (conflict,
//! forbidden, limit) writes nothing and does not affect the others. The batch locks its
//! dataset rows in id order, so two batches (or a batch and single updates, which lock one
//! row) cannot deadlock. What a batch does not handle goes through `write::update` one by
//! one: a batch of one, a dataset that has no row yet or is deleted (creation takes the
//! owner's advisory lock and counts datasets), and a second update of a dataset already in
//! the batch (it runs after the batch commits).

use super::read::record_from_row;
use super::write::{self, Write};
use super::{Fail, Inner, forbidden};
use crate::decision::{self, DatasetRow, StoredRecords};
use crate::{Limits, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch, now_ms};
use deadpool_postgres::ClientWrapper;
use futures_util::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tandem_protocol::Access;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

/// The most updates one transaction commits.
const MAX_BATCH: usize = 64;

/// Updates waiting for a worker before new ones are refused as `unavailable` (a database
/// that is down or too slow must not grow the queue, and its latency, without bound).
pub(super) const QUEUE_CAPACITY: usize = 4096;

/// Updates a worker sends down the single path at once (each holds a pooled connection).
const SINGLE_CONCURRENCY: usize = 4;

pub(super) struct Item {
    pub request: UpdateRequest,
    pub patches: Vec<ValidatedPatch>,
    pub reply: oneshot::Sender<Result<UpdateOutcome, StoreError>>,
    /// When it was queued: an update that waited longer than a call may take is answered
    /// `unavailable` without being tried (its caller has given up on it).
    pub queued: Instant,
}

/// The queue every update goes through, and the workers that drain it.
pub(super) type Queue = mpsc::Sender<Item>;

/// Starts `workers` batch workers (each uses one pooled connection at a time).
pub(super) fn start(inner: &Arc<Inner>, workers: usize) -> Queue {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let rx = Arc::new(Mutex::new(rx));
    for _ in 0..workers.max(1) {
        // Weak: the store closes when its last handle goes, not when its workers do.
        let inner = Arc::downgrade(inner);
        let rx = rx.clone();
        tokio::spawn(async move {
            loop {
                let items = {
                    let mut rx = rx.lock().await;
                    let Some(first) = rx.recv().await else { return };
                    let mut items = vec![first];
                    while items.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(item) => items.push(item),
                            Err(_) => break,
                        }
                    }
                    items
                };
                let Some(inner) = inner.upgrade() else { return };
                // Its own task: a panic fails this batch's updates (their replies drop, so
                // they get `unavailable`), not the worker.
                if let Err(e) = tokio::spawn(async move { run(&inner, items).await }).await {
                    tracing::error!(error = %e, "postgresql batch failed");
                }
            }
        });
    }
    tx
}

/// Commits `items`: as one batch where it can, the rest on the single path, and repeats of
/// a dataset after its earlier update (in the next round).
async fn run(inner: &Inner, items: Vec<Item>) {
    let mut items = items;
    while !items.is_empty() {
        let live = drop_stale(inner, items);
        let (batch, later) = split(live);
        let singles = if batch.len() == 1 {
            batch
        } else {
            commit_batch(inner, batch).await
        };
        // Distinct datasets, so they may run side by side; before `later`, which may hold
        // their datasets' next updates.
        futures_util::stream::iter(singles)
            .for_each_concurrent(SINGLE_CONCURRENCY, |item| async move {
                let result = single(inner, &item).await;
                let _ = item.reply.send(result);
            })
            .await;
        items = later;
    }
}

/// Answers, without trying them, updates whose caller is gone or that waited longer than a
/// call may take; returns the rest.
fn drop_stale(inner: &Inner, items: Vec<Item>) -> Vec<Item> {
    let mut live = Vec::with_capacity(items.len());
    for item in items {
        if item.reply.is_closed() {
            continue;
        }
        if item.queued.elapsed() > inner.call_timeout {
            let _ = item.reply.send(Err(StoreError::Unavailable(format!(
                "postgresql writes are backed up: not started within {:?}",
                inner.call_timeout
            ))));
            continue;
        }
        live.push(item);
    }
    live
}

/// The first update of each dataset, and the rest (in order).
fn split(items: Vec<Item>) -> (Vec<Item>, Vec<Item>) {
    let mut seen = HashSet::new();
    let (mut batch, mut later) = (Vec::new(), Vec::new());
    for item in items {
        if seen.insert(item.request.dataset.clone()) {
            batch.push(item);
        } else {
            later.push(item);
        }
    }
    (batch, later)
}

async fn single(inner: &Inner, item: &Item) -> Result<UpdateOutcome, StoreError> {
    call!(inner, |client| write::update(
        &mut client,
        &inner.limits,
        &item.request,
        &item.patches
    ))
}

/// Runs a batch of updates to distinct datasets. Answers every item it settles and returns
/// the ones it leaves to the single path.
async fn commit_batch(inner: &Inner, items: Vec<Item>) -> Vec<Item> {
    let client = match inner.client().await {
        Ok(client) => client,
        Err(e) => {
            for item in items {
                let _ = item.reply.send(Err(e.clone()));
            }
            return Vec::new();
        }
    };
    let (_open, mut client) = client;
    let now = now_ms();
    let result = tokio::time::timeout(
        inner.call_timeout,
        transaction(&mut client, &inner.limits, &items, now),
    )
    .await;
    match inner.finish(client, result) {
        Ok(plan) => {
            let committed = plan
                .iter()
                .filter(|s| matches!(s, Settled::Done(Ok(UpdateOutcome::Committed { .. }))))
                .count();
            inner
                .batched
                .fetch_add(committed as u64, std::sync::atomic::Ordering::Relaxed);
            let mut left = Vec::new();
            for (item, outcome) in items.into_iter().zip(plan) {
                match outcome {
                    Settled::Done(result) => {
                        let _ = item.reply.send(result);
                    }
                    Settled::Single => left.push(item),
                }
            }
            left
        }
        Err(e) => {
            // Nothing of the batch is acknowledged: every update is either wholly applied or
            // not at all, and each client's retry finds out which by sync count.
            for item in items {
                let _ = item.reply.send(Err(e.clone()));
            }
            Vec::new()
        }
    }
}

enum Settled {
    Done(Result<UpdateOutcome, StoreError>),
    /// Needs the single path (no live dataset row).
    Single,
}

const LOCK_DATASETS: &str = r#"
    SELECT d.id, d.sync_count, d.deleted, d.record_count, d.byte_size, k.i
    FROM datasets d
    JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) AS k (pool, owner, name, i)
      ON d.pool = k.pool COLLATE "C" AND d.owner = k.owner COLLATE "C"
         AND d.name = k.name COLLATE "C"
    ORDER BY d.id
    FOR UPDATE OF d SKIP LOCKED"#;

const LOCK_GRANTS: &str = r#"
    SELECT k.i, g.access
    FROM grants g
    JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::int[])
      AS k (pool, owner, name, grantee, i)
      ON g.pool = k.pool COLLATE "C" AND g.owner = k.owner COLLATE "C"
         AND g.name = k.name COLLATE "C" AND g.grantee = k.grantee COLLATE "C"
    ORDER BY g.pool, g.owner, g.name, g.grantee
    FOR SHARE OF g"#;

/// Live records of the locked datasets, and the patched keys' tombstones.
const LOAD_RECORDS: &str = r#"
    SELECT key, value, sync_count, last_modified, last_modified_by, device_id,
           device_last_modified, dataset_id
    FROM records
    WHERE dataset_id = ANY($1)
      AND (value IS NOT NULL
           OR (dataset_id, key) IN (SELECT u.id, u.key COLLATE "C"
                                    FROM UNNEST($2::bigint[], $3::text[]) AS u (id, key)))"#;

/// One update's planned write.
struct Planned {
    index: usize,
    write: Write,
}

async fn transaction(
    client: &mut ClientWrapper,
    limits: &Limits,
    items: &[Item],
    now: i64,
) -> Result<Vec<Settled>, Fail> {
    let n = items.len();
    let index: Vec<i32> = (0..n).map(|i| i as i32).collect();
    let pools: Vec<&str> = items
        .iter()
        .map(|i| i.request.dataset.pool.as_str())
        .collect();
    let owners: Vec<&str> = items
        .iter()
        .map(|i| i.request.dataset.owner.as_str())
        .collect();
    let names: Vec<&str> = items
        .iter()
        .map(|i| i.request.dataset.name.as_str())
        .collect();
    let tx = client.transaction().await?;

    // 1. The dataset rows, locked in id order. A row someone else holds is skipped: its
    //    update goes to the single path and waits there for that row alone, instead of the
    //    whole batch waiting behind it (while holding the other rows).
    let stmt = tx.prepare_cached(LOCK_DATASETS).await?;
    let mut rows: Vec<Option<DatasetRow>> = vec![None; n];
    for row in tx.query(&stmt, &[&pools, &owners, &names, &index]).await? {
        let i: i32 = row.try_get(5)?;
        let dataset = write::dataset_row(&row)?;
        if let Some(slot) = usize::try_from(i).ok().and_then(|i| rows.get_mut(i)) {
            *slot = Some(dataset).filter(|d| !d.state.deleted);
        }
    }

    // 2. Grants of the non-owners, after the row locks (the single path's order).
    let guests: Vec<usize> = (0..n)
        .filter(|&i| rows[i].is_some() && items[i].request.actor != items[i].request.dataset.owner)
        .collect();
    let mut can_write = vec![false; n];
    if !guests.is_empty() {
        let pick = |f: &dyn Fn(&Item) -> &str| -> Vec<String> {
            guests.iter().map(|&i| f(&items[i]).to_owned()).collect()
        };
        let (gp, go, gn, gg) = (
            pick(&|i| &i.request.dataset.pool),
            pick(&|i| &i.request.dataset.owner),
            pick(&|i| &i.request.dataset.name),
            pick(&|i| &i.request.actor),
        );
        let gi: Vec<i32> = guests.iter().map(|&i| i as i32).collect();
        let stmt = tx.prepare_cached(LOCK_GRANTS).await?;
        for row in tx.query(&stmt, &[&gp, &go, &gn, &gg, &gi]).await? {
            let i: i32 = row.try_get(0)?;
            let access: String = row.try_get(1)?;
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| can_write.get_mut(i)) {
                *slot = Access::parse(&access).is_some_and(Access::can_write);
            }
        }
    }

    // 3. The records of every dataset that goes ahead.
    let mut ids = Vec::new();
    let (mut key_ids, mut keys) = (Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        let Some(row) = row else { continue };
        let owner = items[i].request.actor == items[i].request.dataset.owner;
        if !owner && !can_write[i] {
            continue;
        }
        ids.push(row.id);
        for patch in &items[i].patches {
            key_ids.push(row.id);
            keys.push(patch.key.as_str());
        }
    }
    let mut stored: HashMap<i64, StoredRecords> = HashMap::new();
    if !ids.is_empty() {
        let stmt = tx.prepare_cached(LOAD_RECORDS).await?;
        for row in tx.query(&stmt, &[&ids, &key_ids, &keys]).await? {
            let id: i64 = row.try_get(7)?;
            let record = record_from_row(&row, 0)?;
            stored
                .entry(id)
                .or_default()
                .insert(record.key.clone(), record);
        }
    }

    // 4. Each update's outcome, by the shared decision (as the single path decides it).
    let mut settled: Vec<Option<Settled>> = (0..n).map(|_| None).collect();
    let mut writes = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let request = &item.request;
        let key = &request.dataset;
        let Some(row) = rows[i] else {
            settled[i] = Some(Settled::Single);
            continue;
        };
        if request.actor != key.owner && !can_write[i] {
            let e = forbidden(key, &request.actor, "write");
            settled[i] = Some(Settled::Done(Err(e)));
            continue;
        }
        let empty = StoredRecords::new();
        let current = stored.get(&row.id).unwrap_or(&empty);
        if let Some(conflict) = decision::conflict(&row.state, &item.patches, current) {
            settled[i] = Some(Settled::Done(Ok(conflict)));
            continue;
        }
        // Deleted datasets take the single path, so nothing here re-creates one.
        match decision::plan(
            limits,
            request,
            &item.patches,
            &row.state,
            current,
            None,
            now,
        ) {
            Ok(plan) => writes.push(Planned {
                index: i,
                write: Write {
                    dataset_id: row.id,
                    plan,
                },
            }),
            Err(e) => settled[i] = Some(Settled::Done(Err(e))),
        }
    }

    // 5. Every write of the batch in two statements, then one commit.
    let planned: Vec<&Write> = writes.iter().map(|p| &p.write).collect();
    write::store_writes(&tx, &planned, now).await?;
    // If the answer to COMMIT is lost, this fails and every update gets `Unavailable`.
    tx.commit().await?;

    // 6. The committed outcomes: the records read under the lock plus each update's writes.
    for Planned { index, write } in writes {
        let stored = stored.remove(&write.dataset_id).unwrap_or_default();
        let outcome = write.plan.committed(&items[index].request.dataset, stored);
        settled[index] = Some(Settled::Done(Ok(outcome)));
    }
    Ok(settled
        .into_iter()
        .map(|s| s.unwrap_or(Settled::Single))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DatasetKey;

    #[test]
    fn test_batch_split_keeps_the_first_update_of_each_dataset() {
        let item = |name: &str| {
            let (reply, _) = oneshot::channel();
            Item {
                request: UpdateRequest {
                    dataset: DatasetKey::new("p", "o", name),
                    actor: "o".into(),
                    device_id: None,
                    patches: Vec::new(),
                },
                patches: Vec::new(),
                reply,
                queued: Instant::now(),
            }
        };
        let (batch, later) = split(vec![item("a"), item("b"), item("a"), item("c"), item("b")]);
        let names = |v: &[Item]| -> Vec<String> {
            v.iter().map(|i| i.request.dataset.name.clone()).collect()
        };
        assert_eq!(names(&batch), ["a", "b", "c"]);
        assert_eq!(names(&later), ["a", "b"]);
    }
}
