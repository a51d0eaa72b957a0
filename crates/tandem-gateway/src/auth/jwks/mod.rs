//! JWKS key caches: one per issuer whose keys come from a JWKS URL or file. Verification only
//! ever reads the cache, so no token waits on the network; a background task per cache
//! ([`JwksCache::run`]) fetches the document at start, on a schedule, and when asked to by a
//! token whose key is not cached, at most once per cooldown whatever the clients send.
//!
//! A key that leaves the document stays usable for `retired_key_ttl`, so tokens signed just
//! before a rotation still verify, and a failed or unusable fetch changes nothing: the cache
//! keeps the last good keys. Every document is bounded in bytes, entries and fetch time.
//! Fetch failures are logged once per outage (and the recovery once), by the task that
//! handles them.

mod document;
mod fetch;

pub(super) use document::Jwk;
pub(super) use fetch::HttpFetcher;
use fetch::Source;
pub(crate) use fetch::client_tls;

use super::JwksConfig;
use jsonwebtoken::Algorithm;
use parking_lot::{Mutex, RwLock};
use std::cmp::Reverse;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a JWKS cache has done so far; for tests, metrics and readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksStats {
    /// The issuer the keys belong to.
    pub issuer: String,
    /// Whether a document has been read successfully at least once.
    pub loaded: bool,
    /// Keys in the cache, retired ones included.
    pub keys: usize,
    /// Fetches finished, failed ones and file reads included.
    pub fetches: u64,
    /// Fetches that failed or returned an unusable document.
    pub failures: u64,
    /// Refreshes asked for by tokens with an unknown key, after the cooldown filtered them.
    pub refresh_requests: u64,
}

/// One issuer's cached keys and how to renew them.
pub(super) struct JwksCache {
    issuer: String,
    source: Source,
    config: JwksConfig,
    keys: RwLock<Arc<KeySet>>,
    /// When a token last asked for a refresh that was granted.
    last_request: Mutex<Option<Instant>>,
    wake: Notify,
    failing: AtomicBool,
    fetches: AtomicU64,
    failures: AtomicU64,
    refresh_requests: AtomicU64,
}

/// The keys at one moment; replaced whole, never changed in place.
#[derive(Default)]
pub(super) struct KeySet {
    pub(super) keys: Vec<CachedKey>,
    pub(super) loaded: bool,
}

pub(super) struct CachedKey {
    pub(super) jwk: Jwk,
    /// Set once the key has left the document: it is accepted until then.
    pub(super) retired_until: Option<Instant>,
}

impl CachedKey {
    fn is_same_key(&self, jwk: &Jwk) -> bool {
        self.jwk.kid == jwk.kid && self.jwk.alg == jwk.alg && self.jwk.material == jwk.material
    }

    pub(super) fn is_usable(&self, now: Instant) -> bool {
        self.retired_until.is_none_or(|until| now < until)
    }
}

impl KeySet {
    /// The usable keys a token of `alg` with `kid` may have been signed with: a token without
    /// `kid` may match any key, a key without `kid` any token.
    pub(super) fn candidates<'a>(
        &'a self,
        alg: Algorithm,
        kid: Option<&'a str>,
        now: Instant,
    ) -> impl Iterator<Item = &'a CachedKey> + 'a {
        self.keys.iter().filter(move |key| {
            key.jwk.alg == alg
                && key.is_usable(now)
                && (kid.is_none() || key.jwk.kid.is_none() || key.jwk.kid.as_deref() == kid)
        })
    }

    /// The document's keys, then the keys that left it while they are still within
    /// `retired_key_ttl`, most recently retired first, up to `max_keys` in all.
    fn merged(&self, fresh: Vec<Jwk>, now: Instant, config: &JwksConfig) -> (KeySet, Change) {
        let mut keys: Vec<CachedKey> = fresh
            .into_iter()
            .map(|jwk| CachedKey {
                jwk,
                retired_until: None,
            })
            .collect();
        let added = keys
            .iter()
            .filter(|key| !self.keys.iter().any(|old| old.is_same_key(&key.jwk)))
            .count();
        let mut retired = 0;
        let mut kept: Vec<CachedKey> = Vec::new();
        for old in &self.keys {
            if keys.iter().any(|key| key.is_same_key(&old.jwk)) {
                continue;
            }
            let until = match old.retired_until {
                Some(until) => until,
                None => {
                    retired += 1;
                    // A ttl too large for the clock is as good as forever.
                    now.checked_add(config.retired_key_ttl)
                        .unwrap_or(now + FOREVER)
                }
            };
            if now < until {
                kept.push(CachedKey {
                    jwk: old.jwk.clone(),
                    retired_until: Some(until),
                });
            }
        }
        kept.sort_by_key(|key| Reverse(key.retired_until));
        kept.truncate(config.max_keys.saturating_sub(keys.len()));
        keys.extend(kept);
        let set = KeySet { keys, loaded: true };
        (set, Change { added, retired })
    }
}

