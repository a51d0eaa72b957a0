//! The backend-independent test suite: every `Store` must pass it, so the SQLite and
//! PostgreSQL backends cannot drift apart in what a client sees.
//!
//! A backend's test calls [`run_all`] with a function that opens a fresh, empty store with
//! the given limits. Each `case_*` checks one behaviour on such a store and panics (with an
//! assertion message) when the behaviour is wrong; the limits each case needs are in its
//! doc comment, and `run_all` passes them. Run it on a multi-thread tokio runtime.

// A test suite: panicking on an unexpected result is how it reports a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::dump::{
    BatchOutcome, DumpDataset, DumpItem, DumpRecord, DumpSetting, ImportBatch, ImportCheckpoint,
    ImportError, ImportProgress, Importer, MergePolicy, Start,
};
use crate::{DEFAULT_POOL, DatasetKey, Limits, Snapshot, Store, StoreError, UpdateOutcome};
use crate::{DeadLetter, StreamConsumer};
use crate::{LogEntry, LogKind, Login, UpdateRequest, now_ms, record_bytes};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use tandem_protocol::{Access, DatasetRef, LimitCode, Patch, Record};

mod admin;
pub use admin::*;

const ALICE: &str = "alice";
const BOB: &str = "bob";
const CAROL: &str = "carol";

/// Small limits that make every limit quick to reach.
pub fn small_limits() -> Limits {
    Limits {
        max_datasets: 3,
        max_records: 4,
        max_dataset_bytes: 64,
        max_grants_per_dataset: 3,
        max_grants_per_owner: 5,
        ..Limits::default()
    }
}

/// Runs every case, each on a fresh store from `make`, and closes each store afterwards.
pub async fn run_all<F, Fut, S>(make: F)
where
    F: Fn(Limits) -> Fut,
    Fut: Future<Output = S>,
    S: Store,
{
    macro_rules! run {
        ($case:ident, $limits:expr) => {{
            let store: Arc<dyn Store> = Arc::new(make($limits).await);
            $case(Arc::clone(&store)).await;
            store.close().await;
        }};
    }
    run!(
        case_update_creates_dataset_on_first_write,
        Limits::default()
    );
    run!(case_sync_count_stamps_changed_records, Limits::default());
    run!(case_remove_leaves_tombstone_in_changes, Limits::default());
    run!(
        case_stale_update_conflicts_and_writes_nothing,
        Limits::default()
    );
    run!(
        case_update_with_one_stale_patch_writes_nothing,
        Limits::default()
    );
    run!(case_limit_max_datasets, small_limits());
    run!(case_limit_max_records, small_limits());
    run!(case_limit_max_dataset_bytes, small_limits());
    run!(case_default_limits, Limits::default());
    run!(
        case_delete_then_recreate_continues_sync_count,
        Limits::default()
    );
    run!(
        case_read_grant_allows_reading_not_writing,
        Limits::default()
    );
    run!(case_write_grant_allows_updating, Limits::default());
    run!(case_revoke_takes_effect, Limits::default());
    run!(case_no_grant_is_forbidden, Limits::default());
    run!(case_grant_rejects_bad_requests, Limits::default());
    run!(case_limit_grants, small_limits());
    run!(case_concurrent_grants_respect_the_limits, small_limits());
    run!(case_list_datasets_shows_own_and_shared, Limits::default());
    run!(case_pools_are_separate, Limits::default());
    run!(case_concurrent_writers_serialise, Limits::default());
    run!(
        case_validation_errors_leave_data_unchanged,
        Limits::default()
    );
    run!(case_close_makes_calls_unavailable, Limits::default());
    run!(case_identities_and_logins, Limits::default());
    run!(case_merge_moves_and_renames_datasets, Limits::default());
    run!(case_merge_may_exceed_max_datasets, small_limits());
    run!(case_failed_merge_changes_nothing, Limits::default());
    run!(
        case_merge_copies_of_long_names_stay_apart,
        Limits::default()
    );
    run!(
        case_concurrent_links_give_a_login_to_one_identity,
        Limits::default()
    );
    run!(
        case_merge_concurrent_with_updates_loses_nothing,
        Limits::default()
    );
    run!(case_commit_log_records_every_commit, Limits::default());
    run!(case_commit_log_logs_merges, Limits::default());
    run!(
        case_commit_log_compaction_drops_the_oldest_only,
        log_limits()
    );
    run!(case_history_pages_newest_first, Limits::default());
    run!(case_read_at_gives_every_past_state, Limits::default());
    run!(case_read_at_beyond_the_log_is_unavailable, log_limits());
    run!(
        case_read_at_reaches_back_over_many_commits,
        Limits::default()
    );
    run!(case_history_leaves_out_replay_snapshots, Limits::default());
    run!(case_merge_of_a_name_and_its_copy_name, Limits::default());
    run!(
        case_commit_log_compaction_keeps_what_consumers_need,
        capped_log_limits()
    );
    run!(
        case_commit_log_compaction_of_a_backlog_goes_in_chunks,
        backlog_limits()
    );
    run!(case_stream_lease_ack_release_forget, Limits::default());
    run!(case_stream_racing_leases_have_one_winner, Limits::default());
    run!(case_stream_dead_letters_are_capped, stream_limits());
    run!(case_datasets_after_walks_live_datasets, Limits::default());
    run!(case_log_snapshot_logs_the_live_records, Limits::default());
    run!(case_identities_page_by_id, Limits::default());
    run!(case_pool_usage_counts_live_data, Limits::default());
    run!(case_pool_settings_compare_and_swap, Limits::default());
    macro_rules! run_pair {
        ($case:ident, $limits:expr) => {{
            let source: Arc<dyn Store> = Arc::new(make($limits).await);
            let target: Arc<dyn Store> = Arc::new(make($limits).await);
            $case(Arc::clone(&source), Arc::clone(&target)).await;
            source.close().await;
            target.close().await;
        }};
    }
    run_pair!(case_dump_import_round_trip_is_exact, Limits::default());
    run_pair!(
        case_import_refuses_a_non_empty_target_unless_merging,
        Limits::default()
    );
    run!(
        case_import_batch_is_all_or_nothing_and_resumes,
        Limits::default()
    );
}

/// `log_limits` with a hard cap of 6 entries below the head.
pub fn capped_log_limits() -> Limits {
    Limits {
        commit_log_hard_cap_entries: 6,
        ..log_limits()
    }
}

/// 5 entries per dataset, a minute, room for the datasets of the backlog.
pub fn backlog_limits() -> Limits {
    Limits {
        commit_log_max_entries_per_dataset: 5,
        commit_log_max_age_secs: 60,
        max_datasets: 100,
        ..Limits::default()
    }
}

/// At most 3 dead letters per consumer.
pub fn stream_limits() -> Limits {
    Limits {
        stream_dead_letter_max: 3,
        ..Limits::default()
    }
}

/// Retention small enough to reach: 3 entries per dataset, a minute.
pub fn log_limits() -> Limits {
    Limits {
        commit_log_max_entries_per_dataset: 3,
        commit_log_max_age_secs: 60,
        ..Limits::default()
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

fn ds(owner: &str, name: &str) -> DatasetKey {
    DatasetKey::new(DEFAULT_POOL, owner, name)
}

fn request(dataset: &DatasetKey, actor: &str, patches: Vec<Patch>) -> UpdateRequest {
    UpdateRequest {
        dataset: dataset.clone(),
        actor: actor.to_owned(),
        device_id: None,
        patches,
    }
}

/// Applies an update that must commit; returns (changed, snapshot).
async fn commit(
    store: &dyn Store,
    dataset: &DatasetKey,
    actor: &str,
    patches: Vec<Patch>,
) -> (Vec<Record>, Snapshot) {
    match store.update(request(dataset, actor, patches)).await {
        Ok(UpdateOutcome::Committed { changed, snapshot }) => (changed, snapshot),
        other => panic!("update of {dataset} by {actor} should commit, got {other:?}"),
    }
}

/// Applies an update that must fail; returns the error.
async fn refused(store: &dyn Store, req: UpdateRequest) -> StoreError {
    match store.update(req).await {
        Err(e) => e,
        Ok(outcome) => panic!("update should fail, got {outcome:?}"),
    }
}

fn assert_limit(err: &StoreError, limit: LimitCode, max: u64) {
    assert!(
        matches!(err, StoreError::Limit { limit: l, max: m, .. } if *l == limit && *m == max),
        "expected limit {limit} ({max}), got {err:?}"
    );
}

fn assert_forbidden<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Forbidden { .. }) => {}
        other => panic!("expected forbidden, got {other:?}"),
    }
}

fn assert_bad_request<T: std::fmt::Debug>(result: Result<T, StoreError>) {
    match result {
        Err(StoreError::BadRequest(_) | StoreError::InvalidName { .. }) => {}
        other => panic!("expected a bad request, got {other:?}"),
    }
}

/// Key → (value, sync count) of the records.
fn values(records: &[Record]) -> BTreeMap<String, (Option<String>, u64)> {
    records
        .iter()
        .map(|r| (r.key.clone(), (r.value.clone(), r.sync_count)))
        .collect()
}

fn keys(records: &[Record]) -> Vec<&str> {
    records.iter().map(|r| r.key.as_str()).collect()
}

fn record<'a>(snapshot: &'a Snapshot, key: &str) -> &'a Record {
    snapshot
        .records
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("no record `{key}` in {snapshot:?}"))
}

fn live(entries: &[(&str, &str, u64)]) -> BTreeMap<String, (Option<String>, u64)> {
    entries
        .iter()
        .map(|(k, v, n)| ((*k).to_owned(), (Some((*v).to_owned()), *n)))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Cases

/// A dataset appears with its first committed update, at sync count 1, with every field of
/// its records stamped. Default limits.
pub async fn case_update_creates_dataset_on_first_write(store: Arc<dyn Store>) {
    let d = ds(ALICE, "profile");
    let before = store.snapshot(&d, ALICE).await.unwrap();
    assert_eq!(before.dataset, d);
    assert_eq!(before.sync_count, 0);
    assert!(before.records.is_empty());
    assert!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .is_empty()
    );

    let t0 = now_ms();
    let mut name = Patch::replace("name", "Alice", 0);
    name.device_last_modified = Some(1_234);
    let outcome = store
        .update(UpdateRequest {
            device_id: Some("phone".into()),
            ..request(&d, ALICE, vec![name, Patch::replace("age", "30", 0)])
        })
        .await
        .unwrap();
    let t1 = now_ms();
    let UpdateOutcome::Committed { changed, snapshot } = outcome else {
        panic!("first write should commit, got {outcome:?}");
    };
    assert_eq!(snapshot.dataset, d);
    assert_eq!(snapshot.sync_count, 1);
    assert_eq!(keys(&changed), ["age", "name"], "changed is ordered by key");
    for r in &changed {
        assert_eq!(r.sync_count, 1);
        assert!((t0..=t1).contains(&r.last_modified), "{r:?}");
        assert_eq!(r.last_modified_by, ALICE);
        assert_eq!(r.device_id.as_deref(), Some("phone"));
    }
    assert_eq!(changed[0].value.as_deref(), Some("30"));
    assert_eq!(changed[0].device_last_modified, None);
    assert_eq!(changed[1].value.as_deref(), Some("Alice"));
    assert_eq!(changed[1].device_last_modified, Some(1_234));
    assert_eq!(snapshot.records, changed);
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap(), snapshot);

    let list = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert_eq!(list.len(), 1);
    let info = &list[0];
    assert_eq!(info.dataset, DatasetRef::new(ALICE, "profile"));
    assert_eq!(info.sync_count, 1);
    assert_eq!(info.records, 2);
    assert_eq!(
        info.bytes,
        record_bytes("name", "Alice") + record_bytes("age", "30")
    );
    assert_eq!(info.access, Access::Owner);
    assert!((t0..=t1).contains(&info.last_modified));
}

/// Each commit bumps the dataset's sync count by exactly one and stamps only the records it
/// changed; a replace with the same value still counts as a change. Default limits.
pub async fn case_sync_count_stamps_changed_records(store: Arc<dyn Store>) {
    let d = ds(ALICE, "settings");
    let p = Patch::replace;
    let (_, s) = commit(&*store, &d, ALICE, vec![p("a", "1", 0), p("b", "1", 0)]).await;
    assert_eq!(s.sync_count, 1);

    let (changed, s) = commit(&*store, &d, ALICE, vec![p("a", "2", 1)]).await;
    assert_eq!(s.sync_count, 2);
    assert_eq!(values(&changed), live(&[("a", "2", 2)]));
    assert_eq!(values(&s.records), live(&[("a", "2", 2), ("b", "1", 1)]));

    let (changed, s) = commit(&*store, &d, ALICE, vec![p("c", "1", 0), p("b", "2", 1)]).await;
    assert_eq!(s.sync_count, 3);
    assert_eq!(keys(&changed), ["b", "c"]);
    assert_eq!(
        values(&s.records),
        live(&[("a", "2", 2), ("b", "2", 3), ("c", "1", 3)])
    );

    let (changed, s) = commit(&*store, &d, ALICE, vec![p("a", "2", 2)]).await;
    assert_eq!(s.sync_count, 4);
    assert_eq!(values(&changed), live(&[("a", "2", 4)]));

    // A commit that changes no record still counts.
    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::remove("nothing", 0)]).await;
    assert!(changed.is_empty(), "{changed:?}");
    assert_eq!(s.sync_count, 5);
    assert_eq!(keys(&s.records), ["a", "b", "c"]);

    let stored = store.snapshot(&d, ALICE).await.unwrap();
    assert_eq!(stored.sync_count, 5);
    assert_eq!(
        values(&stored.records),
        live(&[("a", "2", 4), ("b", "2", 3), ("c", "1", 3)])
    );
    assert_eq!(keys(&stored.records), ["a", "b", "c"]);
}

