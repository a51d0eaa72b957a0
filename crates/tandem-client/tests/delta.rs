//! Opt-in protocol features against the real gateway (SQLite store, loopback socket):
//! `delta` pushes, the `lean` encoding, re-subscribing with `since`, and a client with the
//! features turned off. The same scenarios as clients/js/test/delta.test.mjs.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_client::protocol::{DatasetRef, FEATURE_DELTA, FEATURE_LEAN, ServerFrame};
use tandem_client::{Client, ConflictHandler, Connection, Dataset, DatasetEvent, Resolution};
use tandem_fanout::{Broker, LocalBroker};
use tandem_gateway::{AuthConfig, Gateway, GatewayConfig, Subscribers, Verifier};
use tandem_store::{Limits, SqliteStore, Store};

const SECRET: &[u8] = b"tandem-client-tests-secret-0123456789abcdef";

struct TestServer {
    url: String,
    addr: std::net::SocketAddr,
    gateway: Arc<Gateway>,
    serve: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> TestServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        TestServer::serve(listener, tempfile::tempdir().unwrap())
    }

    /// A server on `addr` over the store in `dir` (another server's, stopped): what a client
    /// sees after the store behind its address was replaced (say, restored from a backup).
    async fn start_at(addr: std::net::SocketAddr, dir: tempfile::TempDir) -> TestServer {
        // The port was just released; retry briefly in case it is not free yet.
        for _ in 0..50 {
            if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
                return TestServer::serve(listener, dir);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("cannot bind {addr} again");
    }

    fn serve(listener: tokio::net::TcpListener, dir: tempfile::TempDir) -> TestServer {
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(dir.path(), Limits::default()).unwrap());
        let subscribers = Subscribers::new(store);
        let broker: Arc<dyn Broker> = Arc::new(LocalBroker::new(subscribers.handler()));
        let verifier = Verifier::new(&AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        })
        .unwrap();
        let config = GatewayConfig::default();
        let unsent = config.max_unsent_socket_bytes;
        let gateway = Gateway::new(config, subscribers, broker, verifier);
        let addr = listener.local_addr().unwrap();
        let app = gateway
            .router()
            .into_make_service_with_connect_info::<tandem_gateway::Peer>();
        let serve = tokio::spawn(async move {
            axum::serve(tandem_gateway::Listener::new(listener, unsent), app)
                .await
                .unwrap();
        });
        TestServer {
            url: format!("ws://{addr}/v1/sync"),
            addr,
            gateway,
            serve,
            _dir: dir,
        }
    }

    /// Stops accepting and closes every session ("going away, reconnect"); returns the
    /// address and the store's directory.
    async fn stop(self) -> (std::net::SocketAddr, tempfile::TempDir) {
        self.serve.abort();
        let _ = self.serve.await;
        assert!(self.gateway.shutdown(Duration::from_secs(5)).await);
        (self.addr, self._dir)
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

/// A scripted peer on a loopback socket for what a real server never sends a client that
/// reads every frame: a `delta` whose base the client lacks. It answers `auth` with `ready`
/// (the features asked for), `subscribe` with a lean snapshot at 3, and `changes` since 4
/// with the changes up to 7; `push` sends frames unasked.
async fn scripted_peer() -> (
    String,
    tokio::sync::mpsc::UnboundedSender<serde_json::Value>,
    Arc<PeerLog>,
) {
    use futures_util::{SinkExt, StreamExt};
    use serde_json::json;
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/v1/sync", listener.local_addr().unwrap());
    let (push_tx, mut push_rx) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let log = Arc::new(PeerLog::default());
    let seen = log.clone();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let ds = json!({"owner": "alice", "name": "list"});
        let rec =
            |key: &str, value: Option<&str>| json!({"key": key, "value": value, "lastModified": 1});
        loop {
            let frame: serde_json::Value = tokio::select! {
                Some(frame) = push_rx.recv() => {
                    ws.send(Message::text(frame.to_string())).await.unwrap();
                    continue;
                }
                message = ws.next() => match message {
                    Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str()).unwrap(),
                    Some(Ok(_)) => continue,
                    _ => return,
                },
            };
            seen.push(frame.clone());
            let id = frame["id"].clone();
            let reply = match frame["type"].as_str().unwrap() {
                "auth" => json!({"type": "ready", "id": id, "identity": "alice", "session": "s-1",
                    "protocol": 1, "expiresAt": 4_102_444_800_000_i64, "features": frame["features"]}),
                "subscribe" => {
                    let mut b = rec("b", Some("2"));
                    b["syncCount"] = json!(2);
                    b["lastModifiedBy"] = json!("bob");
                    json!({"type": "snapshot", "id": id, "dataset": ds, "syncCount": 3,
                        "records": [rec("a", Some("1")), b, rec("c", Some("3"))]})
                }
                "changes" => {
                    assert_eq!(frame["since"], 4);
                    let mut a = rec("a", None);
                    a["syncCount"] = json!(6);
                    json!({"type": "changes", "id": id, "dataset": ds, "syncCount": 7,
                        "records": [a, rec("d", Some("4"))]})
                }
                "ping" => json!({"type": "pong", "id": id}),
                other => panic!("unexpected {other}"),
            };
            ws.send(Message::text(reply.to_string())).await.unwrap();
        }
    });
    (url, push_tx, log)
}

/// Frames the scripted peer received.
#[derive(Default)]
struct PeerLog(std::sync::Mutex<Vec<serde_json::Value>>);

impl PeerLog {
    fn push(&self, frame: serde_json::Value) {
        self.0.lock().unwrap().push(frame);
    }

