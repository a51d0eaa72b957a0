//! The data dir's lock: one `tandem serve` per SQLite data dir. Two processes on one file
//! would both start and each serve its own subscribers, which never see the other's
//! writes, so the second one refuses to start instead.
//!
//! The lock is an advisory, exclusive OS file lock (`flock` on Unix) on `tandem.lock` in the
//! data dir, held for the process's life: the OS drops it when the process ends, however
//! it ends, so a crash never leaves a stale lock behind. The file holds the holder's pid,
//! for the refusal message; it is left in place at exit, since removing it would let a
//! starting process lock a new file while another still holds the old one.

use anyhow::{Context, bail};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::Path;

/// The lock file's name inside the data dir.
pub const LOCK_FILE: &str = "tandem.lock";

/// Holds the data dir's lock until dropped.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    /// Locks `data_dir` (creating it if needed), or says who holds it.
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
        let path = data_dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let holder = match file.read_to_string(&mut text) {
                    Ok(_) => text.trim().parse::<u32>().ok(),
                    Err(_) => None,
                };
                let holder =
                    holder.map_or_else(|| "pid unknown".to_owned(), |p| format!("pid {p}"));
                bail!(
                    "data dir {} is in use by another tandem process ({holder}, holding {LOCK_FILE}); stop it first or give this one its own --data-dir",
                    data_dir.display()
                );
            }
            Err(TryLockError::Error(e)) => {
                bail!("cannot lock {}: {e}", path.display());
            }
        }
        // Only the holder writes, so a reader sees either nothing or a whole pid.
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_lock_second_holder_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
