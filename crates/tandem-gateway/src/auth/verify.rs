//! Verification: a bearer token in, an [`Identity`] out, with the keys of exactly the
//! algorithm the token's header names.

use super::keys::Keys;
use super::{AuthConfig, AuthError};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;
use tandem_token::check_subject;

/// The longest token accepted, in bytes; anything longer is [`AuthError::Malformed`].
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How much of a client-sent `alg` is echoed back in [`AuthError::UnsupportedAlgorithm`].
pub(super) const MAX_ECHOED_ALG_CHARS: usize = 32;

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`: non-empty, at most [`MAX_SUBJECT_BYTES`](super::MAX_SUBJECT_BYTES), no control characters.
    pub sub: String,
    /// The token's `exp`, in unix seconds.
    pub expires_at: i64,
}

/// Verifies bearer tokens. Cheap to clone: the keys live behind an `Arc`.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Keys>,
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
        Ok(Verifier {
            inner: Arc::new(Keys::load(config)?),
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

/// Unpadded base64url, strict: no padding, no whitespace, no stray trailing bits (what
/// `URL_SAFE_NO_PAD` refuses by default).
pub(super) fn base64url_decode(input: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(input).ok()
}