/// A remove leaves a tombstone stamped with the commit's sync count: absent from snapshots,
/// reported by `changes`. Removing what is absent writes no row. Default limits.
pub async fn case_remove_leaves_tombstone_in_changes(store: Arc<dyn Store>) {
    let d = ds(ALICE, "todo");
    let p = Patch::replace;
    commit(
        &*store,
        &d,
        ALICE,
        vec![p("a", "1", 0), p("b", "1", 0), p("c", "1", 0)],
    )
    .await;

    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::remove("b", 1)]).await;
    assert_eq!(s.sync_count, 2);
    assert_eq!(changed.len(), 1);
    assert_eq!(changed[0].key, "b");
    assert_eq!(changed[0].value, None);
    assert_eq!(changed[0].sync_count, 2);
    assert_eq!(changed[0].last_modified_by, ALICE);
    assert_eq!(
        keys(&s.records),
        ["a", "c"],
        "snapshots hold live records only"
    );
    assert_eq!(
        keys(&store.snapshot(&d, ALICE).await.unwrap().records),
        ["a", "c"]
    );

    let all = store.changes(&d, ALICE, 0).await.unwrap();
    assert_eq!(all.sync_count, 2);
    assert_eq!(keys(&all.records), ["a", "b", "c"]);
    assert_eq!(all.records[1].value, None);
    let since1 = store.changes(&d, ALICE, 1).await.unwrap();
    assert_eq!(keys(&since1.records), ["b"]);
    assert_eq!(since1.records[0].value, None);
    assert!(
        store
            .changes(&d, ALICE, 2)
            .await
            .unwrap()
            .records
            .is_empty()
    );

    // Removing a tombstone (with its count or 0) or an absent key changes nothing but commits.
    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::remove("b", 2)]).await;
    assert!(changed.is_empty());
    assert_eq!(s.sync_count, 3);
    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::remove("b", 0)]).await;
    assert!(changed.is_empty());
    assert_eq!(s.sync_count, 4);
    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::remove("ghost", 0)]).await;
    assert!(changed.is_empty());
    assert_eq!(s.sync_count, 5);
    let all = store.changes(&d, ALICE, 0).await.unwrap();
    assert_eq!(all.sync_count, 5);
    assert_eq!(
        keys(&all.records),
        ["a", "b", "c"],
        "no tombstone for an absent key"
    );
    assert_eq!(
        all.records[1].sync_count, 2,
        "a no-op remove does not restamp"
    );

    // A stale remove of a tombstone conflicts with the tombstone.
    let outcome = store
        .update(request(&d, ALICE, vec![Patch::remove("b", 1)]))
        .await
        .unwrap();
    let UpdateOutcome::Conflict { conflicts, .. } = outcome else {
        panic!("stale remove should conflict, got {outcome:?}");
    };
    assert_eq!(conflicts[0].server.as_ref().map(|r| r.sync_count), Some(2));

    // Writing over a tombstone with its sync count brings the key back.
    let (changed, s) = commit(&*store, &d, ALICE, vec![p("b", "again", 2)]).await;
    assert_eq!(values(&changed), live(&[("b", "again", 6)]));
    assert_eq!(keys(&s.records), ["a", "b", "c"]);
    assert_eq!(
        keys(&store.changes(&d, ALICE, 5).await.unwrap().records),
        ["b"]
    );

    // changes() of a dataset never written is empty at 0.
    let none = store.changes(&ds(ALICE, "never"), ALICE, 0).await.unwrap();
    assert_eq!(none.sync_count, 0);
    assert!(none.records.is_empty());
}

/// A stale patch gets a conflict with the server's record (or `None` for a key that does
/// not exist) and the dataset's current sync count; nothing is written. Default limits.
pub async fn case_stale_update_conflicts_and_writes_nothing(store: Arc<dyn Store>) {
    let d = ds(ALICE, "notes");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "2", 1)]).await;
    let before = store.snapshot(&d, ALICE).await.unwrap();

    let stale = [
        Patch::replace("a", "3", 1),
        Patch::replace("a", "3", 0),
        Patch::remove("a", 1),
        Patch::replace("new", "x", 7),
        Patch::remove("new", 7),
    ];
    for patch in stale {
        let key = patch.key.clone();
        let outcome = store
            .update(request(&d, ALICE, vec![patch.clone()]))
            .await
            .unwrap();
        let UpdateOutcome::Conflict {
            sync_count,
            conflicts,
        } = outcome
        else {
            panic!("{patch:?} should conflict, got {outcome:?}");
        };
        assert_eq!(sync_count, 2);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].key, key);
        let expected = before.records.iter().find(|r| r.key == key).cloned();
        assert_eq!(conflicts[0].server, expected, "server record for {key}");
    }
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap(), before);
    assert_eq!(
        store.changes(&d, ALICE, 0).await.unwrap().records,
        before.records
    );

    // A conflict on a dataset that does not exist does not create it.
    let other = ds(ALICE, "other");
    let outcome = store
        .update(request(&other, ALICE, vec![Patch::replace("k", "v", 3)]))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, UpdateOutcome::Conflict { sync_count: 0, conflicts }
            if conflicts.len() == 1 && conflicts[0].server.is_none()),
        "{outcome:?}"
    );
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .len(),
        1
    );
    assert_eq!(store.snapshot(&other, ALICE).await.unwrap().sync_count, 0);
}

/// One stale patch among good ones: the update writes nothing and every stale key is
/// reported. Default limits.
pub async fn case_update_with_one_stale_patch_writes_nothing(store: Arc<dyn Store>) {
    let d = ds(ALICE, "cart");
    commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::replace("a", "1", 0), Patch::replace("b", "1", 0)],
    )
    .await;
    let before = store.changes(&d, ALICE, 0).await.unwrap();

    let outcome = store
        .update(request(
            &d,
            ALICE,
            vec![
                Patch::replace("c", "new", 0),
                Patch::replace("a", "good", 1),
                Patch::replace("b", "stale", 5),
                Patch::replace("d", "stale-new", 9),
            ],
        ))
        .await
        .unwrap();
    let UpdateOutcome::Conflict {
        sync_count,
        conflicts,
    } = outcome
    else {
        panic!("should conflict, got {outcome:?}");
    };
    assert_eq!(sync_count, 1);
    let mut stale: Vec<_> = conflicts
        .iter()
        .map(|c| (c.key.as_str(), c.server.as_ref().map(|r| r.sync_count)))
        .collect();
    stale.sort_unstable();
    assert_eq!(stale, [("b", Some(1)), ("d", None)]);

    let after = store.changes(&d, ALICE, 0).await.unwrap();
    assert_eq!(after, before, "nothing of the update was written");

    // The same update without the stale patches commits as one.
    let (changed, s) = commit(
        &*store,
        &d,
        ALICE,
        vec![
            Patch::replace("c", "new", 0),
            Patch::replace("a", "good", 1),
        ],
    )
    .await;
    assert_eq!(s.sync_count, 2);
    assert_eq!(keys(&changed), ["a", "c"]);
}

