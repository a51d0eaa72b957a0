//! The Rust SDK against a real server: offline writes, reconnect, conflicts resolved by the
//! handler, convergence of two clients, remote delete and revoke notices.

use std::time::Duration;
use tandem_client::{
    ChangeSource, Client, ClientError, ConflictHandler, Connection, Dataset, DatasetEvent,
    Resolution, Status,
};
use tandem_protocol::{Access, DatasetRef};
use tandem_tests::hook::{Hook, Mode, SECRET};
use tandem_tests::proxy::Proxy;
use tandem_tests::{TestServer, wait_until};

const WAIT: Duration = Duration::from_secs(15);

fn client(server: &TestServer, identity: &str, cache: Option<&std::path::Path>) -> Client {
    let mut builder = Client::builder(server.url(), identity)
        .token(server.token(identity))
        .device_id(format!("{identity}-device"))
        .backoff(Duration::from_millis(20), Duration::from_millis(200));
    if let Some(dir) = cache {
        builder = builder.cache_dir(dir);
    }
    builder.start().unwrap()
}

/// Waits until the client has noticed it is no longer online.
async fn wait_offline(client: &Client) {
    let mut status = client.status_changes();
    tokio::time::timeout(WAIT, async {
        while *status.borrow_and_update() == Status::Online {
            status.changed().await.unwrap();
        }
    })
    .await
    .expect("the client noticed it went offline");
}

/// Polls until the dataset holds `key` = `value` (or lacks `key` when `value` is `None`).
async fn wait_value(ds: &Dataset, key: &str, value: Option<&str>) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while ds.get(key).as_deref() != value {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} never became {value:?}; have {:?}",
            ds.records()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// This device's clock in ms since the Unix epoch, as the SDK stamps edits.
fn now_ms() -> i64 {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    i64::try_from(since_epoch.as_millis()).unwrap()
}

