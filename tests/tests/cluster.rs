//! Several `tandem` processes sharing one PostgreSQL store and one Redis: live sharing across
//! nodes, Redis outages, conflicts across nodes, a node killed mid-traffic, PostgreSQL
//! unreachable.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::time::Duration;
use tandem_client::{Client, ClientError, ConflictHandler, Connection, UpdateResult};
use tandem_protocol::{Access, DatasetRef, ErrorCode, Patch};
use tandem_tests::cluster::{PgDatabase, PgSchema, RedisServer, redis_url, start_nodes, unique};
use tandem_tests::{TestServer, http_get, push_at_least, wait_until};

const WAIT: Duration = Duration::from_secs(20);

async fn subscribe_all(conns: &[&Connection], dataset: &DatasetRef) {
    for c in conns {
        c.subscribe(dataset.clone()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_update_through_one_node_reaches_every_node() {
    let schema = PgSchema::create();
    let nodes = start_nodes(3, &schema.url, &schema.name, &redis_url());
    let alice = nodes[0].connect("alice").await;
    let list = DatasetRef::own("groceries");
    alice
        .update(list.clone(), None, vec![Patch::replace("milk", "1", 0)])
        .await
        .unwrap();
    for who in ["bob", "carol"] {
        alice.grant(list.clone(), who, Access::Write).await.unwrap();
    }
    let shared = DatasetRef::new("alice", "groceries");
    let mut watchers = vec![
        nodes[0].connect("alice").await,
        nodes[1].connect("bob").await,
        nodes[2].connect("carol").await,
    ];
    for w in &watchers {
        w.subscribe(shared.clone()).await.unwrap();
    }

    // Writes through node 1 and node 2; every subscriber on every node sees each one.
    let bob = nodes[1].connect("bob").await;
    let mut last = 1;
    for i in 0..10 {
        let (conn, ds) = if i % 2 == 0 {
            (&alice, list.clone())
        } else {
            (&bob, shared.clone())
        };
        match conn
            .update(ds, None, vec![Patch::replace(format!("k{i}"), "v", 0)])
            .await
            .unwrap()
        {
            UpdateResult::Committed { sync_count, .. } => last = sync_count,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(last, 11);
    for w in &mut watchers {
        let (n, records) = tokio::time::timeout(WAIT, push_at_least(w, last))
            .await
            .expect("every node converges");
        assert_eq!(n, last);
        assert_eq!(records.len(), 11);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_redis_restart_loses_nothing_and_subscribers_converge() {
    let schema = PgSchema::create();
    let mut redis = RedisServer::start();
    let nodes = start_nodes(3, &schema.url, &schema.name, &redis.url());
    let ds = DatasetRef::new("owner", "doc");
    let owner = nodes[0].connect("owner").await;
    owner
        .update(
            DatasetRef::own("doc"),
            None,
            vec![Patch::replace("start", "1", 0)],
        )
        .await
        .unwrap();
    let mut watchers = Vec::new();
    for node in &nodes {
        let w = node.connect("owner").await;
        w.subscribe(ds.clone()).await.unwrap();
        watchers.push(w);
    }
    let writers = [
        nodes[0].connect("owner").await,
        nodes[1].connect("owner").await,
    ];

    redis.kill();
    // Nodes notice and report themselves degraded.
    for node in &nodes {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, _) = http_get(node.addr, "/ready").await;
            if status == 503 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node never degraded"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Writes go on and are acknowledged during the outage.
    let mut acked = Vec::new();
    for i in 0..10 {
        let key = format!("outage{i}");
        let r = writers[i % 2]
            .update(ds.clone(), None, vec![Patch::replace(key.clone(), "x", 0)])
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
        acked.push(key);
    }
    redis.start_again();

    // Every subscriber on every node converges without reconnecting.
    for w in &mut watchers {
        let (n, records) = tokio::time::timeout(WAIT, push_at_least(w, 11))
            .await
            .expect("converges after redis returns");
        assert_eq!(n, 11);
        let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
        for key in &acked {
            assert!(keys.contains(&key.as_str()), "{key} missing");
        }
        assert!(w.closed().is_none(), "no reconnect needed");
    }
    for node in &nodes {
        let deadline = tokio::time::Instant::now() + WAIT;
        while http_get(node.addr, "/ready").await.0 != 200 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "node never ready again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_conflicting_writes_through_different_nodes_commit_once_per_version() {
    let schema = PgSchema::create();
    let nodes = start_nodes(3, &schema.url, &schema.name, &redis_url());
    let ds = DatasetRef::new("o", "counter");
    let mut conns = Vec::new();
    for node in &nodes {
        conns.push(node.connect("o").await);
    }
    let mut seen = 0;
    let mut commits = 0;
    for round in 0..10 {
        let attempts = conns.iter().enumerate().map(|(i, c)| {
            c.update(
                ds.clone(),
                None,
                vec![Patch::replace("k", format!("r{round}-n{i}"), seen)],
            )
        });
        let results = futures_util::future::join_all(attempts).await;
        let won: Vec<_> = results
            .iter()
            .filter_map(|r| match r {
                Ok(UpdateResult::Committed { sync_count, .. }) => Some(*sync_count),
                _ => None,
            })
            .collect();
        assert_eq!(won.len(), 1, "round {round}: {results:?}");
        for r in &results {
            match r {
                Ok(UpdateResult::Committed { .. }) => {}
                Ok(UpdateResult::Conflict { conflicts, .. }) => {
                    assert_eq!(conflicts[0].server.as_ref().unwrap().sync_count, won[0]);
                }
                Err(e) => panic!("{e}"),
            }
        }
        seen = won[0];
        commits += 1;
    }
    let (n, records) = conns[0].changes(ds, 0).await.unwrap();
    assert_eq!(n, commits);
    assert_eq!(records[0].sync_count, commits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_killed_node_clients_reconnect_elsewhere_and_nothing_is_lost() {
    let schema = PgSchema::create();
    let mut nodes = start_nodes(3, &schema.url, &schema.name, &redis_url());
    let user = "mover";
    let client = Client::builder(nodes[1].url(), user)
        .fallback_url(nodes[2].url())
        .token(nodes[1].token(user))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .start()
        .unwrap();
    client.wait_online(WAIT).await.unwrap();
    let ds = client
        .open(DatasetRef::own("log"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    let mut watcher = nodes[0].connect(user).await;
    watcher.subscribe(DatasetRef::own("log")).await.unwrap();

    let mut acked = BTreeMap::new();
    let mut i = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked.len() < 40 {
        assert!(tokio::time::Instant::now() < deadline, "writes stalled");
        if i == 15 {
            nodes[1].kill(); // mid-traffic, no goodbye
        }
        if i < 40 {
            ds.put(format!("e{i}"), format!("v{i}")).unwrap();
            i += 1;
        }
        match ds.sync().await {
            Ok(_) => {
                for (k, v) in ds.records() {
                    acked.insert(k, v);
                }
            }
            Err(ClientError::Offline | ClientError::Closed { .. }) => {
                // The retry interval while the client fails over; the loop's deadline bounds it.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Every acknowledged write is in the store, as seen through a surviving node.
    let (_, records) = watcher.changes(DatasetRef::own("log"), 0).await.unwrap();
    let stored: BTreeMap<String, String> = records
        .into_iter()
        .filter_map(|r| r.value.map(|v| (r.key, v)))
        .collect();
    assert_eq!(stored, acked);
    assert_eq!(stored.len(), 40);
    // The client moved to node 3 and re-subscribed: a write there reaches it live.
    let other = nodes[2].connect(user).await;
    let mut events = ds.events();
    other
        .update(
            DatasetRef::own("log"),
            None,
            vec![Patch::replace("live", "1", 0)],
        )
        .await
        .unwrap();
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("live push after failover")
        .unwrap();
    assert_eq!(ds.get("live").as_deref(), Some("1"));
    let _ = push_at_least(&mut watcher, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_postgres_unreachable_writes_get_unavailable_and_service_resumes() {
    let db = PgDatabase::create();
    let server = TestServer::builder()
        .arg("--store", &db.url)
        .arg("--postgres-schema", unique("s"))
        .start();
    let writer = server.connect("p").await;
    let mut watcher = server.connect("p").await;
    let ds = DatasetRef::own("d");
    writer
        .update(ds.clone(), None, vec![Patch::replace("a", "1", 0)])
        .await
        .unwrap();
    subscribe_all(&[&watcher], &ds).await;

    db.cut_off();
    // Writes fail fast with the retriable code; nothing is acknowledged.
    let mut refused = 0;
    for i in 0..3 {
        let err = writer
            .update(
                ds.clone(),
                None,
                vec![Patch::replace(format!("lost{i}"), "x", 0)],
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Unavailable), "{err}");
        refused += 1;
    }
    assert_eq!(refused, 3);
    let (status, _) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 503);
    // The sessions and the live subscription stay up.
    writer.ping().await.unwrap();
    watcher.ping().await.unwrap();

    db.restore();
    let deadline = tokio::time::Instant::now() + WAIT;
    let n = loop {
        match writer
            .update(ds.clone(), None, vec![Patch::replace("b", "2", 0)])
            .await
        {
            Ok(UpdateResult::Committed { sync_count, .. }) => break sync_count,
            Ok(other) => panic!("{other:?}"),
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
                assert!(tokio::time::Instant::now() < deadline, "never resumed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // No half-written state: the refused writes left nothing behind.
    assert_eq!(n, 2);
    let (count, records) = writer.changes(ds.clone(), 0).await.unwrap();
    assert_eq!(count, 2);
    let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["a", "b"]);
    let (pushed, _) = push_at_least(&mut watcher, 2).await;
    assert_eq!(pushed, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_delete_during_redis_outage_still_reaches_subscribers_on_other_nodes() {
    let schema = PgSchema::create();
    let mut redis = RedisServer::start();
    let nodes = start_nodes(2, &schema.url, &schema.name, &redis.url());
    let owner = nodes[1].connect("alice").await;
    let ds = DatasetRef::own("doomed");
    owner
        .update(ds.clone(), None, vec![Patch::replace("k", "v", 0)])
        .await
        .unwrap();
    let mut watcher = nodes[0].connect("alice").await;
    watcher.subscribe(ds.clone()).await.unwrap();
    // A subscriber that comes after the delete keeps its subscription.
    redis.kill();
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_get(nodes[1].addr, "/ready").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "node never degraded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    owner.delete_dataset(ds.clone()).await.unwrap();
    let mut late = nodes[0].connect("alice").await;
    let (n, records) = late.subscribe(ds.clone()).await.unwrap();
    assert_eq!((n, records.len()), (2, 0));
    redis.start_again();

    // Whichever comes first after the outage, the re-published event or node 1's resync from
    // the store, the subscriber that missed the delete is told.
    let frame = loop {
        match tokio::time::timeout(WAIT, watcher.next_event()).await {
            Ok(Some(tandem_protocol::ServerFrame::Deleted { sync_count, .. })) => break sync_count,
            Ok(Some(_)) => continue,
            other => panic!("no deleted frame: {other:?}"),
        }
    };
    assert_eq!(frame, 2);
    // The late subscriber keeps its subscription and sees the dataset re-created.
    owner
        .update(ds.clone(), None, vec![Patch::replace("again", "1", 0)])
        .await
        .unwrap();
    let (n, records) = tokio::time::timeout(WAIT, push_at_least(&mut late, 3))
        .await
        .expect("the late subscriber still gets pushes");
    assert_eq!((n, records.len()), (3, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_node_started_before_postgresql_waits_for_it_then_serves() {
    let db = PgDatabase::create();
    db.cut_off();
    let mut builder = TestServer::builder()
        .arg("--store", &db.url)
        .arg("--postgres-schema", unique("s"));
    let log = builder.log_path();
    let starting = tokio::task::spawn_blocking(move || builder.start());
    // Still waiting, not exited (an exited node fails the start at once), once it has said
    // that it waits.
    wait_until(WAIT, "the node to wait for postgresql", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("waiting for postgresql"))
    })
    .await;
    assert!(!starting.is_finished(), "the node gave up on postgresql");
    db.restore();
    let server = starting
        .await
        .expect("the node started once postgresql was back");
    assert!(
        server.log().contains("waiting for postgresql"),
        "{}",
        server.log()
    );
    let conn = server.connect("w").await;
    let r = conn
        .update(
            DatasetRef::own("d"),
            None,
            vec![Patch::replace("k", "v", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
}

/// `tandem serve` on a free port with the test secret and `store`, for tests that watch the
/// process start (or fail to) rather than use a started server.
fn serve_command(data_dir: &std::path::Path, store: &str) -> std::process::Command {
    let mut command = tandem_tests::serve_command(data_dir);
    command.args(["--store", store]);
    command
}

#[test]
fn test_cluster_node_with_store_wait_zero_exits_at_once_when_postgresql_is_unreachable() {
    // A port nothing listens on: bind one, note it, close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let out = serve_command(
        dir.path(),
        &format!("postgres://postgres@127.0.0.1:{port}/test"),
    )
    .args(["--store-wait", "0s"])
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot open the postgresql store"),
        "{stderr}"
    );
    assert!(started.elapsed() < WAIT, "{:?}", started.elapsed());
}

#[test]
fn test_cluster_node_waiting_for_postgresql_stops_at_sigterm() {
    let db = PgDatabase::create();
    db.cut_off();
    let dir = tempfile::tempdir().unwrap();
    let mut child = serve_command(dir.path(), &db.url)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The log is read as it comes: SIGTERM goes once the node says it waits (the default
    // wait is a minute).
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if line.contains("waiting for postgresql") {
                let _ = waiting_tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    waiting_rx
        .recv_timeout(WAIT)
        .expect("the node waits for postgresql");
    assert!(child.try_wait().unwrap().is_none(), "it should be waiting");
    let sent = std::time::Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "{:?}",
        sent.elapsed()
    );
    assert!(!out.status.success());
    let stderr = reader.join().unwrap();
    assert!(
        stderr.contains("stopped while waiting for postgresql"),
        "{stderr}"
    );
}
