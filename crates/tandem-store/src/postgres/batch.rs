//! Group commit for PostgreSQL: updates to different existing datasets that are queued at
//! the same moment commit in one transaction, a handful of statements for the whole batch
//! instead of six per update. PostgreSQL's cost is per statement and per commit far more
//! than per row, so under load this is what lets one database take thousands of updates a
//! second (docs/BENCHMARKS.md has the `pgbench` figures behind it).
//!
//! The semantics are those of `write::update`, update by update: each is checked against the
//! state under its dataset's row lock (grants, then the shared `decision`: stale counts,
//! limits, stamping), gets its own outcome, and is acknowledged only after the batch's
//! `COMMIT`. A refused update (conflict, forbidden, limit) writes nothing and does not
//! affect the others. The batch locks its dataset rows in id order, so two batches (or a
//! batch and single updates, which lock one row) cannot deadlock. What a batch does not
//! handle goes through `write::update` one by one: a batch of one, a dataset that has no row
//! yet or is deleted (creation takes the owner's advisory lock and counts datasets), and a
//! second update of a dataset already in the batch (it runs after the batch commits).

use super::read::record_from_row;
use super::write::{self, Write};
use super::{CallError, Inner, forbidden};
use crate::decision::{self, DatasetRow, StoredRecords};
use crate::{Limits, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch, now_ms};
use deadpool_postgres::tokio_postgres::Row;
use deadpool_postgres::{ClientWrapper, Transaction};
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

/// What step 4 decided for one update.
enum Decided {
    /// Answered without writing: forbidden, a conflict or a limit.
    Refused(Result<UpdateOutcome, StoreError>),
    /// Left to the single path.
    Single,
    /// Goes ahead with this write.
    Write(Write),
}

/// Decides and writes one update per item (each of its own dataset) in one transaction, in
/// the numbered steps below: one statement per step for the whole batch.
async fn transaction(
    client: &mut ClientWrapper,
    limits: &Limits,
    items: &[Item],
    now: i64,
) -> Result<Vec<Settled>, CallError> {
    let tx = client.transaction().await?;
    let rows = lock_datasets(&tx, items).await?;
    let can_write = lock_write_grants(&tx, items, &rows).await?;
    let mut stored = load_records(&tx, items, &rows, &can_write).await?;
    let decided = decide(limits, items, &rows, &can_write, &stored, now);
    // 5. Every write of the batch in two statements, then one commit.
    let writes: Vec<&Write> = decided
        .iter()
        .filter_map(|d| match d {
            Decided::Write(write) => Some(write),
            _ => None,
        })
        .collect();
    write::store_writes(&tx, &writes, now).await?;
    // If the answer to COMMIT is lost, this fails and every update gets `Unavailable`.
    tx.commit().await?;
    Ok(settle(items, decided, &mut stored))
}

/// 1. The dataset rows, locked in id order; `None` for an item whose dataset has no live row
///    or whose row someone else holds. A held row is skipped: its update goes to the single
///    path and waits there for that row alone, instead of the whole batch waiting behind it
///    (while holding the other rows).
async fn lock_datasets(
    tx: &Transaction<'_>,
    items: &[Item],
) -> Result<Vec<Option<DatasetRow>>, CallError> {
    let k = Columns::of(items, 0..items.len());
    let stmt = tx.prepare_cached(LOCK_DATASETS).await?;
    let mut rows: Vec<Option<DatasetRow>> = vec![None; items.len()];
    for row in tx
        .query(&stmt, &[&k.pools, &k.owners, &k.names, &k.index])
        .await?
    {
        let dataset = write::dataset_row(&row)?;
        if let Some(slot) = slot(&mut rows, &row, 5)? {
            *slot = Some(dataset).filter(|d| !d.state.deleted);
        }
    }
    Ok(rows)
}

/// 2. Whether each item's actor may write: the owner may; a guest's grant is locked
///    (`FOR SHARE`) after the row locks, the single path's order.
async fn lock_write_grants(
    tx: &Transaction<'_>,
    items: &[Item],
    rows: &[Option<DatasetRow>],
) -> Result<Vec<bool>, CallError> {
    let mut can_write: Vec<bool> = items.iter().map(is_owner).collect();
    let guests = (0..items.len()).filter(|&i| rows[i].is_some() && !is_owner(&items[i]));
    let k = Columns::of(items, guests);
    if k.index.is_empty() {
        return Ok(can_write);
    }
    let stmt = tx.prepare_cached(LOCK_GRANTS).await?;
    for row in tx
        .query(&stmt, &[&k.pools, &k.owners, &k.names, &k.actors, &k.index])
        .await?
    {
        let access: String = row.try_get(1)?;
        if let Some(slot) = slot(&mut can_write, &row, 0)? {
            *slot = Access::parse(&access).is_some_and(Access::can_write);
        }
    }
    Ok(can_write)
}