async fn next_event(events: &mut tokio::sync::broadcast::Receiver<DatasetEvent>) -> DatasetEvent {
    tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event in time")
        .expect("event channel open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_offline_writes_reach_server_after_it_returns() {
    let mut server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    ds.put("a", "1").unwrap();
    ds.sync().await.unwrap();

    server.kill();
    wait_offline(&alice).await;
    // Offline: reads and writes go on against the cache; sync says offline.
    ds.put("b", "2").unwrap();
    ds.remove("a").unwrap();
    assert_eq!(ds.get("b").as_deref(), Some("2"));
    assert_eq!(ds.pending(), 2);
    assert!(matches!(ds.sync().await, Err(ClientError::Offline)));

    // The cache survives the process: a fresh client over the same directory sees it.
    let again = client(&server, "alice", Some(cache.path()));
    let cached = again
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    assert_eq!(cached.get("b").as_deref(), Some("2"));
    again.shutdown().await;

    server.start_again();
    alice.wait_online(WAIT).await.unwrap();
    // The client syncs pending changes after reconnecting, by itself.
    let deadline = tokio::time::Instant::now() + WAIT;
    while ds.pending() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending never drained"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let conn = server.connect("alice").await;
    let (n, records) = conn.subscribe(DatasetRef::own("notes")).await.unwrap();
    assert_eq!(n, 2);
    let live: Vec<_> = records
        .iter()
        .map(|r| (r.key.as_str(), r.value.as_deref()))
        .collect();
    assert_eq!(live, [("b", Some("2"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_catch_up_after_reconnect_retries_what_the_server_refused_for_now() {
    let mut server = TestServer::start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let mut datasets = Vec::new();
    for i in 0..4 {
        let ds = alice
            .open(DatasetRef::own(format!("d{i}")), ConflictHandler::KeepLocal)
            .await
            .unwrap();
        datasets.push(ds);
    }
    server.kill();
    wait_offline(&alice).await;
    for (i, ds) in datasets.iter().enumerate() {
        ds.put("offline", format!("v{i}")).unwrap();
    }
    // Back with a tight request limit: the reconnect's auth + 4 subscribes + 4 updates do not
    // fit in one burst of 2, so some are refused with the retriable rate_limited.
    server.add_arg("--max-requests-per-second", 2);
    server.start_again();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while datasets.iter().any(|ds| ds.pending() > 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "pending never drained: {:?}",
            datasets.iter().map(Dataset::pending).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, metrics) = tandem_tests::http_get(server.addr, "/metrics").await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tandem_gateway_errors_total{code=\"rate_limited\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(refused > 0, "the catch-up was never refused:\n{metrics}");
    for i in 0..4 {
        // Each check on a connection of its own, under the same limit of 2 per second: its
        // auth and its one read fit in the burst, so it never waits for the limiter.
        let conn = server.connect("alice").await;
        let (n, records) = conn
            .changes(DatasetRef::own(format!("d{i}")), 0)
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert_eq!(records[0].value.as_deref(), Some(format!("v{i}").as_str()));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_a_pending_change_the_server_already_holds_is_done_without_a_sync() {
    let server = TestServer::start();
    let phone = client(&server, "alice", None);
    let laptop = client(&server, "alice", None);
    phone.wait_online(WAIT).await.unwrap();
    laptop.wait_online(WAIT).await.unwrap();
    let p = phone
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    let l = laptop
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    // The same edit on both devices; the phone's reaches the server first.
    p.put("title", "Groceries").unwrap();
    l.put("title", "Groceries").unwrap();
    assert_eq!(l.pending(), 1);
    let out = p.sync().await.unwrap();
    // The push of the phone's commit settles the laptop's identical change.
    let deadline = tokio::time::Instant::now() + WAIT;
    while l.pending() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "still pending");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(l.sync_count(), out.sync_count);
    // Nothing left to send: no second commit.
    l.sync().await.unwrap();
    let conn = server.connect("alice").await;
    let (n, _) = conn.changes(DatasetRef::own("notes"), 0).await.unwrap();
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_heartbeat_notices_a_silent_connection_and_reconnects() {
    let server = TestServer::start();
    let proxy = tandem_tests::proxy::Proxy::start(server.addr).await;
    let c = Client::builder(proxy.url(), "alice")
        .token(server.token("alice"))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .ping_interval(Duration::from_millis(200))
        .request_timeout(Duration::from_millis(800))
        .start()
        .unwrap();
    c.wait_online(WAIT).await.unwrap();
    let ds = c
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    ds.put("before", "1").unwrap();
    ds.sync().await.unwrap();

    // The path goes silent: no close, no RST, nothing. Only the heartbeat can tell.
    proxy.silence_existing();
    wait_offline(&c).await;
    // It reconnects (new connections through the proxy work) and carries on.
    c.wait_online(WAIT).await.unwrap();
    ds.put("after", "2").unwrap();
    tokio::time::timeout(WAIT, ds.sync())
        .await
        .expect("sync after the reconnect")
        .unwrap();
    let conn = server.connect("alice").await;
    let (n, records) = conn.changes(DatasetRef::own("notes"), 0).await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(records.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_two_clients_converge_live() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    let bob = client(&server, "bob", None);
    alice.wait_online(WAIT).await.unwrap();
    bob.wait_online(WAIT).await.unwrap();
    let a = alice
        .open(DatasetRef::own("list"), ConflictHandler::default())
        .await
        .unwrap();
    a.put("milk", "1").unwrap();
    a.sync().await.unwrap();
    server
        .connect("alice")
        .await
        .grant(DatasetRef::own("list"), "bob", Access::Write)
        .await
        .unwrap();
    let b = bob
        .open(DatasetRef::new("alice", "list"), ConflictHandler::default())
        .await
        .unwrap();
    assert_eq!(b.get("milk").as_deref(), Some("1"));

    let mut a_events = a.events();
    b.put("eggs", "12").unwrap();
    b.remove("milk").unwrap();
    b.sync().await.unwrap();
    wait_value(&a, "eggs", Some("12")).await;
    wait_value(&a, "milk", None).await;
    assert!(matches!(
        next_event(&mut a_events).await,
        DatasetEvent::Changed { .. }
    ));
    assert_eq!(a.records(), b.records());
    assert_eq!(a.sync_count(), b.sync_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_conflict_is_resolved_by_the_handler() {
    let server = TestServer::start();
    let owner = client(&server, "alice", None);
    owner.wait_online(WAIT).await.unwrap();
    let ds = DatasetRef::own("doc");
    let a = owner
        .open(ds.clone(), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    for key in ["keep", "take", "merge"] {
        a.put(key, "base").unwrap();
    }
    a.sync().await.unwrap();

    // A second device of the same user edits offline-style: its edits are based on the
    // version it saw, and another device wins the race first.
    let other = client(&server, "alice", None);
    other.wait_online(WAIT).await.unwrap();
    let handler = ConflictHandler::custom(|case| match case.key {
        "keep" => Resolution::KeepLocal,
        "take" => Resolution::TakeRemote,
        _ => Resolution::Merge(Some(format!(
            "{}+{}",
            case.server
                .and_then(|r| r.value.clone())
                .unwrap_or_default(),
            case.local.value.clone().unwrap_or_default()
        ))),
    });
    let b = other.open(ds.clone(), handler).await.unwrap();
    // Hold b's view at the base version: edit locally before a's change reaches it.
    for key in ["keep", "take", "merge"] {
        b.put(key, "from-b").unwrap();
    }
    for key in ["keep", "take", "merge"] {
        a.put(key, "from-a").unwrap();
    }
    a.sync().await.unwrap();
    let edited_at = |key: &str| b.record(key).and_then(|r| r.device_last_modified);
    let (b_keep, b_merge) = (edited_at("keep"), edited_at("merge"));
    // A merge is a new edit on this device: it gets a later device time (as in the JS SDK).
    tokio::time::sleep(Duration::from_millis(5)).await;

    let mut events = b.events();
    let outcome = b.sync().await.unwrap();
    assert_eq!(outcome.conflicts, 3);
    assert_eq!(edited_at("keep"), b_keep);
    assert!(
        edited_at("merge") > b_merge,
        "{:?} {b_merge:?}",
        edited_at("merge")
    );
    assert_eq!(b.get("keep").as_deref(), Some("from-b"));
    assert_eq!(b.get("take").as_deref(), Some("from-a"));
    assert_eq!(b.get("merge").as_deref(), Some("from-a+from-b"));
    let mut resolved = 0;
    while resolved < 3 {
        if let DatasetEvent::Conflict { .. } = next_event(&mut events).await {
            resolved += 1;
        }
    }
    // The server holds the resolutions, and the first device converges to them.
    wait_value(&a, "keep", Some("from-b")).await;
    wait_value(&a, "merge", Some("from-a+from-b")).await;
    assert_eq!(a.get("take").as_deref(), Some("from-a"));
    assert_eq!(b.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_latest_device_time_wins() {
    let server = TestServer::start();
    let one = client(&server, "u", None);
    let two = client(&server, "u", None);
    one.wait_online(WAIT).await.unwrap();
    two.wait_online(WAIT).await.unwrap();
    let a = one
        .open(DatasetRef::own("d"), ConflictHandler::LatestDeviceTime)
        .await
        .unwrap();
    let b = two
        .open(DatasetRef::own("d"), ConflictHandler::LatestDeviceTime)
        .await
        .unwrap();
    b.put("k", "older").unwrap();
    // Device times are in ms: a edits once its clock has passed b's edit.
    let older = b.record("k").and_then(|r| r.device_last_modified).unwrap();
    wait_until(WAIT, "the clock to pass b's edit", || now_ms() > older).await;
    a.put("k", "newer").unwrap();
    a.sync().await.unwrap();
    // b's edit is older than the server's: the server's wins and b's is dropped by the handler.
    b.sync().await.unwrap();
    assert_eq!(b.get("k").as_deref(), Some("newer"));
}

/// Asks the writer thread to commit a newer version of the key and waits until it has.
fn bump(writer: &tokio::sync::mpsc::UnboundedSender<std::sync::mpsc::Sender<()>>) {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    writer.send(done_tx).unwrap();
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the writer committed a newer version");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_unresolvable_conflict_gives_up_after_retries() {
    let server = TestServer::start();
    let c = Client::builder(server.url(), "u")
        .token(server.token("u"))
        .max_sync_retries(2)
        .start()
        .unwrap();
    c.wait_online(WAIT).await.unwrap();
    // A handler that always keeps local against a server that changes underneath every time
    // the handler runs: the handler asks a writer on its own thread and runtime (so blocking
    // here cannot starve it) to commit a newer version of "k" before it answers.
    let (bump_tx, mut bump_rx) =
        tokio::sync::mpsc::unbounded_channel::<std::sync::mpsc::Sender<()>>();
    let (url, token) = (server.url(), server.token("u"));
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let raw = Connection::connect(&url, &token).await.unwrap();
            let mut i = 0u64;
            while let Some(done) = bump_rx.recv().await {
                let (_, records) = raw.changes(DatasetRef::own("hot"), 0).await.unwrap();
                let seen = records
                    .iter()
                    .find(|r| r.key == "k")
                    .map_or(0, |r| r.sync_count);
                raw.update(
                    DatasetRef::own("hot"),
                    None,
                    vec![tandem_protocol::Patch::replace("k", format!("r{i}"), seen)],
                )
                .await
                .unwrap();
                i += 1;
                let _ = done.send(());
            }
        });
    });
    let first_bump = bump_tx.clone();
    let handler = ConflictHandler::custom(move |_| {
        bump(&bump_tx);
        Resolution::KeepLocal
    });
    let ds = c.open(DatasetRef::own("hot"), handler).await.unwrap();
    ds.put("k", "mine").unwrap();
    // A newer server version than the one the client opened with, so the first push conflicts.
    tokio::task::spawn_blocking(move || bump(&first_bump))
        .await
        .unwrap();
    match tokio::time::timeout(WAIT, ds.sync())
        .await
        .expect("sync gives up in time")
    {
        Err(ClientError::Unresolved { keys }) => assert_eq!(keys, ["k"]),
        other => panic!("sync should give up while the key keeps changing: {other:?}"),
    }
    // Nothing local was dropped.
    assert_eq!(ds.get("k").as_deref(), Some("mine"));
    assert_eq!(ds.pending(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_remote_delete_and_revoke_are_noticed() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let ds = DatasetRef::own("shared");
    owner
        .update(
            ds.clone(),
            None,
            vec![tandem_protocol::Patch::replace("x", "1", 0)],
        )
        .await
        .unwrap();
    owner.grant(ds.clone(), "bob", Access::Write).await.unwrap();
    let bob = client(&server, "bob", None);
    bob.wait_online(WAIT).await.unwrap();
    let b = bob
        .open(
            DatasetRef::new("alice", "shared"),
            ConflictHandler::default(),
        )
        .await
        .unwrap();
    assert_eq!(b.get("x").as_deref(), Some("1"));
    let mut events = b.events();
    owner.revoke(ds.clone(), "bob").await.unwrap();
    assert_eq!(next_event(&mut events).await, DatasetEvent::Revoked);

    let mine = bob
        .open(DatasetRef::own("mine"), ConflictHandler::default())
        .await
        .unwrap();
    mine.put("clean", "1").unwrap();
    mine.sync().await.unwrap();
    mine.put("unsynced", "2").unwrap();
    let mut events = mine.events();
    server
        .connect("bob")
        .await
        .delete_dataset(DatasetRef::own("mine"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        DatasetEvent::Deleted { .. }
    ));
    // The clean record went with the dataset; the unsynchronised change was kept.
    assert_eq!(mine.get("clean"), None);
    assert_eq!(mine.get("unsynced").as_deref(), Some("2"));
}

/// `Client::history`, `read_at` and `restore`: the restore reaches an open dataset of
/// another client like any commit, stamped with the restoring client's device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_history_read_at_and_restore() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    let bob = client(&server, "bob", None);
    alice.wait_online(WAIT).await.unwrap();
    bob.wait_online(WAIT).await.unwrap();
    let a = alice
        .open(DatasetRef::own("plan"), ConflictHandler::default())
        .await
        .unwrap();
    a.put("step", "one").unwrap();
    a.sync().await.unwrap();
    a.put("step", "two").unwrap();
    a.sync().await.unwrap();
    server
        .connect("alice")
        .await
        .grant(DatasetRef::own("plan"), "bob", Access::Write)
        .await
        .unwrap();

    let shared = DatasetRef::new("alice", "plan");
    let page = bob.history(shared.clone(), None, Some(10)).await.unwrap();
    assert_eq!(page.sync_count, 2);
    assert_eq!(page.entries.len(), 3, "{page:?}");
    assert_eq!(page.entries[1].device_id.as_deref(), Some("alice-device"));
    let then = bob.read_at(shared.clone(), 1).await.unwrap();
    assert_eq!(then[0].value.as_deref(), Some("one"));

    assert_eq!(bob.restore(shared.clone(), 1).await.unwrap(), 3);
    wait_value(&a, "step", Some("one")).await;
    assert_eq!(a.record("step").unwrap().sync_count, 3);
    let latest = alice.history(DatasetRef::own("plan"), None, Some(1)).await;
    let latest = latest.unwrap();
    assert_eq!(latest.entries[0].actor, "bob");
    assert_eq!(latest.entries[0].device_id.as_deref(), Some("bob-device"));
    assert!(latest.next.is_some());
}

/// A local edit whose offline cache cannot be written says so (it used to answer `Ok`): the
/// edit is kept in memory and still syncs, but would not survive a restart. An empty key is
/// refused as invalid input, not as a cache failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_put_reports_a_cache_it_cannot_write_and_an_empty_key() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::KeepLocal)
        .await
        .unwrap();
    ds.put("a", "1").unwrap();
    assert!(matches!(ds.put("", "x"), Err(ClientError::InvalidInput(_))));

    // The owner's cache folder becomes a file: root ignores permissions, not file types.
    let owner_dir = cache.path().join("alice");
    std::fs::remove_dir_all(&owner_dir).unwrap();
    std::fs::write(&owner_dir, b"in the way").unwrap();
    assert!(matches!(ds.put("b", "2"), Err(ClientError::Cache(_))));
    assert_eq!(ds.get("b").as_deref(), Some("2"));
    ds.sync().await.unwrap();
    let conn = server.connect("alice").await;
    let (_, records) = conn.subscribe(DatasetRef::own("notes")).await.unwrap();
    let live: Vec<_> = records
        .iter()
        .map(|r| (r.key.as_str(), r.value.as_deref()))
        .collect();
    assert_eq!(live, [("a", Some("1")), ("b", Some("2"))]);

    // Once the cache can be written again, so can edits.
    std::fs::remove_file(&owner_dir).unwrap();
    ds.put("c", "3").unwrap();
}

/// A client whose network goes through a proxy that can cut it (see `Proxy::cut`).
async fn client_via_proxy(server: &TestServer, identity: &str) -> (Client, Proxy) {
    let proxy = Proxy::start(server.addr).await;
    let c = Client::builder(proxy.url(), identity)
        .token(server.token(identity))
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .start()
        .unwrap();
    (c, proxy)
}

/// What the server holds of one of `identity`'s datasets, read on a connection of its own.
async fn server_records(server: &TestServer, owner: &str, name: &str) -> Vec<(String, String)> {
    let conn = server.connect(owner).await;
    let (_, records) = conn.subscribe(DatasetRef::own(name)).await.unwrap();
    records
        .into_iter()
        .filter_map(|r| r.value.map(|v| (r.key, v)))
        .collect()
}

/// Issue 14, item 1: one key longer than the server's `max_key_length`, written before the
/// client knew the limit, used to make every later sync of the dataset fail with `too_large`,
/// so the valid key written with it never reached the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_a_key_too_long_for_the_server_does_not_block_the_others() {
    let server = TestServer::builder().arg("--max-key-length", 8).start();
    let (alice, proxy) = client_via_proxy(&server, "alice").await;
    proxy.cut();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("much-too-long", "x").unwrap();
    ds.put("ok", "1").unwrap();
    proxy.restore();
    alice.wait_online(WAIT).await.unwrap();
    let server = &server;
    tandem_tests::eventually(WAIT, "the valid key to reach the server", || async move {
        let held = server_records(server, "alice", "notes").await;
        (held == [("ok".to_owned(), "1".to_owned())]).then_some(())
    })
    .await;
    // The long key is kept locally, still pending, and a later sync goes through.
    assert_eq!(ds.get("much-too-long").as_deref(), Some("x"));
    ds.put("ok", "2").unwrap();
    ds.sync().await.unwrap();
    assert_eq!(ds.pending(), 1);
}

/// Issue 14, item 1: with `--max-patches 3`, four pending keys used to fail with
/// `limit_exceeded` at every sync; the SDK splits the update at the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_more_pending_keys_than_max_patches_sync_in_one_call() {
    let server = TestServer::builder().arg("--max-patches", 3).start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    for key in ["a", "b", "c", "d"] {
        ds.put(key, key).unwrap();
    }
    let out = ds.sync().await.unwrap();
    assert_eq!((out.pushed, out.sync_count, ds.pending()), (4, 2, 0));
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 4);
}

/// Issue 14, item 2: after a remote delete, a sync re-created the dataset without following
/// it again, so later changes from other devices never arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_a_dataset_recreated_after_a_remote_delete_is_followed() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("kept", "clean").unwrap();
    ds.sync().await.unwrap();
    let mut events = ds.events();
    let other = server.connect("alice").await;
    other
        .delete_dataset(DatasetRef::own("notes"))
        .await
        .unwrap();
    assert!(matches!(
        next_event(&mut events).await,
        DatasetEvent::Deleted { .. }
    ));
    ds.put("after", "1").unwrap();
    ds.sync().await.unwrap();
    // Another device writes into the re-created dataset: it arrives live.
    other
        .update(
            DatasetRef::own("notes"),
            None,
            vec![tandem_protocol::Patch::replace("live", "yes", 0)],
        )
        .await
        .unwrap();
    wait_value(&ds, "live", Some("yes")).await;
}

/// Issue 14, item 2: a revoke set a flag that nothing cleared, so after the owner shared the
/// dataset again, opening it again still neither subscribed nor received changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_a_regrant_takes_effect_when_the_dataset_is_opened_again() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let ds = DatasetRef::own("shared");
    owner
        .update(
            ds.clone(),
            None,
            vec![tandem_protocol::Patch::replace("k", "1", 0)],
        )
        .await
        .unwrap();
    owner.grant(ds.clone(), "bob", Access::Write).await.unwrap();
    let bob = client(&server, "bob", None);
    bob.wait_online(WAIT).await.unwrap();
    let theirs = DatasetRef::new("alice", "shared");
    let b = bob
        .open(theirs.clone(), ConflictHandler::default())
        .await
        .unwrap();
    let mut events = b.events();
    owner.revoke(ds.clone(), "bob").await.unwrap();
    assert_eq!(next_event(&mut events).await, DatasetEvent::Revoked);

    owner.grant(ds.clone(), "bob", Access::Write).await.unwrap();
    let b = bob.open(theirs, ConflictHandler::default()).await.unwrap();
    owner
        .update(
            ds.clone(),
            None,
            vec![tandem_protocol::Patch::replace("k", "2", 1)],
        )
        .await
        .unwrap();
    wait_value(&b, "k", Some("2")).await;
    b.put("from-bob", "1").unwrap();
    b.sync().await.unwrap();
    assert_eq!(b.pending(), 0);
}

// --- Issue 14, item 6: the Rust SDK at parity with the JavaScript one ----------------------

/// The next event that `pick` accepts, skipping others.
async fn wait_event<T>(
    events: &mut tokio::sync::broadcast::Receiver<DatasetEvent>,
    mut pick: impl FnMut(DatasetEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(found) = pick(events.recv().await.unwrap()) {
                return found;
            }
        }
    })
    .await
    .expect("the event in time")
}

/// Sharing without dropping to `Connection`: grant, list, revoke and delete on `Client`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_client_grants_lists_revokes_and_deletes() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    let bob = client(&server, "bob", None);
    alice.wait_online(WAIT).await.unwrap();
    bob.wait_online(WAIT).await.unwrap();
    let a = alice
        .open(DatasetRef::own("shared"), ConflictHandler::default())
        .await
        .unwrap();
    a.put("k", "1").unwrap();
    a.sync().await.unwrap();
    alice.grant("shared", "bob", Access::Write).await.unwrap();
    let listed = bob.list_datasets().await.unwrap();
    let row = listed
        .iter()
        .find(|d| d.dataset == DatasetRef::new("alice", "shared"))
        .expect("the shared dataset is listed for bob");
    assert_eq!((row.access, row.records), (Access::Write, 1));
    let b = bob
        .open(
            DatasetRef::new("alice", "shared"),
            ConflictHandler::default(),
        )
        .await
        .unwrap();
    let mut events = b.events();
    alice.revoke("shared", "bob").await.unwrap();
    assert_eq!(next_event(&mut events).await, DatasetEvent::Revoked);
    // Deleting reaches the owner's own open dataset like anyone's.
    let mut mine = a.events();
    alice.delete_dataset("shared").await.unwrap();
    wait_event(&mut mine, |e| {
        matches!(e, DatasetEvent::Deleted { .. }).then_some(())
    })
    .await;
    assert!(alice.list_datasets().await.unwrap().is_empty());
    assert!(matches!(
        alice.grant("no/slash", "bob", Access::Read).await,
        Err(ClientError::InvalidInput(_))
    ));
    alice.shutdown().await;
    assert_eq!(alice.list_datasets().await, Err(ClientError::Offline));
}

/// `Dataset::close`: the server stops pushing, edits through the handle are refused, the
/// pending changes stay (counted by the client) and are sent once the dataset is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_close_stops_following_and_keeps_pending_changes() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("synced", "1").unwrap();
    ds.sync().await.unwrap();
    ds.put("pending", "2").unwrap();
    ds.close().await.unwrap();
    assert!(ds.is_closed());
    assert_eq!(ds.put("x", "y"), Err(ClientError::DatasetClosed));
    assert!(matches!(ds.sync().await, Err(ClientError::DatasetClosed)));
    assert_eq!(
        alice.pending(),
        1,
        "a closed dataset's pending change still counts"
    );
    // Unsubscribed: a change from elsewhere no longer reaches the closed copy.
    let other = server.connect("alice").await;
    other
        .update(
            DatasetRef::own("notes"),
            None,
            vec![tandem_protocol::Patch::replace("synced", "elsewhere", 1)],
        )
        .await
        .unwrap();
    // A reopened handle gets it, proving it was committed; the closed one never did.
    let again = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    assert!(!again.is_closed());
    assert_eq!(
        again.get("pending").as_deref(),
        Some("2"),
        "kept in the cache"
    );
    wait_value(&again, "synced", Some("elsewhere")).await;
    assert_eq!(ds.get("synced").as_deref(), Some("1"));
    // Opening it again sent the pending change (no sync call).
    wait_until(WAIT, "the pending change to be sent", || {
        alice.pending() == 0
    })
    .await;
    let mut stored = server_records(&server, "alice", "notes").await;
    stored.sort();
    assert_eq!(
        stored,
        [
            ("pending".to_owned(), "2".to_owned()),
            ("synced".to_owned(), "elsewhere".to_owned())
        ]
    );
}

/// Pending and synced events: the count as it changes, and what a sync did; each local edit
/// is a local `Changed` event, also one of a key already pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_pending_and_synced_events() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    let mut events = ds.events();
    ds.put("a", "1").unwrap();
    ds.put("b", "2").unwrap();
    ds.put("a", "3").unwrap(); // already pending: the count does not change
    let outcome = ds.sync().await.unwrap();
    let seen: Vec<DatasetEvent> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    let local = |key: &str| DatasetEvent::Changed {
        sync_count: 0,
        keys: vec![key.to_owned()],
        source: ChangeSource::Local,
    };
    assert_eq!(
        seen,
        [
            DatasetEvent::Pending { pending: 1 },
            local("a"),
            DatasetEvent::Pending { pending: 2 },
            local("b"),
            local("a"),
            DatasetEvent::Pending { pending: 0 },
            DatasetEvent::Synced(outcome.clone()),
        ]
    );
    assert_eq!(outcome.pushed, 2);
    // A sync with nothing to send says nothing.
    ds.sync().await.unwrap();
    assert!(events.try_recv().is_err());
}

/// Auto-sync: local edits reach the server without a `sync` call, a burst of them in one
/// update; turned off, they wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_auto_sync_sends_local_edits_by_itself() {
    let server = TestServer::start();
    let alice = Client::builder(server.url(), "alice")
        .token(server.token("alice"))
        .auto_sync(true)
        .auto_sync_delay(Duration::from_millis(200))
        .start()
        .unwrap();
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    assert!(ds.auto_sync());
    for (k, v) in [("a", "1"), ("b", "2"), ("c", "3")] {
        ds.put(k, v).unwrap();
    }
    wait_until(WAIT, "the edits to be sent", || ds.pending() == 0).await;
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 3);
    assert_eq!(
        ds.sync_count(),
        1,
        "debounced: the burst went in one update"
    );
    ds.set_auto_sync(false);
    ds.put("d", "4").unwrap();
    // Nothing sends it now; turning auto-sync on again does.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ds.pending(), 1);
    ds.set_auto_sync(true);
    wait_until(WAIT, "the edit to be sent", || ds.pending() == 0).await;
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 4);
}

