//! JWT authentication: a [`Verifier`] built once from an [`AuthConfig`] that turns a bearer
//! token into an [`Identity`], and [`mint_hs256`] / [`generate_secret`] for a server that
//! issues its own tokens.
//!
//! Algorithms are pinned: HS256 with a shared secret, RS256 and ES256 with PEM public keys.
//! The algorithm named in a token's header only ever selects among the keys configured for
//! exactly that algorithm, so `alg: none`, other algorithms and algorithm confusion (an
//! HS256 token "signed" with an RSA public key's PEM bytes) are refused. `exp` and `sub` are
//! required, `nbf` is honoured, `iss` and `aud` are required and checked when configured.
//!
//! This module does not read configuration from the environment, does not log, and does not
//! decide what an identity may access.

use std::fmt;
use std::sync::{Arc, Once};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tandem_protocol::ErrorCode;

/// The default clock-skew allowance for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// The largest leeway [`Verifier::new`] accepts, in seconds.
pub const MAX_LEEWAY_SECS: u64 = 600;
/// The shortest HS256 secret accepted, in bytes.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// The longest `sub` accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// The longest token accepted, in bytes; anything longer is [`AuthError::Malformed`].
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;
/// How much of a client-sent `alg` is echoed back in [`AuthError::UnsupportedAlgorithm`].
const MAX_ECHOED_ALG_CHARS: usize = 32;

/// What a [`Verifier`] accepts. At least one key must be given.
#[derive(Clone)]
pub struct AuthConfig {
    /// Shared secret for HS256, at least [`MIN_HS256_SECRET_BYTES`] long.
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

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`: non-empty, at most [`MAX_SUBJECT_BYTES`], no control characters.
    pub sub: String,
    /// The token's `exp`, in unix seconds.
    pub expires_at: i64,
}

/// Why a token was refused, or why a [`Verifier`] could not be built. Messages are safe to
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
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_BYTES`].
    #[error("hs256 secret is {len} bytes, at least 32 are required")]
    WeakSecret { len: usize },
    /// The configured leeway is larger than [`MAX_LEEWAY_SECS`].
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
            | AuthError::InvalidSubject => ErrorCode::Unauthorized,
            AuthError::NoKeys
            | AuthError::BadKey(_)
            | AuthError::WeakSecret { .. }
            | AuthError::InvalidLeeway(_)
            | AuthError::InvalidTtl
            | AuthError::Signing(_) => ErrorCode::Internal,
        }
    }
}

/// Verifies bearer tokens. Cheap to clone: the keys live behind an `Arc`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Keys>,
}

struct Keys {
    hs256: Option<DecodingKey>,
    rs256: Vec<DecodingKey>,
    es256: Vec<DecodingKey>,
    hs256_validation: Validation,
    rs256_validation: Validation,
    es256_validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    leeway_secs: u64,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = &*self.inner;
        f.debug_struct("Verifier")
            .field("hs256", &keys.hs256.is_some())
            .field("rs256_keys", &keys.rs256.len())
            .field("es256_keys", &keys.es256.len())
            .field("issuer", &keys.issuer)
            .field("audience", &keys.audience)
            .field("leeway_secs", &keys.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// Parses and checks every key. Fails when there is no key at all, a PEM does not hold
    /// a usable public key of its kind (RSA keys must have at least 2048 bits, EC keys must
    /// be on P-256), the HS256 secret is too short, or the leeway is too large.
    pub fn new(config: &AuthConfig) -> Result<Verifier, AuthError> {
        ensure_crypto_provider();

        if config.hs256_secret.is_none()
            && config.rs256_public_keys.is_empty()
            && config.es256_public_keys.is_empty()
        {
            return Err(AuthError::NoKeys);
        }
        if config.leeway_secs > MAX_LEEWAY_SECS {
            return Err(AuthError::InvalidLeeway(config.leeway_secs));
        }

        let hs256 = match &config.hs256_secret {
            Some(secret) => {
                check_secret(secret)?;
                Some(DecodingKey::from_secret(secret))
            }
            None => None,
        };
        let rs256 = config
            .rs256_public_keys
            .iter()
            .enumerate()
            .map(|(index, pem)| rsa_public_key(index, pem))
            .collect::<Result<Vec<_>, _>>()?;
        let es256 = config
            .es256_public_keys
            .iter()
            .enumerate()
            .map(|(index, pem)| ec_public_key(index, pem))
            .collect::<Result<Vec<_>, _>>()?;

        let validation = |alg| validation_for(alg, config);
        Ok(Verifier {
            inner: Arc::new(Keys {
                hs256,
                rs256,
                es256,
                hs256_validation: validation(Algorithm::HS256),
                rs256_validation: validation(Algorithm::RS256),
                es256_validation: validation(Algorithm::ES256),
                issuer: config.issuer.clone(),
                audience: config.audience.clone(),
                leeway_secs: config.leeway_secs,
            }),
        })
    }

    /// The clock leeway applied to `exp` and `nbf`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.inner.leeway_secs
    }

