//! The `tandem` command as an operator scripts it: zero-config serve with a generated
//! secret, `tandem token`, refusal to expose a server without keys, bad config.

use std::process::{Command, Stdio};
use tandem_client::Connection;
use tandem_tests::{TestServer, tandem_bin};

fn tandem(args: &[&str]) -> std::process::Output {
    Command::new(tandem_bin())
        .args(args)
        .env_remove("TANDEM_CONFIG")
        .env_remove("TANDEM_JWT_SECRET")
        .stdin(Stdio::null())
        .output()
        .expect("run tandem")
}

#[tokio::test]
async fn test_cli_zero_config_serve_and_token_from_data_dir() {
    let server = TestServer::builder().without_secret().start();
    let dir = server.data_dir().to_str().unwrap().to_owned();
    assert!(server.data_dir().join("jwt-secret").exists());
    let out = tandem(&[
        "token",
        "--data-dir",
        &dir,
        "--sub",
        "user-1",
        "--ttl",
        "10m",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let conn = Connection::connect(&server.url(), &token).await.unwrap();
    assert_eq!(conn.identity(), "user-1");
    assert!(server.log().contains("tandem token --data-dir"));
}

#[test]
fn test_cli_token_with_explicit_secret() {
    let secret = "0123456789abcdef0123456789abcdef";
    let out = tandem(&["token", "--jwt-secret", secret, "--sub", "u"]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap();
    let verifier = tandem_gateway::Verifier::new(&tandem_gateway::AuthConfig {
        hs256_secret: Some(secret.as_bytes().to_vec()),
        ..Default::default()
    })
    .unwrap();
    let identity = verifier.verify(token.trim()).unwrap();
    assert_eq!(identity.sub, "u");
}

/// `tandem token`'s `iss` claim as the settings layers give it: flags over `TANDEM_*` over the
/// `--config` file over the default (none).
#[test]
fn test_cli_settings_flag_over_env_over_file_over_default() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(&config, "jwt_issuer = \"file\"\n").unwrap();
    let issuer = |config: Option<&std::path::Path>, env: Option<&str>, flag: Option<&str>| {
        let mut cmd = Command::new(tandem_bin());
        cmd.args(["token", "--sub", "u", "--jwt-secret"])
            .arg("0123456789abcdef0123456789abcdef")
            .env_remove("TANDEM_CONFIG")
            .env_remove("TANDEM_JWT_SECRET")
            .env_remove("TANDEM_JWT_ISSUER")
            .stdin(Stdio::null());
        if let Some(config) = config {
            cmd.env("TANDEM_CONFIG", config);
        }
        if let Some(env) = env {
            cmd.env("TANDEM_JWT_ISSUER", env);
        }
        if let Some(flag) = flag {
            cmd.args(["--jwt-issuer", flag]);
        }
        let out = cmd.output().expect("run tandem");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap();
        let payload = token.trim().split('.').nth(1).unwrap();
        use base64::Engine;
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        let claims: serde_json::Value = serde_json::from_slice(&claims).unwrap();
        claims["iss"].as_str().map(str::to_owned)
    };
    let file = Some(config.as_path());
    assert_eq!(
        issuer(file, Some("env"), Some("flag")).as_deref(),
        Some("flag")
    );
    assert_eq!(issuer(file, Some("env"), None).as_deref(), Some("env"));
    assert_eq!(issuer(file, None, None).as_deref(), Some("file"));
    assert_eq!(issuer(None, None, None), None);
}

#[test]
fn test_cli_token_without_secret_explains_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let out = tandem(&[
        "token",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--sub",
        "u",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tandem serve --data-dir"), "{err}");
}

#[test]
fn test_cli_refuses_non_loopback_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let out = tandem(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to listen"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
}

#[test]
fn test_cli_unknown_config_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nmax_recods = 5\n").unwrap();
    let out = tandem(&["serve", "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field"), "{err}");
}

#[tokio::test]
async fn test_cli_config_file_settings_apply() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(&config, "max_records = 2\nauth_timeout = \"5s\"\n").unwrap();
    let server = TestServer::builder()
        .arg("--config", config.to_str().unwrap())
        .start();
    let conn = server.connect("u").await;
    let ds = tandem_protocol::DatasetRef::own("d");
    let patches = (0..3)
        .map(|i| tandem_protocol::Patch::replace(format!("k{i}"), "v", 0))
        .collect();
    let err = conn.update(ds, None, patches).await.unwrap_err();
    match err {
        tandem_client::ClientError::Server { limit, max, .. } => {
            assert_eq!(limit, Some(tandem_protocol::LimitCode::MaxRecords));
            assert_eq!(max, Some(2));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn test_cli_dev_token_endpoint_only_in_dev_mode() {
    let server = TestServer::start();
    let (status, body) = tandem_tests::http_get(server.addr, "/dev/token?sub=alice").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("dev mode is off"), "{body}");
    let (status, body) = tandem_tests::http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(body.contains("<"), "the demo page is served: {body}");
    let (status, _) = tandem_tests::http_get(server.addr, "/sdk/tandem.js").await;
    assert_eq!(status, 200);

    let dev = TestServer::builder().arg("--dev", "true").start();
    let (status, body) = tandem_tests::http_get(dev.addr, "/dev/token?sub=alice").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let conn = Connection::connect(&dev.url(), v["token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(conn.identity(), "alice");
}

#[test]
fn test_cli_dev_mode_refuses_non_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = tandem(&[
        "serve",
        "--dev",
        "--listen",
        "0.0.0.0:0",
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing dev mode"));
}

#[test]
fn test_cli_load_runs_the_harness_against_a_running_server() {
    let server = TestServer::start();
    let url = server.url();
    let out = tandem(&[
        "load",
        "--url",
        &url,
        "--secret",
        tandem_tests::SECRET,
        "--quiet",
        "--json",
        "fanout",
        "--subscribers",
        "3",
        "--rate",
        "20",
        "--size",
        "256",
        "--duration",
        "500ms",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let deliveries = &report["deliveries"];
    let expected = deliveries["expected"].as_u64().unwrap();
    assert!(expected > 0, "{report}");
    assert_eq!(deliveries["received"].as_u64(), Some(expected), "{report}");
    assert_eq!(deliveries["lost"].as_u64(), Some(0), "{report}");
    // Bad options exit 2, as the standalone harness does.
    let bad = tandem(&["load", "fanout", "--subscribers", "lots"]);
    assert_eq!(bad.status.code(), Some(2));
}