/// Record metadata: who wrote a value, when (server time) and from which device, kept in the
/// local record and in its cache file; a local edit is this device's until acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_record_metadata_is_kept_in_the_local_record_and_cache() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("mine", "1").unwrap();
    let local = ds.record("mine").unwrap();
    assert_eq!(local.last_modified, None, "not stamped by the server yet");
    assert_eq!(local.last_modified_by.as_deref(), Some("alice"));
    assert_eq!(local.device_id.as_deref(), Some("alice-device"));
    let before = now_ms();
    ds.sync().await.unwrap();
    let acked = ds.record("mine").unwrap();
    assert!(acked.last_modified.unwrap() >= before - 60_000);
    assert_eq!(acked.device_id.as_deref(), Some("alice-device"));
    // A change from another device arrives with its metadata.
    let phone = server.connect("alice").await;
    phone
        .update(
            DatasetRef::own("notes"),
            Some("alice-phone".into()),
            vec![tandem_protocol::Patch::replace("theirs", "2", 0)],
        )
        .await
        .unwrap();
    wait_value(&ds, "theirs", Some("2")).await;
    let theirs = ds.record("theirs").unwrap();
    assert_eq!(theirs.device_id.as_deref(), Some("alice-phone"));
    assert_eq!(theirs.last_modified_by.as_deref(), Some("alice"));
    assert!(theirs.last_modified.is_some());
    // The background saver writes it to the cache: a restart offline reads it back.
    alice.shutdown().await;
    let offline = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
        .token("unused")
        .cache_dir(cache.path())
        .start()
        .unwrap();
    let cached = offline
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    assert_eq!(cached.record("theirs"), Some(theirs));
    assert_eq!(cached.record("mine"), Some(acked));
}

