//! Verification: a bearer token in, an [`Identity`] out. The token's `iss` picks the issuer
//! whose keys are used (the default keys when no further issuer claims it), and its header's
//! `alg` picks among that issuer's keys of exactly that algorithm; a JWKS issuer's keys are
//! narrowed further by `kid`.

use super::jwks::{JwksCache, JwksStats};
use super::keys::{IssuerKeys, Keys};
use super::{AuthConfig, AuthError, IssuerConfig, JwksConfig};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use tandem_token::check_subject;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The longest token accepted, in bytes; anything longer is [`AuthError::Malformed`].
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How much of a client-sent `alg` is echoed back in [`AuthError::UnsupportedAlgorithm`].
pub(super) const MAX_ECHOED_ALG_CHARS: usize = 32;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub` (after its issuer's subject prefix, if one is configured):
    /// non-empty, at most [`MAX_SUBJECT_BYTES`](super::MAX_SUBJECT_BYTES), no control characters.
    pub sub: String,
    /// The token's `exp`, in unix seconds.
    pub expires_at: i64,
}

/// Verifies bearer tokens. Cheap to clone: the keys live behind an `Arc`, and clones share
/// the JWKS caches.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Keys>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = &*self.inner;
        let mut issuers: Vec<&IssuerKeys> = keys.issuers.values().collect();
        issuers.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        f.debug_struct("Verifier")
            .field("default", &keys.default)
            .field("issuers", &issuers)
            .field("leeway_secs", &keys.leeway_secs)
            .finish()
    }
}

impl Verifier {
    /// Parses and checks every key. Fails when there is no key at all, a PEM does not hold
    /// a usable public key of its kind (RSA keys must have at least 2048 bits, EC keys must
    /// be on P-256), the HS256 secret is too short, or the leeway is too large.
    pub fn new(config: &AuthConfig) -> Result<Verifier, AuthError> {
        Verifier::with_issuers(config, &[], &JwksConfig::default())
    }

    /// As [`new`](Self::new), with further issuers, each with its own keys and audience.
    /// `config` may then hold no key of its own. Also fails when an issuer is empty or named
    /// twice (the `config`'s issuer counts when it has keys), a JWKS URL is not `https://`
    /// (plain `http://` is allowed to loopback hosts only), a JWKS file cannot be read or holds
    /// no usable key, or `jwks` has a zero setting.
    ///
    /// Keys from a JWKS URL are loaded by the tasks [`spawn_refresh`](Self::spawn_refresh)
    /// starts; until their first fetch, tokens of that issuer are refused as
    /// [`AuthError::KeysNotLoaded`].
    pub fn with_issuers(
        config: &AuthConfig,
        issuers: &[IssuerConfig],
        jwks: &JwksConfig,
    ) -> Result<Verifier, AuthError> {
        Ok(Verifier {
            inner: Arc::new(Keys::load(config, issuers, jwks)?),
        })
    }

    /// Starts one task per JWKS issuer that fetches its keys now, then on schedule and on
    /// demand, until `shutdown` is cancelled. Needs a tokio runtime; spawns nothing when no
    /// issuer uses a JWKS.
    pub fn spawn_refresh(&self, shutdown: &CancellationToken) -> Vec<JoinHandle<()>> {
        self.caches()
            .map(|cache| tokio::spawn(Arc::clone(cache).run(shutdown.child_token())))
            .collect()
    }

    /// What each JWKS cache has done, by issuer.
    pub fn jwks_stats(&self) -> Vec<JwksStats> {
        let mut stats: Vec<JwksStats> = self.caches().map(|cache| cache.stats()).collect();
        stats.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        stats
    }

    fn caches(&self) -> impl Iterator<Item = &Arc<JwksCache>> {
        self.inner
            .issuers
            .values()
            .filter_map(|keys| keys.jwks.as_ref())
    }

    /// The clock leeway applied to `exp` and `nbf`, in seconds.
    pub fn leeway_secs(&self) -> u64 {
        self.inner.leeway_secs
    }

    /// Checks the token's signature with the keys of its issuer for the algorithm its header
    /// names, then its claims, and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let header = header(token)?;
        let keys = &*self.inner;
        let issuer_keys = if keys.issuers.is_empty() {
            keys.default.as_ref()
        } else {
            let iss = payload_issuer(token)?;
            match iss.as_deref().and_then(|iss| keys.issuers.get(iss)) {
                Some(issuer_keys) => Some(issuer_keys),
                None => match &keys.default {
                    Some(default) => Some(default),
                    None if iss.is_none() => return Err(AuthError::MissingClaim("iss")),
                    None => return Err(AuthError::WrongIssuer),
                },
            }
        };
        issuer_keys.ok_or(AuthError::NoKeys)?.verify(token, &header)
    }

    /// As [`verify`](Self::verify), but only with the keys of `issuer`, whose `iss` the token
    /// must carry: for callers that know which issuer a token claims to come from (a login
    /// provider). An issuer that is not configured is [`AuthError::WrongIssuer`].
    pub fn verify_issued_by(&self, token: &str, issuer: &str) -> Result<Identity, AuthError> {
        let header = header(token)?;
        let keys = &*self.inner;
        let issuer_keys = keys
            .issuers
            .get(issuer)
            .or_else(|| {
                keys.default
                    .as_ref()
                    .filter(|default| default.issuer.as_deref() == Some(issuer))
            })
            .ok_or(AuthError::WrongIssuer)?;
        issuer_keys.verify(token, &header)
    }
}