/// The owner's dataset count is capped; a failed creation leaves nothing, deleting frees a
/// slot, and re-creating a deleted dataset counts as creating. Limits: [`small_limits`].
pub async fn case_limit_max_datasets(store: Arc<dyn Store>) {
    let max = 3;
    for i in 0..max {
        commit(
            &*store,
            &ds(ALICE, &format!("d{i}")),
            ALICE,
            vec![Patch::replace("k", "v", 0)],
        )
        .await;
    }
    let extra = ds(ALICE, "d3");
    let err = refused(
        &*store,
        request(&extra, ALICE, vec![Patch::replace("k", "v", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasets, max);
    assert_eq!(store.snapshot(&extra, ALICE).await.unwrap().sync_count, 0);
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .len(),
        3
    );

    // Existing datasets still take writes; other identities have their own count.
    commit(
        &*store,
        &ds(ALICE, "d0"),
        ALICE,
        vec![Patch::replace("k", "w", 1)],
    )
    .await;
    commit(
        &*store,
        &ds(BOB, "d0"),
        BOB,
        vec![Patch::replace("k", "v", 0)],
    )
    .await;

    store.delete_dataset(&ds(ALICE, "d1"), ALICE).await.unwrap();
    commit(&*store, &extra, ALICE, vec![Patch::replace("k", "v", 0)]).await;
    let err = refused(
        &*store,
        request(&ds(ALICE, "d1"), ALICE, vec![Patch::replace("k", "v", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasets, max);
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .len(),
        3
    );
}

/// Live records per dataset are capped; tombstones do not count and a failed update writes
/// nothing. Limits: [`small_limits`] (4 records).
pub async fn case_limit_max_records(store: Arc<dyn Store>) {
    let d = ds(ALICE, "records");
    let four: Vec<_> = (0..4)
        .map(|i| Patch::replace(format!("k{i}"), "v", 0))
        .collect();
    commit(&*store, &d, ALICE, four).await;

    let err = refused(
        &*store,
        request(&d, ALICE, vec![Patch::replace("k4", "v", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxRecords, 4);
    let s = store.snapshot(&d, ALICE).await.unwrap();
    assert_eq!((s.sync_count, s.records.len()), (1, 4));

    // Replacing does not add; removing frees a slot in the same update.
    commit(&*store, &d, ALICE, vec![Patch::replace("k0", "w", 1)]).await;
    let (_, s) = commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::remove("k1", 1), Patch::replace("k4", "v", 0)],
    )
    .await;
    assert_eq!(s.sync_count, 3);
    assert_eq!(keys(&s.records), ["k0", "k2", "k3", "k4"]);
    let err = refused(
        &*store,
        request(&d, ALICE, vec![Patch::replace("k1", "v", 3)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxRecords, 4);

    // Too many records in a first write: the dataset is not created.
    let fresh = ds(ALICE, "fresh");
    let five: Vec<_> = (0..5)
        .map(|i| Patch::replace(format!("k{i}"), "v", 0))
        .collect();
    let err = refused(&*store, request(&fresh, ALICE, five)).await;
    assert_limit(&err, LimitCode::MaxRecords, 4);
    assert_eq!(store.snapshot(&fresh, ALICE).await.unwrap().sync_count, 0);
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .len(),
        1
    );
}

/// The UTF-8 bytes of live keys and values are capped; exactly the limit is allowed.
/// Limits: [`small_limits`] (64 bytes).
pub async fn case_limit_max_dataset_bytes(store: Arc<dyn Store>) {
    let d = ds(ALICE, "bytes");
    commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::replace("a", "x".repeat(63), 0)],
    )
    .await;
    let err = refused(
        &*store,
        request(&d, ALICE, vec![Patch::replace("b", "", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasetBytes, 64);
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap().sync_count, 1);

    commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::replace("a", "x".repeat(62), 1)],
    )
    .await;
    let (_, s) = commit(&*store, &d, ALICE, vec![Patch::replace("b", "", 0)]).await;
    assert_eq!(s.sync_count, 3);
    let info = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert_eq!(info[0].bytes, 64);

    // Bytes, not characters: "é" is two.
    let err = refused(
        &*store,
        request(&d, ALICE, vec![Patch::replace("b", "é", 3)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasetBytes, 64);
    // Removing frees bytes.
    let (_, s) = commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::remove("a", 2), Patch::replace("b", "é", 3)],
    )
    .await;
    assert_eq!(values(&s.records), live(&[("b", "é", 4)]));
    let info = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert_eq!((info[0].records, info[0].bytes), (1, 3));
}

/// Cognito Sync's defaults: the 21st dataset, the 1025th record and a dataset over 1 MiB
/// are refused. Default limits.
pub async fn case_default_limits(store: Arc<dyn Store>) {
    let limits = Limits::default();
    for i in 0..limits.max_datasets {
        commit(
            &*store,
            &ds(ALICE, &format!("ds-{i}")),
            ALICE,
            vec![Patch::replace("k", "v", 0)],
        )
        .await;
    }
    let err = refused(
        &*store,
        request(
            &ds(ALICE, "ds-20"),
            ALICE,
            vec![Patch::replace("k", "v", 0)],
        ),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasets, 20);

    let d = ds(BOB, "many");
    let all: Vec<_> = (0..limits.max_records)
        .map(|i| Patch::replace(format!("k{i:04}"), "v", 0))
        .collect();
    let (_, s) = commit(&*store, &d, BOB, all).await;
    assert_eq!(s.records.len(), 1024);
    let err = refused(
        &*store,
        request(&d, BOB, vec![Patch::replace("k1024", "v", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxRecords, 1024);

    let d = ds(CAROL, "big");
    let mib = 1024 * 1024;
    let err = refused(
        &*store,
        request(&d, CAROL, vec![Patch::replace("a", "x".repeat(mib), 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasetBytes, mib as u64);
    commit(
        &*store,
        &d,
        CAROL,
        vec![Patch::replace("a", "x".repeat(mib - 1), 0)],
    )
    .await;
    let err = refused(
        &*store,
        request(&d, CAROL, vec![Patch::replace("b", "", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasetBytes, mib as u64);
    let info = store.list_datasets(DEFAULT_POOL, CAROL).await.unwrap();
    assert_eq!(info[0].bytes, mib as u64);
}

/// Deleting removes records (tombstones too) and grants and bumps the sync count; only the
/// owner may; a re-created dataset continues above the old count, and the last delete's
/// count is kept across the re-creation. Default limits.
pub async fn case_delete_then_recreate_continues_sync_count(store: Arc<dyn Store>) {
    let d = ds(ALICE, "journal");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    commit(&*store, &d, ALICE, vec![Patch::replace("b", "1", 0)]).await;
    commit(&*store, &d, ALICE, vec![Patch::remove("b", 2)]).await;
    store.grant(&d, ALICE, BOB, Access::Read).await.unwrap();
    store.grant(&d, ALICE, CAROL, Access::Write).await.unwrap();

    assert_forbidden(store.delete_dataset(&d, BOB).await);
    assert_forbidden(store.delete_dataset(&d, CAROL).await);
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap().sync_count, 3);

    assert!(!store.snapshot(&d, ALICE).await.unwrap().deleted);
    assert_eq!(store.last_deleted_sync_count(&d).await.unwrap(), 0);
    assert_eq!(
        store
            .last_deleted_sync_count(&ds(ALICE, "never"))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.delete_dataset(&d, ALICE).await.unwrap(), 4);
    assert_eq!(store.last_deleted_sync_count(&d).await.unwrap(), 4);
    let s = store.snapshot(&d, ALICE).await.unwrap();
    assert_eq!((s.sync_count, s.records.len(), s.deleted), (4, 0, true));
    assert!(store.changes(&d, ALICE, 0).await.unwrap().deleted);
    // Every record is now a tombstone; the ones the delete removed carry its sync count, so
    // `changes` since an earlier count reports the deletion.
    let c = store.changes(&d, ALICE, 0).await.unwrap();
    let tombs: Vec<(&str, Option<&str>, u64)> = c
        .records
        .iter()
        .map(|r| (r.key.as_str(), r.value.as_deref(), r.sync_count))
        .collect();
    assert_eq!(c.sync_count, 4);
    assert_eq!(tombs, [("a", None, 4), ("b", None, 3)]);
    let c = store.changes(&d, ALICE, 3).await.unwrap();
    assert_eq!(c.records.len(), 1, "only what the delete removed");
    assert!(
        store
            .list_datasets(DEFAULT_POOL, ALICE)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.access(&d, BOB).await.unwrap(), None, "grants go");
    assert_forbidden(store.snapshot(&d, BOB).await);

    assert!(matches!(
        store.delete_dataset(&d, ALICE).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.delete_dataset(&ds(ALICE, "never"), ALICE).await,
        Err(StoreError::NotFound(_))
    ));

    // Records of the deleted dataset are tombstones: their old sync counts are stale.
    let outcome = store
        .update(request(&d, ALICE, vec![Patch::replace("a", "2", 1)]))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, UpdateOutcome::Conflict { sync_count: 4, conflicts }
            if conflicts[0].server.as_ref().is_some_and(|r| r.value.is_none() && r.sync_count == 4)),
        "{outcome:?}"
    );

    let (changed, s) = commit(&*store, &d, ALICE, vec![Patch::replace("a", "2", 0)]).await;
    assert_eq!(s.sync_count, 5);
    assert!(!s.deleted, "re-created");
    assert!(!store.snapshot(&d, ALICE).await.unwrap().deleted);
    assert_eq!(values(&changed), live(&[("a", "2", 5)]));
    let list = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert_eq!((list[0].sync_count, list[0].records), (5, 1));
    assert_eq!(
        store.last_deleted_sync_count(&d).await.unwrap(),
        4,
        "kept when re-created"
    );
    assert_eq!(store.delete_dataset(&d, ALICE).await.unwrap(), 6);
    assert_eq!(store.last_deleted_sync_count(&d).await.unwrap(), 6);
}

/// A read grant allows `snapshot` and `changes` but not `update`. Default limits.
pub async fn case_read_grant_allows_reading_not_writing(store: Arc<dyn Store>) {
    let d = ds(ALICE, "shared");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    store.grant(&d, ALICE, BOB, Access::Read).await.unwrap();
    assert_eq!(store.access(&d, BOB).await.unwrap(), Some(Access::Read));

    let owner_view = store.snapshot(&d, ALICE).await.unwrap();
    assert_eq!(store.snapshot(&d, BOB).await.unwrap(), owner_view);
    assert_eq!(
        store.changes(&d, BOB, 0).await.unwrap().records,
        owner_view.records
    );
    assert_forbidden(
        store
            .update(request(&d, BOB, vec![Patch::replace("a", "2", 1)]))
            .await,
    );
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap(), owner_view);
}

/// A write grant allows `update` (stamped with the writer) but not owner-only calls; grants
/// upsert and work before the dataset exists. Default limits.
pub async fn case_write_grant_allows_updating(store: Arc<dyn Store>) {
    let d = ds(ALICE, "team");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    store.grant(&d, ALICE, BOB, Access::Read).await.unwrap();
    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();
    assert_eq!(store.access(&d, BOB).await.unwrap(), Some(Access::Write));

    let (changed, s) = commit(&*store, &d, BOB, vec![Patch::replace("a", "2", 1)]).await;
    assert_eq!(s.sync_count, 2);
    assert_eq!(changed[0].last_modified_by, BOB);
    assert_eq!(
        record(&store.snapshot(&d, ALICE).await.unwrap(), "a").last_modified_by,
        BOB
    );

    assert_forbidden(store.delete_dataset(&d, BOB).await);
    assert_forbidden(store.grant(&d, BOB, CAROL, Access::Read).await);
    assert_forbidden(store.revoke(&d, BOB, BOB).await);

    // A grant on a name not yet written: the grantee can read it and create it for the owner.
    let later = ds(ALICE, "later");
    store
        .grant(&later, ALICE, BOB, Access::Write)
        .await
        .unwrap();
    assert_eq!(
        store.access(&later, BOB).await.unwrap(),
        Some(Access::Write)
    );
    assert_eq!(store.snapshot(&later, BOB).await.unwrap().sync_count, 0);
    assert!(
        !store
            .list_datasets(DEFAULT_POOL, BOB)
            .await
            .unwrap()
            .iter()
            .any(|i| i.dataset.name == "later"),
        "a dataset shows up only once it exists"
    );
    commit(&*store, &later, BOB, vec![Patch::replace("k", "v", 0)]).await;
    let owned = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert!(
        owned
            .iter()
            .any(|i| i.dataset.name == "later" && i.access == Access::Owner)
    );
}

/// A revoke takes effect at once; revoking what is not granted is `NotFound`. Default
/// limits.
pub async fn case_revoke_takes_effect(store: Arc<dyn Store>) {
    let d = ds(ALICE, "revocable");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();
    commit(&*store, &d, BOB, vec![Patch::replace("a", "2", 1)]).await;

    assert_forbidden(store.revoke(&d, CAROL, BOB).await);
    store.revoke(&d, ALICE, BOB).await.unwrap();
    assert_eq!(store.access(&d, BOB).await.unwrap(), None);
    assert_forbidden(
        store
            .update(request(&d, BOB, vec![Patch::replace("a", "3", 2)]))
            .await,
    );
    assert_forbidden(store.snapshot(&d, BOB).await);
    assert_forbidden(store.changes(&d, BOB, 0).await);
    assert!(
        store
            .list_datasets(DEFAULT_POOL, BOB)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(matches!(
        store.revoke(&d, ALICE, BOB).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.snapshot(&d, ALICE).await.unwrap().sync_count, 2);
}

/// Without a grant every call on another identity's dataset is `Forbidden`, whether the
/// dataset exists or not (never `NotFound`). Default limits.
pub async fn case_no_grant_is_forbidden(store: Arc<dyn Store>) {
    let existing = ds(ALICE, "private");
    commit(&*store, &existing, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    // A grant to someone else gives BOB nothing.
    store
        .grant(&existing, ALICE, CAROL, Access::Write)
        .await
        .unwrap();
    for d in [existing.clone(), ds(ALICE, "missing")] {
        assert_forbidden(store.snapshot(&d, BOB).await);
        assert_forbidden(store.changes(&d, BOB, 0).await);
        assert_forbidden(
            store
                .update(request(&d, BOB, vec![Patch::replace("a", "x", 0)]))
                .await,
        );
        assert_forbidden(store.delete_dataset(&d, BOB).await);
        assert_forbidden(store.grant(&d, BOB, BOB, Access::Read).await);
        assert_forbidden(store.grant(&d, BOB, CAROL, Access::Read).await);
        assert_forbidden(store.revoke(&d, BOB, CAROL).await);
        assert_eq!(store.access(&d, BOB).await.unwrap(), None);
        assert_eq!(store.access(&d, ALICE).await.unwrap(), Some(Access::Owner));
    }
    assert_eq!(
        store.snapshot(&existing, ALICE).await.unwrap().sync_count,
        1
    );
    assert_eq!(
        store
            .snapshot(&ds(ALICE, "missing"), ALICE)
            .await
            .unwrap()
            .sync_count,
        0
    );
}

/// `grant` refuses the owner as grantee, an invalid grantee and `Owner` access. Default
/// limits.
pub async fn case_grant_rejects_bad_requests(store: Arc<dyn Store>) {
    let d = ds(ALICE, "g");
    assert_bad_request(store.grant(&d, ALICE, ALICE, Access::Read).await);
    assert_bad_request(store.grant(&d, ALICE, BOB, Access::Owner).await);
    assert_bad_request(store.grant(&d, ALICE, "", Access::Read).await);
    assert_bad_request(store.grant(&d, ALICE, "bad\nid", Access::Read).await);
    assert_bad_request(store.grant(&d, ALICE, &"x".repeat(257), Access::Read).await);
    assert_bad_request(store.revoke(&d, ALICE, "").await);
    assert_eq!(store.access(&d, BOB).await.unwrap(), None);
    assert_eq!(store.access(&d, ALICE).await.unwrap(), Some(Access::Owner));
}

/// Grants per dataset name and per owner are capped, whether the datasets exist or not;
/// changing a grant's access is not a new grant; a refused grant leaves nothing; a revoke or
/// a delete frees slots; other owners have their own count. Limits: [`small_limits`] (3 per
/// dataset, 5 per owner).
pub async fn case_limit_grants(store: Arc<dyn Store>) {
    let shared = ds(ALICE, "shared");
    commit(&*store, &shared, ALICE, vec![Patch::replace("k", "v", 0)]).await;
    for grantee in ["g0", "g1", "g2"] {
        store
            .grant(&shared, ALICE, grantee, Access::Read)
            .await
            .unwrap();
    }
    let err = store
        .grant(&shared, ALICE, "g3", Access::Read)
        .await
        .unwrap_err();
    assert_limit(&err, LimitCode::MaxGrantsPerDataset, 3);
    assert_eq!(store.access(&shared, "g3").await.unwrap(), None);
    store
        .grant(&shared, ALICE, "g0", Access::Write)
        .await
        .unwrap();
    assert_eq!(
        store.access(&shared, "g0").await.unwrap(),
        Some(Access::Write)
    );

    // Names that were never written count against the owner all the same.
    for grantee in ["g0", "g1"] {
        store
            .grant(&ds(ALICE, "unborn"), ALICE, grantee, Access::Read)
            .await
            .unwrap();
    }
    let err = store
        .grant(&ds(ALICE, "third"), ALICE, "g0", Access::Read)
        .await
        .unwrap_err();
    assert_limit(&err, LimitCode::MaxGrantsPerOwner, 5);
    assert_eq!(store.access(&ds(ALICE, "third"), "g0").await.unwrap(), None);
    store
        .grant(&ds(ALICE, "unborn"), ALICE, "g1", Access::Write)
        .await
        .unwrap();
    store
        .grant(&ds(BOB, "own"), BOB, "g0", Access::Read)
        .await
        .unwrap();

    store.revoke(&shared, ALICE, "g1").await.unwrap();
    store
        .grant(&shared, ALICE, "g3", Access::Read)
        .await
        .unwrap();
    store.delete_dataset(&shared, ALICE).await.unwrap();
    for grantee in ["g0", "g1", "g2"] {
        store
            .grant(&ds(ALICE, "third"), ALICE, grantee, Access::Read)
            .await
            .unwrap();
    }
}

/// New grants racing for the last slots: exactly as many succeed as fit. Limits:
/// [`small_limits`] (3 per dataset, 5 per owner).
pub async fn case_concurrent_grants_respect_the_limits(store: Arc<dyn Store>) {
    async fn race(store: &Arc<dyn Store>, names: &[&str], grantees: usize) -> usize {
        let mut tasks = Vec::new();
        for i in 0..grantees {
            let store = Arc::clone(store);
            let d = ds(ALICE, names[i % names.len()]);
            tasks.push(tokio::spawn(async move {
                store
                    .grant(&d, ALICE, &format!("racer-{i}"), Access::Read)
                    .await
            }));
        }
        let mut granted = 0;
        for task in tasks {
            match task.await.expect("grant task panicked") {
                Ok(()) => granted += 1,
                Err(StoreError::Limit {
                    limit: LimitCode::MaxGrantsPerDataset | LimitCode::MaxGrantsPerOwner,
                    ..
                }) => {}
                Err(e) => panic!("expected a grant or a grant limit, got {e:?}"),
            }
        }
        granted
    }
    assert_eq!(
        race(&store, &["one"], 12).await,
        3,
        "max_grants_per_dataset"
    );
    assert_eq!(
        race(&store, &["two", "three"], 12).await,
        2,
        "max_grants_per_owner"
    );
}

/// `list_datasets` shows the identity's own live datasets and the live ones shared with it,
/// with its access, ordered by owner then name. Default limits.
pub async fn case_list_datasets_shows_own_and_shared(store: Arc<dyn Store>) {
    let v = |k: &str| vec![Patch::replace(k, "v", 0)];
    commit(&*store, &ds(ALICE, "b-list"), ALICE, v("k")).await;
    commit(&*store, &ds(ALICE, "a-list"), ALICE, v("k")).await;
    commit(&*store, &ds(ALICE, "unshared"), ALICE, v("k")).await;
    commit(&*store, &ds(BOB, "notes"), BOB, v("k")).await;
    commit(&*store, &ds(CAROL, "zeta"), CAROL, v("kk")).await;
    store
        .grant(&ds(ALICE, "a-list"), ALICE, BOB, Access::Read)
        .await
        .unwrap();
    store
        .grant(&ds(ALICE, "b-list"), ALICE, BOB, Access::Write)
        .await
        .unwrap();
    store
        .grant(&ds(ALICE, "unborn"), ALICE, BOB, Access::Read)
        .await
        .unwrap();
    store
        .grant(&ds(CAROL, "zeta"), CAROL, BOB, Access::Read)
        .await
        .unwrap();

    let list = store.list_datasets(DEFAULT_POOL, BOB).await.unwrap();
    let seen: Vec<_> = list.iter().map(|i| (i.dataset.clone(), i.access)).collect();
    assert_eq!(
        seen,
        [
            (DatasetRef::new(ALICE, "a-list"), Access::Read),
            (DatasetRef::new(ALICE, "b-list"), Access::Write),
            (DatasetRef::new(BOB, "notes"), Access::Owner),
            (DatasetRef::new(CAROL, "zeta"), Access::Read),
        ]
    );
    let zeta = &list[3];
    assert_eq!(
        (zeta.sync_count, zeta.records, zeta.bytes),
        (1, 1, record_bytes("kk", "v"))
    );

    store
        .delete_dataset(&ds(CAROL, "zeta"), CAROL)
        .await
        .unwrap();
    let names: Vec<_> = store
        .list_datasets(DEFAULT_POOL, BOB)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.dataset.name)
        .collect();
    assert_eq!(names, ["a-list", "b-list", "notes"]);
    let own: Vec<_> = store
        .list_datasets(DEFAULT_POOL, ALICE)
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.dataset.name, i.access))
        .collect();
    assert_eq!(
        own,
        [
            ("a-list".to_owned(), Access::Owner),
            ("b-list".to_owned(), Access::Owner),
            ("unshared".to_owned(), Access::Owner),
        ]
    );
}

/// The same owner and name in another pool is another dataset, with its own sync count,
/// grants and limits. Default limits.
pub async fn case_pools_are_separate(store: Arc<dyn Store>) {
    let here = ds(ALICE, "same");
    let there = DatasetKey::new("other-app", ALICE, "same");
    commit(&*store, &here, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    commit(&*store, &here, ALICE, vec![Patch::replace("a", "2", 1)]).await;
    let (_, s) = commit(&*store, &there, ALICE, vec![Patch::replace("b", "1", 0)]).await;
    assert_eq!(s.sync_count, 1);
    assert_eq!(keys(&s.records), ["b"]);
    store.grant(&here, ALICE, BOB, Access::Read).await.unwrap();
    assert_forbidden(store.snapshot(&there, BOB).await);

    let other = store.list_datasets("other-app", ALICE).await.unwrap();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0].sync_count, 1);
    assert!(
        store
            .list_datasets("other-app", BOB)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.list_datasets(DEFAULT_POOL, BOB).await.unwrap().len(),
        1
    );
    assert_eq!(store.snapshot(&here, ALICE).await.unwrap().sync_count, 2);
}

/// Many tasks doing read-then-update with the sync counts they saw, retrying on conflict,
/// serialise: the dataset's sync count equals the number of commits and no write is lost.
/// Default limits; needs a multi-thread runtime to be meaningful.
pub async fn case_concurrent_writers_serialise(store: Arc<dyn Store>) {
    const TASKS: u64 = 50;
    const ROUNDS: u64 = 2;
    let d = ds(ALICE, "contended");
    // Half the writers are the owner, half a write grantee.
    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();

    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = Arc::clone(&store);
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let actor = if task % 2 == 0 { ALICE } else { BOB };
            let own_key = format!("task-{task:02}");
            let mut conflicts = 0u64;
            for round in 0..ROUNDS {
                loop {
                    let s = store.snapshot(&d, actor).await.unwrap();
                    let counter = s.records.iter().find(|r| r.key == "counter");
                    let (count, counter_sync) = counter.map_or((0, 0), |r| {
                        let n: u64 = r.value.as_deref().unwrap_or("0").parse().unwrap();
                        (n, r.sync_count)
                    });
                    let own_sync = s
                        .records
                        .iter()
                        .find(|r| r.key == own_key)
                        .map_or(0, |r| r.sync_count);
                    let patches = vec![
                        Patch::replace("counter", (count + 1).to_string(), counter_sync),
                        Patch::replace(own_key.clone(), round.to_string(), own_sync),
                    ];
                    match store.update(request(&d, actor, patches)).await.unwrap() {
                        UpdateOutcome::Committed { .. } => break,
                        UpdateOutcome::Conflict { .. } => conflicts += 1,
                    }
                }
            }
            conflicts
        }));
    }
    for task in tasks {
        task.await.expect("writer task panicked");
    }

    let s = store.snapshot(&d, ALICE).await.unwrap();
    let commits = TASKS * ROUNDS;
    assert_eq!(s.sync_count, commits, "one sync count per commit");
    assert_eq!(
        record(&s, "counter").value.as_deref(),
        Some(commits.to_string().as_str()),
        "no increment was lost"
    );
    assert_eq!(s.records.len() as u64, TASKS + 1);
    for task in 0..TASKS {
        let r = record(&s, &format!("task-{task:02}"));
        assert_eq!(r.value.as_deref(), Some((ROUNDS - 1).to_string().as_str()));
    }
    // Every commit's sync count is distinct: the counter's history is 1..=commits.
    assert_eq!(record(&s, "counter").sync_count, commits);
}

/// Invalid names, identities, keys and patches (NUL characters included) are refused
/// before anything is written. Default limits.
pub async fn case_validation_errors_leave_data_unchanged(store: Arc<dyn Store>) {
    let d = ds(ALICE, "valid");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    let before = store.changes(&d, ALICE, 0).await.unwrap();
    let good = || Patch::replace("b", "1", 0);

    for name in ["", "bad name", "slash/name", "é", &"n".repeat(129)] {
        let bad = ds(ALICE, name);
        assert!(
            matches!(
                store.update(request(&bad, ALICE, vec![good()])).await,
                Err(StoreError::InvalidName { .. })
            ),
            "name {name:?}"
        );
        assert_bad_request(store.snapshot(&bad, ALICE).await);
        assert_bad_request(store.changes(&bad, ALICE, 0).await);
        assert_bad_request(store.delete_dataset(&bad, ALICE).await);
        assert_bad_request(store.grant(&bad, ALICE, BOB, Access::Read).await);
        assert_bad_request(store.revoke(&bad, ALICE, BOB).await);
        assert_bad_request(store.access(&bad, ALICE).await);
    }
    for identity in ["", "line\nbreak", &"i".repeat(257)] {
        let bad_owner = ds(identity, "valid");
        assert_bad_request(
            store
                .update(request(&bad_owner, identity, vec![good()]))
                .await,
        );
        assert_bad_request(store.snapshot(&bad_owner, identity).await);
        assert_bad_request(store.update(request(&d, identity, vec![good()])).await);
        assert_bad_request(store.snapshot(&d, identity).await);
        assert_bad_request(store.access(&d, identity).await);
        assert_bad_request(store.delete_dataset(&d, identity).await);
        assert_bad_request(store.list_datasets(DEFAULT_POOL, identity).await);
    }

    let mut no_value = Patch::replace("c", "x", 0);
    no_value.value = None;
    let bad_updates: Vec<Vec<Patch>> = vec![
        vec![good(), Patch::replace("", "x", 0)],
        vec![good(), Patch::replace("b", "2", 0)],
        vec![good(), no_value],
        vec![],
        // U+0000 is refused everywhere (PostgreSQL's text cannot hold it).
        vec![good(), Patch::replace("nul\0key", "x", 0)],
        vec![good(), Patch::replace("c", "a\0b", 0)],
    ];
    for patches in bad_updates {
        let err = refused(&*store, request(&d, ALICE, patches.clone())).await;
        assert!(
            matches!(err, StoreError::BadRequest(_)),
            "{patches:?}: {err:?}"
        );
    }
    let err = refused(
        &*store,
        request(
            &d,
            ALICE,
            vec![good(), Patch::replace("k".repeat(1025), "x", 0)],
        ),
    )
    .await;
    assert_limit(&err, LimitCode::MaxKeyLength, 1024);
    let too_many: Vec<_> = (0..1025)
        .map(|i| Patch::replace(format!("p{i}"), "x", 0))
        .collect();
    let err = refused(&*store, request(&d, ALICE, too_many)).await;
    assert_limit(&err, LimitCode::MaxPatches, 1024);
    let err = refused(
        &*store,
        UpdateRequest {
            device_id: Some("d".repeat(129)),
            ..request(&d, ALICE, vec![good()])
        },
    )
    .await;
    assert_limit(&err, LimitCode::MaxDeviceIdLength, 128);
    let err = refused(
        &*store,
        UpdateRequest {
            device_id: Some("phone\0".into()),
            ..request(&d, ALICE, vec![good()])
        },
    )
    .await;
    assert!(matches!(err, StoreError::BadRequest(_)), "{err:?}");

    assert_eq!(store.changes(&d, ALICE, 0).await.unwrap(), before);
    let list = store.list_datasets(DEFAULT_POOL, ALICE).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].sync_count, 1);
}

/// `health` answers while open; after `close` (which may be repeated) every call is
/// `Unavailable`. Default limits.
pub async fn case_close_makes_calls_unavailable(store: Arc<dyn Store>) {
    let d = ds(ALICE, "closing");
    store.health().await.unwrap();
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    store.close().await;
    store.close().await;

    let unavailable = |what: &str, e: Option<StoreError>| {
        assert!(
            matches!(e, Some(StoreError::Unavailable(_))),
            "{what} after close: {e:?}"
        );
    };
    unavailable("health", store.health().await.err());
    unavailable("snapshot", store.snapshot(&d, ALICE).await.err());
    unavailable("changes", store.changes(&d, ALICE, 0).await.err());
    unavailable(
        "update",
        store
            .update(request(&d, ALICE, vec![Patch::replace("a", "2", 1)]))
            .await
            .err(),
    );
    unavailable("delete", store.delete_dataset(&d, ALICE).await.err());
    unavailable("list", store.list_datasets(DEFAULT_POOL, ALICE).await.err());
    unavailable(
        "grant",
        store.grant(&d, ALICE, BOB, Access::Read).await.err(),
    );
    unavailable("revoke", store.revoke(&d, ALICE, BOB).await.err());
    unavailable("access", store.access(&d, ALICE).await.err());
    unavailable(
        "create identity",
        store
            .create_identity(DEFAULT_POOL, &iid(1), true)
            .await
            .err(),
    );
    unavailable(
        "identity",
        store.identity(DEFAULT_POOL, &iid(1)).await.err(),
    );
    unavailable(
        "merge",
        store
            .merge_identity(DEFAULT_POOL, &iid(1), &iid(2))
            .await
            .err(),
    );
}

// ---------------------------------------------------------------------------------------
// Identities, logins and merges

/// A valid identity id, distinct for each `n`.
fn iid(n: u32) -> String {
    format!("us-east-1:00000000-0000-4000-8000-{n:012x}")
}

/// Creates guest `iid(n)` and authenticated identity `iid(n + 1)`; returns their ids.
async fn guest_and_user(store: &dyn Store, n: u32) -> (String, String) {
    let (guest, user) = (iid(n), iid(n + 1));
    store
        .create_identity(DEFAULT_POOL, &guest, true)
        .await
        .unwrap();
    store
        .create_identity(DEFAULT_POOL, &user, false)
        .await
        .unwrap();
    (guest, user)
}

fn login(provider: &str, subject: &str) -> Login {
    Login::new(provider, subject)
}

/// Identities are created as guests or not and read back; a login names one identity,
/// linking one linked elsewhere is refused whole, logins naming two identities conflict, and
/// a guest with a login is a guest no more. Default limits.
pub async fn case_identities_and_logins(store: Arc<dyn Store>) {
    let (guest, alice, bob) = (iid(1), iid(2), iid(3));
    store
        .create_identity(DEFAULT_POOL, &guest, true)
        .await
        .unwrap();
    store
        .create_identity(DEFAULT_POOL, &alice, false)
        .await
        .unwrap();
    store
        .create_identity(DEFAULT_POOL, &bob, false)
        .await
        .unwrap();
    let err = store
        .create_identity(DEFAULT_POOL, &guest, true)
        .await
        .unwrap_err();
    assert_eq!(err, StoreError::IdentityExists(guest.clone()));
    assert_eq!(err.code(), tandem_protocol::ErrorCode::Conflict);
    assert_bad_request(
        store
            .create_identity(
                DEFAULT_POOL,
                "us-east-1:0000000A-0000-4000-8000-000000000001",
                true,
            )
            .await,
    );
    assert_bad_request(store.create_identity(DEFAULT_POOL, "alice", true).await);

    let g = store.identity(DEFAULT_POOL, &guest).await.unwrap().unwrap();
    assert!(
        g.guest && g.merged_into.is_none() && g.logins.is_empty(),
        "{g:?}"
    );
    assert_eq!(store.identity(DEFAULT_POOL, &iid(9)).await.unwrap(), None);
    assert_eq!(store.identity("other", &guest).await.unwrap(), None);

    let (google, facebook, apple) = (
        login("google", "1"),
        login("facebook", "2"),
        login("apple", "3"),
    );
    store
        .link_logins(DEFAULT_POOL, &alice, &[google.clone(), facebook.clone()])
        .await
        .unwrap();
    // Linking again what is linked already changes nothing.
    store
        .link_logins(DEFAULT_POOL, &alice, std::slice::from_ref(&google))
        .await
        .unwrap();
    let a = store.identity(DEFAULT_POOL, &alice).await.unwrap().unwrap();
    assert_eq!(a.logins, vec![facebook.clone(), google.clone()]);
    assert!(!a.guest);

    let find = |logins: Vec<Login>| {
        let store = Arc::clone(&store);
        async move { store.identity_for_logins(DEFAULT_POOL, &logins).await }
    };
    assert_eq!(
        find(vec![google.clone()]).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(find(vec![login("google", "9")]).await.unwrap(), None);
    assert_eq!(
        find(vec![login("google", "9"), facebook.clone()])
            .await
            .unwrap(),
        Some(alice.clone())
    );
    // The same subject with another provider is another login.
    assert_eq!(find(vec![login("apple", "1")]).await.unwrap(), None);
    assert_bad_request(find(vec![]).await);
    assert_eq!(
        store
            .identity_for_logins("other", std::slice::from_ref(&google))
            .await
            .unwrap(),
        None
    );

    // A login linked elsewhere refuses the whole link.
    let err = store
        .link_logins(DEFAULT_POOL, &bob, &[apple.clone(), google.clone()])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::LoginLinked { identity, .. } if *identity == alice),
        "{err:?}"
    );
    assert_eq!(err.code(), tandem_protocol::ErrorCode::Conflict);
    assert_eq!(find(vec![apple.clone()]).await.unwrap(), None);
    store
        .link_logins(DEFAULT_POOL, &bob, std::slice::from_ref(&apple))
        .await
        .unwrap();
    let err = find(vec![google.clone(), apple.clone()]).await.unwrap_err();
    assert!(matches!(err, StoreError::LoginsConflict { .. }), "{err:?}");
    assert_eq!(err.code(), tandem_protocol::ErrorCode::Conflict);

    // A guest that links a login keeps its id and is a guest no more.
    store
        .link_logins(DEFAULT_POOL, &guest, &[login("twitter", "4")])
        .await
        .unwrap();
    let g = store.identity(DEFAULT_POOL, &guest).await.unwrap().unwrap();
    assert!(!g.guest && g.logins == vec![login("twitter", "4")], "{g:?}");

    assert!(matches!(
        store
            .link_logins(DEFAULT_POOL, &iid(9), &[login("x", "1")])
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert_bad_request(store.link_logins(DEFAULT_POOL, &bob, &[]).await);
    assert_bad_request(
        store
            .link_logins(DEFAULT_POOL, &bob, &[login("", "1")])
            .await,
    );
}

/// A merge moves each live dataset of the guest: under its own name where the target has
/// no live dataset of that name (continuing above a deleted one), else as the copy
/// `<name>.<guest's uuid>` reported by `merged_dataset_names` until it is deleted; each is
/// one commit with its live records stamped; grants move along; the guest's datasets are
/// deleted and the guest is merged, so it can be neither linked nor merged again. Default
/// limits.
pub async fn case_merge_moves_and_renames_datasets(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 10).await;
    store
        .link_logins(DEFAULT_POOL, &user, &[login("google", "u")])
        .await
        .unwrap();
    let gds = |name: &str| ds(&guest, name);
    let uds = |name: &str| ds(&user, name);
    // The guest's `a` at sync count 2, with a tombstone; `b` clashes with the user's live
    // `b`; `c` was the user's and is deleted; `gone` is deleted and stays behind.
    commit(
        &*store,
        &gds("a"),
        &guest,
        vec![Patch::replace("k1", "v1", 0), Patch::replace("k2", "v2", 0)],
    )
    .await;
    commit(&*store, &gds("a"), &guest, vec![Patch::remove("k2", 1)]).await;
    commit(
        &*store,
        &gds("b"),
        &guest,
        vec![Patch::replace("gb", "guest", 0)],
    )
    .await;
    commit(
        &*store,
        &gds("c"),
        &guest,
        vec![Patch::replace("gc", "guest", 0)],
    )
    .await;
    commit(
        &*store,
        &gds("gone"),
        &guest,
        vec![Patch::replace("x", "1", 0)],
    )
    .await;
    store.delete_dataset(&gds("gone"), &guest).await.unwrap();
    store
        .grant(&gds("a"), &guest, CAROL, Access::Read)
        .await
        .unwrap();
    store
        .grant(&gds("a"), &guest, &user, Access::Write)
        .await
        .unwrap();
    let (_, user_b) = commit(
        &*store,
        &uds("b"),
        &user,
        vec![Patch::replace("ub", "user", 0)],
    )
    .await;
    commit(
        &*store,
        &uds("c"),
        &user,
        vec![Patch::replace("uc", "user", 0)],
    )
    .await;
    commit(
        &*store,
        &uds("c"),
        &user,
        vec![Patch::replace("uc", "user2", 1)],
    )
    .await;
    assert_eq!(store.delete_dataset(&uds("c"), &user).await.unwrap(), 3);

    let before = now_ms();
    let outcome = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    let copy = "b.00000000-0000-4000-8000-00000000000a";
    let moved: Vec<(&str, &str, u64)> = outcome
        .moved
        .iter()
        .map(|m| (m.from_name.as_str(), m.to_name.as_str(), m.sync_count))
        .collect();
    assert_eq!(moved, vec![("a", "a", 1), ("b", copy, 1), ("c", "c", 4)]);
    assert_eq!(outcome.renamed(), vec![copy]);

    // Each moved dataset is one commit whose records carry its count and their own fields.
    let a = store.snapshot(&uds("a"), &user).await.unwrap();
    assert_eq!((a.sync_count, a.deleted), (1, false));
    assert_eq!(values(&a.records), live(&[("k1", "v1", 1)]));
    let k1 = record(&a, "k1");
    assert_eq!(k1.last_modified_by, guest);
    assert!(k1.last_modified <= before, "the record keeps its own time");
    assert_eq!(store.snapshot(&uds("b"), &user).await.unwrap(), user_b);
    let b_copy = store.snapshot(&uds(copy), &user).await.unwrap();
    assert_eq!(values(&b_copy.records), live(&[("gb", "guest", 1)]));
    let c = store.changes(&uds("c"), &user, 3).await.unwrap();
    assert_eq!((c.sync_count, c.deleted), (4, false));
    assert_eq!(values(&c.records), live(&[("gc", "guest", 4)]));
    let c_all = store.snapshot(&uds("c"), &user).await.unwrap();
    assert_eq!(keys(&c_all.records), vec!["gc"]);
    let names: Vec<String> = store
        .list_datasets(DEFAULT_POOL, &user)
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.dataset.name)
        .collect();
    assert_eq!(names, vec!["a", "b", copy, "c"]);

    assert_eq!(
        store.merged_dataset_names(&uds("b")).await.unwrap(),
        vec![copy.to_owned()]
    );
    assert!(
        store
            .merged_dataset_names(&uds("a"))
            .await
            .unwrap()
            .is_empty()
    );

    // Grants moved along; one to the user itself is gone.
    assert_eq!(
        store.access(&uds("a"), CAROL).await.unwrap(),
        Some(Access::Read)
    );
    assert_eq!(store.access(&gds("a"), CAROL).await.unwrap(), None);
    assert_eq!(
        store.access(&uds("a"), &user).await.unwrap(),
        Some(Access::Owner)
    );

    // The guest keeps nothing live, and is merged.
    assert!(
        store
            .list_datasets(DEFAULT_POOL, &guest)
            .await
            .unwrap()
            .is_empty()
    );
    let ga = store.snapshot(&gds("a"), &guest).await.unwrap();
    assert!(
        ga.deleted && ga.records.is_empty() && ga.sync_count == 3,
        "{ga:?}"
    );
    let g = store.identity(DEFAULT_POOL, &guest).await.unwrap().unwrap();
    assert_eq!(g.merged_into.as_deref(), Some(user.as_str()));
    let merged = StoreError::IdentityMerged {
        identity: guest.clone(),
        into: user.clone(),
    };
    assert_eq!(merged.code(), tandem_protocol::ErrorCode::Forbidden);
    assert_eq!(
        store.merge_identity(DEFAULT_POOL, &guest, &user).await,
        Err(merged.clone())
    );
    assert_eq!(
        store
            .link_logins(DEFAULT_POOL, &guest, &[login("google", "g")])
            .await,
        Err(merged)
    );

    // A deleted copy is no longer reported, even once re-created.
    store.delete_dataset(&uds(copy), &user).await.unwrap();
    assert!(
        store
            .merged_dataset_names(&uds("b"))
            .await
            .unwrap()
            .is_empty()
    );
    commit(
        &*store,
        &uds(copy),
        &user,
        vec![Patch::replace("n", "1", 0)],
    )
    .await;
    assert!(
        store
            .merged_dataset_names(&uds("b"))
            .await
            .unwrap()
            .is_empty()
    );

    // Only a guest is merged, into another identity that exists and was not merged.
    let other = iid(12);
    store
        .create_identity(DEFAULT_POOL, &other, true)
        .await
        .unwrap();
    assert_bad_request(store.merge_identity(DEFAULT_POOL, &user, &other).await);
    assert_bad_request(store.merge_identity(DEFAULT_POOL, &other, &other).await);
    assert!(matches!(
        store.merge_identity(DEFAULT_POOL, &other, &iid(99)).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store.merge_identity(DEFAULT_POOL, &other, &guest).await,
        Err(StoreError::IdentityMerged { .. })
    ));
    // A guest without datasets merges too.
    let empty = store
        .merge_identity(DEFAULT_POOL, &other, &user)
        .await
        .unwrap();
    assert!(empty.moved.is_empty());
}

/// Copies may take the target past `max_datasets` (a login never fails on a limit); new
/// datasets stay refused until it is back under. Small limits (3 datasets).
pub async fn case_merge_may_exceed_max_datasets(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 20).await;
    for name in ["d1", "d2", "d3"] {
        commit(
            &*store,
            &ds(&user, name),
            &user,
            vec![Patch::replace("k", "u", 0)],
        )
        .await;
    }
    for name in ["d1", "e1"] {
        commit(
            &*store,
            &ds(&guest, name),
            &guest,
            vec![Patch::replace("k", "g", 0)],
        )
        .await;
    }
    let outcome = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    assert_eq!(outcome.moved.len(), 2);
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, &user)
            .await
            .unwrap()
            .len(),
        5
    );
    let err = refused(
        &*store,
        request(&ds(&user, "new"), &user, vec![Patch::replace("k", "v", 0)]),
    )
    .await;
    assert_limit(&err, LimitCode::MaxDatasets, 3);
}

