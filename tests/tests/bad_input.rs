//! Bad input end to end: every malformed, oversized, over-limit, unauthorised or stale
//! request gets its documented error code (or close code), the connection stays usable
//! wherever the protocol keeps it open, and the stored data is unchanged afterwards.

use std::time::Duration;
use tandem_client::{ClientError, Connection, UpdateResult};
use tandem_protocol::{
    Access, ClientFrame, CloseCode, DatasetRef, ErrorCode, LimitCode, Patch, Record, RequestId,
    ServerFrame,
};
use tandem_tests::TestServer;
use tandem_tests::raw::RawSocket;

/// How long any single reply or close may take before a test fails.
const WAIT: Duration = Duration::from_secs(10);

/// Writes a small dataset: a live record written from a device, a replaced record and a
/// tombstone, at sync count 3. Returns what is stored (tombstones included).
async fn seed(conn: &Connection, ds: &DatasetRef) -> (u64, Vec<Record>) {
    let writes = [
        vec![
            Patch::replace("milk", "1", 0),
            Patch::replace("eggs", "12", 0),
        ],
        vec![Patch::replace("milk", "2", 1)],
        vec![Patch::remove("eggs", 1)],
    ];
    for patches in writes {
        let r = conn
            .update(ds.clone(), Some("phone".into()), patches)
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    }
    let state = stored(conn, ds).await;
    assert_eq!(state.0, 3);
    assert_eq!(state.1.len(), 2);
    state
}

/// Everything stored for a dataset: its sync count and every record, tombstones included.
async fn stored(conn: &Connection, ds: &DatasetRef) -> (u64, Vec<Record>) {
    conn.changes(ds.clone(), 0).await.unwrap()
}

/// Asserts `result` is an `error` reply with `code` and no limit; returns its message.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Server {
            code: got,
            message,
            limit: None,
            max: None,
        }) if got == code => message,
        other => panic!("expected a {code} error without a limit, got {other:?}"),
    }
}

/// Asserts `result` is an `error` reply for `limit` with its class, `limit` and `max`.
#[track_caller]
fn assert_limit<T: std::fmt::Debug>(result: Result<T, ClientError>, limit: LimitCode, max: u64) {
    match result {
        Err(ClientError::Server {
            code,
            limit: Some(got),
            max: Some(got_max),
            ..
        }) if code == limit.error_code() && got == limit && got_max == max => {}
        other => panic!(
            "expected {} / {limit} / max {max}, got {other:?}",
            limit.error_code()
        ),
    }
}

