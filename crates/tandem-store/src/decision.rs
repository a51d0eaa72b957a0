//! The write decision every backend shares. A backend locks the dataset, reads its row and
//! the stored records an update touches, and hands them here; this module says whether the
//! update conflicts (and the `Conflict` outcome), which stored limit it breaks (and the
//! error), what it writes (the dataset's new sync count, live records and bytes, each record
//! stamped) and what the `Committed` outcome holds. The backend then writes what the
//! [`Plan`] says with its own SQL. Nothing here touches a database, so SQLite, PostgreSQL's
//! single path and its batches decide alike by construction, and the tests below need none.
//!
//! A grant is decided here too ([`check_grant`]): the backend counts the owner's grants under
//! its lock and this says whether one more is allowed.

use crate::{DatasetKey, Limits, Snapshot, StoreError, UpdateOutcome, UpdateRequest};
use crate::{ValidatedPatch, record_bytes};
use std::collections::BTreeMap;
use tandem_protocol::{Conflict, LimitCode, Record};

/// Stored records by key, as a write reads them under its lock: at least every patched key's
/// record (tombstones too), and for [`Plan::committed`] every live record as well.
pub(crate) type StoredRecords = BTreeMap<String, Record>;

/// A dataset's row as both backends store it: the sync count survives a delete
/// (`deleted = true`), and the live record count and bytes are kept by every commit so the
/// limit checks never scan records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DatasetRow {
    pub id: i64,
    pub state: DatasetState,
}

/// What the decision needs of a dataset's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DatasetState {
    pub sync_count: u64,
    pub deleted: bool,
    pub record_count: u64,
    pub byte_size: u64,
}

impl DatasetState {
    /// A dataset that was never written: what a deleted one is, at sync count 0.
    pub(crate) const ABSENT: DatasetState = DatasetState {
        sync_count: 0,
        deleted: true,
        record_count: 0,
        byte_size: 0,
    };

    /// Whether an update (re-)creates the dataset, so the owner's dataset count must be
    /// passed to [`plan`].
    pub(crate) fn is_created_by_update(&self) -> bool {
        self.deleted
    }

    /// The live record count and bytes, zero for a deleted dataset.
    fn live_totals(&self) -> (u64, u64) {
        if self.deleted {
            (0, 0)
        } else {
            (self.record_count, self.byte_size)
        }
    }
}

/// The stale check: a `Conflict` outcome listing every patch not based on the stored record,
/// or `None` when the update may go ahead. A deleted dataset's records are all tombstones: a
/// write based on an old version of one of them conflicts with the tombstone.
pub(crate) fn conflict(
    state: &DatasetState,
    patches: &[ValidatedPatch],
    stored: &StoredRecords,
) -> Option<UpdateOutcome> {
    let conflicts: Vec<Conflict> = patches
        .iter()
        .filter(|patch| !patch.matches(stored.get(&patch.key)))
        .map(|patch| Conflict {
            key: patch.key.clone(),
            server: stored.get(&patch.key).cloned(),
        })
        .collect();
    (!conflicts.is_empty()).then_some(UpdateOutcome::Conflict {
        sync_count: state.sync_count,
        conflicts,
    })
}

/// What an update that passed the stale check writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The dataset's sync count after the update.
    pub sync_count: u64,
    /// The dataset's live records and bytes after the update.
    pub records: u64,
    pub bytes: u64,
    /// The records it writes (the patches that change something), stamped, ordered by key.
    pub changed: Vec<Record>,
}

