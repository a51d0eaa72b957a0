//! Stateless temporary credentials (COGNITO.md §3). Nothing is stored: the session token
//! carries the identity and its expiry under a MAC, and the secret access key is a MAC of
//! the access key id, so every node that shares the deployment's secret can verify
//! credentials another node issued.
//!
//! All keys come from one shared secret through HKDF-SHA256, each under its own label, so a
//! value made with one key can never stand in for another (a session token's MAC is not a
//! secret key, and a later SyncSessionToken key will not verify either).

use crate::error::{CognitoError, ErrorType};
use crate::sigv4::{KeyQuery, hmac};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hkdf::Hkdf;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;

/// How long issued credentials live.
pub const CREDENTIAL_LIFETIME: Duration = Duration::from_secs(3600);
/// HKDF label of the key that makes secret access keys.
pub const LABEL_SECRET_KEY: &str = "tandem-cognito secret-key v1";
/// HKDF label of the key that seals session tokens.
pub const LABEL_SESSION_TOKEN: &str = "tandem-cognito session-token v1";

const TOKEN_VERSION: u32 = 1;
const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const INVALID_TOKEN: &str = "The security token included in the request is invalid.";
const EXPIRED_TOKEN: &str = "The security token included in the request is expired";

/// A 32-byte key derived from the shared secret under `label`.
pub fn derive_key(shared_secret: &[u8], label: &str) -> [u8; 32] {
    let mut key = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte output limit, so expand cannot fail.
    if Hkdf::<Sha256>::new(None, shared_secret)
        .expand(label.as_bytes(), &mut key)
        .is_err()
    {
        unreachable!("32 bytes is a valid HKDF-SHA256 output length");
    }
    key
}

/// Temporary credentials, as GetCredentialsForIdentity answers them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `ASIA` + 16 characters of `[A-Z2-7]`.
    pub access_key_id: String,
    /// base64url(HMAC(K_secret, access key id)).
    pub secret_key: String,
    /// base64url(payload).base64url(HMAC(K_cred, payload)).
    pub session_token: String,
    /// When the credentials stop working.
    pub expiration: SystemTime,
}

/// What a valid session token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    /// The identity pool id.
    pub pool: String,
    /// The identity the credentials were issued to.
    pub identity_id: String,
    /// When the token expires.
    pub expiration: SystemTime,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    v: u32,
    akid: String,
    pool: String,
    #[serde(rename = "identityId")]
    identity_id: String,
    exp: u64,
}

/// The keys that issue and verify credentials.
#[derive(Clone)]
pub struct CredentialKeys {
    secret_key: [u8; 32],
    session_token: [u8; 32],
}

impl std::fmt::Debug for CredentialKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialKeys(..)")
    }
}

impl CredentialKeys {
    /// The keys derived from the deployment's shared secret.
    pub fn derive(shared_secret: &[u8]) -> Self {
        Self {
            secret_key: derive_key(shared_secret, LABEL_SECRET_KEY),
            session_token: derive_key(shared_secret, LABEL_SESSION_TOKEN),
        }
    }

    /// New credentials for `identity_id` of `pool`, valid for [`CREDENTIAL_LIFETIME`].
    pub fn issue(&self, identity_id: &str, pool: &str, now: SystemTime) -> Credentials {
        let access_key_id = new_access_key_id();
        let expiration = now + CREDENTIAL_LIFETIME;
        let payload = Payload {
            v: TOKEN_VERSION,
            akid: access_key_id.clone(),
            pool: pool.to_owned(),
            identity_id: identity_id.to_owned(),
            exp: epoch_secs(expiration),
        };
        // A struct of strings and integers always serialises.
        let payload = serde_json::to_vec(&payload).unwrap_or_default();
        let mac = hmac(&self.session_token, &payload);
        Credentials {
            secret_key: self.secret_key(&access_key_id),
            session_token: format!(
                "{}.{}",
                URL_SAFE_NO_PAD.encode(&payload),
                URL_SAFE_NO_PAD.encode(mac)
            ),
            access_key_id,
            expiration,
        }
    }