/// A merge that cannot finish writes nothing: here the copy's name is taken by a live
/// dataset of the target. Default limits.
pub async fn case_failed_merge_changes_nothing(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 30).await;
    commit(
        &*store,
        &ds(&guest, "a"),
        &guest,
        vec![Patch::replace("k", "g", 0)],
    )
    .await;
    commit(
        &*store,
        &ds(&guest, "b"),
        &guest,
        vec![Patch::replace("k", "g", 0)],
    )
    .await;
    let copy = "b.00000000-0000-4000-8000-00000000001e";
    for name in ["b", copy] {
        commit(
            &*store,
            &ds(&user, name),
            &user,
            vec![Patch::replace("k", "u", 0)],
        )
        .await;
    }
    let guest_before = store.list_datasets(DEFAULT_POOL, &guest).await.unwrap();
    let user_before = store.list_datasets(DEFAULT_POOL, &user).await.unwrap();
    assert!(
        store
            .merge_identity(DEFAULT_POOL, &guest, &user)
            .await
            .is_err()
    );
    assert_eq!(
        store.list_datasets(DEFAULT_POOL, &guest).await.unwrap(),
        guest_before
    );
    assert_eq!(
        store.list_datasets(DEFAULT_POOL, &user).await.unwrap(),
        user_before
    );
    let g = store.identity(DEFAULT_POOL, &guest).await.unwrap().unwrap();
    assert_eq!(g.merged_into, None);
}

