//! The Cognito Identity endpoint (`shared/COGNITO.md` §3, §4, §6): `POST /` with
//! `X-Amz-Target: AWSCognitoIdentityService.<Op>`, JSON 1.1. GetId hands out identities,
//! GetCredentialsForIdentity the stateless credentials of `tandem-cognito`, GetOpenIdToken a
//! Tandem JWT for `/v1/sync`: these three are unsigned (`noAuth` in the model, and every
//! SDK sends them so). The developer operations, ListIdentities and DescribeIdentity, are
//! SigV4-signed for `cognito-identity` and answer only the developer key.
//!
//! Logins are JWTs of the configured issuers: the Logins key `login.example.com` names the
//! issuer `https://login.example.com` (or an issuer configured under exactly that name), and
//! the login is stored under the issuer's name without `https://`.
//! Which identity a request may act as is [`IdentityEndpoint::resolve`]'s rule: a guest's
//! logins link to it, or merge it into the identity they are linked to; an authenticated
//! identity answers only to a login already linked to it, so knowing an id is not enough to
//! take it over. The store keeps identities, logins and merges; nothing is kept here.

use super::caller::{self, Caller};
use super::config::{CognitoConfig, OpenIdMint};
use crate::{AuthError, Gateway, Verifier};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_cognito::{CognitoError, CredentialKeys, DeveloperKey, ErrorType};
use tandem_store::{IdentitySummary, Login, StoreError};

/// The `X-Amz-Target` prefix of the three operations.
const TARGET_PREFIX: &str = "AWSCognitoIdentityService.";
/// The JSON 1.1 content type, of requests and answers.
const JSON_1_1: &str = "application/x-amz-json-1.1";
/// The most Logins one request may carry (the model's maximum).
pub const MAX_LOGINS: usize = 10;
/// The SigV4 service name of the Identity API's signed operations.
const SERVICE: &str = "cognito-identity";
/// The model's bound on ListIdentities' `MaxResults`.
pub const MAX_IDENTITIES_PAGE: usize = 60;
/// How long a GetOpenIdToken token lives.
pub const OPEN_ID_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

const GUESTS_OFF: &str = "Unauthenticated access is not supported for this identity pool.";
const LOGINS_DO_NOT_MATCH: &str = "Logins don't match. Please include at least one valid login for this identity or identity pool.";
const LOGINS_CONFLICT: &str = "The logins are linked to different identities.";

/// The endpoint as configured: the pool it answers for and the keys it issues with.
pub(crate) struct IdentityEndpoint {
    pool_id: String,
    region: String,
    guests: bool,
    keys: CredentialKeys,
    developer: Option<DeveloperKey>,
    open_id: Option<OpenIdMint>,
    max_request_bytes: usize,
}