/// Some items' datasets and actors as arrays for `UNNEST`, with each item's index in the
/// batch, which the statements return to say which item a row belongs to.
struct Columns<'a> {
    pools: Vec<&'a str>,
    owners: Vec<&'a str>,
    names: Vec<&'a str>,
    actors: Vec<&'a str>,
    index: Vec<i32>,
}

impl<'a> Columns<'a> {
    fn of(items: &'a [Item], which: impl Iterator<Item = usize>) -> Self {
        let mut k = Columns {
            pools: Vec::new(),
            owners: Vec::new(),
            names: Vec::new(),
            actors: Vec::new(),
            index: Vec::new(),
        };
        for i in which {
            let request = &items[i].request;
            k.pools.push(&request.dataset.pool);
            k.owners.push(&request.dataset.owner);
            k.names.push(&request.dataset.name);
            k.actors.push(&request.actor);
            k.index.push(i as i32);
        }
        k
    }
}

/// The slot of the item whose index is in `row`'s column `at`.
fn slot<'s, T>(slots: &'s mut [T], row: &Row, at: usize) -> Result<Option<&'s mut T>, CallError> {
    let i: i32 = row.try_get(at)?;
    Ok(usize::try_from(i).ok().and_then(|i| slots.get_mut(i)))
}

/// 3. The stored records of every dataset that goes ahead (locked, and writable by its
///    actor), by dataset id.
async fn load_records(
    tx: &Transaction<'_>,
    items: &[Item],
    rows: &[Option<DatasetRow>],
    can_write: &[bool],
) -> Result<HashMap<i64, StoredRecords>, CallError> {
    let mut ids = Vec::new();
    let (mut key_ids, mut keys) = (Vec::new(), Vec::new());
    for (i, row) in rows.iter().enumerate() {
        let Some(row) = row else { continue };
        if !can_write[i] {
            continue;
        }
        ids.push(row.id);
        for patch in &items[i].patches {
            key_ids.push(row.id);
            keys.push(patch.key.as_str());
        }
    }
    let mut stored: HashMap<i64, StoredRecords> = HashMap::new();
    if ids.is_empty() {
        return Ok(stored);
    }
    let stmt = tx.prepare_cached(LOAD_RECORDS).await?;
    for row in tx.query(&stmt, &[&ids, &key_ids, &keys]).await? {
        let id: i64 = row.try_get(7)?;
        let record = record_from_row(&row, 0)?;
        stored
            .entry(id)
            .or_default()
            .insert(record.key.clone(), record);
    }
    Ok(stored)
}

/// 4. Each update's outcome by the shared decision, as the single path decides it: refused,
///    left to the single path, or the write it makes.
fn decide(
    limits: &Limits,
    items: &[Item],
    rows: &[Option<DatasetRow>],
    can_write: &[bool],
    stored: &HashMap<i64, StoredRecords>,
    now: i64,
) -> Vec<Decided> {
    let empty = StoredRecords::new();
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let request = &item.request;
            let Some(row) = rows[i] else {
                return Decided::Single;
            };
            if !can_write[i] {
                let e = forbidden(&request.dataset, &request.actor, "write");
                return Decided::Refused(Err(e));
            }
            let current = stored.get(&row.id).unwrap_or(&empty);
            if let Some(conflict) = decision::conflict(&row.state, &item.patches, current) {
                return Decided::Refused(Ok(conflict));
            }
            // Deleted datasets take the single path, so nothing here creates one.
            match decision::plan(
                limits,
                request,
                &item.patches,
                &row.state,
                current,
                None,
                now,
            ) {
                Ok(plan) => Decided::Write(Write {
                    dataset_id: row.id,
                    plan,
                }),
                Err(e) => Decided::Refused(Err(e)),
            }
        })
        .collect()
}

/// 6. Every item's answer; a committed one's outcome is the records read under the lock
///    plus its writes.
fn settle(
    items: &[Item],
    decided: Vec<Decided>,
    stored: &mut HashMap<i64, StoredRecords>,
) -> Vec<Settled> {
    decided
        .into_iter()
        .zip(items)
        .map(|(decided, item)| match decided {
            Decided::Refused(result) => Settled::Done(result),
            Decided::Single => Settled::Single,
            Decided::Write(write) => {
                let records = stored.remove(&write.dataset_id).unwrap_or_default();
                Settled::Done(Ok(write.plan.committed(&item.request.dataset, records)))
            }
        })
        .collect()
}

fn is_owner(item: &Item) -> bool {
    item.request.actor == item.request.dataset.owner
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
