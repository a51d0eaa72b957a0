//! Integrity checks of the SQLite file: a bounded `PRAGMA quick_check` every time the store
//! opens, so a damaged file is refused before anything is served from it or written into
//! it, and the full `PRAGMA integrity_check` that `tandem check` runs on demand.
//!
//! `quick_check` reads every page and checks each b-tree's structure but not that indexes
//! match their tables; `integrity_check` does that too and costs more. On a healthy 100 MB
//! `tandem.db` the quick check takes well under a second (docs/OPERATIONS.md has the
//! figures); it is bounded by [`QUICK_CHECK_BUDGET`] so a very large file still starts: when
//! the budget runs out the store opens with a warning that names `tandem check`.
//!
//! Damage is reported two ways by SQLite: as rows of the pragma, or as an error
//! (`SQLITE_CORRUPT`, `SQLITE_NOTADB`) when a page cannot even be walked. Both are damage.

use super::{SqliteStore, db_err};
use crate::StoreError;
use rusqlite::{Connection, OpenFlags};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

/// How long the check at open may take before the store opens without it.
pub(super) const QUICK_CHECK_BUDGET: Duration = Duration::from_secs(10);

/// Problems the check at open collects before it stops: one is enough to refuse.
const QUICK_CHECK_MAX_ERRORS: u32 = 10;

/// Problems `tandem check` lists at most.
const FULL_CHECK_MAX_ERRORS: u32 = 100;

/// What one check found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finding {
    Intact,
    /// SQLite's own descriptions, one line each.
    Damaged(Vec<String>),
    /// The budget ran out before the check finished.
    OutOfTime,
}

/// Runs the bounded quick check on the connection the store is about to use: a damaged file
/// is refused with what to do about it; a check that runs out of time only warns.
pub(super) fn at_open(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let started = Instant::now();
    let finding = run(
        conn,
        &format!("PRAGMA quick_check({QUICK_CHECK_MAX_ERRORS})"),
        QUICK_CHECK_BUDGET,
    )?;
    match finding {
        Finding::Intact => {
            tracing::debug!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "sqlite quick_check ok"
            );
            Ok(())
        }
        Finding::OutOfTime => {
            tracing::warn!(
                path = %path.display(),
                budget_s = QUICK_CHECK_BUDGET.as_secs(),
                "sqlite quick_check did not finish in its budget; starting unchecked (run `tandem check` while stopped)"
            );
            Ok(())
        }
        Finding::Damaged(problems) => {
            let dir = path.parent().unwrap_or(Path::new("."));
            let more = match problems.len() {
                0 | 1 => String::new(),
                n => format!(" and {} more", n - 1),
            };
            let first = problems.first().map_or("", String::as_str);
            Err(StoreError::Internal(format!(
                "{} is damaged ({first}{more}), refusing to serve from it; {}; `tandem check --data-dir {}` lists the damage",
                path.display(),
                restore_advice(dir),
                dir.display()
            )))
        }
    }
}

/// How to get a damaged data dir back, in one line.
fn restore_advice(dir: &Path) -> String {
    let db = SqliteStore::DB_FILE;
    format!(
        "to restore, stop tandem, move {db}, {db}-wal and {db}-shm out of {}, copy your latest backup there as {db} and start again (docs/OPERATIONS.md, \"Restore from a backup\")",
        dir.display()
    )
}

/// The result of the full `PRAGMA integrity_check` of a data dir's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteCheckReport {
    /// The database file checked.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// What is wrong, one line each (at most 100); empty when the file is intact.
    pub problems: Vec<String>,
    pub elapsed: Duration,
}

impl SqliteCheckReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }

    /// How to restore the data dir from a backup, in one line.
    pub fn restore_advice(&self) -> String {
        restore_advice(self.path.parent().unwrap_or(Path::new(".")))
    }
}

/// Runs the full `PRAGMA integrity_check` on `tandem.db` in `data_dir`, without a time
/// limit. It only reads (the file is opened read-only) and may run beside a serving node:
/// it then checks the last commit as of its start. An error means the check could not run
/// (no database there, a file that cannot be opened), not that the file is damaged.
pub fn check_sqlite(data_dir: &Path) -> Result<SqliteCheckReport, StoreError> {
    check_sqlite_file(&data_dir.join(SqliteStore::DB_FILE))
}

/// [`check_sqlite`] of the database file at `path` (a backup, say).
pub fn check_sqlite_file(path: &Path) -> Result<SqliteCheckReport, StoreError> {
    let path = path.to_path_buf();
    let bytes = std::fs::metadata(&path)
        .map_err(|e| StoreError::Unavailable(format!("no database at {}: {e}", path.display())))?
        .len();
    let conn = Connection::open_with_flags(
        &path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    conn.busy_timeout(super::BUSY_TIMEOUT).map_err(db_err)?;
    let started = Instant::now();
    let sql = format!("PRAGMA integrity_check({FULL_CHECK_MAX_ERRORS})");
    let problems = match run(&conn, &sql, Duration::MAX)? {
        Finding::Intact => Vec::new(),
        Finding::Damaged(problems) => problems,
        Finding::OutOfTime => {
            return Err(StoreError::Internal(
                "integrity_check was interrupted".into(),
            ));
        }
    };
    Ok(SqliteCheckReport {
        path,
        bytes,
        problems,
        elapsed: started.elapsed(),
    })
}

/// Runs a check pragma within `budget`.
fn run(conn: &Connection, sql: &str, budget: Duration) -> Result<Finding, StoreError> {
    let rows = within(conn, budget, |conn| {
        let mut stmt = conn.prepare(sql)?;
        let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
        rows.collect::<Result<Vec<String>, _>>()
    })?;
    let rows = match rows {
        Ok(rows) => rows,
        Err(e) => {
            use rusqlite::ErrorCode as Code;
            return match e.sqlite_error_code() {
                Some(Code::DatabaseCorrupt | Code::NotADatabase) => {
                    Ok(Finding::Damaged(vec![e.to_string()]))
                }
                Some(Code::OperationInterrupted) => Ok(Finding::OutOfTime),
                _ => Err(db_err(e)),
            };
        }
    };
    if rows.len() == 1 && rows[0] == "ok" {
        return Ok(Finding::Intact);
    }
    Ok(Finding::Damaged(problems(&rows)))
}

/// One problem a line: a row may hold several, one a line, under a line that names the
/// database they are in.
fn problems(rows: &[String]) -> Vec<String> {
    rows.iter()
        .flat_map(|row| row.lines())
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("*** in database"))
        .map(str::to_owned)
        .collect()
}

