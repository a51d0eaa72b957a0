//! Keys from a JWKS document in a file: selection by `kid`, which entries are used, the
//! bounds, and (under paused time) refresh on an unknown `kid` with its cooldown, the
//! schedule, and retired keys ageing out. The refresh logic is the same for a URL; the HTTP
//! side is in `jwks_http`.

use super::*;
use std::path::Path;
use tokio_util::sync::CancellationToken;

const ISSUER: &str = "https://idp.example";

fn file_issuer(path: &Path) -> IssuerConfig {
    IssuerConfig {
        issuer: ISSUER.to_owned(),
        keys: KeySource::JwksFile(path.to_owned()),
        audience: None,
        subject_prefix: None,
    }
}

/// A verifier over a JWKS file holding `keys`, with the file's path.
fn file_verifier(
    dir: &tempfile::TempDir,
    keys: &[serde_json::Value],
    jwks: &JwksConfig,
) -> Result<(Verifier, std::path::PathBuf), AuthError> {
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, jwks_doc(keys)).unwrap();
    let verifier = Verifier::with_issuers(&AuthConfig::default(), &[file_issuer(&path)], jwks)?;
    Ok((verifier, path))
}

/// A verifier over a JWKS file holding key A, its refresh task started and its first fetch
/// done; the file can then be rewritten to rotate keys.
struct Running {
    verifier: Verifier,
    path: std::path::PathBuf,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Running {
    async fn start(jwks: &JwksConfig) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let (verifier, path) = file_verifier(&dir, &[rsa_jwk(RSA_PUBLIC, "a")], jwks).unwrap();
        let shutdown = CancellationToken::new();
        let tasks = verifier.spawn_refresh(&shutdown);
        until("the first fetch", || stats(&verifier).fetches == 1).await;
        Running {
            verifier,
            path,
            shutdown,
            tasks,
            _dir: dir,
        }
    }

    fn publish(&self, keys: &[serde_json::Value]) {
        std::fs::write(&self.path, jwks_doc(keys)).unwrap();
    }

    fn stats(&self) -> JwksStats {
        stats(&self.verifier)
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.unwrap();
        }
    }
}

fn stats(verifier: &Verifier) -> JwksStats {
    verifier.jwks_stats().remove(0)
}

fn token_a() -> String {
    rs256_kid(RSA_PRIVATE, "a", &claims_from(ISSUER))
}

fn token_b() -> String {
    rs256_kid(RSA_OTHER_PRIVATE, "b", &claims_from(ISSUER))
}

#[test]
fn test_auth_jwks_file_keys_are_picked_by_kid_and_algorithm() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [rsa_jwk(RSA_PUBLIC, "a"), ec_jwk(EC_PUBLIC, "e")];
    let (verifier, _) = file_verifier(&dir, &keys, &JwksConfig::default()).unwrap();

    assert_eq!(verifier.verify(&token_a()).unwrap().sub, "alice");
    let token = es256_kid(EC_PRIVATE, "e", &claims_from(ISSUER));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    // Without `kid`, every key of the algorithm is tried.
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");

    // A listed key that does not verify the token is a bad signature, not a stale cache.
    let forged = rs256_kid(RSA_OTHER_PRIVATE, "a", &claims_from(ISSUER));
    assert_eq!(verifier.verify(&forged), Err(AuthError::BadSignature));
    // `kid` only narrows the keys of the token's own algorithm.
    let token = rs256_kid(RSA_PRIVATE, "e", &claims_from(ISSUER));
    assert_eq!(verifier.verify(&token), Err(AuthError::UnknownKeyId));
    assert_eq!(verifier.verify(&token_b()), Err(AuthError::UnknownKeyId));
    assert_eq!(AuthError::UnknownKeyId.code(), ErrorCode::Unauthorized);

    // Pinned algorithms hold for JWKS issuers too.
    let token = hmac_token(Algorithm::HS256, RSA_PUBLIC, &claims_from(ISSUER));
    assert_eq!(
        verifier.verify(&token),
        Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
    );
    let none = raw_token(
        &json!({ "alg": "none", "kid": "a" }),
        &claims_from(ISSUER),
        "",
    );
    assert_eq!(
        verifier.verify(&none),
        Err(AuthError::UnsupportedAlgorithm("none".to_owned()))
    );
    let token = hmac_token(Algorithm::HS384, SECRET, &claims_from(ISSUER));
    assert_eq!(
        verifier.verify(&token),
        Err(AuthError::UnsupportedAlgorithm("HS384".to_owned()))
    );
}

