//! `tandem import cognito`: copies a Cognito Sync identity pool into a Tandem store through
//! the AWS APIs (the official AWS SDK for Rust), with a developer's IAM credentials, so that
//! the apps' devices keep syncing against Tandem with the identity ids, dataset names and
//! sync counts they hold. docs/OPERATIONS.md ("Import from Cognito Sync") is its manual.
//!
//! What is read, per identity of ListIdentities: ListDatasets, then per dataset ListRecords
//! twice, from sync count 1 (every record above 1, tombstones included: ListRecords reports
//! deletions only to a caller that synced before) and from 0 (the live records, which adds
//! those still at count 1) unless the first pass already holds as many live records as
//! ListDatasets counts. A re-created dataset (`DatasetDeletedAfterRequestedSyncCount` from
//! count 1) has the count of its last delete found by bisection over `lastSyncCount`, so a
//! device that synced before the delete is told so on Tandem too. The dataset that lists a
//! merged copy in `MergedDatasetNames` becomes the copy's merge root.
//!
//! Everything goes through [`Importer`], the sink `tandem import` uses, one identity at a
//! time: a batch ends only between identities, and its checkpoint (the ListIdentities page
//! token and how many identities of that page are in) commits in the target's own
//! transaction, so a run killed at any point resumes after the last whole identity, with
//! nothing written twice and nothing left out. `--checkpoint FILE` mirrors that progress
//! into a file after every batch, for people and scripts to watch; the store's copy is the
//! one a resume trusts.
//!
//! Requests are paced by one token bucket (`--rate`); throttling (`TooManyRequestsException`
//! and the other throttling codes the AWS SDKs know, HTTP 429) and transient failures (5xx,
//! timeouts, dropped connections) are retried with exponential backoff and full jitter. The
//! SDK's own retries are off, so the counts reported are the real ones.

mod report;
mod source;

use crate::config::ServeArgs;
use crate::dump::ProgressMode;
use crate::lock::DataDirLock;
use anyhow::{Context, bail};
use clap::Args;
use report::Reporter;
use serde::{Deserialize, Serialize};
use source::{IdentityCopy, Source};
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tandem_store::dump::{
    DumpIdentity, DumpItem, DumpLogin, ImportCheckpoint, ImportError, Importer, MergePolicy, Start,
};
use tandem_store::{Store, record_bytes};
use tokio_util::sync::CancellationToken;

/// A batch commits at the first identity boundary after this long, however small it is,
/// so a slow source still checkpoints often.
const COMMIT_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct CognitoImportArgs {
    /// The identity pool to copy, `<region>:<uuid>` as the AWS console shows it. The target
    /// node should serve the same id (`--cognito-identity-pool`), or the apps' configuration
    /// must change.
    #[arg(long)]
    pub identity_pool_id: String,
    /// The source's AWS region. Default: the region the pool id starts with, where the pool
    /// lives (`AWS_REGION` and the profile's region are not used: another region does not
    /// hold the pool).
    #[arg(long)]
    pub region: Option<String>,
    /// The named profile of ~/.aws/config and ~/.aws/credentials to take the credentials
    /// from (over any in the environment). Default: the standard chain
    /// (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE` or the `default` profile,
    /// web identity, container or instance role).
    #[arg(long)]
    pub profile: Option<String>,
    /// Sends the requests of both APIs here instead of AWS's endpoints: a Tandem node
    /// serving the Cognito APIs, a proxy. `AWS_ENDPOINT_URL` is honoured as well.
    #[arg(long)]
    pub endpoint: Option<String>,
    /// Requests per second to the source, all operations together (AWS throttles each
    /// account per operation; throttled requests are retried with backoff).
    #[arg(long, default_value_t = 10.0, value_parser = parse_rate)]
    pub rate: f64,
    /// Retries of one request that was throttled or failed transiently before the import
    /// stops (it can be resumed).
    #[arg(long, default_value_t = 10)]
    pub max_retries: u32,
    /// Login links to create, which the Cognito APIs do not expose (they name a login's
    /// provider, never its user): lines `identityId,provider,subject`, `#` comments. Without
    /// them an identity that had logins is imported without any, and a login makes a new
    /// identity (docs/OPERATIONS.md).
    #[arg(long)]
    pub logins: Option<PathBuf>,
    /// Writes the import's progress here after every batch (JSON). The resume itself uses
    /// the copy kept in the target store, in each batch's transaction.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Reads the whole pool and reports what it holds (identities, datasets, records,
    /// tombstones, bytes, requests) without opening the target.
    #[arg(long)]
    pub dry_run: bool,
    /// What to do when the target is not empty: `refuse` (the default) or `skip-existing`
    /// (keep the target's identities and datasets, import the rest).
    #[arg(long, value_enum, default_value = "refuse")]
    pub merge: MergePolicy,
    /// A batch (one transaction) ends at the first identity boundary past this many items
    /// or past 2 seconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub batch_size: u64,
    /// Progress on stderr: a line redrawn in place on a terminal, JSON lines otherwise
    /// (`auto`), or as asked.
    #[arg(long, value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// The target store's settings, as for `tandem serve` (`--data-dir`, `--store`, ...).
    #[command(flatten)]
    pub serve: ServeArgs,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!(
            "{s:?} is not a positive number of requests per second"
        )),
    }
}