    /// Checks the token's signature with the keys configured for the algorithm its header
    /// names, then its claims, and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Malformed);
        }
        let alg = header_alg(token)?;
        let keys = &*self.inner;
        let (candidates, validation): (&[DecodingKey], &Validation) = match alg.as_str() {
            "HS256" => match &keys.hs256 {
                Some(key) => (std::slice::from_ref(key), &keys.hs256_validation),
                None => return Err(unsupported_algorithm(&alg)),
            },
            "RS256" if !keys.rs256.is_empty() => (&keys.rs256, &keys.rs256_validation),
            "ES256" if !keys.es256.is_empty() => (&keys.es256, &keys.es256_validation),
            _ => return Err(unsupported_algorithm(&alg)),
        };

        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, key, validation) {
                Ok(data) => return identity_from(data.claims),
                // The signature is checked before any claim, so this key is simply not the
                // signer; try the next one.
                Err(err) if matches!(err.kind(), ErrorKind::InvalidSignature) => continue,
                Err(err) => return Err(map_error(err.kind(), &alg)),
            }
        }
        Err(AuthError::BadSignature)
    }
}

/// Signs an HS256 token for `sub` with `iat` = now and `exp` = now + `ttl` (whole seconds),
/// plus `iss` and `aud` when given. The secret and `sub` must pass the same checks
/// [`Verifier`] applies.
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, AuthError> {
    ensure_crypto_provider();
    check_secret(secret)?;
    check_subject(sub)?;

    let now = unix_now();
    let exp = now
        .checked_add(ttl.as_secs())
        .filter(|exp| ttl.as_secs() > 0 && i64::try_from(*exp).is_ok())
        .ok_or(AuthError::InvalidTtl)?;
    let claims = MintClaims {
        sub,
        iat: now,
        exp,
        iss: issuer,
        aud: audience,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret),
    )
    .map_err(|err| AuthError::Signing(err.to_string()))
}

/// 32 random bytes as 64 lowercase hex characters, for a server to persist when no secret
/// is configured. The string's own bytes (all 64 of them) are meant to be used as the HS256
/// secret, so no decoding step can go wrong.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().fold(String::with_capacity(64), |mut out, b| {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
        out
    })
}

/// jsonwebtoken 11 picks its crypto backend from a process-wide default. It infers
/// RustCrypto when that is the only backend feature enabled, but panics on first use when
/// another crate in the build also enables `aws_lc_rs`. Installing it explicitly avoids
/// that; if someone else installed a provider first, theirs stays.
fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _already_installed = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);
    });
}

fn check_secret(secret: &[u8]) -> Result<(), AuthError> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(AuthError::WeakSecret { len: secret.len() });
    }
    Ok(())
}

fn check_subject(sub: &str) -> Result<(), AuthError> {
    if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES || sub.chars().any(char::is_control) {
        return Err(AuthError::InvalidSubject);
    }
    Ok(())
}

fn rsa_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, AuthError> {
    let bad = |why: &str| AuthError::BadKey(format!("rs256 public key {index}: {why}"));
    let key = DecodingKey::from_rsa_pem(pem).map_err(|_| bad("not an rsa pem key"))?;
    let der = key
        .try_get_as_bytes()
        .map_err(|_| bad("not an rsa pem key"))?;
    // `from_rsa_pem` also accepts private keys and defers parsing to each verification;
    // parse the public key now so a bad one fails at startup, not on every request.
    let (n, e) = (rust_crypto::DEFAULT_PROVIDER
        .key_utils
        .rsa_pub_components_from_public_key)(der)
    .map_err(|_| bad("not an rsa public key"))?;
    if modulus_bits(&n) < MIN_RSA_BITS {
        return Err(bad("rsa key shorter than 2048 bits"));
    }
    Ok(DecodingKey::from_rsa_raw_components(&n, &e))
}

