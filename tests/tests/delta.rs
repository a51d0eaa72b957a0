//! Lean pushes against a real node: `delta` frames for subscribers that opt in, the lean
//! record encoding, merged deltas for a slow reader, resuming a subscription with `since`,
//! the writer's ack ahead of its own push, and a slow reader that still reads kept open.

use std::collections::BTreeMap;
use std::time::Duration;
use tandem_client::{Connection, UpdateResult};
use tandem_protocol::{Access, ClientFrame, DatasetRef, Patch, Record, RequestId, ServerFrame};
use tandem_tests::TestServer;
use tandem_tests::raw::RawSocket;

const FEATURES: &[&str] = &["delta", "lean"];

fn doc() -> DatasetRef {
    DatasetRef::new("alice", "doc")
}

async fn commit(conn: &Connection, patches: Vec<Patch>) -> u64 {
    match conn
        .update(DatasetRef::own("doc"), None, patches)
        .await
        .unwrap()
    {
        UpdateResult::Committed { sync_count, .. } => sync_count,
        other => panic!("{other:?}"),
    }
}

/// Alice's `doc` with 20 records of ~50 bytes (about 1 KB), shared with bob for reading.
async fn twenty_records(server: &TestServer) -> (Connection, u64) {
    let alice = server.connect("alice").await;
    let patches = (0..20)
        .map(|i| {
            Patch::replace(
                format!("item{i:02}"),
                format!("{i:02}-{}", "v".repeat(47)),
                0,
            )
        })
        .collect();
    let n = commit(&alice, patches).await;
    alice
        .grant(DatasetRef::own("doc"), "bob", Access::Read)
        .await
        .unwrap();
    (alice, n)
}

async fn send_subscribe(raw: &mut RawSocket, id: u64, delta: Option<bool>, since: Option<u64>) {
    let frame = ClientFrame::Subscribe {
        id: RequestId::Num(id),
        dataset: doc(),
        delta,
        since,
    };
    raw.send(0x1, frame.to_json().as_bytes()).await;
}

/// The reply to a `subscribe`, past any whole pushes that came first: a commit acknowledged
/// just before can still be in its fan-out when the subscription registers (the ack goes
/// first), and such a push is no newer than the reply (a newer one is sent again after it).
async fn recv_reply(raw: &mut RawSocket) -> ServerFrame {
    loop {
        match raw.recv_frame().await {
            ServerFrame::Dataset { .. } => continue,
            frame => return frame,
        }
    }
}

/// A client's copy of a dataset, kept the way the protocol says.
#[derive(Debug, Default, PartialEq)]
struct Copy {
    sync_count: u64,
    records: BTreeMap<String, String>,
}

impl Copy {
    fn whole(&mut self, sync_count: u64, records: Vec<Record>) {
        if sync_count > self.sync_count {
            self.sync_count = sync_count;
            self.records = records
                .into_iter()
                .filter_map(|r| Some((r.key, r.value?)))
                .collect();
        }
    }

    fn changes(&mut self, sync_count: u64, records: Vec<Record>) {
        for r in records {
            match r.value {
                Some(v) => self.records.insert(r.key, v),
                None => self.records.remove(&r.key),
            };
        }
        self.sync_count = sync_count;
    }

    /// Applies any push; a delta must sit on exactly what the copy holds.
    fn apply(&mut self, frame: ServerFrame) {
        match frame {
            ServerFrame::Dataset {
                sync_count,
                records,
                ..
            } => self.whole(sync_count, records),
            ServerFrame::Delta {
                base_sync_count,
                sync_count,
                records,
                ..
            } => {
                assert_eq!(base_sync_count, self.sync_count, "a delta off its base");
                self.changes(sync_count, records);
            }
            other => panic!("not a push: {other:?}"),
        }
    }
}

