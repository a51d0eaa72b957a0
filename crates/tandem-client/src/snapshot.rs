//! Dataset snapshots: one immutable view of a dataset's visible content, replaced by a new
//! one with a higher version whenever that content changes, local edits included. What a UI
//! renders from (`Dataset::snapshot`, `Dataset::snapshots`, `Dataset::on_snapshot`), like
//! Firestore's `onSnapshot` and the JavaScript SDK's.

use crate::cache::DatasetCache;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;

/// One view of a dataset: the same `Arc` until something visible changes (the records, the
/// pending count, the sync count), then a new one with a higher `version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSnapshot {
    /// Goes up by one with every new snapshot of this dataset handle (it starts at 1 when
    /// the dataset is opened).
    pub version: u64,
    /// The live (not removed) records, ordered by key.
    pub records: BTreeMap<String, String>,
    /// The highest dataset sync count seen from the server.
    pub sync_count: u64,
    /// Local changes not yet acknowledged.
    pub pending: usize,
    /// `pending > 0`.
    pub has_pending_writes: bool,
    /// Whether what made this snapshot came from the server (a push, an ack, a subscribe's
    /// snapshot, a conflict resolution, a delete) rather than a local edit (`put`, `remove`,
    /// `discard`, `revert`).
    pub from_server: bool,
}

impl DatasetSnapshot {
    pub(crate) fn of(state: &DatasetCache, version: u64, from_server: bool) -> DatasetSnapshot {
        let pending = state.dirty_count();
        DatasetSnapshot {
            version,
            records: state
                .records
                .iter()
                .filter_map(|(k, r)| r.value.clone().map(|v| (k.clone(), v)))
                .collect(),
            sync_count: state.sync_count,
            pending,
            has_pending_writes: pending > 0,
            from_server,
        }
    }

    /// The same visible content (what a UI shows), whatever the version and origin.
    fn same_content(&self, other: &DatasetSnapshot) -> bool {
        self.sync_count == other.sync_count
            && self.pending == other.pending
            && self.records == other.records
    }
}

/// Where a dataset's current snapshot lives. Every change of the copy is offered to it (with
/// the copy locked, so snapshots follow the copy in order); building one costs a copy of the
/// records, so while nobody watches, a change only marks the snapshot stale and the next
/// reader builds it.
pub(crate) struct SnapshotCell {
    tx: watch::Sender<Arc<DatasetSnapshot>>,
    /// Changes not in `tx`'s value yet (nobody watched): `Some(from_server)`, false as soon
    /// as one of them was local.
    stale: parking_lot::Mutex<Option<bool>>,
}

impl SnapshotCell {
    pub(crate) fn new(state: &DatasetCache) -> SnapshotCell {
        SnapshotCell {
            tx: watch::channel(Arc::new(DatasetSnapshot::of(state, 1, true))).0,
            stale: parking_lot::Mutex::new(None),
        }
    }

    /// The copy changed (`state`, locked by the caller).
    pub(crate) fn offer(&self, state: &DatasetCache, from_server: bool) {
        let mut stale = self.stale.lock();
        let from_server = stale.unwrap_or(true) && from_server;
        if self.tx.receiver_count() == 0 {
            *stale = Some(from_server);
            return;
        }
        *stale = None;
        self.publish(state, from_server);
    }

    /// The current snapshot, built now if changes are waiting (`state`: the copy, locked).
    pub(crate) fn current(&self, state: &DatasetCache) -> Arc<DatasetSnapshot> {
        if let Some(from_server) = self.stale.lock().take() {
            self.publish(state, from_server);
        }
        self.tx.borrow().clone()
    }

    /// A watcher of the snapshots, its current value up to date (`state`: the copy, locked,
    /// so no change falls between the two).
    pub(crate) fn watch(&self, state: &DatasetCache) -> watch::Receiver<Arc<DatasetSnapshot>> {
        let rx = self.tx.subscribe();
        self.current(state);
        rx
    }

    fn publish(&self, state: &DatasetCache, from_server: bool) {
        self.tx.send_if_modified(|current| {
            let next = DatasetSnapshot::of(state, current.version + 1, from_server);
            if current.same_content(&next) {
                return false;
            }
            *current = Arc::new(next);
            true
        });
    }
}

/// Stops an `on_snapshot` listener when dropped (or `stop`ped).
#[must_use = "the listener stops when this is dropped"]
#[derive(Debug)]
pub struct SnapshotListener {
    pub(crate) stopped: Arc<std::sync::atomic::AtomicBool>,
    pub(crate) task: tokio::task::JoinHandle<()>,
}

impl SnapshotListener {
    /// No call starts after this returns (one running on another thread now finishes).
    pub fn stop(self) {}
}

impl Drop for SnapshotListener {
    fn drop(&mut self) {
        // The flag, because an abort only lands at the task's next await, which a change
        // already waiting would not reach before calling the listener once more.
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::cache::LocalRecord;

    fn put(state: &mut DatasetCache, key: &str, value: Option<&str>, dirty: bool) {
        let mut r = LocalRecord::blank();
        r.value = value.map(str::to_owned);
        r.dirty = dirty;
        state.records.insert(key.to_owned(), r);
    }

    #[test]
    fn test_snapshot_is_new_only_when_the_content_changes() {
        let mut state = DatasetCache::default();
        let cell = SnapshotCell::new(&state);
        let mut rx = cell.watch(&state);
        let first = rx.borrow_and_update().clone();
        assert_eq!(first.version, 1);

        put(&mut state, "a", Some("1"), true);
        cell.offer(&state, false);
        let second = rx.borrow_and_update().clone();
        assert_eq!(
            (second.version, second.pending, second.from_server),
            (2, 1, false)
        );
        assert_eq!(second.records.get("a").map(String::as_str), Some("1"));

        // Nothing visible changed: the same snapshot, not a new version.
        cell.offer(&state, true);
        assert!(!rx.has_changed().unwrap());
        assert!(Arc::ptr_eq(&cell.current(&state), &second));

        // A removed key is gone from the snapshot at once.
        put(&mut state, "a", None, true);
        cell.offer(&state, false);
        let third = rx.borrow_and_update().clone();
        assert_eq!(third.version, 3);
        assert!(third.records.is_empty());
        assert!(third.has_pending_writes);
    }

    #[test]
    fn test_snapshot_unwatched_is_built_when_read_and_remembers_a_local_change() {
        let mut state = DatasetCache::default();
        let cell = SnapshotCell::new(&state);
        put(&mut state, "a", Some("1"), true);
        cell.offer(&state, false);
        put(&mut state, "b", Some("2"), false);
        cell.offer(&state, true);
        let snap = cell.current(&state);
        assert_eq!(
            snap.version, 2,
            "two changes nobody watched: one new snapshot"
        );
        assert_eq!(snap.records.len(), 2);
        assert!(!snap.from_server, "a local edit was among them");
        assert!(Arc::ptr_eq(&snap, &cell.current(&state)));
    }
}
