//! Which configurations a verifier refuses to be built from, and what it prints.

use super::*;

#[test]
fn test_auth_new_rejects_short_secret() {
    let config = AuthConfig {
        hs256_secret: Some(vec![7; MIN_HS256_SECRET_BYTES - 1]),
        ..AuthConfig::default()
    };
    assert_eq!(
        Verifier::new(&config).unwrap_err(),
        AuthError::WeakSecret { len: 31 }
    );
    let config = AuthConfig {
        hs256_secret: Some(vec![7; MIN_HS256_SECRET_BYTES]),
        ..AuthConfig::default()
    };
    assert!(Verifier::new(&config).is_ok());
}

#[test]
fn test_auth_new_rejects_no_keys() {
    assert_eq!(
        Verifier::new(&AuthConfig::default()).unwrap_err(),
        AuthError::NoKeys
    );
}

#[test]
fn test_auth_new_rejects_large_leeway() {
    let config = AuthConfig {
        leeway_secs: MAX_LEEWAY_SECS + 1,
        ..hs_config()
    };
    assert_eq!(
        Verifier::new(&config).unwrap_err(),
        AuthError::InvalidLeeway(601)
    );
}

#[test]
fn test_auth_new_rejects_unusable_rsa_keys() {
    for pem in [
        b"not a pem".as_slice(),
        b"",
        RSA_PRIVATE,
        EC_PUBLIC,
        RSA_1024_PUBLIC,
    ] {
        let config = AuthConfig {
            rs256_public_keys: vec![RSA_PUBLIC.to_vec(), pem.to_vec()],
            ..AuthConfig::default()
        };
        let err = Verifier::new(&config).unwrap_err();
        assert!(
            matches!(&err, AuthError::BadKey(msg) if msg.starts_with("rs256 public key 1:")),
            "{err:?}"
        );
    }
}

#[test]
fn test_auth_new_rejects_unusable_ec_keys() {
    for pem in [
        b"not a pem".as_slice(),
        EC_PRIVATE,
        RSA_PUBLIC,
        EC_P384_PUBLIC,
    ] {
        let config = AuthConfig {
            es256_public_keys: vec![pem.to_vec()],
            ..AuthConfig::default()
        };
        let err = Verifier::new(&config).unwrap_err();
        assert!(
            matches!(&err, AuthError::BadKey(msg) if msg.starts_with("es256 public key 0:")),
            "{err:?}"
        );
    }
}

#[test]
fn test_auth_debug_does_not_print_secret() {
    let config = hs_config();
    let secret = String::from_utf8(SECRET.to_vec()).unwrap();
    let shown = format!("{config:?} {:?}", verifier(&config));
    assert!(!shown.contains(&secret), "{shown}");
    assert!(!shown.contains("48, 49, 50"), "{shown}");
    assert!(shown.contains("[redacted]"), "{shown}");
}
