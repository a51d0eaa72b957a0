//! What a [`Verifier`](super::Verifier) accepts: the default keys with the issuer and
//! audience they require, further issuers each with their own key source and audience, the
//! bounds on fetching JWKS documents, and the clock leeway.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The default clock-skew allowance for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// The largest leeway [`Verifier::new`](super::Verifier::new) accepts, in seconds.
pub const MAX_LEEWAY_SECS: u64 = 600;

/// What a [`Verifier`](super::Verifier) accepts. At least one key must be given.
#[derive(Clone)]
pub struct AuthConfig {
    /// Shared secret for HS256, at least [`MIN_HS256_SECRET_BYTES`](super::MIN_HS256_SECRET_BYTES) long.
    pub hs256_secret: Option<Vec<u8>>,
    /// PEM-encoded RSA public keys (`BEGIN PUBLIC KEY` or `BEGIN RSA PUBLIC KEY`) for RS256.
    pub rs256_public_keys: Vec<Vec<u8>>,
    /// PEM-encoded P-256 public keys (`BEGIN PUBLIC KEY`) for ES256.
    pub es256_public_keys: Vec<Vec<u8>>,
    /// When set, tokens must carry exactly this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this value in `aud`. When unset, `aud` is not checked.
    pub audience: Option<String>,
    /// Clock-skew allowance for `exp` and `nbf`, at most [`MAX_LEEWAY_SECS`].
    pub leeway_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hs256_secret: None,
            rs256_public_keys: Vec::new(),
            es256_public_keys: Vec::new(),
            issuer: None,
            audience: None,
            leeway_secs: DEFAULT_LEEWAY_SECS,
        }
    }
}

impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "hs256_secret",
                &self.hs256_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("rs256_public_keys", &self.rs256_public_keys.len())
            .field("es256_public_keys", &self.es256_public_keys.len())
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .finish()
    }
}

/// One more issuer whose tokens a verifier accepts, with its own keys and audience. A token is
/// verified with these keys exactly when its `iss` equals [`issuer`](Self::issuer); the
/// default keys of [`AuthConfig`] take every other token.
#[derive(Clone, Debug)]
pub struct IssuerConfig {
    /// The `iss` its tokens carry, compared exactly.
    pub issuer: String,
    /// Where its keys come from.
    pub keys: KeySource,
    /// When set, its tokens must carry this value in `aud`. When unset, `aud` is not checked.
    pub audience: Option<String>,
    /// When set, prepended to `sub` to make the identity, so that two issuers cannot speak for
    /// the same identity. The result must still meet the subject rules.
    pub subject_prefix: Option<String>,
}

/// Where an issuer's keys come from. Keys from a JWKS verify RS256 (RSA, at least 2048 bits)
/// and ES256 (P-256) tokens; other keys in the document are skipped.
#[derive(Clone)]
pub enum KeySource {
    /// A JWKS document fetched over `https://` (`http://` only for loopback hosts), kept in a
    /// cache and refreshed in the background.
    JwksUrl(String),
    /// A JWKS document read from a file at start, and read again on the same schedule as a URL.
    JwksFile(PathBuf),
    /// PEM public keys, fixed for the verifier's lifetime.
    Pem {
        /// RSA public keys for RS256, as in [`AuthConfig::rs256_public_keys`].
        rs256_public_keys: Vec<Vec<u8>>,
        /// P-256 public keys for ES256, as in [`AuthConfig::es256_public_keys`].
        es256_public_keys: Vec<Vec<u8>>,
    },
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::JwksUrl(url) => f.debug_tuple("JwksUrl").field(url).finish(),
            KeySource::JwksFile(path) => f.debug_tuple("JwksFile").field(path).finish(),
            KeySource::Pem {
                rs256_public_keys,
                es256_public_keys,
            } => f
                .debug_struct("Pem")
                .field("rs256_public_keys", &rs256_public_keys.len())
                .field("es256_public_keys", &es256_public_keys.len())
                .finish(),
        }
    }
}

/// Default for [`JwksConfig::refresh_interval`].
pub const DEFAULT_JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(600);
/// Default for [`JwksConfig::unknown_kid_cooldown`].
pub const DEFAULT_JWKS_UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(30);
/// Default for [`JwksConfig::fetch_timeout`].
pub const DEFAULT_JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Default for [`JwksConfig::max_document_bytes`].
pub const DEFAULT_JWKS_MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Default for [`JwksConfig::max_keys`].
pub const DEFAULT_JWKS_MAX_KEYS: usize = 64;
/// Default for [`JwksConfig::retired_key_ttl`].
pub const DEFAULT_JWKS_RETIRED_KEY_TTL: Duration = Duration::from_secs(3600);

/// How JWKS documents are fetched and cached; the same for every issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwksConfig {
    /// How often each document is fetched again. After a failed fetch the next try comes
    /// after [`unknown_kid_cooldown`](Self::unknown_kid_cooldown) (at least 1 s) instead.
    pub refresh_interval: Duration,
    /// The least time between two fetches caused by tokens whose `kid` is not in the cache.
    pub unknown_kid_cooldown: Duration,
    /// The longest one fetch (connect, request and body) may take.
    pub fetch_timeout: Duration,
    /// The largest document accepted, in bytes.
    pub max_document_bytes: usize,
    /// The most entries one document may hold, and the most keys kept per issuer (current and
    /// retired together).
    pub max_keys: usize,
    /// How long a key that left the document is still accepted. Zero drops it at once.
    pub retired_key_ttl: Duration,
}

impl Default for JwksConfig {
    fn default() -> Self {
        JwksConfig {
            refresh_interval: DEFAULT_JWKS_REFRESH_INTERVAL,
            unknown_kid_cooldown: DEFAULT_JWKS_UNKNOWN_KID_COOLDOWN,
            fetch_timeout: DEFAULT_JWKS_FETCH_TIMEOUT,
            max_document_bytes: DEFAULT_JWKS_MAX_DOCUMENT_BYTES,
            max_keys: DEFAULT_JWKS_MAX_KEYS,
            retired_key_ttl: DEFAULT_JWKS_RETIRED_KEY_TTL,
        }
    }
}
