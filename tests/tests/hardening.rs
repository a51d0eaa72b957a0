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
            delta: None,
            since: None,
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

/// Sends a WebSocket upgrade request; returns the response's status and body.
async fn upgrade(server: &TestServer) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let request = format!(
        "GET /v1/sync HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        server.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        response.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&response);
        if n == 0 || text.starts_with("HTTP/1.1 101") || text.contains("}") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap();
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned());
    (status, body.unwrap_or_default())
}

#[tokio::test]
async fn test_hardening_node_refuses_connections_past_max_connections() {
    let server = TestServer::builder().arg("--max-connections", 2).start();
    let _a = RawSocket::connect(&server).await;
    let _b = RawSocket::connect(&server).await;
    let (status, body) = upgrade(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"limit\":\"max_connections\""), "{body}");
    drop(_a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upgrade(&server).await.0 != 101 {
        assert!(tokio::time::Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn test_hardening_one_identity_cannot_hold_more_than_its_connections() {
    let server = TestServer::builder()
        .arg("--max-connections-per-identity", 3)
        .start();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(RawSocket::authenticated(&server, "mallory").await);
    }
    let mut fourth = RawSocket::connect(&server).await;
    let auth = ClientFrame::Auth {
        id: None,
        token: server.token("mallory"),
        features: Vec::new(),
    };
    fourth.send(0x1, auth.to_json().as_bytes()).await;
    let refused = fourth.recv_frame().await;
    assert!(
        format!("{refused:?}").contains("MaxConnectionsPerIdentity"),
        "{refused:?}"
    );
    assert_eq!(fourth.close_code().await, Some(4005));
    // Others still get in.
    RawSocket::authenticated(&server, "alice").await;
}

#[tokio::test]
async fn test_hardening_a_token_valid_for_a_century_does_not_keep_a_session_for_ever() {
    let server = TestServer::builder().arg("--max-session-age", "1s").start();
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
    );
    let exp = tandem_tests::now_secs() + 100 * 365 * 86_400;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": "alice", "exp": exp }),
        &jsonwebtoken::EncodingKey::from_secret(tandem_tests::SECRET.as_bytes()),
    )
    .unwrap();
    let mut raw = RawSocket::connect(&server).await;
    let auth = ClientFrame::Auth {
        id: None,
        token,
        features: Vec::new(),
    };
    raw.send(0x1, auth.to_json().as_bytes()).await;
    let ready = raw.recv_frame().await;
    assert!(format!("{ready:?}").contains("Ready"), "{ready:?}");
    assert_eq!(raw.close_code().await, Some(4006));
}

/// Opens a WebSocket without authenticating and streams most of one large frame, without
/// finishing it; returns whether the node cut the connection off before the end.
async fn stream_unauthenticated(addr: std::net::SocketAddr, frame_bytes: usize) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let request = format!(
        "GET /v1/sync HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return true;
    }
    let mut head = [0u8; 256];
    match stream.read(&mut head).await {
        Ok(n) if head[..n].starts_with(b"HTTP/1.1 101") => {}
        _ => return true,
    }
    // A masked text frame announcing `frame_bytes`, of which all but 1 KB is sent.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend_from_slice(&(frame_bytes as u64).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    if stream.write_all(&header).await.is_err() {
        return true;
    }
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent + chunk.len() < frame_bytes - 1024 {
        let write = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&chunk)).await;
        match write {
            Ok(Ok(())) => sent += chunk.len(),
            // Refused, or the node stopped reading: either way it holds no more of it.
            Ok(Err(_)) | Err(_) => return true,
        }
    }
    // Everything went in (socket buffers are large on loopback): hold the connection a
    // moment longer, as the abusive client would, and see whether the node closed it (after
    // its error frame).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut head)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn test_hardening_anonymous_streamers_hold_little_memory_and_are_cut_off() {
    let server = TestServer::start();
    let idle = metric(&server, "process_resident_memory_bytes").await;
    // 300 anonymous connections, each streaming most of a 2 MiB frame (the largest an
    // authenticated client may send) and stalling inside the auth window.
    let streamers: Vec<_> = (0..300)
        .map(|_| tokio::spawn(stream_unauthenticated(server.addr, 2 << 20)))
        .collect();
    let mut peak = idle;
    let mut cut_off = 0;
    for streamer in streamers {
        peak = peak.max(metric(&server, "process_resident_memory_bytes").await);
        cut_off += usize::from(streamer.await.unwrap());
    }
    peak = peak.max(metric(&server, "process_resident_memory_bytes").await);
    assert!(
        peak.saturating_sub(idle) < MEMORY_BOUND,
        "memory rose {} MB",
        (peak - idle) >> 20
    );
    assert_eq!(cut_off, 300, "only {cut_off} of 300 were cut off");
}

#[tokio::test]
async fn test_hardening_unauthenticated_connections_are_capped_per_node() {
    let server = TestServer::builder()
        .arg("--max-unauthenticated-connections", 3)
        .start();
    let mut waiting = Vec::new();
    for _ in 0..3 {
        waiting.push(RawSocket::connect(&server).await);
    }
    let (status, body) = upgrade(&server).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_unauthenticated_connections"), "{body}");
    // Authenticated connections are not held back by them...
    let token = server.token("alice");
    let authed = tandem_client::Connection::connect_with_header(&server.url(), &token).await;
    assert!(authed.is_ok(), "{authed:?}");
    // ...and once one of the waiting ones authenticates, a new anonymous one gets in.
    let auth = ClientFrame::Auth {
        id: None,
        token: server.token("bob"),
        features: Vec::new(),
    };
    waiting[0].send(0x1, auth.to_json().as_bytes()).await;
    waiting[0].recv_frame().await;
    RawSocket::connect(&server).await;
}

#[tokio::test]
async fn test_hardening_one_address_is_capped_in_connections() {
    // Loopback is exempt by default (local proxies, load generators); exempt another one.
    let server = TestServer::builder()
        .arg("--ip-limits-exempt", "192.0.2.1")
        .arg("--max-connections-per-ip", 3)
        .arg("--max-new-connections-per-ip", 0)
        .start();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(RawSocket::connect(&server).await);
    }
    let (status, body) = upgrade(&server).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("\"max_connections_per_ip\""), "{body}");
    held.pop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upgrade(&server).await.0 != 101 {
        assert!(tokio::time::Instant::now() < deadline, "no place freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn test_hardening_one_address_is_capped_in_new_connections_per_second() {
    let server = TestServer::builder()
        .arg("--ip-limits-exempt", "192.0.2.1")
        .arg("--max-new-connections-per-ip", 1)
        .start();
    assert_eq!(upgrade(&server).await.0, 101);
    let (status, body) = upgrade(&server).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("\"max_new_connections_per_ip\""), "{body}");
}
