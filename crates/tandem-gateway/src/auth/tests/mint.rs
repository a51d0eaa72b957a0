//! Minted tokens and generated secrets, checked by the verifier.

use super::*;

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
    let token = mint_hs256(secret.as_bytes(), "a", Duration::from_secs(60), None, None).unwrap();
    assert_eq!(verifier(&config).verify(&token).unwrap().sub, "a");
}
