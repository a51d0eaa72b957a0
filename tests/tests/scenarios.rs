//! The shared scenario list (clients/SCENARIOS.md), Rust side: each test is named by its
//! scenario id and follows the steps written there, against a real `tandem` process (with
//! the default limits, or the small ones of S5), as clients/js/test/scenarios.test.mjs does
//! for the JavaScript SDK. A device goes offline and comes back through a proxy that cuts
//! its network; it reconnects by itself. S5.4's older server is the real one behind a
//! WebSocket proxy that removes `limits` from its `ready` frame.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_client::protocol::{Access, DatasetRef, ErrorCode, LimitCode};
use tandem_client::{
    ChangeSource, Client, ClientBuilder, ClientError, ConflictHandler, Dataset, DatasetEvent,
    DatasetSnapshot, DeletedPolicy, Limits, OnDatasetDeleted, Resolution, Status,
};
use tandem_tests::TestServer;
use tandem_tests::proxy::Proxy;
use tandem_tests::wsproxy::WsProxy;
use tokio::sync::broadcast;

/// "Wait until" (SCENARIOS.md says 5 s; more here for a loaded build machine).
const WAIT: Duration = Duration::from_secs(15);

/// `small`: limits low enough to hit from a test.
fn small_server() -> TestServer {
    TestServer::builder()
        .arg("--max-key-length", 8)
        .arg("--max-patches", 3)
        .arg("--max-records", 8)
        .arg("--max-dataset-bytes", 4096)
        .arg("--max-frame-bytes", 2048)
        .start()
}

/// One device: a client with its own (in-memory) cache, whose network is a proxy.
struct Device {
    client: Client,
    proxy: Proxy,
}

impl Device {
    async fn new(server: &TestServer, identity: &str) -> Device {
        Device::with(server, identity, false, |b| b).await
    }

    /// `started_offline`: the device never reached the server before `come_back`.
    async fn with(
        server: &TestServer,
        identity: &str,
        started_offline: bool,
        configure: impl FnOnce(ClientBuilder) -> ClientBuilder,
    ) -> Device {
        let proxy = Proxy::start(server.addr).await;
        if started_offline {
            proxy.cut();
        }
        let builder = Client::builder(proxy.url(), identity)
            .token(server.token(identity))
            .device_id(format!("{identity}-{}", rand_suffix()))
            .backoff(Duration::from_millis(20), Duration::from_millis(200));
        let client = configure(builder).start().unwrap();
        if !started_offline {
            client.wait_online(WAIT).await.unwrap();
        }
        Device { client, proxy }
    }

    async fn open(&self, owner: &str, name: &str) -> Dataset {
        self.client
            .open(DatasetRef::new(owner, name), ConflictHandler::default())
            .await
            .unwrap()
    }

    /// Drops the connection and fails every reconnect until `come_back`.
    async fn go_offline(&self) {
        self.proxy.cut();
        let mut status = self.client.status_changes();
        tokio::time::timeout(WAIT, async {
            while *status.borrow_and_update() == Status::Online {
                status.changed().await.unwrap();
            }
        })
        .await
        .expect("the device noticed it is offline");
    }