/// About a century: the fallback when `now + retired_key_ttl` overflows.
const FOREVER: std::time::Duration = std::time::Duration::from_secs(100 * 365 * 24 * 3600);

/// What one successful fetch changed, for the log.
struct Change {
    added: usize,
    retired: usize,
}

impl JwksCache {
    /// A cache for a document at `url`; it holds no key until [`run`](Self::run) fetches one.
    pub(super) fn from_url(
        issuer: &str,
        url: &str,
        client: Arc<HttpFetcher>,
        config: &JwksConfig,
    ) -> Result<JwksCache, String> {
        let uri = fetch::parse_url(url)?;
        Ok(JwksCache::new(
            issuer,
            Source::Url { uri, client },
            config,
            KeySet::default(),
        ))
    }

    /// A cache for a document in a file, read now so that a bad file fails at start.
    pub(super) fn from_file(
        issuer: &str,
        path: &Path,
        config: &JwksConfig,
    ) -> Result<JwksCache, String> {
        let bytes = fetch::read_file_now(path, config.max_document_bytes)?;
        let document = document::parse(&bytes, config.max_keys)
            .map_err(|why| format!("{}: {why}", path.display()))?;
        let (keys, _) = KeySet::default().merged(document.keys, Instant::now(), config);
        Ok(JwksCache::new(
            issuer,
            Source::File(path.to_owned()),
            config,
            keys,
        ))
    }

    fn new(issuer: &str, source: Source, config: &JwksConfig, keys: KeySet) -> JwksCache {
        JwksCache {
            issuer: issuer.to_owned(),
            source,
            config: config.clone(),
            keys: RwLock::new(Arc::new(keys)),
            last_request: Mutex::new(None),
            wake: Notify::new(),
            failing: AtomicBool::new(false),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            refresh_requests: AtomicU64::new(0),
        }
    }

    /// The keys as of now; cheap, and never waits on a fetch.
    pub(super) fn snapshot(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read())
    }

    /// Asks the task for a fetch, unless one was asked for within the cooldown: however many
    /// tokens name unknown keys, they cause at most one fetch per cooldown.
    pub(super) fn request_refresh(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_request.lock();
            if last.is_some_and(|at| now.duration_since(at) < self.config.unknown_kid_cooldown) {
                return;
            }
            *last = Some(now);
        }
        self.refresh_requests.fetch_add(1, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub(super) fn stats(&self) -> JwksStats {
        let keys = self.snapshot();
        JwksStats {
            issuer: self.issuer.clone(),
            loaded: keys.loaded,
            keys: keys.keys.len(),
            fetches: self.fetches.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            refresh_requests: self.refresh_requests.load(Ordering::Relaxed),
        }
    }

    /// Fetches at once, then every `refresh_interval` (after a failure: after the cooldown,
    /// at least 1 s) and whenever [`request_refresh`](Self::request_refresh) asks, until
    /// `shutdown`.
    pub(super) async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let retry = self
            .config
            .unknown_kid_cooldown
            .max(std::time::Duration::from_secs(1))
            .min(self.config.refresh_interval);
        loop {
            let pause = if self.refresh().await {
                self.config.refresh_interval
            } else {
                retry
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
                () = self.wake.notified() => {}
            }
        }
    }

    /// One fetch; the keys change only if it returns a usable document.
    async fn refresh(&self) -> bool {
        let limit = self.config.fetch_timeout;
        let result =
            match tokio::time::timeout(limit, self.source.read(self.config.max_document_bytes))
                .await
            {
                Ok(read) => read.and_then(|bytes| document::parse(&bytes, self.config.max_keys)),
                Err(_) => Err(format!("no document within fetch_timeout {limit:?}")),
            };
        let ok = match result {
            Ok(document) => {
                let (keys, change) =
                    self.snapshot()
                        .merged(document.keys, Instant::now(), &self.config);
                let count = keys.keys.len();
                *self.keys.write() = Arc::new(keys);
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(issuer = %self.issuer, source = %self.source.describe(), "jwks fetch works again");
                }
                if change.added > 0 || change.retired > 0 {
                    tracing::info!(
                        issuer = %self.issuer,
                        added = change.added,
                        retired = change.retired,
                        keys = count,
                        skipped = document.skipped,
                        "jwks keys changed"
                    );
                }
                true
            }
            Err(why) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                if self.failing.swap(true, Ordering::Relaxed) {
                    tracing::debug!(issuer = %self.issuer, error = %why, "jwks fetch still failing");
                } else {
                    tracing::warn!(
                        issuer = %self.issuer,
                        source = %self.source.describe(),
                        error = %why,
                        "jwks fetch failed; the cached keys stay in use"
                    );
                }
                false
            }
        };
        // Counted once the keys are in place, so whoever sees the count sees the outcome.
        self.fetches.fetch_add(1, Ordering::Relaxed);
        ok
    }
}
