//! The source of `tandem import cognito`: the Cognito Identity and Cognito Sync clients of
//! the AWS SDK for Rust, paced by one token bucket, with retries of throttling and transient
//! failures, and the reads that make up one identity's copy (its datasets at one snapshot
//! each, tombstones, the count of a re-created dataset's last delete, merge roots).

use super::CognitoImportArgs;
use anyhow::{Context, bail};
use aws_sdk_cognitosync::config::http::HttpResponse;
use aws_sdk_cognitosync::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_cognitosync::primitives::DateTime;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_store::dump::{DumpDataset, DumpRecord};

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
/// One request's deadline (a page of 1024 records is at most a few MB).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// The two APIs' clients, the pacing and the counts of what was asked.
pub(super) struct Source {
    identity: aws_sdk_cognitoidentity::Client,
    sync: aws_sdk_cognitosync::Client,
    pub(super) pool_id: String,
    pacer: Pacer,
    max_retries: u32,
    pub(super) stats: Arc<RequestStats>,
}

#[derive(Debug, Default)]
pub(super) struct RequestStats {
    pub(super) requests: AtomicU64,
    pub(super) throttled: AtomicU64,
    pub(super) retried: AtomicU64,
}

impl Source {
    pub(super) async fn connect(args: &CognitoImportArgs) -> anyhow::Result<Source> {
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
    pub(super) async fn identities(
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
    pub(super) async fn read_identity(
        &self,
        identity: &SourceIdentity,
    ) -> anyhow::Result<IdentityCopy> {
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
pub(super) struct SourceIdentity {
    pub(super) id: String,
    /// The login providers linked to it (names only: the API never shows the subject).
    pub(super) providers: Vec<String>,
    pub(super) created_at: i64,
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

pub(super) struct DatasetCopy {
    /// `pool` is filled in by the target.
    pub(super) dataset: DumpDataset,
    pub(super) merged: Vec<String>,
    pub(super) records: Vec<DumpRecord>,
}

pub(super) struct IdentityCopy {
    pub(super) identity: SourceIdentity,
    pub(super) datasets: Vec<DatasetCopy>,
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
