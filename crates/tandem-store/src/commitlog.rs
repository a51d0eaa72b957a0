//! The commit log: every commit (an update that wrote, a delete, a grant, a revoke, a
//! dataset moved by a merge) appends one entry in the same transaction as the commit, so
//! the log never misses a commit and never holds one that did not happen. Hooks, the change
//! stream and history read it; compaction keeps it within the retention settings.
//!
//! What an entry holds is decided here once; each backend writes and reads the rows.
//!
//! Update and delete entries carry before-images (the records as they were before the
//! commit), so history can be read backwards from the current state: [`reconstruct`] undoes
//! the entries above a sync count to give the dataset as it was at that count. Entries
//! written before before-images existed (schema 4 without them) are still read; history is
//! unavailable before the newest of them.

use crate::{DatasetKey, Limits, Snapshot, StoreError};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
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
    /// JSON, by kind:
    /// - update: the records as written, each with its before-image:
    ///   `[{"key","value","syncCount","deviceLastModified","before"}]` (`value` null for a
    ///   remove); `before` is null when the key had no stored record, else the stored record
    ///   it replaced: `{"value","syncCount","lastModified","lastModifiedBy","deviceId",
    ///   "deviceLastModified"}` (`value` null for a tombstone). Entries without `before`
    ///   were written before before-images existed.
    /// - delete: `{"records":[Record]}`, the live records as they were before the delete
    ///   (full records as the protocol writes them). The older form `[]` carries none.
    /// - grant or revoke: `{"grantee","access"}` (`access` null for a revoke).
    /// - merge: `{"fromOwner","fromName","keys"}`, `keys` the keys of the records it wrote
    ///   (absent in older entries).
    /// - snapshot (a change stream replay's, not a commit): the live records as an update's,
    ///   without `before`.
    pub patches: String,
}

/// A stored record as it was before a commit, without its key (the entry's record has it).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Before<'a> {
    #[serde(borrow)]
    value: Option<std::borrow::Cow<'a, str>>,
    sync_count: u64,
    last_modified: i64,
    #[serde(borrow)]
    last_modified_by: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    device_id: Option<std::borrow::Cow<'a, str>>,
    device_last_modified: Option<i64>,
}

impl<'a> Before<'a> {
    fn of(r: &'a Record) -> Self {
        Before {
            value: r.value.as_deref().map(Into::into),
            sync_count: r.sync_count,
            last_modified: r.last_modified,
            last_modified_by: r.last_modified_by.as_str().into(),
            device_id: r.device_id.as_deref().map(Into::into),
            device_last_modified: r.device_last_modified,
        }
    }

    fn into_record(self, key: &str) -> Record {
        Record {
            key: key.to_owned(),
            value: self.value.map(Into::into),
            sync_count: self.sync_count,
            last_modified: self.last_modified,
            last_modified_by: self.last_modified_by.into(),
            device_id: self.device_id.map(Into::into),
            device_last_modified: self.device_last_modified,
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoggedRecord<'a> {
    key: &'a str,
    value: Option<&'a str>,
    sync_count: u64,
    device_last_modified: Option<i64>,
    /// `Some(None)` (null) for a key without a stored record; `None` (absent) in a
    /// snapshot, which replaces nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<Option<Before<'a>>>,
}

/// An update entry's record as read back: `before` is `None` when the entry has none (an
/// older entry), `Some(None)` when the key had no stored record.
#[derive(Deserialize)]
struct ReadRecord<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(default, borrow, deserialize_with = "present")]
    before: Option<Option<Before<'a>>>,
}

/// A field that is present (even as null) reads as `Some`; a missing one, by `default`, as
/// `None`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Serialize, Deserialize)]
struct Deleted {
    records: Vec<Record>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Merged<'a> {
    #[serde(borrow)]
    from_owner: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    from_name: std::borrow::Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    keys: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Granted {
    grantee: String,
    access: Option<String>,
}

impl LogEntry {
    /// The keys the commit changed: for an update the records it wrote, for a delete the
    /// live records it removed, for a merge the records it wrote; `None` for a grant or a
    /// revoke, and for an older delete or merge entry that does not say.
    pub fn keys(&self) -> Option<Vec<String>> {
        match self.kind {
            LogKind::Update => serde_json::from_str::<Vec<ReadRecord<'_>>>(&self.patches)
                .ok()
                .map(|records| records.into_iter().map(|r| r.key.into_owned()).collect()),
            LogKind::Delete => serde_json::from_str::<Deleted>(&self.patches)
                .ok()
                .map(|d| d.records.into_iter().map(|r| r.key).collect()),
            LogKind::Merge => serde_json::from_str::<Merged<'_>>(&self.patches)
                .ok()
                .and_then(|m| m.keys),
            // A snapshot changes nothing (and `history` never lists one).
            LogKind::Grant | LogKind::Revoke | LogKind::Snapshot => None,
        }
    }

