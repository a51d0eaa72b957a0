//! Several issuers: which keys a token's `iss` picks, each issuer's audience and subject
//! prefix, and the settings a verifier refuses to be built from.

use super::*;
use std::path::PathBuf;

const ISSUER_A: &str = "https://a.example";
const ISSUER_B: &str = "https://b.example";

fn pem_issuer(issuer: &str, rsa: &[u8], audience: Option<&str>) -> IssuerConfig {
    IssuerConfig {
        issuer: issuer.to_owned(),
        keys: KeySource::Pem {
            rs256_public_keys: vec![rsa.to_vec()],
            es256_public_keys: Vec::new(),
        },
        audience: audience.map(str::to_owned),
        subject_prefix: None,
    }
}

fn with_issuers(config: &AuthConfig, issuers: &[IssuerConfig]) -> Result<Verifier, AuthError> {
    Verifier::with_issuers(config, issuers, &JwksConfig::default())
}

#[test]
fn test_auth_issuer_iss_picks_its_own_keys_and_audience() {
    let verifier = with_issuers(
        &hs_config(),
        &[
            pem_issuer(ISSUER_A, RSA_PUBLIC, Some("app-a")),
            pem_issuer(ISSUER_B, RSA_OTHER_PUBLIC, None),
        ],
    )
    .unwrap();
    let with_aud = |issuer: &str, aud: &str| json!({ "sub": "alice", "exp": now() + 600, "iss": issuer, "aud": aud });

    let token = rs256(RSA_PRIVATE, &with_aud(ISSUER_A, "app-a"));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    let token = rs256(RSA_OTHER_PRIVATE, &claims_from(ISSUER_B));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");

    // Each issuer's audience is its own, and its keys verify only its tokens.
    let token = rs256(RSA_PRIVATE, &with_aud(ISSUER_A, "app-b"));
    assert_eq!(verifier.verify(&token), Err(AuthError::WrongAudience));
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_A));
    assert_eq!(verifier.verify(&token), Err(AuthError::MissingClaim("aud")));
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_B));
    assert_eq!(verifier.verify(&token), Err(AuthError::BadSignature));

    // The default HS256 secret verifies tokens of no further issuer, and never theirs.
    assert_eq!(verifier.verify(&hs256(&claims())).unwrap().sub, "alice");
    let token = hs256(&claims_from("https://elsewhere.example"));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    let token = hs256(&claims_from(ISSUER_B));
    assert_eq!(
        verifier.verify(&token),
        Err(AuthError::UnsupportedAlgorithm("HS256".to_owned()))
    );
}

#[test]
fn test_auth_issuer_without_default_keys_refuses_other_issuers() {
    let verifier = with_issuers(
        &AuthConfig::default(),
        &[pem_issuer(ISSUER_A, RSA_PUBLIC, None)],
    )
    .unwrap();
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_A));
    assert_eq!(verifier.verify(&token).unwrap().sub, "alice");
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_B));
    assert_eq!(verifier.verify(&token), Err(AuthError::WrongIssuer));
    let token = rs256(RSA_PRIVATE, &claims());
    assert_eq!(verifier.verify(&token), Err(AuthError::MissingClaim("iss")));
}

#[test]
fn test_auth_issuer_subject_prefix_makes_the_identity() {
    let issuer = IssuerConfig {
        subject_prefix: Some("a:".to_owned()),
        ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
    };
    let verifier = with_issuers(&hs_config(), &[issuer]).unwrap();
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_A));
    assert_eq!(verifier.verify(&token).unwrap().sub, "a:alice");
    assert_eq!(verifier.verify(&hs256(&claims())).unwrap().sub, "alice");

    let long = json!({ "sub": "x".repeat(MAX_SUBJECT_BYTES), "exp": now() + 600, "iss": ISSUER_A });
    assert_eq!(
        verifier.verify(&rs256(RSA_PRIVATE, &long)),
        Err(AuthError::InvalidSubject)
    );
}

#[test]
fn test_auth_verify_issued_by_uses_only_that_issuers_keys() {
    let config = AuthConfig {
        issuer: Some("tandem".to_owned()),
        ..hs_config()
    };
    let verifier = with_issuers(&config, &[pem_issuer(ISSUER_A, RSA_PUBLIC, None)]).unwrap();
    let token = rs256(RSA_PRIVATE, &claims_from(ISSUER_A));
    assert_eq!(
        verifier.verify_issued_by(&token, ISSUER_A).unwrap().sub,
        "alice"
    );
    assert_eq!(
        verifier.verify_issued_by(&token, "tandem"),
        Err(AuthError::UnsupportedAlgorithm("RS256".to_owned()))
    );
    assert_eq!(
        verifier.verify_issued_by(&token, ISSUER_B),
        Err(AuthError::WrongIssuer)
    );
    let token = hs256(&claims_from("tandem"));
    assert_eq!(
        verifier.verify_issued_by(&token, "tandem").unwrap().sub,
        "alice"
    );
    // The token must carry the issuer it is checked for.
    let token = rs256(RSA_PRIVATE, &claims_from("https://a.example/other"));
    assert!(verifier.verify_issued_by(&token, ISSUER_A).is_err());
}

