//! Whether the store can commit, for `Store::health`. A commit that fails because the
//! database cannot write (disk full, an I/O error; for SQLite any failed group commit)
//! starts an outage; the next commit that writes something ends it. While it lasts, `health`
//! answers `Unavailable` with the reason, so `/ready` stops sending clients to a node that can
//! only refuse their writes. The outage is logged once, when it starts and when it ends,
//! however many requests fail in between.

use crate::StoreError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

#[derive(Debug, Default)]
pub(crate) struct CommitOutage {
    /// Set while `reason` is: the commit path checks this without taking the lock.
    down: AtomicBool,
    /// What the last failed commit said, while no commit has succeeded since.
    reason: Mutex<Option<String>>,
}

impl CommitOutage {
    /// A commit failed because the store cannot write.
    pub(crate) fn failed(&self, backend: &'static str, error: &StoreError) {
        let detail = match error {
            StoreError::Unavailable(detail) | StoreError::Internal(detail) => detail.clone(),
            other => other.to_string(),
        };
        let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if reason.is_none() {
            tracing::warn!(
                backend,
                error = %detail,
                "store cannot commit: writes are refused as unavailable and /ready answers 503 \
                 until a commit succeeds"
            );
        }
        *reason = Some(detail);
        self.down.store(true, Ordering::Release);
    }

    /// A commit wrote something.
    pub(crate) fn succeeded(&self, backend: &'static str) {
        if !self.down.load(Ordering::Acquire) {
            return;
        }
        let mut reason = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(was) = reason.take() {
            tracing::warn!(backend, was = %was, "store commits again");
        }
        self.down.store(false, Ordering::Release);
    }

    /// Whether commits are failing now.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// `Unavailable` with the reason while commits fail.
    pub(crate) fn check(&self) -> Result<(), StoreError> {
        match &*self.reason.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(reason) => Err(StoreError::Unavailable(format!("cannot commit: {reason}"))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_commit_outage_lasts_from_a_failed_commit_to_the_next_success() {
        let outage = CommitOutage::default();
        assert!(outage.check().is_ok());
        outage.failed("test", &StoreError::Unavailable("disk full".into()));
        outage.failed("test", &StoreError::Unavailable("disk still full".into()));
        assert!(outage.is_down());
        assert_eq!(
            outage.check(),
            Err(StoreError::Unavailable(
                "cannot commit: disk still full".into()
            ))
        );
        outage.succeeded("test");
        assert!(!outage.is_down());
        assert!(outage.check().is_ok());
    }
}
