//! Commit log compaction on SQLite (see `Store::compact_log`), run by the writer thread a
//! statement at a time between group commits: each step deletes at most
//! [`COMPACT_CHUNK`] entries in its own transaction, and the writer commits what queued
//! meanwhile before the next step, so a large backlog (a consumer that let go of millions
//! of entries) does not hold up commits.

use super::db_err;
use super::writer::Reply;
use crate::commitlog::{COMPACT_CHUNK, CompactBounds, CompactReport, CompactTally};
use crate::{DatasetKey, Limits, StoreError};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;

/// One compaction round in progress.
pub(super) struct Compaction {
    now: i64,
    /// Whom to answer (`None` for the writer's own periodic round).
    pub(super) reply: Option<Reply>,
    state: State,
    tally: CompactTally,
}

enum State {
    Start,
    /// Deleting entries past their age, oldest first.
    Age(Round),
    /// Trimming each listed dataset to its newest entries; the last one is done first.
    Count(Round, Vec<Trim>),
}

/// A dataset over the count cap, and where along its chain (newest first) the trim is.
struct Trim {
    dataset: DatasetKey,
    at: TrimAt,
}

enum TrimAt {
    /// From the head: walk past the entries to keep.
    Head(i64),
    /// Deleting from this id down.
    Below(i64),
}

/// Chain links one step may follow, so a long walk (entries a lagging consumer still
/// needs, skipped) is spread over several steps too.
const WALK_PER_STEP: usize = 4 * COMPACT_CHUNK as usize;

/// What the round may delete, and the consumers' positions (for the warning).
struct Round {
    bounds: CompactBounds,
    consumers: Vec<(String, i64)>,
}

impl Compaction {
    pub(super) fn new(now: i64, reply: Option<Reply>) -> Self {
        Compaction {
            now,
            reply,
            state: State::Start,
            tally: CompactTally::default(),
        }
    }

    /// Runs one step (at most one delete statement); the report once the round is done.
    pub(super) fn step(
        &mut self,
        conn: &Connection,
        limits: &Limits,
        forced_total: &AtomicU64,
    ) -> Result<Option<CompactReport>, StoreError> {
        match std::mem::replace(&mut self.state, State::Start) {
            State::Start => {
                let round = start(conn, limits, self.now)?;
                self.state = State::Age(round);
                self.step(conn, limits, forced_total)
            }
            State::Age(round) => {
                let deleted = delete_aged(conn, &round.bounds)?;
                self.tally.add(&round.bounds, &deleted);
                self.state = if deleted.len() as i64 == COMPACT_CHUNK {
                    State::Age(round)
                } else {
                    let over = over_cap(conn, round.bounds.max_entries)?;
                    State::Count(round, over)
                };
                Ok(None)
            }
            State::Count(round, mut over) => {
                let Some(trim) = over.last_mut() else {
                    return Ok(Some(self.tally.finish(forced_total, &round.consumers)));
                };
                let next = match trim.at {
                    TrimAt::Head(head) => first_to_drop(conn, head, round.bounds.max_entries)?,
                    TrimAt::Below(from) => {
                        let (deleted, next) =
                            delete_chain(conn, &round.bounds, &trim.dataset, from)?;
                        self.tally.add(&round.bounds, &deleted);
                        next
                    }
                };
                match next {
                    Some(id) => trim.at = TrimAt::Below(id),
                    None => {
                        over.pop();
                    }
                }
                self.state = State::Count(round, over);
                Ok(None)
            }
        }
    }
}