/// `put_all`: every key checked before any is written; then one write, sent together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_put_all_checks_every_key_first() {
    let server = TestServer::builder().arg("--max-key-length", 8).start();
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    let refused = ds.put_all([("ok", "1"), ("much-too-long", "2")]);
    assert!(
        matches!(refused, Err(ClientError::TooLarge { ref key, .. }) if key == "much-too-long")
    );
    assert!(ds.records().is_empty(), "nothing written");
    assert!(matches!(
        ds.put_all([("ok", "1"), ("", "2")]),
        Err(ClientError::InvalidInput(_))
    ));
    ds.put_all([("a", "1"), ("b", "2"), ("c", "3")]).unwrap();
    assert_eq!(ds.pending(), 3);
    let out = ds.sync().await.unwrap();
    assert_eq!((out.pushed, out.sync_count), (3, 1));
}

/// The sync status follows the connection, uploads, pending changes and errors; `pause`
/// takes the client off the network and `resume` brings it back, sending what is pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_sync_status_and_pause_resume() {
    let server = TestServer::start();
    let alice = client(&server, "alice", None);
    let mut changes = alice.sync_status_changes();
    alice.wait_online(WAIT).await.unwrap();
    let status = alice.sync_status();
    assert!(status.connected);
    assert!(!status.has_synced && status.last_synced_at.is_none());
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    assert!(alice.sync_status().has_synced, "a subscribe put it in step");
    ds.put("a", "1").unwrap();
    assert_eq!(alice.sync_status().pending, 1);
    changes.borrow_and_update();
    ds.sync().await.unwrap();
    assert!(changes.has_changed().unwrap());
    let status = alice.sync_status();
    assert_eq!((status.pending, status.uploading), (0, false));
    assert!(status.last_synced_at.unwrap() >= now_ms() - 60_000);

    alice.pause();
    wait_until(WAIT, "paused", || alice.status() == Status::Paused).await;
    assert!(alice.is_paused());
    assert!(!alice.sync_status().connected);
    ds.put("b", "2").unwrap();
    assert_eq!(ds.sync().await, Err(ClientError::Offline));
    // Still paused a while later: no reconnect on its own.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alice.status(), Status::Paused);
    alice.resume();
    wait_until(WAIT, "the pending edit to be sent", || ds.pending() == 0).await;
    assert!(alice.sync_status().connected);
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 2);

    // A sync the server refuses is the last error, until the next success.
    let bob = client(&server, "bob", None);
    bob.wait_online(WAIT).await.unwrap();
    let theirs = bob
        .open(
            DatasetRef::new("alice", "notes"),
            ConflictHandler::default(),
        )
        .await;
    assert!(theirs.is_err(), "not shared");
    alice.grant("notes", "bob", Access::Read).await.unwrap();
    let theirs = bob
        .open(
            DatasetRef::new("alice", "notes"),
            ConflictHandler::default(),
        )
        .await
        .unwrap();
    theirs.put("x", "1").unwrap();
    let refused = theirs.sync().await.unwrap_err();
    assert_eq!(bob.sync_status().last_error, Some(refused));
    theirs.revert();
    theirs.subscribe().await.unwrap();
    assert_eq!(bob.sync_status().last_error, None);
}

