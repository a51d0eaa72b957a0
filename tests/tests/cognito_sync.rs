//! The Cognito Sync REST API against a real server: credentials issued with the server's
//! secret, requests signed by a SigV4 signer written here from the AWS rules (independent of
//! the server's verifier), the data-plane walk and the live bridge to WebSocket subscribers.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};
use tandem_cognito::{CredentialKeys, Credentials};
use tandem_protocol::{DatasetRef, Patch};
use tandem_tests::cluster::{PgSchema, redis_url, unique};
use tandem_tests::{SECRET, TestServer, metric, next_push, push_at_least};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const ALICE: &str = "us-east-1:aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa";
const BOB: &str = "us-east-1:bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb";

fn server() -> TestServer {
    TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--max-records", 3)
        .start()
}

fn credentials(identity: &str) -> Credentials {
    CredentialKeys::derive(SECRET.as_bytes()).issue(identity, POOL, SystemTime::now())
}

/// The path of an identity's resource, percent-encoded as the SDKs send it.
fn path(identity: &str, rest: &str) -> String {
    format!(
        "/identitypools/{}/identities/{}{rest}",
        POOL.replace(':', "%3A"),
        identity.replace(':', "%3A")
    )
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts a Cognito error as every SDK parses it: header, `__type`, no `code`.
    fn assert_error(&self, status: u16, shape: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.header("x-amzn-ErrorType"), Some(shape));
        assert_eq!(self.body["__type"], shape);
        assert!(self.body.get("code").is_none() && self.body.get("Code").is_none());
    }
}

/// Signs as botocore does, with the load generator's signer (written apart from the node's
/// verifier, so each checks the other).
fn sign(
    creds: &Credentials,
    method: &str,
    host: &str,
    path_and_query: &str,
    body: &[u8],
    date: &str,
) -> String {
    let creds = tandem_loadtest::sigv4::Credentials {
        access_key_id: creds.access_key_id.clone(),
        secret_key: creds.secret_key.clone(),
        session_token: creds.session_token.clone(),
    };
    tandem_loadtest::sigv4::authorization(
        &creds,
        "us-east-1",
        method,
        host,
        path_and_query,
        body,
        date,
    )
}

/// One HTTP/1.1 request with `headers`, read to the end.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, String)],
    body: &[u8],
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn call_with(
    server: &TestServer,
    creds: &Credentials,
    method: &str,
    path_and_query: &str,
    body: Option<Value>,
    tamper: bool,
) -> Reply {
    signed_at(
        server,
        creds,
        method,
        path_and_query,
        body,
        tamper,
        SystemTime::now(),
    )
    .await
}

async fn signed_at(
    server: &TestServer,
    creds: &Credentials,
    method: &str,
    path_and_query: &str,
    body: Option<Value>,
    tamper: bool,
    at: SystemTime,
) -> Reply {
    let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    signed_bytes(server, creds, method, path_and_query, &body, tamper, at).await
}

/// A request signed over `body` as sent, JSON or not.
async fn signed_bytes(
    server: &TestServer,
    creds: &Credentials,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    tamper: bool,
    at: SystemTime,
) -> Reply {
    let date = tandem_loadtest::sigv4::amz_date(at);
    let host = server.addr.to_string();
    let mut authorization = sign(creds, method, &host, path_and_query, body, &date);
    if tamper {
        // The last hex digit of the signature, changed.
        let last = authorization.pop().unwrap();
        authorization.push(if last == '0' { '1' } else { '0' });
    }
    let headers = [
        ("Authorization", authorization),
        ("X-Amz-Date", date),
        ("X-Amz-Security-Token", creds.session_token.clone()),
        ("Content-Type", "application/json".to_owned()),
    ];
    raw(server.addr, method, path_and_query, &headers, body).await
}

async fn call(
    server: &TestServer,
    creds: &Credentials,
    method: &str,
    path_and_query: &str,
    body: Option<Value>,
) -> Reply {
    call_with(server, creds, method, path_and_query, body, false).await
}

