//! What a [`Verifier`](super::Verifier) accepts: the keys, the issuer and audience it
//! requires, and the clock leeway.

use std::fmt;

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
