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

use crate::config::ServeArgs;
use crate::dump::ProgressMode;
use crate::lock::DataDirLock;
use anyhow::{Context, bail};
use aws_sdk_cognitosync::config::http::HttpResponse;
use aws_sdk_cognitosync::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cognitosync::primitives::DateTime;
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_store::dump::{
    DumpCounts, DumpDataset, DumpIdentity, DumpItem, DumpLogin, DumpRecord, ImportCheckpoint,
    ImportError, ImportProgress, Importer, MergePolicy, Start,
};
use tandem_store::{Store, now_ms, record_bytes};
use tokio_util::sync::CancellationToken;

/// ListIdentities' largest page (the model's bound).
const IDENTITIES_PAGE: i32 = 60;
/// ListDatasets' largest page.
const DATASETS_PAGE: i32 = 64;
/// ListRecords' largest page.
const RECORDS_PAGE: i32 = 1024;
/// Reads of one dataset that may find it changed between pages before the import gives up.
const DATASET_READS: usize = 3;
/// The first retry's wait; each next one doubles it, up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(20);
/// A batch commits at the first identity boundary after this long, however small it is,
/// so a slow source still checkpoints often.
const COMMIT_EVERY: Duration = Duration::from_secs(2);
/// One request's deadline (a page of 1024 records is at most a few MB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

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

// --- the source ---------------------------------------------------------------------

/// The two APIs' clients, the pacing and the counts of what was asked.
struct Source {
    identity: aws_sdk_cognitoidentity::Client,
    sync: aws_sdk_cognitosync::Client,
    pool_id: String,
    pacer: Pacer,
    max_retries: u32,
    stats: Arc<RequestStats>,
}

#[derive(Debug, Default)]
struct RequestStats {
    requests: AtomicU64,
    throttled: AtomicU64,
    retried: AtomicU64,
}

impl Source {
    async fn connect(args: &CognitoImportArgs) -> anyhow::Result<Source> {
        use aws_smithy_http_client::tls;
        // rustls with ring, which the tree has already (the SDK's default client would
        // build aws-lc); it speaks plain HTTP too, for a loopback endpoint.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        // A pool lives in the region its id names; --region is for endpoints that differ.
        let region = args
            .region
            .clone()
            .or_else(|| {
                args.identity_pool_id
                    .split_once(':')
                    .map(|(region, _)| region.to_owned())
            })
            .map(aws_config::Region::new);
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .http_client(http.clone())
            .region(region.clone())
            // Retries are this module's own (counted, paced); the SDK's would hide them.
            .retry_config(aws_config::retry::RetryConfig::disabled())
            .timeout_config(
                aws_config::timeout::TimeoutConfig::builder()
                    .operation_attempt_timeout(REQUEST_TIMEOUT)
                    .build(),
            );
        if let Some(profile) = &args.profile {
            // A named profile is asked for: its credentials, not the environment's (the
            // default chain would take AWS_ACCESS_KEY_ID first), as the AWS CLI does.
            let credentials = aws_config::profile::ProfileFileCredentialsProvider::builder()
                .configure(
                    &aws_config::provider_config::ProviderConfig::without_region()
                        .with_region(region)
                        .with_http_client(http),
                )
                .profile_name(profile)
                .build();
            // Named by the operator: a profile that gives no credentials is said at once,
            // with the reason (the SDK would say "not loaded" at the first request).
            aws_sdk_cognitosync::config::ProvideCredentials::provide_credentials(&credentials)
                .await
                .map_err(|e| {
                    anyhow::anyhow!(
                        "no credentials from profile {profile:?}: {}",
                        DisplayErrorContext(&e)
                    )
                })?;
            loader = loader
                .profile_name(profile)
                .credentials_provider(credentials);
        }
        if let Some(endpoint) = &args.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let config = loader.load().await;
        Ok(Source {
            identity: aws_sdk_cognitoidentity::Client::new(&config),
            sync: aws_sdk_cognitosync::Client::new(&config),
            pool_id: args.identity_pool_id.clone(),
            pacer: Pacer::new(args.rate),
            max_retries: args.max_retries,
            stats: Arc::default(),
        })
    }

