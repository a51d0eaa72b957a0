//! Start-up checks and the drain at shutdown, against real `tandem` processes: one process
//! per SQLite data dir, a damaged database refused at start and reported by `tandem check`,
//! and `/ready` answering 503 through the drain delay after SIGTERM.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tandem_client::UpdateResult;
use tandem_protocol::{CloseCode, DatasetRef, Patch};
use tandem_tests::{
    TestServer, eventually, http_get, output_within, serve_command, tandem_bin, try_http_get,
};

/// Long enough for a refused start on a loaded machine; a start that is not refused never
/// ends and is killed then.
const EXIT_WITHIN: Duration = Duration::from_secs(20);

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `tandem check --data-dir DIR`, to its exit.
fn check(data_dir: &Path) -> std::process::Output {
    let mut command = Command::new(tandem_bin());
    command
        .arg("check")
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("TANDEM_CONFIG");
    output_within(&mut command, EXIT_WITHIN).expect("tandem check ends")
}

#[tokio::test]
async fn test_startup_second_server_on_one_data_dir_is_refused_naming_the_holder() {
    let mut first = TestServer::builder().arg("--drain-delay", "0s").start();
    let pid = first.pid().unwrap();
    let out = output_within(&mut serve_command(first.data_dir()), EXIT_WITHIN)
        .expect("the second server refuses to start instead of serving");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    assert!(
        stderr.contains(&format!(
            "data dir {} is in use by another tandem process (pid {pid}",
            first.data_dir().display()
        )),
        "{stderr}"
    );
    assert!(!stdout_of(&out).contains("tandem listening"));
    // The first one is untouched, and once it is gone the data dir is free again.
    let (status, body) = http_get(first.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    assert!(first.terminate());
    first.start_again();
    let (status, body) = http_get(first.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
}

/// The page size from the database header (bytes 16-17, big-endian; 1 means 65536).
fn page_size(db: &Path) -> u64 {
    let mut header = [0u8; 18];
    std::fs::File::open(db)
        .unwrap()
        .read_exact(&mut header)
        .unwrap();
    match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n => u64::from(n),
    }
}

#[tokio::test]
async fn test_startup_damaged_database_is_refused_and_check_reports_it() {
    let mut server = TestServer::builder().arg("--drain-delay", "0s").start();
    let conn = server.connect("alice").await;
    // About 300 KB of records: the records b-tree spans most of the file's pages.
    for d in 0..3 {
        let patches = (0..200)
            .map(|i| Patch::replace(format!("key-{i:04}"), "x".repeat(500), 0))
            .collect();
        let r = conn
            .update(DatasetRef::own(format!("ds-{d}")), None, patches)
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    }
    drop(conn);
    assert!(server.terminate(), "{}", server.log());
    let dir = server.data_dir().to_owned();
    let db = dir.join("tandem.db");
    let wal = std::fs::metadata(dir.join("tandem.db-wal")).map_or(0, |m| m.len());
    assert_eq!(wal, 0, "a clean stop leaves every page in tandem.db");

    let healthy = check(&dir);
    assert!(healthy.status.success(), "{}", stdout_of(&healthy));
    assert!(
        stdout_of(&healthy).contains("intact"),
        "{}",
        stdout_of(&healthy)
    );

    // Garbage over one whole page in the middle of the file, not the header page.
    let page = page_size(&db);
    let pages = std::fs::metadata(&db).unwrap().len() / page;
    assert!(pages > 40, "{pages} pages");
    let mut file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
    file.seek(SeekFrom::Start(pages / 2 * page)).unwrap();
    file.write_all(&vec![0xab; page as usize]).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let out = output_within(&mut serve_command(&dir), EXIT_WITHIN)
        .expect("a damaged database is refused instead of served");
    assert!(!out.status.success());
    let stderr = stderr_of(&out);
    let refusal = stderr
        .lines()
        .find(|l| l.starts_with("tandem: error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(refusal.contains("tandem.db is damaged"), "{refusal}");
    assert!(refusal.contains("latest backup"), "{refusal}");
    assert!(refusal.contains("tandem.db-wal"), "{refusal}");
    assert!(refusal.contains("tandem check --data-dir"), "{refusal}");

    let damaged = check(&dir);
    assert_eq!(damaged.status.code(), Some(1), "{}", stdout_of(&damaged));
    let report = stdout_of(&damaged);
    assert!(report.contains("DAMAGED"), "{report}");
    assert!(report.contains("latest backup"), "{report}");
}

#[tokio::test]
async fn test_startup_check_of_a_dir_without_a_database_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = check(dir.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("no database at"),
        "{}",
        stderr_of(&out)
    );
    assert!(!dir.path().join("tandem.db").exists());
}

#[tokio::test]
async fn test_startup_sigterm_keeps_ready_503_through_the_default_drain_delay() {
    let mut server = TestServer::start();
    let ds = DatasetRef::own("list");
    let alice = server.connect("alice").await;
    alice.subscribe(ds.clone()).await.unwrap();
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");

    server.send_sigterm();
    let addr = server.addr;
    let body = eventually(
        Duration::from_secs(3),
        "/ready to answer 503",
        || async move {
            match try_http_get(addr, "/ready").await {
                Ok((503, body)) => Some(body),
                Ok(_) => None,
                Err(e) => panic!("the listener went away during the drain delay: {e}"),
            }
        },
    )
    .await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["shuttingDown"], true, "{body}");
    assert_eq!(v["status"], "degraded", "{body}");

    // Still serving meanwhile: a session writes, a new client connects.
    let r = alice
        .update(ds.clone(), None, vec![Patch::replace("milk", "2", 0)])
        .await
        .unwrap();
    assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    let bob = server.connect("bob").await;
    let (status, _) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 503);

    // Then sessions close with "going away" and the process exits cleanly.
    assert!(server.wait_exit(), "tandem exits 0 after the drain");
    for conn in [&alice, &bob] {
        let closed = conn.wait_closed().await;
        assert_eq!(closed.code, Some(CloseCode::GoingAway.code()));
    }
    assert!(try_http_get(addr, "/ready").await.is_err());
}

#[tokio::test]
async fn test_startup_second_sigterm_ends_the_drain_delay() {
    let mut server = TestServer::builder().arg("--drain-delay", "1h").start();
    let alice = server.connect("alice").await;
    server.send_sigterm();
    let addr = server.addr;
    eventually(
        Duration::from_secs(10),
        "/ready to answer 503",
        || async move { matches!(try_http_get(addr, "/ready").await, Ok((503, _))).then_some(()) },
    )
    .await;
    server.send_sigterm();
    assert!(server.wait_exit(), "tandem exits 0 long before the hour");
    let closed = alice.wait_closed().await;
    assert_eq!(closed.code, Some(CloseCode::GoingAway.code()));
}
