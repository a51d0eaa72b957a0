//! What a remote delete does to the local copy of a dataset (Cognito's
//! `onDatasetDeleted`): keep the unsynchronised changes, keep everything as a new dataset, or
//! drop it all. Whatever it decides, the client goes on following the dataset.

use crate::cache::DatasetCache;
use std::sync::Arc;
use tandem_protocol::DatasetRef;

/// What to do with the local copy when the owner deletes a dataset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DeletedPolicy {
    /// Clean records go with the dataset; unsynchronised changes stay, based on nothing now,
    /// and re-create the dataset at the next sync.
    #[default]
    KeepPending,
    /// Every local record stays, as a pending write of a new dataset.
    KeepAll,
    /// Everything local goes, pending writes included.
    Drop,
}

type DeletedFn = Arc<dyn Fn(&DatasetRef, u64) -> DeletedPolicy + Send + Sync>;

/// How a dataset's local copy answers a remote delete: one policy, or a function called with
/// the dataset and the sync count the delete took.
#[derive(Clone)]
pub enum OnDatasetDeleted {
    Policy(DeletedPolicy),
    Custom(DeletedFn),
}

impl Default for OnDatasetDeleted {
    fn default() -> Self {
        OnDatasetDeleted::Policy(DeletedPolicy::KeepPending)
    }
}

impl From<DeletedPolicy> for OnDatasetDeleted {
    fn from(policy: DeletedPolicy) -> Self {
        OnDatasetDeleted::Policy(policy)
    }
}

impl std::fmt::Debug for OnDatasetDeleted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OnDatasetDeleted::Policy(p) => write!(f, "{p:?}"),
            OnDatasetDeleted::Custom(_) => f.write_str("Custom"),
        }
    }
}

impl OnDatasetDeleted {
    pub fn custom(f: impl Fn(&DatasetRef, u64) -> DeletedPolicy + Send + Sync + 'static) -> Self {
        OnDatasetDeleted::Custom(Arc::new(f))
    }

    pub(crate) fn decide(&self, dataset: &DatasetRef, sync_count: u64) -> DeletedPolicy {
        match self {
            OnDatasetDeleted::Policy(p) => *p,
            OnDatasetDeleted::Custom(f) => f(dataset, sync_count),
        }
    }
}

/// Applies `policy` to the copy of a dataset deleted at `sync_count`. Returns the keys whose
/// live value went.
pub(crate) fn apply(
    state: &mut DatasetCache,
    policy: DeletedPolicy,
    sync_count: u64,
    mut next_version: impl FnMut() -> u64,
) -> Vec<String> {
    let mut dropped = Vec::new();
    state.records.retain(|key, r| {
        let keep = match policy {
            DeletedPolicy::KeepAll => r.value.is_some() || r.dirty,
            DeletedPolicy::KeepPending => r.dirty,
            DeletedPolicy::Drop => false,
        };
        if !keep {
            if r.value.is_some() {
                dropped.push(key.clone());
            }
            return false;
        }
        if policy == DeletedPolicy::KeepAll && !r.dirty {
            // The whole local copy becomes the new dataset's content.
            r.dirty = true;
            r.version = next_version();
        }
        // The records it was based on are gone with the dataset.
        r.sync_count = 0;
        true
    });
    state.sync_count = state.sync_count.max(sync_count);
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::LocalRecord;

    fn copy() -> DatasetCache {
        let mut state = DatasetCache {
            sync_count: 4,
            ..DatasetCache::default()
        };
        for (key, dirty) in [("clean", false), ("mine", true)] {
            state.records.insert(
                key.to_owned(),
                LocalRecord {
                    value: Some("v".to_owned()),
                    sync_count: 3,
                    dirty,
                    device_last_modified: None,
                    version: 1,
                    set_aside: None,
                    last_modified: None,
                    last_modified_by: None,
                    device_id: None,
                },
            );
        }
        state
    }

    #[test]
    fn test_deleted_policies_keep_what_they_say() {
        let mut state = copy();
        assert_eq!(
            apply(&mut state, DeletedPolicy::KeepPending, 5, || 9),
            ["clean"]
        );
        assert_eq!(state.records.keys().collect::<Vec<_>>(), ["mine"]);
        assert_eq!(state.records["mine"].sync_count, 0);
        assert_eq!(state.sync_count, 5);

        let mut state = copy();
        assert!(apply(&mut state, DeletedPolicy::KeepAll, 5, || 9).is_empty());
        assert_eq!(state.dirty_count(), 2);
        assert_eq!(
            state.records["clean"].version, 9,
            "a new edit, with the next version"
        );

        let mut state = copy();
        assert_eq!(
            apply(&mut state, DeletedPolicy::Drop, 5, || 9),
            ["clean", "mine"]
        );
        assert!(state.records.is_empty());
    }
}