    /// One request, paced, with retries of throttling and transient failures.
    async fn call<T, E, F, Fut>(&self, what: &str, mut send: F) -> anyhow::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, SdkError<E, HttpResponse>>>,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let mut attempt: u32 = 0;
        loop {
            self.pacer.wait().await;
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let error = match send().await {
                Ok(answer) => return Ok(answer),
                Err(e) => e,
            };
            let class = classify(&error);
            if class == Failure::Fatal || attempt >= self.max_retries {
                let extra = if class == Failure::Fatal {
                    String::new()
                } else {
                    format!(" (after {} retries)", attempt)
                };
                bail!("{what} failed{extra}: {}", DisplayErrorContext(&error));
            }
            if class == Failure::Throttled {
                self.stats.throttled.fetch_add(1, Ordering::Relaxed);
            }
            self.stats.retried.fetch_add(1, Ordering::Relaxed);
            let wait = backoff(attempt);
            tracing::debug!(
                what,
                attempt,
                wait_ms = wait.as_millis() as u64,
                code = error.code(),
                "retrying"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// One ListIdentities page: the identities and the next page's token.
    async fn identities(
        &self,
        token: Option<&str>,
    ) -> anyhow::Result<(Vec<SourceIdentity>, Option<String>)> {
        let page = self
            .call("ListIdentities", || {
                self.identity
                    .list_identities()
                    .identity_pool_id(&self.pool_id)
                    .max_results(IDENTITIES_PAGE)
                    .set_next_token(token.map(str::to_owned))
                    .send()
            })
            .await?;
        let identities = page
            .identities()
            .iter()
            .map(|d| {
                let id = d
                    .identity_id()
                    .context("ListIdentities answered an identity without IdentityId")?;
                Ok(SourceIdentity {
                    id: id.to_owned(),
                    providers: d.logins().to_vec(),
                    created_at: millis(d.creation_date()),
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok((identities, page.next_token().map(str::to_owned)))
    }

    /// Every live dataset of `id`.
    async fn datasets(&self, id: &str) -> anyhow::Result<Vec<SourceDataset>> {
        let mut token: Option<String> = None;
        let mut datasets = Vec::new();
        loop {
            let page = self
                .call("ListDatasets", || {
                    self.sync
                        .list_datasets()
                        .identity_pool_id(&self.pool_id)
                        .identity_id(id)
                        .max_results(DATASETS_PAGE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            for d in page.datasets() {
                let name = d
                    .dataset_name()
                    .context("ListDatasets answered a dataset without DatasetName")?;
                datasets.push(SourceDataset {
                    name: name.to_owned(),
                    created_at: millis(d.creation_date()),
                    last_modified: millis(d.last_modified_date()),
                    live_records: d.num_records().and_then(|n| u64::try_from(n).ok()),
                });
            }
            match page.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(datasets),
            }
        }
    }

    /// ListRecords after `since`, every page.
    async fn records(&self, id: &str, name: &str, since: i64) -> anyhow::Result<Read> {
        let mut token: Option<String> = None;
        let mut listing: Option<Listing> = None;
        loop {
            let page = self
                .call("ListRecords", || {
                    self.sync
                        .list_records()
                        .identity_pool_id(&self.pool_id)
                        .identity_id(id)
                        .dataset_name(name)
                        .last_sync_count(since)
                        .max_results(RECORDS_PAGE)
                        .set_next_token(token.clone())
                        .send()
                })
                .await?;
            if !page.dataset_exists() {
                return Ok(Read::Missing);
            }
            let sync_count = page
                .dataset_sync_count()
                .and_then(|n| u64::try_from(n).ok())
                .context("ListRecords answered without DatasetSyncCount")?;
            let listing = listing.get_or_insert_with(|| Listing {
                sync_count,
                deleted_after: page.dataset_deleted_after_requested_sync_count(),
                merged: page.merged_dataset_names().to_vec(),
                records: Vec::new(),
            });
            // Every page must be of the first page's snapshot; otherwise the dataset changed
            // while it was read and is read again.
            if sync_count != listing.sync_count {
                return Ok(Read::Changed);
            }
            for r in page.records() {
                listing.records.push(record(id, name, r)?);
            }
            match page.next_token() {
                Some(next) if !next.is_empty() => token = Some(next.to_owned()),
                _ => return Ok(Read::Listing(std::mem::take(listing))),
            }
        }
    }

    /// Whether ListRecords after `since` reports a delete after it (one record's page).
    async fn deleted_after(&self, id: &str, name: &str, since: i64) -> anyhow::Result<bool> {
        let page = self
            .call("ListRecords", || {
                self.sync
                    .list_records()
                    .identity_pool_id(&self.pool_id)
                    .identity_id(id)
                    .dataset_name(name)
                    .last_sync_count(since)
                    .max_results(1)
                    .send()
            })
            .await?;
        Ok(page.dataset_deleted_after_requested_sync_count())
    }

    /// A whole identity: its datasets with their records, merge roots resolved.
    async fn read_identity(&self, identity: &SourceIdentity) -> anyhow::Result<IdentityCopy> {
        let mut datasets = Vec::new();
        for dataset in self.datasets(&identity.id).await? {
            if let Some(copy) = self.read_dataset(&identity.id, &dataset).await? {
                datasets.push(copy);
            }
        }
        // A merged copy's root is the dataset that names it.
        let roots: HashMap<String, String> = datasets
            .iter()
            .flat_map(|d| {
                d.merged
                    .iter()
                    .map(|copy| (copy.clone(), d.dataset.name.clone()))
            })
            .collect();
        for d in &mut datasets {
            d.dataset.merge_root = roots.get(&d.dataset.name).cloned();
        }
        Ok(IdentityCopy {
            identity: identity.clone(),
            datasets,
        })
    }

    /// One dataset at one snapshot; `None` if it was deleted meanwhile.
    async fn read_dataset(
        &self,
        id: &str,
        dataset: &SourceDataset,
    ) -> anyhow::Result<Option<DatasetCopy>> {
        let name = dataset.name.as_str();
        for _ in 0..DATASET_READS {
            // Everything above count 1, tombstones included.
            let above_one = match self.records(id, name, 1).await? {
                Read::Listing(listing) => listing,
                Read::Changed => continue,
                Read::Missing => return Ok(None),
            };
            let snapshot = above_one.sync_count;
            let mut records: BTreeMap<String, DumpRecord> = above_one
                .records
                .into_iter()
                .map(|r| (r.key.clone(), r))
                .collect();
            let live = records.values().filter(|r| r.value.is_some()).count() as u64;
            // The live records still at count 1 come only from a read from 0.
            if dataset.live_records != Some(live) || snapshot <= 1 {
                let from_zero = match self.records(id, name, 0).await? {
                    Read::Listing(listing) if listing.sync_count == snapshot => listing,
                    Read::Listing(_) | Read::Changed => continue,
                    Read::Missing => return Ok(None),
                };
                for r in from_zero.records {
                    records.entry(r.key.clone()).or_insert(r);
                }
            }
            let last_deleted_sync_count = if above_one.deleted_after {
                self.last_delete(id, name, snapshot).await?
            } else {
                0
            };
            let records: Vec<DumpRecord> = records.into_values().collect();
            if let Some(r) = records.iter().find(|r| r.sync_count > snapshot) {
                bail!(
                    "dataset {name} of {id}: record {:?} is at sync count {} above the dataset's {snapshot}",
                    r.key,
                    r.sync_count
                );
            }
            return Ok(Some(DatasetCopy {
                dataset: DumpDataset {
                    pool: String::new(),
                    owner: id.to_owned(),
                    name: name.to_owned(),
                    sync_count: snapshot,
                    deleted: false,
                    last_deleted_sync_count,
                    merge_root: None,
                    created_at: dataset.created_at,
                    last_modified: dataset.last_modified,
                },
                merged: above_one.merged,
                records,
            }));
        }
        bail!(
            "dataset {name} of {id} changed during each of {DATASET_READS} reads: stop the writes \
             to the pool (or retry later)"
        )
    }

    /// The sync count of a re-created dataset's last delete: the smallest `L` for which
    /// ListRecords after `L` no longer reports a delete after it (`delete > L` is
    /// monotonic in `L`), in log2(sync count) one-record requests.
    async fn last_delete(&self, id: &str, name: &str, snapshot: u64) -> anyhow::Result<u64> {
        let (mut low, mut high) = (2_u64, snapshot.max(2));
        while low < high {
            let mid = low + (high - low) / 2;
            if self.deleted_after(id, name, to_i64(mid)).await? {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        Ok(low)
    }
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A Cognito timestamp as ms since the epoch (0 when absent or before 1970). The wire
/// form is seconds with a fraction, parsed as a float: rounded, not truncated, so that
/// 1796020868.589 is 589 ms and not 588.999….
fn millis(t: Option<&DateTime>) -> i64 {
    t.map(|t| {
        t.secs()
            .saturating_mul(1000)
            .saturating_add((i64::from(t.subsec_nanos()) + 500_000) / 1_000_000)
    })
    .unwrap_or(0)
    .max(0)
}

fn record(
    id: &str,
    dataset: &str,
    r: &aws_sdk_cognitosync::types::Record,
) -> anyhow::Result<DumpRecord> {
    let key = r
        .key()
        .with_context(|| format!("dataset {dataset} of {id}: a record without Key"))?;
    let sync_count = r
        .sync_count()
        .and_then(|n| u64::try_from(n).ok())
        .filter(|n| *n > 0)
        .with_context(|| format!("dataset {dataset} of {id}: record {key:?} has no SyncCount"))?;
    Ok(DumpRecord {
        key: key.to_owned(),
        value: r.value().map(str::to_owned),
        sync_count,
        last_modified: millis(r.last_modified_date()),
        // Cognito names the writer by identity id; an absent one is the owner.
        last_modified_by: r
            .last_modified_by()
            .filter(|by| !by.is_empty())
            .unwrap_or(id)
            .to_owned(),
        // The API does not expose the device id (only its clock's time).
        device_id: None,
        device_last_modified: r.device_last_modified_date().map(|t| millis(Some(t))),
    })
}

/// Why a request failed, for the retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Throttled,
    Transient,
    Fatal,
}

/// The throttling error codes of AWS services (the set the AWS SDKs' standard retry
/// strategy treats as throttling, less those that are not throttling for Cognito).
const THROTTLING_CODES: &[&str] = &[
    "TooManyRequestsException",
    "ThrottlingException",
    "Throttling",
    "ThrottledException",
    "RequestThrottledException",
    "RequestThrottled",
    "RequestLimitExceeded",
    "SlowDown",
];

fn classify<E: ProvideErrorMetadata>(error: &SdkError<E, HttpResponse>) -> Failure {
    match error {
        SdkError::ServiceError(e) => {
            let status = e.raw().status().as_u16();
            if error.code().is_some_and(|c| THROTTLING_CODES.contains(&c)) || status == 429 {
                Failure::Throttled
            } else if status >= 500 {
                Failure::Transient
            } else {
                Failure::Fatal
            }
        }
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => Failure::Transient,
        // A connection that failed or timed out; not a request that could not be sent at all
        // (no credentials, a missing profile): retrying those only delays the error.
        SdkError::DispatchFailure(e) if e.is_io() || e.is_timeout() => Failure::Transient,
        _ => Failure::Fatal,
    }
}

/// The wait before retry `attempt` (0-based): exponential, capped, with full jitter so that
/// many clients throttled together do not come back together.
fn backoff(attempt: u32) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1_u32 << attempt.min(16))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(rand::random_range(0.5..=1.0))
}

/// A token bucket of one: requests start at most `rate` per second, evenly spaced.
struct Pacer {
    interval: Duration,
    next: tokio::sync::Mutex<Instant>,
}

impl Pacer {
    fn new(rate: f64) -> Pacer {
        Pacer {
            interval: Duration::from_secs_f64(1.0 / rate),
            next: tokio::sync::Mutex::new(Instant::now()),
        }
    }

    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let at = (*next).max(now);
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at.into()).await;
    }
}

#[derive(Debug, Clone)]
struct SourceIdentity {
    id: String,
    /// The login providers linked to it (names only: the API never shows the subject).
    providers: Vec<String>,
    created_at: i64,
}

struct SourceDataset {
    name: String,
    created_at: i64,
    last_modified: i64,
    live_records: Option<u64>,
}

/// What reading a dataset's records found.
enum Read {
    Listing(Listing),
    /// It was written to between two pages.
    Changed,
    /// It does not exist (deleted meanwhile).
    Missing,
}

#[derive(Default)]
struct Listing {
    sync_count: u64,
    deleted_after: bool,
    merged: Vec<String>,
    records: Vec<DumpRecord>,
}

struct DatasetCopy {
    /// `pool` is filled in by the target.
    dataset: DumpDataset,
    merged: Vec<String>,
    records: Vec<DumpRecord>,
}

struct IdentityCopy {
    identity: SourceIdentity,
    datasets: Vec<DatasetCopy>,
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

// --- progress -----------------------------------------------------------------------------

/// Progress on stderr, like `tandem import`'s: a line redrawn in place on a terminal, one
/// JSON object a line otherwise (`resume`, `progress` per batch, `done`), and the
/// `--checkpoint` file rewritten after each batch.
struct Reporter {
    mode: ProgressMode,
    checkpoint: Option<PathBuf>,
    started: Instant,
    drawn: Option<Instant>,
    bar_shown: bool,
    read: DumpCounts,
    tombstones: u64,
}

impl Reporter {
    fn new(mode: ProgressMode, checkpoint: Option<PathBuf>) -> Reporter {
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

    fn resumed(&mut self, p: &ImportProgress) {
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
    fn read(&mut self, copy: &IdentityCopy) {
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

    fn batch(&mut self, p: &ImportProgress, stats: &RequestStats) {
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

    fn done(&mut self, p: &ImportProgress, stats: &RequestStats) {
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

    fn clear_line(&mut self) {
        if self.bar_shown {
            eprintln!();
            self.bar_shown = false;
        }
    }

    fn finish(&mut self) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_store::DatasetKey;

    #[test]
    fn test_millis_rounds_the_float_seconds_of_the_wire() {
        let t = DateTime::from_secs_f64(1_796_020_868.589);
        assert_eq!(millis(Some(&t)), 1_796_020_868_589);
        assert_eq!(millis(None), 0);
        assert_eq!(millis(Some(&DateTime::from_secs(-5))), 0);
    }

    #[test]
    fn test_backoff_doubles_up_to_its_cap_with_jitter() {
        for attempt in 0..20 {
            let ceiling = FIRST_BACKOFF
                .saturating_mul(1 << attempt.min(16))
                .min(MAX_BACKOFF);
            let wait = backoff(attempt);
            assert!(
                wait <= ceiling && wait >= ceiling / 2,
                "{attempt}: {wait:?}"
            );
        }
        assert!(backoff(30) <= MAX_BACKOFF);
    }

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
