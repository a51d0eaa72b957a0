//! Group commit for PostgreSQL: updates that are queued at the same moment commit in one
//! transaction, a handful of statements for the whole batch instead of six per update.
//! PostgreSQL's cost is per statement and per commit far more than per row, so under load
//! this is what lets one database take thousands of updates a second (docs/BENCHMARKS.md has
//! the `pgbench` figures behind it).
//!
//! The semantics are those of `write::update`, update by update: each is checked against the
//! state under its dataset's row lock (grants, then the shared `decision`: stale counts,
//! limits, stamping), gets its own outcome, and is acknowledged only after the batch's
//! `COMMIT`. Several updates of one dataset in a batch (a shared dataset's writers) are
//! decided in queue order, each against the state the previous ones left, and get
//! consecutive sync counts: the outcomes of committing them one by one, for one row lock and
//! one write of the row. A refused update (conflict, forbidden, limit) writes nothing and
//! does not affect the others. The batch locks its dataset rows in id order, so two batches
//! (or a batch and single updates, which lock one row) cannot deadlock. What a batch does
//! not handle goes through `write::update` one by one, each dataset's in order: a batch of
//! one, and the updates of a dataset that has no row yet or is deleted (creation takes the
//! owner's advisory lock and counts datasets) or whose row another transaction holds.

use super::read::record_from_row;
use super::write::{self, Write};
use super::{CallError, Inner, forbidden};
use crate::decision::{self, DatasetRow, DatasetState, Plan, StoredRecords};
use crate::{DatasetKey, Limits, StoreError, UpdateOutcome, UpdateRequest, ValidatedPatch, now_ms};
use deadpool_postgres::tokio_postgres::Row;
use deadpool_postgres::{ClientWrapper, Transaction};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tandem_protocol::{Access, Record};
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

/// Commits `items`: as one batch where it can, the rest on the single path.
async fn run(inner: &Inner, items: Vec<Item>) {
    let live = drop_stale(inner, items);
    let singles = if live.len() == 1 {
        live
    } else {
        commit_batch(inner, live).await
    };
    // Distinct datasets side by side, each dataset's updates one after the other in their
    // order.
    futures_util::stream::iter(by_dataset(singles))
        .for_each_concurrent(SINGLE_CONCURRENCY, |updates| async move {
            for item in updates {
                let result = single(inner, &item).await;
                let _ = item.reply.send(result);
            }
        })
        .await;
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

/// The indices of the items of each dataset, in queue order, the datasets in the order they
/// first appear.
fn group_indices(items: &[Item]) -> Vec<Vec<usize>> {
    let mut group_of: HashMap<&DatasetKey, usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let g = *group_of.entry(&item.request.dataset).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }
    groups
}

/// The items of each dataset, as [`group_indices`] orders them.
fn by_dataset(items: Vec<Item>) -> Vec<Vec<Item>> {
    let groups = group_indices(&items);
    let mut slots: Vec<Option<Item>> = items.into_iter().map(Some).collect();
    groups
        .into_iter()
        .map(|g| g.into_iter().filter_map(|i| slots[i].take()).collect())
        .collect()
}

async fn single(inner: &Inner, item: &Item) -> Result<UpdateOutcome, StoreError> {
    call!(inner, |client| write::update(
        &mut client,
        &inner.limits,
        &item.request,
        &item.patches
    ))
}