/// Checks the stored limits and stamps the records to write, at `now` (the server's clock).
/// `owned` is the owner's live dataset count, read under the backend's creation lock, and is
/// needed only when the update creates the dataset ([`DatasetState::is_created_by_update`]).
pub(crate) fn plan(
    limits: &Limits,
    request: &UpdateRequest,
    patches: &[ValidatedPatch],
    state: &DatasetState,
    stored: &StoredRecords,
    owned: Option<u64>,
    now: i64,
) -> Result<Plan, StoreError> {
    let (live_records, live_bytes) = state.live_totals();
    let (records, bytes, writes) = totals_after(
        live_records,
        live_bytes,
        patches.iter().map(|p| (p, stored.get(&p.key))),
    );
    check_limits(limits, &request.dataset, owned, records, bytes)?;
    let sync_count = state.sync_count + 1;
    let mut changed: Vec<Record> = writes
        .iter()
        .map(|patch| Record {
            key: patch.key.clone(),
            value: patch.value.clone(),
            sync_count,
            last_modified: now,
            last_modified_by: request.actor.clone(),
            device_id: request.device_id.clone(),
            device_last_modified: patch.device_last_modified,
        })
        .collect();
    changed.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(Plan {
        sync_count,
        records,
        bytes,
        changed,
    })
}

impl Plan {
    /// The outcome once the plan is committed. Records are written only under the dataset's
    /// lock, so the records read under it (`stored`: live ones and the patched keys') with
    /// this update's writes applied are the dataset as committed.
    pub(crate) fn committed(
        self,
        dataset: &DatasetKey,
        mut stored: StoredRecords,
    ) -> UpdateOutcome {
        for record in &self.changed {
            stored.insert(record.key.clone(), record.clone());
        }
        let live = stored.into_values().filter(|r| r.value.is_some()).collect();
        UpdateOutcome::Committed {
            changed: self.changed,
            snapshot: Snapshot {
                dataset: dataset.clone(),
                sync_count: self.sync_count,
                records: live,
                deleted: false,
            },
        }
    }
}

/// A record write as SQL, the same in SQLite and PostgreSQL: `$rows` (a `VALUES` list or a
/// `SELECT`) gives the columns a [`Plan`]'s records carry, and a stored record of the same key
/// is overwritten in all of them. Each backend writes its plans with it.
macro_rules! upsert_records {
    ($rows:literal) => {
        concat!(
            "INSERT INTO records (dataset_id, key, value, sync_count, last_modified,
                                  last_modified_by, device_id, device_last_modified) ",
            $rows,
            " ON CONFLICT (dataset_id, key) DO UPDATE SET
                  value = excluded.value,
                  sync_count = excluded.sync_count,
                  last_modified = excluded.last_modified,
                  last_modified_by = excluded.last_modified_by,
                  device_id = excluded.device_id,
                  device_last_modified = excluded.device_last_modified"
        )
    };
}
pub(crate) use upsert_records;

/// The dataset's live record count and bytes after applying `patches` (each with the stored
/// record it replaces, if any) to `records` and `bytes`, and the patches that change
/// something: removing what is absent or already removed changes nothing.
fn totals_after<'a>(
    mut records: u64,
    mut bytes: u64,
    patches: impl Iterator<Item = (&'a ValidatedPatch, Option<&'a Record>)>,
) -> (u64, u64, Vec<&'a ValidatedPatch>) {
    let mut writes = Vec::new();
    for (patch, stored) in patches {
        let old_bytes = stored.and_then(|r| r.value.as_deref().map(|v| record_bytes(&r.key, v)));
        match (&patch.value, old_bytes) {
            (Some(value), old) => {
                if old.is_none() {
                    records += 1;
                }
                bytes = bytes.saturating_sub(old.unwrap_or(0)) + record_bytes(&patch.key, value);
                writes.push(patch);
            }
            (None, Some(old)) => {
                records = records.saturating_sub(1);
                bytes = bytes.saturating_sub(old);
                writes.push(patch);
            }
            (None, None) => {}
        }
    }
    (records, bytes, writes)
}

