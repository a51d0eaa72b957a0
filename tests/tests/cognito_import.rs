//! `tandem import cognito` as real processes: a Tandem node with the Cognito APIs and a
//! developer key stands in for AWS, boto3 (tests/python/cognito_import.py) fills it as apps
//! do, the importer (the AWS SDK for Rust, `--endpoint` at the node) copies it into another
//! store, and the copy is compared with the source's own export. A device with its cache
//! from before the move then syncs against a node serving the copy without a conflict; an
//! import killed with SIGKILL half way resumes to the same copy; a dry run reports what the
//! pool holds and writes nothing; a source that throttles (429 TooManyRequestsException)
//! is waited out.

use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tandem_tests::cluster::PgSchema;
use tandem_tests::{SECRET, TestServer, TestServerBuilder, tandem_bin};

const POOL: &str = "us-east-1:3b1f2c4d-5e6f-4a7b-8c9d-0e1f2a3b4c5d";
const ISSUER: &str = "https://login.example.com";
const PROVIDER: &str = "login.example.com";
const ADMIN_AKID: &str = "AKIDTANDEMIMPORTER";
const ADMIN_SECRET: &str = "importer-secret-0123456789/abc";

fn node() -> TestServerBuilder {
    TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg(
            "--cognito-admin-key",
            format!("{ADMIN_AKID}:{ADMIN_SECRET}"),
        )
}

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

/// Nothing from this machine's AWS setup reaches a child: only what the test gives it.
fn isolate_aws(command: &mut Command) -> &mut Command {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ] {
        command.env_remove(var);
    }
    command
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_EC2_METADATA_DISABLED", "true")
}

/// Runs one phase of the boto3 script with `config`; its JSON findings.
fn phase(python: &str, config: &Value, name: &str) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/cognito_import.py");
    let output = isolate_aws(
        Command::new(python)
            .arg(script)
            .arg(name)
            .env("TANDEM_COGNITO_IMPORT", config.to_string()),
    )
    .output()
    .unwrap();
    assert!(
        output.status.success(),
        "boto3 phase {name} failed\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn config(source: &TestServer, guests: usize) -> Value {
    json!({
        "source": format!("http://{}", source.addr),
        "pool": POOL,
        "admin_akid": ADMIN_AKID,
        "admin_secret": ADMIN_SECRET,
        "provider": PROVIDER,
        "login": login_token("alice"),
        "guests": guests,
    })
}

/// `tandem import cognito` from `source` into `target` (store flags), with the developer
/// key in the standard AWS variables.
fn importer(source: &TestServer, target: &[&str], extra: &[&str]) -> Command {
    importer_of(POOL, source, target, extra)
}

fn importer_of(pool: &str, source: &TestServer, target: &[&str], extra: &[&str]) -> Command {
    let mut command = Command::new(tandem_bin());
    isolate_aws(&mut command)
        .args(["import", "cognito", "--identity-pool-id", pool])
        .args(["--endpoint", &format!("http://{}", source.addr)])
        .args(target)
        .args(extra)
        .env("AWS_ACCESS_KEY_ID", ADMIN_AKID)
        .env("AWS_SECRET_ACCESS_KEY", ADMIN_SECRET)
        .env_remove("TANDEM_CONFIG")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    command
}

fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "tandem failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `tandem export` of a store (a SQLite data dir may be served meanwhile): its item lines
/// as JSON, header and trailer left out.
fn export(store: &[&str], out: &Path) -> Vec<Value> {
    let mut command = Command::new(tandem_bin());
    command
        .arg("export")
        .args(store)
        .args(["--out", out.to_str().unwrap()])
        .env_remove("TANDEM_CONFIG")
        .env("RUST_LOG", "warn");
    ok(&command.output().unwrap());
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["type"] != "header" && v["type"] != "trailer")
        .collect()
}

/// What the Cognito APIs can show of a source export, in the form an import writes it:
/// no merged-away identities (ListIdentities does not list them), no deleted datasets
/// (ListDatasets does not), no device ids (records do not carry them), logins with the
/// time an import gives them (the identity's creation; the API has no link time), and a
/// dataset's creation time as a Tandem source reports it (its last commit's: the store keeps
/// no creation time per incarnation for the API, docs/COGNITO.md; AWS reports the real one).
fn visible(items: &[Value]) -> Vec<Value> {
    let created: BTreeMap<String, Value> = items
        .iter()
        .filter(|v| v["type"] == "identity")
        .map(|v| (v["id"].as_str().unwrap().to_owned(), v["createdAt"].clone()))
        .collect();
    let mut out = Vec::new();
    let mut in_deleted = false;
    for item in items {
        let mut item = item.clone();
        match item["type"].as_str().unwrap() {
            "identity" if !item["mergedInto"].is_null() => continue,
            "login" => item["linkedAt"] = created[item["identity"].as_str().unwrap()].clone(),
            "dataset" => {
                in_deleted = item["deleted"] == true;
                if in_deleted {
                    continue;
                }
                item["createdAt"] = item["lastModified"].clone();
            }
            "record" => {
                if in_deleted {
                    continue;
                }
                item["deviceId"] = Value::Null;
            }
            _ => {}
        }
        out.push(item);
    }
    out
}