/// The round's bounds, from the log head and the consumers' positions now.
fn start(conn: &Connection, limits: &Limits, now: i64) -> Result<Round, StoreError> {
    let head: i64 = conn
        .prepare_cached("SELECT coalesce(max(id), 0) FROM commit_log")
        .and_then(|mut stmt| stmt.query_row([], |r| r.get(0)))
        .map_err(db_err)?;
    let consumers: Vec<(String, i64)> = conn
        .prepare_cached("SELECT name, position FROM stream_consumers")
        .and_then(|mut stmt| {
            stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(db_err)?;
    let floor = consumers.iter().map(|(_, position)| *position).min();
    Ok(Round {
        bounds: CompactBounds::new(limits, now, head, floor),
        consumers,
    })
}

/// Deletes a chunk of the oldest entries past their age, and takes them off their
/// datasets' entry counts. Entries are in time order by id (up to clock steps), so the aged
/// ones are those below the first recent one, found by walking the rowids (no index on
/// time: it would cost pages in every group commit), and only as far as the round may
/// delete.
fn delete_aged(conn: &Connection, bounds: &CompactBounds) -> Result<Vec<i64>, StoreError> {
    let rows: Vec<(i64, DatasetKey)> = conn
        .prepare_cached(
            "DELETE FROM commit_log WHERE id IN (
                 SELECT id FROM commit_log
                 WHERE id <= ?2 AND id < coalesce(
                     (SELECT id FROM commit_log WHERE id <= ?2 AND server_time >= ?1
                      ORDER BY id LIMIT 1),
                     ?2 + 1)
                 ORDER BY id LIMIT ?3)
             RETURNING id, pool, owner, name",
        )
        .and_then(|mut stmt| {
            stmt.query_map(
                params![bounds.cutoff, bounds.keep_above, COMPACT_CHUNK],
                |r| {
                    Ok((
                        r.get(0)?,
                        DatasetKey::new(
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                        ),
                    ))
                },
            )?
            .collect()
        })
        .map_err(db_err)?;
    let mut per_dataset: HashMap<&DatasetKey, i64> = HashMap::new();
    for (_, dataset) in &rows {
        *per_dataset.entry(dataset).or_default() += 1;
    }
    for (dataset, dropped) in per_dataset {
        uncount(conn, dataset, dropped)?;
    }
    Ok(rows.into_iter().map(|(id, _)| id).collect())
}

/// Takes `dropped` entries off a dataset's count; a dataset left with none loses its head
/// row, so the heads stay one row per dataset that has entries.
fn uncount(conn: &Connection, dataset: &DatasetKey, dropped: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE commit_log_heads SET entries = entries - ?4
         WHERE pool = ?1 AND owner = ?2 AND name = ?3",
    )
    .and_then(|mut stmt| stmt.execute(params![dataset.pool, dataset.owner, dataset.name, dropped]))
    .map_err(db_err)?;
    conn.prepare_cached(
        "DELETE FROM commit_log_heads
         WHERE pool = ?1 AND owner = ?2 AND name = ?3 AND entries <= 0",
    )
    .and_then(|mut stmt| stmt.execute(params![dataset.pool, dataset.owner, dataset.name]))
    .map_err(db_err)?;
    Ok(())
}

/// The datasets with more than `max_entries` entries and a tenth: a trim walks the kept
/// entries' chain, so it waits until there is a tenth's worth to drop (the count stays
/// within 10 % of the cap between rounds, and exact for caps below ten).
fn over_cap(conn: &Connection, max_entries: i64) -> Result<Vec<Trim>, StoreError> {
    conn.prepare_cached(
        "SELECT pool, owner, name, head FROM commit_log_heads WHERE entries > ?1 + ?1 / 10",
    )
    .and_then(|mut stmt| {
        stmt.query_map(params![max_entries], |r| {
            Ok(Trim {
                dataset: DatasetKey::new(
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ),
                at: TrimAt::Head(r.get(3)?),
            })
        })?
        .collect()
    })
    .map_err(db_err)
}

/// The id of the newest entry past the `keep` newest along the chain from `head`, if the
/// chain is that long.
fn first_to_drop(conn: &Connection, head: i64, keep: i64) -> Result<Option<i64>, StoreError> {
    let mut next = Some(head);
    for _ in 0..keep {
        let Some(id) = next else {
            return Ok(None);
        };
        next = prev_of(conn, id)?.flatten();
    }
    Ok(next)
}

/// The previous entry's id of the entry `id` (`None` if `id` was dropped; `Some(None)` at
/// the chain's start).
fn prev_of(conn: &Connection, id: i64) -> Result<Option<Option<i64>>, StoreError> {
    conn.prepare_cached("SELECT prev_id FROM commit_log WHERE id = ?1")
        .and_then(|mut stmt| stmt.query_row(params![id], |r| r.get(0)).optional())
        .map_err(db_err)
}

