//! The sync hook against real processes: a node started with `--sync-hook-url` and a real
//! HTTP hook server in the test. The hook rejects and rewrites (WebSocket writers see the
//! `rejected` code and the rewritten value), a hook past its timeout and a failing or gone
//! hook refuse the update as `unavailable` with nothing written, and the breaker opens and
//! closes. The Cognito REST side is in `cognito_sync.rs`.

use std::time::Duration;
use tandem_client::{ClientError, Connection, UpdateResult};
use tandem_protocol::{DatasetRef, ErrorCode, Patch};
use tandem_tests::TestServer;
use tandem_tests::hook::{Hook, Mode, SECRET};

fn node(hook: &Hook, extra: &[(&str, &str)]) -> TestServer {
    let mut builder = TestServer::builder()
        .arg("--sync-hook-url", hook.url())
        .arg("--sync-hook-secret", SECRET);
    for (name, value) in extra {
        builder = builder.arg(name, value);
    }
    builder.start()
}

async fn write(conn: &Connection, key: &str, value: &str) -> Result<UpdateResult, ClientError> {
    conn.update(
        DatasetRef::own("notes"),
        Some("dev-1".into()),
        vec![Patch::replace(key, value, 0)],
    )
    .await
}

fn code(result: Result<UpdateResult, ClientError>) -> ErrorCode {
    match result {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("not refused: {other:?}"),
    }
}

/// What the store holds for `alice/notes`, tombstones included.
async fn stored(server: &TestServer) -> Vec<(String, Option<String>)> {
    let conn = server.connect("alice").await;
    let (_, records) = conn.changes(DatasetRef::own("notes"), 0).await.unwrap();
    records.into_iter().map(|r| (r.key, r.value)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_hook_rejects_and_rewrites_websocket_writes() {
    let hook = Hook::start().await;
    let server = node(&hook, &[]);
    let alice = server.connect("alice").await;

    match write(&alice, "title", "hello").await.unwrap() {
        UpdateResult::Committed { records, .. } => {
            assert_eq!(records[0].value.as_deref(), Some("HELLO"));
        }
        other => panic!("{other:?}"),
    }
    match write(&alice, "body", "far too long a value").await {
        Err(ClientError::Server { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Rejected);
            assert!(message.contains("at most 10"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        stored(&server).await,
        [("title".to_owned(), Some("HELLO".to_owned()))]
    );
    assert_eq!(hook.calls(), 2);
    assert_eq!(
        hook.bad_signatures(),
        0,
        "every request carried a valid signature"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_hook_past_its_timeout_refuses_as_unavailable_and_writes_nothing() {
    let hook = Hook::start().await;
    let server = node(&hook, &[("--sync-hook-timeout", "300ms")]);
    let alice = server.connect("alice").await;
    hook.set(Mode::Sleep);
    assert_eq!(code(write(&alice, "k", "v").await), ErrorCode::Unavailable);
    assert!(stored(&server).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_hook_failing_or_gone_opens_the_breaker_which_closes_again() {
    let hook = Hook::start().await;
    let server = node(
        &hook,
        &[
            ("--sync-hook-breaker-failures", "2"),
            ("--sync-hook-breaker-open", "1s"),
        ],
    );
    let alice = server.connect("alice").await;

    hook.set(Mode::Fail);
    assert_eq!(code(write(&alice, "a", "1").await), ErrorCode::Unavailable);
    assert_eq!(code(write(&alice, "a", "1").await), ErrorCode::Unavailable);
    assert_eq!(hook.calls(), 2);
    // Open: refused without calling the hook.
    assert_eq!(code(write(&alice, "a", "1").await), ErrorCode::Unavailable);
    assert_eq!(hook.calls(), 2);
    assert!(stored(&server).await.is_empty());

    // After the open period one call tries again; the hook is fine now, so it closes.
    hook.set(Mode::Policy);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(
        write(&alice, "a", "1").await.unwrap(),
        UpdateResult::Committed { .. }
    ));
    assert_eq!(hook.calls(), 3);

    // A hook that is gone (connection refused) is a failure like any other.
    let addr = hook.stop();
    assert_eq!(code(write(&alice, "b", "2").await), ErrorCode::Unavailable);
    assert_eq!(code(write(&alice, "b", "2").await), ErrorCode::Unavailable);
    let back = Hook::start_at(addr).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(matches!(
        write(&alice, "b", "2").await.unwrap(),
        UpdateResult::Committed { .. }
    ));
    assert_eq!(back.calls(), 1);
    assert_eq!(
        stored(&server).await,
        [
            ("a".to_owned(), Some("1".to_owned())),
            ("b".to_owned(), Some("2".to_owned()))
        ]
    );
}
