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
use deadpool_postgres::tokio_postgres::types::ToSql;
use deadpool_postgres::{ClientWrapper, Object};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::{Access, Record};
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::time::Instant;

/// The most updates one transaction commits.
const MAX_BATCH: usize = 256;

/// The batches one store runs at once: a second one starts while the first waits for its
/// commit, so a slow commit does not hold up the queue for its whole duration.
pub(super) const BATCH_WORKERS: usize = 2;

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
/// `interval` is the least time between the starts of two batches (`PostgresConfig::
/// batch_interval`).
pub(super) fn start(inner: &Arc<Inner>, workers: usize, interval: Duration) -> Queue {
    let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
    let queue = Arc::new(Mutex::new(Taker {
        rx,
        last_start: Instant::now(),
    }));
    for _ in 0..workers.max(1) {
        // Weak: the store closes when its last handle goes, not when its workers do.
        let inner = Arc::downgrade(inner);
        let queue = queue.clone();
        tokio::spawn(async move {
            loop {
                let Some(items) = queue.lock().await.take(interval).await else {
                    return;
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

/// The queue's receiving end, which one worker at a time takes a batch from.
struct Taker {
    rx: mpsc::Receiver<Item>,
    /// When the last batch was taken.
    last_start: Instant,
}

impl Taker {
    /// The next batch: once an update is queued, and no sooner than `interval` after the
    /// last batch was taken, everything queued by then (up to `MAX_BATCH`). `None` once the
    /// queue is closed.
    async fn take(&mut self, interval: Duration) -> Option<Vec<Item>> {
        let first = self.rx.recv().await?;
        tokio::time::sleep_until(self.last_start + interval).await;
        let mut items = vec![first];
        while items.len() < MAX_BATCH {
            match self.rx.try_recv() {
                Ok(item) => items.push(item),
                Err(_) => break,
            }
        }
        self.last_start = Instant::now();
        Some(items)
    }
}

/// Commits `items`: as one batch where it can, the rest on the single path.
async fn run(inner: &Inner, items: Vec<Item>) {
    let live = drop_stale(inner, items);
    let singles = if live.is_empty() {
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
    let (_open, client) = client;
    // Until `finish` takes it back: if this task is cancelled or panics mid-transaction, the
    // connection is closed rather than pooled with the transaction open.
    let mut unfinished = Unfinished(Some(client));
    let Some(client) = unfinished.0.as_mut() else {
        return Vec::new();
    };
    let now = now_ms();
    let result = tokio::time::timeout(
        inner.call_timeout,
        transaction(client, &inner.limits, &items, now),
    )
    .await;
    let Some(client) = unfinished.0.take() else {
        return Vec::new();
    };
    match inner.finish(client, result) {
        Ok(settled) => {
            if items.len() > 1 {
                let committed = settled
                    .iter()
                    .filter(|s| matches!(s, Settled::Done(Ok(UpdateOutcome::Committed { .. }))))
                    .count();
                inner
                    .batched
                    .fetch_add(committed as u64, std::sync::atomic::Ordering::Relaxed);
            }
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

/// A pooled connection in the middle of a batch; dropped, it closes the connection.
struct Unfinished(Option<Object>);

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(Object::take(client));
        }
    }
}

enum Settled {
    /// The answer, sent once the batch has committed.
    Done(Result<UpdateOutcome, StoreError>),
    /// Needs the single path (no live dataset row, or another transaction holds it).
    Single,
}

/// 1 and 2. The dataset rows (`kind` 0), locked in id order and each with its group's slot
/// `i`; then the write grants of guests on the rows it locked (`kind` 1), locked `FOR SHARE`
/// in key order, each with its (dataset, guest) pair's slot. Every row lock comes before
/// every grant lock (the CTE is materialised, and `UNION ALL` reads its first branch first),
/// the single path's order. A row that another transaction holds is skipped: its updates go
/// to the single path and wait there for that row alone, instead of the whole batch waiting
/// behind it (while holding the other rows). Grants are locked only on rows this statement
/// locked, so a delete holding a row (and deleting its grants) never waits for the batch.
const LOCK: &str = r#"
    WITH locked AS MATERIALIZED (
        SELECT d.id, d.sync_count, d.deleted, d.record_count, d.byte_size, k.i
        FROM datasets d
        JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) AS k (pool, owner, name, i)
          ON d.pool = k.pool COLLATE "C" AND d.owner = k.owner COLLATE "C"
             AND d.name = k.name COLLATE "C"
        ORDER BY d.id
        FOR UPDATE OF d SKIP LOCKED
    ), granted AS (
        SELECT q.j, g.access
        FROM grants g
        JOIN UNNEST($5::int[], $6::text[], $7::int[]) AS q (i, grantee, j)
          ON g.grantee = q.grantee COLLATE "C"
        JOIN UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) AS k (pool, owner, name, i)
          ON k.i = q.i AND g.pool = k.pool COLLATE "C" AND g.owner = k.owner COLLATE "C"
             AND g.name = k.name COLLATE "C"
        WHERE EXISTS (SELECT 1 FROM locked l WHERE l.i = q.i AND NOT l.deleted)
        ORDER BY g.pool, g.owner, g.name, g.grantee
        FOR SHARE OF g
    )
    SELECT 0, id, sync_count, deleted, record_count, byte_size, i, NULL::text FROM locked
    UNION ALL
    SELECT 1, NULL, NULL, NULL, NULL, NULL, j, access FROM granted"#;

/// 3. The live records of the batch's datasets and the patched keys' tombstones, each with
///    its group's slot. Sent with the lock but run after it, with a snapshot of its own, so
///    it sees every commit before the lock; rows of datasets the lock skipped are ignored.
const LOAD_RECORDS: &str = r#"
    SELECT r.key, r.value, r.sync_count, r.last_modified, r.last_modified_by, r.device_id,
           r.device_last_modified, k.i
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int[]) AS k (pool, owner, name, i)
    JOIN datasets d
      ON d.pool = k.pool COLLATE "C" AND d.owner = k.owner COLLATE "C"
         AND d.name = k.name COLLATE "C"
    JOIN records r ON r.dataset_id = d.id
    WHERE r.value IS NOT NULL
       OR (k.i, r.key) IN (SELECT u.i, u.key COLLATE "C"
                           FROM UNNEST($5::int[], $6::text[]) AS u (i, key))"#;

/// Decides and writes the items' updates in one transaction and two round trips: `BEGIN`,
/// the locks and the records load sent together; the decisions in Rust; the writes and
/// `COMMIT` sent together. One statement per step for the whole batch, however many
/// updates each dataset has. On an error the transaction is rolled back before the
/// connection is reused.
async fn transaction(
    client: &mut ClientWrapper,
    limits: &Limits,
    items: &[Item],
    now: i64,
) -> Result<Vec<Settled>, CallError> {
    let result = decide_and_write(client, limits, items, now).await;
    if result.is_err() && !client.is_closed() {
        // Whatever state the transaction is in (open, aborted, or never begun), end it.
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result
}

async fn decide_and_write(
    client: &ClientWrapper,
    limits: &Limits,
    items: &[Item],
    now: i64,
) -> Result<Vec<Settled>, CallError> {
    let groups = group_indices(items);
    let (lock, load, upsert, write) = tokio::try_join!(
        client.prepare_cached(LOCK),
        client.prepare_cached(LOAD_RECORDS),
        client.prepare_cached(write::UPSERT_RECORDS),
        client.prepare_cached(write::WRITE_DATASETS_AND_LOG),
    )?;
    let k = Columns::of(items, groups.iter().map(|members| members[0]).enumerate());
    let guests = Guests::of(items, &groups);
    let (mut key_groups, mut keys) = (Vec::new(), Vec::new());
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            for patch in &items[i].patches {
                key_groups.push(g as i32);
                keys.push(patch.key.as_str());
            }
        }
    }
    let lock_params: [&(dyn ToSql + Sync); 7] = [
        &k.pools,
        &k.owners,
        &k.names,
        &k.index,
        &guests.groups,
        &guests.actors,
        &guests.pairs,
    ];
    let load_params: [&(dyn ToSql + Sync); 6] =
        [&k.pools, &k.owners, &k.names, &k.index, &key_groups, &keys];
    // Biased: sent in this order, and the first error is the cause.
    let ((), locked, loaded) = tokio::try_join!(
        biased;
        client.batch_execute("BEGIN"),
        client.query(&lock, &lock_params),
        client.query(&load, &load_params),
    )?;

    let mut rows: Vec<Option<DatasetRow>> = vec![None; groups.len()];
    let mut pair_can_write = vec![false; guests.pairs.len()];
    for row in &locked {
        let kind: i32 = row.try_get(0)?;
        if kind == 0 {
            let dataset = write::dataset_row_at(row, 1)?;
            if let Some(slot) = slot(&mut rows, row, 6)? {
                *slot = Some(dataset).filter(|d| !d.state.deleted);
            }
        } else if let Some(slot) = slot(&mut pair_can_write, row, 6)? {
            let access: String = row.try_get(7)?;
            *slot = Access::parse(&access).is_some_and(Access::can_write);
        }
    }
    let mut stored: Vec<StoredRecords> = vec![StoredRecords::new(); groups.len()];
    for row in &loaded {
        let record = record_from_row(row, 0)?;
        if let Some(slot) = slot(&mut stored, row, 7)? {
            slot.insert(record.key.clone(), record);
        }
    }

    // 4. Each dataset's updates decided in Rust, in order.
    let mut settled: Vec<Settled> = items.iter().map(|_| Settled::Single).collect();
    let mut writes = Vec::new();
    // Each committed update's entry, in commit order per dataset.
    let mut log = write::LogColumns::default();
    for (g, members) in groups.iter().enumerate() {
        let Some(row) = rows[g] else { continue };
        let mut dataset = Decider::new(row, std::mem::take(&mut stored[g]));
        for &i in members {
            let can_write = match guests.pair_of[i] {
                Some(p) => pair_can_write[p],
                None => true,
            };
            settled[i] =
                Settled::Done(dataset.decide(limits, &items[i], can_write, now, &mut log)?);
        }
        writes.extend(dataset.into_write());
    }

    // 5. Every write of the batch in two statements (records; dataset rows with the commit
    //    log entries) and the commit, sent together. If the answer to COMMIT is lost, this
    //    fails and every update gets `Unavailable`.
    let writes: Vec<&Write> = writes.iter().collect();
    let columns = write::WriteColumns::of(&writes)?;
    let upsert_params = columns.record_params(&now);
    let write_params = columns.dataset_params(&log, &now);
    tokio::try_join!(
        biased;
        async {
            if columns.has_records() {
                client.execute(&upsert, &upsert_params).await
            } else {
                Ok(0)
            }
        },
        async {
            if writes.is_empty() {
                Ok(0)
            } else {
                client.execute(&write, &write_params).await
            }
        },
        client.batch_execute("COMMIT"),
    )?;
    Ok(settled)
}

/// Some items' datasets as arrays for `UNNEST`, each with the slot (an index the caller
/// chose) that the statements return to say which one a row belongs to.
struct Columns<'a> {
    pools: Vec<&'a str>,
    owners: Vec<&'a str>,
    names: Vec<&'a str>,
    index: Vec<i32>,
}

impl<'a> Columns<'a> {
    /// `which` gives (slot, item index) pairs.
    fn of(items: &'a [Item], which: impl Iterator<Item = (usize, usize)>) -> Self {
        let mut k = Columns {
            pools: Vec::new(),
            owners: Vec::new(),
            names: Vec::new(),
            index: Vec::new(),
        };
        for (slot, i) in which {
            let dataset = &items[i].request.dataset;
            k.pools.push(&dataset.pool);
            k.owners.push(&dataset.owner);
            k.names.push(&dataset.name);
            k.index.push(slot as i32);
        }
        k
    }
}

/// The distinct (dataset, guest) pairs of a batch, whose grants it locks: each pair's group,
/// actor and slot, and each item's pair (`None` for the owner, who needs no grant).
struct Guests<'a> {
    groups: Vec<i32>,
    actors: Vec<&'a str>,
    pairs: Vec<i32>,
    pair_of: Vec<Option<usize>>,
}

impl<'a> Guests<'a> {
    fn of(items: &'a [Item], groups: &[Vec<usize>]) -> Self {
        let mut guests = Guests {
            groups: Vec::new(),
            actors: Vec::new(),
            pairs: Vec::new(),
            pair_of: vec![None; items.len()],
        };
        let mut seen: HashMap<(usize, &str), usize> = HashMap::new();
        for (g, members) in groups.iter().enumerate() {
            for &i in members.iter().filter(|&&i| !is_owner(&items[i])) {
                let actor = items[i].request.actor.as_str();
                let p = *seen.entry((g, actor)).or_insert_with(|| {
                    guests.groups.push(g as i32);
                    guests.actors.push(actor);
                    guests.pairs.push(guests.pairs.len() as i32);
                    guests.pairs.len() - 1
                });
                guests.pair_of[i] = Some(p);
            }
        }
        guests
    }
}

/// The slot whose index is in `row`'s column `at`.
fn slot<'s, T>(slots: &'s mut [T], row: &Row, at: usize) -> Result<Option<&'s mut T>, CallError> {
    let i: i32 = row.try_get(at)?;
    Ok(usize::try_from(i).ok().and_then(|i| slots.get_mut(i)))
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
    /// A committed update's log entry goes to `log`. The outer error is one the whole
    /// batch fails with; the inner result is the update's.
    fn decide<'a>(
        &mut self,
        limits: &Limits,
        item: &'a Item,
        can_write: bool,
        now: i64,
        log: &mut write::LogColumns<'a>,
    ) -> Result<Result<UpdateOutcome, StoreError>, CallError> {
        let request = &item.request;
        if !can_write {
            return Ok(Err(forbidden(&request.dataset, &request.actor, "write")));
        }
        if let Some(conflict) = decision::conflict(&self.state, &item.patches, &self.records) {
            return Ok(Ok(conflict));
        }
        // Deleted datasets take the single path, so nothing here creates one.
        let plan = match decision::plan(
            limits,
            request,
            &item.patches,
            &self.state,
            &self.records,
            None,
            now,
        ) {
            Ok(plan) => plan,
            Err(e) => return Ok(Err(e)),
        };
        log.push_update(self.id, request, &plan, &self.records)?;
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
        Ok(Ok(plan.committed(&request.dataset, self.records.clone())))
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