/// `wait_for_pending_writes`: sends what is pending (no sync call, no auto-sync) and waits
/// through a disconnection until the server has acknowledged it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_wait_for_pending_writes_resolves_across_a_reconnect() {
    let server = TestServer::start();
    let (alice, proxy) = client_via_proxy(&server, "alice").await;
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("a", "1").unwrap();
    tokio::time::timeout(WAIT, alice.wait_for_pending_writes())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ds.pending(), 0);
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 1);

    proxy.cut();
    wait_offline(&alice).await;
    ds.put("b", "2").unwrap();
    let flushing = tokio::spawn({
        let alice = alice.clone();
        async move { alice.flush().await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !flushing.is_finished(),
        "nothing can be acknowledged offline"
    );
    proxy.restore();
    tokio::time::timeout(WAIT, flushing)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ds.pending(), 0);
    assert_eq!(server_records(&server, "alice", "notes").await.len(), 2);
    // Nothing pending: it resolves at once; for one dataset too.
    ds.wait_for_pending_writes().await.unwrap();
}

/// The locally cached datasets, changes pending from an earlier run included, and a wipe of
/// one identity's cache directory that refuses while they are pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_cached_datasets_and_wipe_of_one_identity() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    let bob = client(&server, "bob", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    bob.wait_online(WAIT).await.unwrap();
    let a = alice
        .open(DatasetRef::own("a1"), ConflictHandler::default())
        .await
        .unwrap();
    a.put("synced", "1").unwrap();
    a.sync().await.unwrap();
    let b = bob
        .open(DatasetRef::own("b1"), ConflictHandler::default())
        .await
        .unwrap();
    b.put("k", "v").unwrap();
    b.sync().await.unwrap();
    let a2 = alice
        .open(DatasetRef::own("a2"), ConflictHandler::default())
        .await
        .unwrap();
    a2.put("pending", "1").unwrap();
    alice.shutdown().await;

    // A later run: nothing open yet, and still the pending change counts.
    let alice = client(&server, "alice", Some(cache.path()));
    assert_eq!(alice.pending(), 1);
    let cached = alice.cached_datasets().await.unwrap();
    let rows: Vec<_> = cached
        .iter()
        .map(|c| (c.dataset.name.as_str(), c.records, c.pending, c.open))
        .collect();
    assert_eq!(rows, [("a1", 1, 0, false), ("a2", 1, 1, false)]);
    assert_eq!(
        alice.wipe().await,
        Err(ClientError::PendingWrites { pending: 1 })
    );
    assert_eq!(
        alice.cached_datasets().await.unwrap().len(),
        2,
        "nothing deleted"
    );
    let a1 = alice
        .open(DatasetRef::own("a1"), ConflictHandler::default())
        .await
        .unwrap();
    alice.wipe_forced().await.unwrap();
    assert!(a1.is_closed(), "open datasets are closed by a wipe");
    assert_eq!(alice.pending(), 0);
    assert!(alice.cached_datasets().await.unwrap().is_empty());
    let again = alice
        .open(DatasetRef::own("a2"), ConflictHandler::default())
        .await
        .unwrap();
    assert!(
        again.records().is_empty(),
        "the pending change went with the wipe"
    );
    // Bob's cache is untouched.
    assert_eq!(bob.cached_datasets().await.unwrap().len(), 1);
    assert_eq!(bob.pending(), 0);
    // With nothing pending, an unforced wipe goes through.
    bob.wipe().await.unwrap();
    assert!(bob.cached_datasets().await.unwrap().is_empty());
}

