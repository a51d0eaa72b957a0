//! Log volume is bounded: a flood of what a client can cause at will (here refused tokens)
//! costs a few log lines and one summary with the count, while `/metrics` counts every one.

use tandem_client::UpdateResult;
use tandem_protocol::{DatasetRef, Patch};
use tandem_tests::raw::RawSocket;
use tandem_tests::tandem_protocol::{ClientFrame, ErrorCode, ServerFrame};
use tandem_tests::{SECRET, TestServer, http_get, metric, tandem_bin, try_http_status};

const REFUSED: usize = 2_000;
/// Frames sent before their replies are read: well under `max_queued_replies`.
const BATCH: usize = 100;

#[tokio::test]
async fn test_logs_a_flood_of_refused_tokens_logs_a_few_lines_and_counts_all() {
    // The interval outlasts the test, so no second budget of lines can start under a slow
    // run; the default budget of lines applies.
    let mut server = TestServer::builder()
        .arg("--max-requests-per-second", 0)
        .arg("--log-interval", "1h")
        .start();
    // A refused refresh keeps the session open, so one connection sends them all.
    let mut raw = RawSocket::authenticated(&server, "alice").await;
    refuse_tokens(&mut raw, REFUSED, BATCH).await;
    let lines = |log: &str| log.lines().filter(|l| l.contains("token refused")).count();
    let logged = lines(&without_colours(&server.log()));
    assert!(
        (1..=10).contains(&logged),
        "{logged} lines for {REFUSED} refused tokens"
    );
    assert_eq!(
        metric(
            &server,
            "tandem_gateway_events_total{event=\"token_refused\"}"
        )
        .await,
        REFUSED as u64
    );
    assert_eq!(
        metric(
            &server,
            "tandem_gateway_log_lines_suppressed_total{event=\"token_refused\"}"
        )
        .await,
        (REFUSED - logged) as u64
    );

    // The node that stops mid-interval says how many it left out.
    drop(raw);
    assert!(server.terminate());
    let log = without_colours(&server.log());
    let summary = log
        .lines()
        .find(|l| l.contains("suppressed similar events") && l.contains("token_refused"))
        .unwrap_or_else(|| panic!("no summary line:\n{log}"));
    assert!(
        summary.contains(&format!("suppressed={}", REFUSED - logged)),
        "{summary}"
    );
    assert_eq!(lines(&log), logged);
}

/// A log that cannot be written (a full disk under the log file; here `/dev/full`, where
/// every write fails with ENOSPC) costs its lines, not the service: the node starts,
/// commits, refuses and answers as usual. Before, the logger reported its failed write on
/// stderr, and that failing too panicked whatever logged: the start-up, or a session task,
/// whose client then waited for an answer that never came.
#[tokio::test]
async fn test_logs_a_log_that_cannot_be_written_costs_lines_not_answers() {
    let server = TestServer::builder()
        .arg("--max-requests-per-second", 0)
        .stderr("/dev/full")
        .start();
    let mut raw = RawSocket::authenticated(&server, "alice").await;
    // Each refused token logs a line (a few, then a summary): every one is answered.
    refuse_tokens(&mut raw, 20, 1).await;
    // A commit, and a stale write refused as a conflict, both answered.
    let alice = server.connect("alice").await;
    let ds = DatasetRef::own("settings");
    for expected_commit in [true, false] {
        let result = alice
            .update(ds.clone(), None, vec![Patch::replace("theme", "dark", 0)])
            .await
            .unwrap();
        assert_eq!(
            matches!(result, UpdateResult::Committed { .. }),
            expected_commit,
            "{result:?}"
        );
    }
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
}

/// A node whose stdout and stderr both go to a full disk starts and serves: the address it
/// prints on stdout is lost, nothing else.
#[tokio::test]
async fn test_logs_a_node_with_nowhere_to_write_starts_and_serves() {
    let data_dir = tempfile::tempdir().unwrap();
    // A port that was free a moment ago: the node cannot tell anyone which one it took.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let full = || {
        std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap()
    };
    let mut child = std::process::Command::new(tandem_bin())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--jwt-secret", SECRET, "--data-dir"])
        .arg(data_dir.path())
        .env_remove("TANDEM_CONFIG")
        .stdout(full())
        .stderr(full())
        .spawn()
        .unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut ready = None;
    for _ in 0..200 {
        if let Some(exit) = child.try_wait().unwrap() {
            panic!("the node exited: {exit}");
        }
        ready = try_http_status(addr, "/ready").await;
        if ready == Some(200) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(ready, Some(200));
}

/// Sends `count` refresh frames with a bad token, `batch` before reading their replies, and
/// checks each is refused as unauthorized (the session stays open).
async fn refuse_tokens(raw: &mut RawSocket, count: usize, batch: usize) {
    let bad = ClientFrame::Auth {
        id: None,
        token: "not-a-jwt".to_owned(),
        features: Vec::new(),
    }
    .to_json();
    for _ in 0..count / batch {
        for _ in 0..batch {
            raw.send(0x1, bad.as_bytes()).await;
        }
        for _ in 0..batch {
            let reply = raw.recv_frame().await;
            assert!(
                matches!(
                    &reply,
                    ServerFrame::Error {
                        code: ErrorCode::Unauthorized,
                        ..
                    }
                ),
                "{reply:?}"
            );
        }
    }
}

/// The log as text: the plain format colours field names even when writing to a file.
fn without_colours(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI sequences end with a letter (`\x1b[3m`, `\x1b[0m`).
            chars.by_ref().find(char::is_ascii_alphabetic);
        } else {
            out.push(c);
        }
    }
    out
}
