//! Tandem's HS256 tokens as an issuer makes them: [`mint_hs256`] signs a token for a user,
//! [`generate_secret`] makes a secret for a server that has none, and the rules every
//! token's secret and subject must meet ([`check_secret`], [`check_subject`]), which the
//! gateway's verifier applies too. An app backend, the `tandem token` command, the dev
//! token endpoint and the load generator all mint here.
//!
//! It verifies nothing (that is the gateway's `Verifier`) and depends on no server crate, so
//! a client-side program can mint without pulling in the gateway.

use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore;
use serde::Serialize;
use std::sync::Once;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The shortest HS256 secret accepted, in bytes.
pub const MIN_HS256_SECRET_BYTES: usize = 32;
/// The longest `sub` accepted, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 256;

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The HS256 secret is shorter than [`MIN_HS256_SECRET_BYTES`].
    #[error("hs256 secret is {len} bytes, at least 32 are required")]
    WeakSecret { len: usize },
    /// `sub` is empty, longer than [`MAX_SUBJECT_BYTES`], or contains control characters.
    #[error(
        "token subject must be a non-empty string of at most 256 bytes without control characters"
    )]
    InvalidSubject,
    /// A token lifetime of zero, or one that overflows a unix timestamp.
    #[error("token lifetime must be at least 1 s and end before the year 292277026596")]
    InvalidTtl,
    /// Signing a token failed.
    #[error("failed to sign token: {0}")]
    Signing(String),
}

/// Signs an HS256 token for `sub` with `iat` = now and `exp` = now + `ttl` (whole seconds),
/// plus `iss` and `aud` when given. The secret and `sub` must pass [`check_secret`] and
/// [`check_subject`], the checks the gateway's verifier applies too.
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    ttl: Duration,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<String, TokenError> {
    ensure_crypto_provider();
    check_secret(secret)?;
    check_subject(sub)?;

    let now = unix_now();
    let exp = now
        .checked_add(ttl.as_secs())
        .filter(|exp| ttl.as_secs() > 0 && i64::try_from(*exp).is_ok())
        .ok_or(TokenError::InvalidTtl)?;
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
    .map_err(|err| TokenError::Signing(err.to_string()))
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
/// that; if someone else installed a provider first, theirs stays. Call it before any use of
/// jsonwebtoken (minting here does, and so does the gateway's verifier).
pub fn ensure_crypto_provider() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let _already_installed = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);
    });
}

/// An HS256 secret must be at least [`MIN_HS256_SECRET_BYTES`] long.
pub fn check_secret(secret: &[u8]) -> Result<(), TokenError> {
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(TokenError::WeakSecret { len: secret.len() });
    }
    Ok(())
}

/// A `sub` must be non-empty, at most [`MAX_SUBJECT_BYTES`] long, and free of control
/// characters.
pub fn check_subject(sub: &str) -> Result<(), TokenError> {
    if sub.is_empty() || sub.len() > MAX_SUBJECT_BYTES || sub.chars().any(char::is_control) {
        return Err(TokenError::InvalidSubject);
    }
    Ok(())
}

/// The claims a minted token carries.
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

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

    #[test]
    fn test_auth_mint_rejects_bad_input() {
        let ttl = Duration::from_secs(60);
        assert_eq!(
            mint_hs256(b"short", "alice", ttl, None, None),
            Err(TokenError::WeakSecret { len: 5 })
        );
        assert_eq!(
            mint_hs256(SECRET, "", ttl, None, None),
            Err(TokenError::InvalidSubject)
        );
        assert_eq!(
            mint_hs256(SECRET, "alice", Duration::from_millis(500), None, None),
            Err(TokenError::InvalidTtl)
        );
        assert_eq!(
            mint_hs256(SECRET, "alice", Duration::MAX, None, None),
            Err(TokenError::InvalidTtl)
        );
    }
}