/// Auto-sync after a remote delete: what the `KeepAll` policy kept is sent by itself, so the
/// dataset is re-created with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_auto_sync_re_creates_a_deleted_dataset_with_what_its_policy_kept() {
    let server = TestServer::start();
    let alice = Client::builder(server.url(), "alice")
        .token(server.token("alice"))
        .auto_sync(true)
        .on_dataset_deleted(tandem_client::DeletedPolicy::KeepAll)
        .start()
        .unwrap();
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice
        .open(DatasetRef::own("notes"), ConflictHandler::default())
        .await
        .unwrap();
    ds.put("kept", "1").unwrap();
    wait_until(WAIT, "the put to be auto-synced", || ds.pending() == 0).await;
    let mut events = ds.events();
    server
        .connect("alice")
        .await
        .delete_dataset(DatasetRef::own("notes"))
        .await
        .unwrap();
    wait_event(&mut events, |e| {
        matches!(e, DatasetEvent::Deleted { .. }).then_some(())
    })
    .await;
    wait_until(WAIT, "the kept copy to be auto-synced", || {
        ds.pending() == 0
    })
    .await;
    assert_eq!(
        server_records(&server, "alice", "notes").await,
        [("kept".to_owned(), "1".to_owned())]
    );
}

/// Every local edit is a `Changed` event marked local and a new snapshot: `put_all` (one event
/// for its keys), and what `discard` and `revert` drop; the server's versions fetched back
/// afterwards are remote changes. A dataset opened without a handler takes the client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_put_all_discard_and_revert_are_local_changes() {
    let server = TestServer::start();
    let alice = Client::builder(server.url(), "alice")
        .token(server.token("alice"))
        .conflict_handler(ConflictHandler::TakeRemote)
        .start()
        .unwrap();
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice.open(DatasetRef::own("list"), None).await.unwrap();
    assert!(ds.conflict_handler() == ConflictHandler::TakeRemote);
    ds.put("k", "server").unwrap();
    ds.sync().await.unwrap();
    let mut events = ds.events();
    let mut snapshots = ds.snapshots();
    let local = |keys: &[&str]| DatasetEvent::Changed {
        sync_count: 1,
        keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        source: ChangeSource::Local,
    };
    let changes = |events: &mut tokio::sync::broadcast::Receiver<DatasetEvent>| {
        std::iter::from_fn(|| events.try_recv().ok())
            .filter(|e| matches!(e, DatasetEvent::Changed { .. }))
            .collect::<Vec<_>>()
    };

    ds.put_all([("k", "mine"), ("j", "new")]).unwrap();
    assert_eq!(changes(&mut events), [local(&["j", "k"])]);
    let edited = snapshots.borrow_and_update().clone();
    assert_eq!((edited.pending, edited.from_server), (2, false));

    assert!(ds.discard("k"));
    // The discard is told first; the server's version it fetches may already be back.
    let told = changes(&mut events);
    assert_eq!(told.first(), Some(&local(&["k"])));
    assert!(
        told[1..].iter().all(|e| matches!(
            e,
            DatasetEvent::Changed {
                source: ChangeSource::Remote,
                ..
            }
        )),
        "only the fetched version follows: {told:?}"
    );
    assert_eq!(snapshots.borrow_and_update().pending, 1);
    // The server's version of `k` comes back by itself, as a remote change.
    wait_value(&ds, "k", Some("server")).await;
    until_snapshot(&mut snapshots, |s| {
        s.records.get("k").map(String::as_str) == Some("server") && s.from_server
    })
    .await;

    assert_eq!(ds.revert(), ["j"]);
    assert!(
        changes(&mut events).contains(&local(&["j"])),
        "the revert is told"
    );
    let reverted = snapshots.borrow_and_update().clone();
    assert_eq!(
        (
            reverted.pending,
            reverted.records.len(),
            reverted.from_server
        ),
        (0, 1, false)
    );
    alice.shutdown().await;
}