/// Identities racing to link the same login: exactly one gets it, the others are refused
/// with `LoginLinked` and link nothing. Default limits.
pub async fn case_concurrent_links_give_a_login_to_one_identity(store: Arc<dyn Store>) {
    const TASKS: u32 = 8;
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        store
            .create_identity(DEFAULT_POOL, &iid(40 + n), true)
            .await
            .unwrap();
    }
    for n in 0..TASKS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let own = login("own", &n.to_string());
            let result = store
                .link_logins(DEFAULT_POOL, &iid(40 + n), &[own, login("shared", "s")])
                .await;
            (n, result)
        }));
    }
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (n, Ok(())) => winners.push(n),
            (_, Err(StoreError::LoginLinked { .. })) => {}
            (_, other) => panic!("a link should win or be refused, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = iid(40 + winners[0]);
    assert_eq!(
        store
            .identity_for_logins(DEFAULT_POOL, &[login("shared", "s")])
            .await
            .unwrap(),
        Some(winner)
    );
    for n in (0..TASKS).filter(|n| *n != winners[0]) {
        let i = store
            .identity(DEFAULT_POOL, &iid(40 + n))
            .await
            .unwrap()
            .unwrap();
        assert!(i.guest && i.logins.is_empty(), "{i:?}");
    }
}

/// Updates of the guest's dataset racing its merge: each committed update lands either in
/// the moved dataset (before the merge) or in the guest's re-created one (after), never in
/// both and never lost. Default limits.
pub async fn case_merge_concurrent_with_updates_loses_nothing(store: Arc<dyn Store>) {
    const TASKS: u32 = 20;
    let (guest, user) = guest_and_user(&*store, 60).await;
    let gd = ds(&guest, "d");
    commit(&*store, &gd, &guest, vec![Patch::replace("first", "1", 0)]).await;
    let mut tasks = Vec::new();
    for n in 0..TASKS {
        let (store, gd, guest) = (Arc::clone(&store), gd.clone(), guest.clone());
        tasks.push(tokio::spawn(async move {
            commit(
                &*store,
                &gd,
                &guest,
                vec![Patch::replace(format!("k{n:02}"), "v", 0)],
            )
            .await;
        }));
    }
    let outcome = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(outcome.renamed(), Vec::<&str>::new());
    let moved = store.snapshot(&ds(&user, "d"), &user).await.unwrap();
    let left = store.snapshot(&gd, &guest).await.unwrap();
    assert!(
        moved
            .records
            .iter()
            .all(|r| r.sync_count == moved.sync_count)
    );
    let mut all: Vec<&str> = keys(&moved.records);
    all.extend(keys(&left.records));
    all.sort_unstable();
    let mut expected: Vec<String> = (0..TASKS).map(|n| format!("k{n:02}")).collect();
    expected.push("first".into());
    expected.sort_unstable();
    assert_eq!(all, expected);
}

/// A clash on a name so long that `<name>.<uuid>` cut to 128 characters is the name itself
/// (or loses the uuid) makes the copy `<name cut>.<uuid>` instead, so the login still
/// succeeds and copies from two guests stay apart. Default limits.
pub async fn case_merge_copies_of_long_names_stay_apart(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 70).await;
    let other_guest = iid(72);
    store
        .create_identity(DEFAULT_POOL, &other_guest, true)
        .await
        .unwrap();
    let long = "n".repeat(128);
    for owner in [&guest, &user, &other_guest] {
        commit(
            &*store,
            &ds(owner, &long),
            owner,
            vec![Patch::replace("k", owner.as_str(), 0)],
        )
        .await;
    }
    let first = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    let second = store
        .merge_identity(DEFAULT_POOL, &other_guest, &user)
        .await
        .unwrap();
    let prefix = "n".repeat(91);
    assert_eq!(
        first.renamed(),
        vec![format!("{prefix}.00000000-0000-4000-8000-000000000046").as_str()]
    );
    assert_eq!(
        second.renamed(),
        vec![format!("{prefix}.00000000-0000-4000-8000-000000000048").as_str()]
    );
    assert_eq!(
        store
            .list_datasets(DEFAULT_POOL, &user)
            .await
            .unwrap()
            .len(),
        3
    );
    assert_eq!(
        store
            .merged_dataset_names(&ds(&user, &long))
            .await
            .unwrap()
            .len(),
        2
    );
}

// ---------------------------------------------------------------------------------------
// The commit log

fn kinds(entries: &[LogEntry]) -> Vec<(LogKind, u64, &str)> {
    entries
        .iter()
        .map(|e| (e.kind, e.sync_count, e.actor.as_str()))
        .collect()
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("patches {text:?}: {e}"))
}

/// Every commit appends one entry, in order, with what it applied; a conflict or a refused
/// update appends nothing. `log` and `log_since` agree. Default limits.
pub async fn case_commit_log_records_every_commit(store: Arc<dyn Store>) {
    let d = ds(ALICE, "logged");
    let before = now_ms();
    let mut first = request(
        &d,
        ALICE,
        vec![
            Patch::replace("a", "1", 0),
            Patch {
                device_last_modified: Some(42),
                ..Patch::replace("b", "2", 0)
            },
            // Removing what is absent changes nothing and is not logged.
            Patch::remove("c", 0),
        ],
    );
    first.device_id = Some("phone".into());
    let Ok(UpdateOutcome::Committed { changed, .. }) = store.update(first).await else {
        panic!("first update should commit");
    };
    let log = store.log(&d, 0, 100).await.unwrap();
    assert_eq!(log.len(), 1, "{log:?}");
    let entry = &log[0];
    assert_eq!(entry.dataset, d);
    assert_eq!(
        (entry.kind, entry.sync_count, entry.actor.as_str()),
        (LogKind::Update, 1, ALICE)
    );
    assert_eq!(entry.device_id.as_deref(), Some("phone"));
    assert!(entry.server_time >= before && entry.server_time <= now_ms());
    let expected: Vec<serde_json::Value> = changed
        .iter()
        .map(|r| {
            serde_json::json!({
                "key": r.key,
                "value": r.value,
                "syncCount": r.sync_count,
                "deviceLastModified": r.device_last_modified,
                // No stored record before: the keys were new.
                "before": null,
            })
        })
        .collect();
    assert_eq!(json(&entry.patches), serde_json::Value::Array(expected));
    assert_eq!(
        json(&entry.patches)[1]["deviceLastModified"],
        serde_json::json!(42)
    );

    // A conflict and a forbidden update leave the log as it was.
    let stale = store
        .update(request(&d, ALICE, vec![Patch::replace("a", "x", 0)]))
        .await
        .unwrap();
    assert!(matches!(stale, UpdateOutcome::Conflict { .. }), "{stale:?}");
    assert_forbidden(
        store
            .update(request(&d, BOB, vec![Patch::replace("a", "x", 1)]))
            .await,
    );
    assert_eq!(store.log(&d, 0, 100).await.unwrap(), log);

    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();
    commit(&*store, &d, BOB, vec![Patch::remove("a", 1)]).await;
    store.revoke(&d, ALICE, BOB).await.unwrap();
    // A revoke of nothing is refused and not logged.
    assert!(matches!(
        store.revoke(&d, ALICE, CAROL).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.delete_dataset(&d, ALICE).await.unwrap(), 3);

    let log = store.log(&d, 0, 100).await.unwrap();
    assert_eq!(
        kinds(&log),
        [
            (LogKind::Update, 1, ALICE),
            (LogKind::Grant, 1, ALICE),
            (LogKind::Update, 2, BOB),
            (LogKind::Revoke, 2, ALICE),
            (LogKind::Delete, 3, ALICE),
        ]
    );
    assert!(log.windows(2).all(|w| w[0].id < w[1].id), "{log:?}");
    assert_eq!(
        json(&log[1].patches),
        serde_json::json!({"grantee": BOB, "access": "write"})
    );
    // The remove carries the record it replaced, whole.
    let a = &changed[0];
    assert_eq!(
        json(&log[2].patches),
        serde_json::json!([{"key": "a", "value": null, "syncCount": 2,
                            "deviceLastModified": null,
                            "before": {"value": "1", "syncCount": 1,
                                       "lastModified": a.last_modified,
                                       "lastModifiedBy": ALICE, "deviceId": "phone",
                                       "deviceLastModified": null}}])
    );
    assert_eq!(
        json(&log[3].patches),
        serde_json::json!({"grantee": BOB, "access": null})
    );
    // The delete keeps the live records as they were.
    assert_eq!(
        json(&log[4].patches),
        serde_json::json!({"records": [serde_json::to_value(&changed[1]).unwrap()]})
    );
    assert_eq!(log[4].keys(), Some(vec!["b".to_owned()]));
    assert_eq!(log[2].keys(), Some(vec!["a".to_owned()]));
    assert_eq!(log[1].keys(), None);
    assert_eq!(log[1].grant(), Some((BOB.to_owned(), Some(Access::Write))));
    assert_eq!(log[3].grant(), Some((BOB.to_owned(), None)));
    assert_eq!(log[2].grant(), None);

    // From a sync count, and a page at a time.
    assert_eq!(store.log(&d, 2, 100).await.unwrap(), log[4..]);
    assert_eq!(store.log(&d, 0, 2).await.unwrap(), log[..2]);
    assert!(
        store
            .log(&ds(ALICE, "never"), 0, 100)
            .await
            .unwrap()
            .is_empty()
    );

    // Another dataset's commits interleave in the store-wide order.
    let other = ds(CAROL, "other");
    commit(&*store, &other, CAROL, vec![Patch::replace("k", "v", 0)]).await;
    let all = store.log_since(0, 100).await.unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[..5], log[..]);
    assert_eq!(all[5].dataset, other);
    assert_eq!(store.log_since(log[1].id, 2).await.unwrap(), all[2..4]);
    assert!(store.log_since(all[5].id, 100).await.unwrap().is_empty());

    // A re-created dataset's log continues above the delete.
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "again", 0)]).await;
    assert_eq!(
        kinds(&store.log(&d, 3, 100).await.unwrap()),
        [(LogKind::Update, 4, ALICE)]
    );
}

