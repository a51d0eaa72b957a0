//! What `tandem backup` and `tandem export` do with a SQLite data dir that a node may be
//! serving: they read it like any other reader, so they need neither the data dir's lock
//! nor the writer.
//!
//! The backup uses SQLite's online backup API and copies every page in one step, that is
//! inside one read transaction on the source: in WAL mode that is a snapshot of the last
//! commit before it began, and the serving node's writer goes on meanwhile (a reader never
//! blocks it). The one cost: the checkpointer cannot copy WAL frames past that snapshot
//! back until the step ends, so the WAL grows by what is written during the copy. Smaller
//! steps would let it, but a step that finds the source changed by another connection
//! starts over, which under a steady write load could never finish. The copy is written
//! beside its destination, checked with the full `integrity_check`, synced, and only then
//! renamed into place: a backup file that exists is a whole and checked one.

use super::check::check_sqlite_file;
use super::{SqliteCheckReport, SqliteStore, db_err, open_reader};
use crate::StoreError;
use crate::dump::DumpStream;
use rusqlite::Connection;
use rusqlite::backup::{Backup, StepResult};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How often a backup step that found the source locked is tried again, and how long.
const BUSY_RETRY: Duration = Duration::from_millis(50);
const BUSY_TRIES: u32 = 200;

/// What a backup did.
#[derive(Debug, Clone)]
pub struct SqliteBackupReport {
    /// The database copied.
    pub source: PathBuf,
    /// The copy.
    pub out: PathBuf,
    pub pages: u64,
    pub bytes: u64,
    /// The time the copy took (the check is timed in `check`).
    pub elapsed: Duration,
    /// The full integrity check of the copy (intact, or the backup failed).
    pub check: SqliteCheckReport,
}

/// Copies `tandem.db` of `data_dir` to `out` (which must not exist) while a node may be
/// serving it, then checks the copy. `Unavailable` when the source cannot be read,
/// `BadRequest` when `out` exists, `Internal` when the copy is damaged (it is then removed).
pub fn backup_sqlite(data_dir: &Path, out: &Path) -> Result<SqliteBackupReport, StoreError> {
    let source = data_dir.join(SqliteStore::DB_FILE);
    if !source.is_file() {
        return Err(StoreError::Unavailable(format!(
            "no database at {}",
            source.display()
        )));
    }
    if out.exists() {
        return Err(StoreError::BadRequest(format!(
            "{} exists: a backup never overwrites a file",
            out.display()
        )));
    }
    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let _ = std::fs::remove_file(&partial);
    let started = Instant::now();
    let result = copy(&source, &partial);
    let pages = match result {
        Ok(pages) => pages,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    let elapsed = started.elapsed();
    let mut check = check_sqlite_file(&partial)?;
    if !check.is_intact() {
        let _ = std::fs::remove_file(&partial);
        return Err(StoreError::Internal(format!(
            "the copy of {} failed its integrity check: {}",
            source.display(),
            check.problems.join("; ")
        )));
    }
    let file = std::fs::File::open(&partial).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    std::fs::rename(&partial, out).map_err(io_err)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        // The rename is durable once the directory is synced.
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    check.path = out.to_path_buf();
    Ok(SqliteBackupReport {
        source,
        out: out.to_path_buf(),
        pages,
        bytes: check.bytes,
        elapsed,
        check,
    })
}

/// Copies every page in one step; the page count.
fn copy(source: &Path, partial: &Path) -> Result<u64, StoreError> {
    let src = open_reader(source)?;
    let mut dst = Connection::open(partial).map_err(|e| {
        StoreError::Unavailable(format!("cannot create {}: {e}", partial.display()))
    })?;
    let pages = {
        let backup = Backup::new(&src, &mut dst).map_err(db_err)?;
        let mut tries = 0;
        loop {
            match backup.step(-1).map_err(db_err)? {
                StepResult::Done => break,
                StepResult::More => {}
                StepResult::Busy | StepResult::Locked if tries < BUSY_TRIES => {
                    tries += 1;
                    std::thread::sleep(BUSY_RETRY);
                }
                StepResult::Busy | StepResult::Locked => {
                    return Err(StoreError::Unavailable(
                        "the database stayed locked; try again".into(),
                    ));
                }
                other => {
                    return Err(StoreError::Internal(format!(
                        "unexpected backup step result {other:?}"
                    )));
                }
            }
        }
        u64::try_from(backup.progress().pagecount).unwrap_or(0)
    };
    // The copy's header says WAL like its source's; as a rollback-journal file it is one
    // self-contained file, and a node that opens it switches it back to WAL.
    dst.query_row("PRAGMA journal_mode = DELETE", [], |_| Ok(()))
        .map_err(db_err)?;
    dst.close().map_err(|(_, e)| db_err(e))?;
    Ok(pages)
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Unavailable(format!("backup: {e}"))
}

/// Streams a dump of `tandem.db` in `data_dir` (see `crate::dump`) on a read connection of
/// its own, from one snapshot, while a node may be serving it.
pub fn dump_sqlite(data_dir: &Path) -> Result<DumpStream, StoreError> {
    let path = data_dir.join(SqliteStore::DB_FILE);
    if !path.is_file() {
        return Err(StoreError::Unavailable(format!(
            "no database at {}",
            path.display()
        )));
    }
    super::dump::spawn_dump(&path)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{DEFAULT_POOL, DatasetKey, Limits, Store, UpdateRequest};
    use tandem_protocol::Patch;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_backup_copies_an_open_store_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = SqliteStore::open(&data, Limits::default()).unwrap();
        let key = DatasetKey::new(DEFAULT_POOL, "alice", "d");
        store
            .update(UpdateRequest {
                dataset: key.clone(),
                actor: "alice".into(),
                device_id: None,
                patches: vec![Patch::replace("k", "v", 0)],
            })
            .await
            .unwrap();
        let out = dir.path().join("backup.db");
        let report = backup_sqlite(&data, &out).unwrap();
        assert!(report.check.is_intact() && report.pages > 0);
        assert!(!PathBuf::from(format!("{}.partial", out.display())).exists());
        assert!(matches!(
            backup_sqlite(&data, &out),
            Err(StoreError::BadRequest(_))
        ));
        store.close().await;
        let restored = dir.path().join("restored");
        std::fs::create_dir_all(&restored).unwrap();
        std::fs::copy(&out, restored.join(SqliteStore::DB_FILE)).unwrap();
        let copy = SqliteStore::open(&restored, Limits::default()).unwrap();
        let snapshot = copy.snapshot(&key, "alice").await.unwrap();
        assert_eq!(snapshot.sync_count, 1);
        assert_eq!(snapshot.records[0].value.as_deref(), Some("v"));
        copy.close().await;
    }
}
