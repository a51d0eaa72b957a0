//! The progress of `tandem import cognito` on stderr, as `tandem import` reports: a line
//! redrawn in place on a terminal, JSON lines otherwise, and the `--checkpoint` file.

use super::source::{IdentityCopy, RequestStats};
use crate::dump::ProgressMode;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tandem_store::dump::{DumpCounts, ImportProgress};
use tandem_store::now_ms;

/// Progress on stderr, like `tandem import`'s: a line redrawn in place on a terminal, one
/// JSON object a line otherwise (`resume`, `progress` per batch, `done`), and the
/// `--checkpoint` file rewritten after each batch.
pub(super) struct Reporter {
    mode: ProgressMode,
    checkpoint: Option<PathBuf>,
    started: Instant,
    drawn: Option<Instant>,
    bar_shown: bool,
    read: DumpCounts,
    tombstones: u64,
}

impl Reporter {
    pub(super) fn new(mode: ProgressMode, checkpoint: Option<PathBuf>) -> Reporter {
        Reporter {
            mode,
            checkpoint,
            started: Instant::now(),
            drawn: None,
            bar_shown: false,
            read: DumpCounts::default(),
            tombstones: 0,
        }
    }

    pub(super) fn resumed(&mut self, p: &ImportProgress) {
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "resume", "identities": p.checkpoint.position,
                                   "imported": p.imported})
            ),
            ProgressMode::Bar => eprintln!(
                "resuming after {} identities ({} items imported before)",
                p.checkpoint.position,
                p.imported.total()
            ),
            _ => {}
        }
    }

    /// An identity was read (imported or, in a dry run, counted).
    pub(super) fn read(&mut self, copy: &IdentityCopy) {
        self.read.identities += 1;
        for d in &copy.datasets {
            self.read.datasets += 1;
            let tombstones = d.records.iter().filter(|r| r.value.is_none()).count() as u64;
            self.read.records += d.records.len() as u64 - tombstones;
            self.tombstones += tombstones;
        }
        if self.mode == ProgressMode::Bar {
            self.draw(self.read.identities, false);
        }
    }

    pub(super) fn batch(&mut self, p: &ImportProgress, stats: &RequestStats) {
        let requests = stats.requests.load(Ordering::Relaxed);
        let throttled = stats.throttled.load(Ordering::Relaxed);
        let event = serde_json::json!({"event": "progress", "identities": p.checkpoint.position,
                                      "imported": p.imported,
                                      "skipped": p.skipped, "requests": requests,
                                      "throttled": throttled, "done": p.done});
        if let Some(path) = &self.checkpoint
            && let Err(e) = write_checkpoint(path, p, &event)
        {
            tracing::warn!(error = %e, path = %path.display(), "cannot write the checkpoint file");
        }
        match self.mode {
            ProgressMode::Json => eprintln!("{event}"),
            ProgressMode::Bar => self.draw(p.checkpoint.position, p.done),
            _ => {}
        }
    }

    fn draw(&mut self, identities: u64, force: bool) {
        if !force
            && self
                .drawn
                .is_some_and(|at| at.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(Instant::now());
        let rate = identities as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        // ListIdentities gives no total, so this counts up rather than fills a bar.
        let line = format!(
            "\r{identities} identities  {} datasets  {} records ({} tombstones)  {rate:.1} identities/s ",
            self.read.datasets, self.read.records, self.tombstones
        );
        let mut stderr = std::io::stderr().lock();
        let _ = stderr.write_all(line.as_bytes());
        let _ = stderr.flush();
        self.bar_shown = true;
    }

    pub(super) fn done(&mut self, p: &ImportProgress, stats: &RequestStats) {
        let requests = stats.requests.load(Ordering::Relaxed);
        let throttled = stats.throttled.load(Ordering::Relaxed);
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "done", "identities": p.checkpoint.position,
                                   "imported": p.imported, "skipped": p.skipped,
                                   "requests": requests, "throttled": throttled,
                                   "elapsedMs": self.started.elapsed().as_millis() as u64})
            ),
            ProgressMode::Bar | ProgressMode::None | ProgressMode::Auto => {
                self.clear_line();
                eprintln!(
                    "imported {} identities, {} logins, {} datasets, {} records ({} items \
                     skipped) with {requests} requests ({throttled} throttled) in {:.1}s",
                    p.imported.identities,
                    p.imported.logins,
                    p.imported.datasets,
                    p.imported.records,
                    p.skipped.total(),
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }

    pub(super) fn clear_line(&mut self) {
        if self.bar_shown {
            eprintln!();
            self.bar_shown = false;
        }
    }

    pub(super) fn finish(&mut self) {
        self.clear_line();
    }
}

/// The checkpoint file: the progress event plus the store's checkpoint, written beside the
/// file and renamed over it, so a reader never sees half of one.
fn write_checkpoint(
    path: &Path,
    p: &ImportProgress,
    event: &serde_json::Value,
) -> std::io::Result<()> {
    let mut state = event.clone();
    state["source"] = serde_json::json!(p.checkpoint.source);
    state["cursor"] = serde_json::from_str(&p.checkpoint.marker).unwrap_or_default();
    state["writtenAt"] = serde_json::json!(now_ms());
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    std::fs::write(&partial, format!("{state}\n"))?;
    std::fs::rename(&partial, path)
}
