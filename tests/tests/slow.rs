//! Slow consumers: a client that reads slowly gets coalesced pushes and still ends at the
//! newest state; a client that stops reading is closed as slow; neither holds others back.

use std::time::Duration;
use tandem_protocol::{Access, ClientFrame, DatasetRef, Patch, RequestId, ServerFrame};
use tandem_tests::raw::RawSocket;
use tandem_tests::{TestServer, push_at_least};

/// Writes `n` updates of one ~`size`-byte value to `alice/doc`, each on top of the last.
async fn write_big(server: &TestServer, n: u64, size: usize) -> u64 {
    let writer = server.connect("alice").await;
    let ds = DatasetRef::own("doc");
    let mut last = 0;
    for i in 0..n {
        let value = format!("{i:08}{}", "x".repeat(size));
        match writer
            .update(ds.clone(), None, vec![Patch::replace("body", value, last)])
            .await
            .unwrap()
        {
            tandem_client::UpdateResult::Committed { sync_count, .. } => last = sync_count,
            other => panic!("{other:?}"),
        }
    }
    last
}

async fn subscribe_raw(server: &TestServer, sub: &str) -> RawSocket {
    let mut raw = RawSocket::authenticated(server, sub).await;
    let frame = ClientFrame::Subscribe {
        id: RequestId::Num(1),
        dataset: DatasetRef::new("alice", "doc"),
        delta: None,
        since: None,
    };
    raw.send(0x1, frame.to_json().as_bytes()).await;
    let reply = raw.recv_frame().await;
    assert!(matches!(reply, ServerFrame::Snapshot { .. }), "{reply:?}");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_slow_reader_gets_coalesced_pushes_and_ends_at_the_newest_state() {
    // Bob does not read at all while the writes go on; on a busy machine they can take longer
    // than the default write timeout, which this test is not about.
    let server = TestServer::builder().arg("--write-timeout", "120s").start();
    let owner = server.connect("alice").await;
    owner
        .grant(DatasetRef::own("doc"), "bob", Access::Read)
        .await
        .unwrap();
    let mut raw = subscribe_raw(&server, "bob").await;
    let mut fast = server.connect("carol").await;
    owner
        .grant(DatasetRef::own("doc"), "carol", Access::Read)
        .await
        .unwrap();
    fast.subscribe(DatasetRef::new("alice", "doc"))
        .await
        .unwrap();

    // Bob reads nothing while 60 pushes of ~256 KB (15 MB) are due: far more than the
    // socket buffers hold, so the server must hold them back and coalesce.
    let last = write_big(&server, 60, 256 * 1024).await;
    let (n, _) = push_at_least(&mut fast, last).await;
    assert_eq!(n, last, "a fast reader is not held back");

    // Now Bob reads: fewer frames than commits, counts only go up, the last is the newest.
    let mut frames = 0;
    let mut seen = 0;
    while seen < last {
        let frame = raw.recv_frame().await;
        if let ServerFrame::Dataset {
            sync_count,
            records,
            ..
        } = frame
        {
            assert!(sync_count > seen, "{sync_count} after {seen}");
            seen = sync_count;
            frames += 1;
            if seen == last {
                let body = records[0].value.as_deref().unwrap();
                assert!(body.starts_with(&format!("{:08}", last - 1)));
            }
        }
    }
    assert!(
        frames < last,
        "pushes were coalesced: {frames} frames for {last} commits"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_slow_reader_that_stops_reading_is_closed_as_slow() {
    let server = TestServer::builder().arg("--write-timeout", "1s").start();
    let owner = server.connect("alice").await;
    owner
        .grant(DatasetRef::own("doc"), "bob", Access::Read)
        .await
        .unwrap();
    let mut stuck = subscribe_raw(&server, "bob").await;

    // Bob never reads again; the writer keeps committing large documents.
    let last = write_big(&server, 60, 256 * 1024).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !server
        .log()
        .contains("socket took nothing for the write timeout, closing slow connection")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stuck connection was not closed; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection ends: with the close code if it still fit in the socket, else just EOF.
    let code = stuck.close_code().await;
    assert!(code.is_none() || code == Some(4001), "{code:?}");

    assert_eq!(
        tandem_tests::metric(
            &server,
            "tandem_gateway_closes_total{code=\"4001\",reason=\"write_stalled\"}"
        )
        .await,
        1
    );

    // Everyone else goes on, and the newest state is there for a reconnect.
    let conn = server.connect("bob").await;
    let (n, _) = conn
        .subscribe(DatasetRef::new("alice", "doc"))
        .await
        .unwrap();
    assert_eq!(n, last);
}
