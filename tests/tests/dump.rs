//! `tandem export`, `tandem import` and `tandem backup` as real processes: a SQLite node
//! filled through the protocol (and its SyncTrigger set through Cognito's SetCognitoEvents)
//! moves to PostgreSQL + Redis and its client goes on without a conflict or a full resync,
//! the trigger still set; an import killed with SIGKILL half way resumes to an exact
//! copy; bad lines are refused with their line number and leave nothing of their batch; a
//! backup taken under a write load holds every write acknowledged before it began.

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tandem_client::{Client, ConflictHandler, Connection, DatasetEvent};
use tandem_protocol::{Access, DatasetRef, Patch};
use tandem_tests::cluster::{PgSchema, RedisServer, pg_base_url, psql, start_nodes};
use tandem_tests::{SECRET, TestServer, next_push, tandem_bin};

const WAIT: Duration = Duration::from_secs(20);
const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const ISSUER: &str = "https://login.example.com";
const PROVIDER: &str = "login.example.com";
const ADMIN_AKID: &str = "AKIDTANDEMDEVELOPER";
const ADMIN_SECRET: &str = "developer-secret-0123456789/abc";
const SYNC_TRIGGER: &str = "https://hooks.example.com/sync?token=t0p";

/// Runs `tandem ARGS` to its end.
fn tandem(args: &[&str]) -> Output {
    Command::new(tandem_bin())
        .args(args)
        .env_remove("TANDEM_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run tandem")
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "tandem failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn failed(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "tandem should have failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A dump's lines after its header (the header holds the export's time and backend).
fn body(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    assert!(lines[0].contains(r#""type":"header""#), "{}", lines[0]);
    lines.remove(0);
    lines
}

fn pg_args(schema: &PgSchema) -> [&str; 4] {
    ["--store", &schema.url, "--postgres-schema", &schema.name]
}

// --- Cognito Identity over HTTP, to make a guest and merge it into a user --------------

fn login_token(sub: &str) -> String {
    tandem_token::mint_hs256(
        SECRET.as_bytes(),
        sub,
        Duration::from_secs(3600),
        Some(ISSUER),
        None,
    )
    .unwrap()
}

async fn cognito(server: &TestServer, op: &str, body: Value) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.to_string();
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nX-Amz-Target: AWSCognitoIdentityService.{op}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(body.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

/// A Cognito Sync developer operation (`/identitypools/...`) signed with the developer key;
/// status and body.
async fn developer(server: &TestServer, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let creds = tandem_loadtest::sigv4::Credentials {
        access_key_id: ADMIN_AKID.to_owned(),
        secret_key: ADMIN_SECRET.to_owned(),
        session_token: String::new(),
    };
    let date = tandem_loadtest::sigv4::amz_date(std::time::SystemTime::now());
    let host = server.addr.to_string();
    let authorization = tandem_loadtest::sigv4::authorization(
        &creds,
        "us-east-1",
        method,
        &host,
        path,
        body,
        &date,
    );
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\nAuthorization: {authorization}\r\nX-Amz-Date: {date}\r\nContent-Type: application/json\r\n\r\n",
        body.len()
    );
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

fn events_path() -> String {
    format!("/identitypools/{}/events", POOL.replace(':', "%3A"))
}

/// A connection to the first node, which takes tokens of `ISSUER` only.
async fn connect_as(server: &TestServer, sub: &str) -> Connection {
    Connection::connect(&server.url(), &login_token(sub))
        .await
        .unwrap()
}

fn sdk_client(url: String, token: String, cache: &Path) -> Client {
    Client::builder(url, "sdkuser")
        .token(token)
        .device_id("sdk-device")
        .backoff(Duration::from_millis(20), Duration::from_millis(200))
        .cache_dir(cache)
        .start()
        .unwrap()
}

/// Many identities with their own datasets (tombstones, a deleted one, a re-created one),
/// a shared dataset with grants, and a guest merged into a user (a moved dataset and a
/// renamed copy).
async fn populate(server: &TestServer) {
    for i in 0..24 {
        let who = format!("user{i:02}");
        let conn = connect_as(server, &who).await;
        let profile = DatasetRef::own("profile");
        conn.update(
            profile.clone(),
            Some(format!("{who}-phone")),
            vec![
                Patch::replace("name", &who, 0),
                Patch::replace("tmp", "x", 0),
            ],
        )
        .await
        .unwrap();
        conn.update(profile, None, vec![Patch::remove("tmp", 1)])
            .await
            .unwrap();
        if i % 4 == 0 {
            let gone = DatasetRef::own("scratch");
            conn.update(gone.clone(), None, vec![Patch::replace("k", "v", 0)])
                .await
                .unwrap();
            conn.delete_dataset(gone.clone()).await.unwrap();
            if i % 8 == 0 {
                conn.update(gone, None, vec![Patch::replace("again", "1", 0)])
                    .await
                    .unwrap();
            }
        }
        conn.close().await;
    }
    let owner = connect_as(server, "user00").await;
    let team = DatasetRef::own("team");
    owner
        .update(team.clone(), None, vec![Patch::replace("plan", "a", 0)])
        .await
        .unwrap();
    owner
        .grant(team.clone(), "user01", Access::Read)
        .await
        .unwrap();
    owner
        .grant(team.clone(), "user02", Access::Write)
        .await
        .unwrap();
    owner
        .grant(DatasetRef::own("later"), "user03", Access::Write)
        .await
        .unwrap();
    owner.close().await;
    let writer = connect_as(server, "user02").await;
    writer
        .update(
            DatasetRef::new("user00", "team"),
            Some("w".into()),
            vec![Patch::replace("note", "from user02", 0)],
        )
        .await
        .unwrap();
    writer.close().await;

    // A user with a login, and a guest with datasets that logs in with the same login.
    let logins = json!({ PROVIDER: login_token("alice") });
    let alice = cognito(
        server,
        "GetId",
        json!({"IdentityPoolId": POOL, "Logins": logins}),
    )
    .await;
    let alice = alice["IdentityId"].as_str().unwrap().to_owned();
    let alice_token = cognito(
        server,
        "GetOpenIdToken",
        json!({"IdentityId": alice, "Logins": logins}),
    )
    .await["Token"]
        .as_str()
        .unwrap()
        .to_owned();
    let conn = Connection::connect(&server.url(), &alice_token)
        .await
        .unwrap();
    conn.update(
        DatasetRef::own("notes"),
        None,
        vec![Patch::replace("a", "alice", 0)],
    )
    .await
    .unwrap();
    conn.close().await;
    let guest = cognito(server, "GetId", json!({"IdentityPoolId": POOL})).await;
    let guest = guest["IdentityId"].as_str().unwrap().to_owned();
    let guest_token =
        cognito(server, "GetOpenIdToken", json!({"IdentityId": guest})).await["Token"]
            .as_str()
            .unwrap()
            .to_owned();
    let conn = Connection::connect(&server.url(), &guest_token)
        .await
        .unwrap();
    for name in ["notes", "settings"] {
        conn.update(
            DatasetRef::own(name),
            None,
            vec![Patch::replace("g", "guest", 0)],
        )
        .await
        .unwrap();
    }
    conn.close().await;
    let merged = cognito(
        server,
        "GetCredentialsForIdentity",
        json!({"IdentityId": guest, "Logins": logins}),
    )
    .await;
    assert_eq!(merged["IdentityId"], json!(alice), "the guest was merged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_export_import_moves_a_sqlite_node_to_postgres_without_conflict_or_resync() {
    let mut server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg(
            "--cognito-admin-key",
            format!("{ADMIN_AKID}:{ADMIN_SECRET}"),
        )
        .start();
    populate(&server).await;

    // A device syncs, then edits while the node is down for the move.
    let cache = tempfile::tempdir().unwrap();
    let sdk = sdk_client(server.url(), login_token("sdkuser"), cache.path());
    sdk.wait_online(WAIT).await.unwrap();
    let notes = sdk
        .open(DatasetRef::own("notes"), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    notes.put("a", "1").unwrap();
    notes.put("b", "2").unwrap();
    notes.sync().await.unwrap();
    notes.remove("a").unwrap();
    notes.sync().await.unwrap();
    let held = notes.sync_count();
    assert_eq!(held, 2);
    // The operator's hook configuration, a pool setting (set after the device's syncs: the
    // node would call it on each).
    let set = json!({ "Events": { "SyncTrigger": SYNC_TRIGGER } });
    let (status, answer) =
        developer(&server, "POST", &events_path(), set.to_string().as_bytes()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(server.terminate(), "the sqlite node stops cleanly");
    notes.put("c", "3").unwrap();
    assert_eq!(notes.pending(), 1);
    sdk.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let source_dump = dir.path().join("source.jsonl");
    let data_dir = server.data_dir().to_str().unwrap().to_owned();
    ok(&tandem(&[
        "export",
        "--data-dir",
        &data_dir,
        "--out",
        source_dump.to_str().unwrap(),
    ]));
    let source = body(&source_dump);
    let count = |kind: &str| {
        source
            .iter()
            .filter(|l| l.contains(&format!(r#""type":"{kind}""#)))
            .count()
    };
    assert_eq!(count("identity"), 2, "alice and the merged guest");
    let settings: Vec<&String> = source
        .iter()
        .filter(|l| l.contains(r#""type":"setting""#))
        .collect();
    assert_eq!(settings.len(), 1, "{settings:?}");
    assert!(
        settings[0].contains(r#""name":"cognito.events.SyncTrigger""#)
            && settings[0].contains(&format!(r#""value":"{SYNC_TRIGGER}""#)),
        "{}",
        settings[0]
    );
    assert!(
        source[source.len() - 2].contains(r#""type":"setting""#),
        "settings are the last section"
    );
    assert!(source.last().unwrap().ends_with(r#""settings":1}"#));
    assert!(count("dataset") > 30 && count("record") > 60 && count("grant") == 3);
    assert!(source.iter().any(|l| l.contains(r#""deleted":true"#)));
    assert!(source.iter().any(|l| l.contains(r#""mergeRoot":"notes""#)));
    assert!(source.iter().any(|l| l.contains(r#""value":null"#)));
    assert!(
        source
            .iter()
            .any(|l| l.contains(r#""deviceId":"user05-phone""#))
    );

    let schema = PgSchema::create();
    let pg = pg_args(&schema);
    let mut import = vec!["import"];
    import.extend_from_slice(&pg);
    import.extend_from_slice(&["--batch-size", "7", source_dump.to_str().unwrap()]);
    let output = tandem(&import);
    ok(&output);
    let progress = String::from_utf8_lossy(&output.stderr);
    assert!(progress.contains(r#""event":"done""#), "{progress}");

    let target_dump = dir.path().join("target.jsonl");
    let mut export = vec!["export"];
    export.extend_from_slice(&pg);
    export.extend_from_slice(&["--out", target_dump.to_str().unwrap()]);
    ok(&tandem(&export));
    assert_eq!(body(&target_dump), source, "the two dumps are identical");

    // The trigger is set on the copy as the developer API reads it.
    let mut reader_node = TestServer::builder()
        .arg("--store", &schema.url)
        .arg("--postgres-schema", &schema.name)
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg(
            "--cognito-admin-key",
            format!("{ADMIN_AKID}:{ADMIN_SECRET}"),
        )
        .start();
    let (status, events) = developer(&reader_node, "GET", &events_path(), b"").await;
    assert_eq!(
        (status, events),
        (200, json!({ "Events": { "SyncTrigger": SYNC_TRIGGER } }))
    );
    assert!(reader_node.terminate());

    // Two nodes serve the copy.
    let redis = RedisServer::start();
    let nodes = start_nodes(2, &pg_base_url(), &schema.name, &redis.url());
    let sdk = sdk_client(nodes[0].url(), nodes[0].token("sdkuser"), cache.path());
    sdk.wait_online(WAIT).await.unwrap();
    let notes = sdk
        .open(DatasetRef::own("notes"), ConflictHandler::TakeRemote)
        .await
        .unwrap();
    let mut events = notes.events();
    let outcome = notes.sync().await.unwrap();
    assert_eq!(outcome.conflicts, 0, "no conflict");
    assert_eq!(
        outcome.sync_count,
        held + 1,
        "the offline edit commits next"
    );
    assert_eq!(notes.get("c").as_deref(), Some("3"));
    assert_eq!(notes.get("a"), None);
    while let Ok(event) = events.try_recv() {
        assert!(!matches!(event, DatasetEvent::Conflict { .. }), "{event:?}");
    }
    sdk.shutdown().await;

    // What the device held is answered as a delta: `since` echoed, only the new record.
    let conn = nodes[1].connect("sdkuser").await;
    let snapshot = conn
        .subscribe_since(DatasetRef::own("notes"), Some(held))
        .await
        .unwrap();
    assert_eq!(snapshot.since, Some(held), "a delta, not a full resync");
    let keys: Vec<&str> = snapshot.records.iter().map(|r| r.key.as_str()).collect();
    assert_eq!(keys, ["c"]);

    // Grants and live pushes across the nodes.
    let reader = nodes[1].connect("user01").await;
    let team = DatasetRef::new("user00", "team");
    let (n, records) = reader.subscribe(team.clone()).await.unwrap();
    assert_eq!((n, records.len()), (2, 2));
    let writer = nodes[0].connect("user02").await;
    writer
        .update(team.clone(), None, vec![Patch::replace("plan", "b", 1)])
        .await
        .unwrap();
    let mut reader = reader;
    let (n, _) = next_push(&mut reader).await;
    assert_eq!(n, 3);
    let denied = nodes[0].connect("user01").await;
    assert!(
        denied
            .update(team, None, vec![Patch::replace("x", "y", 0)])
            .await
            .is_err()
    );
}

/// The pool settings every synthetic dump ends with.
const SYNTHETIC_SETTINGS: usize = 2;

/// A valid dump of `datasets` datasets of `records` records each, then
/// `SYNTHETIC_SETTINGS` pool settings, in dump order.
fn synthetic_dump(path: &Path, datasets: usize, records: usize) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(
        out,
        r#"{{"type":"header","format":"tandem-dump","version":2,"source":"sqlite","exportedAt":1,"tandem":"test"}}"#
    )
    .unwrap();
    for d in 0..datasets {
        let count = records as u64 + 1;
        writeln!(
            out,
            r#"{{"type":"dataset","pool":"default","owner":"owner{d:04}","name":"data","syncCount":{count},"deleted":false,"lastDeletedSyncCount":0,"mergeRoot":null,"createdAt":10,"lastModified":20}}"#
        )
        .unwrap();
        for r in 0..records {
            let value = if r % 10 == 0 {
                "null".to_owned()
            } else {
                format!(r#""value {r}""#)
            };
            writeln!(
                out,
                r#"{{"type":"record","key":"key{r:04}","value":{value},"syncCount":{},"lastModified":30,"lastModifiedBy":"owner{d:04}","deviceId":"dev","deviceLastModified":25}}"#,
                r + 1
            )
            .unwrap();
        }
    }
    for s in 0..SYNTHETIC_SETTINGS {
        writeln!(
            out,
            r#"{{"type":"setting","pool":"default","name":"hook.{s}","value":"https://hooks.example.com/{s}","updatedAt":40}}"#
        )
        .unwrap();
    }
    writeln!(
        out,
        r#"{{"type":"trailer","identities":0,"logins":0,"datasets":{datasets},"records":{},"grants":0,"settings":{SYNTHETIC_SETTINGS}}}"#,
        datasets * records
    )
    .unwrap();
}

/// Starts an import of a large dump into `target` (store flags), SIGKILLs it once it
/// reports progress past half way, runs it again, and checks the copy against the input.
fn kill_half_way_and_resume(target: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.jsonl");
    let (datasets, records) = (60, 100);
    synthetic_dump(&input, datasets, records);
    let lines = (datasets * (records + 1) + SYNTHETIC_SETTINGS + 2) as u64;
    let run = |progress: &str| {
        let mut command = Command::new(tandem_bin());
        command
            .arg("import")
            .args(target)
            .args(["--batch-size", "20", "--progress", progress])
            .arg(&input)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    };
    let export = |out: &Path| {
        let mut args = vec!["export"];
        args.extend_from_slice(target);
        args.extend_from_slice(&["--out", out.to_str().unwrap()]);
        ok(&tandem(&args));
        body(out)
    };
    let mut child = run("json").spawn().unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut killed_at = None;
    for line in stderr.lines() {
        let line = line.unwrap();
        let Ok(event) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        let at = event["line"].as_u64().unwrap_or(0);
        if event["event"] == "progress" && at >= lines / 2 {
            child.kill().unwrap(); // SIGKILL
            killed_at = Some(at);
            break;
        }
    }
    child.wait().unwrap();
    let killed_at = killed_at.expect("the import reported progress past half way");
    // Killed half way: at least what it reported is in, not everything.
    let partial = export(&dir.path().join("partial.jsonl"));
    let items = partial.len() as u64 - 1;
    assert!(
        items >= killed_at - 1 && items < lines - 2,
        "{items} items after the kill at line {killed_at} of {lines}"
    );

    let output = run("json").output().unwrap();
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let resumed: Value = stderr
        .lines()
        .find(|l| l.contains(r#""event":"resume""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no resume event in {stderr}"));
    let held = resumed["line"].as_u64().unwrap();
    assert!(held >= killed_at && held < lines, "{resumed}");
    assert_eq!(
        export(&dir.path().join("copy.jsonl")),
        body(&input),
        "nothing duplicated, nothing missing"
    );

    // A third run finds it complete and changes nothing.
    let output = run("json").output().unwrap();
    ok(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("imported already"));
}

#[test]
fn test_import_into_postgres_killed_half_way_resumes_to_an_exact_copy() {
    let schema = PgSchema::create();
    kill_half_way_and_resume(&pg_args(&schema));
    let state = psql(
        &schema.url,
        &format!("SELECT state FROM {}.import_progress", schema.name),
    );
    let state: Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["done"], json!(true), "{state}");
}

#[test]
fn test_import_into_sqlite_killed_half_way_resumes_to_an_exact_copy() {
    let data_dir = tempfile::tempdir().unwrap();
    kill_half_way_and_resume(&["--data-dir", data_dir.path().to_str().unwrap()]);
}

#[test]
fn test_import_bad_lines_are_refused_with_their_line_and_leave_nothing_of_their_batch() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("good.jsonl");
    synthetic_dump(&input, 3, 4);
    let good: Vec<String> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let import = |lines: &[String], data_dir: &Path, batch: &str| {
        let path = dir.path().join("input.jsonl");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        tandem(&[
            "import",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--batch-size",
            batch,
            path.to_str().unwrap(),
        ])
    };
    let export_items = |data_dir: &Path| {
        let out = ok(&tandem(&[
            "export",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ]));
        out.lines().count() - 2
    };
    let cases: Vec<(usize, String, &str)> = vec![
        (4, "{not json".to_owned(), "line 4: not a dump line"),
        (
            2,
            good[1].replace(r#""name":"data""#, r#""name":"bad name!""#),
            "line 2:",
        ),
        (
            3,
            good[2].replace(r#""syncCount":1"#, r#""syncCount":99"#),
            "line 3: record syncCount 99 is above",
        ),
        (
            5,
            good[4].replace(r#""deviceId""#, r#""surprise":1,"deviceId""#),
            "line 5: not a dump line: unknown field `surprise`",
        ),
        (6, good[0].clone(), "line 6: a second header"),
        (
            good.len() - 2,
            good[good.len() - 3].replace(r#""name":"hook.0""#, r#""name":"""#),
            "a pool setting name must be",
        ),
        (
            good.len() - 1,
            good[good.len() - 3].clone(),
            r#"pool setting "hook.0" of default already exists"#,
        ),
    ];
    for (at, bad, want) in cases {
        let mut lines = good.clone();
        lines[at - 1] = bad;
        let data_dir = tempfile::tempdir().unwrap();
        let stderr = failed(&import(&lines, data_dir.path(), "100"));
        assert!(stderr.contains(want), "want {want:?} in {stderr}");
        assert_eq!(export_items(data_dir.path()), 0, "nothing imported: {want}");
    }

    // A version-1 dump (from before pool settings) still imports; a setting line in one is
    // refused.
    let v1_trailer = format!(r#","settings":{SYNTHETIC_SETTINGS}}}"#);
    let v1: Vec<String> = good
        .iter()
        .filter(|l| !l.contains(r#""type":"setting""#))
        .map(|l| {
            l.replace(r#""version":2"#, r#""version":1"#)
                .replace(&v1_trailer, "}")
        })
        .collect();
    assert!(v1[0].contains(r#""version":1"#) && !v1[v1.len() - 1].contains("settings"));
    let data_dir = tempfile::tempdir().unwrap();
    ok(&import(&v1, data_dir.path(), "100"));
    assert_eq!(export_items(data_dir.path()), v1.len() - 2);
    let mut with_setting = v1.clone();
    with_setting.insert(v1.len() - 1, good[good.len() - 2].clone());
    let data_dir = tempfile::tempdir().unwrap();
    let stderr = failed(&import(&with_setting, data_dir.path(), "100"));
    let want = format!("line {}: a setting line in a version-1 dump", v1.len());
    assert!(stderr.contains(&want), "want {want:?} in {stderr}");

    // A line the store refuses (the same dataset twice) fails its batch only.
    let data_dir = tempfile::tempdir().unwrap();
    let mut lines = good.clone();
    lines.insert(7, good[6].clone());
    let stderr = failed(&import(&lines, data_dir.path(), "3"));
    assert!(stderr.contains("line 8: dataset"), "{stderr}");
    assert!(stderr.contains("already exists"), "{stderr}");
    assert_eq!(
        export_items(data_dir.path()),
        6,
        "the two batches before it"
    );

    // A cut-off file imports what it holds, says so, and the whole file finishes the job.
    let data_dir = tempfile::tempdir().unwrap();
    let cut = &good[..good.len() - 3];
    let stderr = failed(&import(cut, data_dir.path(), "2"));
    assert!(stderr.contains("without its trailer"), "{stderr}");
    ok(&import(&good, data_dir.path(), "2"));
    let copy = ok(&tandem(&[
        "export",
        "--data-dir",
        data_dir.path().to_str().unwrap(),
    ]));
    assert_eq!(copy.lines().skip(1).collect::<Vec<_>>(), good[1..].to_vec());

    // Another dump into it is refused: the target is not empty.
    let other = dir.path().join("other.jsonl");
    synthetic_dump(&other, 1, 1);
    let lines: Vec<String> = std::fs::read_to_string(&other)
        .unwrap()
        .lines()
        .map(|l| l.replace(r#""tandem":"test""#, r#""tandem":"other""#))
        .collect();
    let stderr = failed(&import(&lines, data_dir.path(), "2"));
    assert!(stderr.contains("not empty"), "{stderr}");
    // With skip-existing the dataset that exists stays as it is.
    let path = dir.path().join("merge.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let output = tandem(&[
        "import",
        "--data-dir",
        data_dir.path().to_str().unwrap(),
        "--merge",
        "skip-existing",
        path.to_str().unwrap(),
    ]);
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(r#""skipped":{"datasets":1"#), "{stderr}");
    assert!(
        stderr.contains(r#""records":1,"settings":2}"#),
        "the target's settings stay: {stderr}"
    );

    // A data dir a node serves is refused.
    let server = TestServer::builder()
        .data_dir(tempfile::tempdir().unwrap())
        .start();
    let stderr = failed(&import(&good, server.data_dir(), "2"));
    assert!(stderr.contains("in use"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_backup_under_write_load_holds_every_acknowledged_write() {
    let server = TestServer::start();
    let acked: Arc<Vec<AtomicU64>> = Arc::new((0..3).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3 {
        let conn = server.connect(&format!("writer{w}")).await;
        let (acked, stop) = (Arc::clone(&acked), Arc::clone(&stop));
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                n += 1;
                conn.update(
                    DatasetRef::own(format!("load{}", n / 500)),
                    None,
                    vec![Patch::replace(format!("k{n}"), "v", 0)],
                )
                .await
                .unwrap();
                acked[w].store(n, Ordering::SeqCst);
            }
            n
        }));
    }
    tandem_tests::wait_until(WAIT, "writes before the backup", || {
        acked.iter().all(|a| a.load(Ordering::SeqCst) >= 50)
    })
    .await;
    let before: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tandem-backup.db");
    let data_dir = server.data_dir().to_str().unwrap().to_owned();
    let out_str = out.to_str().unwrap().to_owned();
    let report = tokio::task::spawn_blocking(move || {
        tandem(&["backup", "--data-dir", &data_dir, "--out", &out_str])
    })
    .await
    .unwrap();
    let report = ok(&report);
    assert!(report.contains("integrity_check ok"), "{report}");
    let during: Vec<u64> = acked.iter().map(|a| a.load(Ordering::SeqCst)).collect();
    stop.store(true, Ordering::SeqCst);
    for writer in writers {
        writer.await.unwrap();
    }
    assert!(
        during.iter().zip(&before).any(|(d, b)| d > b),
        "writes went on during the backup: {before:?} -> {during:?}"
    );

    // The restore drill: the copy as tandem.db of a new data dir, checked, then served.
    let restored = tempfile::tempdir().unwrap();
    std::fs::copy(&out, restored.path().join("tandem.db")).unwrap();
    let check = ok(&tandem(&[
        "check",
        "--data-dir",
        restored.path().to_str().unwrap(),
    ]));
    assert!(check.contains("intact"), "{check}");
    let copy = TestServer::builder().data_dir(restored).start();
    for (w, &n) in before.iter().enumerate() {
        let conn = copy.connect(&format!("writer{w}")).await;
        let mut found = 0;
        for d in 0..=n / 500 {
            let (_, records) = conn
                .subscribe(DatasetRef::own(format!("load{d}")))
                .await
                .unwrap();
            found += records
                .iter()
                .filter(|r| r.key[1..].parse::<u64>().is_ok_and(|k| k >= 1 && k <= n))
                .count() as u64;
        }
        assert_eq!(
            found, n,
            "writer{w}: every write acknowledged before the backup"
        );
    }
}
