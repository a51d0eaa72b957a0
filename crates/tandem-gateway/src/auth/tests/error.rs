//! Error messages and codes.

use super::*;

#[test]
fn test_auth_error_messages_are_lowercase_without_period() {
    let errors = [
        AuthError::Malformed,
        AuthError::UnsupportedAlgorithm("none".to_owned()),
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::MissingClaim("exp"),
        AuthError::InvalidClaim("exp"),
        AuthError::InvalidSubject,
        AuthError::NoKeys,
        AuthError::BadKey("rs256 public key 0: not an rsa pem key".to_owned()),
        AuthError::WeakSecret { len: 3 },
        AuthError::InvalidLeeway(900),
        AuthError::InvalidTtl,
        AuthError::Signing("x".to_owned()),
    ];
    for err in errors {
        let msg = err.to_string();
        assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
        assert!(!msg.ends_with('.'), "{msg}");
    }
    assert_eq!(AuthError::Expired.code(), ErrorCode::Unauthorized);
    assert_eq!(AuthError::NoKeys.code(), ErrorCode::Internal);
}