/// Runs a batch of updates. Answers every item it settles and returns the ones it leaves to
/// the single path.
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
        Ok(settled) => {
            let committed = settled
                .iter()
                .filter(|s| matches!(s, Settled::Done(Ok(UpdateOutcome::Committed { .. }))))
                .count();
            inner
                .batched
                .fetch_add(committed as u64, std::sync::atomic::Ordering::Relaxed);
            let mut left = Vec::new();
            for (item, outcome) in items.into_iter().zip(settled) {
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
    /// The answer, sent once the batch has committed.
    Done(Result<UpdateOutcome, StoreError>),
    /// Needs the single path (no live dataset row, or another transaction holds it).
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

/// Decides and writes the items' updates in one transaction, in the numbered steps below:
/// one statement per step for the whole batch, however many updates each dataset has.
async fn transaction(
    client: &mut ClientWrapper,
    limits: &Limits,
    items: &[Item],
    now: i64,
) -> Result<Vec<Settled>, CallError> {
    let groups = group_indices(items);
    let tx = client.transaction().await?;
    let rows = lock_datasets(&tx, items, &groups).await?;
    let can_write = lock_write_grants(&tx, items, &groups, &rows).await?;
    let mut stored = load_records(&tx, items, &groups, &rows, &can_write).await?;
    // 4. Each dataset's updates decided in Rust, in order.
    let mut settled: Vec<Settled> = items.iter().map(|_| Settled::Single).collect();
    let mut writes = Vec::new();
    for (members, row) in groups.iter().zip(&rows) {
        let Some(row) = row else { continue };
        let records = stored.remove(&row.id).unwrap_or_default();
        let mut dataset = Decider::new(*row, records);
        for &i in members {
            settled[i] = Settled::Done(dataset.decide(limits, &items[i], can_write[i], now));
        }
        writes.extend(dataset.into_write());
    }
    // 5. Every write of the batch in two statements, then one commit.
    let writes: Vec<&Write> = writes.iter().collect();
    write::store_writes(&tx, &writes, now).await?;
    // If the answer to COMMIT is lost, this fails and every update gets `Unavailable`.
    tx.commit().await?;
    Ok(settled)
}

/// 1. The dataset rows, locked in id order, one per group of items; `None` for a dataset
///    that has no live row or whose row someone else holds. A held row is skipped: its
///    updates go to the single path and wait there for that row alone, instead of the whole
///    batch waiting behind it (while holding the other rows).
async fn lock_datasets(
    tx: &Transaction<'_>,
    items: &[Item],
    groups: &[Vec<usize>],
) -> Result<Vec<Option<DatasetRow>>, CallError> {
    let k = Columns::of(items, groups.iter().map(|members| members[0]).enumerate());
    let stmt = tx.prepare_cached(LOCK_DATASETS).await?;
    let mut rows: Vec<Option<DatasetRow>> = vec![None; groups.len()];
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
///    (`FOR SHARE`, once per dataset and guest) after the row locks, the single path's
///    order.
async fn lock_write_grants(
    tx: &Transaction<'_>,
    items: &[Item],
    groups: &[Vec<usize>],
    rows: &[Option<DatasetRow>],
) -> Result<Vec<bool>, CallError> {
    let mut can_write: Vec<bool> = items.iter().map(is_owner).collect();
    // The first item of each (locked dataset, guest) pair, and each guest item's pair.
    let mut pairs: Vec<usize> = Vec::new();
    let mut pair_of: Vec<Option<usize>> = vec![None; items.len()];
    let mut seen: HashMap<(usize, &str), usize> = HashMap::new();
    for (g, members) in groups.iter().enumerate() {
        if rows[g].is_none() {
            continue;
        }
        for &i in members.iter().filter(|&&i| !is_owner(&items[i])) {
            let actor = items[i].request.actor.as_str();
            pair_of[i] = Some(*seen.entry((g, actor)).or_insert_with(|| {
                pairs.push(i);
                pairs.len() - 1
            }));
        }
    }
    if pairs.is_empty() {
        return Ok(can_write);
    }
    let k = Columns::of(items, pairs.iter().copied().enumerate());
    let stmt = tx.prepare_cached(LOCK_GRANTS).await?;
    let mut pair_can_write = vec![false; pairs.len()];
    for row in tx
        .query(&stmt, &[&k.pools, &k.owners, &k.names, &k.actors, &k.index])
        .await?
    {
        let access: String = row.try_get(1)?;
        if let Some(slot) = slot(&mut pair_can_write, &row, 0)? {
            *slot = Access::parse(&access).is_some_and(Access::can_write);
        }
    }
    for (can, pair) in can_write.iter_mut().zip(pair_of) {
        if let Some(p) = pair {
            *can = pair_can_write[p];
        }
    }
    Ok(can_write)
}

/// Some items' datasets and actors as arrays for `UNNEST`, each with the slot (an index the
/// caller chose) that the statements return to say which one a row belongs to.
struct Columns<'a> {
    pools: Vec<&'a str>,
    owners: Vec<&'a str>,
    names: Vec<&'a str>,
    actors: Vec<&'a str>,
    index: Vec<i32>,
}

impl<'a> Columns<'a> {
    /// `which` gives (slot, item index) pairs.
    fn of(items: &'a [Item], which: impl Iterator<Item = (usize, usize)>) -> Self {
        let mut k = Columns {
            pools: Vec::new(),
            owners: Vec::new(),
            names: Vec::new(),
            actors: Vec::new(),
            index: Vec::new(),
        };
        for (slot, i) in which {
            let request = &items[i].request;
            k.pools.push(&request.dataset.pool);
            k.owners.push(&request.dataset.owner);
            k.names.push(&request.dataset.name);
            k.actors.push(&request.actor);
            k.index.push(slot as i32);
        }
        k
    }
}

/// The slot whose index is in `row`'s column `at`.
fn slot<'s, T>(slots: &'s mut [T], row: &Row, at: usize) -> Result<Option<&'s mut T>, CallError> {
    let i: i32 = row.try_get(at)?;
    Ok(usize::try_from(i).ok().and_then(|i| slots.get_mut(i)))
}

