//! The commit log: every commit (an update that wrote, a delete, a grant, a revoke, a
//! dataset moved by a merge) appends one entry in the same transaction as the commit, so
//! the log never misses a commit and never holds one that did not happen. Hooks, the change
//! stream and history read it; compaction keeps it within the retention settings.
//!
//! What an entry holds is decided here once; each backend writes and reads the rows.

use crate::{DatasetKey, Limits};
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_protocol::{Access, Record};

/// What kind of commit an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogKind {
    Update,
    Delete,
    Grant,
    Revoke,
    /// A dataset written by a merge, on its target (the guest's copy is logged as a delete).
    Merge,
    /// A dataset's live records as they are, appended by a replay (`Store::log_snapshot`)
    /// for the change stream; it changes nothing.
    Snapshot,
}

impl LogKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LogKind::Update => "update",
            LogKind::Delete => "delete",
            LogKind::Grant => "grant",
            LogKind::Revoke => "revoke",
            LogKind::Merge => "merge",
            LogKind::Snapshot => "snapshot",
        }
    }

    pub fn parse(s: &str) -> Option<LogKind> {
        Some(match s {
            "update" => LogKind::Update,
            "delete" => LogKind::Delete,
            "grant" => LogKind::Grant,
            "revoke" => LogKind::Revoke,
            "merge" => LogKind::Merge,
            "snapshot" => LogKind::Snapshot,
            _ => return None,
        })
    }
}

/// One commit as the log holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    /// Store-wide and increasing: a consumer resumes after the last id it handled.
    pub id: i64,
    pub dataset: DatasetKey,
    pub kind: LogKind,
    /// The dataset's sync count after an update, delete or merge; its current one (0 if it
    /// never existed) at a grant or revoke.
    pub sync_count: u64,
    pub actor: String,
    pub device_id: Option<String>,
    /// Milliseconds since the epoch, by the server's clock.
    pub server_time: i64,
    /// JSON: for an update, the records as written (`[{"key","value","syncCount",
    /// "deviceLastModified"}]`, `value` null for a remove); for a delete, `[]`; for a grant
    /// or revoke, `{"grantee","access"}` (`access` null for a revoke); for a merge,
    /// `{"fromOwner","fromName"}`; for a snapshot, the live records as an update's.
    pub patches: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedRecord<'a> {
    key: &'a str,
    value: Option<&'a str>,
    sync_count: u64,
    device_last_modified: Option<i64>,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// An update's patches as applied: the records it wrote, as stored.
pub(crate) fn records_json(records: &[Record]) -> String {
    let logged: Vec<LoggedRecord<'_>> = records
        .iter()
        .map(|r| LoggedRecord {
            key: &r.key,
            value: r.value.as_deref(),
            sync_count: r.sync_count,
            device_last_modified: r.device_last_modified,
        })
        .collect();
    to_json(&logged)
}

/// A grant's (`Some`) or revoke's (`None`) patches.
pub(crate) fn grant_json(grantee: &str, access: Option<Access>) -> String {
    #[derive(Serialize)]
    struct Grant<'a> {
        grantee: &'a str,
        access: Option<&'a str>,
    }
    to_json(&Grant {
        grantee,
        access: access.as_ref().map(|a| a.as_str()),
    })
}

/// A merged copy's patches: where it came from.
pub(crate) fn merge_json(from_owner: &str, from_name: &str) -> String {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Merge<'a> {
        from_owner: &'a str,
        from_name: &'a str,
    }
    to_json(&Merge {
        from_owner,
        from_name,
    })
}

pub(crate) const DELETE_JSON: &str = "[]";

/// How often a store compacts its log.
pub(crate) const COMPACT_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// What a compaction deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Entries deleted.
    pub dropped: u64,
    /// Of those, entries some change stream consumer had not acknowledged, deleted because
    /// they were more than `Limits::commit_log_hard_cap_entries` below the log head.
    pub forced: u64,
}

/// The most entries one compaction statement deletes: a backlog goes a chunk at a time, so
/// no statement (and on SQLite no write transaction) runs for long.
pub(crate) const COMPACT_CHUNK: i64 = 1000;

/// What a compaction round may delete, fixed at its start.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CompactBounds {
    /// Entries with an id above this stay: the store's newest entry (so no id is handed out
    /// again) and what a consumer has not acknowledged, unless it is more than the hard cap
    /// below the head.
    pub keep_above: i64,
    /// The smallest consumer position, if there are consumers: deleting an entry above it
    /// is a forced drop.
    pub floor: Option<i64>,
    /// Entries older than this (ms) are past their age.
    pub cutoff: i64,
    /// Entries kept per dataset (at least one).
    pub max_entries: i64,
}

impl CompactBounds {
    /// `head`: the newest id; `floor`: the smallest consumer position.
    pub(crate) fn new(limits: &Limits, now: i64, head: i64, floor: Option<i64>) -> Self {
        let max_age_ms =
            i64::try_from(limits.commit_log_max_age_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        let hard_cap = i64::try_from(limits.commit_log_hard_cap_entries).unwrap_or(i64::MAX);
        let newest_stays = head.saturating_sub(1);
        let keep_above = match floor {
            Some(floor) => newest_stays.min(floor.max(head.saturating_sub(hard_cap))),
            None => newest_stays,
        };
        CompactBounds {
            keep_above,
            floor,
            cutoff: now.saturating_sub(max_age_ms),
            max_entries: i64::try_from(limits.commit_log_max_entries_per_dataset.max(1))
                .unwrap_or(i64::MAX),
        }
    }
}

/// A compaction round's running totals.
#[derive(Debug, Default)]
pub(crate) struct CompactTally {
    pub report: CompactReport,
    /// The largest id a forced drop deleted.
    pub forced_up_to: i64,
}

impl CompactTally {
    /// Counts one chunk's deleted ids.
    pub(crate) fn add(&mut self, bounds: &CompactBounds, deleted: &[i64]) {
        self.report.dropped += deleted.len() as u64;
        if let Some(floor) = bounds.floor {
            for &id in deleted.iter().filter(|&&id| id > floor) {
                self.report.forced += 1;
                self.forced_up_to = self.forced_up_to.max(id);
            }
        }
    }

    /// Adds the forced drops to the store's running count and says which consumers lost
    /// entries. `consumers`: every consumer's name and position.
    pub(crate) fn finish(
        &self,
        forced_total: &AtomicU64,
        consumers: &[(String, i64)],
    ) -> CompactReport {
        if self.report.forced > 0 {
            forced_total.fetch_add(self.report.forced, Ordering::Relaxed);
            let behind: Vec<&str> = consumers
                .iter()
                .filter(|(_, position)| *position < self.forced_up_to)
                .map(|(name, _)| name.as_str())
                .collect();
            tracing::warn!(
                forced = self.report.forced,
                up_to_id = self.forced_up_to,
                consumers = ?behind,
                "commit log past its hard cap: compaction dropped entries change stream \
                 consumers had not acknowledged"
            );
        }
        self.report
    }
}