/// What the store holds now, through a fresh full-encoding subscription.
async fn server_copy(server: &TestServer) -> Copy {
    let conn = server.connect("bob").await;
    let (sync_count, records) = conn.subscribe(doc()).await.unwrap();
    let mut copy = Copy::default();
    copy.whole(sync_count, records);
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delta_subscriber_gets_only_what_a_commit_changed() {
    let server = TestServer::start();
    let (alice, first) = twenty_records(&server).await;
    let (mut bob, features) = RawSocket::with_features(&server, "bob", FEATURES).await;
    assert_eq!(features, ["delta", "lean"]);
    send_subscribe(&mut bob, 1, None, None).await;
    let text = bob.recv_text().await;
    // Lean snapshot: every record is at the frame's sync count and by the owner.
    let records = text.split("\"records\"").nth(1).unwrap();
    assert!(
        !records.contains("syncCount") && !records.contains("lastModifiedBy"),
        "{text}"
    );
    let mut copy = Copy::default();
    match ServerFrame::from_json(&text).unwrap() {
        ServerFrame::Snapshot {
            sync_count,
            since: None,
            records,
            ..
        } => copy.whole(sync_count, records),
        other => panic!("{other:?}"),
    }
    assert_eq!(copy.sync_count, first);

    // One changed record of ~1 KB: the push is that record alone, well under 300 bytes.
    let n = commit(&alice, vec![Patch::replace("item07", "changed", first)]).await;
    let text = bob.recv_text().await;
    assert!(text.starts_with(r#"{"type":"delta""#), "{text}");
    assert!(text.len() < 300, "{} bytes: {text}", text.len());
    let frame = ServerFrame::from_json(&text).unwrap();
    let ServerFrame::Delta {
        base_sync_count,
        sync_count,
        records,
        ..
    } = &frame
    else {
        panic!("{frame:?}")
    };
    assert_eq!((*base_sync_count, *sync_count), (first, n));
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].last_modified_by, "alice");
    copy.apply(frame);

    // A removal is a tombstone in the delta.
    commit(&alice, vec![Patch::remove("item03", first)]).await;
    let frame = bob.recv_frame().await;
    match &frame {
        ServerFrame::Delta { records, .. } => {
            assert_eq!(records.len(), 1);
            assert_eq!(
                (records[0].key.as_str(), records[0].value.as_deref()),
                ("item03", None)
            );
        }
        other => panic!("{other:?}"),
    }
    copy.apply(frame);
    assert_eq!(copy, server_copy(&server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delta_off_per_subscription_and_without_features_gets_whole_frames() {
    let server = TestServer::start();
    let (alice, first) = twenty_records(&server).await;
    let (mut plain, features) = RawSocket::with_features(&server, "bob", &[]).await;
    assert!(features.is_empty());
    send_subscribe(&mut plain, 1, None, None).await;
    recv_reply(&mut plain).await;
    let (mut opted_out, _) = RawSocket::with_features(&server, "bob", FEATURES).await;
    send_subscribe(&mut opted_out, 1, Some(false), None).await;
    recv_reply(&mut opted_out).await;

    commit(&alice, vec![Patch::replace("item00", "x", first)]).await;
    let full = plain.recv_text().await;
    assert!(full.starts_with(r#"{"type":"dataset""#), "{full}");
    assert!(
        full.contains(r#""lastModifiedBy":"alice""#),
        "full encoding: {full}"
    );
    let lean = opted_out.recv_text().await;
    assert!(lean.starts_with(r#"{"type":"dataset""#), "{lean}");
    assert!(!lean.contains("lastModifiedBy"), "lean encoding: {lean}");
    assert_eq!(
        ServerFrame::from_json(&full).unwrap(),
        ServerFrame::from_json(&lean).unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_delta_slow_reader_gets_merged_deltas_that_end_at_the_newest_state() {
    // Bob reads nothing while alice commits; on a loaded machine that can outlast the
    // default write timeout, which would close him (another test's subject, not this one's).
    let server = TestServer::builder().arg("--write-timeout", "120s").start();
    let alice = server.connect("alice").await;
    alice
        .grant(DatasetRef::own("doc"), "bob", Access::Read)
        .await
        .unwrap();
    // Four keys of ~200 KB, so that unread pushes fill the socket buffers and wait.
    let big = |i: u64| format!("{i:08}{}", "x".repeat(200 * 1024));
    let mut counts = [0u64; 4];
    for (k, count) in counts.iter_mut().enumerate() {
        *count = commit(&alice, vec![Patch::replace(format!("k{k}"), big(0), 0)]).await;
    }
    let (mut bob, _) = RawSocket::with_features(&server, "bob", FEATURES).await;
    send_subscribe(&mut bob, 1, None, None).await;
    let mut copy = Copy::default();
    match recv_reply(&mut bob).await {
        ServerFrame::Snapshot {
            sync_count,
            records,
            ..
        } => copy.whole(sync_count, records),
        other => panic!("{other:?}"),
    }

    // Bob reads nothing while 40 commits change one key each, then a small key goes away.
    for i in 1..=40u64 {
        let k = (i % 2) as usize;
        counts[k] = commit(
            &alice,
            vec![Patch::replace(format!("k{k}"), big(i), counts[k])],
        )
        .await;
    }
    let last = commit(&alice, vec![Patch::remove("k3", counts[3])]).await;

    let mut frames = 0;
    let mut merged = 0;
    while copy.sync_count < last {
        let frame = bob.recv_frame().await;
        if let ServerFrame::Delta {
            base_sync_count,
            sync_count,
            ..
        } = &frame
            && sync_count - base_sync_count > 1
        {
            merged += 1;
        }
        frames += 1;
        copy.apply(frame);
    }
    assert!(
        frames < 41,
        "pushes were conflated: {frames} frames for 41 commits"
    );
    // Whether some were merged (rather than replaced by a whole frame) depends on timing;
    // the outbox's unit tests pin the merge itself.
    eprintln!("{frames} frames, {merged} merged deltas");
    assert!(!copy.records.contains_key("k3"));
    assert_eq!(copy, server_copy(&server).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_subscribe_with_since_resumes_with_the_changes() {
    let server = TestServer::start();
    let (alice, first) = twenty_records(&server).await;
    let (mut bob, _) = RawSocket::with_features(&server, "bob", FEATURES).await;

    // Caught up: nothing to send.
    send_subscribe(&mut bob, 1, None, Some(first)).await;
    match recv_reply(&mut bob).await {
        ServerFrame::Snapshot {
            sync_count,
            since,
            records,
            ..
        } => {
            assert_eq!((sync_count, since), (first, Some(first)));
            assert!(records.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // Two changes later (one removal), a resume gets just those two.
    commit(&alice, vec![Patch::replace("item01", "new", first)]).await;
    let now = commit(&alice, vec![Patch::remove("item02", first)]).await;
    let (mut again, _) = RawSocket::with_features(&server, "bob", FEATURES).await;
    send_subscribe(&mut again, 1, None, Some(first)).await;
    match recv_reply(&mut again).await {
        ServerFrame::Snapshot {
            sync_count,
            since,
            records,
            ..
        } => {
            assert_eq!((sync_count, since), (now, Some(first)));
            let keys: Vec<_> = records
                .iter()
                .map(|r| (r.key.as_str(), r.value.as_deref()))
                .collect();
            assert_eq!(keys, [("item01", Some("new")), ("item02", None)]);
        }
        other => panic!("{other:?}"),
    }
    // A client that claims a state the store never had gets the whole dataset.
    let (mut ahead, _) = RawSocket::with_features(&server, "bob", FEATURES).await;
    send_subscribe(&mut ahead, 1, None, Some(now + 100)).await;
    match recv_reply(&mut ahead).await {
        ServerFrame::Snapshot { since, records, .. } => {
            assert_eq!(since, None);
            assert_eq!(records.len(), 19);
        }
        other => panic!("{other:?}"),
    }
    // So does one resuming a deleted dataset.
    alice.delete_dataset(DatasetRef::own("doc")).await.unwrap();
    let (mut gone, _) = RawSocket::with_features(&server, "alice", FEATURES).await;
    send_subscribe(&mut gone, 1, None, Some(first)).await;
    match recv_reply(&mut gone).await {
        ServerFrame::Snapshot { since, records, .. } => {
            assert_eq!(since, None);
            assert!(records.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_writers_ack_comes_before_the_push_of_its_own_commit() {
    let server = TestServer::start();
    let (_alice, first) = twenty_records(&server).await;
    let (mut raw, _) = RawSocket::with_features(&server, "alice", FEATURES).await;
    send_subscribe(&mut raw, 1, None, None).await;
    recv_reply(&mut raw).await;
    let mut base = first;
    for id in 2..12u64 {
        let update = ClientFrame::Update {
            id: RequestId::Num(id),
            dataset: DatasetRef::own("doc"),
            device_id: None,
            patches: vec![Patch::replace("item00", format!("v{id}"), base)],
        };
        raw.send(0x1, update.to_json().as_bytes()).await;
        match raw.recv_frame().await {
            ServerFrame::Ack { sync_count, .. } => base = sync_count.unwrap(),
            other => panic!("the ack comes first: {other:?}"),
        }
        match raw.recv_frame().await {
            ServerFrame::Delta { sync_count, .. } => assert_eq!(sync_count, base),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_slow_reader_that_still_reads_is_not_closed() {
    let server = TestServer::builder()
        .arg("--write-timeout", "10s")
        .arg("--max-dataset-bytes", 8 << 20)
        .arg("--max-frame-bytes", 8 << 20)
        .start();
    let alice = server.connect("alice").await;
    alice
        .grant(DatasetRef::own("doc"), "bob", Access::Read)
        .await
        .unwrap();
    // A 1 MiB receive buffer: on loopback (64 KiB segments) the default 128 KiB buffer makes
    // a sipping reader advertise a zero window most of the time, and the kernel's probes of it
    // back off to seconds; that is TCP on loopback, not what this test is about.
    let (mut bob, _) =
        RawSocket::with_features_and_buffer(&server, "bob", &[], Some(1 << 20)).await;
    send_subscribe(&mut bob, 1, None, None).await;
    recv_reply(&mut bob).await;

    // Whole frames of ~5 MB; bob takes 32 KB every 100 ms (~320 KB/s), so one frame takes
    // longer than the write timeout (10 s, ample for a loaded machine's pauses) to get
    // through (a deadline on the whole write would close bob), but bytes keep moving.
    let mut last = 0;
    for i in 0..2u64 {
        let value = format!("{i:08}{}", "x".repeat(5 << 20));
        last = commit(&alice, vec![Patch::replace("body", value, last)]).await;
    }
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while seen < last {
        assert!(
            tokio::time::Instant::now() < deadline,
            "did not end at {last}"
        );
        while let Some(frame) = bob.buffered_frame() {
            match frame {
                ServerFrame::Dataset { sync_count, .. } => seen = sync_count,
                other => panic!("{other:?}"),
            }
        }
        if seen < last {
            assert!(
                bob.sip(32 * 1024).await,
                "closed after sync count {seen}, {} bytes read; log:\n{}",
                bob.sipped,
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(
        tandem_tests::metric(
            &server,
            "tandem_gateway_closes_total{code=\"4001\",reason=\"write_stalled\"}"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cluster_deltas_cross_nodes_and_the_ack_comes_first() {
    use tandem_tests::cluster::{PgSchema, redis_url, start_nodes};
    let schema = PgSchema::create();
    let nodes = start_nodes(2, &schema.url, &schema.name, &redis_url());
    let (alice, first) = twenty_records(&nodes[0]).await;
    drop(alice);
    // Alice writes through node 0 and follows her own dataset there; bob follows it through
    // node 1 with deltas, carol through node 1 with neither feature.
    let (mut writer, _) = RawSocket::with_features(&nodes[0], "alice", FEATURES).await;
    send_subscribe(&mut writer, 1, None, None).await;
    recv_reply(&mut writer).await;
    let (mut bob, _) = RawSocket::with_features(&nodes[1], "bob", FEATURES).await;
    send_subscribe(&mut bob, 1, None, None).await;
    let mut copy = Copy::default();
    match recv_reply(&mut bob).await {
        ServerFrame::Snapshot {
            sync_count,
            records,
            ..
        } => copy.whole(sync_count, records),
        other => panic!("{other:?}"),
    }
    let alice = nodes[0].connect("alice").await;
    alice
        .grant(DatasetRef::own("doc"), "carol", Access::Read)
        .await
        .unwrap();
    let (mut carol, _) = RawSocket::with_features(&nodes[1], "carol", &[]).await;
    send_subscribe(&mut carol, 1, None, None).await;
    recv_reply(&mut carol).await;

    let mut base = first;
    let mut item00 = first;
    for id in 2..12u64 {
        let patch = if id == 7 {
            Patch::remove("item05", first)
        } else {
            Patch::replace("item00", format!("v{id}"), item00)
        };
        let update = ClientFrame::Update {
            id: RequestId::Num(id),
            dataset: DatasetRef::own("doc"),
            device_id: None,
            patches: vec![patch],
        };
        writer.send(0x1, update.to_json().as_bytes()).await;
        match writer.recv_frame().await {
            ServerFrame::Ack { sync_count, .. } => base = sync_count.unwrap(),
            other => panic!("the ack comes first: {other:?}"),
        }
        if id != 7 {
            item00 = base;
        }
        match writer.recv_frame().await {
            ServerFrame::Delta { sync_count, .. } => assert_eq!(sync_count, base),
            other => panic!("{other:?}"),
        }
    }
    while copy.sync_count < base {
        copy.apply(bob.recv_frame().await);
    }
    assert!(!copy.records.contains_key("item05"));
    // Carol's frames are whole and in the full encoding, made on node 1 from the lean ones.
    let mut seen = 0;
    while seen < base {
        let text = carol.recv_text().await;
        assert!(text.starts_with(r#"{"type":"dataset""#), "{text}");
        assert!(text.contains(r#""lastModifiedBy":"alice""#), "{text}");
        if let ServerFrame::Dataset { sync_count, .. } = ServerFrame::from_json(&text).unwrap() {
            seen = sync_count;
        }
    }
    let conn = nodes[1].connect("bob").await;
    let (sync_count, records) = conn.subscribe(doc()).await.unwrap();
    let mut server = Copy::default();
    server.whole(sync_count, records);
    assert_eq!(copy, server);
}