/// Waits until the watched snapshot passes `check`.
async fn until_snapshot(
    snapshots: &mut tokio::sync::watch::Receiver<std::sync::Arc<tandem_client::DatasetSnapshot>>,
    check: impl Fn(&tandem_client::DatasetSnapshot) -> bool,
) {
    tokio::time::timeout(WAIT, snapshots.wait_for(|s| check(s)))
        .await
        .expect("the snapshot in time")
        .unwrap();
}

/// A server whose sync hook the test can make slow (`Mode::Sleep`: 3 s), to hold an update
/// in flight while the test edits, closes or reopens.
async fn hooked_server() -> (TestServer, Hook) {
    let hook = Hook::start().await;
    let server = TestServer::builder()
        .arg("--sync-hook-url", hook.url())
        .arg("--sync-hook-secret", SECRET)
        .arg("--sync-hook-timeout", "10s")
        .start();
    (server, hook)
}

/// Starts `ds.sync()` with the hook asleep and returns once the update is at the hook, so
/// its ack is about 3 s away.
async fn sync_held(hook: &Hook, ds: &Dataset) -> tokio::task::JoinHandle<Result<(), ClientError>> {
    hook.set(Mode::Sleep);
    let calls = hook.calls();
    let sending = {
        let ds = ds.clone();
        tokio::spawn(async move { ds.sync().await.map(drop) })
    };
    wait_until(WAIT, "the update to reach the hook", || {
        hook.calls() > calls
    })
    .await;
    sending
}