/// 3. The stored records of every dataset that has an update to decide (locked, and
///    writable by at least one of its actors), by dataset id: the live ones and every key
///    any of its updates patches.
async fn load_records(
    tx: &Transaction<'_>,
    items: &[Item],
    groups: &[Vec<usize>],
    rows: &[Option<DatasetRow>],
    can_write: &[bool],
) -> Result<HashMap<i64, StoredRecords>, CallError> {
    let mut ids = Vec::new();
    let (mut key_ids, mut keys) = (Vec::new(), Vec::new());
    for (members, row) in groups.iter().zip(rows) {
        let Some(row) = row else { continue };
        let mut writers = members.iter().filter(|&&i| can_write[i]).peekable();
        if writers.peek().is_none() {
            continue;
        }
        ids.push(row.id);
        for &i in writers {
            for patch in &items[i].patches {
                key_ids.push(row.id);
                keys.push(patch.key.as_str());
            }
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

/// 4. One dataset's updates, decided one after the other by the shared decision, each
///    against the state the ones before it left: what committing them one by one would
///    answer, with consecutive sync counts.
struct Decider {
    id: i64,
    state: DatasetState,
    /// The records read under the lock, with the committed updates' writes applied.
    records: StoredRecords,
    /// Every record the committed updates write, the latest version of each key.
    written: BTreeMap<String, Record>,
    committed: bool,
}

impl Decider {
    fn new(row: DatasetRow, records: StoredRecords) -> Self {
        Decider {
            id: row.id,
            state: row.state,
            records,
            written: BTreeMap::new(),
            committed: false,
        }
    }

    /// The next update's outcome; a committed one's snapshot is the records so far.
    fn decide(
        &mut self,
        limits: &Limits,
        item: &Item,
        can_write: bool,
        now: i64,
    ) -> Result<UpdateOutcome, StoreError> {
        let request = &item.request;
        if !can_write {
            return Err(forbidden(&request.dataset, &request.actor, "write"));
        }
        if let Some(conflict) = decision::conflict(&self.state, &item.patches, &self.records) {
            return Ok(conflict);
        }
        // Deleted datasets take the single path, so nothing here creates one.
        let plan = decision::plan(
            limits,
            request,
            &item.patches,
            &self.state,
            &self.records,
            None,
            now,
        )?;
        self.state = DatasetState {
            sync_count: plan.sync_count,
            deleted: false,
            record_count: plan.records,
            byte_size: plan.bytes,
        };
        for record in &plan.changed {
            self.records.insert(record.key.clone(), record.clone());
            self.written.insert(record.key.clone(), record.clone());
        }
        self.committed = true;
        Ok(plan.committed(&request.dataset, self.records.clone()))
    }

    /// What the committed updates write together: the dataset row as the last one left it
    /// and every record they changed; `None` if none committed.
    fn into_write(self) -> Option<Write> {
        self.committed.then(|| Write {
            dataset_id: self.id,
            plan: Plan {
                sync_count: self.state.sync_count,
                records: self.state.record_count,
                bytes: self.state.byte_size,
                changed: self.written.into_values().collect(),
            },
        })
    }
}

fn is_owner(item: &Item) -> bool {
    item.request.actor == item.request.dataset.owner
}

/// Runs `requests` as the workers run what they take off the queue at once (a batch, then
/// the single path) and returns each one's answer: for tests that need several updates in
/// one batch, which the queue gives only by timing.
#[cfg(test)]
pub(super) async fn run_together(
    inner: &Inner,
    requests: Vec<UpdateRequest>,
) -> Vec<Result<UpdateOutcome, StoreError>> {
    let mut items = Vec::new();
    let mut answers = Vec::new();
    for request in requests {
        let patches = crate::validate_update(&inner.limits, &request).expect("a valid update");
        let (reply, answer) = oneshot::channel();
        items.push(Item {
            request,
            patches,
            reply,
            queued: Instant::now(),
        });
        answers.push(answer);
    }
    run(inner, items).await;
    let mut results = Vec::new();
    for answer in answers {
        results.push(answer.await.expect("every update is answered"));
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_batch_by_dataset_keeps_each_datasets_updates_in_order() {
        let item = |name: &str, actor: &str| {
            let (reply, _) = oneshot::channel();
            Item {
                request: UpdateRequest {
                    dataset: DatasetKey::new("p", "o", name),
                    actor: actor.into(),
                    device_id: None,
                    patches: Vec::new(),
                },
                patches: Vec::new(),
                reply,
                queued: Instant::now(),
            }
        };
        let items = vec![
            item("a", "1"),
            item("b", "2"),
            item("a", "3"),
            item("c", "4"),
            item("b", "5"),
        ];
        assert_eq!(group_indices(&items), [vec![0, 2], vec![1, 4], vec![3]]);
        let groups: Vec<Vec<String>> = by_dataset(items)
            .iter()
            .map(|g| g.iter().map(|i| i.request.actor.clone()).collect())
            .collect();
        assert_eq!(groups, [vec!["1", "3"], vec!["2", "5"], vec!["4"]]);
    }
}
