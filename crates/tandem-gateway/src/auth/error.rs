//! Why a token was refused or a verifier could not be built, and the wire code for each.

use tandem_protocol::ErrorCode;
use tandem_token::TokenError;

/// Why a token was refused, or why a [`Verifier`](super::Verifier) could not be built. Messages are safe to
/// send to a client: they never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not a compact JWS, bad base64url, bad JSON, or too long.
    #[error("malformed token")]
    Malformed,
    /// The header names an algorithm for which no key is configured (`none` included).
    #[error("unsupported token algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// No configured key of the token's algorithm verifies the signature.
    #[error("invalid token signature")]
    BadSignature,
    /// `exp` is in the past, beyond the leeway.
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future, beyond the leeway.
    #[error("token not yet valid")]
    NotYetValid,
    /// `iss` is not the configured issuer.
    #[error("token issuer not accepted")]
    WrongIssuer,
    /// `aud` does not contain the configured audience.
    #[error("token audience not accepted")]
    WrongAudience,
    /// A required claim is absent (or null, or of the wrong JSON type).
    #[error("token is missing required claim {0}")]
    MissingClaim(&'static str),
    /// A claim is present but its value cannot be used.
    #[error("token claim {0} has an invalid value")]
    InvalidClaim(&'static str),
    /// The token names a `kid` that is not among its issuer's keys. A refresh of the keys has
    /// been asked for (at most one per cooldown), so the same token may be accepted later.
    #[error("unknown token key id; the issuer's keys are being refreshed, retry later")]
    UnknownKeyId,
    /// The token's issuer takes its keys from a JWKS that has not been fetched yet.
    #[error("the token issuer's keys are not loaded yet, retry later")]
    KeysNotLoaded,
    /// `sub` is empty, too long, or contains control characters.
    #[error(
        "token subject must be a non-empty string of at most 256 bytes without control characters"
    )]
    InvalidSubject,
    /// The configuration holds no key at all.
    #[error("no token verification key configured")]
    NoKeys,
    /// A configured key cannot be used; the message names which one.
    #[error("invalid key: {0}")]
    BadKey(String),
    /// An issuer's settings cannot be used (a duplicate issuer, a URL that is not `https://`,
    /// a JWKS file without usable keys, out-of-range JWKS settings); the message says which.
    #[error("invalid jwt issuer settings: {0}")]
    BadIssuerConfig(String),
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_BYTES`](super::MIN_HS256_SECRET_BYTES).
    #[error("hs256 secret is {len} bytes, at least 32 are required")]
    WeakSecret { len: usize },
    /// The configured leeway is larger than [`MAX_LEEWAY_SECS`](super::MAX_LEEWAY_SECS).
    #[error("leeway of {0} s is above the maximum of 600 s")]
    InvalidLeeway(u64),
    /// A token lifetime of zero, or one that overflows a unix timestamp.
    #[error("token lifetime must be at least 1 s and end before the year 292277026596")]
    InvalidTtl,
    /// Signing a token failed.
    #[error("failed to sign token: {0}")]
    Signing(String),
}

impl AuthError {
    /// The wire code to report this error with: refused tokens are `unauthorized`, broken
    /// configuration is `internal`.
    pub fn code(&self) -> ErrorCode {
        match self {
            AuthError::Malformed
            | AuthError::UnsupportedAlgorithm(_)
            | AuthError::BadSignature
            | AuthError::Expired
            | AuthError::NotYetValid
            | AuthError::WrongIssuer
            | AuthError::WrongAudience
            | AuthError::MissingClaim(_)
            | AuthError::InvalidClaim(_)
            | AuthError::UnknownKeyId
            | AuthError::KeysNotLoaded
            | AuthError::InvalidSubject => ErrorCode::Unauthorized,
            AuthError::NoKeys
            | AuthError::BadKey(_)
            | AuthError::BadIssuerConfig(_)
            | AuthError::WeakSecret { .. }
            | AuthError::InvalidLeeway(_)
            | AuthError::InvalidTtl
            | AuthError::Signing(_) => ErrorCode::Internal,
        }
    }
}

/// The rules a minted token must meet are the verifier's rules too, so minting fails with
/// the same errors and codes.
impl From<TokenError> for AuthError {
    fn from(error: TokenError) -> Self {
        match error {
            TokenError::WeakSecret { len } => AuthError::WeakSecret { len },
            TokenError::InvalidSubject => AuthError::InvalidSubject,
            TokenError::InvalidTtl => AuthError::InvalidTtl,
            TokenError::Signing(message) => AuthError::Signing(message),
        }
    }
}