/// Review finding 1: a key's edit version restarted at 1 after a discard, so the ack of
/// the update that carried `k=a` (version 1) cleaned the newer `k=b` (version 1 again): it
/// was never sent, and the server kept `a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_an_ack_does_not_clean_an_edit_made_after_a_discard() {
    let (server, hook) = hooked_server().await;
    let alice = client(&server, "alice", None);
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice.open(DatasetRef::own("notes"), None).await.unwrap();
    ds.put("k", "a").unwrap();
    let sending = sync_held(&hook, &ds).await;
    assert!(ds.discard("k"));
    ds.put("k", "b").unwrap();
    sending.await.unwrap().unwrap();
    assert_eq!(ds.pending(), 1, "b was not sent yet: it stays pending");
    assert_eq!(ds.get("k").as_deref(), Some("b"));
    hook.set(Mode::Policy);
    ds.sync().await.unwrap();
    assert_eq!(ds.pending(), 0);
    assert_eq!(
        server_records(&server, "alice", "notes").await,
        [("k".to_owned(), "b".to_owned())]
    );
    alice.shutdown().await;
}

/// Review finding 2: `Client::pending` froze at its value when `close` began; an ack that
/// landed while the close waited for the sync in flight was never counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_pending_counts_an_ack_that_lands_while_closing() {
    let (server, hook) = hooked_server().await;
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice.open(DatasetRef::own("notes"), None).await.unwrap();
    ds.put("k", "a").unwrap();
    assert_eq!(alice.pending(), 1);
    let sending = sync_held(&hook, &ds).await;
    ds.close().await.unwrap();
    sending.await.unwrap().unwrap();
    assert_eq!(alice.pending(), 0, "the ack settled the only change");
    assert_eq!(alice.sync_status().pending, 0);
    alice.shutdown().await;
}

/// Review finding 6, end to end: a dataset opened again while its old handle is still
/// closing (waiting for a sync in flight) gets a new handle with what the close saved. (The
/// subscribe of the reopen settles `k` here by itself; the unit test
/// `test_open_during_a_close_loads_the_closing_handles_final_copy` pins down the ordering.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_reopening_a_closing_dataset_waits_for_its_final_write() {
    let (server, hook) = hooked_server().await;
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    alice.wait_online(WAIT).await.unwrap();
    let ds = alice.open(DatasetRef::own("notes"), None).await.unwrap();
    ds.put("k", "a").unwrap();
    let sending = sync_held(&hook, &ds).await;
    let closing = {
        let ds = ds.clone();
        tokio::spawn(async move { ds.close().await })
    };
    wait_until(WAIT, "the close to begin", || ds.is_closed()).await;
    let again = alice.open(DatasetRef::own("notes"), None).await.unwrap();
    assert_ne!(again, ds, "a new handle");
    let k = again.record("k").unwrap();
    assert!(
        !k.dirty,
        "the ack the closing handle saved is in the new copy: {k:?}"
    );
    assert_eq!(again.pending(), 0);
    closing.await.unwrap().unwrap();
    sending.await.unwrap().unwrap();
    alice.shutdown().await;
}

/// Review finding 5: `wipe` trusted the pending count read when the client started, so
/// changes another client (or run) left in the cache afterwards were wiped unseen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_sdk_wipe_refuses_pending_changes_written_after_the_client_started() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let alice = client(&server, "alice", Some(cache.path()));
    assert_eq!(alice.pending(), 0);
    // Another client over the same directory, never online (so its change stays pending).
    let other = Client::builder("ws://127.0.0.1:1/v1/sync", "alice")
        .token(server.token("alice"))
        .cache_dir(cache.path())
        .backoff(Duration::from_secs(10), Duration::from_secs(10))
        .start()
        .unwrap();
    let ds = other.open(DatasetRef::own("later"), None).await.unwrap();
    ds.put("k", "v").unwrap();
    ds.close().await.unwrap();
    other.shutdown().await;
    assert_eq!(
        alice.wipe().await,
        Err(ClientError::PendingWrites { pending: 1 })
    );
    let cached = alice.cached_datasets().await.unwrap();
    assert_eq!(cached.len(), 1, "nothing deleted");
    assert_eq!(cached[0].pending, 1);
    alice.wipe_forced().await.unwrap();
    assert!(alice.cached_datasets().await.unwrap().is_empty());
}
