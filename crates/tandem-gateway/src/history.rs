//! Version history and restore, for the WebSocket requests (`history`, `read_at`, `restore`)
//! and the REST API (`/v1/datasets/{owner}/{name}/…`) alike: the store reads the commit log
//! and the past states; a restore is one new commit through the normal update path (the
//! sync hook is asked, the limits apply, subscribers are pushed it, it is logged), so history
//! is never rewritten.

use crate::Gateway;
use crate::hook::{Checked, HookError};
use crate::metrics::Metrics;
use crate::rate::RateLimiter;
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::{
    CommitKind, ErrorCode, HistoryEntry, LimitCode, Patch, Record, RequestId, ServerFrame,
};
use tandem_store::{DatasetKey, LogEntry, LogKind, StoreError, UpdateOutcome, UpdateRequest};

/// Entries in a `history` page when the request names no `limit`.
pub(crate) const DEFAULT_HISTORY_PAGE: usize = 50;

/// How many times a restore reads and writes again when a concurrent commit made its
/// patches stale, before it gives up with `conflict`.
const RESTORE_ATTEMPTS: usize = 4;

/// One page of a dataset's history.
pub(crate) struct Page {
    /// The dataset's sync count, read just before the page.
    pub sync_count: u64,
    pub entries: Vec<HistoryEntry>,
    /// The `before` of the next (older) page; `None` on the last one.
    pub next: Option<i64>,
}

/// A page of `identity`'s view of the dataset's history, below entry `before`. `limit` 0 is
/// a bad request; above `max_history_page` it is lowered to it.
pub(crate) async fn history(
    gw: &Gateway,
    identity: &str,
    key: &DatasetKey,
    before: Option<i64>,
    limit: Option<u32>,
) -> Result<Page, StoreError> {
    let limit = match limit {
        Some(0) => return Err(StoreError::BadRequest("limit must be at least 1".into())),
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
        None => DEFAULT_HISTORY_PAGE,
    }
    .min(gw.config.max_history_page.max(1));
    // Nothing changed above `u64::MAX`: this reads the sync count (and checks access) only.
    let sync_count = gw.store.changes(key, identity, u64::MAX).await?.sync_count;
    // One more than the page, to know whether there is a next one.
    let mut entries = gw
        .store
        .history(key, identity, before, limit.saturating_add(1))
        .await?;
    let next = if entries.len() > limit {
        entries.truncate(limit);
        entries.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Page {
        sync_count,
        entries: entries.iter().map(wire_entry).collect(),
        next,
    })
}

/// A commit log entry as the protocol shows it.
pub(crate) fn wire_entry(entry: &LogEntry) -> HistoryEntry {
    let (grantee, access) = match entry.grant() {
        Some((grantee, access)) => (Some(grantee), access),
        None => (None, None),
    };
    HistoryEntry {
        id: entry.id,
        kind: match entry.kind {
            LogKind::Update => CommitKind::Update,
            LogKind::Delete => CommitKind::Delete,
            LogKind::Grant => CommitKind::Grant,
            LogKind::Revoke => CommitKind::Revoke,
            LogKind::Merge => CommitKind::Merge,
            // `Store::history` lists commits only; a replay's snapshot is none.
            LogKind::Snapshot => CommitKind::Unknown,
        },
        sync_count: entry.sync_count,
        actor: entry.actor.clone(),
        device_id: entry.device_id.clone(),
        time: entry.server_time,
        keys: entry.keys(),
        grantee,
        access,
    }
}

/// Why a restore wrote nothing.
#[derive(Debug)]
pub(crate) enum RestoreError {
    Store(StoreError),
    /// The sync hook refused the restore's commit.
    Rejected(String),
    /// The sync hook gave no verdict.
    Hook(HookError),
    /// Other commits kept making the restore's patches stale.
    Conflict,
}

impl RestoreError {
    /// The error frame (or REST body) that says why.
    pub(crate) fn frame(self, id: Option<RequestId>) -> ServerFrame {
        match self {
            RestoreError::Store(e) => crate::session::store_error(id, &e),
            RestoreError::Rejected(message) => ServerFrame::error(id, ErrorCode::Rejected, message),
            RestoreError::Hook(e) => ServerFrame::error(id, ErrorCode::Unavailable, e.to_string()),
            RestoreError::Conflict => ServerFrame::error(
                id,
                ErrorCode::Conflict,
                "the dataset kept changing while it was restored; nothing was written, restore again",
            ),
        }
    }
}

impl From<StoreError> for RestoreError {
    fn from(e: StoreError) -> Self {
        RestoreError::Store(e)
    }
}