async fn list_records(
    server: &TestServer,
    creds: &Credentials,
    identity: &str,
    dataset: &str,
    query: &str,
) -> Value {
    let reply = call(
        server,
        creds,
        "GET",
        &path(identity, &format!("/datasets/{dataset}/records{query}")),
        None,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

async fn update(
    server: &TestServer,
    creds: &Credentials,
    identity: &str,
    dataset: &str,
    patches: Value,
) -> Reply {
    let token = list_records(server, creds, identity, dataset, "").await["SyncSessionToken"]
        .as_str()
        .unwrap()
        .to_owned();
    call(
        server,
        creds,
        "POST",
        &path(identity, &format!("/datasets/{dataset}")),
        Some(json!({ "SyncSessionToken": token, "RecordPatches": patches, "DeviceId": "dev-1" })),
    )
    .await
}

fn keys(records: &Value) -> Vec<&str> {
    records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["Key"].as_str().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_walk_create_list_conflict_remove_delete() {
    let server = server();
    let alice = credentials(ALICE);

    // A dataset never written: no records, not there, but a session token all the same.
    let first = list_records(&server, &alice, ALICE, "notes", "").await;
    assert_eq!(first["DatasetExists"], false);
    assert_eq!(first["DatasetSyncCount"], 0);
    assert!(first["SyncSessionToken"].as_str().is_some());

    // Create: one commit, one sync count, one Records entry per patch in request order.
    let created = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([
            { "Op": "replace", "Key": "b", "Value": "2", "SyncCount": 0 },
            { "Op": "replace", "Key": "a", "Value": "1", "SyncCount": 0,
              "DeviceLastModifiedDate": 1_700_000_000.5 },
        ]),
    )
    .await;
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(keys(&created.body["Records"]), ["b", "a"]);
    assert_eq!(created.body["Records"][0]["SyncCount"], 1);
    assert_eq!(
        created.body["Records"][1]["DeviceLastModifiedDate"],
        1_700_000_000.5
    );
    assert_eq!(created.body["Records"][0]["LastModifiedBy"], ALICE);
    assert!(created.header("x-amzn-RequestId").is_some());
    assert!(created.header("Date").is_some());
    assert_eq!(created.header("Access-Control-Allow-Origin"), Some("*"));

    let added = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "c", "Value": "3", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(added.body["Records"][0]["SyncCount"], 2);

    // List since: only what changed after the count.
    let since = list_records(&server, &alice, ALICE, "notes", "?lastSyncCount=1").await;
    assert_eq!(keys(&since["Records"]), ["c"]);
    assert_eq!(since["DatasetSyncCount"], 2);
    assert_eq!(since["DatasetExists"], true);

    // Pages of one, all at the first page's count, none missing.
    let mut seen = Vec::new();
    let mut query = "?maxResults=1".to_owned();
    loop {
        let page = list_records(&server, &alice, ALICE, "notes", &query).await;
        assert_eq!(page["DatasetSyncCount"], 2);
        seen.extend(keys(&page["Records"]).iter().map(|k| k.to_string()));
        match page["NextToken"].as_str() {
            Some(token) => query = format!("?maxResults=1&nextToken={token}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a", "b", "c"]);

    // A stale count: 409, nothing written.
    let stale = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([
            { "Op": "replace", "Key": "d", "Value": "4", "SyncCount": 0 },
            { "Op": "replace", "Key": "a", "Value": "x", "SyncCount": 0 },
        ]),
    )
    .await;
    stale.assert_error(409, "ResourceConflictException");
    assert_eq!(
        stale.body["message"],
        "Current SyncCount for: a is: 1 not: 0"
    );
    let after = list_records(&server, &alice, ALICE, "notes", "").await;
    assert_eq!(after["DatasetSyncCount"], 2);

    // Limits: a fourth record is past --max-records 3.
    let over = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "d", "Value": "4", "SyncCount": 0 }]),
    )
    .await;
    over.assert_error(400, "LimitExceededException");

    // Remove: a tombstone without a Value for a client past it, gone from a fresh list.
    let removed = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "remove", "Key": "b", "SyncCount": 1 }]),
    )
    .await;
    assert_eq!(removed.status, 200, "{}", removed.body);
    assert_eq!(removed.body["Records"][0]["SyncCount"], 3);
    let since = list_records(&server, &alice, ALICE, "notes", "?lastSyncCount=2").await;
    assert_eq!(keys(&since["Records"]), ["b"]);
    assert!(since["Records"][0].get("Value").is_none());
    let fresh = list_records(&server, &alice, ALICE, "notes", "").await;
    assert_eq!(keys(&fresh["Records"]), ["a", "c"]);

    // A body past axum's own 2 MiB default is read whole: the bound is
    // cognito_max_body_bytes (8 MiB), room for a 1 MiB dataset JSON-escaped.
    let padded = call(
        &server,
        &alice,
        "GET",
        &path(ALICE, "/datasets"),
        Some(json!({ "pad": "x".repeat(3 << 20) })),
    )
    .await;
    assert_eq!(padded.status, 200, "{}", padded.body);

    // The dataset and usage views.
    let datasets = call(&server, &alice, "GET", &path(ALICE, "/datasets"), None).await;
    assert_eq!(datasets.body["Count"], 1);
    assert_eq!(datasets.body["Datasets"][0]["DatasetName"], "notes");
    assert_eq!(datasets.body["Datasets"][0]["NumRecords"], 2);
    let usage = call(&server, &alice, "GET", &path(ALICE, ""), None).await;
    assert_eq!(usage.body["IdentityUsage"]["DatasetCount"], 1);
    assert_eq!(usage.body["IdentityUsage"]["IdentityPoolId"], POOL);

    // Delete: the dataset as it was, then a client past an older count is told.
    let deleted = call(
        &server,
        &alice,
        "DELETE",
        &path(ALICE, "/datasets/notes"),
        None,
    )
    .await;
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.body["Dataset"]["NumRecords"], 2);
    let gone = list_records(&server, &alice, ALICE, "notes", "?lastSyncCount=2").await;
    assert_eq!(gone["DatasetDeletedAfterRequestedSyncCount"], true);
    assert_eq!(gone["DatasetExists"], false);
    assert_eq!(gone["Count"], 0);
    call(
        &server,
        &alice,
        "GET",
        &path(ALICE, "/datasets/notes"),
        None,
    )
    .await
    .assert_error(404, "ResourceNotFoundException");

    // Re-created: a client at a count before the delete is still told.
    let recreated = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "a", "Value": "again", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(recreated.status, 200, "{}", recreated.body);
    let back = list_records(&server, &alice, ALICE, "notes", "?lastSyncCount=2").await;
    assert_eq!(back["DatasetDeletedAfterRequestedSyncCount"], true);
    assert_eq!(back["DatasetExists"], true);
    let current = list_records(&server, &alice, ALICE, "notes", "?lastSyncCount=4").await;
    assert_eq!(current["DatasetDeletedAfterRequestedSyncCount"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_refuses_other_identities_bad_signatures_and_bad_input() {
    let server = server();
    let alice = credentials(ALICE);
    let bob = credentials(BOB);
    let written = update(
        &server,
        &alice,
        ALICE,
        "private",
        json!([{ "Op": "replace", "Key": "k", "Value": "v", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);

    // Bob's valid credentials on Alice's data.
    let trespass = call(
        &server,
        &bob,
        "GET",
        &path(ALICE, "/datasets/private/records"),
        None,
    )
    .await;
    trespass.assert_error(403, "NotAuthorizedException");
    let trespass = call(
        &server,
        &bob,
        "DELETE",
        &path(ALICE, "/datasets/private"),
        None,
    )
    .await;
    trespass.assert_error(403, "NotAuthorizedException");

    // A tampered signature, and none at all; refusals are counted like refused tokens.
    const REFUSED: &str = "tandem_gateway_events_total{event=\"token_refused\"}";
    let refused_before = metric(&server, REFUSED).await;
    call_with(
        &server,
        &alice,
        "GET",
        &path(ALICE, "/datasets"),
        None,
        true,
    )
    .await
    .assert_error(403, "InvalidSignatureException");
    assert_eq!(metric(&server, REFUSED).await, refused_before + 1);
    raw(server.addr, "GET", &path(ALICE, "/datasets"), &[], b"")
        .await
        .assert_error(403, "MissingAuthenticationTokenException");
    // Credentials from another secret.
    let forged = CredentialKeys::derive(b"another secret, not the server's one at all").issue(
        ALICE,
        POOL,
        SystemTime::now(),
    );
    call(&server, &forged, "GET", &path(ALICE, "/datasets"), None)
        .await
        .assert_error(403, "UnrecognizedClientException");

    // A malformed body, a name of dots, push sync, developer routes, an unknown route.
    call(
        &server,
        &alice,
        "POST",
        &path(ALICE, "/datasets/private"),
        Some(json!({ "RecordPatches": "nope" })),
    )
    .await
    .assert_error(400, "InvalidParameterException");
    call(
        &server,
        &alice,
        "GET",
        &path(ALICE, "/datasets/.../records"),
        None,
    )
    .await
    .assert_error(400, "InvalidParameterException");
    call(
        &server,
        &alice,
        "POST",
        &path(ALICE, "/datasets/private/subscriptions/dev-1"),
        None,
    )
    .await
    .assert_error(400, "InvalidConfigurationException");
    call(&server, &alice, "GET", "/identitypools", None)
        .await
        .assert_error(403, "NotAuthorizedException");
    call(&server, &alice, "GET", &path(ALICE, "/nowhere"), None)
        .await
        .assert_error(404, "UnknownOperationException");
    // Nothing changed.
    let records = list_records(&server, &alice, ALICE, "private", "").await;
    assert_eq!(records["DatasetSyncCount"], 1);

    // A browser's preflight.
    let preflight = raw(
        server.addr,
        "OPTIONS",
        &path(ALICE, "/datasets"),
        &[
            ("Origin", "https://app.example.com".to_owned()),
            ("Access-Control-Request-Method", "GET".to_owned()),
            (
                "Access-Control-Request-Headers",
                "authorization,x-amz-date,x-amz-security-token".to_owned(),
            ),
        ],
        b"",
    )
    .await;
    assert_eq!(preflight.status, 200);
    assert_eq!(preflight.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(
        preflight.header("Access-Control-Allow-Headers"),
        Some("authorization,x-amz-date,x-amz-security-token")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_bridges_rest_and_websocket_both_ways() {
    let server = server();
    let alice = credentials(ALICE);
    // The same identity on the WebSocket: a JWT whose `sub` is the identity id.
    let mut ws = server.connect(ALICE).await;
    ws.subscribe(DatasetRef::own("live")).await.unwrap();

    let written = update(
        &server,
        &alice,
        ALICE,
        "live",
        json!([{ "Op": "replace", "Key": "from-rest", "Value": "1", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let (sync_count, records) = next_push(&mut ws).await;
    assert_eq!(sync_count, 1);
    assert!(records.iter().any(|r| r.key == "from-rest"));

    ws.update(
        DatasetRef::own("live"),
        None,
        vec![Patch::replace("from-ws", "2", 0)],
    )
    .await
    .unwrap();
    let listed = list_records(&server, &alice, ALICE, "live", "?lastSyncCount=1").await;
    assert_eq!(keys(&listed["Records"]), ["from-ws"]);
    assert_eq!(listed["DatasetSyncCount"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_routes_are_absent_without_a_pool() {
    let server = TestServer::start();
    let reply = call(
        &server,
        &credentials(ALICE),
        "GET",
        &path(ALICE, "/datasets"),
        None,
    )
    .await;
    assert_eq!(reply.status, 404);
}

fn credentials_json(identity: &str, creds: &Credentials) -> Value {
    json!({
        "identity_id": identity,
        "access_key_id": creds.access_key_id,
        "secret_key": creds.secret_key,
        "session_token": creds.session_token,
    })
}

/// boto3 (the pinned version of tests/python/requirements.txt, in the venv `.ci/run`
/// makes) drives the whole walk; the WebSocket side of the live bridge is checked here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_boto3_walk_and_live_bridge() {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let server = server();
    let mut ws = server.connect(ALICE).await;
    ws.update(
        DatasetRef::own("fromws"),
        None,
        vec![Patch::replace("from-ws", "1", 0)],
    )
    .await
    .unwrap();
    ws.subscribe(DatasetRef::own("pushed")).await.unwrap();

    let keys = CredentialKeys::derive(SECRET.as_bytes());
    let expired = keys.issue(ALICE, POOL, SystemTime::now() - Duration::from_secs(7200));
    let walk = json!({
        "endpoint": format!("http://{}", server.addr),
        "pool": POOL,
        "a": credentials_json(ALICE, &credentials(ALICE)),
        "b": credentials_json(BOB, &credentials(BOB)),
        "a_expired": credentials_json(ALICE, &expired),
        "ws_dataset": "fromws",
        "push_dataset": "pushed",
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/cognito_sync_walk.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env("TANDEM_COGNITO_WALK", walk.to_string())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 walk failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("cognito sync walk: ok"));
    let (_, records) = next_push(&mut ws).await;
    assert!(records.iter().any(|r| r.key == "from-boto"), "{records:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_refuses_a_replay_past_the_skew_and_an_oversized_body() {
    let server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--cognito-max-body-bytes", 4096)
        .start();
    let alice = credentials(ALICE);
    let late = SystemTime::now() - Duration::from_secs(10 * 60);
    let replay = signed_at(
        &server,
        &alice,
        "GET",
        &path(ALICE, "/datasets"),
        None,
        false,
        late,
    )
    .await;
    replay.assert_error(403, "InvalidSignatureException");
    assert!(
        replay.body["message"]
            .as_str()
            .unwrap()
            .starts_with("Signature expired:"),
        "{}",
        replay.body
    );

    let token = list_records(&server, &alice, ALICE, "big", "").await["SyncSessionToken"].clone();
    let oversized = call(
        &server,
        &alice,
        "POST",
        &path(ALICE, "/datasets/big"),
        Some(json!({
            "SyncSessionToken": token,
            "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "x".repeat(5000), "SyncCount": 0 }],
        })),
    )
    .await;
    oversized.assert_error(400, "LimitExceededException");
    let records = list_records(&server, &alice, ALICE, "big", "").await;
    assert_eq!(records["DatasetExists"], false);
}

/// Two nodes on one PostgreSQL and one Redis: a REST commit through one node is pushed to a
/// WebSocket subscriber on the other, and a WebSocket write on that one is listed by the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_rest_commit_reaches_a_subscriber_on_another_node() {
    let schema = PgSchema::create();
    let prefix = unique("tandem-e2e");
    let nodes: Vec<TestServer> = (0..2)
        .map(|_| {
            TestServer::builder()
                .arg("--store", &schema.url)
                .arg("--postgres-schema", &schema.name)
                .arg("--postgres-pool-size", 4)
                .arg("--redis", redis_url())
                .arg("--redis-prefix", &prefix)
                .arg("--cognito-identity-pool", POOL)
                .start()
        })
        .collect();
    let alice = credentials(ALICE);
    let mut ws = nodes[0].connect(ALICE).await;
    ws.subscribe(DatasetRef::own("shared")).await.unwrap();

    let written = update(
        &nodes[1],
        &alice,
        ALICE,
        "shared",
        json!([{ "Op": "replace", "Key": "via-rest", "Value": "1", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    let (n, records) = tokio::time::timeout(Duration::from_secs(20), push_at_least(&mut ws, 1))
        .await
        .expect("the other node pushes the REST commit");
    assert_eq!(n, 1);
    assert!(records.iter().any(|r| r.key == "via-rest"));

    ws.update(
        DatasetRef::own("shared"),
        None,
        vec![Patch::replace("via-ws", "2", 0)],
    )
    .await
    .unwrap();
    let listed = list_records(&nodes[1], &alice, ALICE, "shared", "?lastSyncCount=1").await;
    assert_eq!(keys(&listed["Records"]), ["via-ws"]);
}

/// With `--cognito-secret-file`, credentials derive from that file's secret, not from the
/// JWT secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_secret_file_replaces_the_jwt_secret() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cognito-secret");
    let secret = "a cognito secret shared by every node, 32+ bytes";
    std::fs::write(&file, format!("{secret}\n")).unwrap();
    let server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--cognito-secret-file", file.display())
        .start();
    let from_file = CredentialKeys::derive(secret.as_bytes()).issue(ALICE, POOL, SystemTime::now());
    let reply = call(&server, &from_file, "GET", &path(ALICE, "/datasets"), None).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    call(
        &server,
        &credentials(ALICE),
        "GET",
        &path(ALICE, "/datasets"),
        None,
    )
    .await
    .assert_error(403, "UnrecognizedClientException");
}

/// `creds` carrying `session_token` instead of their own: the request is signed with it, so
/// the signature is valid and only the token is wrong.
fn with_token(creds: &Credentials, session_token: String) -> Credentials {
    Credentials {
        session_token,
        ..creds.clone()
    }
}

/// Writes `k` to `private` of `id`, sync count 1.
async fn write_private(server: &TestServer, creds: &Credentials, id: &str) {
    let written = update(
        server,
        creds,
        id,
        "private",
        json!([{ "Op": "replace", "Key": "k", "Value": "v", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
}

/// The datasets of `id` and the records of its `private`: what a refused request must leave.
async fn state_of(server: &TestServer, creds: &Credentials, id: &str) -> (Value, Value) {
    let datasets = call(server, creds, "GET", &path(id, "/datasets"), None).await;
    assert_eq!(datasets.status, 200, "{}", datasets.body);
    let names = datasets.body["Datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| json!([d["DatasetName"], d["NumRecords"]]))
        .collect();
    let records = list_records(server, creds, id, "private", "").await;
    let records = json!([records["DatasetSyncCount"], records["Records"]]);
    (names, records)
}

/// A server where Alice and Bob each wrote `private` once.
struct Written {
    server: TestServer,
    alice: Credentials,
    bob: Credentials,
    /// Alice's SyncSessionToken for `private`.
    sync_token: Value,
    before: [(Value, Value); 2],
}

async fn two_writers() -> Written {
    let server = server();
    let alice = credentials(ALICE);
    let bob = credentials(BOB);
    write_private(&server, &alice, ALICE).await;
    write_private(&server, &bob, BOB).await;
    let before = [
        state_of(&server, &alice, ALICE).await,
        state_of(&server, &bob, BOB).await,
    ];
    let sync_token =
        list_records(&server, &alice, ALICE, "private", "").await["SyncSessionToken"].clone();
    Written {
        server,
        alice,
        bob,
        sync_token,
        before,
    }
}

impl Written {
    /// Both identities' datasets and records are as they were.
    async fn assert_unchanged(&self) {
        assert_eq!(
            state_of(&self.server, &self.alice, ALICE).await,
            self.before[0]
        );
        assert_eq!(state_of(&self.server, &self.bob, BOB).await, self.before[1]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_refuses_forged_session_tokens_and_changes_nothing() {
    let written = &two_writers().await;
    let Written {
        server,
        alice,
        bob,
        sync_token,
        ..
    } = written;

    let (payload, mac) = alice.session_token.split_once('.').unwrap();
    // The MAC's first character changed (the last one may only carry padding bits).
    let other = if mac.starts_with('A') { 'B' } else { 'A' };
    let bad_mac = format!("{payload}.{other}{}", &mac[1..]);
    // Alice's token rewritten to name Bob, with Alice's MAC.
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["identityId"], ALICE);
    claims["identityId"] = json!(BOB);
    let as_bob = format!("{}.{mac}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    // Bob's genuine token with Alice's key: a token is bound to its access key id.
    let swapped = bob.session_token.clone();

    const REFUSED: &str = "tandem_gateway_events_total{event=\"token_refused\"}";
    let refused_before = metric(server, REFUSED).await;
    let forgeries = [bad_mac, as_bob, swapped, "not-a-token".to_owned()];
    for forged in &forgeries {
        let forged = with_token(alice, forged.clone());
        call(
            server,
            &forged,
            "POST",
            &path(ALICE, "/datasets/private"),
            Some(json!({
                "SyncSessionToken": sync_token,
                "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "forged", "SyncCount": 1 }],
            })),
        )
        .await
        .assert_error(403, "UnrecognizedClientException");
        for (method, target) in [("DELETE", "/datasets/private"), ("GET", "/datasets")] {
            call(server, &forged, method, &path(BOB, target), None)
                .await
                .assert_error(403, "UnrecognizedClientException");
        }
    }
    assert_eq!(
        metric(server, REFUSED).await,
        refused_before + 3 * forgeries.len() as u64
    );
    written.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_malformed_bodies_get_invalid_parameter_and_change_nothing() {
    let server = server();
    let alice = credentials(ALICE);
    write_private(&server, &alice, ALICE).await;
    let before = state_of(&server, &alice, ALICE).await;
    let sync_token = list_records(&server, &alice, ALICE, "private", "").await["SyncSessionToken"]
        .as_str()
        .unwrap()
        .to_owned();
    let whole = json!({
        "SyncSessionToken": sync_token,
        "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "new", "SyncCount": 1 }],
        "DeviceId": "dev-1",
    })
    .to_string();
    let bodies: Vec<Vec<u8>> = vec![
        // Cut short, a valid write up to the last brace.
        whole.as_bytes()[..whole.len() - 1].to_vec(),
        b"{not json".to_vec(),
        b"".to_vec(),
        b"[]".to_vec(),
        b"null".to_vec(),
        b"\xff\xfe{}".to_vec(),
        // Trailing bytes after a valid write.
        format!("{whole} {{}}").into_bytes(),
        // Wrong types and shapes, each around a valid session token.
        json!({ "SyncSessionToken": sync_token, "RecordPatches": { "Op": "replace" } })
            .to_string()
            .into_bytes(),
        json!({ "SyncSessionToken": sync_token,
                "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "new", "SyncCount": "1" }] })
        .to_string()
        .into_bytes(),
        json!({ "SyncSessionToken": sync_token,
                "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": 5, "SyncCount": 1 }] })
        .to_string()
        .into_bytes(),
        json!({ "SyncSessionToken": sync_token,
                "RecordPatches": [{ "Op": "upsert", "Key": "k", "Value": "new", "SyncCount": 1 }] })
        .to_string()
        .into_bytes(),
        json!({ "SyncSessionToken": sync_token,
                "RecordPatches": [{ "Op": "replace", "Value": "new", "SyncCount": 1 }] })
        .to_string()
        .into_bytes(),
        json!({ "SyncSessionToken": 7,
                "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "new", "SyncCount": 1 }] })
        .to_string()
        .into_bytes(),
    ];
    for body in &bodies {
        let reply = signed_bytes(
            &server,
            &alice,
            "POST",
            &path(ALICE, "/datasets/private"),
            body,
            false,
            SystemTime::now(),
        )
        .await;
        assert_eq!(
            reply.status,
            400,
            "{}: {}",
            String::from_utf8_lossy(body),
            reply.body
        );
        reply.assert_error(400, "InvalidParameterException");
    }
    // The same body, whole, is a write: the refusals above were about the body alone.
    let (_, records) = &before;
    assert_eq!(records[0], 1);
    assert_eq!(state_of(&server, &alice, ALICE).await, before);
    let written = signed_bytes(
        &server,
        &alice,
        "POST",
        &path(ALICE, "/datasets/private"),
        whole.as_bytes(),
        false,
        SystemTime::now(),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    assert_eq!(written.body["Records"][0]["SyncCount"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_unknown_routes_and_dot_names_are_refused_and_change_nothing() {
    let written = &two_writers().await;
    let Written {
        server,
        alice,
        sync_token,
        ..
    } = written;
    let write = json!({
        "SyncSessionToken": sync_token,
        "RecordPatches": [{ "Op": "replace", "Key": "k", "Value": "new", "SyncCount": 1 }],
    });
    let pool = POOL.replace(':', "%3A");

    // Routes the model does not have, signed correctly.
    let unknown = [
        ("GET", format!("/identitypools/{pool}/whatever")),
        ("GET", format!("/identitypools/{pool}/identities")),
        ("DELETE", path(ALICE, "")),
        ("POST", path(ALICE, "/datasets")),
        ("PUT", path(ALICE, "/datasets/private")),
        ("POST", path(ALICE, "/datasets/private/records")),
        ("DELETE", path(ALICE, "/datasets/private/records")),
        ("GET", path(ALICE, "/datasets/private/records/k")),
        // Dot segments that would lead to Bob's data once resolved.
        (
            "DELETE",
            path(
                ALICE,
                &format!(
                    "/datasets/../../{}/datasets/private",
                    BOB.replace(':', "%3A")
                ),
            ),
        ),
        (
            "GET",
            format!(
                "/identitypools/{pool}/identities/{}/../{}/datasets",
                BOB.replace(':', "%3A"),
                ALICE.replace(':', "%3A")
            ),
        ),
    ];
    for (method, target) in &unknown {
        let reply = call(server, alice, method, target, Some(write.clone())).await;
        assert_eq!(reply.status, 404, "{method} {target}: {}", reply.body);
        reply.assert_error(404, "UnknownOperationException");
    }

    // Names the store refuses, and names of dots, which the SDKs would drop before signing:
    // the documented InvalidParameterException on every dataset route.
    let long = "n".repeat(129);
    let names = [
        ".",
        "..",
        "...",
        "%2E",
        "%2e%2E",
        "a%20b",
        "a%2Fb",
        "caf%C3%A9",
        "%FF",
        "%00",
        "a%3Bb",
        long.as_str(),
    ];
    for name in names {
        for (method, rest, body) in [
            ("GET", "/records", None),
            ("GET", "", None),
            ("POST", "", Some(write.clone())),
            ("DELETE", "", None),
        ] {
            let target = path(ALICE, &format!("/datasets/{name}{rest}"));
            let reply = call(server, alice, method, &target, body).await;
            assert_eq!(reply.status, 400, "{method} {target}: {}", reply.body);
            reply.assert_error(400, "InvalidParameterException");
        }
    }
    // The longest valid name and dots inside a name are fine.
    let longest = "n".repeat(128);
    for name in [longest.as_str(), "a..b", ".a", "a."] {
        let listed = list_records(server, alice, ALICE, name, "").await;
        assert_eq!(listed["DatasetExists"], false, "{name}");
    }

    written.assert_unchanged().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_sync_hook_stands_in_for_the_sync_trigger() {
    use tandem_tests::hook::{Hook, Mode, SECRET as HOOK_SECRET};
    let hook = Hook::start().await;
    let server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--sync-hook-url", hook.url())
        .arg("--sync-hook-secret", HOOK_SECRET)
        .arg("--sync-hook-timeout", "300ms")
        .start();
    let alice = credentials(ALICE);

    // Rewritten: the answer carries the value as stored.
    let written = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "title", "Value": "hello", "SyncCount": 0 }]),
    )
    .await;
    assert_eq!(written.status, 200, "{}", written.body);
    assert_eq!(written.body["Records"][0]["Value"], "HELLO");

    // Rejected: Cognito's LambdaRejectedException, nothing written.
    let refused = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "body", "Value": "far too long a value", "SyncCount": 0 }]),
    )
    .await;
    refused.assert_error(400, "LambdaRejectedException");

    // No answer in time: LambdaThrottledException (429, which the SDKs retry).
    hook.set(Mode::Sleep);
    let late = update(
        &server,
        &alice,
        ALICE,
        "notes",
        json!([{ "Op": "replace", "Key": "later", "Value": "x", "SyncCount": 0 }]),
    )
    .await;
    late.assert_error(429, "LambdaThrottledException");

    let listed = list_records(&server, &alice, ALICE, "notes", "").await;
    assert_eq!(keys(&listed["Records"]), ["title"]);
    assert_eq!(hook.bad_signatures(), 0);
}
