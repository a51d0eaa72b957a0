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
