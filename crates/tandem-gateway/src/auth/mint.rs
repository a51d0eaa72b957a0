//! Issuing tokens: HS256 tokens signed with the shared secret, and the secret itself for a
//! server that has none configured.

use super::AuthError;
use super::keys::{check_secret, ensure_crypto_provider};
use super::verify::check_subject;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