#[test]
fn test_auth_jwks_document_skips_entries_that_are_not_signing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut encryption = rsa_jwk(RSA_OTHER_PUBLIC, "b");
    encryption["use"] = json!("enc");
    let mut rs384 = rsa_jwk(RSA_OTHER_PUBLIC, "b");
    rs384["alg"] = json!("RS384");
    let mut verify_only_ops = rsa_jwk(RSA_OTHER_PUBLIC, "b");
    verify_only_ops["key_ops"] = json!(["encrypt"]);
    let p384 = DecodingKey::from_ec_pem(EC_P384_PUBLIC).unwrap();
    let p384_point = p384.try_get_as_bytes().unwrap();
    let keys = [
        json!({ "kty": "oct", "kid": "b", "k": b64url(SECRET) }),
        rsa_jwk(RSA_1024_PUBLIC, "b"),
        json!({ "kty": "EC", "kid": "b", "crv": "P-384",
                "x": b64url(&p384_point[1..49]), "y": b64url(&p384_point[49..]) }),
        json!({ "kty": "RSA", "kid": "b", "n": "!!", "e": "AQAB" }),
        json!("not an object"),
        encryption,
        rs384,
        verify_only_ops,
        rsa_jwk(RSA_PUBLIC, "a"),
    ];
    let (verifier, _) = file_verifier(&dir, &keys, &JwksConfig::default()).unwrap();
    assert_eq!(stats(&verifier).keys, 1);
    assert_eq!(verifier.verify(&token_a()).unwrap().sub, "alice");
    assert_eq!(verifier.verify(&token_b()), Err(AuthError::UnknownKeyId));
}