impl IdentityEndpoint {
    /// The endpoint, or `None` when no identity pool (or no credential secret) is configured.
    pub(crate) fn new(config: &CognitoConfig) -> Option<IdentityEndpoint> {
        let pool_id = config.cognito_identity_pool.clone()?;
        let secret = config.credential_secret.as_ref()?;
        let (region, _) = pool_id.split_once(':')?;
        Some(IdentityEndpoint {
            region: region.to_owned(),
            guests: config.cognito_guests,
            keys: CredentialKeys::derive(secret),
            developer: config
                .cognito_admin_key
                .as_deref()
                .and_then(|key| DeveloperKey::parse(key).ok()),
            open_id: config.open_id.clone(),
            max_request_bytes: config.cognito_max_request_bytes,
            pool_id,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetIdInput {
    identity_pool_id: String,
    #[serde(default)]
    logins: Option<BTreeMap<String, String>>,
}

/// GetCredentialsForIdentity's and GetOpenIdToken's input.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct IdentityInput {
    identity_id: String,
    #[serde(default)]
    logins: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListIdentitiesInput {
    identity_pool_id: String,
    max_results: Option<i64>,
    next_token: Option<String>,
    /// Tandem has no disabled identities; accepted and without effect.
    #[serde(default)]
    #[expect(dead_code, reason = "part of the model's input; nothing to hide")]
    hide_disabled: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeIdentityInput {
    identity_id: String,
}

/// `POST /`: one Cognito Identity operation; 404 while the endpoint is off.
pub(crate) async fn handle(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let Some(endpoint) = gw.cognito_identity.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let (parts, body) = request.into_parts();
    match endpoint.serve(&gw, &parts, body).await {
        Ok(answer) => respond(StatusCode::OK, None, answer.to_string()),
        Err(e) => {
            let rendered = e.render_json_1_1();
            let status =
                StatusCode::from_u16(rendered.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            respond(status, Some(rendered.error_type), rendered.body)
        }
    }
}

/// `OPTIONS /`: the CORS preflight of a browser SDK (COGNITO.md §1).
pub(crate) async fn preflight(State(gw): State<Arc<Gateway>>, headers: HeaderMap) -> Response {
    if gw.cognito_identity.is_none() {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut response = respond(StatusCode::OK, None, String::new());
    let out = response.headers_mut();
    out.remove(header::CONTENT_TYPE);
    out.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        out.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    response
}

/// An answer with the headers every Cognito answer carries (`Date` is hyper's).
fn respond(status: StatusCode, error_type: Option<&'static str>, body: String) -> Response {
    let mut response = (status, body).into_response();
    let out = response.headers_mut();
    out.insert(header::CONTENT_TYPE, HeaderValue::from_static(JSON_1_1));
    if let Ok(id) = HeaderValue::from_str(&new_uuid()) {
        out.insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    if let Some(error_type) = error_type {
        out.insert(
            HeaderName::from_static("x-amzn-errortype"),
            HeaderValue::from_static(error_type),
        );
    }
    // Unsigned and cookieless: any page may call it, as it may call AWS.
    out.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    out.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("x-amzn-RequestId, x-amzn-ErrorType, x-amzn-ErrorMessage, Date"),
    );
    response
}

impl IdentityEndpoint {
    async fn serve(
        &self,
        gw: &Gateway,
        parts: &Parts,
        body: axum::body::Body,
    ) -> Result<Value, CognitoError> {
        let target = parts
            .headers
            .get("x-amz-target")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let op = target.strip_prefix(TARGET_PREFIX).unwrap_or_default();
        if !matches!(
            op,
            "GetId"
                | "GetCredentialsForIdentity"
                | "GetOpenIdToken"
                | "ListIdentities"
                | "DescribeIdentity"
        ) {
            return Err(CognitoError::new(
                ErrorType::UnknownOperation,
                format!(
                    "Unknown operation: {}",
                    target.chars().take(128).collect::<String>()
                ),
            ));
        }
        let body = axum::body::to_bytes(body, self.max_request_bytes)
            .await
            .map_err(|_| {
                CognitoError::new(
                    ErrorType::InvalidParameter,
                    format!(
                        "the request body is larger than {} bytes (cognito_max_request_bytes)",
                        self.max_request_bytes
                    ),
                )
            })?;
        if matches!(op, "ListIdentities" | "DescribeIdentity") {
            let caller = caller::verify(
                SERVICE,
                parts,
                &body,
                &self.keys,
                self.developer.as_ref(),
                SystemTime::now(),
            )?;
            if !matches!(caller, Caller::Developer) {
                return Err(caller::developer_only());
            }
        }
        match op {
            "GetId" => self.get_id(gw, parse(&body)?).await,
            "ListIdentities" => self.list_identities(gw, parse(&body)?).await,
            "DescribeIdentity" => {
                let input: DescribeIdentityInput = parse(&body)?;
                if tandem_store::validate_identity_id(&input.identity_id).is_err() {
                    return Err(bad_identity_id());
                }
                let identity = gw
                    .store
                    .identity_summary(&gw.config.pool, &input.identity_id)
                    .await
                    .map_err(store_error)?
                    .ok_or_else(|| {
                        CognitoError::new(
                            ErrorType::ResourceNotFound,
                            format!("Identity '{}' not found.", clip(&input.identity_id)),
                        )
                    })?;
                Ok(description(&identity))
            }
            "GetCredentialsForIdentity" => {
                let input: IdentityInput = parse(&body)?;
                let id = self.resolve(gw, &input.identity_id, input.logins).await?;
                let creds = self.keys.issue(&id, &self.pool_id, SystemTime::now());
                Ok(json!({
                    "IdentityId": id,
                    "Credentials": {
                        "AccessKeyId": creds.access_key_id,
                        "SecretKey": creds.secret_key,
                        "SessionToken": creds.session_token,
                        "Expiration": epoch_seconds(creds.expiration),
                    },
                }))
            }
            _ => {
                let input: IdentityInput = parse(&body)?;
                let id = self.resolve(gw, &input.identity_id, input.logins).await?;
                let mint = self.open_id.as_ref().ok_or_else(|| {
                    CognitoError::new(
                        ErrorType::InvalidParameter,
                        "GetOpenIdToken is not available: this node has no HS256 secret to sign with",
                    )
                })?;
                let token = tandem_token::mint_hs256(
                    &mint.hs256_secret,
                    &id,
                    OPEN_ID_TOKEN_LIFETIME,
                    mint.issuer.as_deref(),
                    mint.audience.as_deref(),
                )
                .map_err(|e| {
                    tracing::warn!(error = %e, "cannot mint an open id token");
                    CognitoError::new(ErrorType::InternalError, "internal error")
                })?;
                Ok(json!({ "IdentityId": id, "Token": token }))
            }
        }
    }

    /// ListIdentities: a page of the pool's identities by id (a cursor on the last id, so
    /// identities created meanwhile never shift a page).
    async fn list_identities(
        &self,
        gw: &Gateway,
        input: ListIdentitiesInput,
    ) -> Result<Value, CognitoError> {
        if input.identity_pool_id != self.pool_id {
            return Err(pool_not_found(&input.identity_pool_id));
        }
        let max = input
            .max_results
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| (1..=MAX_IDENTITIES_PAGE).contains(n))
            .ok_or_else(|| {
                CognitoError::new(
                    ErrorType::InvalidParameter,
                    format!("MaxResults must be 1 to {MAX_IDENTITIES_PAGE}"),
                )
            })?;
        let after = input
            .next_token
            .as_deref()
            .map(|token| {
                URL_SAFE_NO_PAD
                    .decode(token)
                    .ok()
                    .and_then(|id| String::from_utf8(id).ok())
                    .filter(|id| tandem_store::validate_identity_id(id).is_ok())
                    .ok_or_else(|| {
                        CognitoError::new(ErrorType::InvalidParameter, "invalid NextToken")
                    })
            })
            .transpose()?;
        // One more than asked: whether a next page exists.
        let mut page = gw
            .store
            .identities(&gw.config.pool, after.as_deref(), max + 1)
            .await
            .map_err(store_error)?;
        let more = page.len() > max;
        page.truncate(max);
        let mut answer = json!({
            "IdentityPoolId": self.pool_id,
            "Identities": page.iter().map(description).collect::<Vec<_>>(),
        });
        if more && let Some(last) = page.last() {
            answer["NextToken"] = json!(URL_SAFE_NO_PAD.encode(&last.id));
        }
        Ok(answer)
    }

    /// GetId: a new guest without Logins; with Logins, the identity they are linked to (any
    /// unlinked ones are linked to it too) or a new identity linked to all of them.
    async fn get_id(&self, gw: &Gateway, input: GetIdInput) -> Result<Value, CognitoError> {
        if input.identity_pool_id != self.pool_id {
            return Err(pool_not_found(&input.identity_pool_id));
        }
        let logins = verify_logins(&gw.verifier, input.logins)?;
        let (store, pool) = (&gw.store, gw.config.pool.as_str());
        if logins.is_empty() {
            if !self.guests {
                return Err(CognitoError::new(ErrorType::NotAuthorized, GUESTS_OFF));
            }
            let id = self.new_identity_id();
            store
                .create_identity(pool, &id, true)
                .await
                .map_err(store_error)?;
            return Ok(json!({ "IdentityId": id }));
        }
        let id = match store
            .identity_for_logins(pool, &logins)
            .await
            .map_err(store_error)?
        {
            Some(id) => {
                store
                    .link_logins(pool, &id, &logins)
                    .await
                    .map_err(store_error)?;
                id
            }
            None => {
                let id = self.new_identity_id();
                // Not a guest from the start: should the link below lose a race, nobody can
                // use the empty identity as a guest.
                store
                    .create_identity(pool, &id, false)
                    .await
                    .map_err(store_error)?;
                match store.link_logins(pool, &id, &logins).await {
                    Ok(()) => id,
                    // Another GetId linked one of these logins meanwhile: its identity it is.
                    Err(StoreError::LoginLinked { .. }) => store
                        .identity_for_logins(pool, &logins)
                        .await
                        .map_err(store_error)?
                        .ok_or_else(|| {
                            CognitoError::new(ErrorType::ResourceConflict, LOGINS_CONFLICT)
                        })?,
                    Err(e) => return Err(store_error(e)),
                }
            }
        };
        Ok(json!({ "IdentityId": id }))
    }

    /// The identity a GetCredentialsForIdentity or GetOpenIdToken of `id` with `logins` acts
    /// as (COGNITO.md §3): `id` itself, or, for a guest whose login is linked to another
    /// identity, that identity once the guest is merged into it (§4).
    async fn resolve(
        &self,
        gw: &Gateway,
        id: &str,
        logins: Option<BTreeMap<String, String>>,
    ) -> Result<String, CognitoError> {
        let forbidden = || {
            CognitoError::new(
                ErrorType::NotAuthorized,
                format!("Access to Identity '{}' is forbidden.", clip(id)),
            )
        };
        if tandem_store::validate_identity_id(id).is_err() {
            return Err(bad_identity_id());
        }
        let logins = verify_logins(&gw.verifier, logins)?;
        let (store, pool) = (&gw.store, gw.config.pool.as_str());
        let identity = store
            .identity(pool, id)
            .await
            .map_err(store_error)?
            .filter(|identity| identity.merged_into.is_none())
            .ok_or_else(forbidden)?;
        if identity.guest {
            if logins.is_empty() {
                if !self.guests {
                    return Err(CognitoError::new(ErrorType::NotAuthorized, GUESTS_OFF));
                }
                return Ok(id.to_owned());
            }
            let into = store
                .identity_for_logins(pool, &logins)
                .await
                .map_err(store_error)?;
            let Some(into) = into else {
                store
                    .link_logins(pool, id, &logins)
                    .await
                    .map_err(store_error)?;
                return Ok(id.to_owned());
            };
            let outcome = store
                .merge_identity(pool, id, &into)
                .await
                .map_err(store_error)?;
            tracing::info!(from = id, into = %into, datasets = outcome.moved.len(), "guest identity merged at login");
            store
                .link_logins(pool, &into, &logins)
                .await
                .map_err(store_error)?;
            return Ok(into);
        }
        // An authenticated identity answers only to a login already linked to it.
        if logins.is_empty() {
            return Err(CognitoError::new(
                ErrorType::NotAuthorized,
                LOGINS_DO_NOT_MATCH,
            ));
        }
        let linked = match store.identity_for_logins(pool, &logins).await {
            Ok(linked) => linked,
            Err(StoreError::LoginsConflict { .. }) => None,
            Err(e) => return Err(store_error(e)),
        };
        if linked.as_deref() != Some(id) {
            return Err(CognitoError::new(
                ErrorType::NotAuthorized,
                LOGINS_DO_NOT_MATCH,
            ));
        }
        store
            .link_logins(pool, id, &logins)
            .await
            .map_err(store_error)?;
        Ok(id.to_owned())
    }

    /// `<region of the pool>:<uuid4>`.
    fn new_identity_id(&self) -> String {
        format!("{}:{}", self.region, new_uuid())
    }
}

fn pool_not_found(pool: &str) -> CognitoError {
    CognitoError::new(
        ErrorType::ResourceNotFound,
        format!("IdentityPool '{}' not found.", clip(pool)),
    )
}

fn bad_identity_id() -> CognitoError {
    CognitoError::new(
        ErrorType::InvalidParameter,
        "IdentityId must be <region>:<lowercase uuid>, at most 55 characters",
    )
}

/// The `IdentityDescription` shape; `Logins` (provider names) only when there are some.
fn description(identity: &IdentitySummary) -> Value {
    let mut shape = json!({
        "IdentityId": identity.id,
        "CreationDate": identity.created_at as f64 / 1000.0,
        "LastModifiedDate": identity.last_modified as f64 / 1000.0,
    });
    if !identity.providers.is_empty() {
        shape["Logins"] = json!(identity.providers);
    }
    shape
}

/// Each Logins entry verified as a JWT of the issuer its key names, as a store login.
fn verify_logins(
    verifier: &Verifier,
    logins: Option<BTreeMap<String, String>>,
) -> Result<Vec<Login>, CognitoError> {
    let logins = logins.unwrap_or_default();
    if logins.len() > MAX_LOGINS {
        return Err(CognitoError::new(
            ErrorType::InvalidParameter,
            format!("Logins holds at most {MAX_LOGINS} entries"),
        ));
    }
    let logins = logins
        .into_iter()
        .map(|(provider, token)| {
            let https = format!("https://{provider}");
            let verified = match verifier.verify_issued_by(&token, &https) {
                Err(AuthError::WrongIssuer) => verifier.verify_issued_by(&token, &provider),
                other => other,
            };
            let identity = verified.map_err(|e| {
                CognitoError::new(
                    ErrorType::NotAuthorized,
                    format!("Invalid login token. {e}"),
                )
            })?;
            // One issuer is one provider, whichever of its two names the key uses.
            let provider = provider.strip_prefix("https://").unwrap_or(&provider);
            Ok(Login::new(provider, identity.sub))
        })
        .collect::<Result<Vec<_>, CognitoError>>()?;
    if !logins.is_empty() {
        tandem_store::validate_logins(&logins).map_err(store_error)?;
    }
    Ok(logins)
}

/// A store error as the Identity API answers it; internal ones are logged here, once.
fn store_error(e: StoreError) -> CognitoError {
    match e {
        StoreError::IdentityMerged { identity, .. } | StoreError::NotFound(identity) => {
            // `NotFound` names "identity <id>".
            let identity = identity.strip_prefix("identity ").unwrap_or(&identity);
            CognitoError::new(
                ErrorType::NotAuthorized,
                format!("Access to Identity '{}' is forbidden.", clip(identity)),
            )
        }
        StoreError::LoginLinked { .. } | StoreError::LoginsConflict { .. } => {
            CognitoError::new(ErrorType::ResourceConflict, LOGINS_CONFLICT)
        }
        StoreError::BadRequest(message) => CognitoError::new(ErrorType::InvalidParameter, message),
        StoreError::Unavailable(_) | StoreError::Internal(_) => {
            tracing::warn!(error = %e, "cognito identity request failed in the store");
            let error_type = ErrorType::from_tandem(e.code(), None);
            CognitoError::new(error_type, "internal error")
        }
        other => CognitoError::new(
            ErrorType::from_tandem(other.code(), None),
            other.to_string(),
        ),
    }
}

/// The body as `T`; anything else is `InvalidParameterException`.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, CognitoError> {
    serde_json::from_slice(body).map_err(|e| {
        CognitoError::new(
            ErrorType::InvalidParameter,
            format!("invalid request body: {e}"),
        )
    })
}

/// At most 128 characters of a client's value, for messages.
fn clip(value: &str) -> String {
    value.chars().take(128).collect()
}

/// Seconds since the epoch with a millisecond fraction, as the SDKs read timestamps.
fn epoch_seconds(t: SystemTime) -> f64 {
    let ms = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    ms as f64 / 1000.0
}

/// A random (version 4) uuid, lowercase.
fn new_uuid() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|byte| format!("{byte:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_new_identity_ids_are_valid_and_distinct() {
        let config = CognitoConfig {
            cognito_identity_pool: Some("eu-west-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10".into()),
            credential_secret: Some(b"a shared secret of at least thirty-two bytes".to_vec()),
            ..CognitoConfig::default()
        };
        let endpoint = IdentityEndpoint::new(&config).unwrap();
        let a = endpoint.new_identity_id();
        assert!(a.starts_with("eu-west-1:"), "{a}");
        tandem_store::validate_identity_id(&a).unwrap();
        assert_ne!(a, endpoint.new_identity_id());
        assert_eq!(&a[10 + 14..10 + 15], "4", "version 4: {a}");
    }

    #[test]
    fn test_endpoint_is_off_without_a_pool() {
        assert!(IdentityEndpoint::new(&CognitoConfig::default()).is_none());
    }

    #[test]
    fn test_epoch_seconds_keep_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(epoch_seconds(t), 1_700_000_000.123);
    }
}
