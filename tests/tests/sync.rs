//! The sync contract end to end: conflicts, concurrent writers, revoke, delete, crash
//! recovery and graceful shutdown, against a real `tandem` process.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_client::{Connection, UpdateResult};
use tandem_protocol::{Access, CloseCode, DatasetRef, Patch, ServerFrame, UnsubscribeReason};
use tandem_tests::{TestServer, http_get, next_push, push_at_least};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sync_concurrent_conflicting_updates_commit_exactly_one() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("doc");
    alice
        .update(ds.clone(), None, vec![Patch::replace("title", "v1", 0)])
        .await
        .unwrap();
    alice.grant(ds.clone(), "bob", Access::Write).await.unwrap();
    let bob = server.connect("bob").await;
    let shared = DatasetRef::new("alice", "doc");

    // Both saw sync count 1 and write at once.
    let (a, b) = tokio::join!(
        alice.update(
            ds.clone(),
            None,
            vec![Patch::replace("title", "alice's", 1)]
        ),
        bob.update(
            shared.clone(),
            None,
            vec![Patch::replace("title", "bob's", 1)]
        ),
    );
    let outcomes = [a.unwrap(), b.unwrap()];
    let committed: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o, UpdateResult::Committed { .. }))
        .collect();
    assert_eq!(committed.len(), 1, "{outcomes:?}");
    let conflict = outcomes
        .iter()
        .find_map(|o| match o {
            UpdateResult::Conflict {
                sync_count,
                conflicts,
            } => Some((*sync_count, conflicts.clone())),
            _ => None,
        })
        .expect("one conflict");
    assert_eq!(conflict.0, 2);
    assert_eq!(conflict.1.len(), 1);
    let server_record = conflict.1[0].server.clone().expect("server record");
    assert_eq!(server_record.key, "title");
    assert_eq!(server_record.sync_count, 2);

    // The stored value is the winner's, and the loser can resolve by retrying on top of it.
    let (n, records) = alice.subscribe(ds.clone()).await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(records[0].value, server_record.value);
    let r = bob
        .update(shared, None, vec![Patch::replace("title", "merged", 2)])
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 3, .. }),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sync_many_concurrent_writers_lose_no_update() {
    const WRITERS: usize = 8;
    const EACH: usize = 15;
    let server = Arc::new(TestServer::start());
    let owner = server.connect("owner").await;
    let ds = DatasetRef::own("counter");
    for w in 0..WRITERS {
        owner
            .grant(ds.clone(), &format!("writer-{w}"), Access::Write)
            .await
            .unwrap();
    }
    let mut watcher = server.connect("owner").await;
    watcher.subscribe(ds.clone()).await.unwrap();

    // Every writer increments one shared counter and appends its own key, retrying on
    // conflict with the server's record, as a client SDK would.
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let conn = server.connect(&format!("writer-{w}")).await;
            let shared = DatasetRef::new("owner", "counter");
            let mut commits = 0u64;
            for i in 0..EACH {
                let (mut value, mut seen) = (0u64, 0u64);
                let (_, records) = conn.changes(shared.clone(), 0).await.unwrap();
                if let Some(r) = records.iter().find(|r| r.key == "count") {
                    value = r.value.as_deref().unwrap().parse().unwrap();
                    seen = r.sync_count;
                }
                loop {
                    let patches = vec![
                        Patch::replace("count", (value + 1).to_string(), seen),
                        Patch::replace(format!("w{w}-{i}"), "x", 0),
                    ];
                    match conn.update(shared.clone(), None, patches).await.unwrap() {
                        UpdateResult::Committed { .. } => {
                            commits += 1;
                            break;
                        }
                        UpdateResult::Conflict { conflicts, .. } => {
                            let current = conflicts[0].server.clone().unwrap();
                            value = current.value.unwrap().parse().unwrap();
                            seen = current.sync_count;
                        }
                    }
                }
            }
            commits
        }));
    }
    let mut commits = 0;
    for t in tasks {
        commits += t.await.unwrap();
    }
    assert_eq!(commits, (WRITERS * EACH) as u64);

    // Grants are not commits: the dataset's sync count is exactly the number of commits.
    let (n, records) = owner.changes(ds.clone(), 0).await.unwrap();
    assert_eq!(n, commits, "sync count equals the number of commits");
    let count = records.iter().find(|r| r.key == "count").unwrap();
    assert_eq!(count.value.as_deref(), Some(commits.to_string().as_str()));
    assert_eq!(records.len(), 1 + WRITERS * EACH);

    // The subscriber ends at the final sync count with every write in it.
    let (last, pushed) = push_at_least(&mut watcher, n).await;
    assert_eq!(last, n);
    assert_eq!(pushed.len(), 1 + WRITERS * EACH);
}

