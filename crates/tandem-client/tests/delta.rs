//! Opt-in protocol features against the real gateway (SQLite store, loopback socket):
//! `delta` pushes, the `lean` encoding, re-subscribing with `since`, and a client with the
//! features turned off. The same scenarios as clients/js/test/delta.test.mjs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_client::protocol::{DatasetRef, FEATURE_DELTA, FEATURE_LEAN, ServerFrame};
use tandem_client::{Client, ConflictHandler, Connection, Dataset};
use tandem_fanout::{Broker, LocalBroker};
use tandem_gateway::{AuthConfig, Gateway, GatewayConfig, Subscribers, Verifier};
use tandem_store::{Limits, SqliteStore, Store};

const SECRET: &[u8] = b"tandem-client-tests-secret-0123456789abcdef";

struct TestServer {
    url: String,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), Limits::default()).unwrap());
        let subscribers = Subscribers::new(store);
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new(subscribers.handler()));
        let verifier = Verifier::new(&AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        })
        .unwrap();
        let gateway = Gateway::new(GatewayConfig::default(), subscribers, broker, verifier);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = gateway
            .router()
            .into_make_service_with_connect_info::<tandem_gateway::Peer>();
        tokio::spawn(async move {
            axum::serve(tandem_gateway::Listener::new(listener), app)
                .await
                .unwrap();
        });
        TestServer {
            url: format!("ws://{addr}/v1/sync"),
            _dir: dir,
        }
    }

    fn token(&self, sub: &str) -> String {
        tandem_token::mint_hs256(SECRET, sub, Duration::from_secs(3600), None, None).unwrap()
    }

    fn client(&self, sub: &str) -> tandem_client::ClientBuilder {
        Client::builder(&self.url, sub)
            .token(self.token(sub))
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
    }

    async fn online(&self, builder: tandem_client::ClientBuilder) -> Client {
        let client = builder.start().unwrap();
        client.wait_online(Duration::from_secs(5)).await.unwrap();
        client
    }

    /// The server's live records, as `changes{since: 0}` tells them, and its sync count.
    async fn state(&self, owner: &str, name: &str) -> (u64, BTreeMap<String, String>) {
        let conn = Connection::connect(&self.url, &self.token(owner))
            .await
            .unwrap();
        let (sync_count, records) = conn.changes(DatasetRef::new(owner, name), 0).await.unwrap();
        conn.close().await;
        let live = records
            .into_iter()
            .filter_map(|r| r.value.map(|v| (r.key, v)))
            .collect();
        (sync_count, live)
    }
}

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Puts, syncs, removes, syncs again: a few commits, tombstones included.
async fn write_some(ds: &Dataset, round: u32) {
    for i in 0..5 {
        ds.put(format!("k{i}"), format!("v{i}-{round}")).unwrap();
    }
    ds.sync().await.unwrap();
    ds.put(format!("only-{round}"), "x").unwrap();
    ds.remove("k1").unwrap();
    ds.sync().await.unwrap();
    ds.remove("k3").unwrap();
    ds.put("k4", format!("again-{round}")).unwrap();
    ds.sync().await.unwrap();
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_subscriber_with_deltas_gets_delta_frames_and_ends_equal_to_the_server() {
    let server = TestServer::start().await;
    let name = unique("delta");
    let writer = server.online(server.client("alice")).await;
    let reader = server.online(server.client("alice")).await;
    assert_eq!(reader.features(), [FEATURE_DELTA, FEATURE_LEAN]);
    // A raw subscriber with the same features shows what is on the wire.
    let mut raw = Connection::connect_with_features(
        &server.url,
        &server.token("alice"),
        vec![FEATURE_DELTA.into(), FEATURE_LEAN.into()],
    )
    .await
    .unwrap();
    raw.subscribe(DatasetRef::new("alice", &name))
        .await
        .unwrap();

    let w = writer
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let r = reader
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    write_some(&w, 1).await;
    let (sync_count, want) = server.state("alice", &name).await;
    until("the reader to reach the last commit", || {
        r.sync_count() == sync_count
    })
    .await;
    assert_eq!(r.records(), want);
    assert_eq!(r.get("k1"), None, "a removed key is gone");
    assert_eq!(r.get("k3"), None);
    assert_eq!(r.pending(), 0);
    assert!(
        r.record("k0").unwrap().sync_count > 0,
        "lean records are filled in"
    );

    let mut deltas = 0;
    let mut tombstones = 0;
    while let Some(frame) = raw.next_event_timeout(Duration::from_millis(500)).await {
        match frame {
            ServerFrame::Delta {
                base_sync_count,
                sync_count,
                records,
                ..
            } => {
                assert!(base_sync_count < sync_count);
                assert!(
                    records
                        .iter()
                        .all(|r| r.sync_count > 0 && r.last_modified_by == "alice")
                );
                tombstones += records.iter().filter(|r| r.value.is_none()).count();
                deltas += 1;
            }
            other => panic!("expected only delta pushes, got {other:?}"),
        }
    }
    assert!(deltas > 0, "the raw subscriber got delta pushes");
    assert!(tombstones > 0, "a delta carried a tombstone");
    writer.shutdown().await;
    reader.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_client_that_reconnects_resumes_with_since_and_gets_only_the_changes() {
    let server = TestServer::start().await;
    let name = unique("since");
    let cache = tempfile::tempdir().unwrap();
    let writer = server.online(server.client("alice")).await;
    let w = writer
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let first = server
        .online(server.client("alice").cache_dir(cache.path()))
        .await;
    let r1 = first
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    write_some(&w, 1).await;
    let (sync_count, _) = server.state("alice", &name).await;
    until("the reader to catch up", || r1.sync_count() == sync_count).await;
    let held = r1.sync_count();
    first.shutdown().await;

    // Offline meanwhile: more commits, removals among them.
    write_some(&w, 2).await;
    w.remove("k0").unwrap();
    w.sync().await.unwrap();

    // What the server answers a subscribe with `since`: the changes, tombstones included.
    let raw = Connection::connect(&server.url, &server.token("alice"))
        .await
        .unwrap();
    let snapshot = raw
        .subscribe_since(DatasetRef::new("alice", &name), Some(held))
        .await
        .unwrap();
    assert_eq!(snapshot.since, Some(held));
    assert!(snapshot.records.iter().any(|r| r.value.is_none()));
    assert!(snapshot.records.iter().all(|r| r.sync_count > held));

    // A client on the kept cache resumes from it and ends equal to the server.
    let second = server
        .online(server.client("alice").cache_dir(cache.path()))
        .await;
    let r2 = second
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let (sync_count, want) = server.state("alice", &name).await;
    assert_eq!(r2.sync_count(), sync_count);
    assert_eq!(r2.records(), want);
    assert_eq!(r2.get("k0"), None);
    writer.shutdown().await;
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_client_with_features_turned_off_gets_whole_dataset_frames() {
    let server = TestServer::start().await;
    let name = unique("plain");
    let writer = server.online(server.client("alice")).await;
    let reader = server
        .online(server.client("alice").features(Vec::<String>::new()))
        .await;
    assert!(reader.features().is_empty());
    let mut raw = Connection::connect(&server.url, &server.token("alice"))
        .await
        .unwrap();
    assert!(raw.features().is_empty());
    raw.subscribe(DatasetRef::new("alice", &name))
        .await
        .unwrap();
    let w = writer
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let r = reader
        .open(DatasetRef::new("alice", &name), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    write_some(&w, 1).await;
    let (sync_count, want) = server.state("alice", &name).await;
    until("the reader to reach the last commit", || {
        r.sync_count() == sync_count
    })
    .await;
    assert_eq!(r.records(), want);
    let mut pushes = 0;
    while let Some(frame) = raw.next_event_timeout(Duration::from_millis(500)).await {
        assert!(
            matches!(frame, ServerFrame::Dataset { .. }),
            "expected whole frames, got {frame:?}"
        );
        pushes += 1;
    }
    assert!(pushes > 0);
    writer.shutdown().await;
    reader.shutdown().await;
}