/// `tandem import cognito`.
pub fn run(args: &CognitoImportArgs) -> anyhow::Result<()> {
    let settings = args.serve.settings()?;
    crate::init_logging(settings.server.log_format);
    if !args.identity_pool_id.contains(':') {
        bail!(
            "--identity-pool-id {:?} is not an identity pool id (<region>:<uuid>)",
            args.identity_pool_id
        );
    }
    let logins = match &args.logins {
        Some(path) => Logins::read(path)?,
        None => Logins::default(),
    };
    let mode = match args.progress {
        ProgressMode::Auto if std::io::stderr().is_terminal() => ProgressMode::Bar,
        ProgressMode::Auto => ProgressMode::Json,
        other => other,
    };
    let server = &settings.server;
    // Taken before any request: a node serving the data dir must not see rows appear.
    let _lock = (!args.dry_run && server.store == "sqlite")
        .then(|| DataDirLock::acquire(&server.data_dir))
        .transpose()
        .context("the data dir is in use: stop the node that serves it first")?;
    crate::dump::runtime()?.block_on(async {
        let source = Source::connect(args).await?;
        let mut report = Reporter::new(mode, args.checkpoint.clone());
        if args.dry_run {
            let result = dry_run(&source, &logins, &mut report).await;
            report.finish();
            return result;
        }
        let (store, _) = crate::open_store(
            server,
            &server.data_dir,
            settings.limits.clone(),
            &CancellationToken::new(),
        )
        .await?;
        let batch_size = usize::try_from(args.batch_size).unwrap_or(1000);
        let target = Target {
            pool: settings.gateway.pool.clone(),
            logins,
        };
        let result = import(
            &source,
            &target,
            store.as_ref(),
            args.merge,
            batch_size,
            &mut report,
        )
        .await;
        store.close().await;
        report.finish();
        result
    })
}

// --- login links ----------------------------------------------------------------------

/// `--logins`: the links the API cannot show, by identity id.
#[derive(Debug, Default)]
struct Logins {
    by_identity: HashMap<String, Vec<(String, String)>>,
}