    /// A grant's or revoke's grantee and the access granted (`None` for a revoke); `None`
    /// for other kinds.
    pub fn grant(&self) -> Option<(String, Option<Access>)> {
        if !matches!(self.kind, LogKind::Grant | LogKind::Revoke) {
            return None;
        }
        let granted: Granted = serde_json::from_str(&self.patches).ok()?;
        let access = granted.access.as_deref().and_then(Access::parse);
        Some((granted.grantee, access))
    }

    /// Undoes this commit on `state` (live records by key), turning the dataset as it was
    /// right after the commit into the dataset as it was right before it. `false` when the
    /// entry carries no before-images, so it cannot be undone.
    fn undo(&self, state: &mut BTreeMap<String, Record>) -> bool {
        match self.kind {
            LogKind::Update => {
                let Ok(records) = serde_json::from_str::<Vec<ReadRecord<'_>>>(&self.patches) else {
                    return false;
                };
                for record in records {
                    let Some(before) = record.before else {
                        return false;
                    };
                    match before {
                        Some(b) if b.value.is_some() => {
                            state.insert(record.key.to_string(), b.into_record(&record.key));
                        }
                        _ => {
                            state.remove(record.key.as_ref());
                        }
                    }
                }
                true
            }
            LogKind::Delete => match serde_json::from_str::<Deleted>(&self.patches) {
                Ok(deleted) => {
                    *state = deleted
                        .records
                        .into_iter()
                        .map(|r| (r.key.clone(), r))
                        .collect();
                    true
                }
                Err(_) => false,
            },
            // A merge writes a dataset that was not live before (see `Store::merge_identity`).
            LogKind::Merge => {
                state.clear();
                true
            }
            LogKind::Grant | LogKind::Revoke | LogKind::Snapshot => true,
        }
    }
}

/// Reads a dataset backwards to the commit at a target sync count: from its current state
/// (a [`Snapshot`] read in the same transaction as the entries), undo its update, delete and
/// merge entries newest first (by id: per dataset the commit order), one at a time, so that
/// a backend can stream them and hold no more than the dataset and one entry. Every commit
/// above the target must come by and carry before-images, else the answer is
/// `HistoryUnavailable`.
pub(crate) struct Rewind {
    /// The current state itself, when it is the target.
    current: Option<Snapshot>,
    dataset: DatasetKey,
    target: u64,
    /// The sync count of the next entry to undo: each commit raised it by one.
    next: u64,
    state: BTreeMap<String, Record>,
    /// The commit at the target was a delete.
    deleted: bool,
    /// The entry at the target was seen: no more are needed.
    done: bool,
}

impl Rewind {
    /// `BadRequest` for a target above the current sync count.
    pub(crate) fn new(current: Snapshot, target: u64) -> Result<Rewind, StoreError> {
        if target > current.sync_count {
            return Err(StoreError::BadRequest(format!(
                "sync count {target} is above the dataset's current sync count {}",
                current.sync_count
            )));
        }
        let at_target = target == current.sync_count;
        let state = if at_target {
            BTreeMap::new()
        } else {
            current
                .records
                .iter()
                .map(|r| (r.key.clone(), r.clone()))
                .collect()
        };
        Ok(Rewind {
            dataset: current.dataset.clone(),
            next: current.sync_count,
            current: at_target.then_some(current),
            target,
            state,
            deleted: false,
            done: at_target,
        })
    }

    /// Whether more entries are needed.
    pub(crate) fn wants_more(&self) -> bool {
        !self.done
    }

    /// Undoes the next entry (newest first); entries below the target are ignored.
    pub(crate) fn undo(&mut self, entry: &LogEntry) -> Result<(), StoreError> {
        if self.done || entry.sync_count < self.target {
            return Ok(());
        }
        if entry.sync_count == self.target && self.next == self.target {
            // The commit at the target itself: only whether it was a delete matters.
            self.deleted = entry.kind == LogKind::Delete;
            self.done = true;
            return Ok(());
        }
        if entry.sync_count != self.next || !entry.undo(&mut self.state) {
            return Err(self.unavailable());
        }
        self.next -= 1;
        Ok(())
    }

    /// The dataset at the target, once the entries ran out: `HistoryUnavailable` unless
    /// every commit above it was undone.
    pub(crate) fn finish(self) -> Result<Snapshot, StoreError> {
        if let Some(current) = self.current {
            return Ok(current);
        }
        if self.next != self.target {
            return Err(self.unavailable());
        }
        Ok(Snapshot {
            dataset: self.dataset,
            sync_count: self.target,
            records: self.state.into_values().collect(),
            deleted: self.deleted,
        })
    }

    fn unavailable(&self) -> StoreError {
        StoreError::HistoryUnavailable {
            dataset: self.dataset.to_string(),
            sync_count: self.target,
        }
    }
}

