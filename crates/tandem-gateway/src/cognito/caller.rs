//! Who signed a Cognito request: an identity (temporary credentials with their session
//! token) or the pool's developer (the configured developer key, no session token). One
//! SigV4 check for both APIs, each under its own service name.

use axum::http::request::Parts;
use std::time::SystemTime;
use tandem_cognito::{
    CognitoError, CredentialKeys, DeveloperKey, ErrorType, SessionClaims, SignedRequest,
};

/// The principal of a verified request.
#[derive(Debug, Clone)]
pub(crate) enum Caller {
    /// Temporary credentials of one identity.
    Identity(SessionClaims),
    /// The developer key.
    Developer,
}

/// Checks the SigV4 signature of a request (`parts` and its whole `body`) scoped to
/// `service`, signed with either kind of credentials.
pub(crate) fn verify(
    service: &str,
    parts: &Parts,
    body: &[u8],
    credentials: &CredentialKeys,
    developer: Option<&DeveloperKey>,
    now: SystemTime,
) -> Result<Caller, CognitoError> {
    let headers: Vec<(&str, &[u8])> = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_bytes()))
        .collect();
    // The raw path: the SDKs sign it percent-encoded a second time, so nothing may decode
    // it before the signature is checked.
    let signed = SignedRequest {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &headers,
        body,
    };
    let verified = tandem_cognito::verify_for(service, &signed, now, |query| {
        match developer {
            // A session token means temporary credentials, whatever the key id says.
            Some(key) if query.session_token.is_none() && key.is(query.access_key_id) => {
                Ok((key.secret().to_owned(), Caller::Developer))
            }
            _ => credentials
                .lookup(query, now)
                .map(|(secret, claims)| (secret, Caller::Identity(claims))),
        }
    })?;
    Ok(verified.principal)
}

/// The refusal of a developer operation to anyone else.
pub(crate) fn developer_only() -> CognitoError {
    CognitoError::new(
        ErrorType::NotAuthorized,
        "this operation needs developer credentials",
    )
}