impl Logins {
    fn read(path: &Path) -> anyhow::Result<Logins> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let mut logins = Logins::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(3, ',').map(str::trim);
            let (Some(id), Some(provider), Some(subject)) =
                (fields.next(), fields.next(), fields.next())
            else {
                bail!(
                    "{} line {}: expected identityId,provider,subject",
                    path.display(),
                    n + 1
                );
            };
            if id.is_empty() || provider.is_empty() || subject.is_empty() {
                bail!("{} line {}: an empty field", path.display(), n + 1);
            }
            logins
                .by_identity
                .entry(id.to_owned())
                .or_default()
                .push((provider.to_owned(), subject.to_owned()));
        }
        Ok(logins)
    }

    fn of(&self, id: &str) -> &[(String, String)] {
        self.by_identity
            .get(id)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

// --- the target -------------------------------------------------------------------------

struct Target {
    pool: String,
    logins: Logins,
}

impl Target {
    /// The identity's items in the order the importer takes them: the identity, its logins,
    /// each dataset followed by its records.
    fn items(&self, copy: &IdentityCopy) -> Vec<DumpItem> {
        let identity = &copy.identity;
        let links = self.logins.of(&identity.id);
        let mut items = vec![DumpItem::Identity(DumpIdentity {
            pool: self.pool.clone(),
            id: identity.id.clone(),
            // An identity with a login is authenticated: a device then needs that login
            // (linked through --logins) to act as it.
            guest: identity.providers.is_empty() && links.is_empty(),
            merged_into: None,
            created_at: identity.created_at,
        })];
        for (provider, subject) in links {
            items.push(DumpItem::Login(DumpLogin {
                pool: self.pool.clone(),
                provider: provider.clone(),
                subject: subject.clone(),
                identity: identity.id.clone(),
                linked_at: identity.created_at,
            }));
        }
        for d in &copy.datasets {
            let mut dataset = d.dataset.clone();
            dataset.pool = self.pool.clone();
            let key = dataset.key();
            items.push(DumpItem::Dataset(dataset));
            for r in &d.records {
                items.push(DumpItem::Record {
                    dataset: key.clone(),
                    record: r.clone(),
                });
            }
        }
        items
    }
}

/// Where the source stands: the ListIdentities page being read (its token, `None` for the
/// first) and how many of its identities are in. Kept as the checkpoint's marker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Cursor {
    page: Option<String>,
    skip: usize,
}

fn checkpoint(source: &str, identities: u64, cursor: &Cursor) -> ImportCheckpoint {
    ImportCheckpoint {
        source: source.to_owned(),
        position: identities,
        marker: serde_json::to_string(cursor).unwrap_or_default(),
    }
}

async fn import(
    source: &Source,
    target: &Target,
    store: &dyn Store,
    merge: MergePolicy,
    batch_size: usize,
    report: &mut Reporter,
) -> anyhow::Result<()> {
    let name = format!("cognito:{}", source.pool_id);
    let (mut importer, start) = Importer::start(store, &name, merge, batch_size)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let (mut cursor, mut done_identities) = match &start {
        Start::Fresh => (Cursor::default(), 0),
        Start::Complete(p) => {
            eprintln!(
                "identity pool {} was imported into this store already ({} identities); nothing to do",
                source.pool_id, p.checkpoint.position
            );
            return Ok(());
        }
        Start::Resume(p) => {
            let cursor: Cursor = serde_json::from_str(&p.checkpoint.marker)
                .context("the target's import progress is not a Cognito import's")?;
            report.resumed(p);
            (cursor, p.checkpoint.position)
        }
    };
    let mut since_commit = Instant::now();
    // The identities of the pending batch by tag, to name the one a refused batch failed on.
    let mut pending: HashMap<u64, String> = HashMap::new();
    loop {
        let (page, next) = source.identities(cursor.page.as_deref()).await?;
        for (index, identity) in page.iter().enumerate().skip(cursor.skip) {
            let copy = source.read_identity(identity).await?;
            report.read(&copy);
            let tag = done_identities + 1;
            pending.insert(tag, identity.id.clone());
            for item in target.items(&copy) {
                importer.push(item, tag);
            }
            done_identities += 1;
            let at = Cursor {
                page: cursor.page.clone(),
                skip: index + 1,
            };
            if importer.pending() >= batch_size || since_commit.elapsed() >= COMMIT_EVERY {
                let progress = importer
                    .commit(checkpoint(&name, done_identities, &at), false)
                    .await
                    .map_err(|e| rejected(e, &pending))?;
                pending.clear();
                report.batch(progress, &source.stats);
                since_commit = Instant::now();
            }
        }
        cursor.skip = page.len();
        match next {
            Some(token) if !token.is_empty() => {
                cursor = Cursor {
                    page: Some(token),
                    skip: 0,
                };
            }
            _ => break,
        }
    }
    let progress = importer
        .commit(checkpoint(&name, done_identities, &cursor), true)
        .await
        .map_err(|e| rejected(e, &pending))?;
    report.batch(progress, &source.stats);
    report.done(progress, &source.stats);
    Ok(())
}