fn ec_public_key(index: usize, pem: &[u8]) -> Result<DecodingKey, AuthError> {
    let bad = |why: &str| AuthError::BadKey(format!("es256 public key {index}: {why}"));
    let key = DecodingKey::from_ec_pem(pem).map_err(|_| bad("not an ec public key pem"))?;
    // Building a verifier decodes the point on P-256, which rejects other curves.
    (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(&Algorithm::ES256, &key)
        .map_err(|_| bad("not a p-256 public key"))?;
    Ok(key)
}

fn modulus_bits(n: &[u8]) -> usize {
    let leading_zero_bytes = n.iter().take_while(|b| **b == 0).count();
    match n.get(leading_zero_bytes) {
        Some(first) => (n.len() - leading_zero_bytes) * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

fn validation_for(alg: Algorithm, config: &AuthConfig) -> Validation {
    let mut validation = Validation::new(alg);
    let mut required = vec!["exp", "sub"];
    validation.leeway = config.leeway_secs;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    if let Some(issuer) = &config.issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &config.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            validation.validate_aud = true;
            required.push("aud");
        }
        // jsonwebtoken rejects any token carrying `aud` when no audience is set.
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

/// The claims this module reads. Loosely typed so that a missing or mistyped claim is
/// reported by jsonwebtoken's validation as a missing claim, not as malformed JSON.
#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
}

fn identity_from(claims: Claims) -> Result<Identity, AuthError> {
    let sub = match claims.sub {
        Some(serde_json::Value::String(sub)) => sub,
        Some(_) => return Err(AuthError::InvalidSubject),
        None => return Err(AuthError::MissingClaim("sub")),
    };
    check_subject(&sub)?;
    let exp = match claims.exp {
        // jsonwebtoken accepts a non-negative number and rounds a fractional one.
        Some(serde_json::Value::Number(exp)) => exp
            .as_u64()
            .or_else(|| {
                exp.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f.round() as u64)
            })
            .and_then(|exp| i64::try_from(exp).ok())
            .ok_or(AuthError::InvalidClaim("exp"))?,
        Some(_) => return Err(AuthError::InvalidClaim("exp")),
        None => return Err(AuthError::MissingClaim("exp")),
    };
    Ok(Identity {
        sub,
        expires_at: exp,
    })
}

/// Reads `alg` from the token's header without trusting anything else in it.
fn header_alg(token: &str) -> Result<String, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let json = base64url_decode(header).ok_or(AuthError::Malformed)?;
    let header: RawHeader = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    Ok(header.alg)
}

/// Echoes a client-sent algorithm name back, bounded and without control characters.
fn unsupported_algorithm(alg: &str) -> AuthError {
    let shown = alg
        .chars()
        .take(MAX_ECHOED_ALG_CHARS)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    AuthError::UnsupportedAlgorithm(shown)
}

fn map_error(kind: &ErrorKind, alg: &str) -> AuthError {
    match kind {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidSubject => AuthError::InvalidSubject,
        ErrorKind::MissingRequiredClaim(claim) => match claim_name(claim) {
            Some(name) => AuthError::MissingClaim(name),
            None => AuthError::Malformed,
        },
        ErrorKind::InvalidClaimFormat(claim) => match claim_name(claim) {
            Some(name) => AuthError::InvalidClaim(name),
            None => AuthError::Malformed,
        },
        ErrorKind::InvalidAlgorithm
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::MissingAlgorithm => unsupported_algorithm(alg),
        ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => AuthError::BadKey(format!("{alg} key unusable")),
        // InvalidToken, Base64, Json, Utf8 and anything added later.
        _ => AuthError::Malformed,
    }
}

fn claim_name(claim: &str) -> Option<&'static str> {
    ["exp", "nbf", "sub", "iss", "aud"]
        .into_iter()
        .find(|name| *name == claim)
}

