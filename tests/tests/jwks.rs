//! `tandem serve` with an issuer whose keys come from a JWKS (here a file, read again when
//! a token names a key it does not have): tokens of the issuer verify against the current
//! document, a rotated key is picked up without a restart, other issuers' tokens are refused.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::json;
use std::path::Path;
use std::time::Duration;
use tandem_client::Connection;
use tandem_tests::{TestServer, fixture, now_secs};

const ISSUER: &str = "https://idp.example";

fn pem(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

/// The JWK of an RSA public key PEM: `n` and `e` read back from the key.
fn rsa_jwk(public_pem: &[u8], kid: &str) -> serde_json::Value {
    let key = DecodingKey::from_rsa_pem(public_pem).unwrap();
    let der = key.try_get_as_bytes().unwrap();
    let (n, e) = (jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER
        .key_utils
        .rsa_pub_components_from_public_key)(der)
    .unwrap();
    json!({ "kty": "RSA", "kid": kid, "alg": "RS256", "n": URL_SAFE_NO_PAD.encode(n), "e": URL_SAFE_NO_PAD.encode(e) })
}

fn write_jwks(path: &Path, keys: &[serde_json::Value]) {
    // Written aside and renamed, so the server never reads half a document.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "keys": keys }).to_string()).unwrap();
    std::fs::rename(tmp, path).unwrap();
}

fn token(private_pem: &str, kid: &str, issuer: &str, sub: &str) -> String {
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
    );
    let header = Header {
        kid: Some(kid.to_owned()),
        ..Header::new(Algorithm::RS256)
    };
    let claims = json!({ "sub": sub, "iss": issuer, "exp": now_secs() + 600 });
    let key = EncodingKey::from_rsa_pem(&pem(private_pem)).unwrap();
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

#[tokio::test]
async fn test_jwks_file_issuer_verifies_and_picks_up_a_rotated_key() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[rsa_jwk(&pem("rsa_public.pem"), "a")]);
    let server = TestServer::builder()
        .without_secret()
        .arg("--jwt-jwks-file", jwks.display())
        .arg("--jwt-issuer", ISSUER)
        .arg("--jwt-jwks-unknown-kid-cooldown", "200ms")
        .start();

    let a = token("rsa_private.pem", "a", ISSUER, "alice");
    Connection::connect(&server.url(), &a).await.unwrap();
    // The issuer's key, but another issuer's name: not this issuer's token.
    let foreign = token("rsa_private.pem", "a", "https://other.example", "alice");
    assert!(Connection::connect(&server.url(), &foreign).await.is_err());

    // The provider rotates to key b; a token with it verifies once the document is re-read.
    write_jwks(&jwks, &[rsa_jwk(&pem("rsa_other_public.pem"), "b")]);
    let b = token("rsa_other_private.pem", "b", ISSUER, "bob");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while Connection::connect(&server.url(), &b).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "key b was never picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn test_jwks_flag_needs_an_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[rsa_jwk(&pem("rsa_public.pem"), "a")]);
    let out = std::process::Command::new(tandem_tests::tandem_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--jwt-jwks-file")
        .arg(&jwks)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--jwt-issuer"), "{stderr}");
}
