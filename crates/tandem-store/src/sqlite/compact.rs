//! Commit log compaction on SQLite (see `Store::compact_log`), run by the writer thread a
//! statement at a time between group commits: each step deletes at most
//! [`COMPACT_CHUNK`] entries in its own transaction, and the writer commits what queued
//! meanwhile before the next step, so a large backlog (a consumer that let go of millions
//! of entries) does not hold up commits.

use super::db_err;
use super::writer::Reply;
use crate::commitlog::{COMPACT_CHUNK, CompactBounds, CompactReport, CompactTally};
use crate::{DatasetKey, Limits, StoreError};
use rusqlite::{Connection, params};
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
    /// Deleting each listed dataset's entries below its cut (the id of its newest entry
    /// to keep); the last dataset is done first.
    Count(Round, Vec<(DatasetKey, i64)>),
}

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
                let Some((dataset, cut)) = over.last() else {
                    return Ok(Some(self.tally.finish(forced_total, &round.consumers)));
                };
                let deleted = delete_below(conn, &round.bounds, dataset, *cut)?;
                self.tally.add(&round.bounds, &deleted);
                if (deleted.len() as i64) < COMPACT_CHUNK {
                    over.pop();
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

/// Deletes a chunk of the oldest entries past their age. Entries are in time order by id
/// (up to clock steps), so the aged ones are those below the first recent one, found by
/// walking the rowids (no index on time: it would cost pages in every group commit), and
/// only as far as the round may delete.
fn delete_aged(conn: &Connection, bounds: &CompactBounds) -> Result<Vec<i64>, StoreError> {
    conn.prepare_cached(
        "DELETE FROM commit_log WHERE id IN (
             SELECT id FROM commit_log
             WHERE id <= ?2 AND id < coalesce(
                 (SELECT id FROM commit_log WHERE id <= ?2 AND server_time >= ?1
                  ORDER BY id LIMIT 1),
                 ?2 + 1)
             ORDER BY id LIMIT ?3)
         RETURNING id",
    )
    .and_then(|mut stmt| {
        stmt.query_map(
            params![bounds.cutoff, bounds.keep_above, COMPACT_CHUNK],
            |r| r.get(0),
        )?
        .collect()
    })
    .map_err(db_err)
}

/// The datasets with more than `max_entries` entries, each with the id of the oldest entry
/// it keeps. Only datasets over the cap are looked at twice, so a log within its bounds
/// costs one read of the index.
fn over_cap(conn: &Connection, max_entries: i64) -> Result<Vec<(DatasetKey, i64)>, StoreError> {
    conn.prepare_cached(
        "SELECT o.pool, o.owner, o.name,
                (SELECT id FROM commit_log c
                 WHERE c.pool = o.pool AND c.owner = o.owner AND c.name = o.name
                 ORDER BY id DESC LIMIT 1 OFFSET ?1 - 1)
         FROM (SELECT pool, owner, name FROM commit_log
               GROUP BY pool, owner, name HAVING count(*) > ?1) o",
    )
    .and_then(|mut stmt| {
        stmt.query_map(params![max_entries], |r| {
            Ok((
                DatasetKey::new(
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ),
                r.get(3)?,
            ))
        })?
        .collect()
    })
    .map_err(db_err)
}

/// Deletes a chunk of `dataset`'s entries below `cut`, on the dataset's index.
fn delete_below(
    conn: &Connection,
    bounds: &CompactBounds,
    dataset: &DatasetKey,
    cut: i64,
) -> Result<Vec<i64>, StoreError> {
    conn.prepare_cached(
        "DELETE FROM commit_log WHERE id IN (
             SELECT id FROM commit_log
             WHERE pool = ?1 AND owner = ?2 AND name = ?3 AND id < ?4 AND id <= ?5
             ORDER BY id LIMIT ?6)
         RETURNING id",
    )
    .and_then(|mut stmt| {
        stmt.query_map(
            params![
                dataset.pool,
                dataset.owner,
                dataset.name,
                cut,
                bounds.keep_above,
                COMPACT_CHUNK
            ],
            |r| r.get(0),
        )?
        .collect()
    })
    .map_err(db_err)
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
}