/// Runs `f` on `conn`, interrupting whatever statement it runs once `budget` has passed.
fn within<T>(
    conn: &Connection,
    budget: Duration,
    f: impl FnOnce(&Connection) -> T,
) -> Result<T, StoreError> {
    let interrupt = conn.get_interrupt_handle();
    let (done_tx, done_rx) = channel::<()>();
    let timer = std::thread::Builder::new()
        .name("tandem-sqlite-check".into())
        .spawn(move || {
            if let Err(RecvTimeoutError::Timeout) = done_rx.recv_timeout(budget) {
                interrupt.interrupt();
            }
        })
        .map_err(|e| StoreError::Internal(format!("cannot start the check timer: {e}")))?;
    let result = f(conn);
    // An interrupt that lands after `f` is harmless: SQLite clears it when the next
    // statement starts with none running.
    drop(done_tx);
    let _ = timer.join();
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limits;
    use std::io::{Seek, SeekFrom, Write};

    /// A data dir whose database holds enough records to span many pages.
    fn filled_data_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SqliteStore::DB_FILE);
        let mut conn = Connection::open(&path).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        conn.execute_batch(
            "INSERT INTO datasets (id, pool, owner, name, sync_count, created_at, last_modified)
             VALUES (1, 'default', 'alice', 'big', 1, 0, 0);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000)
             INSERT INTO records (dataset_id, key, value, sync_count, last_modified, last_modified_by)
             SELECT 1, printf('key-%06d', i), printf('%0100d', i), 1, 0, 'alice' FROM n;",
        )
        .unwrap();
        drop(conn); // the last connection checkpoints the WAL into the file
        dir
    }

    /// Overwrites a whole page in the middle of the file (a b-tree page of `records`).
    fn damage_middle_page(dir: &Path) {
        let path = dir.join(SqliteStore::DB_FILE);
        let pages = std::fs::metadata(&path).unwrap().len() / 4096;
        assert!(pages > 20, "{pages} pages");
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.seek(SeekFrom::Start(pages / 2 * 4096)).unwrap();
        file.write_all(&[0xab; 4096]).unwrap();
    }

    #[test]
    fn test_check_intact_file_passes_both_checks() {
        let dir = filled_data_dir();
        let report = check_sqlite(dir.path()).unwrap();
        assert!(report.is_intact(), "{report:?}");
        assert!(report.bytes > 20 * 4096);
        SqliteStore::open(dir.path(), Limits::default()).unwrap();
    }

    #[test]
    fn test_check_damaged_page_refuses_open_and_fails_full_check() {
        let dir = filled_data_dir();
        damage_middle_page(dir.path());
        let err = SqliteStore::open(dir.path(), Limits::default()).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("is damaged"), "{message}");
        assert!(message.contains("latest backup"), "{message}");
        assert!(message.contains("tandem.db-wal"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        let report = check_sqlite(dir.path()).unwrap();
        assert!(!report.is_intact(), "{report:?}");
        assert!(report.problems.iter().all(|p| !p.contains('\n')));
    }

    #[test]
    fn test_check_without_a_database_is_an_error_not_a_verdict() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_sqlite(dir.path()).unwrap_err();
        assert!(err.to_string().contains("no database at"), "{err}");
        assert!(!dir.path().join(SqliteStore::DB_FILE).exists());
    }

    #[test]
    fn test_check_budget_interrupts_a_long_statement() {
        let conn = Connection::open_in_memory().unwrap();
        let endless = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) \
                       SELECT count(*) FROM n";
        let finding = run(&conn, endless, Duration::from_millis(50)).unwrap();
        assert_eq!(finding, Finding::OutOfTime);
        // The connection is still usable afterwards.
        let one: i64 = conn.query_row("SELECT 1", [], |r| r.get(0)).unwrap();
        assert_eq!(one, 1);
    }

    #[test]
    fn test_check_problems_are_one_a_line() {
        let rows = [
            "*** in database main ***\nTree 4 page 9 cell 6: invalid page number 28\n\
             Multiple uses for byte 988 of page 9"
                .to_owned(),
            "database disk image is malformed".to_owned(),
        ];
        assert_eq!(
            problems(&rows),
            [
                "Tree 4 page 9 cell 6: invalid page number 28",
                "Multiple uses for byte 988 of page 9",
                "database disk image is malformed",
            ]
        );
    }
}