#[tokio::test]
async fn test_sync_revoke_evicts_live_subscriber_at_once() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("secret-plans");
    alice
        .update(ds.clone(), None, vec![Patch::replace("a", "1", 0)])
        .await
        .unwrap();
    alice.grant(ds.clone(), "bob", Access::Read).await.unwrap();
    let mut bob = server.connect("bob").await;
    let shared = DatasetRef::new("alice", "secret-plans");
    bob.subscribe(shared.clone()).await.unwrap();

    alice.revoke(ds.clone(), "bob").await.unwrap();
    let frame = bob
        .next_event_timeout(Duration::from_secs(5))
        .await
        .expect("unsubscribed frame");
    assert_eq!(
        frame,
        ServerFrame::Unsubscribed {
            dataset: shared.clone(),
            reason: UnsubscribeReason::Revoked
        }
    );
    // No more pushes reach Bob, and he cannot read or re-subscribe.
    alice
        .update(ds.clone(), None, vec![Patch::replace("b", "2", 0)])
        .await
        .unwrap();
    assert!(
        bob.next_event_timeout(Duration::from_millis(300))
            .await
            .is_none()
    );
    let err = bob.subscribe(shared.clone()).await.unwrap_err();
    assert_eq!(err.code(), Some(tandem_protocol::ErrorCode::Forbidden));
    bob.ping().await.unwrap();
}

#[tokio::test]
async fn test_sync_delete_tells_subscribers_and_sync_count_continues() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("drafts");
    for i in 0..3u64 {
        alice
            .update(
                ds.clone(),
                None,
                vec![Patch::replace(format!("k{i}"), "v", 0)],
            )
            .await
            .unwrap();
    }
    alice.grant(ds.clone(), "bob", Access::Read).await.unwrap();
    let mut bob = server.connect("bob").await;
    bob.subscribe(DatasetRef::new("alice", "drafts"))
        .await
        .unwrap();
    let mut alice2 = server.connect("alice").await;
    alice2.subscribe(ds.clone()).await.unwrap();

    alice.delete_dataset(ds.clone()).await.unwrap();
    for conn in [&mut bob, &mut alice2] {
        let frame = conn
            .next_event_timeout(Duration::from_secs(5))
            .await
            .expect("deleted frame");
        assert_eq!(
            frame,
            ServerFrame::Deleted {
                dataset: DatasetRef::new("alice", "drafts"),
                sync_count: 4
            }
        );
    }
    // The grant went with the dataset; a re-created dataset continues above the old count.
    let err = bob
        .subscribe(DatasetRef::new("alice", "drafts"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tandem_protocol::ErrorCode::Forbidden));
    let r = alice
        .update(ds.clone(), None, vec![Patch::replace("fresh", "1", 0)])
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 5, .. }),
        "{r:?}"
    );
    let datasets = alice.list_datasets().await.unwrap();
    assert_eq!(datasets.len(), 1);
    assert_eq!(datasets[0].records, 1);
}

