//! Origin checks: a browser page from another site cannot open `/v1/sync` or call
//! `/dev/token` unless its origin is allowed; the node's own pages and native clients (no
//! `Origin` header) always can; dev mode's `/dev/token` answers only requests addressed to
//! this machine (DNS rebinding).

use tandem_tests::{TestServer, http_get_with, metric};

const UPGRADE: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// The status of a WebSocket upgrade on `/v1/sync` with `headers`, and the body.
async fn upgrade(server: &TestServer, headers: &[(&str, &str)]) -> (u16, String) {
    let all: Vec<(&str, &str)> = UPGRADE.iter().chain(headers).copied().collect();
    http_get_with(server.addr, "/v1/sync", &all).await
}

#[tokio::test]
async fn test_origin_upgrade_from_another_site_is_refused_with_403() {
    let server = TestServer::start();
    let own = format!("http://{}", server.addr);
    // Native clients send no Origin; the node's own pages are same-origin.
    assert_eq!(upgrade(&server, &[]).await.0, 101);
    assert_eq!(upgrade(&server, &[("Origin", own.as_str())]).await.0, 101);

    let (status, body) = upgrade(&server, &[("Origin", "https://evil.example")]).await;
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["type"], "error", "{body}");
    assert_eq!(error["code"], "forbidden", "{body}");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("allowed_origins"),
        "{body}"
    );
    // Another port on the same host is another origin.
    let other_port = format!("http://127.0.0.1:{}", server.addr.port() ^ 1);
    assert_eq!(upgrade(&server, &[("Origin", &other_port)]).await.0, 403);
    assert_eq!(upgrade(&server, &[("Origin", "null")]).await.0, 403);
    assert_eq!(
        metric(
            &server,
            "tandem_gateway_events_total{event=\"origin_refused\"}"
        )
        .await,
        3
    );
}

#[tokio::test]
async fn test_origin_listed_origins_and_wildcard_are_allowed() {
    let server = TestServer::builder()
        .arg(
            "--allowed-origins",
            "https://app.example.com,http://localhost:3000/",
        )
        .start();
    for origin in ["https://app.example.com", "http://localhost:3000"] {
        assert_eq!(
            upgrade(&server, &[("Origin", origin)]).await.0,
            101,
            "{origin}"
        );
    }
    let own = format!("http://{}", server.addr);
    assert_eq!(upgrade(&server, &[("Origin", own.as_str())]).await.0, 101);
    assert_eq!(
        upgrade(&server, &[("Origin", "http://app.example.com")])
            .await
            .0,
        403
    );

    let any = TestServer::builder().arg("--allowed-origins", "*").start();
    assert_eq!(
        upgrade(&any, &[("Origin", "https://evil.example")]).await.0,
        101
    );
}

#[tokio::test]
async fn test_origin_setting_refuses_a_malformed_entry_at_start() {
    let output = std::process::Command::new(tandem_tests::tandem_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allowed-origins",
            "app.example.com",
        ])
        .env_remove("TANDEM_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid origin `app.example.com`"),
        "{stderr}"
    );
}

#[tokio::test]
async fn test_origin_dev_token_refuses_other_sites_and_foreign_hosts() {
    let server = TestServer::builder().arg("--dev", "true").start();
    let port = server.addr.port();
    let path = "/dev/token?sub=alice";
    // A native client, and the demo page itself.
    let (status, body) = http_get_with(server.addr, path, &[]).await;
    assert_eq!(status, 200, "{body}");
    for host in [format!("localhost:{port}"), format!("[::1]:{port}")] {
        let own = format!("http://{host}");
        let (status, body) =
            http_get_with(server.addr, path, &[("Host", &host), ("Origin", &own)]).await;
        assert_eq!(status, 200, "{host}: {body}");
    }

    // Another site's page.
    let (status, body) =
        http_get_with(server.addr, path, &[("Origin", "https://evil.example")]).await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("token\":"), "{body}");

    // DNS rebinding: the attacker's name now resolves to 127.0.0.1, so its page is
    // same-origin with itself and the request reaches the node, addressed to that name.
    let rebound = format!("rebind.evil.example:{port}");
    let origin = format!("http://{rebound}");
    let (status, body) = http_get_with(
        server.addr,
        path,
        &[("Host", &rebound), ("Origin", &origin)],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["code"], "forbidden", "{body}");
    // Loopback at another port is not this node either.
    let other = format!("localhost:{}", port ^ 1);
    assert_eq!(
        http_get_with(server.addr, path, &[("Host", &other)])
            .await
            .0,
        403
    );
    assert_eq!(
        metric(
            &server,
            "tandem_gateway_events_total{event=\"host_refused\"}"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn test_origin_dev_token_answers_a_configured_host() {
    let server = TestServer::builder()
        .arg("--dev", "true")
        .arg("--allowed-origins", "http://devbox.lan:7420")
        .start();
    let headers = [
        ("Host", "devbox.lan:7420"),
        ("Origin", "http://devbox.lan:7420"),
    ];
    let (status, body) = http_get_with(server.addr, "/dev/token?sub=alice", &headers).await;
    assert_eq!(status, 200, "{body}");
}
