use super::writer::{Command, Done, Op, commit_batch};
use super::*;
use crate::conformance;
use crate::outage::CommitOutage;
use crate::{DEFAULT_POOL, now_ms};
use std::sync::atomic::AtomicUsize;
use tandem_protocol::{LimitCode, Patch};

fn ds(owner: &str, name: &str) -> DatasetKey {
    DatasetKey::new(DEFAULT_POOL, owner, name)
}

fn update(dataset: &DatasetKey, actor: &str, patches: Vec<Patch>) -> UpdateRequest {
    UpdateRequest {
        dataset: dataset.clone(),
        actor: actor.to_owned(),
        device_id: None,
        patches,
    }
}

async fn commit(store: &SqliteStore, request: UpdateRequest) -> Snapshot {
    match store.update(request).await.unwrap() {
        UpdateOutcome::Committed { snapshot, .. } => snapshot,
        other => panic!("should commit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_sqlite_store_conformance() {
    let root = tempfile::tempdir().unwrap();
    let next = AtomicUsize::new(0);
    conformance::run_all(|limits| {
        let dir = root
            .path()
            .join(format!("case-{}", next.fetch_add(1, Ordering::Relaxed)));
        async move { SqliteStore::open(&dir, limits).unwrap() }
    })
    .await;
}

#[test]
fn test_sqlite_store_open_creates_dir_with_wal_and_schema() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("a").join("b");
    let store = SqliteStore::open(&dir, Limits::default()).unwrap();
    assert_eq!(store.path(), dir.join("tandem.db"));
    assert!(dir.join("tandem.db").is_file());
    drop(store);

    let conn = Connection::open(dir.join("tandem.db")).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, schema::SCHEMA_VERSION);
}

