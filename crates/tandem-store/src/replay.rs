//! `tandem stream replay` and Cognito's BulkPublish: the current state of every live dataset
//! (or of one identity pool's) appended to the commit log as a `snapshot` entry, in the
//! dataset's own transaction. The stream then delivers those entries like any other, to
//! every sink, in order with the commits around them, from whichever node holds each sink's
//! lease: a replay needs no delivery path of its own and cannot interleave wrongly. It is
//! only store calls, so it lives here, where both the binary and the gateway reach it.

use crate::{DatasetKey, Store, StoreError};

/// What a replay did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Datasets whose state went into the log.
    pub datasets: u64,
    /// The log id of the last snapshot entry (0 if none).
    pub last_entry: i64,
}

/// Datasets read from the store per page.
const PAGE: usize = 500;

/// Appends a `snapshot` entry for every live dataset (of `pool`, if given); `progress` is
/// called after each page with the report so far.
pub async fn replay(
    store: &dyn Store,
    pool: Option<&str>,
    mut progress: impl FnMut(&ReplayReport),
) -> Result<ReplayReport, StoreError> {
    let mut report = ReplayReport::default();
    let mut after: Option<DatasetKey> = pool.map(|p| DatasetKey::new(p, "", ""));
    loop {
        let page = store.datasets_after(after.as_ref(), PAGE).await?;
        let Some((last, _)) = page.last() else { break };
        let next = last.clone();
        for (dataset, _) in &page {
            if pool.is_some_and(|p| p != dataset.pool) {
                progress(&report);
                return Ok(report);
            }
            // A dataset deleted since the page was read has nothing to replay.
            if let Some(id) = store.log_snapshot(dataset).await? {
                report.datasets += 1;
                report.last_entry = id;
            }
        }
        progress(&report);
        if page.len() < PAGE {
            break;
        }
        after = Some(next);
    }
    Ok(report)
}
