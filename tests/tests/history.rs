//! Version history and restore, end to end: `history`, `read_at` and `restore` over the
//! WebSocket and the REST API, on SQLite and on PostgreSQL, against a real server process.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use tandem_client::{ClientError, Connection};
use tandem_protocol::{Access, CommitKind, DatasetRef, ErrorCode, Patch, Record};
use tandem_tests::cluster::{PgSchema, psql};
use tandem_tests::{TestServer, metric, next_push};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn postgres(schema: &PgSchema) -> TestServer {
    TestServer::builder()
        .arg("--store", &schema.url)
        .arg("--postgres-schema", &schema.name)
        .arg("--postgres-pool-size", 4)
        .start()
}

fn values(records: &[Record]) -> BTreeMap<String, Option<String>> {
    records
        .iter()
        .map(|r| (r.key.clone(), r.value.clone()))
        .collect()
}

fn code<T: std::fmt::Debug>(result: Result<T, ClientError>) -> ErrorCode {
    match result {
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("not a server error: {e}")),
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

/// Alice writes, Bob (a write grantee) writes, Bob restores the dataset to Alice's commit:
/// the new commit holds exactly the old state, a subscriber gets it live, and history shows
/// the three commits with who, which device and which keys. A read grantee may read the
/// history and the past but not restore.
async fn two_writers_and_a_restore(server: &TestServer) {
    let alice = server.connect("alice").await;
    let bob = server.connect("bob").await;
    let carol = server.connect("carol").await;
    let mut watcher = server.connect("alice").await;
    let own = DatasetRef::own("notes");
    let notes = DatasetRef::new("alice", "notes");

    alice
        .update(
            own.clone(),
            Some("laptop".into()),
            vec![Patch::replace("a", "1", 0), Patch::replace("b", "2", 0)],
        )
        .await
        .unwrap();
    alice
        .grant(own.clone(), "bob", Access::Write)
        .await
        .unwrap();
    alice
        .grant(own.clone(), "carol", Access::Read)
        .await
        .unwrap();
    let (_, at_one) = watcher.subscribe(notes.clone()).await.unwrap();
    bob.update(
        notes.clone(),
        Some("phone".into()),
        vec![Patch::replace("a", "bob", 1), Patch::replace("c", "3", 0)],
    )
    .await
    .unwrap();
    let (n, _) = next_push(&mut watcher).await;
    assert_eq!(n, 2);

    // The past as it was, with its stamps.
    assert_eq!(carol.read_at(notes.clone(), 1).await.unwrap(), at_one);
    assert_eq!(
        code(carol.restore(notes.clone(), 1, None).await),
        ErrorCode::Forbidden,
        "a read grantee cannot restore"
    );
    assert_eq!(
        code(bob.restore(notes.clone(), 9, None).await),
        ErrorCode::BadRequest
    );

    let restored = bob
        .restore(notes.clone(), 1, Some("phone".into()))
        .await
        .unwrap();
    assert_eq!(restored, 3);
    let (n, pushed) = next_push(&mut watcher).await;
    assert_eq!(n, 3, "the restore is pushed like any commit");
    assert_eq!(values(&pushed), values(&at_one));
    let a = pushed.iter().find(|r| r.key == "a").unwrap();
    assert_eq!((a.sync_count, a.last_modified_by.as_str()), (3, "bob"));
    assert_eq!(
        values(&alice.read_at(own.clone(), 3).await.unwrap()),
        values(&at_one)
    );
    // Nothing differs any more: acknowledged at the current count, no commit.
    assert_eq!(alice.restore(own.clone(), 3, None).await.unwrap(), 3);

    let page = carol.history(notes.clone(), None, None).await.unwrap();
    assert_eq!(page.sync_count, 3);
    assert_eq!(page.next, None);
    let shown: Vec<_> = page
        .entries
        .iter()
        .map(|e| {
            (
                e.kind,
                e.sync_count,
                e.actor.as_str(),
                e.device_id.as_deref(),
                e.keys.clone().unwrap_or_default(),
            )
        })
        .collect();
    let keys = |k: &[&str]| k.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(
        shown,
        [
            (
                CommitKind::Update,
                3,
                "bob",
                Some("phone"),
                keys(&["a", "c"])
            ),
            (
                CommitKind::Update,
                2,
                "bob",
                Some("phone"),
                keys(&["a", "c"])
            ),
            (CommitKind::Grant, 1, "alice", None, vec![]),
            (CommitKind::Grant, 1, "alice", None, vec![]),
            (
                CommitKind::Update,
                1,
                "alice",
                Some("laptop"),
                keys(&["a", "b"])
            ),
        ]
    );
    assert_eq!(page.entries[2].grantee.as_deref(), Some("carol"));
    assert_eq!(page.entries[2].access, Some(Access::Read));
    // A page at a time.
    let first = alice.history(own.clone(), None, Some(2)).await.unwrap();
    assert_eq!(first.entries, page.entries[..2]);
    let rest = alice
        .history(own.clone(), first.next, Some(10))
        .await
        .unwrap();
    assert_eq!(rest.entries, page.entries[2..]);
    assert_eq!(rest.next, None);
    // A stranger sees nothing.
    let mallory = server.connect("mallory").await;
    assert_eq!(
        code(mallory.history(notes.clone(), None, None).await),
        ErrorCode::Forbidden
    );
}

#[tokio::test]
async fn test_history_restore_by_a_write_grantee_on_sqlite() {
    let server = TestServer::start();
    two_writers_and_a_restore(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_history_restore_by_a_write_grantee_on_postgres() {
    let schema = PgSchema::create();
    let server = postgres(&schema);
    two_writers_and_a_restore(&server).await;
}

/// A deleted dataset restored to a count before its delete is re-created with those records;
/// the delete shows in history with the keys it removed.
async fn restore_across_a_delete(server: &TestServer) {
    let alice = server.connect("alice").await;
    let list = DatasetRef::own("list");
    alice
        .update(list.clone(), None, vec![Patch::replace("x", "1", 0)])
        .await
        .unwrap();
    alice
        .update(list.clone(), None, vec![Patch::replace("y", "2", 0)])
        .await
        .unwrap();
    let before = alice.read_at(list.clone(), 2).await.unwrap();
    alice.delete_dataset(list.clone()).await.unwrap();
    assert!(alice.read_at(list.clone(), 3).await.unwrap().is_empty());

    assert_eq!(alice.restore(list.clone(), 2, None).await.unwrap(), 4);
    let (n, records) = alice.subscribe(list.clone()).await.unwrap();
    assert_eq!(n, 4);
    assert_eq!(values(&records), values(&before));
    let page = alice.history(list.clone(), None, None).await.unwrap();
    let delete = &page.entries[1];
    assert_eq!((delete.kind, delete.sync_count), (CommitKind::Delete, 3));
    assert_eq!(delete.keys, Some(vec!["x".to_owned(), "y".to_owned()]));
    assert!(
        alice
            .list_datasets()
            .await
            .unwrap()
            .iter()
            .any(|d| d.dataset.name == "list")
    );
}

#[tokio::test]
async fn test_history_restore_across_a_delete_on_sqlite() {
    let server = TestServer::start();
    restore_across_a_delete(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_history_restore_across_a_delete_on_postgres() {
    let schema = PgSchema::create();
    let server = postgres(&schema);
    restore_across_a_delete(&server).await;
}

/// Once the commits after a count are gone from the log (as compaction drops a dataset's
/// oldest entries past `commit_log_max_entries_per_dataset`), that count cannot be read or
/// restored: `history_unavailable`, over the WebSocket and REST alike; later counts still can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_history_unavailable_once_the_log_dropped_the_commits_after_it() {
    let schema = PgSchema::create();
    let server = postgres(&schema);
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("long");
    for n in 0..5u64 {
        alice
            .update(
                ds.clone(),
                None,
                vec![Patch::replace("k", format!("v{n}"), n)],
            )
            .await
            .unwrap();
    }
    // What compaction with a cap of 3 entries per dataset leaves: sync counts 3, 4 and 5.
    psql(
        &schema.url,
        &format!(
            "DELETE FROM {}.commit_log WHERE owner = 'alice' AND name = 'long' AND sync_count <= 2",
            schema.name
        ),
    );
    assert_eq!(
        values(&alice.read_at(ds.clone(), 2).await.unwrap()),
        BTreeMap::from([("k".to_owned(), Some("v1".to_owned()))])
    );
    assert_eq!(
        code(alice.read_at(ds.clone(), 1).await),
        ErrorCode::HistoryUnavailable
    );
    assert_eq!(
        code(alice.restore(ds.clone(), 1, None).await),
        ErrorCode::HistoryUnavailable
    );
    let reply = rest(&server, "GET", "/v1/datasets/alice/long/at/1", "alice", "").await;
    assert_eq!(reply.status, 410, "{:?}", reply.body);
    assert_eq!(reply.body["code"], "history_unavailable");
    // Counted like any error: two over the WebSocket, one over REST.
    assert_eq!(
        metric(
            &server,
            "tandem_gateway_errors_total{code=\"history_unavailable\"}"
        )
        .await,
        3
    );
    // History shows what is left.
    let page = alice.history(ds.clone(), None, None).await.unwrap();
    let counts: Vec<u64> = page.entries.iter().map(|e| e.sync_count).collect();
    assert_eq!(counts, [5, 4, 3]);
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

/// One HTTP/1.1 request to the server, as `identity` (a token of the test secret) unless it
/// is empty, read to the end.
async fn rest(server: &TestServer, method: &str, path: &str, identity: &str, body: &str) -> Reply {
    let auth = if identity.is_empty() {
        String::new()
    } else {
        format!("Authorization: Bearer {}\r\n", server.token(identity))
    };
    raw(server.addr, method, path, &auth, body).await
}

async fn raw(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &str) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

/// The REST API does what the WebSocket requests do, with the same token and codes: a page
/// of history, the dataset at a count, a restore pushed to a WebSocket subscriber; refusals
/// with their statuses.
#[tokio::test]
async fn test_history_rest_api() {
    let server = TestServer::builder()
        .arg("--max-rest-body-bytes", 200)
        .arg("--max-rest-requests-per-second", 50)
        .start();
    let alice = server.connect("alice").await;
    let own = DatasetRef::own("doc");
    alice
        .update(own.clone(), None, vec![Patch::replace("title", "draft", 0)])
        .await
        .unwrap();
    alice
        .update(
            own.clone(),
            Some("tablet".into()),
            vec![Patch::replace("title", "final", 1)],
        )
        .await
        .unwrap();
    alice
        .grant(own.clone(), "reader", Access::Read)
        .await
        .unwrap();
    let mut watcher: Connection = server.connect("reader").await;
    watcher
        .subscribe(DatasetRef::new("alice", "doc"))
        .await
        .unwrap();

    let page = rest(
        &server,
        "GET",
        "/v1/datasets/alice/doc/history?limit=2",
        "reader",
        "",
    )
    .await;
    assert_eq!(page.status, 200, "{:?}", page.body);
    assert_eq!(page.body["syncCount"], 2);
    assert_eq!(
        page.body["dataset"],
        json!({"owner": "alice", "name": "doc"})
    );
    let entries = page.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["kind"], "grant");
    assert_eq!(entries[1]["kind"], "update");
    assert_eq!(entries[1]["deviceId"], "tablet");
    assert_eq!(entries[1]["keys"], json!(["title"]));
    let next = page.body["next"].as_i64().unwrap();
    let older = rest(
        &server,
        "GET",
        &format!("/v1/datasets/alice/doc/history?before={next}"),
        "reader",
        "",
    )
    .await;
    assert_eq!(older.body["entries"].as_array().unwrap().len(), 1);
    assert_eq!(older.body["next"], Value::Null);

    let at = rest(&server, "GET", "/v1/datasets/alice/doc/at/1", "reader", "").await;
    assert_eq!(at.status, 200, "{:?}", at.body);
    assert_eq!(at.body["syncCount"], 1);
    assert_eq!(at.body["records"][0]["value"], "draft");
    assert_eq!(at.body["records"][0]["syncCount"], 1);

    // Refusals: who, what, how much.
    let forbidden = rest(
        &server,
        "POST",
        "/v1/datasets/alice/doc/restore",
        "reader",
        r#"{"syncCount":1}"#,
    )
    .await;
    assert_eq!(forbidden.status, 403);
    assert_eq!(forbidden.body["code"], "forbidden");
    let anonymous = rest(&server, "GET", "/v1/datasets/alice/doc/at/1", "", "").await;
    assert_eq!(anonymous.status, 401);
    assert_eq!(anonymous.body["code"], "unauthorized");
    assert!(
        anonymous
            .headers
            .iter()
            .any(|(n, v)| n == "www-authenticate" && v == "Bearer")
    );
    let bad_token = raw(
        server.addr,
        "GET",
        "/v1/datasets/alice/doc/at/1",
        "Authorization: Bearer not.a.jwt\r\n",
        "",
    )
    .await;
    assert_eq!(bad_token.status, 401);
    let stranger = rest(
        &server,
        "GET",
        "/v1/datasets/alice/doc/history",
        "mallory",
        "",
    )
    .await;
    assert_eq!(stranger.status, 403);
    let bad_count = rest(&server, "GET", "/v1/datasets/alice/doc/at/one", "alice", "").await;
    assert_eq!(bad_count.status, 400);
    assert_eq!(bad_count.body["code"], "bad_request");
    let ahead = rest(&server, "GET", "/v1/datasets/alice/doc/at/7", "alice", "").await;
    assert_eq!(ahead.status, 400);
    let bad_body = rest(
        &server,
        "POST",
        "/v1/datasets/alice/doc/restore",
        "alice",
        r#"{"sync":1}"#,
    )
    .await;
    assert_eq!(bad_body.status, 400);
    let big = format!(r#"{{"syncCount":1,"deviceId":"{}"}}"#, "d".repeat(300));
    let too_large = rest(
        &server,
        "POST",
        "/v1/datasets/alice/doc/restore",
        "alice",
        &big,
    )
    .await;
    assert_eq!(too_large.status, 413);
    assert_eq!(too_large.body["limit"], "max_rest_body_bytes");
    assert_eq!(too_large.body["max"], 200);

    let restored = rest(
        &server,
        "POST",
        "/v1/datasets/alice/doc/restore",
        "alice",
        r#"{"syncCount":1,"deviceId":"web"}"#,
    )
    .await;
    assert_eq!(restored.status, 200, "{:?}", restored.body);
    assert_eq!(
        restored.body,
        json!({"dataset": {"owner": "alice", "name": "doc"}, "syncCount": 3})
    );
    let (n, records) = next_push(&mut watcher).await;
    assert_eq!(n, 3);
    assert_eq!(records[0].value.as_deref(), Some("draft"));
    assert_eq!(records[0].device_id.as_deref(), Some("web"));
}

/// REST requests past `max_rest_requests_per_second` for one identity are refused with 429,
/// `Retry-After` and the limit's code; another identity is not affected.
#[tokio::test]
async fn test_history_rest_rate_limit_is_per_identity() {
    let server = TestServer::builder()
        .arg("--max-rest-requests-per-second", 1)
        .start();
    let mut refused = None;
    // A burst of one per second: one of a quick series is refused.
    for _ in 0..20 {
        let reply = rest(
            &server,
            "GET",
            "/v1/datasets/alice/doc/history",
            "alice",
            "",
        )
        .await;
        if reply.status == 429 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200, "{:?}", reply.body);
    }
    let refused = refused.expect("a request past the rate is refused");
    assert_eq!(refused.body["code"], "rate_limited");
    assert_eq!(refused.body["limit"], "max_rest_requests_per_second");
    assert!(refused.headers.iter().any(|(n, _)| n == "retry-after"));
    let other = rest(&server, "GET", "/v1/datasets/bob/doc/history", "bob", "").await;
    assert_eq!(other.status, 200, "{:?}", other.body);
}

/// A restore is an update for the sync hook: it is asked with the restoring patches (and may
/// rewrite them), and a hook that fails refuses the restore with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_history_restore_goes_through_the_sync_hook() {
    use tandem_tests::hook::{Hook, Mode, SECRET};
    let hook = Hook::start().await;
    let server = TestServer::builder()
        .arg("--sync-hook-url", hook.url())
        .arg("--sync-hook-secret", SECRET)
        .start();
    let alice = server.connect("alice").await;
    let notes = DatasetRef::own("notes");
    // The hook's policy upper-cases `title`.
    alice
        .update(
            notes.clone(),
            None,
            vec![Patch::replace("title", "hello", 0)],
        )
        .await
        .unwrap();
    alice
        .update(notes.clone(), None, vec![Patch::replace("title", "bye", 1)])
        .await
        .unwrap();
    assert_eq!(hook.calls(), 2);
    assert_eq!(alice.restore(notes.clone(), 1, None).await.unwrap(), 3);
    assert_eq!(hook.calls(), 3, "the restore asked the hook");
    let now = alice.read_at(notes.clone(), 3).await.unwrap();
    assert_eq!(now[0].value.as_deref(), Some("HELLO"));

    hook.set(Mode::Fail);
    assert_eq!(
        code(alice.restore(notes.clone(), 2, None).await),
        ErrorCode::Unavailable
    );
    let page = alice.history(notes.clone(), None, None).await.unwrap();
    assert_eq!(page.sync_count, 3, "nothing written");
}

/// A sync hook that, while `interfere` is above zero, answers each of alice's calls only
/// after bob has written key `a` of `alice/race` (so alice's restore, asked about its
/// patches, finds them stale at commit), and accepts everything.
async fn interfering_hook(
    bob: std::sync::Arc<tokio::sync::Mutex<Option<Connection>>>,
    interfere: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> SocketAddr {
    use std::sync::atomic::Ordering;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut n = 0u32;
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let (bob, interfere) = (bob.clone(), interfere.clone());
            n += 1;
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read the head, then the body by its length.
                let body = loop {
                    let read = socket.read(&mut chunk).await.unwrap_or(0);
                    if read == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..read]);
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length: usize = head
                            .lines()
                            .find_map(|l| {
                                let (name, value) = l.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse().ok())?
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break body.to_owned();
                        }
                    }
                };
                let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                if request["identity"] == "alice"
                    && interfere
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                {
                    let guard = bob.lock().await;
                    let bob = guard.as_ref().unwrap();
                    let race = DatasetRef::new("alice", "race");
                    let (_, records) = bob.changes(race.clone(), 0).await.unwrap();
                    let base = records.iter().find(|r| r.key == "a").unwrap().sync_count;
                    bob.update(
                        race,
                        None,
                        vec![Patch::replace("a", format!("bob-{n}"), base)],
                    )
                    .await
                    .unwrap();
                }
                let answer = r#"{"action":"accept"}"#;
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    addr
}

/// A commit that lands on a key the restore writes, between its read and its write, makes
/// it read and try again (it still ends at the state it was asked for); one that keeps
/// landing makes it give up with `conflict` and nothing of its own written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_history_restore_retries_when_a_concurrent_commit_makes_it_stale() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let bob_slot = Arc::new(tokio::sync::Mutex::new(None));
    let interfere = Arc::new(AtomicUsize::new(0));
    let hook = interfering_hook(bob_slot.clone(), interfere.clone()).await;
    let server = TestServer::builder()
        .arg("--sync-hook-url", format!("http://{hook}/hook"))
        .start();
    let alice = server.connect("alice").await;
    let race = DatasetRef::own("race");
    alice
        .update(race.clone(), None, vec![Patch::replace("a", "first", 0)])
        .await
        .unwrap();
    alice
        .update(race.clone(), None, vec![Patch::replace("a", "second", 1)])
        .await
        .unwrap();
    alice
        .grant(race.clone(), "bob", Access::Write)
        .await
        .unwrap();
    *bob_slot.lock().await = Some(server.connect("bob").await);

    // Once in the way: bob's commit (3) lands, the restore tries again and commits (4).
    interfere.store(1, Ordering::SeqCst);
    assert_eq!(alice.restore(race.clone(), 1, None).await.unwrap(), 4);
    let now = alice.read_at(race.clone(), 4).await.unwrap();
    assert_eq!(now[0].value.as_deref(), Some("first"));
    let page = alice.history(race.clone(), None, Some(2)).await.unwrap();
    let who: Vec<(&str, u64)> = page
        .entries
        .iter()
        .map(|e| (e.actor.as_str(), e.sync_count))
        .collect();
    assert_eq!(who, [("alice", 4), ("bob", 3)]);

    // Always in the way: after its tries, `conflict`; only bob's commits were written.
    interfere.store(100, Ordering::SeqCst);
    assert_eq!(
        code(alice.restore(race.clone(), 2, None).await),
        ErrorCode::Conflict
    );
    let page = alice.history(race.clone(), None, Some(10)).await.unwrap();
    let tries = 100 - interfere.load(Ordering::SeqCst);
    assert!(tries >= 2, "{tries}");
    assert_eq!(page.sync_count, 4 + tries as u64);
    assert!(page.entries[..tries].iter().all(|e| e.actor == "bob"));
}