/// Unpadded base64url, strict: no padding, no whitespace, no stray trailing bits.
fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'-' => Some(62),
            b'_' => Some(63),
            _ => None,
        }
    }

    let bytes = input.as_bytes();
    if bytes.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | value(c)?;
        }
        match chunk.len() {
            4 => out.extend_from_slice(&acc.to_be_bytes()[1..]),
            3 => {
                if acc & 0b11 != 0 {
                    return None;
                }
                out.extend_from_slice(&(acc >> 2).to_be_bytes()[2..]);
            }
            2 => {
                if acc & 0b1111 != 0 {
                    return None;
                }
                out.push((acc >> 4) as u8);
            }
            _ => return None,
        }
    }
    Some(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RSA_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/rsa_private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/rsa_public.pem");
    const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/rsa_other_private.pem");
    const RSA_OTHER_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/rsa_other_public.pem");
    const RSA_1024_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/rsa_1024_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/ec_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/ec_public.pem");
    const EC_OTHER_PRIVATE: &[u8] = include_bytes!("../tests/fixtures/ec_other_private.pem");
    const EC_OTHER_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/ec_other_public.pem");
    const EC_P384_PUBLIC: &[u8] = include_bytes!("../tests/fixtures/ec_p384_public.pem");

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";
    const OTHER_SECRET: &[u8] = b"fedcba9876543210fedcba9876543210-other-secret";

    fn now() -> i64 {
        i64::try_from(jsonwebtoken::get_current_timestamp()).unwrap()
    }

    fn claims() -> serde_json::Value {
        json!({ "sub": "alice", "exp": now() + 600 })
    }

    fn hs_config() -> AuthConfig {
        AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        }
    }

    fn rsa_config() -> AuthConfig {
        AuthConfig {
            rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
            ..AuthConfig::default()
        }
    }

    fn ec_config() -> AuthConfig {
        AuthConfig {
            es256_public_keys: vec![EC_PUBLIC.to_vec()],
            ..AuthConfig::default()
        }
    }

    fn verifier(config: &AuthConfig) -> Verifier {
        Verifier::new(config).unwrap()
    }

    fn sign(alg: Algorithm, key: &EncodingKey, claims: &serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
    }

    fn hs256(claims: &serde_json::Value) -> String {
        sign(Algorithm::HS256, &EncodingKey::from_secret(SECRET), claims)
    }

    fn rs256(private_pem: &[u8], claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(private_pem).unwrap();
        sign(Algorithm::RS256, &key, claims)
    }

    fn es256(private_pem: &[u8], claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_ec_pem(private_pem).unwrap();
        sign(Algorithm::ES256, &key, claims)
    }

    fn b64url(bytes: &[u8]) -> String {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let mut acc = 0u32;
            for (i, b) in chunk.iter().enumerate() {
                acc |= u32::from(*b) << (16 - 8 * i);
            }
            for i in 0..=chunk.len() {
                out.push(char::from(
                    ALPHABET[((acc >> (18 - 6 * i)) & 0x3f) as usize],
                ));
            }
        }
        out
    }

    /// A token with a hand-written header and payload and the given signature part.
    fn raw_token(header: &serde_json::Value, claims: &serde_json::Value, sig: &str) -> String {
        format!(
            "{}.{}.{sig}",
            b64url(header.to_string().as_bytes()),
            b64url(claims.to_string().as_bytes())
        )
    }

    /// An HMAC-signed token whose header says `alg`, signed with `secret` as the algorithm
    /// in the header requires, the way an attacker would build one.
    fn hmac_token(alg: Algorithm, secret: &[u8], claims: &serde_json::Value) -> String {
        sign(alg, &EncodingKey::from_secret(secret), claims)
    }

    #[test]
    fn test_auth_accepts_valid_hs256_token() {
        let exp = now() + 600;
        let token = hs256(&json!({ "sub": "alice", "exp": exp }));
        let identity = verifier(&hs_config()).verify(&token).unwrap();
        assert_eq!(
            identity,
            Identity {
                sub: "alice".to_owned(),
                expires_at: exp
            }
        );
    }

    #[test]
    fn test_auth_accepts_valid_rs256_token() {
        let token = rs256(RSA_PRIVATE, &claims());
        let identity = verifier(&rsa_config()).verify(&token).unwrap();
        assert_eq!(identity.sub, "alice");
    }

    #[test]
    fn test_auth_accepts_valid_es256_token() {
        let token = es256(EC_PRIVATE, &claims());
        let identity = verifier(&ec_config()).verify(&token).unwrap();
        assert_eq!(identity.sub, "alice");
    }

    #[test]
    fn test_auth_tries_every_key_of_the_token_algorithm() {
        let config = AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            rs256_public_keys: vec![RSA_OTHER_PUBLIC.to_vec(), RSA_PUBLIC.to_vec()],
            es256_public_keys: vec![EC_OTHER_PUBLIC.to_vec(), EC_PUBLIC.to_vec()],
            ..AuthConfig::default()
        };
        let verifier = verifier(&config);
        for token in [
            hs256(&claims()),
            rs256(RSA_PRIVATE, &claims()),
            rs256(RSA_OTHER_PRIVATE, &claims()),
            es256(EC_PRIVATE, &claims()),
            es256(EC_OTHER_PRIVATE, &claims()),
        ] {
            assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
        }
    }

    #[test]
    fn test_auth_rejects_token_expired_beyond_leeway() {
        let token = hs256(&json!({ "sub": "alice", "exp": now() - 31 - 5 }));
        assert_eq!(
            verifier(&hs_config()).verify(&token),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn test_auth_accepts_token_expired_within_leeway() {
        let token = hs256(&json!({ "sub": "alice", "exp": now() - 20 }));
        assert!(verifier(&hs_config()).verify(&token).is_ok());

        let strict = AuthConfig {
            leeway_secs: 0,
            ..hs_config()
        };
        assert_eq!(verifier(&strict).verify(&token), Err(AuthError::Expired));
    }

    #[test]
    fn test_auth_rejects_nbf_in_future() {
        let token = hs256(&json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 120 }));
        assert_eq!(
            verifier(&hs_config()).verify(&token),
            Err(AuthError::NotYetValid)
        );
    }

    #[test]
    fn test_auth_accepts_nbf_within_leeway() {
        let token = hs256(&json!({ "sub": "alice", "exp": now() + 600, "nbf": now() + 10 }));
        assert!(verifier(&hs_config()).verify(&token).is_ok());
    }

    #[test]
    fn test_auth_rejects_missing_exp() {
        let token = hs256(&json!({ "sub": "alice" }));
        assert_eq!(
            verifier(&hs_config()).verify(&token),
            Err(AuthError::MissingClaim("exp"))
        );
    }

    #[test]
    fn test_auth_rejects_non_numeric_exp() {
        let token = hs256(&json!({ "sub": "alice", "exp": "tomorrow" }));
        assert!(verifier(&hs_config()).verify(&token).is_err());
        let token = hs256(&json!({ "sub": "alice", "exp": -5 }));
        assert!(verifier(&hs_config()).verify(&token).is_err());
    }

    #[test]
    fn test_auth_rejects_wrong_hs256_secret() {
        let token = hmac_token(Algorithm::HS256, OTHER_SECRET, &claims());
        assert_eq!(
            verifier(&hs_config()).verify(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_rs256_signed_by_other_key() {
        let token = rs256(RSA_OTHER_PRIVATE, &claims());
        assert_eq!(
            verifier(&rsa_config()).verify(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_es256_signed_by_other_key() {
        let token = es256(EC_OTHER_PRIVATE, &claims());
        assert_eq!(
            verifier(&ec_config()).verify(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_tampered_payload() {
        let token = hs256(&claims());
        let mut parts = token.split('.').collect::<Vec<_>>();
        let forged = b64url(
            json!({ "sub": "root", "exp": now() + 600 })
                .to_string()
                .as_bytes(),
        );
        parts[1] = &forged;
        assert_eq!(
            verifier(&hs_config()).verify(&parts.join(".")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_alg_none() {
        let config = AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
            es256_public_keys: vec![EC_PUBLIC.to_vec()],
            ..AuthConfig::default()
        };
        let verifier = verifier(&config);
        for alg in ["none", "None", "NONE", "nOnE"] {
            let header = json!({ "alg": alg, "typ": "JWT" });
            for sig in ["", "AAAA"] {
                let token = raw_token(&header, &claims(), sig);
                assert_eq!(
                    verifier.verify(&token),
                    Err(AuthError::UnsupportedAlgorithm(alg.to_owned())),
                    "{token}"
                );
            }
        }
    }

    #[test]
    fn test_auth_rejects_hs256_signed_with_rsa_pem_when_only_rsa_configured() {
        let token = hmac_token(Algorithm::HS256, RSA_PUBLIC, &claims());
        assert_eq!(
            verifier(&rsa_config()).verify(&token),
            Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
        );
    }

    #[test]
    fn test_auth_rejects_hs256_signed_with_rsa_pem_when_secret_and_rsa_configured() {
        let config = AuthConfig {
            hs256_secret: Some(SECRET.to_vec()),
            rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
            ..AuthConfig::default()
        };
        let token = hmac_token(Algorithm::HS256, RSA_PUBLIC, &claims());
        assert_eq!(
            verifier(&config).verify(&token),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_hs256_signed_with_ec_pem_when_only_ec_configured() {
        let token = hmac_token(Algorithm::HS256, EC_PUBLIC, &claims());
        assert_eq!(
            verifier(&ec_config()).verify(&token),
            Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
        );
    }

    #[test]
    fn test_auth_rejects_hs384_and_hs512() {
        let verifier = verifier(&hs_config());
        for (alg, name) in [(Algorithm::HS384, "HS384"), (Algorithm::HS512, "HS512")] {
            let token = hmac_token(alg, SECRET, &claims());
            assert_eq!(
                verifier.verify(&token),
                Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
            );
        }
    }

    #[test]
    fn test_auth_rejects_other_rsa_and_ec_algorithms() {
        let config = AuthConfig {
            rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
            es256_public_keys: vec![EC_PUBLIC.to_vec()],
            ..AuthConfig::default()
        };
        let verifier = verifier(&config);
        let rsa = EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap();
        for (alg, name) in [
            (Algorithm::PS256, "PS256"),
            (Algorithm::RS384, "RS384"),
            (Algorithm::RS512, "RS512"),
        ] {
            let token = sign(alg, &rsa, &claims());
            assert_eq!(
                verifier.verify(&token),
                Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
            );
        }
        for name in ["ES384", "EdDSA", "HS1", ""] {
            let token = raw_token(&json!({ "alg": name }), &claims(), "AAAA");
            assert_eq!(
                verifier.verify(&token),
                Err(AuthError::UnsupportedAlgorithm(name.to_owned()))
            );
        }
    }

    #[test]
    fn test_auth_rejects_algorithm_without_configured_key() {
        let token = rs256(RSA_PRIVATE, &claims());
        assert_eq!(
            verifier(&hs_config()).verify(&token),
            Err(AuthError::UnsupportedAlgorithm("RS256".to_owned()))
        );
        let token = es256(EC_PRIVATE, &claims());
        assert_eq!(
            verifier(&rsa_config()).verify(&token),
            Err(AuthError::UnsupportedAlgorithm("ES256".to_owned()))
        );
    }

    #[test]
    fn test_auth_rejects_rs256_header_on_es256_signature() {
        // An ES256 signature relabelled RS256 must be checked as RS256, and fail.
        let config = AuthConfig {
            rs256_public_keys: vec![RSA_PUBLIC.to_vec()],
            es256_public_keys: vec![EC_PUBLIC.to_vec()],
            ..AuthConfig::default()
        };
        let token = es256(EC_PRIVATE, &claims());
        let sig = token.rsplit('.').next().unwrap();
        let relabelled = raw_token(&json!({ "alg": "RS256" }), &claims(), sig);
        assert_eq!(
            verifier(&config).verify(&relabelled),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_sanitizes_echoed_algorithm() {
        let alg = format!("x\n\u{1b}[31m{}", "A".repeat(100));
        let token = raw_token(&json!({ "alg": alg }), &claims(), "");
        let Err(AuthError::UnsupportedAlgorithm(shown)) = verifier(&hs_config()).verify(&token)
        else {
            panic!("expected an unsupported algorithm");
        };
        assert_eq!(shown.chars().count(), MAX_ECHOED_ALG_CHARS);
        assert!(shown.chars().all(|c| c.is_ascii_graphic()), "{shown}");
    }

    #[test]
    fn test_auth_checks_issuer_when_configured() {
        let config = AuthConfig {
            issuer: Some("https://issuer.example".to_owned()),
            ..hs_config()
        };
        let verifier = verifier(&config);
        let exp = now() + 600;
        let ok = hs256(&json!({ "sub": "a", "exp": exp, "iss": "https://issuer.example" }));
        assert!(verifier.verify(&ok).is_ok());
        let wrong = hs256(&json!({ "sub": "a", "exp": exp, "iss": "https://evil.example" }));
        assert_eq!(verifier.verify(&wrong), Err(AuthError::WrongIssuer));
        let missing = hs256(&json!({ "sub": "a", "exp": exp }));
        assert_eq!(
            verifier.verify(&missing),
            Err(AuthError::MissingClaim("iss"))
        );
    }

    #[test]
    fn test_auth_ignores_issuer_when_not_configured() {
        let token = hs256(&json!({ "sub": "a", "exp": now() + 600, "iss": "anyone" }));
        assert!(verifier(&hs_config()).verify(&token).is_ok());
    }

    #[test]
    fn test_auth_checks_audience_when_configured() {
        let config = AuthConfig {
            audience: Some("tandem".to_owned()),
            ..hs_config()
        };
        let verifier = verifier(&config);
        let exp = now() + 600;
        let ok = hs256(&json!({ "sub": "a", "exp": exp, "aud": "tandem" }));
        assert!(verifier.verify(&ok).is_ok());
        let ok_in_list = hs256(&json!({ "sub": "a", "exp": exp, "aud": ["other", "tandem"] }));
        assert!(verifier.verify(&ok_in_list).is_ok());
        let wrong = hs256(&json!({ "sub": "a", "exp": exp, "aud": "other" }));
        assert_eq!(verifier.verify(&wrong), Err(AuthError::WrongAudience));
        let wrong_list = hs256(&json!({ "sub": "a", "exp": exp, "aud": ["x", "y"] }));
        assert_eq!(verifier.verify(&wrong_list), Err(AuthError::WrongAudience));
        let missing = hs256(&json!({ "sub": "a", "exp": exp }));
        assert_eq!(
            verifier.verify(&missing),
            Err(AuthError::MissingClaim("aud"))
        );
    }

    #[test]
    fn test_auth_accepts_audience_when_not_configured() {
        let verifier = verifier(&hs_config());
        let exp = now() + 600;
        for aud in [json!("somebody"), json!(["a", "b"])] {
            let token = hs256(&json!({ "sub": "a", "exp": exp, "aud": aud }));
            assert!(verifier.verify(&token).is_ok());
        }
    }

    #[test]
    fn test_auth_rejects_missing_or_invalid_sub() {
        let verifier = verifier(&hs_config());
        let exp = now() + 600;
        let missing = hs256(&json!({ "exp": exp }));
        assert_eq!(
            verifier.verify(&missing),
            Err(AuthError::MissingClaim("sub"))
        );
        let null = hs256(&json!({ "sub": null, "exp": exp }));
        assert_eq!(verifier.verify(&null), Err(AuthError::MissingClaim("sub")));
        for sub in [
            json!(""),
            json!("x".repeat(MAX_SUBJECT_BYTES + 1)),
            json!("ali\u{0}ce"),
            json!("alice\n"),
            json!("\u{7f}"),
            json!("a\u{85}b"),
        ] {
            let token = hs256(&json!({ "sub": sub, "exp": exp }));
            assert_eq!(verifier.verify(&token), Err(AuthError::InvalidSubject));
        }
        for sub in [json!(42), json!(["alice"]), json!({ "id": "alice" })] {
            let token = hs256(&json!({ "sub": sub, "exp": exp }));
            assert!(verifier.verify(&token).is_err(), "{sub}");
        }
    }

    #[test]
    fn test_auth_accepts_sub_of_max_length_and_unicode() {
        let verifier = verifier(&hs_config());
        let exp = now() + 600;
        for sub in ["x".repeat(MAX_SUBJECT_BYTES), "zoë@example.com".to_owned()] {
            let token = hs256(&json!({ "sub": sub, "exp": exp }));
            assert_eq!(verifier.verify(&token).unwrap().sub, sub);
        }
    }

    #[test]
    fn test_auth_accepts_fractional_exp() {
        let exp = now() + 600;
        let token = hs256(&json!({ "sub": "alice", "exp": exp as f64 + 0.25 }));
        assert_eq!(
            verifier(&hs_config()).verify(&token).unwrap().expires_at,
            exp
        );
    }

    #[test]
    fn test_auth_rejects_garbage_tokens_as_malformed() {
        let verifier = verifier(&hs_config());
        let good = hs256(&claims());
        let mut parts = good.split('.');
        let (header, payload) = (parts.next().unwrap(), parts.next().unwrap());
        let oversized = format!("{header}.{}.sig", "A".repeat(MAX_TOKEN_BYTES));
        let garbage = [
            "".to_owned(),
            "abc".to_owned(),
            "a.b.c".to_owned(),
            "a.b".to_owned(),
            "..".to_owned(),
            "a.b.c.d".to_owned(),
            "é.é.é".to_owned(),
            "eyJhbGciOiJIUzI1NiJ9".to_owned(),
            format!("{header}.{payload}"),
            format!("{header}.{payload}.sig.extra"),
            format!("{header}=.{payload}.sig"),
            format!("{header}.{payload}.not*base64"),
            format!("{}.{payload}.sig", b64url(b"not json")),
            format!("{}.{payload}.sig", b64url(b"[\"HS256\"]")),
            format!("{}.{payload}.sig", b64url(b"{\"alg\":5}")),
            format!("{}.{payload}.sig", b64url(b"{\"typ\":\"JWT\"}")),
            format!(
                "{}.{payload}.sig",
                b64url(b"{\"alg\":\"HS256\",\"alg\":\"none\"}")
            ),
            oversized,
        ];
        for token in garbage {
            assert_eq!(
                verifier.verify(&token),
                Err(AuthError::Malformed),
                "{token}"
            );
        }
        // The signature is checked before the payload is even decoded.
        assert_eq!(
            verifier.verify(&format!("{header}.!!!.sig")),
            Err(AuthError::BadSignature)
        );
    }

    #[test]
    fn test_auth_rejects_signed_non_json_payload_as_malformed() {
        let header = b64url(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = b64url(b"not json");
        let message = format!("{header}.{payload}");
        let sig = jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(SECRET),
            Algorithm::HS256,
        )
        .unwrap();
        assert_eq!(
            verifier(&hs_config()).verify(&format!("{message}.{sig}")),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn test_auth_mint_round_trips_through_verify() {
        let config = AuthConfig {
            issuer: Some("tandem".to_owned()),
            audience: Some("tandem-clients".to_owned()),
            ..hs_config()
        };
        let before = now();
        let token = mint_hs256(
            SECRET,
            "alice",
            Duration::from_secs(3600),
            Some("tandem"),
            Some("tandem-clients"),
        )
        .unwrap();
        let identity = verifier(&config).verify(&token).unwrap();
        assert_eq!(identity.sub, "alice");
        assert!((before + 3600..=now() + 3600).contains(&identity.expires_at));

        let plain = mint_hs256(SECRET, "bob", Duration::from_secs(60), None, None).unwrap();
        assert_eq!(verifier(&hs_config()).verify(&plain).unwrap().sub, "bob");
        // Which of the two missing claims is named depends on jsonwebtoken's HashSet order.
        assert!(matches!(
            verifier(&config).verify(&plain),
            Err(AuthError::MissingClaim("iss" | "aud"))
        ));
    }

    #[test]
    fn test_auth_mint_rejects_bad_input() {
        let ttl = Duration::from_secs(60);
        assert_eq!(
            mint_hs256(b"short", "alice", ttl, None, None),
            Err(AuthError::WeakSecret { len: 5 })
        );
        assert_eq!(
            mint_hs256(SECRET, "", ttl, None, None),
            Err(AuthError::InvalidSubject)
        );
        assert_eq!(
            mint_hs256(SECRET, "alice", Duration::from_millis(500), None, None),
            Err(AuthError::InvalidTtl)
        );
        assert_eq!(
            mint_hs256(SECRET, "alice", Duration::MAX, None, None),
            Err(AuthError::InvalidTtl)
        );
    }

    #[test]
    fn test_auth_generated_secret_works_as_hs256_secret() {
        let secret = generate_secret();
        assert_eq!(secret.len(), 64);
        assert!(
            secret
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
        assert_ne!(secret, generate_secret());

        let config = AuthConfig {
            hs256_secret: Some(secret.clone().into_bytes()),
            ..AuthConfig::default()
        };
        let token =
            mint_hs256(secret.as_bytes(), "a", Duration::from_secs(60), None, None).unwrap();
        assert_eq!(verifier(&config).verify(&token).unwrap().sub, "a");
    }

    #[test]
    fn test_auth_new_rejects_short_secret() {
        let config = AuthConfig {
            hs256_secret: Some(vec![7; MIN_HS256_SECRET_BYTES - 1]),
            ..AuthConfig::default()
        };
        assert_eq!(
            Verifier::new(&config).unwrap_err(),
            AuthError::WeakSecret { len: 31 }
        );
        let config = AuthConfig {
            hs256_secret: Some(vec![7; MIN_HS256_SECRET_BYTES]),
            ..AuthConfig::default()
        };
        assert!(Verifier::new(&config).is_ok());
    }

    #[test]
    fn test_auth_new_rejects_no_keys() {
        assert_eq!(
            Verifier::new(&AuthConfig::default()).unwrap_err(),
            AuthError::NoKeys
        );
    }

    #[test]
    fn test_auth_new_rejects_large_leeway() {
        let config = AuthConfig {
            leeway_secs: MAX_LEEWAY_SECS + 1,
            ..hs_config()
        };
        assert_eq!(
            Verifier::new(&config).unwrap_err(),
            AuthError::InvalidLeeway(601)
        );
    }

    #[test]
    fn test_auth_new_rejects_unusable_rsa_keys() {
        for pem in [
            b"not a pem".as_slice(),
            b"",
            RSA_PRIVATE,
            EC_PUBLIC,
            RSA_1024_PUBLIC,
        ] {
            let config = AuthConfig {
                rs256_public_keys: vec![RSA_PUBLIC.to_vec(), pem.to_vec()],
                ..AuthConfig::default()
            };
            let err = Verifier::new(&config).unwrap_err();
            assert!(
                matches!(&err, AuthError::BadKey(msg) if msg.starts_with("rs256 public key 1:")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn test_auth_new_rejects_unusable_ec_keys() {
        for pem in [
            b"not a pem".as_slice(),
            EC_PRIVATE,
            RSA_PUBLIC,
            EC_P384_PUBLIC,
        ] {
            let config = AuthConfig {
                es256_public_keys: vec![pem.to_vec()],
                ..AuthConfig::default()
            };
            let err = Verifier::new(&config).unwrap_err();
            assert!(
                matches!(&err, AuthError::BadKey(msg) if msg.starts_with("es256 public key 0:")),
                "{err:?}"
            );
        }
    }

    #[test]
    fn test_auth_debug_does_not_print_secret() {
        let config = hs_config();
        let secret = String::from_utf8(SECRET.to_vec()).unwrap();
        let shown = format!("{config:?} {:?}", verifier(&config));
        assert!(!shown.contains(&secret), "{shown}");
        assert!(!shown.contains("48, 49, 50"), "{shown}");
        assert!(shown.contains("[redacted]"), "{shown}");
    }

    #[test]
    fn test_auth_error_messages_are_lowercase_without_period() {
        let errors = [
            AuthError::Malformed,
            AuthError::UnsupportedAlgorithm("none".to_owned()),
            AuthError::BadSignature,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::MissingClaim("exp"),
            AuthError::InvalidClaim("exp"),
            AuthError::InvalidSubject,
            AuthError::NoKeys,
            AuthError::BadKey("rs256 public key 0: not an rsa pem key".to_owned()),
            AuthError::WeakSecret { len: 3 },
            AuthError::InvalidLeeway(900),
            AuthError::InvalidTtl,
            AuthError::Signing("x".to_owned()),
        ];
        for err in errors {
            let msg = err.to_string();
            assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
            assert!(!msg.ends_with('.'), "{msg}");
        }
        assert_eq!(AuthError::Expired.code(), ErrorCode::Unauthorized);
        assert_eq!(AuthError::NoKeys.code(), ErrorCode::Internal);
    }

    #[test]
    fn test_auth_base64url_decoder_is_strict() {
        for len in 0..20 {
            let bytes = (0..len).map(|i| (i * 37 + 11) as u8).collect::<Vec<_>>();
            assert_eq!(base64url_decode(&b64url(&bytes)), Some(bytes));
        }
        assert_eq!(base64url_decode("-_8"), Some(vec![0xfb, 0xff]));
        assert_eq!(base64url_decode("AA"), Some(vec![0]));
        // Padding, whitespace, the standard alphabet, a lone sextet, and non-zero trailing
        // bits ("AB", "AAB") are all refused.
        for bad in ["A", "AA==", "A B", "AB+/", "AA/", "AB", "AAB", "é"] {
            assert_eq!(base64url_decode(bad), None, "{bad}");
        }
    }
}