impl IssuerKeys {
    fn verify(&self, token: &str, header: &RawHeader) -> Result<Identity, AuthError> {
        let alg = header.alg.as_str();
        let (algorithm, fixed, validation): (Algorithm, &[DecodingKey], &Validation) = match alg {
            "HS256" => match &self.hs256 {
                Some(key) => (
                    Algorithm::HS256,
                    std::slice::from_ref(key),
                    &self.hs256_validation,
                ),
                None => return Err(unsupported_algorithm(alg)),
            },
            "RS256" if !self.rs256.is_empty() || self.jwks.is_some() => {
                (Algorithm::RS256, &self.rs256, &self.rs256_validation)
            }
            "ES256" if !self.es256.is_empty() || self.jwks.is_some() => {
                (Algorithm::ES256, &self.es256, &self.es256_validation)
            }
            _ => return Err(unsupported_algorithm(alg)),
        };
        let prefix = self.subject_prefix.as_deref();
        if let Some(outcome) = first_signer(fixed.iter(), token, validation, alg, prefix) {
            return outcome;
        }
        let Some(cache) = &self.jwks else {
            return Err(AuthError::BadSignature);
        };

        let set = cache.snapshot();
        let now = tokio::time::Instant::now();
        let kid = header.kid.as_deref();
        let candidates = || set.candidates(algorithm, kid, now);
        if let Some(outcome) = first_signer(
            candidates().map(|cached| &cached.jwk.key),
            token,
            validation,
            alg,
            prefix,
        ) {
            return outcome;
        }
        // A key listed under the token's own `kid` that does not verify it means a bad token,
        // not a stale cache; anything else may be a key published since the last fetch.
        let listed = kid.is_some() && candidates().any(|cached| cached.jwk.kid.as_deref() == kid);
        if listed {
            return Err(AuthError::BadSignature);
        }
        // Until the first fetch succeeds the refresh task is already retrying at the cooldown's
        // pace; asking would only spend the cooldown that a new `kid` may need next.
        if !set.loaded {
            return Err(AuthError::KeysNotLoaded);
        }
        cache.request_refresh();
        if kid.is_some() && candidates().next().is_none() {
            Err(AuthError::UnknownKeyId)
        } else {
            Err(AuthError::BadSignature)
        }
    }
}

/// The outcome with the first key that verifies the token's signature, or `None` when none
/// does.
fn first_signer<'a>(
    keys: impl Iterator<Item = &'a DecodingKey>,
    token: &str,
    validation: &Validation,
    alg: &str,
    subject_prefix: Option<&str>,
) -> Option<Result<Identity, AuthError>> {
    for key in keys {
        match jsonwebtoken::decode::<Claims>(token, key, validation) {
            Ok(data) => return Some(identity_from(data.claims, subject_prefix)),
            // The signature is checked before any claim, so this key is simply not the
            // signer; try the next one.
            Err(err) if matches!(err.kind(), ErrorKind::InvalidSignature) => continue,
            Err(err) => return Some(Err(map_error(err.kind(), alg))),
        }
    }
    None
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

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The payload member routing reads before any signature is checked.
#[derive(Deserialize)]
struct RawIssuer {
    #[serde(default)]
    iss: Option<serde_json::Value>,
}

fn identity_from(claims: Claims, subject_prefix: Option<&str>) -> Result<Identity, AuthError> {
    let sub = match claims.sub {
        Some(serde_json::Value::String(sub)) => sub,
        Some(_) => return Err(AuthError::InvalidSubject),
        None => return Err(AuthError::MissingClaim("sub")),
    };
    let sub = match subject_prefix {
        Some(prefix) => format!("{prefix}{sub}"),
        None => sub,
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

/// Reads `alg` and `kid` from the token's header, which only select keys: nothing in it is
/// trusted.
fn header(token: &str) -> Result<RawHeader, AuthError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    let (header, _) = parts(token)?;
    let json = base64url_decode(header).ok_or(AuthError::Malformed)?;
    serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)
}

/// Reads `iss` from the unverified payload, only to pick the keys to verify with; the
/// verification then checks it too.
fn payload_issuer(token: &str) -> Result<Option<String>, AuthError> {
    let (_, payload) = parts(token)?;
    let json = base64url_decode(payload).ok_or(AuthError::Malformed)?;
    let raw: RawIssuer = serde_json::from_slice(&json).map_err(|_| AuthError::Malformed)?;
    Ok(match raw.iss {
        Some(serde_json::Value::String(iss)) => Some(iss),
        _ => None,
    })
}

/// The header and payload of a compact JWS.
fn parts(token: &str) -> Result<(&str, &str), AuthError> {
    let mut parts = token.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(header), Some(payload), Some(_signature), None) => Ok((header, payload)),
        _ => Err(AuthError::Malformed),
    }
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

/// Unpadded base64url, strict: no padding, no whitespace, no stray trailing bits (what
/// `URL_SAFE_NO_PAD` refuses by default).
pub(super) fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(input).ok()
}
