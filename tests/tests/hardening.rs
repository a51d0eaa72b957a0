//! What a hostile or careless client can claim from a node, and what bounds it: each test
//! runs against a real server process and measures what the bound protects (memory through
//! `/metrics`, sessions, disk).

use std::time::Duration;
use tandem_protocol::{ClientFrame, DatasetRef, Patch, RequestId};
use tandem_tests::raw::RawSocket;
use tandem_tests::{TestServer, metric};

/// Memory a node may gain from one abusive client before it is stopped: the target.
const MEMORY_BOUND: u64 = 64 << 20;

/// A dataset of about 1 MB, as close to the default `max_dataset_bytes` as fits.
async fn write_one_megabyte(server: &TestServer) {
    let writer = server.connect("alice").await;
    let patches = (0..16)
        .map(|i| Patch::replace(format!("k{i:02}"), "x".repeat(60_000), 0))
        .collect();
    let result = writer
        .update(DatasetRef::own("big"), None, patches)
        .await
        .unwrap();
    assert!(
        matches!(result, tandem_client::UpdateResult::Committed { .. }),
        "{result:?}"
    );
}

#[tokio::test]
async fn test_hardening_resubscribing_reader_that_never_reads_is_closed_within_memory_bound() {
    let server = TestServer::start();
    write_one_megabyte(&server).await;
    let idle = metric(&server, "process_resident_memory_bytes").await;

    // Subscribes to the 1 MB dataset 1,000 times and reads nothing: every snapshot reply
    // would wait in the node's memory.
    let mut raw = RawSocket::authenticated(&server, "alice").await;
    for id in 0..1000u64 {
        let frame = ClientFrame::Subscribe {
            id: RequestId::Num(id),
            dataset: DatasetRef::own("big"),
        };
        raw.send(0x1, frame.to_json().as_bytes()).await;
    }

    // The node stops reading the connection once its queued replies pass
    // `max_queued_bytes` and drops its subscription.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut peak = idle;
    loop {
        peak = peak.max(metric(&server, "process_resident_memory_bytes").await);
        if metric(&server, "tandem_gateway_subscriptions").await == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the connection was not closed; memory {} MB above idle",
            (peak - idle) >> 20
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        peak.saturating_sub(idle) < MEMORY_BOUND,
        "memory rose {} MB",
        (peak - idle) >> 20
    );
    // The connection ends: with the slow-consumer close, or with a reset, since the node
    // closes a socket whose unread frames are still in its receive buffer.
    let code = raw.close_code().await;
    assert!(matches!(code, None | Some(4001)), "{code:?}");
}