/// The next frame that is not a reply to a typed request must be an `error`; returns
/// (id, code, message, limit, max).
async fn next_error(
    conn: &mut Connection,
) -> (
    Option<RequestId>,
    ErrorCode,
    String,
    Option<LimitCode>,
    Option<u64>,
) {
    match conn.next_event_timeout(WAIT).await {
        Some(ServerFrame::Error {
            id,
            code,
            message,
            limit,
            max,
        }) => (id, code, message, limit, max),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

/// Waits for the connection to end and returns the close code the server sent.
async fn close_code(conn: &Connection) -> Option<u16> {
    let closed = tokio::time::timeout(WAIT, conn.wait_closed())
        .await
        .expect("the server closes the connection");
    closed.code
}

/// A follow-up request that needs an authenticated, working session.
async fn assert_usable(conn: &Connection) {
    conn.ping().await.unwrap();
    conn.list_datasets().await.unwrap();
}

fn str_id(id: &str) -> Option<RequestId> {
    Some(RequestId::Str(id.to_owned()))
}

#[tokio::test]
async fn test_bad_input_malformed_json_gets_bad_request_and_connection_stays_usable() {
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    // A truncated update on the seeded dataset: nothing of it may be applied.
    alice
        .send_text(r#"{"type":"update","id":"u1","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9","syncCount":2}"#)
        .unwrap();
    let (id, code, message, limit, max) = next_error(&mut alice).await;
    assert_eq!(id, None, "a frame that is not json has no usable id");
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.starts_with("malformed json"), "{message}");
    assert_eq!((limit, max), (None, None));

    alice.send_text("{not json at all").unwrap();
    let (_, code, _, _, _) = next_error(&mut alice).await;
    assert_eq!(code, ErrorCode::BadRequest);

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    // The same update, well-formed, still applies on top of the unchanged data.
    let r = alice
        .update(ds.clone(), None, vec![Patch::replace("milk", "9", 2)])
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 4, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_bad_input_json_that_is_not_an_object_gets_bad_request_and_connection_stays_usable() {
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    for text in [r#"["update"]"#, r#""ping""#, "42", "null"] {
        alice.send_text(text).unwrap();
        let (id, code, message, _, _) = next_error(&mut alice).await;
        assert_eq!(id, None, "{text}");
        assert_eq!(code, ErrorCode::BadRequest, "{text}: {message}");
    }

    assert_usable(&alice).await;
    assert_eq!(stored(&alice, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_unknown_message_type_gets_bad_request_with_its_id_and_connection_stays_usable()
 {
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    alice
        .send_text(r#"{"type":"truncate","id":"t1","dataset":{"name":"groceries"}}"#)
        .unwrap();
    let (id, code, message, limit, max) = next_error(&mut alice).await;
    assert_eq!(id, str_id("t1"));
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("unknown message type"), "{message}");
    assert!(message.contains("truncate"), "{message}");
    assert_eq!((limit, max), (None, None));

    // A numeric id is echoed as a number.
    alice.send_text(r#"{"type":"UPDATE","id":77}"#).unwrap();
    let (id, code, _, _, _) = next_error(&mut alice).await;
    assert_eq!(id, Some(RequestId::Num(77)));
    assert_eq!(code, ErrorCode::BadRequest);

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    assert_eq!(stored(&alice, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_missing_or_mistyped_fields_get_bad_request_with_their_id_and_write_nothing()
{
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    // (id, frame, a word the message must name)
    let cases = [
        (
            "m1",
            r#"{"id":"m1","dataset":{"name":"groceries"}}"#,
            "type",
        ),
        (
            "m2",
            r#"{"type":"update","id":"m2","dataset":{"name":"groceries"}}"#,
            "patches",
        ),
        (
            "m3",
            r#"{"type":"update","id":"m3","patches":[{"op":"replace","key":"milk","value":"9","syncCount":2}]}"#,
            "dataset",
        ),
        (
            "m4",
            r#"{"type":"update","id":"m4","dataset":{"name":"groceries"},"patches":[{"op":"replace","value":"9","syncCount":2}]}"#,
            "key",
        ),
        (
            "m5",
            r#"{"type":"update","id":"m5","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9"}]}"#,
            "syncCount",
        ),
        (
            "m6",
            r#"{"type":"update","id":"m6","dataset":{},"patches":[{"op":"replace","key":"milk","value":"9","syncCount":2}]}"#,
            "name",
        ),
        (
            "m7",
            r#"{"type":"update","id":"m7","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9","syncCount":-1}]}"#,
            "update",
        ),
        (
            "m8",
            r#"{"type":"update","id":"m8","dataset":{"name":"groceries"},"patches":[{"op":"upsert","key":"milk","value":"9","syncCount":2}]}"#,
            "update",
        ),
        (
            "m9",
            r#"{"type":"update","id":"m9","dataset":{"name":"groceries"},"patches":{"milk":"9"}}"#,
            "update",
        ),
        ("m10", r#"{"type":"subscribe","id":"m10"}"#, "dataset"),
        (
            "m11",
            r#"{"type":"grant","id":"m11","dataset":{"name":"groceries"},"access":"write"}"#,
            "identity",
        ),
        (
            "m12",
            r#"{"type":"grant","id":"m12","dataset":{"name":"groceries"},"identity":"bob","access":"owner"}"#,
            "access",
        ),
        ("m13", r#"{"type":"changes","id":"m13"}"#, "dataset"),
    ];
    for (want_id, text, names) in cases {
        alice.send_text(text).unwrap();
        let (id, code, message, limit, max) = next_error(&mut alice).await;
        assert_eq!(id, str_id(want_id), "{text}");
        assert_eq!(code, ErrorCode::BadRequest, "{text}: {message}");
        assert!(message.contains(names), "{text}: {message}");
        assert_eq!((limit, max), (None, None), "{text}");
    }

    // Well-formed frames whose content is incomplete: a replace without a value, an update
    // without patches. The first also carries a valid patch, which must not be applied.
    let no_value = alice
        .update(
            ds.clone(),
            None,
            vec![
                Patch::replace("bread", "1", 0),
                Patch {
                    value: None,
                    ..Patch::replace("milk", "", 2)
                },
            ],
        )
        .await;
    let message = assert_error(no_value, ErrorCode::BadRequest);
    assert!(message.contains("value"), "{message}");
    assert_error(
        alice.update(ds.clone(), None, vec![]).await,
        ErrorCode::BadRequest,
    );

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    assert!(
        server
            .connect("bob")
            .await
            .subscribe(DatasetRef::new("alice", "groceries"))
            .await
            .is_err(),
        "the grant with access `owner` was not stored"
    );
}

#[tokio::test]
async fn test_bad_input_duplicate_key_gets_bad_request_with_its_id_and_writes_nothing() {
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    // Read last-wins, each of these would write something other than what a first-wins
    // reader (a proxy, an audit log) saw.
    let cases = [
        (
            "d1",
            r#"{"type":"update","id":"d1","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9","syncCount":2}],"patches":[{"op":"remove","key":"milk","syncCount":2}]}"#,
            "duplicate key `patches`",
        ),
        (
            "d2",
            r#"{"type":"update","id":"d2","dataset":{"name":"decoy","name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9","syncCount":2}]}"#,
            "duplicate key `name` in `dataset`",
        ),
        (
            "d3",
            r#"{"type":"update","id":"d3","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":"9","value":"10","syncCount":2}]}"#,
            "duplicate key `value` in `patches`",
        ),
        (
            "d4",
            r#"{"type":"ping","id":"d4","later":1,"later":2}"#,
            "duplicate key `later`",
        ),
    ];
    for (want_id, text, message) in cases {
        alice.send_text(text).unwrap();
        let (id, code, got, limit, max) = next_error(&mut alice).await;
        assert_eq!(id, str_id(want_id), "{text}");
        assert_eq!(code, ErrorCode::BadRequest, "{text}: {got}");
        assert_eq!(got, message, "{text}");
        assert_eq!((limit, max), (None, None), "{text}");
    }
    // Two ids: the reply cannot say which request it answers.
    alice
        .send_text(r#"{"type":"ping","id":"a","id":"b"}"#)
        .unwrap();
    let (id, code, _, _, _) = next_error(&mut alice).await;
    assert_eq!((id, code), (None, ErrorCode::BadRequest));

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_binary_frame_gets_bad_request_and_connection_stays_usable() {
    let server = TestServer::start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    let update = ClientFrame::Update {
        id: RequestId::Str("b1".into()),
        dataset: ds.clone(),
        device_id: None,
        patches: vec![Patch::replace("milk", "9", 2)],
    };
    alice.send_binary(update.to_json().into_bytes()).unwrap();
    let (id, code, message, _, _) = next_error(&mut alice).await;
    assert_eq!(id, None);
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(message.contains("binary"), "{message}");

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    assert_eq!(stored(&alice, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_text_frame_with_invalid_utf8_closes_with_protocol_error() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    let mut raw = RawSocket::authenticated(&server, "alice").await;

    // A text frame must be UTF-8 (RFC 6455 §5.6); this one is an update with a 0xff byte.
    let mut text = br#"{"type":"update","id":"x","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"milk","value":""#.to_vec();
    text.push(0xff);
    text.extend_from_slice(br#"","syncCount":2}]}"#);
    raw.send(0x1, &text).await;
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::ProtocolError.code()),
        "invalid UTF-8 is a protocol error: close 4502, do not reconnect"
    );

    assert_eq!(stored(&alice, &ds).await, before);
    assert_usable(&alice).await;
}

#[tokio::test]
async fn test_bad_input_frame_over_max_frame_bytes_gets_too_large_then_close_4501() {
    const MAX: usize = 64 * 1024;
    let server = TestServer::builder().arg("--max-frame-bytes", MAX).start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    // About 1 MB: an update that would replace a record if it were read whole.
    let huge = ClientFrame::Update {
        id: RequestId::Str("huge".into()),
        dataset: ds.clone(),
        device_id: None,
        patches: vec![Patch::replace("milk", "x".repeat(1_000_000), 2)],
    };
    alice.send_text(huge.to_json()).unwrap();
    let (id, code, message, limit, max) = next_error(&mut alice).await;
    assert_eq!(id, None, "the frame was never read, so its id is unknown");
    assert_eq!(code, ErrorCode::TooLarge);
    assert_eq!(limit, Some(LimitCode::MaxFrameBytes));
    assert_eq!(max, Some(MAX as u64));
    assert!(message.contains(&MAX.to_string()), "{message}");
    let closed = tokio::time::timeout(WAIT, alice.wait_closed())
        .await
        .expect("closed");
    assert_eq!(
        closed.code,
        Some(CloseCode::MessageTooBig.code()),
        "{closed:?}"
    );
    assert_eq!(closed.reason, CloseCode::MessageTooBig.reason());

    // The server is fine and nothing was written.
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    assert_usable(&observer).await;
}

#[tokio::test]
async fn test_bad_input_frame_of_exactly_max_frame_bytes_is_accepted_and_one_byte_more_is_refused()
{
    const MAX: usize = 64 * 1024;
    let server = TestServer::builder().arg("--max-frame-bytes", MAX).start();
    let mut alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    seed(&alice, &ds).await;

    // An update of exactly MAX bytes commits.
    let head = r#"{"type":"update","id":"at-max","dataset":{"name":"groceries"},"patches":[{"op":"replace","key":"blob","value":""#;
    let tail = r#"","syncCount":0}]}"#;
    let value = "v".repeat(MAX - head.len() - tail.len());
    let frame = format!("{head}{value}{tail}");
    assert_eq!(frame.len(), MAX);
    alice.send_text(frame).unwrap();
    match alice.next_event_timeout(WAIT).await {
        Some(ServerFrame::Ack {
            id,
            sync_count: Some(4),
            ..
        }) => assert_eq!(id, RequestId::Str("at-max".into())),
        other => panic!("expected the ack of the update, got {other:?}"),
    }
    let before = stored(&alice, &ds).await;
    let blob = before.1.iter().find(|r| r.key == "blob").expect("blob");
    assert_eq!(blob.value.as_deref(), Some(value.as_str()));

    // The same update one byte longer (a space) is refused before it is read.
    alice.send_text(format!("{head}{value}{tail} ")).unwrap();
    let (_, code, _, limit, max) = next_error(&mut alice).await;
    assert_eq!(code, ErrorCode::TooLarge);
    assert_eq!(limit, Some(LimitCode::MaxFrameBytes));
    assert_eq!(max, Some(MAX as u64));
    assert_eq!(
        close_code(&alice).await,
        Some(CloseCode::MessageTooBig.code())
    );

    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_fragmented_message_over_max_frame_bytes_gets_too_large_then_close_4501() {
    const MAX: usize = 64 * 1024;
    let server = TestServer::builder().arg("--max-frame-bytes", MAX).start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    seed(&alice, &ds).await;

    let update = |id: &str, value: String| {
        ClientFrame::Update {
            id: RequestId::Str(id.to_owned()),
            dataset: DatasetRef::own("groceries"),
            device_id: None,
            patches: vec![Patch::replace("blob", value, 0)],
        }
        .to_json()
        .into_bytes()
    };
    let mut raw = RawSocket::authenticated(&server, "alice").await;

    // A message in two fragments that together stay under the limit is read whole.
    let small = update("small", "s".repeat(MAX / 2));
    let (first, rest) = small.split_at(small.len() / 2);
    raw.send_frame(false, 0x1, first).await;
    raw.send_frame(true, 0x0, rest).await;
    let ack = raw.recv_frame().await;
    assert!(
        matches!(&ack, ServerFrame::Ack { id, sync_count: Some(4), .. } if *id == RequestId::Str("small".into())),
        "{ack:?}"
    );
    let before = stored(&alice, &ds).await;

    // Two fragments, each under the limit, that add up to more than it.
    let big = update("big", "b".repeat(MAX));
    let (first, rest) = big.split_at(big.len() / 2);
    assert!(first.len() < MAX && rest.len() < MAX && big.len() > MAX);
    raw.send_frame(false, 0x1, first).await;
    raw.send_frame(true, 0x0, rest).await;
    match raw.recv_frame().await {
        ServerFrame::Error {
            id: None,
            code: ErrorCode::TooLarge,
            limit: Some(LimitCode::MaxFrameBytes),
            max: Some(max),
            ..
        } => assert_eq!(max, MAX as u64),
        other => panic!("expected too_large / max_frame_bytes, got {other:?}"),
    }
    assert_eq!(
        raw.close_code().await,
        Some(CloseCode::MessageTooBig.code())
    );

    assert_eq!(stored(&alice, &ds).await, before);
    assert_usable(&alice).await;
}

#[tokio::test]
async fn test_bad_input_dataset_name_outside_pattern_gets_bad_request_and_writes_nothing() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;
    let listed = alice.list_datasets().await.unwrap();

    for name in [
        "",
        "has space",
        "a/b",
        "groceries!",
        "café",
        "tab\there",
        "x\u{0}",
    ] {
        let bad = DatasetRef::own(name);
        let patches = vec![Patch::replace("milk", "9", 0)];
        assert_error(
            alice.update(bad.clone(), None, patches).await,
            ErrorCode::BadRequest,
        );
        assert_error(alice.subscribe(bad.clone()).await, ErrorCode::BadRequest);
        assert_error(alice.changes(bad.clone(), 0).await, ErrorCode::BadRequest);
        assert_error(
            alice.grant(bad.clone(), "bob", Access::Read).await,
            ErrorCode::BadRequest,
        );
        assert_error(
            alice.delete_dataset(bad.clone()).await,
            ErrorCode::BadRequest,
        );
    }
    // The owner part of a reference is checked as well.
    assert_error(
        alice.subscribe(DatasetRef::new("", "groceries")).await,
        ErrorCode::BadRequest,
    );

    assert!(alice.closed().is_none());
    assert_usable(&alice).await;
    assert_eq!(alice.list_datasets().await.unwrap(), listed);
    assert_eq!(stored(&alice, &ds).await, before);
    // Every allowed character class works.
    let ok = DatasetRef::own("Az09_.:-");
    let r = alice
        .update(ok, None, vec![Patch::replace("k", "v", 0)])
        .await
        .unwrap();
    assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
}

#[tokio::test]
async fn test_bad_input_dataset_name_over_128_characters_gets_bad_request() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    let long = DatasetRef::own("n".repeat(129));
    let message = assert_error(
        alice
            .update(long.clone(), None, vec![Patch::replace("k", "v", 0)])
            .await,
        ErrorCode::BadRequest,
    );
    assert!(message.contains("128"), "{message}");
    assert_error(alice.subscribe(long).await, ErrorCode::BadRequest);

    assert_eq!(alice.list_datasets().await.unwrap().len(), 1);
    assert_eq!(stored(&alice, &ds).await, before);
    // 128 characters is the longest name allowed.
    let longest = DatasetRef::own("n".repeat(128));
    let r = alice
        .update(longest.clone(), None, vec![Patch::replace("k", "v", 0)])
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
    assert_eq!(alice.subscribe(longest).await.unwrap().0, 1);
}

#[tokio::test]
async fn test_bad_input_empty_key_gets_bad_request_and_the_update_writes_nothing() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    for patch in [Patch::replace("", "v", 0), Patch::remove("", 0)] {
        // A valid patch next to the bad one: the update is all or nothing.
        let patches = vec![Patch::replace("milk", "9", 2), patch];
        let message = assert_error(
            alice.update(ds.clone(), None, patches).await,
            ErrorCode::BadRequest,
        );
        assert!(message.contains("key"), "{message}");
    }

    assert_usable(&alice).await;
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_key_over_max_key_length_gets_too_large_and_the_update_writes_nothing() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    // Length counts characters, not bytes: 1025 two-byte characters.
    let long_key = "é".repeat(1025);
    let patches = vec![
        Patch::replace("milk", "9", 2),
        Patch::replace(long_key.clone(), "v", 0),
    ];
    assert_limit(
        alice.update(ds.clone(), None, patches).await,
        LimitCode::MaxKeyLength,
        1024,
    );
    assert_limit(
        alice
            .update(ds.clone(), None, vec![Patch::remove(long_key, 0)])
            .await,
        LimitCode::MaxKeyLength,
        1024,
    );

    assert_usable(&alice).await;
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    // 1024 characters (2048 bytes) is the longest key allowed.
    let longest = "é".repeat(1024);
    let r = alice
        .update(
            ds.clone(),
            None,
            vec![Patch::replace(longest.clone(), "v", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 4, .. }),
        "{r:?}"
    );
    let (_, records) = stored(&observer, &ds).await;
    assert!(records.iter().any(|r| r.key == longest));
}

#[tokio::test]
async fn test_bad_input_21st_dataset_gets_limit_exceeded_max_datasets() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    for i in 1..=20 {
        let r = alice
            .update(
                DatasetRef::own(format!("ds-{i:02}")),
                None,
                vec![Patch::replace("k", "v", 0)],
            )
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    }
    let listed = alice.list_datasets().await.unwrap();
    assert_eq!(listed.len(), 20);

    let ds21 = DatasetRef::own("ds-21");
    assert_limit(
        alice
            .update(ds21.clone(), None, vec![Patch::replace("k", "v", 0)])
            .await,
        LimitCode::MaxDatasets,
        20,
    );

    assert!(alice.closed().is_none());
    let observer = server.connect("alice").await;
    assert_eq!(observer.list_datasets().await.unwrap(), listed);
    assert_eq!(stored(&observer, &ds21).await, (0, vec![]));
    // Writing to a dataset that already exists is not affected by the limit.
    let r = alice
        .update(
            DatasetRef::own("ds-01"),
            None,
            vec![Patch::replace("k", "w", 1)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 2, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_bad_input_1025th_record_gets_limit_exceeded_max_records() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("big");
    let patches = (0..1024)
        .map(|i| Patch::replace(format!("k{i:04}"), "v", 0))
        .collect();
    let r = alice.update(ds.clone(), None, patches).await.unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
    let before = stored(&alice, &ds).await;
    assert_eq!(before.1.len(), 1024);

    assert_limit(
        alice
            .update(ds.clone(), None, vec![Patch::replace("k1024", "v", 0)])
            .await,
        LimitCode::MaxRecords,
        1024,
    );

    assert!(alice.closed().is_none());
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    // Replacing a record does not add one, and a removal makes room for a new key.
    let r = alice
        .update(
            ds.clone(),
            None,
            vec![
                Patch::replace("k0000", "w", 1),
                Patch::remove("k0001", 1),
                Patch::replace("k1024", "v", 0),
            ],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 2, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_bad_input_more_than_max_patches_gets_limit_exceeded_max_patches() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    let patches = (0..1025)
        .map(|i| Patch::replace(format!("k{i:04}"), "v", 0))
        .collect();
    assert_limit(
        alice.update(ds.clone(), None, patches).await,
        LimitCode::MaxPatches,
        1024,
    );

    assert_usable(&alice).await;
    assert_eq!(stored(&alice, &ds).await, before);
}

#[tokio::test]
async fn test_bad_input_dataset_over_1_mib_gets_too_large_max_dataset_bytes() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("photos");
    let r = alice
        .update(
            ds.clone(),
            None,
            vec![Patch::replace("a", "x".repeat(600_000), 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
    let before = stored(&alice, &ds).await;

    assert_limit(
        alice
            .update(
                ds.clone(),
                None,
                vec![Patch::replace("b", "y".repeat(600_000), 0)],
            )
            .await,
        LimitCode::MaxDatasetBytes,
        1024 * 1024,
    );
    // Growing the existing record past the limit is refused the same way.
    assert_limit(
        alice
            .update(
                ds.clone(),
                None,
                vec![Patch::replace("a", "x".repeat(1024 * 1024), 1)],
            )
            .await,
        LimitCode::MaxDatasetBytes,
        1024 * 1024,
    );

    assert!(alice.closed().is_none());
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    // Up to exactly 1 MiB of keys and values fits: "a" + 600000 + "b" + rest.
    let rest = 1024 * 1024 - 600_002;
    let r = alice
        .update(
            ds.clone(),
            None,
            vec![Patch::replace("b", "y".repeat(rest), 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 2, .. }),
        "{r:?}"
    );
    let info = observer.list_datasets().await.unwrap();
    assert_eq!(info[0].bytes, 1024 * 1024);
}

#[tokio::test]
async fn test_bad_input_other_identity_dataset_without_grant_is_forbidden() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("diary");
    let before = seed(&alice, &ds).await;
    let mut bob = server.connect("bob").await;
    let theirs = DatasetRef::new("alice", "diary");

    assert_error(bob.subscribe(theirs.clone()).await, ErrorCode::Forbidden);
    assert_error(bob.changes(theirs.clone(), 0).await, ErrorCode::Forbidden);
    assert_error(
        bob.update(theirs.clone(), None, vec![Patch::replace("milk", "9", 2)])
            .await,
        ErrorCode::Forbidden,
    );
    assert_error(
        bob.delete_dataset(theirs.clone()).await,
        ErrorCode::Forbidden,
    );
    assert_error(
        bob.grant(theirs.clone(), "bob", Access::Write).await,
        ErrorCode::Forbidden,
    );
    assert_error(
        bob.revoke(theirs.clone(), "carol").await,
        ErrorCode::Forbidden,
    );
    // A dataset that does not exist is forbidden too: existence does not leak.
    let missing = DatasetRef::new("alice", "no-such-dataset");
    assert_error(bob.subscribe(missing.clone()).await, ErrorCode::Forbidden);
    assert_error(bob.changes(missing.clone(), 0).await, ErrorCode::Forbidden);
    assert_error(
        bob.update(missing.clone(), None, vec![Patch::replace("k", "v", 0)])
            .await,
        ErrorCode::Forbidden,
    );

    // The refused subscribe left nothing behind: Alice's next commit is not pushed to Bob.
    alice
        .update(ds.clone(), None, vec![Patch::replace("tea", "1", 0)])
        .await
        .unwrap();
    bob.ping().await.unwrap();
    assert!(
        bob.next_event_timeout(Duration::from_millis(300))
            .await
            .is_none()
    );

    assert!(bob.closed().is_none());
    bob.update(
        DatasetRef::own("mine"),
        None,
        vec![Patch::replace("k", "v", 0)],
    )
    .await
    .unwrap();
    let (n, records) = stored(&alice, &ds).await;
    assert_eq!(n, before.0 + 1);
    assert_eq!(
        records
            .iter()
            .filter(|r| r.key != "tea")
            .cloned()
            .collect::<Vec<_>>(),
        before.1
    );
    let (n, _) = stored(&alice, &DatasetRef::own("no-such-dataset")).await;
    assert_eq!(n, 0, "bob's refused write did not create alice's dataset");
    assert!(
        bob.list_datasets()
            .await
            .unwrap()
            .iter()
            .all(|d| d.dataset.owner.as_deref() == Some("bob"))
    );
}

#[tokio::test]
async fn test_bad_input_write_with_only_a_read_grant_is_forbidden() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("diary");
    let before = seed(&alice, &ds).await;
    alice.grant(ds.clone(), "bob", Access::Read).await.unwrap();
    let bob = server.connect("bob").await;
    let theirs = DatasetRef::new("alice", "diary");
    let (n, _) = bob.subscribe(theirs.clone()).await.unwrap();
    assert_eq!(n, before.0);

    let message = assert_error(
        bob.update(
            theirs.clone(),
            Some("laptop".into()),
            vec![
                Patch::replace("milk", "9", 2),
                Patch::replace("tea", "1", 0),
            ],
        )
        .await,
        ErrorCode::Forbidden,
    );
    assert!(message.contains("write"), "{message}");
    assert_error(
        bob.update(theirs.clone(), None, vec![Patch::remove("milk", 2)])
            .await,
        ErrorCode::Forbidden,
    );
    // Only the owner may delete or share.
    assert_error(
        bob.delete_dataset(theirs.clone()).await,
        ErrorCode::Forbidden,
    );
    assert_error(
        bob.grant(theirs.clone(), "bob", Access::Write).await,
        ErrorCode::Forbidden,
    );

    // Reading still works on the same connection, and nothing changed.
    assert!(bob.closed().is_none());
    assert_eq!(stored(&bob, &theirs).await, before);
    assert_eq!(stored(&alice, &ds).await, before);
    let shared = bob.list_datasets().await.unwrap();
    assert_eq!(shared.len(), 1);
    assert_eq!(shared[0].access, Access::Read);
}

#[tokio::test]
async fn test_bad_input_stale_sync_count_gets_conflict_and_writes_nothing() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;
    let milk = before.1.iter().find(|r| r.key == "milk").unwrap().clone();
    assert_eq!(milk.sync_count, 2);

    // "milk" was last seen at 1 (stale); "bread" is new and fine; the update is all or
    // nothing, so neither is written.
    let r = alice
        .update(
            ds.clone(),
            Some("tablet".into()),
            vec![
                Patch::replace("bread", "1", 0),
                Patch::replace("milk", "3", 1),
            ],
        )
        .await
        .unwrap();
    let UpdateResult::Conflict {
        sync_count,
        conflicts,
    } = r
    else {
        panic!("expected a conflict, got {r:?}");
    };
    assert_eq!(sync_count, 3);
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].key, "milk");
    assert_eq!(conflicts[0].server.as_ref(), Some(&milk));

    // A key believed absent (0) that exists is stale too; a removal at a stale count also.
    let r = alice
        .update(ds.clone(), None, vec![Patch::remove("milk", 0)])
        .await
        .unwrap();
    assert!(
        matches!(&r, UpdateResult::Conflict { sync_count: 3, conflicts } if conflicts[0].server.as_ref() == Some(&milk)),
        "{r:?}"
    );
    // A sync count from the future is as stale as one from the past.
    let r = alice
        .update(ds.clone(), None, vec![Patch::replace("milk", "3", 99)])
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Conflict { sync_count: 3, .. }),
        "{r:?}"
    );

    assert!(alice.closed().is_none());
    let observer = server.connect("alice").await;
    assert_eq!(stored(&observer, &ds).await, before);
    // The client resolves with the server's record and retries.
    let r = alice
        .update(
            ds.clone(),
            None,
            vec![
                Patch::replace("bread", "1", 0),
                Patch::replace("milk", "3", milk.sync_count),
            ],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 4, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_bad_input_device_id_over_max_length_gets_too_large_and_writes_nothing() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("groceries");
    let before = seed(&alice, &ds).await;

    assert_limit(
        alice
            .update(
                ds.clone(),
                Some("d".repeat(129)),
                vec![Patch::replace("milk", "9", 2)],
            )
            .await,
        LimitCode::MaxDeviceIdLength,
        128,
    );

    assert_usable(&alice).await;
    assert_eq!(stored(&alice, &ds).await, before);
    // 128 characters is the longest device id allowed.
    let r = alice
        .update(
            ds.clone(),
            Some("é".repeat(128)),
            vec![Patch::replace("milk", "9", 2)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 4, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_bad_input_101st_subscription_gets_limit_exceeded_max_subscriptions() {
    let server = TestServer::start();
    let mut bob = server.connect("bob").await;
    for i in 0..100 {
        bob.subscribe(DatasetRef::own(format!("feed-{i:03}")))
            .await
            .unwrap();
    }
    assert_limit(
        bob.subscribe(DatasetRef::own("feed-100")).await,
        LimitCode::MaxSubscriptions,
        100,
    );
    // The refused subscription receives nothing; re-subscribing to a current one is fine,
    // and unsubscribing makes room.
    bob.update(
        DatasetRef::own("feed-100"),
        None,
        vec![Patch::replace("k", "v", 0)],
    )
    .await
    .unwrap();
    bob.ping().await.unwrap();
    assert!(
        bob.next_event_timeout(Duration::from_millis(300))
            .await
            .is_none()
    );
    bob.subscribe(DatasetRef::own("feed-000")).await.unwrap();
    bob.unsubscribe(DatasetRef::own("feed-000")).await.unwrap();
    let (n, records) = bob.subscribe(DatasetRef::own("feed-100")).await.unwrap();
    assert_eq!((n, records.len()), (1, 1));
    assert!(bob.closed().is_none());
}

/// A server that allows 5 requests per second, a raw socket authenticated on it (the auth
/// frame took one of the 5 tokens of the first second), and when that was.
async fn five_per_second() -> (TestServer, RawSocket, std::time::Instant) {
    let server = TestServer::builder()
        .arg("--max-requests-per-second", 5)
        .start();
    let raw = RawSocket::authenticated(&server, "bob").await;
    (server, raw, std::time::Instant::now())
}

async fn send_ping(raw: &mut RawSocket) {
    let ping = ClientFrame::Ping {
        id: Some(RequestId::Num(1)),
    };
    raw.send(0x1, ping.to_json().as_bytes()).await;
}

#[tokio::test]
async fn test_bad_input_requests_over_max_requests_per_second_get_rate_limited_and_write_nothing() {
    let (server, mut raw, started) = five_per_second().await;
    const SENT: usize = 20;
    for i in 0..SENT {
        let update = ClientFrame::Update {
            id: RequestId::Str(format!("u{i}")),
            dataset: DatasetRef::own("burst"),
            device_id: None,
            patches: vec![Patch::replace(format!("k{i:02}"), "v", 0)],
        };
        raw.send(0x1, update.to_json().as_bytes()).await;
    }
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    for _ in 0..SENT {
        match raw.recv_frame().await {
            ServerFrame::Ack {
                id: RequestId::Str(id),
                ..
            } => acked.push(id),
            ServerFrame::Error {
                id: Some(RequestId::Str(id)),
                code: ErrorCode::RateLimited,
                limit: Some(LimitCode::MaxRequestsPerSecond),
                max: Some(5),
                message,
            } => {
                assert!(message.contains("retry in"), "{message}");
                refused.push(id);
            }
            other => panic!("expected an ack or rate_limited, got {other:?}"),
        }
    }
    // A burst of 5 (one went to auth), plus what refilled at 5 per second while the burst
    // was being served (each accepted update is a durable commit, so a slow disk adds some).
    let refilled = (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (4..=4 + refilled + 1).contains(&acked.len()),
        "acked {acked:?} with {refilled} refilled"
    );
    assert!(!refused.is_empty(), "nothing was refused");
    assert_eq!(acked.len() + refused.len(), SENT);
    // Exactly the acknowledged updates were written, in order, one sync count each.
    let conn = server.connect("bob").await;
    let (sync_count, records) = stored(&conn, &DatasetRef::own("burst")).await;
    assert_eq!(sync_count, acked.len() as u64);
    let keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    let expected: Vec<String> = acked
        .iter()
        .map(|id| format!("k{:02}", &id[1..].parse::<usize>().unwrap()))
        .collect();
    assert_eq!(keys, expected);
    // After a pause the same connection is served again. The pause is the behaviour under
    // test, not a wait for a condition: the limiter refills with time, and the server is
    // another process, so tokio's paused time cannot stand in for it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send_ping(&mut raw).await;
    assert!(matches!(raw.recv_frame().await, ServerFrame::Pong { .. }));
}

/// Sends `n` text frames that are not JSON.
async fn send_garbage(raw: &mut RawSocket, n: usize) {
    for _ in 0..n {
        raw.send(0x1, b"{not json").await;
    }
}

#[tokio::test]
async fn test_bad_input_flood_of_malformed_frames_gets_rate_limited() {
    let (_server, mut raw, started) = five_per_second().await;
    const SENT: usize = 50;
    send_garbage(&mut raw, SENT).await;
    let (mut bad, mut limited) = (0, 0);
    for _ in 0..SENT {
        match raw.recv_frame().await {
            ServerFrame::Error {
                id: None,
                code: ErrorCode::BadRequest,
                ..
            } => bad += 1,
            ServerFrame::Error {
                id: None,
                code: ErrorCode::RateLimited,
                limit: Some(LimitCode::MaxRequestsPerSecond),
                max: Some(5),
                ..
            } => limited += 1,
            other => panic!("expected bad_request or rate_limited, got {other:?}"),
        }
    }
    // Only what fits the rate is looked at (and answered `bad_request`).
    let refilled = (5.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (4..=4 + refilled + 1).contains(&bad),
        "{bad} bad_request, {limited} rate_limited, {refilled} refilled"
    );
    assert_eq!(bad + limited, SENT);
    // Far below max_bad_frames: the connection stays open and answers (if only to refuse).
    send_ping(&mut raw).await;
    let reply = raw.recv_frame().await;
    assert!(
        matches!(
            reply,
            ServerFrame::Pong { .. }
                | ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }
        ),
        "{reply:?}"
    );
}

#[tokio::test]
async fn test_bad_input_flood_of_malformed_frames_closes_with_too_many_bad_frames() {
    let server = TestServer::start();
    let mut raw = RawSocket::authenticated(&server, "bob").await;
    let started = std::time::Instant::now();
    // The default max_bad_frames is 100 per 10 s.
    send_garbage(&mut raw, 200).await;
    let mut bad = 0;
    let code = loop {
        let (opcode, payload) = raw.recv().await.expect("a close frame");
        if opcode == 0x8 {
            break (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        }
        let frame: ServerFrame = serde_json::from_slice(&payload).unwrap();
        assert!(
            matches!(
                frame,
                ServerFrame::Error {
                    code: ErrorCode::BadRequest,
                    ..
                }
            ),
            "{frame:?}"
        );
        bad += 1;
    };
    assert_eq!(code, Some(CloseCode::TooManyBadFrames.code()));
    assert!(!CloseCode::TooManyBadFrames.reconnect());
    // 100 at once, one more for each tenth of a second the flood took, then the one that
    // went over the limit.
    let refilled = (10.0 * started.elapsed().as_secs_f64()).ceil() as usize;
    assert!(
        (101..=101 + refilled).contains(&bad),
        "{bad} bad_request answers, {refilled} refilled"
    );
    // Only that connection was closed.
    let bob = server.connect("bob").await;
    assert_usable(&bob).await;
}