/// A refused batch names the identity whose item it failed on.
fn rejected(e: ImportError, pending: &HashMap<u64, String>) -> anyhow::Error {
    match e {
        ImportError::Rejected { tag, reason } => anyhow::anyhow!(
            "identity {} (#{tag} of the listing): {reason} (nothing of its batch was imported; the batches before it are, and a run with the same flags resumes after them)",
            pending.get(&tag).map(String::as_str).unwrap_or("?")
        ),
        other => anyhow::anyhow!(other),
    }
}

// --- dry run ----------------------------------------------------------------------------

/// What a dry run found.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Census {
    identities: u64,
    guests: u64,
    /// Identities with login providers.
    authenticated: u64,
    /// Authenticated identities `--logins` gives no link for.
    authenticated_without_links: u64,
    datasets: u64,
    /// Merged copies (`name.<uuid>` listed in another dataset's `MergedDatasetNames`).
    merged_copies: u64,
    /// Datasets deleted and created again (their last delete's count is kept).
    recreated_datasets: u64,
    records: u64,
    tombstones: u64,
    /// UTF-8 bytes of live keys and values, as Cognito and Tandem count a dataset's size.
    bytes: u64,
    largest_dataset_bytes: u64,
    most_records_in_a_dataset: u64,
    highest_sync_count: u64,
}

impl Census {
    fn add(&mut self, copy: &IdentityCopy, logins: &Logins) {
        self.identities += 1;
        if copy.identity.providers.is_empty() {
            self.guests += 1;
        } else {
            self.authenticated += 1;
            if logins.of(&copy.identity.id).is_empty() {
                self.authenticated_without_links += 1;
            }
        }
        for d in &copy.datasets {
            self.datasets += 1;
            self.merged_copies += u64::from(d.dataset.merge_root.is_some());
            self.recreated_datasets += u64::from(d.dataset.last_deleted_sync_count > 0);
            let mut bytes = 0;
            let mut live = 0;
            for r in &d.records {
                match &r.value {
                    Some(v) => {
                        live += 1;
                        bytes += record_bytes(&r.key, v);
                    }
                    None => self.tombstones += 1,
                }
            }
            self.records += live;
            self.bytes += bytes;
            self.largest_dataset_bytes = self.largest_dataset_bytes.max(bytes);
            self.most_records_in_a_dataset = self.most_records_in_a_dataset.max(live);
            self.highest_sync_count = self.highest_sync_count.max(d.dataset.sync_count);
        }
    }
}

