//! A store that cannot commit because its disk is full: writes get the retriable
//! `unavailable`, `/ready` answers 503 with the store's reason, the log says so once (not
//! once per refused write), and once space is freed writes commit again and `/ready` is back
//! to 200, without a restart.
//!
//! The data dir is a 2 MiB tmpfs, so the test needs root (CI runs as root); without root, or
//! if the mount fails, it is skipped with a message saying why.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tandem_client::{ClientError, Connection, UpdateResult};
use tandem_protocol::{DatasetRef, ErrorCode, Patch};
use tandem_tests::{TestServer, eventually, http_get};

/// A tmpfs mounted on a directory, unmounted (and the directory removed) when dropped, also
/// when the test fails.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        let uid = Command::new("id")
            .arg("-u")
            .output()
            .map_err(|e| format!("cannot run id: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("not running as root".into());
        }
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !status.success() {
            return Err(format!("mount -t tmpfs failed: {status}"));
        }
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: the server may still hold files open if the test failed before stopping it.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// An update of one new 60 KB record: every one needs fresh disk space.
async fn write_big(conn: &Connection, i: u32) -> Result<UpdateResult, ClientError> {
    let dataset = DatasetRef::own(format!("fill-{}", i / 12));
    let patch = Patch::replace(format!("k{i:04}"), "x".repeat(60_000), 0);
    conn.update(dataset, None, vec![patch]).await
}

/// The server's warnings and errors after its first `skip` log lines.
fn warnings_after(server: &TestServer, skip: usize) -> Vec<String> {
    server
        .log()
        .lines()
        .skip(skip)
        .filter(|line| line.contains("WARN") || line.contains("ERROR"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn test_disk_full_store_is_unavailable_and_not_ready_then_recovers() {
    let mut builder = TestServer::builder();
    let data_dir = builder.log_path().parent().unwrap().to_owned();
    let logs = tempfile::tempdir().unwrap();
    let _tmpfs = match Tmpfs::mount(&data_dir, "2m") {
        Ok(tmpfs) => tmpfs,
        Err(why) => {
            eprintln!(
                "SKIPPED test_disk_full_store_is_unavailable_and_not_ready_then_recovers: {why}"
            );
            return;
        }
    };
    // The log lives off the full disk, or the warning about it could not be written.
    std::os::unix::fs::symlink(logs.path().join("server.log"), data_dir.join("server.log"))
        .unwrap();
    let server = builder.start();
    let filler = data_dir.join("filler");
    std::fs::write(&filler, vec![0u8; 1 << 20]).unwrap();
    let alice = server.connect("alice").await;
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");

    // Writes until the disk is full.
    let log_before = server.log().lines().count();
    let mut next = 0;
    let first_refusal = loop {
        assert!(next < 200, "200 writes of 60 KB fitted on a 2 MiB tmpfs");
        match write_big(&alice, next).await {
            Ok(UpdateResult::Committed { .. }) => next += 1,
            Ok(other) => panic!("write {next}: {other:?}"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        first_refusal.code(),
        Some(ErrorCode::Unavailable),
        "{first_refusal}"
    );

    // Every write is refused the same way, and the log does not grow a line per refusal.
    const REFUSED: u32 = 30;
    for i in 0..REFUSED {
        let refused = write_big(&alice, next + i).await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::Unavailable), "{refused}");
    }
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("cannot commit") && body.contains("full"),
        "the store's reason: {body}"
    );
    let warnings = warnings_after(&server, log_before);
    let outage_lines = warnings
        .iter()
        .filter(|l| l.contains("store cannot commit"))
        .count();
    assert_eq!(outage_lines, 1, "one line for the outage: {warnings:#?}");
    assert!(
        warnings.len() <= 3,
        "{} refused writes logged {} warnings: {warnings:#?}",
        REFUSED + 1,
        warnings.len()
    );

    // Space comes back: the next write commits and the node is ready again.
    std::fs::remove_file(&filler).unwrap();
    let log_before = server.log().lines().count();
    eventually(
        Duration::from_secs(20),
        "a write after freeing space",
        || async {
            match write_big(&alice, next + REFUSED).await {
                Ok(UpdateResult::Committed { .. }) => Some(()),
                Ok(other) => panic!("{other:?}"),
                Err(e) => {
                    assert_eq!(e.code(), Some(ErrorCode::Unavailable), "{e}");
                    None
                }
            }
        },
    )
    .await;
    let (status, body) = http_get(server.addr, "/ready").await;
    assert_eq!(status, 200, "{body}");
    let recovered = warnings_after(&server, log_before);
    assert!(
        recovered.iter().any(|l| l.contains("store commits again")),
        "{recovered:#?}"
    );
}