/// Checks an update's effect on the stored limits, in the order every backend reports them:
/// the owner's dataset count (`owned`, counted only when the update creates the dataset,
/// `None` otherwise), then the dataset's live records, then its bytes.
fn check_limits(
    limits: &Limits,
    key: &DatasetKey,
    owned: Option<u64>,
    records: u64,
    bytes: u64,
) -> Result<(), StoreError> {
    if let Some(owned) = owned
        && owned >= limits.max_datasets
    {
        return Err(StoreError::limit(
            LimitCode::MaxDatasets,
            limits.max_datasets,
            format!(
                "{} already owns {} datasets, the most allowed",
                key.owner, limits.max_datasets
            ),
        ));
    }
    if records > limits.max_records {
        return Err(StoreError::limit(
            LimitCode::MaxRecords,
            limits.max_records,
            format!("a dataset holds at most {} records", limits.max_records),
        ));
    }
    if bytes > limits.max_dataset_bytes {
        return Err(StoreError::limit(
            LimitCode::MaxDatasetBytes,
            limits.max_dataset_bytes,
            format!(
                "a dataset holds at most {} bytes of keys and values",
                limits.max_dataset_bytes
            ),
        ));
    }
    Ok(())
}

/// The owner's grants as a grant finds them under its lock (one statement, one snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GrantCounts {
    /// The grantee already has a grant on this dataset: the grant only changes its access.
    pub exists: bool,
    /// Grants on this dataset name.
    pub on_dataset: u64,
    /// Grants on every dataset name of the owner (in the pool).
    pub by_owner: u64,
}

