//! `tandem export`, `tandem import` and `tandem backup`: the command-line ends of
//! `tandem_store::dump` (the format, the store side, the resumable [`Importer`]) and of the
//! SQLite online backup. docs/OPERATIONS.md is their manual.
//!
//! An import of a dump file resumes by line: every batch commits with the number of lines
//! read and the SHA-256 of those lines (its checkpoint), in the target's own transaction; a
//! later run with the same file skips that many lines, after checking that their hash is
//! the same, so nothing is written twice and nothing is left out, whatever killed the
//! first run.

use crate::config::ServeArgs;
use crate::lock::DataDirLock;
use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_store::dump::{
    DumpCounts, DumpStream, ImportCheckpoint, ImportError, ImportProgress, Importer, MergePolicy,
    Parsed, Start, header_line, item_line, trailer_line,
};
use tandem_store::{Store, backup_sqlite, dump_sqlite, now_ms};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write the dump to this file (written beside it, then renamed into place) instead of
    /// stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
#[command(subcommand_negates_reqs = true)]
pub struct ImportArgs {
    /// Another source than a dump.
    #[command(subcommand)]
    pub from: Option<ImportSource>,
    /// The dump to import (`tandem export`'s output), or `-` for stdin.
    #[arg(required = true)]
    pub input: Option<String>,
    /// What to do when the target is not empty: `refuse` (the default: import only into an
    /// empty store) or `skip-existing` (keep what the target holds, import the rest).
    #[arg(long, value_enum, default_value = "refuse")]
    pub merge: MergePolicy,
    /// Items per transaction: a batch is imported whole or not at all, and an interrupted
    /// import resumes after the last whole batch.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Progress on stderr: a bar on a terminal, JSON lines otherwise (`auto`), or as asked.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// `tandem import <source> ...`.
#[derive(Debug, clap::Subcommand)]
pub enum ImportSource {
    /// Copies a Cognito Sync identity pool through the AWS APIs (developer credentials):
    /// identities, datasets, records with their sync counts and tombstones; resumable, paced,
    /// with a dry run (docs/OPERATIONS.md, "Import from Cognito Sync").
    Cognito(Box<crate::cognito_import::CognitoImportArgs>),
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The backup file to write; it must not exist.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressMode {
    Auto,
    Bar,
    Json,
    None,
}

/// `--store` for the embedded store.
const SQLITE_STORE: &str = "sqlite";

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// `tandem export`: SQLite is read on a connection of its own, so a serving node may keep
/// serving; PostgreSQL from one REPEATABLE READ snapshot.
pub fn run_export(args: &ExportArgs) -> anyhow::Result<()> {
    let settings = args.serve.settings()?;
    crate::init_logging(settings.server.log_format);
    runtime()?.block_on(async {
        let server = &settings.server;
        let exported_at = now_ms();
        let (stream, source, store) = if server.store == SQLITE_STORE {
            let stream = dump_sqlite(&server.data_dir)
                .with_context(|| format!("cannot read {}", server.data_dir.display()))?;
            (stream, "sqlite", None)
        } else {
            let (store, kind) = crate::open_store(
                server,
                &server.data_dir,
                settings.limits.clone(),
                &CancellationToken::new(),
            )
            .await?;
            let stream = store.dump().await?;
            (stream, kind, Some(store))
        };
        let result = match &args.out {
            Some(path) => export_to_file(stream, source, exported_at, path).await,
            None => {
                let stdout = std::io::stdout().lock();
                write_dump(stream, source, exported_at, std::io::BufWriter::new(stdout))
                    .await
                    .map(|_| ())
            }
        };
        if let Some(store) = store {
            store.close().await;
        }
        result
    })
}

async fn export_to_file(
    stream: DumpStream,
    source: &str,
    exported_at: i64,
    path: &Path,
) -> anyhow::Result<()> {
    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let counts = match write_dump(stream, source, exported_at, std::io::BufWriter::new(file)).await
    {
        Ok((counts, out)) => {
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            counts
        }
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, path).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!(
        "exported {} identities, {} logins, {} datasets, {} records, {} grants, {} pool settings \
         to {}",
        counts.identities,
        counts.logins,
        counts.datasets,
        counts.records,
        counts.grants,
        counts.settings,
        path.display()
    );
    Ok(())
}

/// Writes header, items and trailer; the counts.
async fn write_dump<W: Write>(
    mut stream: DumpStream,
    source: &str,
    exported_at: i64,
    mut out: W,
) -> anyhow::Result<(DumpCounts, W)> {
    let mut counts = DumpCounts::default();
    writeln!(out, "{}", header_line(source, exported_at))?;
    while let Some(item) = stream.recv().await {
        let item = item.context("the export failed")?;
        counts.add(&item);
        writeln!(out, "{}", item_line(&item))?;
    }
    writeln!(out, "{}", trailer_line(&counts))?;
    out.flush()?;
    Ok((counts, out))
}

/// `tandem import`: into the data dir's SQLite store (only while no node serves it: it
/// takes the data dir's lock) or PostgreSQL.
pub fn run_import(args: &ImportArgs) -> anyhow::Result<()> {
    let input = match (&args.from, &args.input) {
        (Some(ImportSource::Cognito(cognito)), _) => return crate::cognito_import::run(cognito),
        (None, Some(input)) => input,
        (None, None) => bail!("name the dump to import (or `-` for stdin)"),
    };
    let settings = args.serve.settings()?;
    crate::init_logging(settings.server.log_format);
    let server = &settings.server;
    let _lock = (server.store == SQLITE_STORE)
        .then(|| DataDirLock::acquire(&server.data_dir))
        .transpose()
        .context("the data dir is in use: stop the node that serves it first")?;
    let (input, total_bytes): (Box<dyn Read>, Option<u64>) = if input == "-" {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let file = std::fs::File::open(input).with_context(|| format!("cannot open {input}"))?;
        let size = file.metadata().ok().map(|m| m.len());
        (Box::new(file), size)
    };
    let mode = match args.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Json,
        other => other,
    };
    runtime()?.block_on(async {
        let (store, _) = crate::open_store(
            server,
            &server.data_dir,
            settings.limits.clone(),
            &CancellationToken::new(),
        )
        .await?;
        let mut report = Reporter::new(mode, total_bytes);
        let batch_size = usize::try_from(args.batch_size).unwrap_or(1000);
        let result = import(&store, input, args.merge, batch_size, &mut report).await;
        store.close().await;
        report.finish();
        result
    })
}

/// Reads the dump a line at a time and feeds the importer.
async fn import(
    store: &Arc<dyn Store>,
    input: Box<dyn Read>,
    merge: MergePolicy,
    batch_size: usize,
    report: &mut Reporter,
) -> anyhow::Result<()> {
    let mut lines = BufReader::new(input);
    let mut reader = tandem_store::dump::DumpReader::new();
    let mut hasher = Sha256::new();
    let mut text = String::new();
    let mut n: u64 = 0;
    let mut bytes: u64 = 0;
    // The header names the source: its hash (it holds the export's time and backend).
    let read = lines
        .read_line(&mut text)
        .context("cannot read the input")?;
    if read == 0 {
        bail!("the input is empty");
    }
    n += 1;
    bytes += read as u64;
    hasher.update(text.as_bytes());
    let header = text.trim_end_matches(['\n', '\r']);
    reader
        .line(header)
        .map_err(|e| anyhow::anyhow!("line 1: {e}"))?;
    let source = format!("{:x}", Sha256::digest(header.as_bytes()));
    let checkpoint = |n: u64, hasher: &Sha256| ImportCheckpoint {
        source: source.clone(),
        position: n,
        marker: format!("{:x}", hasher.clone().finalize()),
    };
    let (mut importer, start) = Importer::start(store.as_ref(), &source, merge, batch_size)
        .await
        .map_err(import_error)?;
    // The lines an earlier run took, and the hash they must still have.
    let (skip_to, held_marker, complete) = match &start {
        Start::Fresh => (1, None, false),
        Start::Resume(p) => (p.checkpoint.position, Some(&p.checkpoint.marker), false),
        Start::Complete(p) => (p.checkpoint.position, Some(&p.checkpoint.marker), true),
    };
    if let Start::Resume(p) = &start {
        report.resumed(p);
    }
    loop {
        if n == skip_to
            && let Some(held) = held_marker
        {
            if checkpoint(n, &hasher).marker != *held {
                bail!(
                    "the input is not the one this import started with: its first {n} lines \
                     differ from what was imported"
                );
            }
            if complete {
                eprintln!("this dump was imported already ({n} lines); nothing to do");
                return Ok(());
            }
        }
        text.clear();
        let read = lines
            .read_line(&mut text)
            .context("cannot read the input")?;
        if read == 0 {
            break;
        }
        n += 1;
        bytes += read as u64;
        hasher.update(text.as_bytes());
        let line = text.trim_end_matches(['\n', '\r']);
        let parsed = reader
            .line(line)
            .map_err(|e| anyhow::anyhow!("line {n}: {e}"))?;
        if n <= skip_to {
            continue;
        }
        match parsed {
            Parsed::Item(item) => {
                if importer.push(item, n) {
                    let progress = importer
                        .commit(checkpoint(n, &hasher), false)
                        .await
                        .map_err(import_error)?;
                    report.batch(n, bytes, progress);
                }
            }
            Parsed::Trailer(_) => {
                let progress = importer
                    .commit(checkpoint(n, &hasher), true)
                    .await
                    .map_err(import_error)?;
                report.batch(n, bytes, progress);
                report.done(progress);
            }
            Parsed::Header(_) => bail!("line {n}: a second header"),
        }
    }
    if n < skip_to {
        bail!(
            "the input has {n} lines, fewer than the {skip_to} this import already took: it is \
             not the same dump"
        );
    }
    if !reader.complete() {
        bail!(
            "the input ends at line {n} without its trailer (cut off?); the {} items before \
             the last batch are imported: run again with the whole file to finish",
            importer.progress().imported.total()
        );
    }
    Ok(())
}

fn import_error(e: ImportError) -> anyhow::Error {
    match e {
        ImportError::Rejected { tag, reason } => {
            anyhow::anyhow!("line {tag}: {reason} (nothing of its batch was imported)")
        }
        other => anyhow::anyhow!(other),
    }
}

/// Progress on stderr: a bar redrawn in place on a terminal, one JSON object a line
/// otherwise (`{"event":"progress",…}` per batch, `{"event":"done",…}` at the end).
struct Reporter {
    mode: ProgressMode,
    total_bytes: Option<u64>,
    started: Instant,
    drawn: Option<Instant>,
    bar_shown: bool,
}

impl Reporter {
    fn new(mode: ProgressMode, total_bytes: Option<u64>) -> Self {
        Reporter {
            mode,
            total_bytes,
            started: Instant::now(),
            drawn: None,
            bar_shown: false,
        }
    }