    fn of_type(&self, t: &str) -> Vec<serde_json::Value> {
        let frames = self.0.lock().unwrap();
        frames.iter().filter(|f| f["type"] == t).cloned().collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delta_whose_base_the_copy_lacks_makes_the_client_fetch_changes() {
    use serde_json::json;
    let (url, push, log) = scripted_peer().await;
    let client = Client::builder(&url, "alice")
        .token("not-checked-by-the-peer")
        .ping_interval(Duration::ZERO)
        .start()
        .unwrap();
    client.wait_online(Duration::from_secs(5)).await.unwrap();
    assert_eq!(log.of_type("auth")[0]["features"], json!(["delta", "lean"]));
    let d = client
        .open(
            DatasetRef::new("alice", "list"),
            ConflictHandler::TakeRemote,
        )
        .await
        .unwrap();
    // The lean snapshot was filled in from the frame.
    assert_eq!(d.sync_count(), 3);
    assert_eq!(d.record("a").unwrap().sync_count, 3);
    assert_eq!(d.record("b").unwrap().sync_count, 2);

    let ds = json!({"owner": "alice", "name": "list"});
    let delta = |base: u64, sync: u64, records: serde_json::Value| json!({"type": "delta", "dataset": ds, "baseSyncCount": base, "syncCount": sync, "records": records});
    // On base: a tombstone removes, keys not listed stay.
    push.send(delta(
        3,
        4,
        json!([{"key": "c", "value": null, "lastModified": 1}]),
    ))
    .unwrap();
    until("the delta at 4", || d.sync_count() == 4).await;
    assert_eq!(d.records().keys().collect::<Vec<_>>(), ["a", "b"]);
    // Old: ignored. A gap (base 6, the copy holds 4): changes since 4, applied.
    push.send(delta(
        2,
        3,
        json!([{"key": "zzz", "value": "old", "lastModified": 1}]),
    ))
    .unwrap();
    push.send(delta(
        6,
        7,
        json!([{"key": "d", "value": "4", "lastModified": 1}]),
    ))
    .unwrap();
    until("the catch-up to 7", || d.sync_count() == 7).await;
    let want: BTreeMap<String, String> = [("b", "2"), ("d", "4")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(d.records(), want);
    assert_eq!(log.of_type("changes").len(), 1);
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_client_ahead_of_a_replaced_store_takes_its_state_and_writes_again() {
    let old = TestServer::start().await;
    let name = unique("restored");
    let dataset = DatasetRef::new("alice", &name);
    // Reconnects to the same address, wherever the server behind it comes from.
    let client = old.online(old.client("alice")).await;
    let ds = client
        .open(dataset.clone(), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    write_some(&ds, 1).await;
    write_some(&ds, 2).await;
    let held = ds.sync_count();
    assert_eq!(held, 6);
    let mut events = ds.events();

    // The store behind the address is replaced by one with fewer commits of the dataset.
    let (addr, _old_store) = old.stop().await;
    ds.put("offline", "new key").unwrap(); // absent there: written as new
    ds.put("k0", "mine").unwrap(); // held there at another version: the handler decides
    let older = TestServer::start().await;
    let w = older.online(older.client("alice")).await;
    let w_ds = w
        .open(dataset.clone(), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    w_ds.put("k0", "restored").unwrap();
    w_ds.put("b", "1").unwrap();
    w_ds.sync().await.unwrap();
    w_ds.put("c", "2").unwrap();
    w_ds.sync().await.unwrap();
    w.shutdown().await;
    let (_, older_store) = older.stop().await;
    let server = TestServer::start_at(addr, older_store).await;
    let other = server.online(server.client("alice")).await;
    let w = other
        .open(dataset.clone(), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let raw = Connection::connect(&server.url, &server.token("alice"))
        .await
        .unwrap();
    let snapshot = raw
        .subscribe_since(dataset.clone(), Some(held))
        .await
        .unwrap();
    // (2, or 3 once the client, reconnecting meanwhile, sent its edits.)
    assert!(
        snapshot.since.is_none() && snapshot.sync_count < held,
        "a since above the dataset's count gets the whole dataset, at a lower count: {snapshot:?}"
    );

    // The client reconnects, takes the server's state, and sends its edits on top of it.
    client.wait_online(Duration::from_secs(10)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let (sync_count, want) = loop {
        let (sync_count, want) = server.state("alice", &name).await;
        if ds.pending() == 0 && ds.sync_count() == sync_count && ds.records() == want {
            break (sync_count, want);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the client to take the new store's state: at {} with {:?}",
            ds.sync_count(),
            ds.records()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sync_count, 3,
        "the two commits there, then the client's edits"
    );
    let expected: BTreeMap<String, String> = [
        ("b", "1"),
        ("c", "2"),
        ("k0", "mine"),
        ("offline", "new key"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(want, expected, "the old copy's other records are gone");
    let mut seen = Vec::new();
    while let Ok(event) = events.try_recv() {
        seen.push(event);
    }
    assert!(
        seen.contains(&DatasetEvent::Conflict {
            key: "k0".into(),
            resolution: Resolution::KeepLocal
        }),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(
            |e| matches!(e, DatasetEvent::Changed { keys, .. } if keys.contains(&"k2".to_owned()))
        ),
        "the dropped records were announced: {seen:?}"
    );

    // Not stuck: pushes from the new store apply, and the client writes again.
    w.put("later", "pushed").unwrap();
    w.sync().await.unwrap();
    until("the push after the reset", || {
        ds.get("later").as_deref() == Some("pushed")
    })
    .await;
    ds.put("again", "written").unwrap();
    assert_eq!(ds.sync().await.unwrap().sync_count, 5);
    let (sync_count, want) = server.state("alice", &name).await;
    assert_eq!((ds.sync_count(), ds.records()), (sync_count, want));
    client.shutdown().await;
    other.shutdown().await;
}