#[test]
fn test_auth_with_issuers_rejects_unusable_settings() {
    let dir = tempfile::tempdir().unwrap();
    let no_keys = dir.path().join("no-keys.json");
    std::fs::write(&no_keys, r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).unwrap();
    let url = |url: &str| IssuerConfig {
        keys: KeySource::JwksUrl(url.to_owned()),
        ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
    };
    let file = |path: PathBuf| IssuerConfig {
        keys: KeySource::JwksFile(path),
        ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
    };
    let tandem_issuer = AuthConfig {
        issuer: Some(ISSUER_A.to_owned()),
        ..hs_config()
    };
    let cases: Vec<(AuthConfig, Vec<IssuerConfig>, &str)> = vec![
        (
            AuthConfig::default(),
            vec![pem_issuer("", RSA_PUBLIC, None)],
            "an issuer is empty",
        ),
        (
            AuthConfig::default(),
            vec![
                pem_issuer(ISSUER_A, RSA_PUBLIC, None),
                pem_issuer(ISSUER_A, RSA_OTHER_PUBLIC, None),
            ],
            "configured twice",
        ),
        (
            tandem_issuer,
            vec![pem_issuer(ISSUER_A, RSA_PUBLIC, None)],
            "configured twice",
        ),
        (
            AuthConfig::default(),
            vec![url("http://idp.example/jwks.json")],
            "must use https",
        ),
        (
            AuthConfig::default(),
            vec![url("ftp://127.0.0.1/jwks.json")],
            "must use https",
        ),
        (
            AuthConfig::default(),
            vec![url("not a url")],
            "not a valid url",
        ),
        (
            AuthConfig::default(),
            vec![file(dir.path().join("missing.json"))],
            "cannot open",
        ),
        (
            AuthConfig::default(),
            vec![file(no_keys)],
            "no usable rs256 or es256 signing key (1 entries skipped)",
        ),
        (
            AuthConfig::default(),
            vec![IssuerConfig {
                subject_prefix: Some("\n".to_owned()),
                ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
            }],
            "subject prefix",
        ),
        (
            AuthConfig::default(),
            vec![IssuerConfig {
                keys: KeySource::Pem {
                    rs256_public_keys: Vec::new(),
                    es256_public_keys: Vec::new(),
                },
                ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
            }],
            "no keys",
        ),
    ];
    for (config, issuers, expected) in cases {
        let err = with_issuers(&config, &issuers).unwrap_err();
        assert!(
            matches!(&err, AuthError::BadIssuerConfig(msg) if msg.contains(expected)),
            "{expected}: {err:?}"
        );
        assert_eq!(err.code(), ErrorCode::Internal);
    }

    let err = with_issuers(
        &AuthConfig::default(),
        &[pem_issuer(ISSUER_A, RSA_1024_PUBLIC, None)],
    )
    .unwrap_err();
    assert!(
        matches!(&err, AuthError::BadKey(msg) if msg.contains("https://a.example") && msg.contains("rs256 public key 0")),
        "{err:?}"
    );

    for jwks in [
        JwksConfig {
            max_keys: 0,
            ..JwksConfig::default()
        },
        JwksConfig {
            max_document_bytes: 0,
            ..JwksConfig::default()
        },
        JwksConfig {
            refresh_interval: Duration::ZERO,
            ..JwksConfig::default()
        },
        JwksConfig {
            fetch_timeout: Duration::ZERO,
            ..JwksConfig::default()
        },
    ] {
        let err = Verifier::with_issuers(
            &AuthConfig::default(),
            &[url("https://idp.example/jwks.json")],
            &jwks,
        )
        .unwrap_err();
        assert!(
            matches!(&err, AuthError::BadIssuerConfig(msg) if msg.starts_with("jwks settings:")),
            "{err:?}"
        );
    }
}

#[test]
fn test_auth_jwks_url_allows_plain_http_only_to_loopback() {
    for (url, allowed) in [
        ("https://idp.example/.well-known/jwks.json", true),
        ("http://127.0.0.1:1/jwks.json", true),
        ("http://127.0.0.9:1/jwks.json", true),
        ("http://[::1]:1/jwks.json", true),
        ("http://localhost:1/jwks.json", true),
        ("http://10.0.0.1/jwks.json", false),
        ("http://localhost.example/jwks.json", false),
        ("http://[::2]/jwks.json", false),
    ] {
        let issuer = IssuerConfig {
            keys: KeySource::JwksUrl(url.to_owned()),
            ..pem_issuer(ISSUER_A, RSA_PUBLIC, None)
        };
        let built = with_issuers(&AuthConfig::default(), &[issuer]);
        assert_eq!(built.is_ok(), allowed, "{url}");
    }
}