    fn come_back(&self) {
        self.proxy.restore();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    tandem_tests::wait_until(WAIT, what, &mut done).await;
}

fn records(ds: &Dataset) -> Vec<(String, String)> {
    ds.records().into_iter().collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The next event that `pick` accepts, skipping others.
async fn next_event<T>(
    events: &mut broadcast::Receiver<DatasetEvent>,
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

/// The events waiting now, without blocking.
fn drain(events: &mut broadcast::Receiver<DatasetEvent>) -> Vec<DatasetEvent> {
    std::iter::from_fn(|| events.try_recv().ok()).collect()
}

// --- S1 offline edits ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_1_offline_edits_are_kept_shown_and_sent() {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let d = a.open("alice", "list").await;
    a.go_offline().await;
    d.put("milk", "1").unwrap();
    d.put("eggs", "12").unwrap();
    d.remove("eggs").unwrap();
    assert_eq!(records(&d), pairs(&[("milk", "1")]));
    assert_eq!(d.pending(), 2, "milk, and the removal of eggs");
    a.come_back();
    until("the offline edits to be sent", || d.pending() == 0).await;
    let b = Device::new(&server, "alice").await;
    let o = b.open("alice", "list").await;
    assert_eq!(records(&o), pairs(&[("milk", "1")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s1_2_editing_or_removing_a_key_that_is_already_pending_notifies() {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let d = a.open("alice", "list").await;
    a.go_offline().await;
    d.put("item", "a").unwrap();
    assert_eq!(d.pending(), 1);
    let mut events = d.events();
    let mut snapshots = d.snapshots();
    let before = snapshots.borrow_and_update().clone();
    assert_eq!(before.records.get("item").map(String::as_str), Some("a"));

    d.put("item", "b").unwrap(); // already pending
    assert!(
        snapshots.has_changed().unwrap(),
        "a new snapshot for the edit"
    );
    let edited = snapshots.borrow_and_update().clone();
    assert_eq!(edited.records.get("item").map(String::as_str), Some("b"));
    d.remove("item").unwrap(); // already pending
    let changes: Vec<(ChangeSource, Vec<String>)> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            DatasetEvent::Changed { keys, source, .. } => Some((source, keys)),
            _ => None,
        })
        .collect();
    let item = vec!["item".to_owned()];
    assert_eq!(
        changes,
        [
            (ChangeSource::Local, item.clone()),
            (ChangeSource::Local, item)
        ],
        "one local change notification per write"
    );
    assert!(
        snapshots.has_changed().unwrap(),
        "a new snapshot for the removal"
    );
    let last = snapshots.borrow_and_update().clone();
    assert!(
        !last.records.contains_key("item"),
        "the removed pending item is gone from the snapshot at once"
    );
    assert!(last.has_pending_writes);
    assert!(!last.from_server);
    assert!(before.version < edited.version && edited.version < last.version);

    // Back online the removal is sent (the server never had the key) and it stays gone.
    a.come_back();
    until("the removal to settle", || d.pending() == 0).await;
    assert!(d.records().is_empty());
    until("a snapshot without pending writes", || {
        !d.snapshot().has_pending_writes
    })
    .await;
    assert!(d.snapshot().records.is_empty());
}

// --- S2 conflicts ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s2_1_both_sides_edit_one_key_offline_the_later_edit_wins_everywhere() {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let b = Device::new(&server, "alice").await;
    let da = a.open("alice", "doc").await;
    let db = b.open("alice", "doc").await;
    da.put("title", "v0").unwrap();
    da.sync().await.unwrap();
    until("b to see v0", || db.get("title").as_deref() == Some("v0")).await;
    a.go_offline().await;
    b.go_offline().await;
    da.put("title", "from-a").unwrap();
    let a_edit = da.record("title").unwrap().device_last_modified.unwrap();
    // Device clocks must differ for the latest device time to decide.
    until("the clock to pass a's edit", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            > a_edit + 5
    })
    .await;
    db.put("title", "from-b").unwrap();
    a.come_back();
    until("a to sync", || da.pending() == 0).await;
    let mut events = db.events();
    b.come_back();
    let (key, resolution) = next_event(&mut events, |e| match e {
        DatasetEvent::Conflict { key, resolution } => Some((key, resolution)),
        _ => None,
    })
    .await;
    assert_eq!(key, "title");
    assert_eq!(resolution, Resolution::KeepLocal, "b edited later");
    until("both to converge on from-b", || {
        db.pending() == 0 && da.get("title").as_deref() == Some("from-b")
    })
    .await;
    assert_eq!(db.get("title").as_deref(), Some("from-b"));
}

// --- S3 delete and re-create -----------------------------------------------------------------

/// Device 1 with alice's dataset open and one synced record; device 2 about to delete it.
async fn deleted_underneath(
    server: &TestServer,
    policy: OnDatasetDeleted,
) -> (Device, Dataset, Device) {
    let one = Device::with(server, "alice", false, |b| b.on_dataset_deleted(policy)).await;
    let d = one.open("alice", "list").await;
    d.put("kept", "clean").unwrap();
    d.sync().await.unwrap();
    let two = Device::new(server, "alice").await;
    (one, d, two)
}

async fn delete(server: &TestServer, name: &str) {
    server
        .connect("alice")
        .await
        .delete_dataset(DatasetRef::own(name))
        .await
        .unwrap();
}

async fn deleted_event(events: &mut broadcast::Receiver<DatasetEvent>) -> DeletedPolicy {
    next_event(events, |e| match e {
        DatasetEvent::Deleted { policy, .. } => Some(policy),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_1_a_put_after_the_delete_with_auto_sync_re_creates_the_dataset() {
    let server = TestServer::start();
    let one = Device::with(&server, "alice", false, |b| b.auto_sync(true)).await;
    let d = one.open("alice", "list").await;
    d.put("kept", "clean").unwrap();
    until("the first put to be auto-synced", || d.pending() == 0).await;
    let two = Device::new(&server, "alice").await;
    let mut events = d.events();
    delete(&server, "list").await;
    assert_eq!(deleted_event(&mut events).await, DeletedPolicy::KeepPending);
    assert_eq!(d.get("kept"), None);
    d.put("after", "1").unwrap();
    until("the put after the delete to be auto-synced", || {
        d.pending() == 0
    })
    .await;
    let o = two.open("alice", "list").await;
    until("device 2 to read it", || {
        o.get("after").as_deref() == Some("1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_2_a_put_after_the_delete_made_offline_is_sent_by_the_reconnect_catch_up() {
    let server = TestServer::start();
    let (one, d, two) = deleted_underneath(&server, OnDatasetDeleted::default()).await;
    let mut events = d.events();
    delete(&server, "list").await;
    assert_eq!(deleted_event(&mut events).await, DeletedPolicy::KeepPending);
    assert_eq!(
        d.get("kept"),
        None,
        "the clean record went with the dataset"
    );
    one.go_offline().await;
    d.put("after", "2").unwrap();
    one.come_back();
    until("the put after the delete to be sent", || d.pending() == 0).await;
    let o = two.open("alice", "list").await;
    until("device 2 to read it", || {
        o.get("after").as_deref() == Some("2")
    })
    .await;
    // And it is followed again: a change from elsewhere arrives live.
    o.put("live", "yes").unwrap();
    o.sync().await.unwrap();
    until("the re-created dataset to be followed", || {
        d.get("live").as_deref() == Some("yes")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_3_policy_drop_drops_the_local_data_pending_writes_included() {
    let server = TestServer::start();
    let (_one, d, two) = deleted_underneath(&server, DeletedPolicy::Drop.into()).await;
    d.put("unsynced", "x").unwrap();
    let mut events = d.events();
    delete(&server, "list").await;
    assert_eq!(deleted_event(&mut events).await, DeletedPolicy::Drop);
    assert!(d.records().is_empty());
    assert_eq!(d.pending(), 0);
    // Still followed: a re-creation elsewhere arrives.
    let o = two.open("alice", "list").await;
    o.put("new", "1").unwrap();
    o.sync().await.unwrap();
    until("the re-creation to arrive", || {
        d.get("new").as_deref() == Some("1")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_4_policy_keep_all_chosen_by_a_callback_keeps_the_whole_copy_as_a_new_dataset() {
    let server = TestServer::start();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    let policy = OnDatasetDeleted::custom(move |dataset, sync_count| {
        seen.lock().unwrap().push((dataset.clone(), sync_count));
        DeletedPolicy::KeepAll
    });
    let (_one, d, two) = deleted_underneath(&server, policy).await;
    d.put("unsynced", "x").unwrap();
    let mut events = d.events();
    delete(&server, "list").await;
    assert_eq!(deleted_event(&mut events).await, DeletedPolicy::KeepAll);
    {
        let calls = calls.lock().unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, DatasetRef::new("alice", "list"));
        assert!(calls[0].1 > 0, "the delete's sync count");
    }
    assert_eq!(records(&d), pairs(&[("kept", "clean"), ("unsynced", "x")]));
    assert_eq!(d.pending(), 2, "every record is a pending write now");
    d.sync().await.unwrap();
    let o = two.open("alice", "list").await;
    until("device 2 to read the re-created copy", || {
        o.records().len() == 2
    })
    .await;
}

// --- S4 revoke and re-grant ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4_1_a_revoke_stops_syncing_and_keeps_local_edits_a_regrant_lets_them_through() {
    let server = TestServer::start();
    let alice = Device::new(&server, "alice").await;
    let bob = Device::new(&server, "bob").await;
    let a = alice.open("alice", "shared").await;
    a.put("k", "1").unwrap();
    a.sync().await.unwrap();
    let owner = server.connect("alice").await;
    let ds = DatasetRef::own("shared");
    owner.grant(ds.clone(), "bob", Access::Write).await.unwrap();
    let b = bob.open("alice", "shared").await;
    let mut events = b.events();
    owner.revoke(ds.clone(), "bob").await.unwrap();
    next_event(&mut events, |e| (e == DatasetEvent::Revoked).then_some(())).await;
    b.put("k", "bob").unwrap();
    assert!(matches!(b.sync().await, Err(ClientError::Revoked)));
    assert_eq!(b.pending(), 1);
    assert_eq!(b.get("k").as_deref(), Some("bob"));
    owner.grant(ds, "bob", Access::Write).await.unwrap();
    b.subscribe().await.unwrap();
    assert!(!b.is_revoked());
    b.sync().await.unwrap();
    assert_eq!(b.pending(), 0);
    until("alice to see bob's edit", || {
        a.get("k").as_deref() == Some("bob")
    })
    .await;
}

// --- S5 server limits ------------------------------------------------------------------------

fn too_large(result: Result<(), ClientError>) -> (String, LimitCode, u64) {
    match result {
        Err(e @ ClientError::TooLarge { .. }) => {
            assert_eq!(e.code(), Some(ErrorCode::TooLarge));
            let ClientError::TooLarge {
                key, limit, max, ..
            } = e
            else {
                unreachable!()
            };
            (key, limit, max)
        }
        other => panic!("expected too_large, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_1_a_key_or_value_over_the_limits_is_refused_before_it_is_queued() {
    let server = small_server();
    let a = Device::new(&server, "alice").await;
    let limits = a.client.limits();
    assert_eq!(limits.max_key_length, Some(8));
    assert_eq!(limits.max_patches, Some(3));
    let d = a.open("alice", "d").await;
    assert_eq!(
        too_large(d.put("123456789", "x")),
        ("123456789".to_owned(), LimitCode::MaxKeyLength, 8)
    );
    let (_, limit, max) = too_large(d.put("big", "x".repeat(5000)));
    assert_eq!((limit, max), (LimitCode::MaxDatasetBytes, 4096));
    assert_eq!(d.pending(), 0, "nothing was queued");
    assert_eq!(d.get("123456789"), None);
    // Counted in Unicode scalar values, as the server counts.
    d.put("😀".repeat(8), "ok").unwrap();
    d.sync().await.unwrap();
    assert_eq!(d.pending(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_2_queued_before_the_limits_were_known_set_aside_once_blocks_nothing() {
    let server = small_server();
    let a = Device::with(&server, "alice", true, |b| b).await;
    let d = a.open("alice", "d").await;
    d.put("much-too-long-1", "x").unwrap();
    d.put("much-too-long-2", "y").unwrap();
    d.put("ok", "1").unwrap();
    let mut events = d.events();
    a.come_back();
    until("the valid key to sync", || {
        d.record("ok").is_some_and(|r| !r.dirty)
    })
    .await;
    let mut reported = Vec::new();
    while reported.len() < 2 {
        let (key, why) = next_event(&mut events, |e| match e {
            DatasetEvent::SetAside { key, reason } => Some((key, reason)),
            _ => None,
        })
        .await;
        reported.push((key, why.code, why.limit));
    }
    reported.sort_by(|a, b| a.0.cmp(&b.0));
    let long = |key: &str| {
        (
            key.to_owned(),
            ErrorCode::TooLarge,
            Some(LimitCode::MaxKeyLength),
        )
    };
    assert_eq!(reported, [long("much-too-long-1"), long("much-too-long-2")]);
    let aside: Vec<String> = d.set_aside().into_iter().map(|(k, _)| k).collect();
    assert_eq!(aside, ["much-too-long-1", "much-too-long-2"]);
    assert_eq!(d.pending(), 2, "set aside, not dropped");
    assert_eq!(d.get("much-too-long-1").as_deref(), Some("x"));
    // Later syncs go on, without reporting them again.
    d.put("ok", "2").unwrap();
    let out = d.sync().await.unwrap();
    assert_eq!(out.pushed, 1);
    assert_eq!(out.set_aside, ["much-too-long-1", "much-too-long-2"]);
    let again = drain(&mut events);
    assert!(
        !again
            .iter()
            .any(|e| matches!(e, DatasetEvent::SetAside { .. })),
        "reported once: {again:?}"
    );
    // Removing a key the server cannot have drops the local change; discard drops the other.
    d.remove("much-too-long-1").unwrap();
    assert!(d.discard("much-too-long-2"));
    assert_eq!(d.pending(), 0);
    assert!(d.set_aside().is_empty());
    assert_eq!(records(&d), pairs(&[("ok", "2")]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_3_more_pending_keys_than_max_patches_one_sync_sends_them_all() {
    let server = small_server();
    let a = Device::new(&server, "alice").await;
    let d = a.open("alice", "d").await;
    for k in ["a", "b", "c", "d", "e", "f", "g"] {
        d.put(k, k).unwrap();
    }
    let out = d.sync().await.unwrap();
    assert_eq!(out.pushed, 7);
    assert_eq!(d.pending(), 0);
    assert_eq!(out.sync_count, 3, "three updates: 3 + 3 + 1 patches");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_4_max_patches_learnt_from_the_error() {
    let server = small_server();
    // As an older server: its `ready` does not announce `limits`.
    let older = WsProxy::without_ready_limits(server.addr).await;
    let client = Client::builder(older.url(), "alice")
        .token(server.token("alice"))
        .device_id(format!("alice-{}", rand_suffix()))
        .start()
        .unwrap();
    client.wait_online(WAIT).await.unwrap();
    assert_eq!(client.limits(), Limits::default(), "none announced");
    assert_eq!(client.limits().max_patches, None);
    let d = client
        .open(DatasetRef::new("alice", "d"), ConflictHandler::default())
        .await
        .unwrap();
    for k in ["a", "b", "c", "d"] {
        d.put(k, k).unwrap();
    }
    let out = d.sync().await.unwrap();
    assert_eq!(out.pushed, 4);
    assert_eq!(d.pending(), 0);
    assert_eq!(
        client.limits().max_patches,
        Some(3),
        "learnt from the error's max"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_5_refused_by_the_server_for_good_set_aside_the_rest_commits() {
    let server = small_server();
    let a = Device::new(&server, "alice").await;
    let d = a.open("alice", "d").await;
    for k in ["r1", "r2", "r3", "r4", "r5", "r6", "r7"] {
        d.put(k, "1").unwrap();
    }
    d.sync().await.unwrap();
    let mut events = d.events();
    d.put("r8", "1").unwrap(); // fits: the 8th record
    d.put("r9", "1").unwrap(); // over max_records
    d.put("r1", "2").unwrap(); // an edit: fits
    let out = d.sync().await.unwrap();
    assert_eq!(out.pushed, 2);
    let aside: Vec<_> = d
        .set_aside()
        .into_iter()
        .map(|(k, why)| (k, why.code, why.limit))
        .collect();
    assert_eq!(
        aside,
        [(
            "r9".to_owned(),
            ErrorCode::LimitExceeded,
            Some(LimitCode::MaxRecords)
        )]
    );
    let reported: Vec<_> = drain(&mut events)
        .into_iter()
        .filter_map(|e| match e {
            DatasetEvent::SetAside { key, reason } => Some((key, reason.code)),
            _ => None,
        })
        .collect();
    assert_eq!(reported, [("r9".to_owned(), ErrorCode::LimitExceeded)]);
    assert!(!d.record("r1").unwrap().dirty);
    assert!(!d.record("r8").unwrap().dirty);
    // A new edit of a set-aside key is tried again (after making room it fits).
    d.remove("r2").unwrap();
    d.sync().await.unwrap();
    d.put("r9", "2").unwrap();
    d.sync().await.unwrap();
    assert!(!d.record("r9").unwrap().dirty);
    // revert drops every pending local change, set aside or not.
    d.put("r10", "1").unwrap();
    d.sync().await.unwrap();
    let aside: Vec<String> = d.set_aside().into_iter().map(|(k, _)| k).collect();
    assert_eq!(aside, ["r10"]);
    d.put("r3", "local only").unwrap();
    assert_eq!(d.revert(), ["r10", "r3"]);
    assert_eq!(d.pending(), 0);
    until("the server's value of r3 to come back", || {
        d.get("r3").as_deref() == Some("1")
    })
    .await;
    assert_eq!(d.get("r10"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s5_6_changes_larger_together_than_max_frame_bytes_go_in_several_updates() {
    let server = small_server();
    let a = Device::new(&server, "alice").await;
    let d = a.open("alice", "d").await;
    // Alone each fits in a frame and the three fit in the dataset; two do not fit in one frame.
    for k in ["a", "b", "c"] {
        d.put(k, k.repeat(1000)).unwrap();
    }
    let out = d.sync().await.unwrap();
    assert_eq!(out.pushed, 3);
    assert_eq!(out.sync_count, 3, "one update per change");
    assert_eq!(d.pending(), 0);
    assert_eq!(
        a.client.status(),
        Status::Online,
        "no frame too large closed the connection"
    );
    assert_eq!(a.client.limits().max_frame_bytes, Some(2048));
    let (_, limit, max) = too_large(d.put("d", "d".repeat(2100)));
    assert_eq!((limit, max), (LimitCode::MaxFrameBytes, 2048));
}

// --- S6 sign-out with pending writes --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_1_pending_writes_of_closed_datasets_still_count() {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let d1 = a.open("alice", "d1").await;
    let d2 = a.open("alice", "d2").await;
    d1.put("k", "1").unwrap();
    d2.put("k", "2").unwrap();
    d1.close().await.unwrap();
    assert_eq!(a.client.pending(), 2);
    assert_eq!(a.client.sync_status().pending, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s6_2_wiping_one_identitys_local_data_refuses_while_writes_are_pending() {
    let server = TestServer::start();
    let cache = tempfile::tempdir().unwrap();
    let a = Device::with(&server, "alice", false, |b| b.cache_dir(cache.path())).await;
    let other = Device::with(&server, "bob", false, |b| b.cache_dir(cache.path())).await;
    let theirs = other.open("bob", "d").await;
    theirs.put("k", "bob's").unwrap();
    theirs.sync().await.unwrap();
    let d = a.open("alice", "d").await;
    d.put("synced", "1").unwrap();
    d.sync().await.unwrap();
    a.go_offline().await;
    d.put("pending", "1").unwrap();
    // Refused: names the pending count, deletes nothing.
    assert_eq!(
        a.client.wipe().await,
        Err(ClientError::PendingWrites { pending: 1 })
    );
    assert!(!d.is_closed());
    assert_eq!(d.get("pending").as_deref(), Some("1"));
    assert_eq!(a.client.cached_datasets().await.unwrap().len(), 1);
    // Forced: every cached dataset of alice goes, bob's stays.
    a.client.wipe_forced().await.unwrap();
    assert_eq!(a.client.pending(), 0);
    let reopened = a.open("alice", "d").await;
    assert!(reopened.records().is_empty());
    assert!(
        a.client
            .cached_datasets()
            .await
            .unwrap()
            .iter()
            .all(|c| c.records == 0)
    );
    let bobs = other.client.cached_datasets().await.unwrap();
    assert_eq!(bobs.len(), 1);
    assert_eq!(bobs[0].records, 1);
    // Nothing pending: an unforced wipe goes through.
    reopened.close().await.unwrap();
    a.client.wipe().await.unwrap();
    assert!(a.client.cached_datasets().await.unwrap().is_empty());
}

// --- Handles and listeners ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_snapshots_one_stable_snapshot_per_version_for_local_and_remote_changes() {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let other = Device::new(&server, "alice").await;
    let d = a.open("alice", "list").await;
    let o = other.open("alice", "list").await;
    let seen: Arc<Mutex<Vec<Arc<DatasetSnapshot>>>> = Arc::default();
    let listener = {
        let seen = seen.clone();
        d.on_snapshot(move |s| seen.lock().unwrap().push(s.clone()))
    };
    let last = || seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "called at once with the current snapshot"
    );
    assert!(
        Arc::ptr_eq(&d.snapshot(), &d.snapshot()),
        "the same object while nothing changed"
    );

    d.put("local", "1").unwrap();
    until("the local edit", || {
        last().records.get("local").map(String::as_str) == Some("1")
    })
    .await;
    assert_eq!(
        (last().has_pending_writes, last().from_server),
        (true, false)
    );

    d.sync().await.unwrap();
    until("the ack", || !last().has_pending_writes).await;
    assert!(last().from_server);

    o.put("remote", "1").unwrap();
    o.sync().await.unwrap();
    until("the remote change", || {
        last().records.get("remote").map(String::as_str) == Some("1")
    })
    .await;
    assert!(last().from_server);
    assert!(!last().has_pending_writes);

    let versions: Vec<u64> = seen.lock().unwrap().iter().map(|s| s.version).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "strictly higher versions: {versions:?}"
    );
    assert!(
        Arc::ptr_eq(&d.snapshot(), &last()),
        "the current snapshot is the last one told"
    );

    listener.stop();
    let told = seen.lock().unwrap().len();
    d.put("after-stop", "1").unwrap();
    until("the change to be in the snapshot", || {
        d.snapshot().records.contains_key("after-stop")
    })
    .await;
    // Give a listener that was not stopped the time to be called.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(seen.lock().unwrap().len(), told, "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_a_second_open_with_another_conflict_handler_is_refused_set_conflict_handler_replaces_it()
 {
    let server = TestServer::start();
    let a = Device::new(&server, "alice").await;
    let b = Device::new(&server, "alice").await;
    let doc = || DatasetRef::own("doc");
    let mine = ConflictHandler::custom(|_| Resolution::KeepLocal);
    let d = a.client.open(doc(), mine.clone()).await.unwrap();
    assert_eq!(
        a.client.open(doc(), None).await.unwrap(),
        d,
        "no handler named: the same handle"
    );
    assert_eq!(
        a.client.open(doc(), mine.clone()).await.unwrap(),
        d,
        "the same handler: the same handle"
    );
    for other in [
        ConflictHandler::TakeRemote,
        ConflictHandler::custom(|_| Resolution::KeepLocal),
    ] {
        let refused = a.client.open(doc(), other).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::BadRequest), "{refused}");
        assert!(
            matches!(&refused, ClientError::OtherConflictHandler { owner, name } if owner == "alice" && name == "doc"),
            "{refused:?}"
        );
        assert!(refused.to_string().contains("conflict handler"));
    }
    assert!(
        d.conflict_handler() == mine,
        "the refused open changed nothing"
    );

    d.set_conflict_handler(ConflictHandler::TakeRemote);
    assert_eq!(
        a.client
            .open(doc(), ConflictHandler::TakeRemote)
            .await
            .unwrap(),
        d
    );
    // The replacement is the one that decides, for every handle.
    d.put("k", "base").unwrap();
    d.sync().await.unwrap();
    let db = b.open("alice", "doc").await;
    until("b to see base", || db.get("k").as_deref() == Some("base")).await;
    a.go_offline().await;
    db.put("k", "theirs").unwrap();
    db.sync().await.unwrap();
    d.put("k", "mine").unwrap();
    let mut events = d.events();
    a.come_back();
    let resolution = next_event(&mut events, |e| match e {
        DatasetEvent::Conflict { resolution, .. } => Some(resolution),
        _ => None,
    })
    .await;
    assert_eq!(resolution, Resolution::TakeRemote);
    until("a to take b's value", || {
        d.pending() == 0 && d.get("k").as_deref() == Some("theirs")
    })
    .await;

    // A closed handle is gone: opening again with any handler makes a new one.
    d.close().await.unwrap();
    let reopened = a.client.open(doc(), mine.clone()).await.unwrap();
    assert_ne!(reopened, d);
    assert!(reopened.conflict_handler() == mine);
}