async fn dump(conn: &Connection, names: &[&str]) -> BTreeMap<String, (u64, String)> {
    let mut out = BTreeMap::new();
    for name in names {
        let (n, records) = conn.changes(DatasetRef::own(*name), 0).await.unwrap();
        out.insert(
            (*name).to_owned(),
            (n, serde_json::to_string(&records).unwrap()),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sync_sigkill_and_restart_serves_identical_snapshots() {
    let mut server = TestServer::start();
    let names = ["a", "b", "c"];
    let before = {
        let conn = server.connect("crash").await;
        for round in 0..20u64 {
            for name in names {
                let ds = DatasetRef::own(name);
                let (_, records) = conn.changes(ds.clone(), 0).await.unwrap();
                let seen = records
                    .iter()
                    .find(|r| r.key == "n")
                    .map_or(0, |r| r.sync_count);
                let mut patches = vec![Patch::replace("n", round.to_string(), seen)];
                if round % 5 == 4 {
                    let old = records.iter().find(|r| r.key == format!("k{}", round - 4));
                    if let Some(old) = old {
                        patches.push(Patch::remove(old.key.clone(), old.sync_count));
                    }
                }
                patches.push(Patch::replace(format!("k{round}"), "v", 0));
                let r = conn.update(ds, Some("dev".into()), patches).await.unwrap();
                assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
            }
        }
        dump(&conn, &names).await
    };
    // Every acknowledged write must survive a SIGKILL (no shutdown, no checkpoint).
    server.kill();
    server.restart();
    let conn = server.connect("crash").await;
    let after = dump(&conn, &names).await;
    assert_eq!(before, after);
    for name in names {
        let (n, _) = conn.subscribe(DatasetRef::own(name)).await.unwrap();
        assert_eq!(n, 20);
    }
}

#[tokio::test]
async fn test_sync_sigterm_closes_sessions_with_going_away() {
    let mut server = TestServer::start();
    let conn = server.connect("alice").await;
    conn.subscribe(DatasetRef::own("x")).await.unwrap();
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(server.terminate(), "tandem exits 0 after SIGTERM");
    let closed = conn.wait_closed().await;
    assert_eq!(closed.code, Some(CloseCode::GoingAway.code()));
}

#[tokio::test]
async fn test_sync_health_and_ready_endpoints() {
    let server = TestServer::start();
    let (status, body) = http_get(server.addr, "/health").await;
    assert_eq!(status, 200);
    assert!(body.contains("ok"));
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["status"], "ready");
    assert_eq!(v["store"], "up");
}

#[tokio::test]
async fn test_sync_subscriber_sees_every_commit_or_a_later_one() {
    let server = TestServer::start();
    let writer = server.connect("w").await;
    let mut reader = server.connect("w").await;
    let ds = DatasetRef::own("stream");
    reader.subscribe(ds.clone()).await.unwrap();
    let mut seen = 0;
    for i in 1..=50u64 {
        let r = writer
            .update(
                ds.clone(),
                None,
                vec![Patch::replace(format!("k{i}"), "v", 0)],
            )
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { sync_count, .. } if sync_count == i));
    }
    // Pushes may coalesce but never go backwards, and the last one is the final state.
    let last = loop {
        let (n, records) = next_push(&mut reader).await;
        assert!(n > seen, "sync counts only go up: {n} after {seen}");
        seen = n;
        if n == 50 {
            break records;
        }
    };
    assert_eq!(last.len(), 50);
}

#[tokio::test]
async fn test_sync_metrics_count_sessions_commits_conflicts_and_errors() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let mut watcher = server.connect("alice").await;
    let ds = DatasetRef::own("m");
    watcher.subscribe(ds.clone()).await.unwrap();
    alice
        .update(ds.clone(), None, vec![Patch::replace("k", "1", 0)])
        .await
        .unwrap();
    let r = alice
        .update(ds.clone(), None, vec![Patch::replace("k", "2", 0)])
        .await
        .unwrap();
    assert!(matches!(r, UpdateResult::Conflict { .. }));
    alice.send_text("{not json").unwrap();
    next_push(&mut watcher).await;
    alice.ping().await.unwrap();

    let (status, body) = http_get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing:\n{body}"))
    };
    assert_eq!(value("tandem_gateway_sessions "), 2);
    assert_eq!(value("tandem_gateway_subscriptions "), 1);
    assert_eq!(value("tandem_gateway_commits_total "), 1);
    assert_eq!(value("tandem_gateway_conflicts_total "), 1);
    assert_eq!(value("tandem_gateway_pushes_total "), 1);
    assert_eq!(
        value("tandem_gateway_errors_total{code=\"bad_request\"} "),
        1
    );
    assert_eq!(value("tandem_broker_up "), 1);
    // The node's memory, as the process sees it: more than a few MiB, less than a GiB.
    let rss = value("process_resident_memory_bytes ");
    assert!((1 << 20..1 << 30).contains(&rss), "{rss}");
}
