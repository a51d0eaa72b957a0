//! Each scenario against a real server started in this process: small runs with known
//! input, asserting the counts exactly (never timings).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tandem_loadtest::{Cli, Report};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "tandem-loadtest-test-secret-0123456789abcdef";
const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";

/// A tandem server on its own runtime and thread, on a free loopback port.
struct TestServer {
    url: String,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start() -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            probe.local_addr().unwrap()
        };
        let mut settings = tandem_server::config::Settings {
            server: tandem_server::config::ServerConfig {
                listen: addr,
                data_dir: dir.path().to_path_buf(),
                jwt_secret: Some(SECRET.to_owned()),
                drain_delay: Duration::ZERO,
                ..Default::default()
            },
            ..Default::default()
        };
        // The Identity endpoint, for the `cognito` scenario.
        settings.cognito.cognito_identity_pool = Some(POOL.to_owned());
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            runtime
                .block_on(tandem_server::serve(settings, token))
                .unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        TestServer {
            url: format!("ws://{addr}/v1/sync"),
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn run(server: &TestServer, args: &[&str]) -> Report {
    let mut argv = vec![
        "tandem-loadtest",
        "--url",
        &server.url,
        "--secret",
        SECRET,
        "--quiet",
        "--drain",
        "20s",
    ];
    argv.extend_from_slice(args);
    let cli = Cli::try_parse_from(argv).unwrap();
    tandem_loadtest::run(cli).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_fanout_delivers_every_write_to_every_subscriber() {
    let server = TestServer::start();
    // Two --url entries for one server: connections go round-robin across them. Whole
    // `dataset` frames (--no-delta), each the whole ~2000-byte document. The server runs in
    // this process: its pid, twice, stands for two nodes.
    let pid = std::process::id().to_string();
    let report = run(
        &server,
        &[
            "--url",
            &server.url,
            "--server-pid",
            &pid,
            "--server-pid",
            &pid,
            "--no-delta",
            "fanout",
            "--subscribers",
            "5",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--size",
            "2000",
        ],
    )
    .await;
    let writes = report.writes.as_ref().unwrap();
    let deliveries = report.deliveries.as_ref().unwrap();
    assert_eq!(writes.sent, 20, "{}", report.to_table());
    assert_eq!(writes.acked, 20);
    assert_eq!(writes.conflicts, 0);
    assert_eq!(writes.commit_latency_ms.count, 20);
    assert_eq!(deliveries.expected, 5 * 20);
    assert_eq!(deliveries.received, 5 * 20, "{}", report.to_table());
    assert_eq!(deliveries.lost, 0);
    assert_eq!(deliveries.latency_ms.count, 100);
    // One first delivery per write; the first subscriber is never later than all of them.
    let first = &deliveries.first_latency_ms;
    assert_eq!(first.count, 20);
    assert!(first.p50 <= deliveries.latency_ms.p50);
    assert!(first.max <= deliveries.latency_ms.max);
    assert!(report.to_table().contains("first delivery"));
    let server_figures = report.server.as_ref().unwrap();
    assert_eq!(server_figures.pids.len(), 2);
    let cpu = server_figures.cpu.as_ref().unwrap();
    assert!(cpu.window_seconds > 0.0);
    assert!(cpu.per_delivery_us.is_some() && cpu.per_commit_us.is_some());
    assert!(deliveries.push_bytes >= deliveries.push_frames * 2000);
    assert_eq!(deliveries.delta_frames, 0);
    assert_eq!(deliveries.subscribers, 5);
    assert_eq!(deliveries.at_final_sync_count, 5);
    let features = report.features.as_ref().unwrap();
    assert_eq!(features.asked, ["lean"]);
    assert_eq!(features.accepted.as_deref(), Some(&["lean".to_owned()][..]));
    assert!(report.closes.is_empty(), "{:?}", report.closes);
    assert_eq!(report.connections.established, 6);
    assert_eq!(report.urls.len(), 2);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The JSON form carries the same figures.
    let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
    assert_eq!(json["deliveries"]["received"], 100);
    assert_eq!(json["deliveries"]["first_latency_ms"]["count"], 20);
    assert!(json["server"]["cpu"]["per_delivery_us"].is_number());
    assert_eq!(json["scenario"], "fanout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_fanout_warmup_writes_are_sent_but_not_counted() {
    let server = TestServer::start();
    let report = run(
        &server,
        &[
            "fanout",
            "--subscribers",
            "2",
            "--rate",
            "10",
            "--warmup",
            "500ms",
            "--duration",
            "1s",
        ],
    )
    .await;
    let writes = report.writes.as_ref().unwrap();
    let deliveries = report.deliveries.as_ref().unwrap();
    // 15 writes scheduled, the first 5 in the warmup.
    assert_eq!(writes.sent, 10);
    assert_eq!(writes.acked, 10);
    assert_eq!(deliveries.expected, 20);
    assert_eq!(deliveries.received, 20);
    assert_eq!(deliveries.lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_fanout_with_deltas_pushes_only_the_changed_record() {
    let server = TestServer::start();
    // A 20-record ~2000-byte document; each write changes the one marker record.
    let report = run(
        &server,
        &[
            "fanout",
            "--subscribers",
            "4",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--size",
            "2000",
            "--records",
            "20",
        ],
    )
    .await;
    let deliveries = report.deliveries.as_ref().unwrap();
    let features = report.features.as_ref().unwrap();
    assert_eq!(features.asked, ["delta", "lean"]);
    assert_eq!(
        features.accepted.as_deref(),
        Some(&["delta".to_owned(), "lean".to_owned()][..])
    );
    assert_eq!(deliveries.expected, 4 * 20);
    assert_eq!(deliveries.received, 4 * 20, "{}", report.to_table());
    assert!(deliveries.delta_frames > 0, "{}", report.to_table());
    // Mostly deltas of one ~30-byte record: far below the document's size on average.
    assert!(deliveries.bytes_per_push < 1000.0, "{}", report.to_table());
    assert_eq!(deliveries.at_final_sync_count, 4);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_fanout_slow_readers_still_end_at_the_final_state() {
    let server = TestServer::start();
    // 2 of 4 subscribers read 10 frames/s while 30 commits come at 30/s: they fall behind
    // and catch up in the drain (a bounded one: run() gives 20 s).
    let report = run(
        &server,
        &[
            "fanout",
            "--subscribers",
            "4",
            "--rate",
            "30",
            "--duration",
            "1s",
            "--read-rate",
            "10",
            "--slow-readers",
            "2",
            "--recv-buffer",
            "4096",
        ],
    )
    .await;
    let deliveries = report.deliveries.as_ref().unwrap();
    assert_eq!(deliveries.slow_readers, 2, "{}", report.to_table());
    assert_eq!(deliveries.subscribers, 4);
    assert_eq!(deliveries.at_final_sync_count, 4, "{}", report.to_table());
    assert_eq!(deliveries.slow_at_final_sync_count, 2);
    assert_eq!(
        deliveries.received,
        deliveries.expected,
        "{}",
        report.to_table()
    );
    assert_eq!(deliveries.expected, 4 * 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rooms_every_member_receives_every_members_writes() {
    let server = TestServer::start();
    let report = run(
        &server,
        &[
            "rooms",
            "--groups",
            "2",
            "--group-size",
            "3",
            "--rate",
            "5",
            "--duration",
            "1s",
            "--seed",
            "7",
            "--records",
            "10",
        ],
    )
    .await;
    let writes = report.writes.as_ref().unwrap();
    let deliveries = report.deliveries.as_ref().unwrap();
    // 6 users x 5 writes; each write reaches the 3 members of its room.
    assert_eq!(writes.sent, 30, "{}", report.to_table());
    assert_eq!(writes.acked, 30);
    assert_eq!(writes.conflicts, 0);
    assert_eq!(writes.unsent, 0);
    assert_eq!(deliveries.expected, 90);
    assert_eq!(deliveries.received, 90, "{}", report.to_table());
    assert_eq!(deliveries.lost, 0);
    // A member's own push is not a first delivery, but each write reaches two others.
    assert_eq!(deliveries.first_latency_ms.count, 30);
    assert_eq!(deliveries.at_final_sync_count, 6);
    assert_eq!(report.connections.established, 6);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_write_commits_every_scheduled_write() {
    let server = TestServer::start();
    let report = run(
        &server,
        &[
            "write",
            "--writers",
            "4",
            "--rate",
            "10",
            "--duration",
            "1s",
        ],
    )
    .await;
    let writes = report.writes.as_ref().unwrap();
    assert_eq!(writes.sent, 40, "{}", report.to_table());
    assert_eq!(writes.acked, 40);
    assert_eq!(writes.conflicts, 0);
    assert_eq!(writes.unknown_outcome, 0);
    assert_eq!(writes.commit_latency_ms.count, 40);
    assert!(report.deliveries.is_none());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_signs_and_commits_every_scheduled_update() {
    let server = TestServer::start();
    let report = run(
        &server,
        &[
            "cognito",
            "--pool",
            POOL,
            "--writers",
            "3",
            "--rate",
            "10",
            "--list-rate",
            "5",
            "--duration",
            "1s",
        ],
    )
    .await;
    // Every update was signed right (no IncompleteSignature / InvalidSignatureException)
    // and carried the sync count of the previous reply (no conflicts).
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.connections.established, 3);
    let writes = report.writes.as_ref().unwrap();
    assert_eq!(writes.sent, 30, "{}", report.to_table());
    assert_eq!(writes.acked, 30);
    assert_eq!(writes.conflicts, 0);
    assert_eq!(writes.unknown_outcome, 0);
    assert_eq!(writes.commit_latency_ms.count, 30);
    let reads = report.reads.as_ref().unwrap();
    assert_eq!((reads.sent, reads.ok), (15, 15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connect_sets_up_every_connection() {
    let server = TestServer::start();
    let report = run(
        &server,
        &["connect", "--connections", "20", "--duration", "30s"],
    )
    .await;
    assert_eq!(report.connections.target, 20);
    assert_eq!(report.connections.established, 20, "{}", report.to_table());
    assert_eq!(report.connections.failed, 0);
    assert_eq!(report.connections.setup_latency_ms.count, 20);
    assert!(report.connections.setup_per_second > 0.0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idle_reports_the_server_memory_per_connection() {
    let server = TestServer::start();
    let pid = std::process::id().to_string();
    let report = run(
        &server,
        &[
            "idle",
            "--connections",
            "10",
            "--idle-for",
            "300ms",
            "--server-pid",
            &pid,
        ],
    )
    .await;
    assert_eq!(report.connections.established, 10, "{}", report.to_table());
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let memory = report.server.as_ref().unwrap();
    assert!(memory.rss_start_kib.is_some());
    assert!(memory.rss_connected_kib.is_some());
    assert!(memory.rss_per_connection_bytes.is_some());
    assert!(report.to_table().contains("server rss/conn"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idle_reads_the_server_memory_from_its_metrics() {
    let server = TestServer::start();
    let metrics = server
        .url
        .replace("ws://", "http://")
        .replace("/v1/sync", "/metrics");
    let report = run(
        &server,
        &[
            "idle",
            "--connections",
            "10",
            "--idle-for",
            "300ms",
            "--server-metrics",
            &metrics,
        ],
    )
    .await;
    assert_eq!(report.connections.established, 10, "{}", report.to_table());
    let memory = report.server.as_ref().unwrap();
    assert!(memory.pids.is_empty());
    assert_eq!(memory.metrics.as_deref(), Some(metrics.as_str()));
    // The server runs in this process: its gauge is this process's memory.
    let start = memory.rss_start_kib.expect("read from /metrics");
    assert!(start > 1024, "{start} KiB");
    assert!(memory.rss_connected_kib.is_some());
    assert!(memory.rss_per_connection_bytes.is_some());
    assert!(report.to_table().contains(&metrics));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_setup_failure_is_an_error_not_a_report() {
    // Nothing listens on this port.
    let addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let url = format!("ws://{addr}/v1/sync");
    let cli = Cli::try_parse_from([
        "tandem-loadtest",
        "--url",
        &url,
        "--secret",
        SECRET,
        "--quiet",
        "fanout",
        "--subscribers",
        "1",
    ])
    .unwrap();
    let err = tandem_loadtest::run(cli).await.unwrap_err();
    assert!(matches!(err, tandem_loadtest::LoadError::Setup(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idle_with_a_metrics_url_that_has_no_memory_gauge_is_a_bad_option() {
    let server = TestServer::start();
    // /health answers, but holds no process_resident_memory_bytes.
    let health = server
        .url
        .replace("ws://", "http://")
        .replace("/v1/sync", "/health");
    let cli = Cli::try_parse_from([
        "tandem-loadtest",
        "--url",
        &server.url,
        "--secret",
        SECRET,
        "--quiet",
        "--server-metrics",
        &health,
        "idle",
        "--connections",
        "1",
    ])
    .unwrap();
    let err = tandem_loadtest::run(cli).await.unwrap_err();
    assert!(
        matches!(err, tandem_loadtest::LoadError::Options(_)),
        "{err}"
    );
    assert!(
        err.to_string().contains("process_resident_memory_bytes"),
        "{err}"
    );
}