/// Deletes a chunk of `dataset`'s chain from `from` down, past what the round must keep;
/// answers the deleted ids and where to go on (`None` at the chain's end).
fn delete_chain(
    conn: &Connection,
    bounds: &CompactBounds,
    dataset: &DatasetKey,
    from: i64,
) -> Result<(Vec<i64>, Option<i64>), StoreError> {
    let mut doomed = Vec::new();
    let mut next = Some(from);
    for _ in 0..WALK_PER_STEP {
        let Some(id) = next else {
            break;
        };
        if doomed.len() as i64 == COMPACT_CHUNK {
            break;
        }
        // An entry already dropped (by age) ends the chain.
        let Some(prev) = prev_of(conn, id)? else {
            next = None;
            break;
        };
        next = prev;
        if id <= bounds.keep_above {
            doomed.push(id);
        }
    }
    let mut stmt = conn
        .prepare_cached("DELETE FROM commit_log WHERE id = ?1")
        .map_err(db_err)?;
    for &id in &doomed {
        stmt.execute(params![id]).map_err(db_err)?;
    }
    uncount(conn, dataset, doomed.len() as i64)?;
    Ok((doomed, next))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each step deletes at most one chunk, so the writer commits between them.
    #[test]
    fn test_compaction_deletes_a_chunk_a_step() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2500)
             INSERT INTO commit_log (pool, owner, name, kind, sync_count, actor, server_time,
                                     patches)
             SELECT 'default', 'u', 'd' || (i % 3), 'update', i, 'u', 0, '[]' FROM n;",
        )
        .unwrap();
        let count = |conn: &Connection| -> i64 {
            conn.query_row("SELECT count(*) FROM commit_log", [], |r| r.get(0))
                .unwrap()
        };
        let forced = AtomicU64::new(0);
        let mut compaction = Compaction::new(120_000, None);
        let limits = Limits {
            commit_log_max_age_secs: 60,
            ..Limits::default()
        };
        let mut steps = Vec::new();
        let report = loop {
            let before = count(&conn);
            let done = compaction.step(&conn, &limits, &forced).unwrap();
            steps.push(before - count(&conn));
            if let Some(report) = done {
                break report;
            }
        };
        assert!(steps.iter().all(|&n| n <= COMPACT_CHUNK), "{steps:?}");
        assert_eq!(steps[..3], [1000, 1000, 499]);
        assert_eq!(report.dropped, 2499);
        assert_eq!(count(&conn), 1);
    }

    /// A dataset over its count cap is trimmed along its chain to the newest entries, in
    /// chunks, and its head row keeps the count; the kept entries still link up.
    #[test]
    fn test_compaction_trims_a_dataset_along_its_chain() {
        let mut conn = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let busy = DatasetKey::new("default", "u", "busy");
        let quiet = DatasetKey::new("default", "u", "quiet");
        for i in 1..=2500u64 {
            let key = if i % 100 == 0 { &quiet } else { &busy };
            super::super::writer::append_log(
                &conn,
                key,
                crate::LogKind::Update,
                Some(i),
                "u",
                None,
                100_000,
                "[]",
            )
            .unwrap();
        }
        let limits = Limits {
            commit_log_max_entries_per_dataset: 100,
            ..Limits::default()
        };
        let forced = AtomicU64::new(0);
        let mut compaction = Compaction::new(100_000, None);
        let report = loop {
            if let Some(report) = compaction.step(&conn, &limits, &forced).unwrap() {
                break report;
            }
        };
        assert_eq!(report.dropped, 2475 - 100);
        let heads: Vec<(String, i64)> = conn
            .prepare("SELECT name, entries FROM commit_log_heads ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(heads, [("busy".to_owned(), 100), ("quiet".to_owned(), 25)]);
        let kept = super::super::query::log(&conn, &busy, 0, 1000).unwrap();
        let counts: Vec<u64> = kept.iter().map(|e| e.sync_count).collect();
        let all: Vec<u64> = (1..=2500).filter(|i| i % 100 != 0).collect();
        assert_eq!(counts, all[all.len() - 100..]);
        // Within a tenth over the cap, nothing is walked or dropped.
        for i in 2501..=2510u64 {
            super::super::writer::append_log(
                &conn,
                &busy,
                crate::LogKind::Update,
                Some(i),
                "u",
                None,
                100_000,
                "[]",
            )
            .unwrap();
        }
        let mut compaction = Compaction::new(100_000, None);
        let report = loop {
            if let Some(report) = compaction.step(&conn, &limits, &forced).unwrap() {
                break report;
            }
        };
        assert_eq!(report.dropped, 0);
    }
}