    fn resumed(&mut self, p: &ImportProgress) {
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "resume", "line": p.checkpoint.position,
                                   "imported": p.imported, "skipped": p.skipped})
            ),
            ProgressMode::Bar => eprintln!(
                "resuming after line {} ({} items imported before)",
                p.checkpoint.position,
                p.imported.total()
            ),
            _ => {}
        }
    }

    fn batch(&mut self, line: u64, bytes: u64, p: &ImportProgress) {
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "progress", "line": line, "bytes": bytes,
                                   "totalBytes": self.total_bytes,
                                   "imported": p.imported, "skipped": p.skipped})
            ),
            ProgressMode::Bar => {
                // A redraw at most every 100 ms: a terminal is slower than a batch.
                if self
                    .drawn
                    .is_some_and(|at| at.elapsed() < Duration::from_millis(100))
                    && !p.done
                {
                    return;
                }
                self.drawn = Some(Instant::now());
                let items = p.imported.total() + p.skipped.total();
                let rate = items as f64 / self.started.elapsed().as_secs_f64().max(0.001);
                let line = match self.total_bytes.filter(|t| *t > 0) {
                    Some(total) => {
                        let done = (bytes as f64 / total as f64).clamp(0.0, 1.0);
                        let width = 30;
                        let filled = (done * width as f64) as usize;
                        format!(
                            "\r[{}{}] {:>3.0}%  line {line}  {items} items  {rate:.0}/s ",
                            "#".repeat(filled),
                            ".".repeat(width - filled),
                            done * 100.0
                        )
                    }
                    None => format!("\rline {line}  {items} items  {rate:.0}/s "),
                };
                let mut stderr = std::io::stderr().lock();
                let _ = stderr.write_all(line.as_bytes());
                let _ = stderr.flush();
                self.bar_shown = true;
            }
            _ => {}
        }
    }

    fn done(&mut self, p: &ImportProgress) {
        match self.mode {
            ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"event": "done", "imported": p.imported, "skipped": p.skipped,
                                   "elapsedMs": self.started.elapsed().as_millis() as u64})
            ),
            ProgressMode::Bar | ProgressMode::None | ProgressMode::Auto => {
                if self.bar_shown {
                    eprintln!();
                    self.bar_shown = false;
                }
                eprintln!(
                    "imported {} identities, {} logins, {} datasets, {} records, {} grants, \
                     {} pool settings ({} items skipped) in {:.1}s",
                    p.imported.identities,
                    p.imported.logins,
                    p.imported.datasets,
                    p.imported.records,
                    p.imported.grants,
                    p.imported.settings,
                    p.skipped.total(),
                    self.started.elapsed().as_secs_f64()
                );
            }
        }
    }

    fn finish(&mut self) {
        if self.bar_shown {
            eprintln!();
        }
    }
}

/// `tandem backup`: SQLite only; it reads the data dir like any reader and needs no lock.
pub fn run_backup(args: &BackupArgs) -> anyhow::Result<()> {
    let server = args.serve.settings()?.server;
    if server.store != SQLITE_STORE {
        bail!(
            "tandem backup copies the embedded SQLite store; back PostgreSQL up with pg_dump or pg_basebackup (docs/OPERATIONS.md)"
        );
    }
    let report = backup_sqlite(&server.data_dir, &args.out)?;
    println!(
        "{}: {} pages, {} bytes copied from {} in {} ms; integrity_check ok ({} ms)",
        report.out.display(),
        report.pages,
        report.bytes,
        report.source.display(),
        report.elapsed.as_millis(),
        report.check.elapsed.as_millis()
    );
    Ok(())
}