/// A merge logs a `merge` entry on each target and a `delete` on each guest dataset it
/// moved. Default limits.
pub async fn case_commit_log_logs_merges(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 40).await;
    let from = ds(&guest, "notes");
    commit(&*store, &from, &guest, vec![Patch::replace("k", "v", 0)]).await;
    let outcome = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    assert_eq!(outcome.moved.len(), 1);
    let to = ds(&user, &outcome.moved[0].to_name);
    assert_eq!(
        kinds(&store.log(&to, 0, 100).await.unwrap()),
        [(LogKind::Merge, outcome.moved[0].sync_count, user.as_str())]
    );
    let merged = &store.log(&to, 0, 100).await.unwrap()[0];
    assert_eq!(
        json(&merged.patches),
        serde_json::json!({"fromOwner": guest, "fromName": "notes", "keys": ["k"]})
    );
    assert_eq!(merged.keys(), Some(vec!["k".to_owned()]));
    // Before the merge the target had nothing; the guest's copy reads back before its delete.
    let at = store
        .read_at(&to, &user, merged.sync_count - 1)
        .await
        .unwrap();
    assert!(at.records.is_empty(), "{at:?}");
    let at = store.read_at(&from, &guest, 1).await.unwrap();
    assert_eq!(values(&at.records), live(&[("k", "v", 1)]));
    assert_eq!(
        kinds(&store.log(&from, 0, 100).await.unwrap()),
        [
            (LogKind::Update, 1, guest.as_str()),
            (LogKind::Delete, 2, guest.as_str())
        ]
    );
}

/// Compaction keeps each dataset's newest entries up to the cap and drops entries past the
/// maximum age, oldest first, and never reuses an id. `log_limits`.
pub async fn case_commit_log_compaction_drops_the_oldest_only(store: Arc<dyn Store>) {
    let (busy, quiet) = (ds(ALICE, "busy"), ds(BOB, "quiet"));
    for n in 0..5 {
        commit(&*store, &busy, ALICE, vec![Patch::replace("k", "v", n)]).await;
    }
    commit(&*store, &quiet, BOB, vec![Patch::replace("k", "v", 0)]).await;
    let oldest_quiet = store.log(&quiet, 0, 10).await.unwrap()[0].clone();
    // The clock moves on before the last entry, so an age cut can fall between them.
    while now_ms() <= oldest_quiet.server_time {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    commit(&*store, &quiet, BOB, vec![Patch::replace("k", "w", 1)]).await;
    let newest_quiet = store.log(&quiet, 1, 10).await.unwrap()[0].clone();
    assert!(newest_quiet.server_time > oldest_quiet.server_time);

    // Far enough back in time that nothing is old: only the count cap applies.
    let deleted = store.compact_log(oldest_quiet.server_time).await.unwrap();
    assert_eq!(deleted.dropped, 2);
    assert_eq!(deleted.forced, 0);
    let counts =
        |entries: Vec<LogEntry>| -> Vec<u64> { entries.iter().map(|e| e.sync_count).collect() };
    assert_eq!(counts(store.log(&busy, 0, 10).await.unwrap()), [3, 4, 5]);
    assert_eq!(counts(store.log(&quiet, 0, 10).await.unwrap()), [1, 2]);

    // The maximum age after the newest quiet entry: older ones go, it stays.
    let deleted = store
        .compact_log(newest_quiet.server_time + 60_000)
        .await
        .unwrap();
    assert!(deleted.dropped >= 1, "{deleted:?}");
    assert_eq!(counts(store.log(&quiet, 0, 10).await.unwrap()), [2]);

    // Everything past its age but the store's newest entry (kept so that no id is handed out
    // twice), and later ids still go up.
    let last_id = newest_quiet.id;
    store.compact_log(now_ms() + 120_000).await.unwrap();
    assert_eq!(store.log_since(0, 100).await.unwrap(), [newest_quiet]);
    commit(&*store, &quiet, BOB, vec![Patch::replace("k", "x", 2)]).await;
    let after = store.log_since(last_id, 100).await.unwrap();
    assert_eq!(after.len(), 1);
    assert!(after[0].id > last_id, "{after:?} after id {last_id}");
}

// ---------------------------------------------------------------------------------------
// History

/// `history` lists every commit of a dataset, grants included, newest first, a page at a
/// time below an entry id, with who, which device and which keys; it needs read access.
/// Default limits.
pub async fn case_history_pages_newest_first(store: Arc<dyn Store>) {
    let d = ds(ALICE, "shared");
    let mut first = request(
        &d,
        ALICE,
        vec![Patch::replace("a", "1", 0), Patch::replace("b", "2", 0)],
    );
    first.device_id = Some("laptop".into());
    store.update(first).await.unwrap();
    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();
    let mut second = request(&d, BOB, vec![Patch::replace("a", "bob", 1)]);
    second.device_id = Some("phone".into());
    store.update(second).await.unwrap();
    store.grant(&d, ALICE, CAROL, Access::Read).await.unwrap();

    let all = store.history(&d, CAROL, None, 100).await.unwrap();
    assert_eq!(
        kinds(&all),
        [
            (LogKind::Grant, 2, ALICE),
            (LogKind::Update, 2, BOB),
            (LogKind::Grant, 1, ALICE),
            (LogKind::Update, 1, ALICE),
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "{all:?}");
    assert_eq!(all[1].device_id.as_deref(), Some("phone"));
    assert_eq!(all[1].keys(), Some(vec!["a".to_owned()]));
    assert_eq!(all[3].device_id.as_deref(), Some("laptop"));
    assert_eq!(all[3].keys(), Some(vec!["a".to_owned(), "b".to_owned()]));
    assert_eq!(all[0].grant(), Some((CAROL.to_owned(), Some(Access::Read))));

    // Pages: below the last id seen.
    let page = store.history(&d, ALICE, None, 3).await.unwrap();
    assert_eq!(page, all[..3]);
    let next = store.history(&d, ALICE, Some(page[2].id), 3).await.unwrap();
    assert_eq!(next, all[3..]);
    assert!(
        store
            .history(&d, ALICE, Some(all[3].id), 3)
            .await
            .unwrap()
            .is_empty()
    );
    // A dataset never written has no history; another identity's needs a grant.
    assert!(
        store
            .history(&ds(ALICE, "never"), ALICE, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_forbidden(store.history(&d, "mallory", None, 10).await);
    store.revoke(&d, ALICE, CAROL).await.unwrap();
    assert_forbidden(store.history(&d, CAROL, None, 10).await);
}

/// `read_at` gives the dataset exactly as it was right after every commit (records with
/// their stamps then), across removes, a delete and a re-creation; above the current sync
/// count is a bad request; it needs read access. Default limits.
pub async fn case_read_at_gives_every_past_state(store: Arc<dyn Store>) {
    let d = ds(ALICE, "timeline");
    store.grant(&d, ALICE, BOB, Access::Write).await.unwrap();
    let mut states = vec![store.snapshot(&d, ALICE).await.unwrap()];
    let mut step = |snapshot: Snapshot| states.push(snapshot);
    step(
        commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)])
            .await
            .1,
    );
    step(
        commit(
            &*store,
            &d,
            BOB,
            vec![Patch::replace("a", "2", 1), Patch::replace("b", "1", 0)],
        )
        .await
        .1,
    );
    step(
        commit(&*store, &d, ALICE, vec![Patch::remove("a", 2)])
            .await
            .1,
    );
    // A removed key written again, from its tombstone.
    step(
        commit(
            &*store,
            &d,
            ALICE,
            vec![Patch::replace("a", "3", 3), Patch::remove("zz", 0)],
        )
        .await
        .1,
    );
    store.delete_dataset(&d, ALICE).await.unwrap();
    step(store.snapshot(&d, ALICE).await.unwrap());
    step(
        commit(&*store, &d, ALICE, vec![Patch::replace("c", "new", 0)])
            .await
            .1,
    );
    store.grant(&d, ALICE, CAROL, Access::Read).await.unwrap();
    step(
        commit(&*store, &d, ALICE, vec![Patch::replace("c", "newer", 6)])
            .await
            .1,
    );

    for (n, expected) in states.iter().enumerate() {
        let at = store.read_at(&d, CAROL, n as u64).await.unwrap();
        assert_eq!(at.sync_count, n as u64);
        assert_eq!(at.records, expected.records, "at sync count {n}");
        assert_eq!(at.deleted, n == 5, "at sync count {n}: {at:?}");
    }
    assert_bad_request(store.read_at(&d, ALICE, 8).await);
    assert_forbidden(store.read_at(&d, "mallory", 1).await);
    // A dataset never written is empty at 0.
    let never = store.read_at(&ds(ALICE, "never"), ALICE, 0).await.unwrap();
    assert!(never.records.is_empty() && never.sync_count == 0);
}

/// Once compaction dropped a commit after a sync count, `read_at` that count is
/// `HistoryUnavailable`; later counts still read back. `log_limits` (3 entries kept).
pub async fn case_read_at_beyond_the_log_is_unavailable(store: Arc<dyn Store>) {
    let d = ds(ALICE, "short");
    let mut states = Vec::new();
    for n in 0..5 {
        let value = format!("v{n}");
        states.push(
            commit(&*store, &d, ALICE, vec![Patch::replace("k", &value, n)])
                .await
                .1,
        );
    }
    store.compact_log(0).await.unwrap();
    // Entries 3, 4 and 5 remain: they undo back to 2.
    for n in 2..=5u64 {
        let at = store.read_at(&d, ALICE, n).await.unwrap();
        assert_eq!(at.records, states[n as usize - 1].records, "at {n}");
    }
    for n in [0, 1] {
        match store.read_at(&d, ALICE, n).await {
            Err(e @ StoreError::HistoryUnavailable { .. }) => {
                assert_eq!(e.code(), tandem_protocol::ErrorCode::HistoryUnavailable);
            }
            other => panic!("read_at {n} should be unavailable, got {other:?}"),
        }
    }
}

/// `read_at` far back undoes many commits (more than a backend reads at once), grants in
/// between. Default limits.
pub async fn case_read_at_reaches_back_over_many_commits(store: Arc<dyn Store>) {
    let d = ds(ALICE, "busy");
    let mut at_ten = None;
    for n in 0..150u64 {
        let key = format!("k{}", n % 7);
        let base = store
            .snapshot(&d, ALICE)
            .await
            .unwrap()
            .records
            .iter()
            .find(|r| r.key == key)
            .map_or(0, |r| r.sync_count);
        let (_, snapshot) = commit(
            &*store,
            &d,
            ALICE,
            vec![Patch::replace(&key, n.to_string(), base)],
        )
        .await;
        if n == 9 {
            at_ten = Some(snapshot);
        }
        if n % 50 == 0 {
            store.grant(&d, ALICE, BOB, Access::Read).await.unwrap();
        }
    }
    let at_ten = at_ten.unwrap();
    let read = store.read_at(&d, BOB, 10).await.unwrap();
    assert_eq!(read.records, at_ten.records);
    assert!(store.read_at(&d, BOB, 0).await.unwrap().records.is_empty());
}

/// A consumer's lease: created at the log head, held by one node until it expires or is
/// released, renewed by its holder; acks move the position forward only, and only from the
/// holder of an unexpired lease. Default limits.
pub async fn case_stream_lease_ack_release_forget(store: Arc<dyn Store>) {
    assert_eq!(store.log_head().await.unwrap(), 0);
    let d = ds(ALICE, "streamed");
    commit(&*store, &d, ALICE, vec![Patch::replace("k", "1", 0)]).await;
    commit(&*store, &d, ALICE, vec![Patch::replace("k", "2", 1)]).await;
    let head = store.log_head().await.unwrap();
    assert_eq!(head, store.log_since(0, 10).await.unwrap()[1].id);

    // Created at the head, leased to n1 until 1100.
    assert_eq!(
        store.stream_lease("c1", "n1", 1000, 100).await.unwrap(),
        Some(head)
    );
    assert_eq!(
        store.stream_lease("c1", "n2", 1050, 100).await.unwrap(),
        None
    );
    // n1 renews (until 1150); n2 gets it only once that has passed.
    assert_eq!(
        store.stream_lease("c1", "n1", 1050, 100).await.unwrap(),
        Some(head)
    );
    assert_eq!(
        store.stream_lease("c1", "n2", 1149, 100).await.unwrap(),
        None
    );
    assert_eq!(
        store.stream_lease("c1", "n2", 1150, 100).await.unwrap(),
        Some(head)
    );
    assert!(!store.stream_ack("c1", "n1", head, 1160).await.unwrap());

    commit(&*store, &d, ALICE, vec![Patch::replace("k", "3", 2)]).await;
    let next = store.log_head().await.unwrap();
    assert!(next > head);
    assert!(store.stream_ack("c1", "n2", next, 1160).await.unwrap());
    // Backwards: acknowledged, not moved.
    assert!(store.stream_ack("c1", "n2", head, 1170).await.unwrap());
    assert_eq!(
        store.stream_consumers().await.unwrap(),
        [StreamConsumer {
            name: "c1".into(),
            position: next,
            lease_holder: Some("n2".into()),
            lease_until: 1250,
        }]
    );
    // An ack does not renew: past the lease it is refused and moves nothing.
    assert!(!store.stream_ack("c1", "n2", next + 5, 1250).await.unwrap());
    assert_eq!(store.stream_consumers().await.unwrap()[0].position, next);

    // Releasing: only the holder can, and then anyone takes it at once.
    assert_eq!(
        store.stream_lease("c1", "n2", 1200, 100).await.unwrap(),
        Some(next)
    );
    store.stream_release("c1", "n1").await.unwrap();
    assert_eq!(
        store.stream_lease("c1", "n1", 1210, 100).await.unwrap(),
        None
    );
    store.stream_release("c1", "n2").await.unwrap();
    assert_eq!(
        store.stream_consumers().await.unwrap()[0].lease_holder,
        None
    );
    assert_eq!(
        store.stream_lease("c1", "n1", 1210, 100).await.unwrap(),
        Some(next)
    );

    // A second consumer starts at the head; consumers are listed by name.
    assert_eq!(
        store.stream_lease("c0", "n2", 1210, 100).await.unwrap(),
        Some(next)
    );
    let names: Vec<String> = store
        .stream_consumers()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["c0", "c1"]);
    assert!(store.stream_forget("c1").await.unwrap());
    assert!(!store.stream_forget("c1").await.unwrap());
    assert_eq!(store.stream_consumers().await.unwrap().len(), 1);
    // Forgotten, it starts over at the head.
    assert_eq!(
        store.stream_lease("c1", "n2", 1210, 100).await.unwrap(),
        Some(next)
    );

    for bad in ["", "a\nb"] {
        assert!(matches!(
            store.stream_lease(bad, "n1", 0, 1).await,
            Err(StoreError::BadRequest(_))
        ));
        assert!(matches!(
            store.stream_ack("c1", bad, 0, 0).await,
            Err(StoreError::BadRequest(_))
        ));
    }
}

/// Of many callers racing for a free or an expired lease, exactly one gets it. Default
/// limits.
pub async fn case_stream_racing_leases_have_one_winner(store: Arc<dyn Store>) {
    for round in 0..5_i64 {
        // Each round starts after the last round's lease (ttl 10) has expired.
        let now = 1000 + round * 100;
        let racers: Vec<_> = (0..8)
            .map(|n| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .stream_lease("raced", &format!("node{n}"), now, 10)
                        .await
                        .unwrap()
                        .map(|_| n)
                })
            })
            .collect();
        let mut winners = Vec::new();
        for racer in racers {
            winners.extend(racer.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let holder = store.stream_consumers().await.unwrap()[0]
            .lease_holder
            .clone();
        assert_eq!(holder, Some(format!("node{}", winners[0])));
    }
}