async fn dry_run(source: &Source, logins: &Logins, report: &mut Reporter) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut census = Census::default();
    let mut token: Option<String> = None;
    loop {
        let (page, next) = source.identities(token.as_deref()).await?;
        for identity in &page {
            let copy = source.read_identity(identity).await?;
            report.read(&copy);
            census.add(&copy, logins);
        }
        match next {
            Some(t) if !t.is_empty() => token = Some(t),
            _ => break,
        }
    }
    let stats = &source.stats;
    let summary = serde_json::json!({
        "event": "dry-run",
        "identityPoolId": source.pool_id,
        "found": census,
        "requests": stats.requests.load(Ordering::Relaxed),
        "throttled": stats.throttled.load(Ordering::Relaxed),
        "retried": stats.retried.load(Ordering::Relaxed),
        "elapsedMs": started.elapsed().as_millis() as u64,
    });
    report.clear_line();
    if std::io::stdout().is_terminal() {
        println!(
            "dry run of {}: {} identities ({} guests, {} with logins, {} of them without a \
             --logins link), {} datasets ({} merged copies, {} re-created), {} records and {} \
             tombstones, {} bytes (largest dataset {} bytes), highest sync count {}; {} \
             requests ({} throttled) in {:.1}s; nothing was written",
            source.pool_id,
            census.identities,
            census.guests,
            census.authenticated,
            census.authenticated_without_links,
            census.datasets,
            census.merged_copies,
            census.recreated_datasets,
            census.records,
            census.tombstones,
            census.bytes,
            census.largest_dataset_bytes,
            census.highest_sync_count,
            stats.requests.load(Ordering::Relaxed),
            stats.throttled.load(Ordering::Relaxed),
            started.elapsed().as_secs_f64(),
        );
    } else {
        println!("{summary}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::source::{DatasetCopy, SourceIdentity};
    use super::*;
    use tandem_store::DatasetKey;
    use tandem_store::dump::{DumpDataset, DumpRecord};

    #[test]
    fn test_logins_file_parses_links_and_refuses_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.csv");
        std::fs::write(
            &good,
            "# id,provider,subject\nus-east-1:a,login.example.com,alice\n\nus-east-1:a,accounts.google.com,1,2\n",
        )
        .unwrap();
        let logins = Logins::read(&good).unwrap();
        assert_eq!(
            logins.of("us-east-1:a"),
            &[
                ("login.example.com".to_owned(), "alice".to_owned()),
                ("accounts.google.com".to_owned(), "1,2".to_owned())
            ]
        );
        assert!(logins.of("us-east-1:b").is_empty());
        let bad = dir.path().join("bad.csv");
        std::fs::write(&bad, "us-east-1:a,login.example.com\n").unwrap();
        let err = Logins::read(&bad).unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn test_target_items_put_the_identity_logins_then_datasets_with_records() {
        let mut logins = Logins::default();
        logins
            .by_identity
            .insert("r:1".into(), vec![("p".into(), "s".into())]);
        let target = Target {
            pool: "default".into(),
            logins,
        };
        let record = DumpRecord {
            key: "k".into(),
            value: None,
            sync_count: 2,
            last_modified: 1,
            last_modified_by: "r:1".into(),
            device_id: None,
            device_last_modified: None,
        };
        let copy = IdentityCopy {
            identity: SourceIdentity {
                id: "r:1".into(),
                providers: vec!["p".into()],
                created_at: 5,
            },
            datasets: vec![DatasetCopy {
                dataset: DumpDataset {
                    pool: String::new(),
                    owner: "r:1".into(),
                    name: "d".into(),
                    sync_count: 2,
                    deleted: false,
                    last_deleted_sync_count: 0,
                    merge_root: None,
                    created_at: 1,
                    last_modified: 1,
                },
                merged: Vec::new(),
                records: vec![record.clone()],
            }],
        };
        let items = target.items(&copy);
        assert!(matches!(&items[0], DumpItem::Identity(i) if !i.guest && i.pool == "default"));
        assert!(matches!(&items[1], DumpItem::Login(l) if l.subject == "s"));
        assert!(matches!(&items[2], DumpItem::Dataset(d) if d.pool == "default"));
        assert_eq!(
            items[3],
            DumpItem::Record {
                dataset: DatasetKey::new("default", "r:1", "d"),
                record
            }
        );
        for item in &items {
            item.validate().unwrap();
        }
    }
}