/// Makes the dataset what it was right after the commit at `sync_count`, as one new commit
/// by `identity` (which needs write access): the patches that turn the current records
/// into those are committed through the sync hook and the store, and the commit is published
/// like any other. Returns the dataset's sync count after it: the new commit's, or the
/// current one when nothing differs (then nothing is written). A commit that lands between
/// the read and the write on a key the restore writes makes it start over; one on other
/// keys is kept (it came before the restore, which does not undo it).
pub(crate) async fn restore(
    gw: &Gateway,
    identity: &str,
    key: &DatasetKey,
    sync_count: u64,
    device_id: Option<String>,
) -> Result<u64, RestoreError> {
    // Checked first, so that a reader learns it may not restore even when nothing differs.
    match gw.store.access(key, identity).await? {
        Some(access) if access.can_write() => {}
        _ => return Err(StoreError::forbidden(key, identity, "write").into()),
    }
    for _ in 0..RESTORE_ATTEMPTS {
        let current = gw.store.snapshot(key, identity).await?;
        let past = gw.store.read_at(key, identity, sync_count).await?;
        let patches = diff(&current.records, &past.records);
        if patches.is_empty() {
            return Ok(current.sync_count);
        }
        let patches =
            match crate::hook::check_update(gw, identity, key, device_id.as_deref(), patches)
                .await?
            {
                Checked::Commit(patches) => patches,
                Checked::Rejected(message) | Checked::LambdaRejected(message) => {
                    return Err(RestoreError::Rejected(message));
                }
                Checked::Unavailable(e) => return Err(RestoreError::Hook(e)),
            };
        let request = UpdateRequest {
            dataset: key.clone(),
            actor: identity.to_owned(),
            device_id: device_id.clone(),
            patches,
        };
        match gw.store.update(request).await? {
            UpdateOutcome::Committed { changed, snapshot } => {
                Metrics::add(&gw.metrics().commits, 1);
                let new_count = snapshot.sync_count;
                gw.hub
                    .publish_commit(
                        Arc::new(snapshot.dataset),
                        new_count,
                        snapshot.records,
                        changed,
                    )
                    .await;
                return Ok(new_count);
            }
            UpdateOutcome::Conflict { .. } => {
                Metrics::add(&gw.metrics().conflicts, 1);
            }
        }
    }
    Err(RestoreError::Conflict)
}

/// The patches that turn the live records `current` into `past`, each based on the current
/// record's sync count (0 for a key that is not live, which a tombstone accepts too). A
/// restored value is written as the server's: no device time.
fn diff(current: &[Record], past: &[Record]) -> Vec<Patch> {
    let now: BTreeMap<&str, &Record> = current.iter().map(|r| (r.key.as_str(), r)).collect();
    let then: BTreeMap<&str, &Record> = past.iter().map(|r| (r.key.as_str(), r)).collect();
    let mut patches = Vec::new();
    for (key, record) in &then {
        let base = now.get(key);
        if base.is_some_and(|b| b.value == record.value) {
            continue;
        }
        if let Some(value) = &record.value {
            patches.push(Patch::replace(
                *key,
                value.clone(),
                base.map_or(0, |b| b.sync_count),
            ));
        }
    }
    for (key, record) in &now {
        if !then.contains_key(key) {
            patches.push(Patch::remove(*key, record.sync_count));
        }
    }
    patches
}

/// Identities remembered for `max_rest_requests_per_second`; past this the map is cleared
/// (and every identity gets a fresh burst), so made-up load cannot grow it without bound.
const MAX_TRACKED_IDENTITIES: usize = 65_536;

/// The REST API's per-identity request rate.
#[derive(Debug)]
pub(crate) struct RestRate {
    rate: u32,
    buckets: Mutex<HashMap<String, RateLimiter>>,
}

impl RestRate {
    pub(crate) fn new(rate: u32) -> Self {
        RestRate {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request for `identity`, or says how long until it may make one.
    pub(crate) fn take(&self, identity: &str) -> Result<(), Duration> {
        if self.rate == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock();
        if buckets.len() >= MAX_TRACKED_IDENTITIES && !buckets.contains_key(identity) {
            buckets.clear();
        }
        buckets
            .entry(identity.to_owned())
            .or_insert_with(|| RateLimiter::per_second(self.rate))
            .take()
    }

    pub(crate) fn limit(&self) -> (LimitCode, u64) {
        (LimitCode::MaxRestRequestsPerSecond, u64::from(self.rate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &str, sync_count: u64) -> Record {
        Record {
            key: key.into(),
            value: Some(value.into()),
            sync_count,
            last_modified: 1,
            last_modified_by: "a".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    #[test]
    fn test_diff_writes_what_differs_based_on_the_current_records() {
        let now = [
            record("a", "1", 4),
            record("b", "2", 5),
            record("c", "3", 2),
        ];
        let then = [
            record("a", "1", 1),
            record("b", "old", 1),
            record("d", "4", 1),
        ];
        let patches = diff(&now, &then);
        assert_eq!(
            patches,
            vec![
                Patch::replace("b", "old", 5),
                Patch::replace("d", "4", 0),
                Patch::remove("c", 2),
            ]
        );
        assert!(diff(&now, &now).is_empty());
    }
}