/// Dead letters are kept per consumer by entry id, a later one replacing an earlier one for
/// the same entry, the oldest going beyond the cap. `stream_limits` (3 per consumer).
pub async fn case_stream_dead_letters_are_capped(store: Arc<dyn Store>) {
    let letter = |entry_id: i64, attempts: u32| DeadLetter {
        entry_id,
        event: format!("{{\"id\":{entry_id}}}"),
        error: "HTTP 500".into(),
        attempts,
        time: 1000 + entry_id,
    };
    let ids =
        |letters: Vec<DeadLetter>| -> Vec<i64> { letters.iter().map(|l| l.entry_id).collect() };
    store
        .stream_dead_letter("c1", &[letter(1, 5), letter(2, 5)])
        .await
        .unwrap();
    store
        .stream_dead_letter("c2", &[letter(1, 1)])
        .await
        .unwrap();
    assert_eq!(
        store.stream_dead_letters("c1", 0, 10).await.unwrap(),
        [letter(1, 5), letter(2, 5)]
    );
    store
        .stream_dead_letter("c1", &[letter(3, 5), letter(4, 5), letter(5, 5)])
        .await
        .unwrap();
    assert_eq!(
        ids(store.stream_dead_letters("c1", 0, 10).await.unwrap()),
        [3, 4, 5]
    );
    store
        .stream_dead_letter("c1", &[letter(4, 9)])
        .await
        .unwrap();
    assert_eq!(
        store.stream_dead_letters("c1", 3, 10).await.unwrap(),
        [letter(4, 9), letter(5, 5)]
    );
    assert_eq!(
        ids(store.stream_dead_letters("c1", 0, 1).await.unwrap()),
        [3]
    );
    store.stream_dead_letter("c1", &[]).await.unwrap();
    assert!(matches!(
        store
            .stream_dead_letter(
                "c1",
                &[DeadLetter {
                    error: "\0".into(),
                    ..letter(6, 1)
                }]
            )
            .await,
        Err(StoreError::BadRequest(_))
    ));
    // Another consumer's letters are its own; forgetting a consumer drops its letters.
    assert_eq!(
        store.stream_dead_letters("c2", 0, 10).await.unwrap(),
        [letter(1, 1)]
    );
    store.stream_lease("c1", "n1", 0, 10).await.unwrap();
    assert!(store.stream_forget("c1").await.unwrap());
    assert!(
        store
            .stream_dead_letters("c1", 0, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.stream_dead_letters("c2", 0, 10).await.unwrap().len(),
        1
    );
}

/// `datasets_after` pages through the live datasets of every pool in (pool, owner, name)
/// order, bytewise, with their sync counts. Default limits.
pub async fn case_datasets_after_walks_live_datasets(store: Arc<dyn Store>) {
    assert!(store.datasets_after(None, 10).await.unwrap().is_empty());
    let other_pool = DatasetKey::new("other", ALICE, "a");
    let live = [
        (ds(ALICE, "B"), 1),
        (ds(ALICE, "a"), 2),
        (ds(BOB, "a"), 1),
        (other_pool, 1),
    ];
    for (d, count) in &live {
        for n in 0..*count {
            commit(&*store, d, &d.owner, vec![Patch::replace("k", "v", n)]).await;
        }
    }
    let gone = ds(ALICE, "gone");
    commit(&*store, &gone, ALICE, vec![Patch::replace("k", "v", 0)]).await;
    store.delete_dataset(&gone, ALICE).await.unwrap();

    let mut expected: Vec<(DatasetKey, u64)> = live.to_vec();
    expected.sort();
    assert_eq!(store.datasets_after(None, 10).await.unwrap(), expected);
    let mut walked = Vec::new();
    let mut after: Option<DatasetKey> = None;
    loop {
        let page = store.datasets_after(after.as_ref(), 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.0.clone());
        walked.extend(page);
    }
    assert_eq!(walked, expected);
}

/// A replay's snapshot entry holds the dataset's live records at its sync count, between the
/// commits before and after it; a missing or deleted dataset gets none. Default limits.
pub async fn case_log_snapshot_logs_the_live_records(store: Arc<dyn Store>) {
    let d = ds(ALICE, "snap");
    assert_eq!(store.log_snapshot(&d).await.unwrap(), None);
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    commit(
        &*store,
        &d,
        ALICE,
        vec![Patch::replace("b", "2", 0), Patch::remove("a", 1)],
    )
    .await;
    let id = store.log_snapshot(&d).await.unwrap().unwrap();
    assert_eq!(store.log_head().await.unwrap(), id);
    commit(&*store, &d, ALICE, vec![Patch::replace("c", "3", 0)]).await;
    let entries = store.log(&d, 0, 10).await.unwrap();
    let kinds: Vec<LogKind> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            LogKind::Update,
            LogKind::Update,
            LogKind::Snapshot,
            LogKind::Update
        ]
    );
    let snap = &entries[2];
    assert_eq!((snap.id, snap.sync_count), (id, 2));
    assert_eq!(snap.actor, ALICE);
    let records: serde_json::Value = serde_json::from_str(&snap.patches).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["key"], "b");
    assert_eq!(records[0]["value"], "2");
    store.delete_dataset(&d, ALICE).await.unwrap();
    assert_eq!(store.log_snapshot(&d).await.unwrap(), None);
}

/// A guest with `a` and `a.<its uuid>` merged into an identity with a live `a`: `a` moves
/// to the copy name, so `a.<uuid>` (taken by it) moves to a copy of its own; every copy is
/// logged. Default limits.
pub async fn case_merge_of_a_name_and_its_copy_name(store: Arc<dyn Store>) {
    let (guest, user) = guest_and_user(&*store, 60).await;
    let uuid = guest.split_once(':').unwrap().1.to_owned();
    let copy = format!("a.{uuid}");
    commit(
        &*store,
        &ds(&user, "a"),
        &user,
        vec![Patch::replace("k", "user", 0)],
    )
    .await;
    commit(
        &*store,
        &ds(&guest, "a"),
        &guest,
        vec![Patch::replace("k", "a", 0)],
    )
    .await;
    commit(
        &*store,
        &ds(&guest, &copy),
        &guest,
        vec![Patch::replace("k", "copy", 0)],
    )
    .await;
    let outcome = store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    let moved: Vec<(String, String)> = outcome
        .moved
        .iter()
        .map(|m| (m.from_name.clone(), m.to_name.clone()))
        .collect();
    assert_eq!(
        moved,
        [
            ("a".to_owned(), copy.clone()),
            (copy.clone(), format!("{copy}.{uuid}"))
        ]
    );
    let value = |name: String| {
        let store = Arc::clone(&store);
        let user = user.clone();
        async move {
            store
                .snapshot(&ds(&user, &name), &user)
                .await
                .unwrap()
                .records[0]
                .value
                .clone()
        }
    };
    assert_eq!(value("a".into()).await.as_deref(), Some("user"));
    assert_eq!(value(copy.clone()).await.as_deref(), Some("a"));
    assert_eq!(
        value(format!("{copy}.{uuid}")).await.as_deref(),
        Some("copy")
    );
    for (_, to) in &moved {
        assert_eq!(
            kinds(&store.log(&ds(&user, to), 0, 10).await.unwrap()),
            [(LogKind::Merge, 1, user.as_str())]
        );
    }
}

/// Compaction leaves what the slowest consumer has not acknowledged, except entries more
/// than the hard cap below the head: those go as retention says, counted as forced drops.
/// A forgotten consumer holds nothing back. `capped_log_limits` (3 per dataset, a minute,
/// a hard cap of 6).
pub async fn case_commit_log_compaction_keeps_what_consumers_need(store: Arc<dyn Store>) {
    let later = || now_ms() + 120_000;
    let d = ds(ALICE, "consumed");
    // Created on an empty log: it has acknowledged nothing (position 0).
    assert_eq!(
        store
            .stream_lease("slow", "n1", 0, i64::MAX / 2)
            .await
            .unwrap(),
        Some(0)
    );
    for n in 0..5 {
        commit(&*store, &d, ALICE, vec![Patch::replace("k", "v", n)]).await;
    }
    let ids: Vec<i64> = store
        .log_since(0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    // Everything is past its age and over the count, and nothing may go.
    let report = store.compact_log(later()).await.unwrap();
    assert_eq!(report, crate::CompactReport::default());
    assert_eq!(store.log_since(0, 100).await.unwrap().len(), 5);

    // Acknowledged entries go (the count cap keeps 3, the age rule takes the rest).
    assert!(store.stream_ack("slow", "n1", ids[1], 1).await.unwrap());
    let report = store.compact_log(later()).await.unwrap();
    assert_eq!((report.dropped, report.forced), (2, 0));
    assert_eq!(store.log_since(0, 100).await.unwrap()[0].id, ids[2]);
    assert_eq!(store.commit_log_forced_drops(), 0);

    // Past the hard cap: 6 more make the head 11 entries above the first, so the entries
    // more than 6 below the head go although "slow" has not acknowledged them.
    for n in 5..11 {
        commit(&*store, &d, ALICE, vec![Patch::replace("k", "v", n)]).await;
    }
    let head = store.log_head().await.unwrap();
    let report = store.compact_log(later()).await.unwrap();
    let left = store.log_since(0, 100).await.unwrap();
    assert_eq!(left.first().map(|e| e.id), Some(head - 5), "{left:?}");
    assert_eq!(report.dropped, report.forced);
    assert_eq!(report.forced, 3, "{report:?}");
    assert_eq!(store.commit_log_forced_drops(), 3);

    // A forgotten consumer holds nothing back: all but the newest entry go.
    assert!(store.stream_forget("slow").await.unwrap());
    let report = store.compact_log(later()).await.unwrap();
    assert_eq!((report.dropped, report.forced), (5, 0));
    assert_eq!(store.log_since(0, 100).await.unwrap().len(), 1);
    assert_eq!(store.commit_log_forced_drops(), 3);
}

/// A backlog larger than one delete statement takes (1,000) is compacted whole, by count
/// and by age. `backlog_limits` (5 per dataset, a minute).
pub async fn case_commit_log_compaction_of_a_backlog_goes_in_chunks(store: Arc<dyn Store>) {
    async fn write(store: Arc<dyn Store>, d: DatasetKey, from: u64, count: u64) {
        for n in from..from + count {
            commit(&*store, &d, &d.owner, vec![Patch::replace("k", "v", n)]).await;
        }
    }
    // One dataset of 1,100 entries and 20 of 50, written side by side.
    let big = ds(ALICE, "big");
    let mut writers = vec![tokio::spawn(write(
        Arc::clone(&store),
        big.clone(),
        0,
        1100,
    ))];
    for i in 0..20 {
        let d = ds(BOB, &format!("d{i}"));
        writers.push(tokio::spawn(write(Arc::clone(&store), d, 0, 50)));
    }
    for w in writers {
        w.await.unwrap();
    }
    // Nothing is old yet: the count cap alone.
    let report = store.compact_log(0).await.unwrap();
    assert_eq!(report.dropped, 1095 + 20 * 45);
    let counts: Vec<u64> = store
        .log(&big, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.sync_count)
        .collect();
    assert_eq!(counts, [1096, 1097, 1098, 1099, 1100]);

    // 1,100 more, then everything is old: all but the store's newest entry go.
    let mut writers = Vec::new();
    for i in 0..20 {
        let d = ds(BOB, &format!("d{i}"));
        writers.push(tokio::spawn(write(Arc::clone(&store), d, 50, 55)));
    }
    for w in writers {
        w.await.unwrap();
    }
    let before = store.log_since(0, 10_000).await.unwrap();
    assert_eq!(before.len(), 5 + 20 * 5 + 1100);
    let report = store.compact_log(now_ms() + 120_000).await.unwrap();
    assert_eq!(report.dropped as usize, before.len() - 1);
    assert_eq!(
        store.log_since(0, 10_000).await.unwrap(),
        before[before.len() - 1..]
    );
}

/// A replay's snapshot entry is no commit: `history` does not list it and `read_at` reads
/// across it. Default limits.
pub async fn case_history_leaves_out_replay_snapshots(store: Arc<dyn Store>) {
    let d = ds(ALICE, "replayed");
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "1", 0)]).await;
    store.log_snapshot(&d).await.unwrap().unwrap();
    commit(&*store, &d, ALICE, vec![Patch::replace("a", "2", 1)]).await;
    let history = store.history(&d, ALICE, None, 10).await.unwrap();
    assert_eq!(
        kinds(&history),
        [(LogKind::Update, 2, ALICE), (LogKind::Update, 1, ALICE)]
    );
    let at = store.read_at(&d, ALICE, 1).await.unwrap();
    assert_eq!(values(&at.records), live(&[("a", "1", 1)]));
}

// ---------------------------------------------------------------------------------------
// Export and import

async fn dump_items(store: &dyn Store) -> Vec<DumpItem> {
    let mut stream = store.dump().await.unwrap();
    let mut items = Vec::new();
    while let Some(item) = stream.recv().await {
        items.push(item.unwrap());
    }
    items
}

/// Feeds `items` to an importer in batches of `batch`; the checkpoint is the item count.
async fn import_items(
    store: &dyn Store,
    items: &[DumpItem],
    merge: MergePolicy,
    batch: usize,
) -> Result<ImportProgress, ImportError> {
    let (mut importer, start) = Importer::start(store, "test-source", merge, batch).await?;
    assert_eq!(start, Start::Fresh);
    let checkpoint = |n: usize| ImportCheckpoint {
        source: "test-source".into(),
        position: n as u64,
        marker: format!("m{n}"),
    };
    for (n, item) in items.iter().enumerate() {
        if importer.push(item.clone(), n as u64 + 1) {
            importer.commit(checkpoint(n + 1), false).await?;
        }
    }
    importer.commit(checkpoint(items.len()), true).await?;
    Ok(importer.progress().clone())
}

/// A store with a bit of everything: guests and users with logins, a merge (a moved
/// dataset and a renamed copy with its merge root), tombstones, a deleted dataset and a
/// deleted-then-re-created one, devices, grants on existing and not yet existing datasets,
/// pool settings in two pools (one rewritten, one cleared).
async fn populate(store: &dyn Store) {
    for (pool, name, value) in [
        (
            DEFAULT_POOL,
            "cognito.events.SyncTrigger",
            Some("https://hooks.example.com/a"),
        ),
        (
            DEFAULT_POOL,
            "cognito.events.SyncTrigger",
            Some("https://hooks.example.com/b"),
        ),
        (DEFAULT_POOL, "cleared", Some("x")),
        (DEFAULT_POOL, "cleared", None),
        ("other", "a.setting", Some("é")),
    ] {
        assert!(
            store
                .put_pool_setting(pool, name, value, crate::Expect::Any)
                .await
                .unwrap()
        );
    }
    let (guest, user) = guest_and_user(store, 40).await;
    store
        .link_logins(
            DEFAULT_POOL,
            &user,
            &[login("google", "u1"), login("apple", "u1")],
        )
        .await
        .unwrap();
    commit(
        store,
        &ds(&guest, "notes"),
        &guest,
        vec![Patch::replace("g", "1", 0)],
    )
    .await;
    commit(
        store,
        &ds(&guest, "mine"),
        &guest,
        vec![Patch::replace("m", "2", 0)],
    )
    .await;
    commit(
        store,
        &ds(&user, "notes"),
        &user,
        vec![Patch::replace("u", "3", 0)],
    )
    .await;
    store
        .merge_identity(DEFAULT_POOL, &guest, &user)
        .await
        .unwrap();
    let mut req = request(
        &ds(ALICE, "d1"),
        ALICE,
        vec![
            Patch::replace("a", "1", 0),
            Patch::replace("b", "2", 0),
            Patch::replace("é", "3", 0),
        ],
    );
    req.device_id = Some("phone".into());
    store.update(req).await.unwrap();
    commit(store, &ds(ALICE, "d1"), ALICE, vec![Patch::remove("b", 1)]).await;
    commit(
        store,
        &ds(ALICE, "gone"),
        ALICE,
        vec![Patch::replace("x", "1", 0)],
    )
    .await;
    store
        .delete_dataset(&ds(ALICE, "gone"), ALICE)
        .await
        .unwrap();
    commit(
        store,
        &ds(ALICE, "again"),
        ALICE,
        vec![Patch::replace("x", "1", 0)],
    )
    .await;
    store
        .delete_dataset(&ds(ALICE, "again"), ALICE)
        .await
        .unwrap();
    commit(
        store,
        &ds(ALICE, "again"),
        ALICE,
        vec![Patch::replace("y", "2", 0)],
    )
    .await;
    store
        .grant(&ds(ALICE, "d1"), ALICE, BOB, Access::Read)
        .await
        .unwrap();
    store
        .grant(&ds(ALICE, "d1"), ALICE, CAROL, Access::Write)
        .await
        .unwrap();
    store
        .grant(&ds(ALICE, "later"), ALICE, BOB, Access::Write)
        .await
        .unwrap();
    commit(store, &ds(BOB, "b"), BOB, vec![Patch::replace("k", "v", 0)]).await;
    commit(
        store,
        &ds(BOB, "b"),
        BOB,
        vec![Patch::remove("k", 1), Patch::replace("k2", "v2", 0)],
    )
    .await;
}