/// The `--logins` file an admin writes from their own user directory: here, the source's
/// links.
fn logins_file(items: &[Value], path: &Path) {
    let lines: String = items
        .iter()
        .filter(|v| v["type"] == "login")
        .map(|v| {
            format!(
                "{},{},{}\n",
                v["identity"].as_str().unwrap(),
                v["provider"].as_str().unwrap(),
                v["subject"].as_str().unwrap()
            )
        })
        .collect();
    std::fs::write(path, format!("# identityId,provider,subject\n{lines}")).unwrap();
}

/// Equal item lists, or the first difference (the lists are long).
fn assert_same(got: &[Value], want: &[Value], what: &str) {
    if let Some(i) = (0..got.len().max(want.len())).find(|&i| got.get(i) != want.get(i)) {
        panic!(
            "{what}: item {i} differs ({} items, want {})\n got: {:?}\nwant: {:?}",
            got.len(),
            want.len(),
            got.get(i),
            want.get(i)
        );
    }
}

fn count(items: &[Value], kind: &str) -> u64 {
    items.iter().filter(|v| v["type"] == kind).count() as u64
}

#[test]
fn test_cognito_import_copies_the_pool_and_a_device_keeps_syncing_without_conflict() {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let source = node().start();
    let mut config = config(&source, 24);
    let state = phase(&python, &config, "fill");
    let work = tempfile::tempdir().unwrap();
    let source_store = ["--data-dir", source.data_dir().to_str().unwrap()];
    let source_items = export(&source_store, &work.path().join("source.jsonl"));
    let expected = visible(&source_items);
    let logins = work.path().join("logins.csv");
    logins_file(&source_items, &logins);

    // The dry run reads everything, reports it, and opens no target.
    let target_dir = tempfile::tempdir().unwrap();
    let target = ["--data-dir", target_dir.path().to_str().unwrap()];
    let output = importer(
        &source,
        &target,
        &["--dry-run", "--logins", logins.to_str().unwrap()],
    )
    .output()
    .unwrap();
    let report: Value = serde_json::from_str(ok(&output).trim()).unwrap();
    let found = &report["found"];
    let records: Vec<&Value> = expected.iter().filter(|v| v["type"] == "record").collect();
    assert_eq!(
        found["identities"],
        count(&expected, "identity"),
        "{report}"
    );
    assert_eq!(found["datasets"], count(&expected, "dataset"), "{report}");
    assert_eq!(
        found["records"],
        records.iter().filter(|r| !r["value"].is_null()).count(),
        "{report}"
    );
    assert_eq!(
        found["tombstones"],
        records.iter().filter(|r| r["value"].is_null()).count(),
        "{report}"
    );
    let bytes: usize = records
        .iter()
        .filter_map(|r| {
            r["value"]
                .as_str()
                .map(|v| v.len() + r["key"].as_str().unwrap().len())
        })
        .sum();
    assert_eq!(found["bytes"], bytes, "{report}");
    assert_eq!(found["authenticated"], 1, "{report}");
    assert_eq!(found["authenticatedWithoutLinks"], 0, "{report}");
    assert_eq!(found["mergedCopies"], 1, "{report}");
    assert!(
        found["recreatedDatasets"].as_u64().unwrap() >= 1,
        "{report}"
    );
    assert!(report["requests"].as_u64().unwrap() > 24, "{report}");
    assert!(
        std::fs::read_dir(target_dir.path())
            .unwrap()
            .next()
            .is_none(),
        "a dry run writes nothing"
    );

    // The import: identical identities, datasets with their sync counts, records with
    // theirs, tombstones, merge roots, re-created datasets' delete counts, login links.
    let checkpoint = work.path().join("checkpoint.json");
    let output = importer(
        &source,
        &target,
        &[
            "--logins",
            logins.to_str().unwrap(),
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--rate",
            "1000",
        ],
    )
    .output()
    .unwrap();
    ok(&output);
    let copy = export(&target, &work.path().join("copy.jsonl"));
    assert_same(
        &copy,
        &expected,
        "the copy is what the API shows of the source",
    );
    let held: Value = serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
    assert_eq!(held["done"], true, "{held}");
    assert_eq!(held["identities"], count(&expected, "identity"), "{held}");

    // The same pool again: nothing to do.
    let output = importer(&source, &target, &[]).output().unwrap();
    ok(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("was imported into this store already"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // A node serves the copy with the same pool and secret; the device syncs against it.
    let target_node = node().data_dir(target_dir).start();
    config["target"] = json!(format!("http://{}", target_node.addr));
    config["state"] = state;
    let pushed = phase(&python, &config, "device");
    assert!(pushed["pushed"].is_object(), "{pushed}");
}

#[test]
fn test_cognito_import_killed_half_way_resumes_without_duplicates_or_gaps() {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let source = node().start();
    // More than one ListIdentities page (60).
    phase(&python, &config(&source, 80), "fill");
    let work = tempfile::tempdir().unwrap();
    let source_store = ["--data-dir", source.data_dir().to_str().unwrap()];
    let source_items = export(&source_store, &work.path().join("source.jsonl"));
    let mut expected = visible(&source_items);
    // No --logins here: the account is copied without its link (still not a guest).
    expected.retain(|v| v["type"] != "login");
    let identities = count(&expected, "identity");

    let schema = PgSchema::create();
    let target = ["--store", &schema.url, "--postgres-schema", &schema.name];
    let checkpoint = work.path().join("checkpoint.json");
    let run = || {
        let mut command = importer(
            &source,
            &target,
            &[
                "--rate",
                "150",
                "--batch-size",
                "1",
                "--progress",
                "json",
                "--checkpoint",
                checkpoint.to_str().unwrap(),
            ],
        );
        command.stdout(Stdio::null()).stderr(Stdio::piped());
        command
    };
    // Killed twice: inside the first ListIdentities page, then inside the second (a resume
    // from a page token), each time with SIGKILL once the progress has passed `at_least`.
    let mut killed_at = 0;
    for at_least in [identities / 3, 65] {
        let mut child = run().spawn().unwrap();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut killed = None;
        for line in stderr.lines() {
            let line = line.unwrap();
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if event["event"] == "resume" {
                assert!(
                    event["identities"].as_u64().unwrap() >= killed_at,
                    "{event}"
                );
            }
            let at = event["identities"].as_u64().unwrap_or(0);
            if event["event"] == "progress" && at >= at_least {
                // The checkpoint file shows the progress before the kill.
                let held: Value =
                    serde_json::from_str(&std::fs::read_to_string(&checkpoint).unwrap()).unwrap();
                assert!(held["identities"].as_u64().unwrap() >= at, "{held}");
                assert_eq!(held["done"], false, "{held}");
                child.kill().unwrap(); // SIGKILL
                killed = Some(at);
                break;
            }
        }
        child.wait().unwrap();
        killed_at = killed.unwrap_or_else(|| panic!("no progress past {at_least}"));
        let partial = export(&target, &work.path().join("partial.jsonl"));
        let partial_identities = count(&partial, "identity");
        assert!(
            partial_identities >= killed_at && partial_identities < identities,
            "{partial_identities} identities in after the kill at {killed_at} of {identities}"
        );
    }
    assert!(killed_at > 60, "the second kill was on the second page");

    let output = run().output().unwrap();
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let event = |name: &str| -> Value {
        stderr
            .lines()
            .find(|l| l.contains(&format!(r#""event":"{name}""#)))
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap_or_else(|| panic!("no {name} event in {stderr}"))
    };
    let resumed = event("resume");
    assert!(
        resumed["identities"].as_u64().unwrap() >= killed_at,
        "{resumed}"
    );
    // Counted once each over both runs.
    let done = event("done");
    assert_eq!(done["imported"]["identities"], identities, "{done}");
    assert_eq!(
        done["imported"]["records"],
        count(&expected, "record"),
        "{done}"
    );
    assert_same(
        &export(&target, &work.path().join("copy.jsonl")),
        &expected,
        "nothing duplicated, nothing missing",
    );
}

#[test]
fn test_cognito_import_waits_out_a_source_that_throttles() {
    let Ok(python) = std::env::var("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let source = node().start();
    phase(&python, &config(&source, 8), "fill");
    let work = tempfile::tempdir().unwrap();
    let source_store = ["--data-dir", source.data_dir().to_str().unwrap()];
    let mut expected = visible(&export(&source_store, &work.path().join("source.jsonl")));
    expected.retain(|v| v["type"] != "login");
    // The same data served by a node that lets the developer make 5 Cognito Sync requests
    // a second, and an importer that asks for 100.
    let mut source = source;
    source.add_arg("--cognito-max-requests-per-second", 5);
    source.restart();

    let target_dir = tempfile::tempdir().unwrap();
    let target = ["--data-dir", target_dir.path().to_str().unwrap()];
    let output = importer(
        &source,
        &target,
        &["--rate", "100", "--progress", "json", "--max-retries", "20"],
    )
    .output()
    .unwrap();
    ok(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let done: Value = stderr
        .lines()
        .find(|l| l.contains(r#""event":"done""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .unwrap_or_else(|| panic!("no done event in {stderr}"));
    assert!(done["throttled"].as_u64().unwrap() > 0, "{done}");
    assert_same(
        &export(&target, &work.path().join("copy.jsonl")),
        &expected,
        "throttled requests were retried, not skipped",
    );

    // With no retries allowed, the first throttled request stops the import with the code.
    let other = tempfile::tempdir().unwrap();
    let output = importer(
        &source,
        &["--data-dir", other.path().to_str().unwrap()],
        &["--rate", "100", "--max-retries", "0"],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TooManyRequestsException"), "{stderr}");
}

#[test]
fn test_cognito_import_refuses_bad_input_with_a_reason() {
    let source = node().start();
    let target_dir = tempfile::tempdir().unwrap();
    let target = ["--data-dir", target_dir.path().to_str().unwrap()];
    let run = |extra: &[&str], env: &[(&str, &str)]| -> String {
        let mut command = importer(&source, &target, extra);
        for (k, v) in env {
            command.env(k, v);
        }
        let output = command.output().unwrap();
        assert!(
            !output.status.success(),
            "should fail: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // A wrong secret: the source refuses the signature.
    let err = run(&[], &[("AWS_SECRET_ACCESS_KEY", "wrong")]);
    assert!(err.contains("InvalidSignatureException"), "{err}");
    // A profile that is not there: refused at once, not retried.
    let err = run(
        &["--profile", "nope", "--max-retries", "50"],
        &[("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")],
    );
    assert!(
        err.contains(r#"no credentials from profile "nope""#),
        "{err}"
    );
    assert!(!err.contains("retries"), "{err}");
    // The profile's key, not the environment's (wrong) one.
    let credentials = target_dir.path().join("credentials");
    std::fs::write(
        &credentials,
        format!(
            "[migration]\naws_access_key_id = {ADMIN_AKID}\naws_secret_access_key = {ADMIN_SECRET}\n"
        ),
    )
    .unwrap();
    let output = importer(&source, &target, &["--profile", "migration", "--dry-run"])
        .env("AWS_SECRET_ACCESS_KEY", "wrong")
        .env("AWS_SHARED_CREDENTIALS_FILE", &credentials)
        .output()
        .unwrap();
    let report: Value = serde_json::from_str(ok(&output).trim()).unwrap();
    assert_eq!(report["found"]["identities"], 0, "{report}");
    // A pool the source does not serve.
    let output = importer_of(
        "us-east-1:00000000-0000-4000-8000-000000000000",
        &source,
        &target,
        &[],
    )
    .output()
    .unwrap();
    assert!(!output.status.success());
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("ResourceNotFoundException"), "{err}");
    let err = String::from_utf8_lossy(
        &importer_of("nocolon", &source, &target, &[])
            .output()
            .unwrap()
            .stderr,
    )
    .into_owned();
    assert!(err.contains("not an identity pool id"), "{err}");
    // A target that holds data already, without --merge.
    let dump = target_dir.path().join("one.jsonl");
    std::fs::write(
        &dump,
        concat!(
            r#"{"type":"header","format":"tandem-dump","version":1,"source":"sqlite","exportedAt":1,"tandem":"0"}"#,
            "\n",
            r#"{"type":"identity","pool":"default","id":"us-east-1:11111111-1111-4111-8111-111111111111","guest":true,"mergedInto":null,"createdAt":1}"#,
            "\n",
            r#"{"type":"trailer","identities":1,"logins":0,"datasets":0,"records":0,"grants":0}"#,
            "\n"
        ),
    )
    .unwrap();
    let mut load = Command::new(tandem_bin());
    load.args(["import", "--progress", "none"])
        .args(target)
        .arg(&dump)
        .env_remove("TANDEM_CONFIG")
        .env("RUST_LOG", "warn");
    ok(&load.output().unwrap());
    let err = run(&[], &[]);
    assert!(err.contains("the target store is not empty"), "{err}");
    // A bad rate, a bad logins file.
    let err = run(&["--rate", "0"], &[]);
    assert!(err.contains("positive number"), "{err}");
    let bad = target_dir.path().join("bad-logins.csv");
    std::fs::write(&bad, "only-one-field\n").unwrap();
    let err = run(&["--logins", bad.to_str().unwrap()], &[]);
    assert!(err.contains("line 1"), "{err}");
}