/// Whether a grant may be made: changing an existing grant's access always may; a new one
/// must fit under `max_grants_per_dataset`, then `max_grants_per_owner`.
pub(crate) fn check_grant(
    limits: &Limits,
    key: &DatasetKey,
    counts: GrantCounts,
) -> Result<(), StoreError> {
    if counts.exists {
        return Ok(());
    }
    if counts.on_dataset >= limits.max_grants_per_dataset {
        return Err(StoreError::limit(
            LimitCode::MaxGrantsPerDataset,
            limits.max_grants_per_dataset,
            format!(
                "dataset {} already has {} grants, the most allowed",
                key.name, limits.max_grants_per_dataset
            ),
        ));
    }
    if counts.by_owner >= limits.max_grants_per_owner {
        return Err(StoreError::limit(
            LimitCode::MaxGrantsPerOwner,
            limits.max_grants_per_owner,
            format!(
                "{} already has {} grants on its datasets, the most allowed",
                key.owner, limits.max_grants_per_owner
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_POOL;

    const NOW: i64 = 1_700_000_000_000;

    fn request(patches: &[ValidatedPatch]) -> UpdateRequest {
        UpdateRequest {
            dataset: DatasetKey::new(DEFAULT_POOL, "alice", "ds"),
            actor: "bob".into(),
            device_id: Some("phone".into()),
            patches: patches
                .iter()
                .map(|p| tandem_protocol::Patch {
                    op: if p.value.is_some() {
                        tandem_protocol::PatchOp::Replace
                    } else {
                        tandem_protocol::PatchOp::Remove
                    },
                    key: p.key.clone(),
                    value: p.value.clone(),
                    sync_count: p.sync_count,
                    device_last_modified: p.device_last_modified,
                })
                .collect(),
        }
    }

    fn replace(key: &str, value: &str, sync_count: u64) -> ValidatedPatch {
        ValidatedPatch {
            key: key.into(),
            value: Some(value.into()),
            sync_count,
            device_last_modified: Some(7),
        }
    }

    fn remove(key: &str, sync_count: u64) -> ValidatedPatch {
        ValidatedPatch {
            key: key.into(),
            value: None,
            sync_count,
            device_last_modified: None,
        }
    }

    fn record(key: &str, value: Option<&str>, sync_count: u64) -> Record {
        Record {
            key: key.into(),
            value: value.map(Into::into),
            sync_count,
            last_modified: 1,
            last_modified_by: "alice".into(),
            device_id: None,
            device_last_modified: None,
        }
    }

    /// A live dataset at sync count 3 holding `a` = "1" (written at 1) and `b` = "22"
    /// (written at 3), and the tombstone of `c` (removed at 2).
    fn dataset() -> (DatasetState, StoredRecords) {
        let stored: StoredRecords = [
            record("a", Some("1"), 1),
            record("b", Some("22"), 3),
            record("c", None, 2),
        ]
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect();
        let state = DatasetState {
            sync_count: 3,
            deleted: false,
            record_count: 2,
            byte_size: record_bytes("a", "1") + record_bytes("b", "22"),
        };
        (state, stored)
    }

    fn limit_of(result: Result<Plan, StoreError>) -> Option<(LimitCode, u64)> {
        match result {
            Err(StoreError::Limit { limit, max, .. }) => Some((limit, max)),
            _ => None,
        }
    }

    fn plan_for(patches: &[ValidatedPatch], limits: &Limits) -> Result<Plan, StoreError> {
        let (state, stored) = dataset();
        plan(
            limits,
            &request(patches),
            patches,
            &state,
            &stored,
            None,
            NOW,
        )
    }

    #[test]
    fn test_conflict_lists_every_stale_patch_with_the_stored_record() {
        let (state, stored) = dataset();
        let patches = [
            replace("a", "x", 1),
            replace("b", "x", 2),
            replace("new", "x", 4),
            replace("c", "x", 2),
        ];
        let outcome = conflict(&state, &patches, &stored);
        assert_eq!(
            outcome,
            Some(UpdateOutcome::Conflict {
                sync_count: 3,
                conflicts: vec![
                    Conflict {
                        key: "b".into(),
                        server: Some(record("b", Some("22"), 3)),
                    },
                    Conflict {
                        key: "new".into(),
                        server: None,
                    },
                ],
            })
        );
    }

    #[test]
    fn test_conflict_none_when_every_patch_is_current() {
        let (state, stored) = dataset();
        let patches = [replace("a", "x", 1), remove("b", 3), replace("c", "x", 0)];
        assert_eq!(conflict(&state, &patches, &stored), None);
    }

    #[test]
    fn test_conflict_on_an_absent_dataset_reports_sync_count_zero() {
        let patches = [replace("a", "x", 5)];
        let outcome = conflict(&DatasetState::ABSENT, &patches, &StoredRecords::new());
        assert!(matches!(
            outcome,
            Some(UpdateOutcome::Conflict { sync_count: 0, ref conflicts }) if conflicts.len() == 1
        ));
    }

    #[test]
    fn test_plan_counts_records_and_bytes_after_the_update() {
        let patches = [
            replace("a", "1234", 1), // overwrite: +3 bytes
            remove("b", 3),          // remove a live record: -1 record, -3 bytes
            remove("c", 2),          // remove a tombstone: changes nothing
            remove("zz", 0),         // remove what never was: changes nothing
            replace("d", "5", 0),    // new: +1 record, +2 bytes
        ];
        let plan = plan_for(&patches, &Limits::default()).unwrap();
        assert_eq!(plan.sync_count, 4);
        assert_eq!(plan.records, 2);
        assert_eq!(
            plan.bytes,
            record_bytes("a", "1234") + record_bytes("d", "5")
        );
        let keys: Vec<&str> = plan.changed.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, ["a", "b", "d"], "only writes, ordered by key");
    }

    #[test]
    fn test_plan_stamps_every_record_with_the_update() {
        let patches = [replace("b", "x", 3), remove("a", 1)];
        let plan = plan_for(&patches, &Limits::default()).unwrap();
        assert_eq!(
            plan.changed,
            vec![
                Record {
                    key: "a".into(),
                    value: None,
                    sync_count: 4,
                    last_modified: NOW,
                    last_modified_by: "bob".into(),
                    device_id: Some("phone".into()),
                    device_last_modified: None,
                },
                Record {
                    key: "b".into(),
                    value: Some("x".into()),
                    sync_count: 4,
                    last_modified: NOW,
                    last_modified_by: "bob".into(),
                    device_id: Some("phone".into()),
                    device_last_modified: Some(7),
                },
            ]
        );
    }

    #[test]
    fn test_plan_reports_records_then_bytes_limit() {
        let limits = Limits {
            max_records: 2,
            max_dataset_bytes: 6,
            ..Limits::default()
        };
        // Three records and too many bytes: the record count is reported.
        let too_many = plan_for(&[replace("d", "long value", 0)], &limits);
        assert_eq!(limit_of(too_many), Some((LimitCode::MaxRecords, 2)));
        let too_big = plan_for(&[replace("a", "123", 1)], &limits);
        assert_eq!(limit_of(too_big), Some((LimitCode::MaxDatasetBytes, 6)));
        // At the limits exactly: allowed.
        assert!(plan_for(&[replace("a", "12", 1)], &limits).is_ok());
    }

    #[test]
    fn test_plan_reports_the_owners_dataset_count_first_when_creating() {
        let limits = Limits {
            max_datasets: 2,
            max_records: 0,
            ..Limits::default()
        };
        let patches = [replace("a", "1", 0)];
        let create = |owned| {
            plan(
                &limits,
                &request(&patches),
                &patches,
                &DatasetState::ABSENT,
                &StoredRecords::new(),
                Some(owned),
                NOW,
            )
        };
        assert_eq!(limit_of(create(2)), Some((LimitCode::MaxDatasets, 2)));
        assert_eq!(limit_of(create(1)), Some((LimitCode::MaxRecords, 0)));
    }

    #[test]
    fn test_plan_on_a_deleted_dataset_starts_from_nothing() {
        let limits = Limits {
            max_records: 1,
            ..Limits::default()
        };
        let deleted = DatasetState {
            sync_count: 9,
            deleted: true,
            record_count: 5,
            byte_size: 500,
        };
        assert!(deleted.is_created_by_update());
        let tombstone: StoredRecords = [("a".to_owned(), record("a", None, 9))].into();
        let patches = [replace("a", "1", 9)];
        let plan = plan(
            &limits,
            &request(&patches),
            &patches,
            &deleted,
            &tombstone,
            Some(0),
            NOW,
        )
        .unwrap();
        assert_eq!(
            (plan.sync_count, plan.records, plan.bytes),
            (10, 1, record_bytes("a", "1"))
        );
    }

    #[test]
    fn test_committed_snapshot_is_stored_records_with_the_writes() {
        let (state, stored) = dataset();
        let patches = [remove("a", 1), replace("d", "4", 0), replace("b", "x", 3)];
        let request = request(&patches);
        let plan = plan(
            &Limits::default(),
            &request,
            &patches,
            &state,
            &stored,
            None,
            NOW,
        )
        .unwrap();
        let changed = plan.changed.clone();
        let UpdateOutcome::Committed {
            changed: reported,
            snapshot,
        } = plan.committed(&request.dataset, stored)
        else {
            panic!("not committed");
        };
        assert_eq!(reported, changed);
        assert_eq!(snapshot.dataset, request.dataset);
        assert_eq!(snapshot.sync_count, 4);
        assert!(!snapshot.deleted);
        let live: Vec<(&str, Option<&str>)> = snapshot
            .records
            .iter()
            .map(|r| (r.key.as_str(), r.value.as_deref()))
            .collect();
        assert_eq!(live, [("b", Some("x")), ("d", Some("4"))]);
    }

    #[test]
    fn test_check_grant_counts_new_grants_only() {
        let limits = Limits {
            max_grants_per_dataset: 2,
            max_grants_per_owner: 3,
            ..Limits::default()
        };
        let key = DatasetKey::new(DEFAULT_POOL, "alice", "ds");
        let counts = |exists, on_dataset, by_owner| GrantCounts {
            exists,
            on_dataset,
            by_owner,
        };
        assert!(check_grant(&limits, &key, counts(false, 1, 2)).is_ok());
        let full_dataset = check_grant(&limits, &key, counts(false, 2, 2));
        assert!(matches!(
            full_dataset,
            Err(StoreError::Limit {
                limit: LimitCode::MaxGrantsPerDataset,
                max: 2,
                ..
            })
        ));
        let full_owner = check_grant(&limits, &key, counts(false, 0, 3));
        assert!(matches!(
            full_owner,
            Err(StoreError::Limit {
                limit: LimitCode::MaxGrantsPerOwner,
                max: 3,
                ..
            })
        ));
        // Changing the access of a grant that exists adds none.
        assert!(check_grant(&limits, &key, counts(true, 2, 3)).is_ok());
    }
}