    /// The secret access key of `access_key_id`.
    pub fn secret_key(&self, access_key_id: &str) -> String {
        URL_SAFE_NO_PAD.encode(hmac(&self.secret_key, access_key_id.as_bytes()))
    }

    /// Checks `session_token` sent with `access_key_id` at `now`: a bad MAC, a malformed
    /// token or another key's token is `UnrecognizedClientException`; a token past its
    /// expiry is `ExpiredTokenException`.
    pub fn verify(
        &self,
        session_token: &str,
        access_key_id: &str,
        now: SystemTime,
    ) -> Result<SessionClaims, CognitoError> {
        let unrecognized = || CognitoError::new(ErrorType::UnrecognizedClient, INVALID_TOKEN);
        let (payload, mac) = session_token.split_once('.').ok_or_else(unrecognized)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| unrecognized())?;
        let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| unrecognized())?;
        let expected = hmac(&self.session_token, &payload);
        if !bool::from(expected.as_slice().ct_eq(&mac)) {
            return Err(unrecognized());
        }
        let payload: Payload = serde_json::from_slice(&payload).map_err(|_| unrecognized())?;
        if payload.v != TOKEN_VERSION || payload.akid != access_key_id {
            return Err(unrecognized());
        }
        if epoch_secs(now) >= payload.exp {
            return Err(CognitoError::new(ErrorType::ExpiredToken, EXPIRED_TOKEN));
        }
        Ok(SessionClaims {
            pool: payload.pool,
            identity_id: payload.identity_id,
            expiration: UNIX_EPOCH + Duration::from_secs(payload.exp),
        })
    }

    /// A lookup for [`crate::sigv4::verify`]: the key must come with a valid session token,
    /// and answers with the key's secret and the token's claims.
    pub fn lookup(
        &self,
        query: KeyQuery<'_>,
        now: SystemTime,
    ) -> Result<(String, SessionClaims), CognitoError> {
        let token = query
            .session_token
            .ok_or_else(|| CognitoError::new(ErrorType::UnrecognizedClient, INVALID_TOKEN))?;
        let claims = self.verify(token, query.access_key_id, now)?;
        Ok((self.secret_key(query.access_key_id), claims))
    }
}