#[test]
fn test_sqlite_writer_connection_is_wal_with_full_sync() {
    let root = tempfile::tempdir().unwrap();
    let conn = Connection::open(root.path().join("t.db")).unwrap();
    configure_writer(&conn, 1 << 20).unwrap();
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sqlite_store_reopen_keeps_data_and_sync_counts() {
    let root = tempfile::tempdir().unwrap();
    let kept = ds("alice", "kept");
    let gone = ds("alice", "gone");
    {
        let store = SqliteStore::open(root.path(), Limits::default()).unwrap();
        commit(
            &store,
            update(&kept, "alice", vec![Patch::replace("a", "1", 0)]),
        )
        .await;
        commit(&store, update(&kept, "alice", vec![Patch::remove("a", 1)])).await;
        commit(
            &store,
            update(&kept, "alice", vec![Patch::replace("b", "2", 0)]),
        )
        .await;
        commit(
            &store,
            update(&gone, "alice", vec![Patch::replace("x", "1", 0)]),
        )
        .await;
        assert_eq!(store.delete_dataset(&gone, "alice").await.unwrap(), 2);
        store
            .grant(&kept, "alice", "bob", Access::Read)
            .await
            .unwrap();
        // Dropped without close: the writer finishes and the file is closed.
    }
    let store = SqliteStore::open(root.path(), Limits::default()).unwrap();
    let s = store.snapshot(&kept, "bob").await.unwrap();
    assert_eq!(s.sync_count, 3);
    assert_eq!(s.records.len(), 1);
    assert_eq!(s.records[0].key, "b");
    let c = store.changes(&kept, "alice", 0).await.unwrap();
    assert_eq!(c.records.len(), 2, "the tombstone survives: {c:?}");
    assert_eq!(store.snapshot(&gone, "alice").await.unwrap().sync_count, 2);
    let s = commit(
        &store,
        update(&gone, "alice", vec![Patch::replace("x", "1", 0)]),
    )
    .await;
    assert_eq!(
        s.sync_count, 3,
        "a re-created dataset continues after reopen"
    );
    let list = store.list_datasets(DEFAULT_POOL, "alice").await.unwrap();
    assert_eq!(list.len(), 2);
    assert_eq!(list[1].records, 1);
    assert_eq!(list[1].bytes, 2);
    store.close().await;

    let store = SqliteStore::open(root.path(), Limits::default()).unwrap();
    assert_eq!(store.snapshot(&gone, "alice").await.unwrap().sync_count, 3);
}

/// Applies `ops` as one batch on the writer's code path and returns each reply.
fn run_batch(
    conn: &mut Connection,
    limits: &Limits,
    ops: Vec<Op>,
) -> Vec<Result<Done, StoreError>> {
    let mut batch = Vec::new();
    let mut replies = Vec::new();
    for op in ops {
        let (reply, reply_rx) = oneshot::channel();
        batch.push(Command { op, reply });
        replies.push(reply_rx);
    }
    commit_batch(conn, limits, &mut batch, &CommitOutage::default());
    assert!(batch.is_empty());
    replies
        .into_iter()
        .map(|mut rx| rx.try_recv().expect("every command is answered"))
        .collect()
}

fn op_update(dataset: &DatasetKey, actor: &str, patches: Vec<Patch>) -> Op {
    let request = update(dataset, actor, patches);
    let patches = validate_update(&Limits::default(), &request).unwrap();
    Op::Update { request, patches }
}

#[test]
fn test_sqlite_group_commit_answers_each_command_with_its_own_result() {
    let root = tempfile::tempdir().unwrap();
    let path = root.path().join("tandem.db");
    let mut conn = Connection::open(&path).unwrap();
    configure_writer(&conn, 1 << 20).unwrap();
    schema::migrate(&mut conn).unwrap();
    let limits = Limits {
        max_records: 2,
        ..Limits::default()
    };
    let (one, two, three) = (ds("u1", "one"), ds("u2", "two"), ds("u3", "three"));
    let replies = run_batch(
        &mut conn,
        &limits,
        vec![
            op_update(&one, "u1", vec![Patch::replace("a", "1", 0)]),
            // Stale: conflicts, the others are unaffected.
            op_update(&two, "u2", vec![Patch::replace("a", "1", 5)]),
            // Over the record limit: fails, the others are unaffected.
            op_update(
                &three,
                "u3",
                vec![
                    Patch::replace("a", "1", 0),
                    Patch::replace("b", "1", 0),
                    Patch::replace("c", "1", 0),
                ],
            ),
            // Not the owner.
            op_update(&one, "u2", vec![Patch::replace("z", "1", 0)]),
            // Sees the first command's write in the same batch.
            op_update(&one, "u1", vec![Patch::replace("a", "2", 1)]),
            op_update(&two, "u2", vec![Patch::replace("a", "1", 0)]),
            Op::Grant {
                dataset: one.clone(),
                grantee: "u2".into(),
                access: Access::Read,
            },
            Op::Delete {
                dataset: three.clone(),
                actor: "u3".into(),
            },
        ],
    );
    assert_eq!(replies.len(), 8);
    let sync_count = |r: &Result<Done, StoreError>| match r {
        Ok(Done::Update(UpdateOutcome::Committed { snapshot, .. })) => snapshot.sync_count,
        other => panic!("should commit, got {other:?}"),
    };
    assert_eq!(sync_count(&replies[0]), 1);
    assert!(
        matches!(
            &replies[1],
            Ok(Done::Update(UpdateOutcome::Conflict { sync_count: 0, .. }))
        ),
        "{:?}",
        replies[1]
    );
    assert!(
        matches!(
            &replies[2],
            Err(StoreError::Limit {
                limit: LimitCode::MaxRecords,
                ..
            })
        ),
        "{:?}",
        replies[2]
    );
    assert!(
        matches!(&replies[3], Err(StoreError::Forbidden { .. })),
        "{:?}",
        replies[3]
    );
    assert_eq!(sync_count(&replies[4]), 2);
    assert_eq!(sync_count(&replies[5]), 1);
    assert!(matches!(&replies[6], Ok(Done::Unit)), "{:?}", replies[6]);
    assert!(
        matches!(&replies[7], Err(StoreError::NotFound(_))),
        "{:?}",
        replies[7]
    );

    // What was committed is exactly what the successful commands did.
    let tx = conn.transaction().unwrap();
    let s = query::snapshot(&tx, &one, "u2").unwrap();
    assert_eq!((s.sync_count, s.records.len()), (2, 1));
    assert_eq!(s.records[0].value.as_deref(), Some("2"));
    assert_eq!(query::snapshot(&tx, &two, "u2").unwrap().sync_count, 1);
    assert!(query::load_dataset(&tx, &three).unwrap().is_none());
    // The log holds the committed commands only, in the batch's order, with consecutive
    // sync counts per dataset; the failed ones rolled their entries back.
    let logged: Vec<(String, crate::LogKind, u64)> = query::log_since(&tx, 0, 100)
        .unwrap()
        .into_iter()
        .map(|e| (e.dataset.name, e.kind, e.sync_count))
        .collect();
    use crate::LogKind::{Grant, Update};
    assert_eq!(
        logged,
        [
            ("one".to_owned(), Update, 1),
            ("one".to_owned(), Update, 2),
            ("two".to_owned(), Update, 1),
            ("one".to_owned(), Grant, 2),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_sqlite_store_concurrent_updates_to_many_datasets_get_their_own_results() {
    let root = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(root.path(), Limits::default()).unwrap();
    let t0 = now_ms();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let d = ds(&format!("user-{i}"), "data");
            // Every third update is stale on purpose.
            let seen = if i % 3 == 0 { 1 } else { 0 };
            let outcome = store
                .update(update(
                    &d,
                    &format!("user-{i}"),
                    vec![Patch::replace("k", i.to_string(), seen)],
                ))
                .await
                .unwrap();
            (i, outcome)
        }));
    }
    for task in tasks {
        let (i, outcome) = task.await.unwrap();
        let d = ds(&format!("user-{i}"), "data");
        let owner = format!("user-{i}");
        if i % 3 == 0 {
            assert!(
                matches!(outcome, UpdateOutcome::Conflict { sync_count: 0, .. }),
                "{i}: {outcome:?}"
            );
            assert_eq!(store.snapshot(&d, &owner).await.unwrap().sync_count, 0);
        } else {
            let UpdateOutcome::Committed { snapshot, .. } = outcome else {
                panic!("{i}: should commit, got {outcome:?}");
            };
            assert_eq!(snapshot.dataset, d);
            assert_eq!(snapshot.records[0].value, Some(i.to_string()));
            assert!(snapshot.records[0].last_modified >= t0);
            assert_eq!(store.snapshot(&d, &owner).await.unwrap(), snapshot);
        }
    }
    store.close().await;
}