/// Everything a client can read of the datasets in `items`, for comparing two stores.
async fn observe(store: &dyn Store, items: &[DumpItem]) -> Vec<String> {
    let mut seen = Vec::new();
    for item in items {
        match item {
            DumpItem::Identity(i) => {
                seen.push(format!(
                    "{:?}",
                    store.identity(&i.pool, &i.id).await.unwrap()
                ));
            }
            DumpItem::Dataset(d) => {
                let key = d.key();
                seen.push(format!(
                    "{:?}",
                    store.changes(&key, &d.owner, 0).await.unwrap()
                ));
                seen.push(format!(
                    "{:?}",
                    store.snapshot(&key, &d.owner).await.unwrap()
                ));
                seen.push(format!(
                    "{:?}",
                    store.merged_dataset_names(&key).await.unwrap()
                ));
                seen.push(format!(
                    "{:?}",
                    store.last_deleted_sync_count(&key).await.unwrap()
                ));
                let mut list = store.list_datasets(&d.pool, &d.owner).await.unwrap();
                list.sort_by_key(|info| format!("{info:?}"));
                seen.push(format!("{list:?}"));
            }
            DumpItem::Grant(g) => {
                let key = DatasetKey::new(&g.pool, &g.owner, &g.name);
                seen.push(format!(
                    "{:?}",
                    store.access(&key, &g.grantee).await.unwrap()
                ));
            }
            DumpItem::Setting(s) => {
                seen.push(format!(
                    "{:?}",
                    store.pool_setting(&s.pool, &s.name).await.unwrap()
                ));
            }
            _ => {}
        }
    }
    seen
}

/// An export imported into an empty store dumps identically, reads identically (records
/// with their stamps, tombstones, deleted datasets, merges, logins, grants, pool settings),
/// and goes on
/// from the same sync counts: a client's next update does not conflict. A second import
/// of the same source finds it complete. Default limits.
pub async fn case_dump_import_round_trip_is_exact(source: Arc<dyn Store>, target: Arc<dyn Store>) {
    populate(&*source).await;
    let items = dump_items(&*source).await;
    let kinds = |f: fn(&DumpItem) -> bool| items.iter().filter(|i| f(i)).count();
    assert_eq!(
        kinds(|i| matches!(i, DumpItem::Identity(_))),
        2,
        "{items:#?}"
    );
    assert_eq!(kinds(|i| matches!(i, DumpItem::Login(_))), 2);
    assert_eq!(kinds(|i| matches!(i, DumpItem::Grant(_))), 3);
    let settings: Vec<(&str, &str, &str)> = items
        .iter()
        .filter_map(|i| match i {
            DumpItem::Setting(s) => Some((s.pool.as_str(), s.name.as_str(), s.value.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        settings,
        [
            (
                DEFAULT_POOL,
                "cognito.events.SyncTrigger",
                "https://hooks.example.com/b"
            ),
            ("other", "a.setting", "é")
        ],
        "the settings a pool holds, last, by (pool, name)"
    );
    assert!(
        matches!(items.last(), Some(DumpItem::Setting(s)) if s.updated_at > 0),
        "settings are the last section"
    );
    assert!(
        items
            .iter()
            .any(|i| matches!(i, DumpItem::Dataset(d) if d.deleted))
    );
    assert!(
        items
            .iter()
            .any(|i| matches!(i, DumpItem::Dataset(d) if d.merge_root.is_some()))
    );
    assert!(
        items
            .iter()
            .any(|i| matches!(i, DumpItem::Record { record, .. } if record.value.is_none()))
    );
    assert!(
        items
            .iter()
            .any(|i| matches!(i, DumpItem::Record { record, .. } if record.device_id.is_some()))
    );
    assert_eq!(dump_items(&*source).await, items, "a dump is deterministic");

    let progress = import_items(&*target, &items, MergePolicy::Refuse, 3)
        .await
        .unwrap();
    assert!(progress.done);
    assert_eq!(progress.imported.total(), items.len() as u64);
    assert_eq!(dump_items(&*target).await, items);
    assert_eq!(
        observe(&*target, &items).await,
        observe(&*source, &items).await
    );

    // The next commit on either store is the same: sync counts and record stamps match.
    let next = vec![Patch::replace("a", "new", 1), Patch::replace("c", "3", 0)];
    let (_, a) = commit(&*source, &ds(ALICE, "d1"), ALICE, next.clone()).await;
    let (_, b) = commit(&*target, &ds(ALICE, "d1"), ALICE, next).await;
    assert_eq!(
        (a.sync_count, values(&a.records)),
        (b.sync_count, values(&b.records))
    );
    let (_, b) = commit(
        &*target,
        &ds(ALICE, "again"),
        ALICE,
        vec![Patch::replace("z", "1", 0)],
    )
    .await;
    assert_eq!(
        b.sync_count, 4,
        "a re-created dataset goes on above its delete"
    );

    let status = target.import_status().await.unwrap();
    assert!(!status.empty);
    let (_, start) = Importer::start(&*target, "test-source", MergePolicy::Refuse, 3)
        .await
        .unwrap();
    assert!(matches!(start, Start::Complete(p) if p.done));
}

/// A target with data of its own (a pool setting alone is enough) is refused; with
/// `SkipExisting` what it holds stays (a dataset of the same name keeps its records, a
/// setting its value) and the rest comes in. Default limits.
pub async fn case_import_refuses_a_non_empty_target_unless_merging(
    source: Arc<dyn Store>,
    target: Arc<dyn Store>,
) {
    populate(&*source).await;
    let items = dump_items(&*source).await;
    // A setting alone makes a store non-empty: it is an operator's configuration.
    let own_trigger = Some("https://hooks.example.com/target");
    target
        .put_pool_setting(
            DEFAULT_POOL,
            "cognito.events.SyncTrigger",
            own_trigger,
            crate::Expect::Any,
        )
        .await
        .unwrap();
    assert!(!target.import_status().await.unwrap().empty);
    assert!(matches!(
        Importer::start(&*target, "test-source", MergePolicy::Refuse, 10).await,
        Err(ImportError::NotEmpty)
    ));
    commit(
        &*target,
        &ds(ALICE, "d1"),
        ALICE,
        vec![Patch::replace("own", "1", 0)],
    )
    .await;
    let progress = import_items(&*target, &items, MergePolicy::SkipExisting, 4)
        .await
        .unwrap();
    assert_eq!(progress.skipped.settings, 1);
    assert_eq!(progress.imported.settings, 1);
    assert_eq!(
        target
            .pool_setting(DEFAULT_POOL, "cognito.events.SyncTrigger")
            .await
            .unwrap()
            .as_deref(),
        own_trigger,
        "the target's setting stays"
    );
    assert_eq!(
        target
            .pool_setting("other", "a.setting")
            .await
            .unwrap()
            .as_deref(),
        Some("é"),
        "a setting the target lacks comes in"
    );
    assert_eq!(progress.skipped.datasets, 1);
    assert_eq!(
        progress.skipped.records, 3,
        "d1's records: a, b's tombstone, é"
    );
    let own = target.snapshot(&ds(ALICE, "d1"), ALICE).await.unwrap();
    assert_eq!(keys(&own.records), vec!["own"]);
    assert_eq!(own.sync_count, 1);
    let b = target.snapshot(&ds(BOB, "b"), BOB).await.unwrap();
    assert_eq!(b.sync_count, 2);
    assert_eq!(
        target.access(&ds(ALICE, "d1"), BOB).await.unwrap(),
        Some(Access::Read),
        "grants come in beside a kept dataset"
    );
}

/// A batch with a bad item writes nothing (not even its good items) and names the item; a
/// batch whose `after` is not the held progress writes nothing; an interrupted import
/// resumes from its last batch; pool settings go in with their batch. Default limits.
pub async fn case_import_batch_is_all_or_nothing_and_resumes(store: Arc<dyn Store>) {
    let dataset = DumpDataset {
        pool: DEFAULT_POOL.into(),
        owner: ALICE.into(),
        name: "d".into(),
        sync_count: 3,
        deleted: false,
        last_deleted_sync_count: 0,
        merge_root: None,
        created_at: 1,
        last_modified: 2,
    };
    let rec = |key: &str, value: Option<&str>| DumpItem::Record {
        dataset: dataset.key(),
        record: DumpRecord {
            key: key.into(),
            value: value.map(Into::into),
            sync_count: 2,
            last_modified: 5,
            last_modified_by: ALICE.into(),
            device_id: Some("dev".into()),
            device_last_modified: Some(4),
        },
    };
    let checkpoint = |n: u64| ImportCheckpoint {
        source: "s".into(),
        position: n,
        marker: String::new(),
    };
    let batch = |after: Option<u64>, to: u64, items: Vec<DumpItem>| ImportBatch {
        after: after.map(checkpoint),
        checkpoint: checkpoint(to),
        merge: MergePolicy::Refuse,
        items,
        done: false,
    };
    // A record of a dataset that is not there, after a good dataset: nothing written.
    let orphan = DumpItem::Record {
        dataset: ds(ALICE, "nope"),
        record: DumpRecord {
            key: "k".into(),
            value: None,
            sync_count: 1,
            last_modified: 1,
            last_modified_by: ALICE.into(),
            device_id: None,
            device_last_modified: None,
        },
    };
    let outcome = store
        .import_batch(batch(
            None,
            2,
            vec![DumpItem::Dataset(dataset.clone()), orphan],
        ))
        .await
        .unwrap();
    assert!(
        matches!(outcome, BatchOutcome::Rejected { index: 1, .. }),
        "{outcome:?}"
    );
    // The same key twice in one batch.
    let outcome = store
        .import_batch(batch(
            None,
            3,
            vec![
                DumpItem::Dataset(dataset.clone()),
                rec("k", Some("v")),
                rec("k", None),
            ],
        ))
        .await
        .unwrap();
    assert!(
        matches!(&outcome, BatchOutcome::Rejected { index: 2, reason } if reason.contains("already exists")),
        "{outcome:?}"
    );
    let status = store.import_status().await.unwrap();
    assert!(status.empty && status.progress.is_none(), "{status:?}");

    // Two good batches; the second must name the first's checkpoint.
    let first = batch(
        None,
        2,
        vec![DumpItem::Dataset(dataset.clone()), rec("a", Some("1"))],
    );
    assert!(matches!(
        store.import_batch(first.clone()).await.unwrap(),
        BatchOutcome::Committed(_)
    ));
    let replayed = store.import_batch(first).await.unwrap();
    assert!(
        matches!(replayed, BatchOutcome::OutOfStep { held: Some(ref c) } if c.position == 2),
        "{replayed:?}"
    );
    let (_, start) = Importer::start(&*store, "s", MergePolicy::Refuse, 10)
        .await
        .unwrap();
    assert!(
        matches!(&start, Start::Resume(p) if p.checkpoint.position == 2 && p.imported.records == 1),
        "{start:?}"
    );
    assert!(matches!(
        Importer::start(&*store, "other", MergePolicy::Refuse, 10).await,
        Err(ImportError::OtherImport(_))
    ));
    let second = batch(Some(2), 4, vec![rec("b", None), rec("c", Some("3"))]);
    assert!(matches!(
        store.import_batch(second).await.unwrap(),
        BatchOutcome::Committed(_)
    ));
    let s = store.changes(&ds(ALICE, "d"), ALICE, 0).await.unwrap();
    assert_eq!(s.sync_count, 3);
    assert_eq!(keys(&s.records), vec!["a", "b", "c"]);
    assert_eq!(record(&s, "a").device_id.as_deref(), Some("dev"));
    assert_eq!(record(&s, "b").value, None);
    // The aggregates count the live records only: the record limit sees 2 of them.
    let limited = store.snapshot(&ds(ALICE, "d"), ALICE).await.unwrap();
    assert_eq!(keys(&limited.records), vec!["a", "c"]);
    let (_, after) = commit(
        &*store,
        &ds(ALICE, "d"),
        ALICE,
        vec![Patch::replace("a", "2", 2)],
    )
    .await;
    assert_eq!(after.sync_count, 4);

    // Settings go in with the batch: one that exists fails it (nothing of it written), the
    // good batch writes them exactly as the dump has them.
    let setting = |name: &str, value: &str| {
        DumpItem::Setting(DumpSetting {
            pool: DEFAULT_POOL.into(),
            name: name.into(),
            value: value.into(),
            updated_at: 9,
        })
    };
    let twice = batch(
        Some(4),
        6,
        vec![setting("s1", "a"), setting("s2", "b"), setting("s1", "c")],
    );
    let outcome = store.import_batch(twice).await.unwrap();
    assert!(
        matches!(&outcome, BatchOutcome::Rejected { index: 2, reason } if reason.contains("pool setting \"s1\"") && reason.contains("already exists")),
        "{outcome:?}"
    );
    assert_eq!(store.pool_setting(DEFAULT_POOL, "s1").await.unwrap(), None);
    assert_eq!(store.pool_setting(DEFAULT_POOL, "s2").await.unwrap(), None);
    let bad = batch(Some(4), 5, vec![setting("s1", "a"), setting("", "b")]);
    let outcome = store.import_batch(bad).await.unwrap();
    assert!(
        matches!(&outcome, BatchOutcome::Rejected { index: 1, reason } if reason.contains("setting name")),
        "{outcome:?}"
    );
    assert_eq!(store.pool_setting(DEFAULT_POOL, "s1").await.unwrap(), None);
    let good = batch(Some(4), 6, vec![setting("s1", "a"), setting("s2", "b")]);
    let outcome = store.import_batch(good).await.unwrap();
    assert!(
        matches!(&outcome, BatchOutcome::Committed(p) if p.imported.settings == 2),
        "{outcome:?}"
    );
    assert_eq!(
        store
            .pool_setting(DEFAULT_POOL, "s1")
            .await
            .unwrap()
            .as_deref(),
        Some("a")
    );
    let dumped: Vec<DumpItem> = dump_items(&*store)
        .await
        .into_iter()
        .filter(|i| matches!(i, DumpItem::Setting(_)))
        .collect();
    assert_eq!(
        dumped,
        [setting("s1", "a"), setting("s2", "b")],
        "updatedAt kept"
    );
}