/// [`Rewind`] over entries in any order (sorted here, newest first).
#[cfg(test)]
fn reconstruct(
    current: Snapshot,
    mut entries: Vec<LogEntry>,
    target: u64,
) -> Result<Snapshot, StoreError> {
    entries.sort_by(|a, b| b.sync_count.cmp(&a.sync_count).then(b.id.cmp(&a.id)));
    let mut rewind = Rewind::new(current, target)?;
    for entry in &entries {
        if !rewind.wants_more() {
            break;
        }
        rewind.undo(entry)?;
    }
    rewind.finish()
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising plain structs of strings and numbers cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// An update's patches as applied: the records it wrote, as stored, each with the stored
/// record it replaced (`stored` holds at least every written key's, as the decision reads
/// them).
pub(crate) fn records_json(records: &[Record], stored: &BTreeMap<String, Record>) -> String {
    let logged: Vec<LoggedRecord<'_>> = records
        .iter()
        .map(|r| LoggedRecord {
            key: &r.key,
            value: r.value.as_deref(),
            sync_count: r.sync_count,
            device_last_modified: r.device_last_modified,
            before: Some(stored.get(&r.key).map(Before::of)),
        })
        .collect();
    to_json(&logged)
}

/// A snapshot's patches (a replay's, not a commit): the live records, without before-images.
pub(crate) fn snapshot_json(records: &[Record]) -> String {
    let logged: Vec<LoggedRecord<'_>> = records
        .iter()
        .map(|r| LoggedRecord {
            key: &r.key,
            value: r.value.as_deref(),
            sync_count: r.sync_count,
            device_last_modified: r.device_last_modified,
            before: None,
        })
        .collect();
    to_json(&logged)
}

/// A delete's patches: the live records it removed, as they were.
pub(crate) fn delete_json(live: &[Record]) -> String {
    #[derive(Serialize)]
    struct Deleted<'a> {
        records: &'a [Record],
    }
    to_json(&Deleted { records: live })
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

/// A merged copy's patches: where it came from and the keys it wrote.
pub(crate) fn merge_json(from_owner: &str, from_name: &str, keys: Vec<String>) -> String {
    to_json(&Merged {
        from_owner: from_owner.into(),
        from_name: from_name.into(),
        keys: Some(keys),
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_POOL;

    fn entry(kind: LogKind, sync_count: u64, patches: &str) -> LogEntry {
        LogEntry {
            id: i64::try_from(sync_count).unwrap_or_default(),
            dataset: DatasetKey::new(DEFAULT_POOL, "alice", "ds"),
            kind,
            sync_count,
            actor: "alice".into(),
            device_id: None,
            server_time: 0,
            patches: patches.into(),
        }
    }

    fn now(sync_count: u64, records: Vec<Record>) -> Snapshot {
        Snapshot {
            dataset: DatasetKey::new(DEFAULT_POOL, "alice", "ds"),
            sync_count,
            records,
            deleted: false,
        }
    }

    fn record(key: &str, value: &str, sync_count: u64) -> Record {
        Record {
            key: key.into(),
            value: Some(value.into()),
            sync_count,
            last_modified: 5,
            last_modified_by: "alice".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    #[test]
    fn test_entries_without_before_images_end_history() {
        // Written before before-images: the record has no `before`, the delete is `[]`.
        let old_update = r#"[{"key":"k","value":"2","syncCount":2,"deviceLastModified":null}]"#;
        let result = reconstruct(
            now(2, vec![record("k", "2", 2)]),
            vec![entry(LogKind::Update, 2, old_update)],
            1,
        );
        assert!(matches!(
            result,
            Err(StoreError::HistoryUnavailable { sync_count: 1, .. })
        ));
        let old_delete = reconstruct(now(3, vec![]), vec![entry(LogKind::Delete, 3, "[]")], 2);
        assert!(matches!(
            old_delete,
            Err(StoreError::HistoryUnavailable { .. })
        ));
        // Their keys are still read where the entry has them.
        assert_eq!(
            entry(LogKind::Update, 2, old_update).keys(),
            Some(vec!["k".to_owned()])
        );
        assert_eq!(entry(LogKind::Delete, 3, "[]").keys(), None);
    }

    #[test]
    fn test_reconstruct_undoes_in_sync_count_order_and_needs_every_commit() {
        let before = record("k", "1", 1);
        let written = record("k", "2", 2);
        let stored = BTreeMap::from([("k".to_owned(), before.clone())]);
        let update = entry(
            LogKind::Update,
            2,
            &records_json(std::slice::from_ref(&written), &stored),
        );
        let new_key = entry(
            LogKind::Update,
            3,
            &records_json(&[record("n", "x", 3)], &BTreeMap::new()),
        );
        let current = now(3, vec![record("n", "x", 3), written]);
        let at_1 = reconstruct(current.clone(), vec![update.clone(), new_key.clone()], 1)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(at_1.records, vec![before]);
        // A gap (the entry at 3 compacted away) is unavailable, not a wrong answer.
        assert!(matches!(
            reconstruct(current.clone(), vec![update], 1),
            Err(StoreError::HistoryUnavailable { .. })
        ));
        assert!(matches!(
            reconstruct(current, vec![new_key], 4),
            Err(StoreError::BadRequest(_))
        ));
    }
}