/// Under a write flood the checkpointer's PASSIVE checkpoints never let the WAL restart, so
/// without a bound it grew with the traffic (27 MB here, beside a 64 KB database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sqlite_wal_stays_bounded_under_a_write_flood() {
    const WAL_MAX: u64 = 1 << 20;
    const WRITERS: u64 = 32;
    const UPDATES: u64 = 20_000;
    let root = tempfile::tempdir().unwrap();
    let limits = Limits {
        sqlite_wal_max_bytes: WAL_MAX,
        ..Limits::default()
    };
    let store = SqliteStore::open(root.path(), limits).unwrap();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let d = ds("alice", &format!("flood-{}", w % 4));
            let key = format!("writer-{w}");
            let mut sync_count = 0;
            for _ in 0..UPDATES / WRITERS {
                let patch = Patch::replace(key.clone(), "x".repeat(100), sync_count);
                sync_count = commit(&store, update(&d, "alice", vec![patch]))
                    .await
                    .sync_count;
            }
        }));
    }
    // Readers keep taking snapshots, as subscribers do, so the checkpoint has readers to
    // wait for.
    let reading = Arc::new(AtomicBool::new(true));
    let mut readers = Vec::new();
    for r in 0..2 {
        let (store, reading) = (store.clone(), Arc::clone(&reading));
        readers.push(tokio::spawn(async move {
            while reading.load(Ordering::Relaxed) {
                store
                    .snapshot(&ds("alice", &format!("flood-{r}")), "alice")
                    .await
                    .unwrap();
                tokio::task::yield_now().await;
            }
        }));
    }
    let wal = root.path().join("tandem.db-wal");
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let mut peak = 0;
    while writers.iter().any(|w| !w.is_finished()) {
        peak = peak.max(wal_size());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for writer in writers {
        writer.await.unwrap();
    }
    reading.store(false, Ordering::Relaxed);
    for reader in readers {
        reader.await.unwrap();
    }
    let end = wal_size();
    let db = std::fs::metadata(root.path().join("tandem.db"))
        .unwrap()
        .len();
    // The bound: WAL_MAX plus one group commit (at most 32 one-record updates here, a few
    // pages each); twice WAL_MAX is far above that.
    assert!(
        peak.max(end) <= 2 * WAL_MAX,
        "wal peaked at {peak} bytes, {end} at the end, database {db} bytes"
    );
    let s = store
        .snapshot(&ds("alice", "flood-0"), "alice")
        .await
        .unwrap();
    assert_eq!(s.sync_count, UPDATES / 4, "every update committed");
    store.close().await;
}
