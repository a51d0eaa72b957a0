//! The Cognito developer key and operations against real nodes: boto3 (tests/python/
//! cognito_developer.py) signs with the developer key and with identity credentials, a
//! SyncTrigger served here (Cognito's event format, as a ported Lambda handler) rewrites and
//! refuses updates, and a change stream webhook served here receives a BulkPublish. This
//! test switches the webhook between the script's phases and checks what the trigger and
//! the webhook were sent.

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;
use tandem_tests::trigger::Trigger;
use tandem_tests::webhook::{self, Webhook, first_of_each};
use tandem_tests::{SECRET, TestServer, TestServerBuilder, hook};

const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const ISSUER: &str = "https://login.example.com";
const PROVIDER: &str = "login.example.com";
const ADMIN_AKID: &str = "AKIDTANDEMDEVELOPER";
const ADMIN_SECRET: &str = "developer-secret-0123456789/abc";

fn node() -> TestServerBuilder {
    TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg(
            "--cognito-admin-key",
            format!("{ADMIN_AKID}:{ADMIN_SECRET}"),
        )
        .arg("--sync-hook-secret", hook::SECRET)
}

/// Runs one phase of the boto3 script; its JSON findings.
async fn phase(python: &str, config: &Value, name: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/cognito_developer.py");
    let (python, config, name) = (python.to_owned(), config.to_string(), name.to_owned());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .arg(&name)
            .env("TANDEM_COGNITO_DEV", config)
            // Nothing from this machine's AWS setup.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 phase failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_developer_operations_with_boto3() {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let trigger = Trigger::start().await;
    let webhook = Webhook::start(0).await;
    let mut server = node()
        .arg("--stream-webhook", webhook.setting("bulk"))
        .arg("--stream-secret", webhook::SECRET)
        .arg("--stream-retry-initial", "50ms")
        .arg("--stream-retry-max", "200ms")
        .arg("--stream-max-attempts", 0)
        .start();
    let no_sinks = node().start();
    // A port where nothing listens: the SyncTrigger is down.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let login = tandem_token::mint_hs256(
        SECRET.as_bytes(),
        "dev-user",
        Duration::from_secs(3600),
        Some(ISSUER),
        None,
    )
    .unwrap();
    let config = json!({
        "endpoint": format!("http://{}", server.addr),
        "endpoint_no_sinks": format!("http://{}", no_sinks.addr),
        "pool": POOL,
        "admin_akid": ADMIN_AKID,
        "admin_secret": ADMIN_SECRET,
        "provider": PROVIDER,
        "login": login,
        "trigger": trigger.url(),
        "dead_trigger": format!("http://{dead}/sync-trigger"),
    });

    let main = phase(&python, &config, "main").await;

    // What the SyncTrigger was sent: Cognito's event, signed like the sync hook.
    let events = trigger.events();
    assert_eq!(trigger.bad_signatures(), 0);
    assert_eq!(
        events.len(),
        2,
        "the accepted and the refused update: {events:?}"
    );
    let user = main["datasets"][0][0].as_str().unwrap();
    let first = &events[0];
    assert_eq!(first["version"], 2);
    assert_eq!(first["eventType"], "SyncTrigger");
    assert_eq!(first["region"], "us-east-1");
    assert_eq!(first["identityPoolId"], POOL);
    assert_eq!(first["identityId"], user);
    assert_eq!(first["datasetName"], "profile");
    assert_eq!(
        first["datasetRecords"]["title"],
        json!({ "oldValue": null, "newValue": "hello", "op": "replace" })
    );
    assert_eq!(
        events[1]["datasetRecords"]["note"],
        json!({ "oldValue": "ok", "newValue": "far too long a value", "op": "replace" })
    );

    // BulkPublish: held IN_PROGRESS while the webhook fails, SUCCEEDED once it takes them.
    webhook.set_fail_every(usize::MAX);
    phase(&python, &config, "bulk_start").await;
    webhook.set_fail_every(0);
    phase(&python, &config, "bulk_done").await;
    assert_eq!(webhook.bad_signatures(), 0);
    let snapshots: Vec<Value> = first_of_each(&webhook.events())
        .into_iter()
        .filter(|e| e["type"] == "snapshot")
        .collect();
    let published: BTreeSet<(String, String)> = snapshots
        .iter()
        .map(|e| {
            (
                e["owner"].as_str().unwrap().to_owned(),
                e["dataset"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let live: BTreeSet<(String, String)> = main["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d[0].as_str().unwrap().to_owned(),
                d[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        published, live,
        "one snapshot per live dataset: {snapshots:?}"
    );
    assert_eq!(snapshots.len(), live.len());
    let profile = snapshots
        .iter()
        .find(|e| e["dataset"] == "profile")
        .unwrap();
    let title = profile["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == "title")
        .unwrap();
    assert_eq!(title["value"], "plain");

    // The status is the store's: a restarted node still reports it.
    server.restart();
    phase(&python, &config, "bulk_done").await;

    phase(&python, &config, "no_sinks").await;
}

/// A Sync API request signed by the load tester's signer (written apart from the node's
/// verifier) with `creds`; an empty session token signs as a static key. Status and body.
async fn signed(
    server: &TestServer,
    creds: &tandem_loadtest::sigv4::Credentials,
    method: &str,
    path: &str,
    body: &[u8],
) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let date = tandem_loadtest::sigv4::amz_date(std::time::SystemTime::now());
    let host = server.addr.to_string();
    let authorization =
        tandem_loadtest::sigv4::authorization(creds, "us-east-1", method, &host, path, body, &date);
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\nAuthorization: {authorization}\r\nX-Amz-Date: {date}\r\nContent-Type: application/json\r\n",
        body.len()
    );
    if !creds.session_token.is_empty() {
        request.push_str(&format!(
            "X-Amz-Security-Token: {}\r\n",
            creds.session_token
        ));
    }
    request.push_str("\r\n");
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    stream.write_all(body).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// The developer key without any SDK: it reads and sets a pool's events and reaches any
/// identity's data; identity credentials and a wrong secret are refused, and a node without
/// the key refuses everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_developer_key_signs_developer_operations() {
    use tandem_loadtest::sigv4::Credentials;
    let server = node().start();
    let developer = Credentials {
        access_key_id: ADMIN_AKID.to_owned(),
        secret_key: ADMIN_SECRET.to_owned(),
        session_token: String::new(),
    };
    let pool = POOL.replace(':', "%3A");
    let events = format!("/identitypools/{pool}/events");

    let (status, body) = signed(&server, &developer, "GET", &events, b"").await;
    assert_eq!((status, &body), (200, &json!({ "Events": {} })));
    let set = json!({ "Events": { "SyncTrigger": "https://hooks.example.com/sync" } });
    let (status, _) = signed(
        &server,
        &developer,
        "POST",
        &events,
        set.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    let (_, body) = signed(&server, &developer, "GET", &events, b"").await;
    assert_eq!(
        body["Events"]["SyncTrigger"],
        "https://hooks.example.com/sync"
    );
    let other_pool = "/identitypools/us-east-1%3A00000000-0000-4000-8000-000000000000/events";
    let (status, body) = signed(&server, &developer, "GET", other_pool, b"").await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (404, Some("ResourceNotFoundException"))
    );

    // Any identity's data, with a SyncSessionToken from its ListRecords.
    let alice = "us-east-1:aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa";
    let records = format!(
        "/identitypools/{pool}/identities/{}/datasets/d/records",
        alice.replace(':', "%3A")
    );
    let (status, body) = signed(&server, &developer, "GET", &records, b"").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["DatasetExists"], false);

    // Identity credentials: their own data, never a developer operation.
    let keys = tandem_cognito::CredentialKeys::derive(SECRET.as_bytes());
    let issued = keys.issue(alice, POOL, std::time::SystemTime::now());
    let user = Credentials {
        access_key_id: issued.access_key_id,
        secret_key: issued.secret_key,
        session_token: issued.session_token,
    };
    let (status, _) = signed(&server, &user, "GET", &records, b"").await;
    assert_eq!(status, 200);
    for (method, path) in [
        ("GET", events.clone()),
        ("POST", format!("/identitypools/{pool}/bulkpublish")),
        ("GET", format!("/identitypools/{pool}")),
        ("GET", "/identitypools".to_owned()),
    ] {
        let (status, body) = signed(&server, &user, method, &path, b"").await;
        assert_eq!(
            (status, body["__type"].as_str()),
            (403, Some("NotAuthorizedException")),
            "{method} {path}"
        );
    }
    // The developer's key id with the wrong secret, or sent with a session token.
    let forged = Credentials {
        secret_key: "not-the-developer-secret".to_owned(),
        ..developer.clone()
    };
    let (status, body) = signed(&server, &forged, "GET", &events, b"").await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (403, Some("InvalidSignatureException"))
    );
    let with_token = Credentials {
        session_token: user.session_token.clone(),
        ..developer.clone()
    };
    let (status, body) = signed(&server, &with_token, "GET", &events, b"").await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (403, Some("UnrecognizedClientException"))
    );
    // The events are as the developer left them.
    let (_, body) = signed(&server, &developer, "GET", &events, b"").await;
    assert_eq!(
        body["Events"]["SyncTrigger"],
        "https://hooks.example.com/sync"
    );

    // A node without a developer key has no developer.
    let keyless = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .start();
    let (status, body) = signed(&keyless, &developer, "GET", &events, b"").await;
    assert_eq!(
        (status, body["__type"].as_str()),
        (403, Some("UnrecognizedClientException"))
    );
}

