//! Tests against a real PostgreSQL: `TANDEM_TEST_POSTGRES_URL`, by default the local
//! server's `test` database. Each store gets a fresh schema, dropped when the test ends, so
//! tests (and concurrent test processes) never see each other's data.

use super::*;
use crate::conformance;
use crate::{DEFAULT_POOL, LogKind, Login, Snapshot};
use deadpool_postgres::tokio_postgres::Client;
use deadpool_postgres::tokio_postgres::types::ToSql;
use std::collections::HashSet;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use tandem_protocol::{LimitCode, Patch};

const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn test_url() -> String {
    std::env::var("TANDEM_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_TEST_URL.into())
}

/// Fresh schema names for one test; the schemas are dropped (best effort) when this is
/// dropped, also when the test panics. Declare it first so it is dropped last.
struct TestSchemas {
    names: Mutex<Vec<String>>,
}

impl TestSchemas {
    fn new() -> Self {
        TestSchemas {
            names: Mutex::new(Vec::new()),
        }
    }

    /// A schema name no other test or test process uses.
    fn fresh(&self) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let random = RandomState::new().build_hasher().finish() & 0xffff_ffff;
        let name = format!(
            "tandem_test_{}_{}_{random:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.names.lock().unwrap().push(name.clone());
        name
    }

    /// A second store on the schema of `store` (another node, or other limits).
    fn config_for(&self, store: &PostgresStore) -> PostgresConfig {
        PostgresConfig {
            schema: store.schema().to_owned(),
            pool_size: 8,
            ..PostgresConfig::new(test_url())
        }
    }

    /// A small-pool config on a fresh schema.
    fn config(&self) -> PostgresConfig {
        PostgresConfig {
            schema: self.fresh(),
            pool_size: 8,
            ..PostgresConfig::new(test_url())
        }
    }
}

impl Drop for TestSchemas {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.names.lock().unwrap_or_else(|e| e.into_inner()));
        if names.is_empty() {
            return;
        }
        // Drop runs inside the test's runtime: use a thread with its own.
        let url = test_url();
        let cleanup = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let Ok((client, connection)) = tokio_postgres::connect(&url, NoTls).await else {
                    return;
                };
                tokio::spawn(connection);
                for name in names {
                    let sql = format!("DROP SCHEMA IF EXISTS {name} CASCADE");
                    if let Err(e) = client.batch_execute(&sql).await {
                        eprintln!("could not drop test schema {name}: {e}");
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

/// A plain connection for the test itself, outside any store.
async fn admin() -> Client {
    let (client, connection) = tokio_postgres::connect(&test_url(), NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

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

/// The ids of every log entry of `d`, in id order (from the store-wide tail).
async fn log_ids(store: &PostgresStore, d: &DatasetKey) -> Vec<i64> {
    let entries = store.log_since(0, 10_000).await.unwrap();
    entries
        .into_iter()
        .filter(|e| &e.dataset == d)
        .map(|e| e.id)
        .collect()
}

async fn commit(store: &PostgresStore, request: UpdateRequest) -> Snapshot {
    match store.update(request).await.unwrap() {
        UpdateOutcome::Committed { snapshot, .. } => snapshot,
        other => panic!("should commit, got {other:?}"),
    }
}

/// The `counter` record's value and sync count (0, 0 when absent).
fn counter(s: &Snapshot) -> (u64, u64) {
    s.records
        .iter()
        .find(|r| r.key == "counter")
        .map_or((0, 0), |r| {
            (
                r.value.as_deref().unwrap_or("0").parse().unwrap(),
                r.sync_count,
            )
        })
}

/// Reads the dataset, then writes `counter = n + 1` and a new key `k{n+1}` in one update.
/// `Ok(Some(sync count))` when it commits, `Ok(None)` on a conflict.
async fn increment(store: &PostgresStore, d: &DatasetKey) -> Result<Option<u64>, StoreError> {
    let s = store.snapshot(d, &d.owner).await?;
    let (n, sync) = counter(&s);
    let patches = vec![
        Patch::replace("counter", (n + 1).to_string(), sync),
        Patch::replace(format!("k{:04}", n + 1), "x", 0),
    ];
    match store.update(update(d, &d.owner, patches)).await? {
        UpdateOutcome::Committed { snapshot, .. } => Ok(Some(snapshot.sync_count)),
        UpdateOutcome::Conflict { .. } => Ok(None),
    }
}

/// A dataset written only by `increment` holds exactly what its commits wrote, each whole:
/// commit `i` set the counter to `i` and wrote `k{i}` at sync count `i`.
fn assert_increments_consistent(s: &Snapshot) {
    let (n, counter_sync) = counter(s);
    assert_eq!(n, s.sync_count, "one increment per commit: {s:?}");
    assert_eq!(counter_sync, n);
    assert_eq!(s.records.len() as u64, n + 1, "counter plus k1..k{n}");
    for i in 1..=n {
        let key = format!("k{i:04}");
        let record = s.records.iter().find(|r| r.key == key);
        assert_eq!(record.map(|r| r.sync_count), Some(i), "{key} in {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_conformance() {
    let schemas = TestSchemas::new();
    conformance::run_all(|limits| {
        let config = schemas.config();
        async move { PostgresStore::connect(config, limits).await.unwrap() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_concurrent_writers_on_two_nodes_serialise() {
    const TASKS: u64 = 16;
    const ROUNDS: u64 = 5;
    let schemas = TestSchemas::new();
    let config = schemas.config();
    // Two pools on one schema: two gateway nodes sharing the database.
    let nodes = [
        PostgresStore::connect(config.clone(), Limits::default())
            .await
            .unwrap(),
        PostgresStore::connect(config, Limits::default())
            .await
            .unwrap(),
    ];
    let d = ds("alice", "contended");
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let store = nodes[(task % 2) as usize].clone();
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let mut committed = Vec::new();
            for _ in 0..ROUNDS {
                let mut attempts = 0;
                loop {
                    if let Some(sync_count) = increment(&store, &d).await.unwrap() {
                        committed.push(sync_count);
                        break;
                    }
                    attempts += 1;
                    assert!(attempts < 1_000, "an update keeps conflicting");
                }
            }
            committed
        }));
    }
    let mut seen = HashSet::new();
    for task in tasks {
        for sync_count in task.await.unwrap() {
            assert!(
                seen.insert(sync_count),
                "sync count {sync_count} acked twice"
            );
        }
    }
    let commits = TASKS * ROUNDS;
    assert_eq!(seen, (1..=commits).collect::<HashSet<_>>());
    for node in &nodes {
        let s = node.snapshot(&d, "alice").await.unwrap();
        assert_eq!(s.sync_count, commits, "one sync count per commit");
        assert_increments_consistent(&s);
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_racing_first_writes_to_a_new_dataset_commit_once() {
    const WRITERS: usize = 8;
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let nodes = [
        PostgresStore::connect(config.clone(), Limits::default())
            .await
            .unwrap(),
        PostgresStore::connect(config, Limits::default())
            .await
            .unwrap(),
    ];
    for round in 0..20 {
        // Every writer believes the key is absent (sync count 0) in a dataset not yet there.
        let d = ds("alice", &format!("new-{round}"));
        let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (store, d, start) = (nodes[w % 2].clone(), d.clone(), Arc::clone(&start));
            tasks.push(tokio::spawn(async move {
                start.wait().await;
                let patches = vec![Patch::replace("k", w.to_string(), 0)];
                store.update(update(&d, "alice", patches)).await.unwrap()
            }));
        }
        let mut winners = Vec::new();
        for (w, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                UpdateOutcome::Committed { snapshot, .. } => {
                    assert_eq!(snapshot.sync_count, 1);
                    winners.push(w);
                }
                UpdateOutcome::Conflict {
                    sync_count,
                    conflicts,
                } => {
                    assert_eq!(sync_count, 1, "the conflict reports the winner's commit");
                    assert_eq!(conflicts[0].server.as_ref().map(|r| r.sync_count), Some(1));
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?} all committed");
        let s = nodes[round % 2].snapshot(&d, "alice").await.unwrap();
        assert_eq!(s.sync_count, 1);
        assert_eq!(s.records[0].value, Some(winners[0].to_string()));
    }
    for node in &nodes {
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_concurrent_creations_respect_max_datasets() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let limits = Limits {
        max_datasets: 3,
        ..Limits::default()
    };
    let nodes = [
        PostgresStore::connect(config.clone(), limits.clone())
            .await
            .unwrap(),
        PostgresStore::connect(config, limits).await.unwrap(),
    ];
    let mut tasks = Vec::new();
    for i in 0..12usize {
        let store = nodes[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            let d = ds("alice", &format!("d{i}"));
            store
                .update(update(&d, "alice", vec![Patch::replace("k", "v", 0)]))
                .await
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(UpdateOutcome::Committed { .. }) => created += 1,
            Err(StoreError::Limit {
                limit: LimitCode::MaxDatasets,
                ..
            }) => {}
            other => panic!("expected a commit or the dataset limit, got {other:?}"),
        }
    }
    assert_eq!(created, 3, "exactly max_datasets creations win");
    let listed = nodes[0].list_datasets(DEFAULT_POOL, "alice").await.unwrap();
    assert_eq!(listed.len(), 3);
    for node in &nodes {
        node.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_revoke_on_one_node_takes_effect_on_another() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let a = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    let b = PostgresStore::connect(config, Limits::default())
        .await
        .unwrap();
    let d = ds("alice", "shared");
    commit(&a, update(&d, "alice", vec![Patch::replace("x", "1", 0)])).await;
    a.grant(&d, "alice", "bob", Access::Write).await.unwrap();
    commit(&b, update(&d, "bob", vec![Patch::replace("x", "2", 1)])).await;
    a.revoke(&d, "alice", "bob").await.unwrap();
    assert!(matches!(
        b.update(update(&d, "bob", vec![Patch::replace("x", "3", 2)]))
            .await,
        Err(StoreError::Forbidden { .. })
    ));
    assert!(matches!(
        b.snapshot(&d, "bob").await,
        Err(StoreError::Forbidden { .. })
    ));
    assert_eq!(b.snapshot(&d, "alice").await.unwrap().sync_count, 2);
    a.close().await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_no_grantee_write_commits_after_a_revoke_returns() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let nodes = [
        PostgresStore::connect(config.clone(), Limits::default())
            .await
            .unwrap(),
        PostgresStore::connect(config, Limits::default())
            .await
            .unwrap(),
    ];
    for round in 0..5 {
        let d = ds("alice", &format!("revoked-{round}"));
        commit(
            &nodes[0],
            update(&d, "alice", vec![Patch::replace("a", "0", 0)]),
        )
        .await;
        nodes[0]
            .grant(&d, "alice", "bob", Access::Write)
            .await
            .unwrap();
        let (revoked_tx, revoked_rx) = tokio::sync::watch::channel(false);
        let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
        let mut writers = Vec::new();
        for w in 0..4 {
            let (store, d) = (nodes[w % 2].clone(), d.clone());
            let mut revoked_rx = revoked_rx.clone();
            let mut started_tx = Some(started_tx.clone());
            writers.push(tokio::spawn(async move {
                let key = format!("bob-{w}");
                let mut sync = 0;
                // Write until forbidden; a write that starts after the revoke returned
                // must not commit.
                loop {
                    let started_after_revoke = *revoked_rx.borrow();
                    let patches = vec![Patch::replace(key.clone(), "x", sync)];
                    match store.update(update(&d, "bob", patches)).await {
                        Ok(UpdateOutcome::Committed { changed, .. }) => {
                            assert!(!started_after_revoke, "a write committed after the revoke");
                            sync = changed[0].sync_count;
                            if let Some(tx) = started_tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Err(StoreError::Forbidden { .. }) => break,
                        other => panic!("{other:?}"),
                    }
                }
                revoked_rx.wait_for(|revoked| *revoked).await.unwrap();
            }));
        }
        // The revoke comes once every writer has committed and is writing on.
        drop(started_tx);
        tokio::time::timeout(Duration::from_secs(10), async {
            for _ in 0..4 {
                started_rx.recv().await.expect("every writer commits once");
            }
        })
        .await
        .expect("every writer commits in time");
        nodes[0].revoke(&d, "alice", "bob").await.unwrap();
        // Every grantee write that will ever commit has committed by now.
        let at_revoke = nodes[1].snapshot(&d, "alice").await.unwrap();
        revoked_tx.send(true).unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        assert_eq!(nodes[0].snapshot(&d, "alice").await.unwrap(), at_revoke);
    }
    for node in &nodes {
        node.close().await;
    }
}

#[tokio::test]
async fn test_postgres_store_connect_fails_fast_when_unreachable() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let config = PostgresConfig {
        connect_timeout: Duration::from_secs(1),
        ..PostgresConfig::new(format!("postgres://postgres@127.0.0.1:{port}/test"))
    };
    let started = Instant::now();
    let result = PostgresStore::connect(config, Limits::default()).await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

/// Terminates every backend of the store's connections.
async fn terminate_backends(admin: &Client, application_name: &str) {
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1",
            &[&application_name],
        )
        .await
        .unwrap();
}

/// Waits until none of the store's backends is left.
async fn wait_for_no_backends(admin: &Client, application_name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&application_name],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} backends still alive");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A link that read a login as free, while another identity's link of it had not
/// committed, waits for that one at the insert and is then refused: the login is linked
/// once, and nothing of the refused link is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_link_racing_an_uncommitted_link_is_refused() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    let (first, second) = (
        "us-east-1:00000000-0000-4000-8000-000000000001",
        "us-east-1:00000000-0000-4000-8000-000000000002",
    );
    store
        .create_identity(DEFAULT_POOL, first, true)
        .await
        .unwrap();
    store
        .create_identity(DEFAULT_POOL, second, true)
        .await
        .unwrap();
    let mut other = admin().await;
    let other_tx = other.transaction().await.unwrap();
    other_tx
        .execute(
            &format!(
                "INSERT INTO {}.logins (pool, provider, subject, identity, linked_at)
                 VALUES ($1, 'shared', 's', $2, 0)",
                config.schema
            ),
            &[&DEFAULT_POOL, &first],
        )
        .await
        .unwrap();
    let racing = {
        let store = store.clone();
        tokio::spawn(async move {
            let logins = [Login::new("own", "2"), Login::new("shared", "s")];
            store.link_logins(DEFAULT_POOL, second, &logins).await
        })
    };
    // Commit the other link only once the racing one waits for it.
    let admin = admin().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&config.application_name()],
            )
            .await
            .unwrap()
            .get(0);
        if waiting > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the racing link never waited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other_tx.commit().await.unwrap();
    let result = racing.await.unwrap();
    assert!(
        matches!(&result, Err(StoreError::LoginLinked { identity, .. }) if identity == first),
        "{result:?}"
    );
    let loser = store.identity(DEFAULT_POOL, second).await.unwrap().unwrap();
    assert!(loser.guest && loser.logins.is_empty(), "{loser:?}");
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_resumes_after_its_backends_are_terminated() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let app = config.application_name();
    let store = PostgresStore::connect(config, Limits::default())
        .await
        .unwrap();
    let admin = admin().await;

    // One call after the kill may fail with `Unavailable`; the one after it succeeds.
    let d = ds("alice", "sequential");
    increment(&store, &d).await.unwrap();
    for _ in 0..3 {
        terminate_backends(&admin, &app).await;
        wait_for_no_backends(&admin, &app).await;
        match increment(&store, &d).await {
            Ok(Some(_)) | Err(StoreError::Unavailable(_)) => {}
            other => panic!("expected a commit or unavailable, got {other:?}"),
        }
        let resumed = increment(&store, &d).await;
        assert!(
            matches!(resumed, Ok(Some(_))),
            "the store resumes by itself: {resumed:?}"
        );
    }
    store.health().await.unwrap();
    assert_increments_consistent(&store.snapshot(&d, "alice").await.unwrap());

    // Writers busy while their connections are killed: each update is applied whole or not
    // at all, and every acknowledged one is there.
    let mut writers = Vec::new();
    for w in 0..4 {
        let store = store.clone();
        writers.push(tokio::spawn(async move {
            let d = ds("alice", &format!("busy-{w}"));
            let mut acked = Vec::new();
            let mut unavailable = 0;
            for _ in 0..25 {
                match increment(&store, &d).await {
                    Ok(Some(sync_count)) => acked.push(sync_count),
                    Ok(None) => panic!("a single writer cannot conflict"),
                    Err(StoreError::Unavailable(_)) => unavailable += 1,
                    Err(e) => panic!("expected a commit or unavailable, got {e:?}"),
                }
            }
            (d, acked, unavailable)
        }));
    }
    for _ in 0..5 {
        // Pacing, not a wait for a condition: the kills are spread over the writers' run so
        // that they land mid-write.
        tokio::time::sleep(Duration::from_millis(30)).await;
        terminate_backends(&admin, &app).await;
    }
    for writer in writers {
        let (d, acked, _unavailable) = writer.await.unwrap();
        let s = match store.snapshot(&d, "alice").await {
            Ok(s) => s,
            Err(StoreError::Unavailable(_)) => store.snapshot(&d, "alice").await.unwrap(),
            Err(e) => panic!("{e:?}"),
        };
        assert_increments_consistent(&s);
        assert!(
            acked.iter().all(|n| *n <= s.sync_count),
            "every acknowledged commit is stored: {acked:?} vs {}",
            s.sync_count
        );
    }
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_statement_timeout_is_unavailable_and_writes_nothing() {
    let schemas = TestSchemas::new();
    let config = PostgresConfig {
        statement_timeout: Duration::from_millis(300),
        ..schemas.config()
    };
    let schema = config.schema.clone();
    let store = PostgresStore::connect(config, Limits::default())
        .await
        .unwrap();
    let d = ds("alice", "locked");
    let before = commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;

    // Another session holds the dataset's row lock.
    let mut holder = admin().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {schema}.datasets WHERE owner = 'alice' FOR UPDATE"),
        &[],
    )
    .await
    .unwrap();
    let started = Instant::now();
    let blocked = store
        .update(update(&d, "alice", vec![Patch::replace("a", "2", 1)]))
        .await;
    assert!(
        matches!(blocked, Err(StoreError::Unavailable(_))),
        "{blocked:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    // Reads do not wait for writers.
    assert_eq!(store.snapshot(&d, "alice").await.unwrap(), before);
    tx.rollback().await.unwrap();

    let after = commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "2", 1)]),
    )
    .await;
    assert_eq!(after.sync_count, 2, "the timed-out update left nothing");
    store.close().await;
}

/// A full disk (SQLSTATE 53100, raised here by a trigger on the store's tables) is the
/// retriable `unavailable`, and the store is not ready until a write commits again, though
/// it still answers reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_disk_full_is_unavailable_and_not_ready_until_a_write_commits() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let schema = config.schema.clone();
    let store = PostgresStore::connect(config, Limits::default())
        .await
        .unwrap();
    let d = ds("alice", "full");
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION {schema}.disk_full() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'could not extend file' USING ERRCODE = 'disk_full'; END $$;
             CREATE TRIGGER disk_full BEFORE INSERT OR UPDATE ON {schema}.datasets
             FOR EACH ROW EXECUTE FUNCTION {schema}.disk_full();
             CREATE TRIGGER disk_full BEFORE INSERT OR UPDATE ON {schema}.grants
             FOR EACH ROW EXECUTE FUNCTION {schema}.disk_full();"
        ))
        .await
        .unwrap();
    store.health().await.unwrap();

    let refused = store
        .update(update(&d, "alice", vec![Patch::replace("a", "2", 1)]))
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Unavailable(m)) if m.contains("53100")),
        "{refused:?}"
    );
    let refused = store.grant(&d, "alice", "bob", Access::Read).await;
    assert!(
        matches!(refused, Err(StoreError::Unavailable(_))),
        "{refused:?}"
    );
    assert_eq!(store.snapshot(&d, "alice").await.unwrap().sync_count, 1);
    let health = store.health().await;
    assert!(
        matches!(&health, Err(StoreError::Unavailable(m)) if m.contains("could not extend")),
        "{health:?}"
    );

    admin
        .batch_execute(&format!(
            "DROP TRIGGER disk_full ON {schema}.datasets;
             DROP TRIGGER disk_full ON {schema}.grants;"
        ))
        .await
        .unwrap();
    assert!(store.health().await.is_err(), "no write has committed yet");
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "2", 1)]),
    )
    .await;
    store.health().await.unwrap();
    store.close().await;
}

