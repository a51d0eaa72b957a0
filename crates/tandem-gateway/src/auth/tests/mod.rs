//! Unit tests of authentication against fixed key fixtures (`tests/fixtures`), and the
//! helpers that sign tokens for them.

use super::verify::{MAX_ECHOED_ALG_CHARS, base64url_decode};
use super::*;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::json;
use std::time::Duration;
use tandem_protocol::ErrorCode;

mod error;
mod issuers;
mod jwks;
mod jwks_http;
mod keys;
mod mint;
mod verify;

const RSA_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/rsa_public.pem");
const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/rsa_other_private.pem");
const RSA_OTHER_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/rsa_other_public.pem");
const RSA_1024_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/rsa_1024_public.pem");
const EC_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/ec_private.pem");
const EC_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/ec_public.pem");
const EC_OTHER_PRIVATE: &[u8] = include_bytes!("../../../tests/fixtures/ec_other_private.pem");
const EC_OTHER_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/ec_other_public.pem");
const EC_P384_PUBLIC: &[u8] = include_bytes!("../../../tests/fixtures/ec_p384_public.pem");

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
    URL_SAFE_NO_PAD.encode(bytes)
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

/// A token whose header carries `kid`.
fn sign_kid(alg: Algorithm, key: &EncodingKey, kid: &str, claims: &serde_json::Value) -> String {
    let header = Header {
        kid: Some(kid.to_owned()),
        ..Header::new(alg)
    };
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

/// An RS256 token with `kid`, signed with a PEM private key.
fn rs256_kid(private_pem: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_rsa_pem(private_pem).unwrap();
    sign_kid(Algorithm::RS256, &key, kid, claims)
}

/// An ES256 token with `kid`, signed with a PEM private key.
fn es256_kid(private_pem: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    let key = EncodingKey::from_ec_pem(private_pem).unwrap();
    sign_kid(Algorithm::ES256, &key, kid, claims)
}

/// The JWK of an RSA public key PEM: `n` and `e` read back from the key.
fn rsa_jwk(public_pem: &[u8], kid: &str) -> serde_json::Value {
    let key = DecodingKey::from_rsa_pem(public_pem).unwrap();
    let der = key.try_get_as_bytes().unwrap();
    let (n, e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
        .key_utils
        .rsa_pub_components_from_public_key)(der)
    .unwrap();
    json!({ "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": b64url(&n), "e": b64url(&e) })
}

/// The JWK of a P-256 public key PEM: `x` and `y` from its uncompressed point.
fn ec_jwk(public_pem: &[u8], kid: &str) -> serde_json::Value {
    let key = DecodingKey::from_ec_pem(public_pem).unwrap();
    let point = key.try_get_as_bytes().unwrap();
    assert_eq!(
        (point.len(), point[0]),
        (65, 4),
        "an uncompressed p-256 point"
    );
    json!({
        "kty": "EC", "kid": kid, "crv": "P-256",
        "x": b64url(&point[1..33]), "y": b64url(&point[33..65]),
    })
}

fn jwks_doc(keys: &[serde_json::Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// Claims for a token from `issuer`, valid for ten minutes.
fn claims_from(issuer: &str) -> serde_json::Value {
    json!({ "sub": "alice", "exp": now() + 600, "iss": issuer })
}

/// Polls until `done` holds, with a deadline; under paused time each pause advances the clock
/// by 10 ms only.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("gave up waiting for {what}");
}