/// Two nodes on one PostgreSQL: the SyncTrigger set through one node rewrites an update
/// through the other, and a BulkPublish started on the node with the webhook sink is
/// reported by the other until it SUCCEEDED, with the snapshot at the webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_developer_settings_reach_every_node_on_postgres() {
    use tandem_loadtest::sigv4::Credentials;
    use tandem_tests::cluster::PgSchema;
    let schema = PgSchema::create();
    let trigger = Trigger::start().await;
    let webhook = Webhook::start(0).await;
    let on_pg = |b: TestServerBuilder| {
        b.arg("--store", &schema.url)
            .arg("--postgres-schema", &schema.name)
            .arg("--postgres-pool-size", 4)
            .arg("--cognito-events-refresh", "200ms")
    };
    let with_sink = on_pg(node())
        .arg("--stream-webhook", webhook.setting("bulk"))
        .arg("--stream-secret", webhook::SECRET)
        .start();
    let other = on_pg(node()).start();
    let developer = Credentials {
        access_key_id: ADMIN_AKID.to_owned(),
        secret_key: ADMIN_SECRET.to_owned(),
        session_token: String::new(),
    };
    let pool = POOL.replace(':', "%3A");
    let set = json!({ "Events": { "SyncTrigger": trigger.url() } });
    let events = format!("/identitypools/{pool}/events");
    let (status, _) = signed(
        &with_sink,
        &developer,
        "POST",
        &events,
        set.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200);

    let alice = "us-east-1:aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa";
    let issued = tandem_cognito::CredentialKeys::derive(SECRET.as_bytes()).issue(
        alice,
        POOL,
        std::time::SystemTime::now(),
    );
    let user = Credentials {
        access_key_id: issued.access_key_id,
        secret_key: issued.secret_key,
        session_token: issued.session_token,
    };
    let dataset = format!(
        "/identitypools/{pool}/identities/{}/datasets/profile",
        alice.replace(':', "%3A")
    );
    let (_, listed) = signed(&other, &user, "GET", &format!("{dataset}/records"), b"").await;
    let update = json!({
        "SyncSessionToken": listed["SyncSessionToken"],
        "RecordPatches": [{ "Op": "replace", "Key": "title", "Value": "hi", "SyncCount": 0 }],
        "DeviceId": "d",
    });
    let (status, written) = signed(
        &other,
        &user,
        "POST",
        &dataset,
        update.to_string().as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{written}");
    assert_eq!(
        written["Records"][0]["Value"], "HI",
        "rewritten by the trigger"
    );
    assert_eq!(trigger.events().len(), 1);
    assert_eq!(trigger.bad_signatures(), 0);

    let bulk = format!("/identitypools/{pool}/bulkpublish");
    let (status, body) = signed(&with_sink, &developer, "POST", &bulk, b"").await;
    assert_eq!(status, 200, "{body}");
    let details = format!("/identitypools/{pool}/getBulkPublishDetails");
    let done = tandem_tests::eventually(Duration::from_secs(30), "the bulk publish", || {
        let (other, developer, details) = (&other, &developer, &details);
        async move {
            let (_, body) = signed(other, developer, "POST", details, b"").await;
            (body["BulkPublishStatus"] != "IN_PROGRESS").then_some(body)
        }
    })
    .await;
    assert_eq!(done["BulkPublishStatus"], "SUCCEEDED", "{done}");
    let snapshot = first_of_each(&webhook.events())
        .into_iter()
        .find(|e| e["type"] == "snapshot")
        .expect("a snapshot event");
    assert_eq!(snapshot["owner"], alice);
    assert_eq!(snapshot["dataset"], "profile");
    assert_eq!(snapshot["records"][0]["value"], "HI");
}