/// Every path that logs sends its commit log append and COMMIT together (`write::commit`).
/// When the append fails (a trigger on the log raises), the server ends the transaction at
/// that COMMIT as a rollback: each path reports the append's error and writes nothing. A
/// full disk drops the store's connections; a plain error keeps them, so the next calls
/// reuse connections whose append failed, and commit normally, with the next log ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_a_failed_append_commits_nothing_on_any_path() {
    let schemas = TestSchemas::new();
    let config = PostgresConfig {
        pool_size: 2,
        ..schemas.config()
    };
    let schema = config.schema.clone();
    let store = PostgresStore::connect(config, Limits::default())
        .await
        .unwrap();
    let (guest, user) = (
        "us-east-1:00000000-0000-4000-8000-00000000000a",
        "us-east-1:00000000-0000-4000-8000-00000000000b",
    );
    store
        .create_identity(DEFAULT_POOL, guest, true)
        .await
        .unwrap();
    store
        .create_identity(DEFAULT_POOL, user, false)
        .await
        .unwrap();
    let d = ds("alice", "logged");
    let new = ds("alice", "new");
    let g = ds(guest, "moved");
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    commit(&store, update(&g, guest, vec![Patch::replace("g", "1", 0)])).await;
    let log_before = store.log_since(0, 100).await.unwrap();
    assert_eq!(log_before.len(), 2);

    let admin = admin().await;
    for (errcode, sqlstate) in [("disk_full", "53100"), ("check_violation", "23514")] {
        admin
            .batch_execute(&format!(
                "CREATE FUNCTION {schema}.log_refused() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN RAISE EXCEPTION 'log refused' USING ERRCODE = '{errcode}'; END $$;
                 CREATE TRIGGER log_refused BEFORE INSERT ON {schema}.commit_log
                 FOR EACH ROW EXECUTE FUNCTION {schema}.log_refused();"
            ))
            .await
            .unwrap();
        let refused = |what: &str, e: Option<StoreError>| {
            let message = match &e {
                Some(StoreError::Unavailable(m)) if sqlstate == "53100" => m,
                Some(StoreError::Internal(m)) if sqlstate == "23514" => m,
                _ => panic!("{what} with {errcode}: {e:?}"),
            };
            assert!(message.contains(sqlstate), "{what}: {message}");
        };
        // Twice each, so connections the failures left are used again.
        for _ in 0..2 {
            // Through the single path (the dataset has no row yet) and the batch path.
            refused(
                "creating update",
                store
                    .update(update(&new, "alice", vec![Patch::replace("n", "1", 0)]))
                    .await
                    .err(),
            );
            refused(
                "update",
                store
                    .update(update(&d, "alice", vec![Patch::replace("a", "2", 1)]))
                    .await
                    .err(),
            );
            refused("delete", store.delete_dataset(&d, "alice").await.err());
            refused(
                "grant",
                store.grant(&d, "alice", "bob", Access::Read).await.err(),
            );
            refused("log_snapshot", store.log_snapshot(&d).await.err());
            refused(
                "merge",
                store.merge_identity(DEFAULT_POOL, guest, user).await.err(),
            );
        }
        admin
            .batch_execute(&format!(
                "DROP TRIGGER log_refused ON {schema}.commit_log;
                 DROP FUNCTION {schema}.log_refused();"
            ))
            .await
            .unwrap();
    }

    // Nothing was written: the update, the delete, the grant and the merge left no trace,
    // and the log ids the failed appends took were given back with their rollbacks.
    let s = store.snapshot(&d, "alice").await.unwrap();
    assert_eq!((s.sync_count, s.records.len()), (1, 1), "{s:?}");
    assert_eq!(s.records[0].value.as_deref(), Some("1"));
    assert_eq!(store.access(&d, "bob").await.unwrap(), None);
    assert_eq!(store.snapshot(&g, guest).await.unwrap().sync_count, 1);
    assert_eq!(store.snapshot(&new, "alice").await.unwrap().sync_count, 0);
    assert_eq!(
        store
            .identity(DEFAULT_POOL, guest)
            .await
            .unwrap()
            .unwrap()
            .merged_into,
        None
    );
    assert_eq!(store.log_since(0, 100).await.unwrap(), log_before);

    // The same paths now commit, visible to another connection, with the next ids.
    commit(
        &store,
        update(&new, "alice", vec![Patch::replace("n", "1", 0)]),
    )
    .await;
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "2", 1)]),
    )
    .await;
    store.grant(&d, "alice", "bob", Access::Read).await.unwrap();
    assert!(store.log_snapshot(&d).await.unwrap().is_some());
    store
        .merge_identity(DEFAULT_POOL, guest, user)
        .await
        .unwrap();
    assert_eq!(store.delete_dataset(&d, "alice").await.unwrap(), 3);
    let ids: Vec<i64> = admin
        .query(
            &format!("SELECT id FROM {schema}.commit_log ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Two entries before; then two updates, grant, snapshot, merge (the copy and the
    // source's delete) and delete.
    assert_eq!(ids, (1..=9).collect::<Vec<i64>>());
    store.close().await;
}

#[test]
fn test_postgres_disk_full_and_io_errors_are_retriable_outages() {
    for code in [SqlState::DISK_FULL, SqlState::IO_ERROR] {
        assert!(is_retriable_state(&code), "{code:?}");
        assert!(cannot_write(&code), "{code:?}");
    }
    assert!(!cannot_write(&SqlState::T_R_SERIALIZATION_FAILURE));
    assert!(!is_retriable_state(&SqlState::UNIQUE_VIOLATION));
}

async fn schema_versions(admin: &Client, schema: &str) -> Vec<i32> {
    admin
        .query(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_migrating_twice_is_a_no_op() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let admin = admin().await;
    let d = ds("alice", "kept");
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    let written = commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    store.close().await;

    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    assert_eq!(store.snapshot(&d, "alice").await.unwrap(), written);
    assert_eq!(
        schema_versions(&admin, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_upgrades_a_version_1_schema_in_place() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             SET search_path TO {schema};
             {v1}
             CREATE TABLE schema_version (version integer NOT NULL);
             INSERT INTO schema_version (version) VALUES (1);
             INSERT INTO datasets (pool, owner, name, sync_count, created_at, last_modified)
             VALUES ('default', 'alice', 'kept', 7, 0, 0);
             RESET search_path;",
            schema = config.schema,
            v1 = schema::MIGRATIONS[0],
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    assert_eq!(
        schema_versions(&admin, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    let d = ds("alice", "kept");
    assert_eq!(store.snapshot(&d, "alice").await.unwrap().sync_count, 7);
    assert!(store.merged_dataset_names(&d).await.unwrap().is_empty());
    let id = "us-east-1:00000000-0000-4000-8000-000000000001";
    store.create_identity(DEFAULT_POOL, id, true).await.unwrap();
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_upgrades_a_version_3_schema_with_a_commit_log() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             SET search_path TO {schema};
             {v1} {v2} {v3}
             CREATE TABLE schema_version (version integer NOT NULL);
             INSERT INTO schema_version (version) VALUES (3);
             INSERT INTO datasets (pool, owner, name, sync_count, created_at, last_modified)
             VALUES ('default', 'alice', 'kept', 7, 0, 0);
             RESET search_path;",
            schema = config.schema,
            v1 = schema::MIGRATIONS[0],
            v2 = schema::MIGRATIONS[1],
            v3 = schema::MIGRATIONS[2],
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    assert_eq!(
        schema_versions(&admin, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    let d = ds("alice", "kept");
    assert_eq!(store.snapshot(&d, "alice").await.unwrap().sync_count, 7);
    assert!(store.log(&d, 0, 10).await.unwrap().is_empty());
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    let log = store.log(&d, 0, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].sync_count, 8);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_upgrades_a_version_4_schema_with_stream_consumers() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             SET search_path TO {schema};
             {v1} {v2} {v3} {v4}
             CREATE TABLE schema_version (version integer NOT NULL);
             INSERT INTO schema_version (version) VALUES (4);
             INSERT INTO commit_log (pool, owner, name, kind, sync_count, actor, server_time,
                                     patches)
             VALUES ('default', 'alice', 'kept', 'update', 1, 'alice', 0, '[]');
             RESET search_path;",
            schema = config.schema,
            v1 = schema::MIGRATIONS[0],
            v2 = schema::MIGRATIONS[1],
            v3 = schema::MIGRATIONS[2],
            v4 = schema::MIGRATIONS[3],
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    assert_eq!(
        schema_versions(&admin, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    let kept = store.log_since(0, 10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert!(store.stream_consumers().await.unwrap().is_empty());
    assert_eq!(
        store.stream_lease("c", "n", 0, 10).await.unwrap(),
        Some(kept[0].id)
    );
    let d = ds("alice", "kept");
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    let after = store.log_since(kept[0].id, 10).await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(store.log_head().await.unwrap(), after[0].id);
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_upgrades_a_version_7_log_to_a_chain() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let admin = admin().await;
    let before: Vec<&str> = schema::MIGRATIONS[..7].to_vec();
    // Entries 1..=9 alternate between two datasets, sync count = id.
    admin
        .batch_execute(&format!(
            "CREATE SCHEMA {schema};
             SET search_path TO {schema};
             {migrations}
             CREATE TABLE schema_version (version integer NOT NULL);
             INSERT INTO schema_version (version) VALUES (7);
             INSERT INTO datasets (pool, owner, name, sync_count, created_at, last_modified)
             VALUES ('default', 'alice', 'd0', 8, 0, 0), ('default', 'alice', 'd1', 9, 0, 0);
             INSERT INTO commit_log (id, pool, owner, name, kind, sync_count, actor,
                                     server_time, patches)
             SELECT i, 'default', 'alice', 'd' || (i % 2), 'update', i, 'alice', 0, '[]'
             FROM generate_series(1, 9) AS i;
             UPDATE log_seq SET last = 9;
             RESET search_path;",
            schema = config.schema,
            migrations = before.join("\n"),
        ))
        .await
        .unwrap();
    let store = PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap();
    assert_eq!(
        schema_versions(&admin, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    let (d0, d1) = (ds("alice", "d0"), ds("alice", "d1"));
    let counts = |entries: Vec<LogEntry>| entries.iter().map(|e| e.sync_count).collect::<Vec<_>>();
    assert_eq!(counts(store.log(&d0, 0, 10).await.unwrap()), [2, 4, 6, 8]);
    assert_eq!(counts(store.log(&d1, 4, 10).await.unwrap()), [5, 7, 9]);
    let page = store.history(&d1, "alice", None, 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), [9, 7]);
    let page = store.history(&d1, "alice", Some(7), 10).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), [5, 3, 1]);
    // A new commit continues the migrated chain.
    commit(
        &store,
        update(&d0, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    assert_eq!(counts(store.log(&d0, 6, 10).await.unwrap()), [8, 9]);
    // Version 9 moved the heads into the dataset rows.
    let heads: Vec<(String, Option<i64>, i64)> = admin
        .query(
            &format!(
                "SELECT name, log_head, log_entries FROM {}.datasets ORDER BY name",
                config.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        heads,
        [
            ("d0".to_owned(), Some(10), 5),
            ("d1".to_owned(), Some(9), 5)
        ]
    );
    assert_eq!(rowless_heads(&admin, &config.schema).await, 0);
    store.close().await;
}

/// How many names without a dataset row have a log head.
async fn rowless_heads(admin: &Client, schema: &str) -> i64 {
    admin
        .query_one(
            &format!("SELECT count(*) FROM {schema}.commit_log_heads"),
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Two stores on one schema, as two nodes would have.
async fn two_nodes(schemas: &TestSchemas) -> (Arc<PostgresStore>, Arc<PostgresStore>) {
    let a = PostgresStore::connect(schemas.config(), Limits::default())
        .await
        .unwrap();
    let b = PostgresStore::connect(schemas.config_for(&a), Limits::default())
        .await
        .unwrap();
    (Arc::new(a), Arc::new(b))
}

/// A dataset shared before anyone wrote it: the grants' entries chain through
/// `commit_log_heads` until the first write (here the grantee's) creates the row, which takes
/// the head over; history holds every entry, newest first, and the count trim counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_row_takes_over_the_log_of_a_name_shared_before_it_existed() {
    let schemas = TestSchemas::new();
    let store = PostgresStore::connect(schemas.config(), Limits::default())
        .await
        .unwrap();
    let admin = admin().await;
    let d = ds("alice", "later");
    store.grant(&d, "alice", "bob", Access::Read).await.unwrap();
    store.revoke(&d, "alice", "bob").await.unwrap();
    store
        .grant(&d, "alice", "bob", Access::Write)
        .await
        .unwrap();
    assert_eq!(rowless_heads(&admin, store.schema()).await, 1);
    let rowless = store.history(&d, "alice", None, 10).await.unwrap();
    assert_eq!(
        rowless.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [LogKind::Grant, LogKind::Revoke, LogKind::Grant]
    );
    commit(&store, update(&d, "bob", vec![Patch::replace("a", "1", 0)])).await;
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("b", "2", 0)]),
    )
    .await;
    store.revoke(&d, "alice", "bob").await.unwrap();
    assert_eq!(rowless_heads(&admin, store.schema()).await, 0);
    let page = store.history(&d, "alice", None, 10).await.unwrap();
    assert_eq!(
        page.iter()
            .map(|e| (e.kind, e.sync_count))
            .collect::<Vec<_>>(),
        [
            (LogKind::Revoke, 2),
            (LogKind::Update, 2),
            (LogKind::Update, 1),
            (LogKind::Grant, 0),
            (LogKind::Revoke, 0),
            (LogKind::Grant, 0),
        ]
    );
    let ids: Vec<i64> = page.iter().map(|e| e.id).collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(ids, sorted);
    let entries: i64 = admin
        .query_one(
            &format!(
                "SELECT log_entries FROM {}.datasets WHERE name = 'later'",
                store.schema()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(entries, 6);
    store.close().await;

    // The count trim finds the dataset through its row.
    let capped = Limits {
        commit_log_max_entries_per_dataset: 2,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config_for(&store), capped)
        .await
        .unwrap();
    store.compact_log(crate::now_ms()).await.unwrap();
    let kept = store.history(&d, "alice", None, 10).await.unwrap();
    assert_eq!(
        kept.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [LogKind::Revoke, LogKind::Update]
    );
    store.close().await;
}

/// Grantees create datasets their owner shares with them while the owner changes their
/// grant: the grantee's update takes the creation lock before its grant row (it starts over
/// when it finds no row), so neither waits for the other in a cycle, and each name's chain
/// holds every entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_grantee_creates_a_dataset_while_the_owner_regrants() {
    let schemas = TestSchemas::new();
    let (a, b) = two_nodes(&schemas).await;
    for n in 0..15 {
        let d = ds("alice", &format!("s{n}"));
        a.grant(&d, "alice", "bob", Access::Write).await.unwrap();
        let owner = {
            let (a, d) = (a.clone(), d.clone());
            tokio::spawn(async move {
                for _ in 0..4 {
                    a.grant(&d, "alice", "bob", Access::Write).await.unwrap();
                }
            })
        };
        let grantee = {
            let (b, d) = (b.clone(), d.clone());
            tokio::spawn(async move {
                for i in 0..4u64 {
                    commit(
                        &b,
                        update(&d, "bob", vec![Patch::replace(format!("k{i}"), "v", 0)]),
                    )
                    .await;
                }
            })
        };
        owner.await.unwrap();
        grantee.await.unwrap();
        let all = log_ids(&a, &d).await;
        assert_eq!(all.len(), 1 + 4 + 4, "{d}");
        let mut walked: Vec<i64> = a
            .history(&d, "alice", None, 100)
            .await
            .unwrap()
            .iter()
            .map(|e| e.id)
            .collect();
        walked.reverse();
        assert_eq!(walked, all, "{d}");
    }
    assert_eq!(rowless_heads(&admin().await, a.schema()).await, 0);
}

/// A count cap above the chunk a statement walks (1,500 > 1,000) trims to the cap, walking
/// the chain a chunk at a time; a cap of "no cap" (`u64::MAX`) compacts without overflowing
/// the threshold (it did: `bigint out of range`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_count_trim_walks_a_large_cap_in_chunks() {
    let schemas = TestSchemas::new();
    let limits = Limits {
        commit_log_max_entries_per_dataset: 1500,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config(), limits)
        .await
        .unwrap();
    let now = crate::now_ms();
    let admin = admin().await;
    admin
        .batch_execute(&format!(
            "SET search_path TO {schema};
             INSERT INTO commit_log (id, pool, owner, name, kind, sync_count, actor,
                                     server_time, patches, prev_id)
             SELECT i, 'default', 'alice', 'big', 'update', i, 'alice', {now}, '[]',
                    nullif(i - 1, 0)
             FROM generate_series(1, 2400) AS i;
             INSERT INTO commit_log_heads (pool, owner, name, head, entries)
             VALUES ('default', 'alice', 'big', 2400, 2400);
             UPDATE log_seq SET last = 2400;
             RESET search_path;",
            schema = store.schema(),
        ))
        .await
        .unwrap();
    store.compact_log(now).await.unwrap();
    let kept: (i64, i64) = {
        let row = admin
            .query_one(
                &format!(
                    "SELECT count(*), min(id) FROM {}.commit_log",
                    store.schema()
                ),
                &[],
            )
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(kept, (1500, 901));
    let d = ds("alice", "big");
    assert_eq!(store.log(&d, 0, 10).await.unwrap()[0].sync_count, 901);
    store.close().await;

    let unbounded = Limits {
        commit_log_max_entries_per_dataset: u64::MAX,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config_for(&store), unbounded)
        .await
        .unwrap();
    store.compact_log(now).await.unwrap();
    store.close().await;
}

/// Updates from two nodes and a grant/revoke loop race on one dataset: the grants' entries
/// take the dataset's head under another lock than the updates' row lock, so each statement
/// must chain onto the head as it is when it holds the counter, not as its snapshot saw it.
/// Every entry of the dataset is on its chain, in id order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_chain_holds_every_entry_of_racing_writers() {
    let schemas = TestSchemas::new();
    let (a, b) = two_nodes(&schemas).await;
    let d = ds("alice", "hot");
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = if w % 2 == 0 { a.clone() } else { b.clone() };
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..40 {
                let key = format!("k{w}-{i}");
                commit(
                    &store,
                    update(&d, "alice", vec![Patch::replace(&key, "v", 0)]),
                )
                .await;
            }
        }));
    }
    for g in 0..2 {
        let store = if g == 0 { a.clone() } else { b.clone() };
        let d = d.clone();
        tasks.push(tokio::spawn(async move {
            let grantee = format!("reader{g}");
            for _ in 0..40 {
                store
                    .grant(&d, "alice", &grantee, Access::Read)
                    .await
                    .unwrap();
                store.revoke(&d, "alice", &grantee).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let all = log_ids(&a, &d).await;
    assert_eq!(all.len(), 6 * 40 + 2 * 40 * 2);
    let mut walked = Vec::new();
    let mut before = None;
    loop {
        let page = a.history(&d, "alice", before, 37).await.unwrap();
        let Some(last) = page.last() else { break };
        before = Some(last.id);
        walked.extend(page.iter().map(|e| e.id));
    }
    walked.reverse();
    assert_eq!(walked, all);
    // `log` answers the entries above a sync count; grants before the dataset's first
    // update are at 0.
    let above_zero: Vec<i64> = a
        .log_since(0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.dataset == d && e.sync_count > 0)
        .map(|e| e.id)
        .collect();
    let logged: Vec<i64> = a
        .log(&d, 0, 10_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(logged, above_zero);
    // From the middle: every update above 120 is there, whatever the grants between them
    // saw as the dataset's count.
    let updates_above: Vec<u64> = a
        .log(&d, 120, 10_000)
        .await
        .unwrap()
        .iter()
        .filter(|e| e.kind == LogKind::Update)
        .map(|e| e.sync_count)
        .collect();
    assert_eq!(updates_above, (121..=240).collect::<Vec<u64>>());
    a.close().await;
    b.close().await;
}

/// Nodes (separate stores, so separate connections) racing for an expired lease: exactly
/// one wins each round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_racing_nodes_get_a_lease_once() {
    let schemas = TestSchemas::new();
    let first = PostgresStore::connect(schemas.config(), Limits::default())
        .await
        .unwrap();
    let mut nodes = vec![first.clone()];
    for _ in 0..3 {
        nodes.push(
            PostgresStore::connect(schemas.config_for(&first), Limits::default())
                .await
                .unwrap(),
        );
    }
    for round in 0..20_i64 {
        // Every lease of the round before (ttl 10) has expired by `now`.
        let now = 1000 + round * 100;
        let start = Arc::new(tokio::sync::Barrier::new(nodes.len() * 4));
        let mut racers = Vec::new();
        for (n, node) in nodes.iter().enumerate() {
            for task in 0..4 {
                let (node, start) = (node.clone(), Arc::clone(&start));
                racers.push(tokio::spawn(async move {
                    let name = format!("node{n}-{task}");
                    start.wait().await;
                    node.stream_lease("raced", &name, now, 10)
                        .await
                        .unwrap()
                        .map(|_| name)
                }));
            }
        }
        let mut winners = Vec::new();
        for racer in racers {
            winners.extend(racer.await.unwrap());
        }
        assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
        let consumers = first.stream_consumers().await.unwrap();
        assert_eq!(consumers[0].lease_holder.as_ref(), Some(&winners[0]));
        // The winner's acks count; another node's do not.
        assert!(
            nodes[0]
                .stream_ack("raced", &winners[0], round, now + 1)
                .await
                .unwrap()
        );
        assert!(
            !nodes[1]
                .stream_ack("raced", "someone-else", round + 1, now + 1)
                .await
                .unwrap()
        );
    }
    for node in &nodes {
        node.close().await;
    }
}

/// Writers on two nodes (batched updates to many datasets, single-path creations, deletes,
/// grants and revokes) while a reader tails `log_since` from the last id it saw: it sees
/// every entry exactly once, in id order, none skipped; per dataset, ids follow sync counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_log_since_tail_misses_no_commit() {
    let schemas = TestSchemas::new();
    let limits = Limits {
        max_datasets: 100,
        ..Limits::default()
    };
    let first = PostgresStore::connect(schemas.config(), limits.clone())
        .await
        .unwrap();
    let second = PostgresStore::connect(schemas.config_for(&first), limits)
        .await
        .unwrap();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (store, done) = (first.clone(), Arc::clone(&done));
        tokio::spawn(async move {
            let mut seen: Vec<LogEntry> = Vec::new();
            loop {
                // Read the flag first: a read after the last commit must still follow.
                let finished = done.load(Ordering::Acquire);
                let after = seen.last().map_or(0, |e| e.id);
                let page = store.log_since(after, 50).await.unwrap();
                let empty = page.is_empty();
                seen.extend(page);
                if finished && empty {
                    return seen;
                }
                if empty {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut writers = Vec::new();
    for w in 0..8_u32 {
        let store = if w % 2 == 0 {
            first.clone()
        } else {
            second.clone()
        };
        writers.push(tokio::spawn(async move {
            let owner = format!("writer{w}");
            for round in 0..25_u64 {
                // A new dataset each round (the single path), and one written every round
                // (batched with the other writers' updates).
                let fresh = ds(&owner, &format!("fresh{round}"));
                commit(
                    &store,
                    update(&fresh, &owner, vec![Patch::replace("k", "v", 0)]),
                )
                .await;
                let hot = ds(&owner, "hot");
                commit(
                    &store,
                    update(
                        &hot,
                        &owner,
                        vec![Patch::replace("k", round.to_string(), round)],
                    ),
                )
                .await;
                match round % 5 {
                    1 => store.delete_dataset(&fresh, &owner).await.unwrap(),
                    2 => {
                        store
                            .grant(&hot, &owner, "reader", Access::Read)
                            .await
                            .unwrap();
                        0
                    }
                    3 => {
                        store.revoke(&hot, &owner, "reader").await.unwrap();
                        0
                    }
                    _ => 0,
                };
            }
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
    done.store(true, Ordering::Release);
    let seen = reader.await.unwrap();
    let all = first.log_since(0, 100_000).await.unwrap();
    // 8 writers x 25 rounds x 2 updates, plus 5 deletes, 5 grants and 5 revokes each.
    assert_eq!(all.len(), 8 * (25 * 2 + 15));
    assert!(
        seen.windows(2).all(|w| w[0].id < w[1].id),
        "ids out of order"
    );
    let seen_ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    let all_ids: Vec<i64> = all.iter().map(|e| e.id).collect();
    assert_eq!(seen_ids, all_ids, "the tail skipped or repeated entries");
    let mut last_count: std::collections::HashMap<&DatasetKey, u64> = Default::default();
    for e in &all {
        let last = last_count.entry(&e.dataset).or_insert(0);
        assert!(e.sync_count >= *last, "{e:?} after sync count {last}");
        *last = e.sync_count;
    }
    first.close().await;
    second.close().await;
}

/// While another session holds the compaction lock (another node compacting), a node's
/// compaction skips the round; once it is released, the node compacts. Nodes compacting
/// at the same time delete each entry once between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_one_node_compacts_at_a_time() {
    let schemas = TestSchemas::new();
    let limits = Limits {
        commit_log_max_age_secs: 60,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config(), limits.clone())
        .await
        .unwrap();
    let other = PostgresStore::connect(schemas.config_for(&store), limits)
        .await
        .unwrap();
    let d = ds("alice", "compacted");
    for n in 0..4 {
        commit(
            &store,
            update(&d, "alice", vec![Patch::replace("k", "v", n)]),
        )
        .await;
    }
    let later = crate::now_ms() + 120_000;
    let admin = admin().await;
    let lock_args: [&(dyn ToSql + Sync); 2] = [&compact::COMPACT_LOCK, &store.schema()];
    admin
        .execute("SELECT pg_advisory_lock($1, hashtext($2))", &lock_args)
        .await
        .unwrap();
    // Another holder: the call waits for it, and then does the round.
    let (waited, ()) = tokio::join!(store.compact_log(later), async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(other.log_since(0, 10).await.unwrap().len(), 4);
        admin
            .execute("SELECT pg_advisory_unlock($1, hashtext($2))", &lock_args)
            .await
            .unwrap();
    });
    assert_eq!(waited.unwrap().dropped, 3);
    assert_eq!(store.log_since(0, 10).await.unwrap().len(), 1);
    // Two nodes at once: one round after the other, the entries go once.
    for n in 4..6 {
        commit(
            &store,
            update(&d, "alice", vec![Patch::replace("k", "v", n)]),
        )
        .await;
    }
    let (a, b) = tokio::join!(store.compact_log(later), other.compact_log(later));
    assert_eq!(a.unwrap().dropped + b.unwrap().dropped, 2);
    assert_eq!(store.log_since(0, 10).await.unwrap().len(), 1);
    // The lock went with the connection that took it: compaction goes on.
    commit(
        &store,
        update(&d, "alice", vec![Patch::replace("k", "v", 6)]),
    )
    .await;
    assert_eq!(store.compact_log(later).await.unwrap().dropped, 1);
    store.close().await;
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_concurrent_migrations_of_a_fresh_schema_all_succeed() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    let connects: Vec<_> = (0..4)
        .map(|_| tokio::spawn(PostgresStore::connect(config.clone(), Limits::default())))
        .collect();
    let mut stores = Vec::new();
    for connect in connects {
        stores.push(connect.await.unwrap().unwrap());
    }
    let d = ds("alice", "after-migration");
    commit(
        &stores[0],
        update(&d, "alice", vec![Patch::replace("a", "1", 0)]),
    )
    .await;
    assert_eq!(stores[3].snapshot(&d, "alice").await.unwrap().sync_count, 1);
    assert_eq!(
        schema_versions(&admin().await, &config.schema).await,
        [schema::SCHEMA_VERSION]
    );
    for store in &stores {
        store.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_store_refuses_a_newer_schema() {
    let schemas = TestSchemas::new();
    let config = schemas.config();
    PostgresStore::connect(config.clone(), Limits::default())
        .await
        .unwrap()
        .close()
        .await;
    admin()
        .await
        .execute(
            &format!(
                "UPDATE {}.schema_version SET version = version + 1",
                config.schema
            ),
            &[],
        )
        .await
        .unwrap();
    let result = PostgresStore::connect(config, Limits::default()).await;
    assert!(
        matches!(&result, Err(StoreError::Internal(m)) if m.contains("newer")),
        "{result:?}"
    );
}

#[test]
fn test_postgres_config_accepts_only_plain_schema_names() {
    for good in ["tandem", "_x", "tandem_test_1_2_abc", &"s".repeat(63)] {
        assert!(validate_schema(good).is_ok(), "{good}");
    }
    for bad in [
        "",
        "Tandem",
        "1abc",
        "a-b",
        "a;drop",
        "pg_catalog",
        "a b",
        &"s".repeat(64),
    ] {
        assert!(
            matches!(validate_schema(bad), Err(StoreError::BadRequest(_))),
            "{bad}"
        );
    }
    let config = PostgresConfig::new("postgres://u:secret@127.0.0.1/db");
    assert_eq!(config.schema, "tandem");
    assert_eq!(config.pool_size, 16);
    assert_eq!(config.application_name(), "tandem-tandem");
    let pg = pg_config(&config).unwrap();
    assert_eq!(pg.get_application_name(), Some("tandem-tandem"));
    assert!(pg.get_options().unwrap().contains("search_path=tandem"));
    let err = pg_config(&PostgresConfig::new("postgres://u:secret@[bad")).unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

/// Many writers on many datasets at once, so the group-commit workers batch updates of
/// different datasets into one transaction: each update still gets exactly its own outcome
/// (commit, conflict, forbidden, limit), and nothing refused is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_postgres_store_batched_updates_keep_each_updates_outcome() {
    const DATASETS: usize = 12;
    const TASKS_PER_DATASET: usize = 6;
    const ROUNDS: usize = 4;
    let schemas = TestSchemas::new();
    let limits = Limits {
        max_records: 200,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config(), limits)
        .await
        .unwrap();
    let datasets: Vec<DatasetKey> = (0..DATASETS)
        .map(|i| ds("owner", &format!("b{i:02}")))
        .collect();
    for (i, d) in datasets.iter().enumerate() {
        commit(
            &store,
            update(d, "owner", vec![Patch::replace("counter", "0", 0)]),
        )
        .await;
        // The guest may write the even datasets only; it may read some odd ones.
        if i % 2 == 0 {
            store
                .grant(d, "owner", "guest", Access::Write)
                .await
                .unwrap();
        } else if i % 4 == 1 {
            store
                .grant(d, "owner", "guest", Access::Read)
                .await
                .unwrap();
        }
    }
    let mut tasks = Vec::new();
    for (i, d) in datasets.iter().enumerate() {
        for t in 0..TASKS_PER_DATASET {
            let (store, d) = (store.clone(), d.clone());
            let actor = if t % 2 == 0 { "owner" } else { "guest" };
            tasks.push(tokio::spawn(async move {
                let mut committed = Vec::new();
                for _ in 0..ROUNDS {
                    loop {
                        let s = store.snapshot(&d, "owner").await.unwrap();
                        let (n, sync) = counter(&s);
                        let patches = vec![
                            Patch::replace("counter", (n + 1).to_string(), sync),
                            Patch::replace(format!("k{:04}", n + 1), actor, 0),
                        ];
                        match store.update(update(&d, actor, patches)).await {
                            Ok(UpdateOutcome::Committed { snapshot, .. }) => {
                                committed.push(snapshot.sync_count);
                                break;
                            }
                            Ok(UpdateOutcome::Conflict { .. }) => continue,
                            Err(StoreError::Forbidden { .. }) => {
                                assert!(actor == "guest" && i % 2 == 1, "{actor} on {i}");
                                return committed;
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                committed
            }));
        }
    }
    let mut per_dataset: Vec<HashSet<u64>> = vec![HashSet::new(); DATASETS];
    for (n, task) in tasks.into_iter().enumerate() {
        let i = n / TASKS_PER_DATASET;
        for sync_count in task.await.unwrap() {
            assert!(
                per_dataset[i].insert(sync_count),
                "{sync_count} acked twice on {i}"
            );
        }
    }
    for (i, d) in datasets.iter().enumerate() {
        let writers = if i % 2 == 0 {
            TASKS_PER_DATASET
        } else {
            TASKS_PER_DATASET / 2
        };
        let commits = (writers * ROUNDS) as u64;
        // Sync count 1 was the setup write; every acked update got its own count after it.
        assert_eq!(
            per_dataset[i],
            (2..=commits + 1).collect::<HashSet<_>>(),
            "dataset {i}"
        );
        let s = store.snapshot(d, "owner").await.unwrap();
        assert_eq!(s.sync_count, commits + 1);
        let (n, _) = counter(&s);
        assert_eq!(n, commits, "one increment per commit on {i}");
        // Odd datasets: the guest never wrote.
        if i % 2 == 1 {
            assert!(
                s.records
                    .iter()
                    .all(|r| r.value.as_deref() != Some("guest"))
            );
        }
    }
    let batched = store
        .inner
        .batched
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        batched > 0,
        "no update was committed in a batch of more than one"
    );
    // A limit refusal inside a batch writes nothing and leaves the others alone.
    let tight = PostgresStore::connect(
        schemas.config_for(&store),
        Limits {
            max_records: 2,
            ..Limits::default()
        },
    )
    .await
    .unwrap();
    let mut refusals = Vec::new();
    for d in &datasets {
        let (tight, d) = (tight.clone(), d.clone());
        refusals.push(tokio::spawn(async move {
            tight
                .update(update(
                    &d,
                    "owner",
                    vec![Patch::replace("one-too-many", "x", 0)],
                ))
                .await
        }));
    }
    for r in refusals {
        match r.await.unwrap() {
            Err(StoreError::Limit { limit, .. }) => assert_eq!(limit, LimitCode::MaxRecords),
            other => panic!("expected max_records, got {other:?}"),
        }
    }
    for d in &datasets {
        let s = store.snapshot(d, "owner").await.unwrap();
        assert!(s.records.iter().all(|r| r.key != "one-too-many"));
    }
    tight.close().await;
    store.close().await;
}

/// An outcome without its clock-dependent fields, to compare two runs of the same updates.
fn shape(result: &Result<UpdateOutcome, StoreError>) -> String {
    match result {
        Ok(UpdateOutcome::Committed { changed, snapshot }) => {
            let records: Vec<_> = snapshot
                .records
                .iter()
                .map(|r| (&r.key, &r.value, r.sync_count, &r.last_modified_by))
                .collect();
            let changed: Vec<_> = changed.iter().map(|r| (&r.key, r.sync_count)).collect();
            format!("committed {} {records:?} {changed:?}", snapshot.sync_count)
        }
        Ok(UpdateOutcome::Conflict {
            sync_count,
            conflicts,
        }) => {
            let keys: Vec<_> = conflicts
                .iter()
                .map(|c| (&c.key, c.server.as_ref().map(|r| r.sync_count)))
                .collect();
            format!("conflict {sync_count} {keys:?}")
        }
        Err(e) => format!("error {:?}", e.code()),
    }
}

/// Several updates of one dataset in one batch (a shared dataset's writers): each is decided
/// against the state the previous ones left, gets the next sync count, and the answers and
/// the stored dataset are those of committing them one by one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_postgres_batch_decides_updates_of_one_dataset_as_if_one_by_one() {
    let schemas = TestSchemas::new();
    let limits = Limits {
        max_records: 3,
        ..Limits::default()
    };
    let store = PostgresStore::connect(schemas.config(), limits)
        .await
        .unwrap();
    let (batched, one_by_one) = (ds("owner", "together"), ds("owner", "apart"));
    for d in [&batched, &one_by_one] {
        commit(
            &store,
            update(d, "owner", vec![Patch::replace("a", "0", 0)]),
        )
        .await;
        store
            .grant(d, "owner", "writer", Access::Write)
            .await
            .unwrap();
        store
            .grant(d, "owner", "reader", Access::Read)
            .await
            .unwrap();
    }
    let requests = |d: &DatasetKey| {
        vec![
            update(d, "owner", vec![Patch::replace("a", "1", 1)]),
            // Based on the count the first one replaced: a conflict.
            update(d, "writer", vec![Patch::replace("a", "w", 1)]),
            update(
                d,
                "writer",
                vec![Patch::replace("a", "w", 2), Patch::replace("b", "b", 0)],
            ),
            update(d, "reader", vec![Patch::replace("c", "r", 0)]),
            // a, b, c and d: one more than the limit.
            update(
                d,
                "owner",
                vec![Patch::replace("c", "c", 0), Patch::replace("d", "d", 0)],
            ),
            update(d, "owner", vec![Patch::remove("b", 3)]),
            update(d, "writer", vec![Patch::replace("c", "c", 0)]),
        ]
    };
    let before = store.inner.batched.load(Ordering::Relaxed);
    let together = batch::run_together(&store.inner, requests(&batched)).await;
    assert_eq!(
        store.inner.batched.load(Ordering::Relaxed) - before,
        4,
        "every committed update went through one batch"
    );
    let mut apart = Vec::new();
    for request in requests(&one_by_one) {
        apart.push(store.update(request).await);
    }
    let shapes = |results: &[Result<UpdateOutcome, StoreError>]| -> Vec<String> {
        results.iter().map(shape).collect()
    };
    assert_eq!(shapes(&together), shapes(&apart));
    let counts: Vec<Option<u64>> = together
        .iter()
        .map(|r| match r {
            Ok(UpdateOutcome::Committed { snapshot, .. }) => Some(snapshot.sync_count),
            _ => None,
        })
        .collect();
    assert_eq!(
        counts,
        [Some(2), None, Some(3), None, None, Some(4), Some(5)]
    );
    assert!(matches!(together[3], Err(StoreError::Forbidden { .. })));
    assert!(matches!(
        together[4],
        Err(StoreError::Limit {
            limit: LimitCode::MaxRecords,
            ..
        })
    ));
    let (a, b) = (
        store.snapshot(&batched, "owner").await.unwrap(),
        store.snapshot(&one_by_one, "owner").await.unwrap(),
    );
    assert_eq!(a.sync_count, 5);
    assert_eq!(
        shape(&Ok(UpdateOutcome::Committed {
            changed: Vec::new(),
            snapshot: a
        })),
        shape(&Ok(UpdateOutcome::Committed {
            changed: Vec::new(),
            snapshot: b
        }))
    );
    // The removed key's tombstone carries the count of the update that removed it.
    let changes = store.changes(&batched, "owner", 3).await.unwrap();
    let b_record = changes.records.iter().find(|r| r.key == "b").unwrap();
    assert_eq!((b_record.value.as_deref(), b_record.sync_count), (None, 4));
    // The batch logged each committed update, with consecutive sync counts, as the single
    // path did; the refused ones logged nothing.
    // Before-images carry the server times of the two datasets' own commits: left out.
    let logged = |entries: Vec<crate::LogEntry>| -> Vec<(u64, String, String)> {
        entries
            .into_iter()
            .map(|e| {
                let mut patches: serde_json::Value = serde_json::from_str(&e.patches).unwrap();
                for record in patches.as_array_mut().unwrap() {
                    if let Some(before) = record["before"].as_object_mut() {
                        before.remove("lastModified");
                    }
                }
                (e.sync_count, e.actor, patches.to_string())
            })
            .collect()
    };
    let together_log = logged(store.log(&batched, 1, 100).await.unwrap());
    assert_eq!(
        together_log
            .iter()
            .map(|(n, actor, _)| (*n, actor.as_str()))
            .collect::<Vec<_>>(),
        [(2, "owner"), (3, "writer"), (4, "owner"), (5, "writer")]
    );
    assert_eq!(
        together_log,
        logged(store.log(&one_by_one, 1, 100).await.unwrap())
    );
    store.close().await;
}

/// A batch whose updates alternate between two datasets that both have heads, one from an
/// update and one whose row took over the head of a grant logged before the row existed:
/// each dataset's entries chain onto its own head and then onto each other, so its history
/// walks back through every entry of it and no other.
#[tokio::test]
async fn test_postgres_batch_chains_each_datasets_entries_onto_its_own_head() {
    let schemas = TestSchemas::new();
    let store = PostgresStore::connect(schemas.config(), Limits::default())
        .await
        .unwrap();
    let (first, second) = (ds("owner", "first"), ds("owner", "second"));
    commit(
        &store,
        update(&first, "owner", vec![Patch::replace("a", "0", 0)]),
    )
    .await;
    store
        .grant(&second, "owner", "friend", Access::Read)
        .await
        .unwrap();
    // The second dataset's row comes with its first update, which takes the grant's head
    // over; the batch below then finds both rows with heads.
    commit(
        &store,
        update(&second, "owner", vec![Patch::replace("a", "0", 0)]),
    )
    .await;
    let requests: Vec<UpdateRequest> = (1..=3)
        .flat_map(|n| {
            [&first, &second]
                .map(|d| update(d, "owner", vec![Patch::replace(format!("k{n}"), "v", 0)]))
        })
        .collect();
    let before = store.inner.batched.load(Ordering::Relaxed);
    for result in batch::run_together(&store.inner, requests).await {
        assert!(
            matches!(result, Ok(UpdateOutcome::Committed { .. })),
            "{result:?}"
        );
    }
    assert_eq!(store.inner.batched.load(Ordering::Relaxed) - before, 6);
    for (d, kinds) in [
        (&first, vec![LogKind::Update; 4]),
        (
            &second,
            vec![
                LogKind::Grant,
                LogKind::Update,
                LogKind::Update,
                LogKind::Update,
                LogKind::Update,
            ],
        ),
    ] {
        let ids = log_ids(&store, d).await;
        let mut walked: Vec<crate::LogEntry> = store.history(d, "owner", None, 100).await.unwrap();
        walked.reverse();
        assert_eq!(walked.iter().map(|e| e.id).collect::<Vec<_>>(), ids, "{d}");
        assert_eq!(
            walked.iter().map(|e| e.kind).collect::<Vec<_>>(),
            kinds,
            "{d}"
        );
        assert_eq!(
            walked.iter().map(|e| e.sync_count).collect::<Vec<_>>(),
            if kinds.len() == 4 {
                vec![1, 2, 3, 4]
            } else {
                vec![0, 1, 2, 3, 4]
            },
            "{d}"
        );
        // The count the row keeps (history's length for compaction) saw every entry.
        let (entries,): (i64,) = {
            let client = store.inner.pool.get().await.unwrap();
            let row = client
                .query_one(
                    "SELECT log_entries FROM datasets WHERE pool = $1 AND owner = $2 AND name = $3",
                    &[&d.pool, &d.owner, &d.name],
                )
                .await
                .unwrap();
            (row.get(0),)
        };
        assert_eq!(entries as usize, kinds.len(), "{d}");
    }
    store.close().await;
}