#[test]
fn test_auth_jwks_document_bounds_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let keys = [rsa_jwk(RSA_PUBLIC, "a"), rsa_jwk(RSA_OTHER_PUBLIC, "b")];
    let size = jwks_doc(&keys).len();

    let at_limit = JwksConfig {
        max_document_bytes: size,
        max_keys: 2,
        ..JwksConfig::default()
    };
    assert!(file_verifier(&dir, &keys, &at_limit).is_ok());

    let small = JwksConfig {
        max_document_bytes: size - 1,
        ..JwksConfig::default()
    };
    let err = file_verifier(&dir, &keys, &small).unwrap_err();
    assert!(
        matches!(&err, AuthError::BadIssuerConfig(msg) if msg.contains("larger than max_document_bytes")),
        "{err:?}"
    );
    let few = JwksConfig {
        max_keys: 1,
        ..JwksConfig::default()
    };
    let err = file_verifier(&dir, &keys, &few).unwrap_err();
    assert!(
        matches!(&err, AuthError::BadIssuerConfig(msg) if msg.contains("more than max_keys 1")),
        "{err:?}"
    );
    let path = dir.path().join("broken.json");
    std::fs::write(&path, "{\"keys\": 5}").unwrap();
    let err = Verifier::with_issuers(
        &AuthConfig::default(),
        &[file_issuer(&path)],
        &JwksConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, AuthError::BadIssuerConfig(msg) if msg.contains("not a jwks document")),
        "{err:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn test_auth_jwks_unknown_kid_refreshes_at_most_once_per_cooldown() {
    let cooldown = Duration::from_secs(30);
    let jwks = JwksConfig {
        unknown_kid_cooldown: cooldown,
        ..JwksConfig::default()
    };
    let running = Running::start(&jwks).await;
    let verifier = &running.verifier;

    // Key B is published; the first token signed with it is refused and asks for a refresh.
    let rotated = [rsa_jwk(RSA_PUBLIC, "a"), rsa_jwk(RSA_OTHER_PUBLIC, "b")];
    running.publish(&rotated);
    assert_eq!(verifier.verify(&token_b()), Err(AuthError::UnknownKeyId));
    until("key b", || verifier.verify(&token_b()).is_ok()).await;
    assert_eq!(running.stats().fetches, 2);

    // A flood of unknown kids within the cooldown is refused without another fetch.
    for n in 0..20 {
        let token = es256_kid(EC_PRIVATE, &format!("unknown-{n}"), &claims_from(ISSUER));
        assert_eq!(verifier.verify(&token), Err(AuthError::UnknownKeyId));
    }
    tokio::task::yield_now().await;
    let after_flood = running.stats();
    assert_eq!(
        (after_flood.refresh_requests, after_flood.fetches),
        (1, 2),
        "{after_flood:?}"
    );

    // Once the cooldown has passed, an unknown kid may ask again.
    tokio::time::advance(cooldown).await;
    let token = rs256_kid(RSA_PRIVATE, "unknown", &claims_from(ISSUER));
    assert_eq!(verifier.verify(&token), Err(AuthError::UnknownKeyId));
    until("the second refresh", || running.stats().fetches == 3).await;
    assert_eq!(running.stats().refresh_requests, 2);

    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn test_auth_jwks_retired_key_is_accepted_until_it_ages_out() {
    let ttl = Duration::from_secs(300);
    let jwks = JwksConfig {
        retired_key_ttl: ttl,
        ..JwksConfig::default()
    };
    let running = Running::start(&jwks).await;
    let verifier = &running.verifier;

    // The document switches from A to B: A leaves it but stays usable for the ttl.
    running.publish(&[rsa_jwk(RSA_OTHER_PUBLIC, "b")]);
    until("key b", || verifier.verify(&token_b()).is_ok()).await;
    assert_eq!(verifier.verify(&token_a()).unwrap().sub, "alice");
    assert_eq!(running.stats().keys, 2);

    tokio::time::advance(ttl).await;
    assert_eq!(verifier.verify(&token_a()), Err(AuthError::UnknownKeyId));
    assert_eq!(verifier.verify(&token_b()).unwrap().sub, "alice");
    // The next fetch drops it from the cache too.
    until("a refresh without a", || running.stats().keys == 1).await;
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn test_auth_jwks_retired_keys_never_exceed_max_keys() {
    let jwks = JwksConfig {
        max_keys: 2,
        unknown_kid_cooldown: Duration::ZERO,
        ..JwksConfig::default()
    };
    let running = Running::start(&jwks).await;
    let verifier = &running.verifier;

    // B and C fill the cache: A, though within its ttl, has no room left.
    let full = [rsa_jwk(RSA_OTHER_PUBLIC, "b"), ec_jwk(EC_PUBLIC, "c")];
    running.publish(&full);
    until("key b", || verifier.verify(&token_b()).is_ok()).await;
    assert_eq!(running.stats().keys, 2);
    assert_eq!(verifier.verify(&token_a()), Err(AuthError::UnknownKeyId));
    running.stop().await;
}

#[tokio::test(start_paused = true)]
async fn test_auth_jwks_refreshes_on_schedule_and_keeps_keys_when_a_fetch_fails() {
    let interval = Duration::from_secs(600);
    let jwks = JwksConfig {
        refresh_interval: interval,
        ..JwksConfig::default()
    };
    let running = Running::start(&jwks).await;
    let verifier = &running.verifier;

    // A broken document changes nothing: the last good keys stay.
    std::fs::write(&running.path, "{\"keys\": [").unwrap();
    tokio::time::advance(interval).await;
    until("the failed fetch", || running.stats().failures == 1).await;
    assert_eq!(verifier.verify(&token_a()).unwrap().sub, "alice");

    // With no token asking, the schedule picks up a new key (failures retry after the
    // cooldown, not a full interval).
    let rotated = [rsa_jwk(RSA_PUBLIC, "a"), rsa_jwk(RSA_OTHER_PUBLIC, "b")];
    running.publish(&rotated);
    tokio::time::advance(jwks.unknown_kid_cooldown).await;
    until("key b", || running.stats().keys == 2).await;
    assert_eq!(running.stats().refresh_requests, 0);
    assert_eq!(verifier.verify(&token_b()).unwrap().sub, "alice");
    running.stop().await;
}