/// `ASIA` + 16 random characters of `[A-Z2-7]` (80 bits), the shape of an AWS temporary key.
fn new_access_key_id() -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let mut id = String::with_capacity(20);
    id.push_str("ASIA");
    for b in bytes {
        id.push(char::from(BASE32[usize::from(b & 31)]));
    }
    id
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> CredentialKeys {
        CredentialKeys::derive(b"a shared secret of at least thirty-two bytes")
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
    const ID: &str = "us-east-1:abc12345-6789-4def-8123-456789abcdef";

    #[test]
    fn test_credentials_round_trip() {
        let keys = keys();
        let creds = keys.issue(ID, POOL, at(1_000_000));
        assert_eq!(creds.expiration, at(1_003_600));
        let claims = keys
            .verify(&creds.session_token, &creds.access_key_id, at(1_003_599))
            .unwrap();
        assert_eq!(claims.identity_id, ID);
        assert_eq!(claims.pool, POOL);
        assert_eq!(claims.expiration, at(1_003_600));
        assert_eq!(creds.secret_key, keys.secret_key(&creds.access_key_id));
    }

    #[test]
    fn test_credentials_verify_on_another_node_with_the_same_secret() {
        let creds = keys().issue(ID, POOL, at(1_000_000));
        let other_node = keys();
        assert!(
            other_node
                .verify(&creds.session_token, &creds.access_key_id, at(1_000_001))
                .is_ok()
        );
        assert_eq!(
            other_node.secret_key(&creds.access_key_id),
            creds.secret_key
        );
        let other_deployment =
            CredentialKeys::derive(b"another secret, also thirty-two bytes long");
        assert_ne!(
            other_deployment.secret_key(&creds.access_key_id),
            creds.secret_key
        );
        let err = other_deployment
            .verify(&creds.session_token, &creds.access_key_id, at(1_000_001))
            .unwrap_err();
        assert_eq!(err.error_type, ErrorType::UnrecognizedClient);
    }

    #[test]
    fn test_credentials_access_key_id_shape() {
        let creds = keys().issue(ID, POOL, at(1_000_000));
        let id = &creds.access_key_id;
        assert_eq!(id.len(), 20);
        assert!(id.starts_with("ASIA"));
        assert!(id[4..].bytes().all(|b| BASE32.contains(&b)));
        assert_ne!(keys().issue(ID, POOL, at(1_000_000)).access_key_id, *id);
        let token_alphabet = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        };
        assert!(token_alphabet(&creds.session_token));
        assert!(token_alphabet(&creds.secret_key));
    }

    #[test]
    fn test_credentials_expired_token_is_expired_token_exception() {
        let keys = keys();
        let creds = keys.issue(ID, POOL, at(1_000_000));
        let err = keys
            .verify(&creds.session_token, &creds.access_key_id, at(1_003_600))
            .unwrap_err();
        assert_eq!(err.error_type, ErrorType::ExpiredToken);
        assert_eq!(err.render().error_type, "ExpiredTokenException");
    }

    #[test]
    fn test_credentials_token_of_another_key_is_unrecognized() {
        let keys = keys();
        let a = keys.issue(ID, POOL, at(1_000_000));
        let b = keys.issue(ID, POOL, at(1_000_000));
        let err = keys
            .verify(&a.session_token, &b.access_key_id, at(1_000_001))
            .unwrap_err();
        assert_eq!(err.error_type, ErrorType::UnrecognizedClient);
        assert_eq!(err.message, INVALID_TOKEN);
    }

    #[test]
    fn test_credentials_tampered_token_is_unrecognized() {
        let keys = keys();
        let creds = keys.issue(ID, POOL, at(1_000_000));
        let (payload, mac) = creds.session_token.split_once('.').unwrap();
        // Another identity under the old MAC.
        let forged_payload = String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
            .unwrap()
            .replace("abc12345", "fff12345");
        let forged = format!("{}.{mac}", URL_SAFE_NO_PAD.encode(forged_payload));
        // One flipped bit of the MAC.
        let mut flipped_mac = URL_SAFE_NO_PAD.decode(mac).unwrap();
        flipped_mac[0] ^= 1;
        let cases = [
            forged,
            format!("{payload}.{}", URL_SAFE_NO_PAD.encode(flipped_mac)),
            format!("{payload}.{}", &mac[..mac.len() - 2]),
            payload.to_owned(),
            String::new(),
            "not base64!.x".to_owned(),
            format!("{payload}.{mac}.extra"),
        ];
        for token in cases {
            let err = keys
                .verify(&token, &creds.access_key_id, at(1_000_001))
                .unwrap_err();
            assert_eq!(err.error_type, ErrorType::UnrecognizedClient, "{token}");
        }
    }

    #[test]
    fn test_credentials_lookup_requires_a_session_token() {
        let keys = keys();
        let creds = keys.issue(ID, POOL, at(1_000_000));
        let query = KeyQuery {
            access_key_id: &creds.access_key_id,
            session_token: None,
        };
        let err = keys.lookup(query, at(1_000_001)).unwrap_err();
        assert_eq!(err.error_type, ErrorType::UnrecognizedClient);
        let query = KeyQuery {
            access_key_id: &creds.access_key_id,
            session_token: Some(&creds.session_token),
        };
        let (secret, claims) = keys.lookup(query, at(1_000_001)).unwrap();
        assert_eq!(secret, creds.secret_key);
        assert_eq!(claims.identity_id, ID);
    }

    #[test]
    fn test_derive_key_labels_give_distinct_keys() {
        let secret = b"a shared secret of at least thirty-two bytes";
        assert_ne!(
            derive_key(secret, LABEL_SECRET_KEY),
            derive_key(secret, LABEL_SESSION_TOKEN)
        );
        assert_eq!(
            derive_key(secret, LABEL_SECRET_KEY),
            derive_key(secret, LABEL_SECRET_KEY)
        );
    }
}
