//! The Cognito Sync REST API (rest-json, COGNITO.md §2) on the WebSocket's listener, under
//! `/identitypools/…`: every request is SigV4-verified over its raw path and body before
//! anything is decoded, identity credentials may address only their own data (the developer
//! key any identity's, and the developer operations of `super::admin`), and each operation
//! is one store call mapped to Cognito's shapes. A commit is published through the
//! hub exactly as a WebSocket `update` is, so WebSocket subscribers (on every node) see REST
//! writes and ListRecords sees WebSocket ones.
//!
//! It owns the two sealed tokens of the API (`SyncSessionToken`, the pages' `NextToken`),
//! both stateless MACs under keys derived from the deployment's Cognito secret, so any node
//! accepts what another issued. It owns no identity: credentials are issued by the Identity
//! endpoint; here they are only verified.

use super::caller::{self, Caller};
use crate::Gateway;
use crate::metrics::Metrics;
use crate::throttle::Event;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_cognito::credentials::derive_key;
use tandem_cognito::{CognitoError, CredentialKeys, DeveloperKey, ErrorType};
use tandem_protocol::{Access, DatasetInfo, Patch, PatchOp, Record};
use tandem_store::{DatasetKey, StoreError, UpdateOutcome, UpdateRequest};

/// HKDF label of the key that seals SyncSessionTokens.
const LABEL_SYNC_SESSION: &str = "tandem-cognito sync-session-token v1";
/// HKDF label of the key that seals pagination tokens.
const LABEL_PAGE: &str = "tandem-cognito next-token v1";
/// How long a SyncSessionToken is accepted after it was issued.
const SYNC_SESSION_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The model's bounds on `maxResults`.
const MAX_DATASETS_PAGE: usize = 64;
const MAX_RECORDS_PAGE: usize = 1024;
/// The model's bound on `DeviceId`; longer is refused here, before the store's own limit.
const MAX_DEVICE_ID: usize = 256;
const TOKEN_VERSION: u32 = 1;

const EXPOSE_HEADERS: &str = "x-amzn-RequestId, x-amzn-ErrorType, x-amzn-ErrorMessage, Date";

/// The Sync API of one node: the configured pool and the keys its tokens derive from.
pub(crate) struct SyncApi {
    /// The Cognito identity pool id, `<region>:<uuid>`.
    pub(crate) pool_id: String,
    credentials: CredentialKeys,
    developer: Option<DeveloperKey>,
    session_key: [u8; 32],
    page_key: [u8; 32],
    max_body_bytes: usize,
    /// `cognito_max_requests_per_second`, per caller.
    rate: crate::history::RestRate,
}

impl std::fmt::Debug for SyncApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncApi")
            .field("pool_id", &self.pool_id)
            .finish_non_exhaustive()
    }
}

impl SyncApi {
    /// The API when the pool and a secret are configured; `None` leaves its routes 404.
    pub(crate) fn from_config(config: &crate::GatewayConfig) -> Option<SyncApi> {
        let pool_id = config.cognito.cognito_identity_pool.clone()?;
        let secret = config.cognito.credential_secret.as_deref()?;
        Some(SyncApi {
            pool_id,
            credentials: CredentialKeys::derive(secret),
            developer: config
                .cognito
                .cognito_admin_key
                .as_deref()
                .and_then(|key| DeveloperKey::parse(key).ok()),
            session_key: derive_key(secret, LABEL_SYNC_SESSION),
            page_key: derive_key(secret, LABEL_PAGE),
            max_body_bytes: config.cognito_max_body_bytes,
            rate: crate::history::RestRate::new(config.cognito.cognito_max_requests_per_second),
        })
    }
}

/// Every method on `/identitypools` and below.
pub(crate) async fn handle(State(gw): State<Arc<Gateway>>, request: Request) -> Response {
    let Some(api) = gw.cognito_sync.as_ref() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut response = if request.method() == Method::OPTIONS {
        preflight(request.headers())
    } else {
        match serve(&gw, api, request).await {
            Ok(response) => response,
            Err(e) => {
                if refused_credentials(e.error_type) && gw.throttle.record(Event::TokenRefused) {
                    tracing::info!(error = %e, "cognito sync request refused");
                }
                error_response(&e)
            }
        }
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static(EXPOSE_HEADERS),
    );
    if let Ok(id) = HeaderValue::from_str(&request_id()) {
        headers.insert("x-amzn-RequestId", id);
    }
    response
}

/// A browser's CORS preflight: SigV4 uses no cookies, so any origin may call, with whatever
/// headers the SDK asks for (its `x-amz-*` set differs per SDK and version).
fn preflight(request: &HeaderMap) -> Response {
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, DELETE, OPTIONS"),
    );
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from(600));
    response
}

/// Errors a client causes at will with bad or foreign credentials: counted and logged
/// through the throttle, like a refused WebSocket token.
fn refused_credentials(error_type: ErrorType) -> bool {
    matches!(
        error_type,
        ErrorType::MissingAuthenticationToken
            | ErrorType::IncompleteSignature
            | ErrorType::InvalidSignature
            | ErrorType::UnrecognizedClient
            | ErrorType::ExpiredToken
            | ErrorType::NotAuthorized
    )
}

fn request_id() -> String {
    let n: u128 = rand::random();
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

pub(super) fn error_response(e: &CognitoError) -> Response {
    let rendered = e.render();
    let status = StatusCode::from_u16(rendered.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        rendered.body,
    )
        .into_response();
    response.headers_mut().insert(
        "x-amzn-ErrorType",
        HeaderValue::from_static(rendered.error_type),
    );
    response
}

pub(super) fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

pub(super) fn invalid(message: impl Into<String>) -> CognitoError {
    CognitoError::new(ErrorType::InvalidParameter, message)
}

fn forbidden(identity: &str) -> CognitoError {
    CognitoError::new(
        ErrorType::NotAuthorized,
        format!("Access to Identity '{identity}' is forbidden."),
    )
}

/// A store error as the Sync API reports it; internals are logged here, once, and hidden.
pub(super) fn store_error(e: StoreError) -> CognitoError {
    let limit = match &e {
        StoreError::Limit { limit, .. } => Some(*limit),
        _ => None,
    };
    let error_type = ErrorType::from_tandem(e.code(), limit);
    match error_type {
        ErrorType::InternalError | ErrorType::Unavailable => {
            tracing::warn!(error = %e, "store error on the cognito sync api");
            CognitoError::new(error_type, "internal error")
        }
        _ => CognitoError::new(error_type, e.to_string()),
    }
}

/// The operations, as the AWS service model routes them.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    ListDatasets {
        pool: String,
        id: String,
    },
    DescribeDataset {
        pool: String,
        id: String,
        name: String,
    },
    UpdateRecords {
        pool: String,
        id: String,
        name: String,
    },
    DeleteDataset {
        pool: String,
        id: String,
        name: String,
    },
    ListRecords {
        pool: String,
        id: String,
        name: String,
    },
    DescribeIdentityUsage {
        pool: String,
        id: String,
    },
    /// RegisterDevice, SubscribeToDataset, UnsubscribeFromDataset.
    PushSync {
        pool: String,
        id: String,
    },
    /// Pool usage, events, configuration and bulk publish: developer credentials only.
    Developer(super::admin::DeveloperOp),
    Unknown,
}

impl Route {
    /// Routes a raw (still percent-encoded) path; segments are decoded only here, after the
    /// signature over the raw form was verified.
    fn parse(method: &Method, raw_path: &str) -> Result<Route, CognitoError> {
        let segments = raw_path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8()
                    .map(|s| s.into_owned())
                    .map_err(|_| invalid("path segments must be UTF-8"))
            })
            .collect::<Result<Vec<String>, _>>()?;
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let get = *method == Method::GET;
        let post = *method == Method::POST;
        let delete = *method == Method::DELETE;
        if let Some(op) = super::admin::DeveloperOp::parse(method, &segments) {
            return Ok(Route::Developer(op));
        }
        Ok(match segments[..] {
            ["identitypools", pool, "identities", id] if get => Route::DescribeIdentityUsage {
                pool: pool.to_owned(),
                id: id.to_owned(),
            },
            ["identitypools", pool, "identities", id, "datasets"] if get => Route::ListDatasets {
                pool: pool.to_owned(),
                id: id.to_owned(),
            },
            ["identitypools", pool, "identities", id, "datasets", name] => {
                let (pool, id, name) = (pool.to_owned(), id.to_owned(), name.to_owned());
                match *method {
                    Method::GET => Route::DescribeDataset { pool, id, name },
                    Method::POST => Route::UpdateRecords { pool, id, name },
                    Method::DELETE => Route::DeleteDataset { pool, id, name },
                    _ => Route::Unknown,
                }
            }
            [
                "identitypools",
                pool,
                "identities",
                id,
                "datasets",
                name,
                "records",
            ] if get => Route::ListRecords {
                pool: pool.to_owned(),
                id: id.to_owned(),
                name: name.to_owned(),
            },
            [
                "identitypools",
                pool,
                "identities",
                id,
                "datasets",
                _,
                "subscriptions",
                _,
            ] if post || delete => Route::PushSync {
                pool: pool.to_owned(),
                id: id.to_owned(),
            },
            ["identitypools", pool, "identity", id, "device"] if post => Route::PushSync {
                pool: pool.to_owned(),
                id: id.to_owned(),
            },
            _ => Route::Unknown,
        })
    }

    /// The pool and identity an identity-scoped route addresses.
    fn scope(&self) -> Option<(&str, &str)> {
        match self {
            Route::ListDatasets { pool, id }
            | Route::DescribeDataset { pool, id, .. }
            | Route::UpdateRecords { pool, id, .. }
            | Route::DeleteDataset { pool, id, .. }
            | Route::ListRecords { pool, id, .. }
            | Route::DescribeIdentityUsage { pool, id }
            | Route::PushSync { pool, id } => Some((pool, id)),
            Route::Developer(_) | Route::Unknown => None,
        }
    }
}

async fn serve(gw: &Gateway, api: &SyncApi, request: Request) -> Result<Response, CognitoError> {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, api.max_body_bytes)
        .await
        .map_err(|_| {
            CognitoError::new(
                ErrorType::LimitExceeded,
                format!(
                    "request body larger than {} bytes (cognito_max_body_bytes)",
                    api.max_body_bytes
                ),
            )
        })?;
    let raw_path = parts.uri.path();
    let now = SystemTime::now();
    let caller = caller::verify(
        tandem_cognito::sigv4::SERVICE,
        &parts,
        &body,
        &api.credentials,
        api.developer.as_ref(),
        now,
    )?;
    // Throttled per caller, after the signature (a forged request cannot use up another
    // caller's rate), as AWS throttles: clients retry with backoff.
    let who = match &caller {
        Caller::Identity(claims) => claims.identity_id.as_str(),
        Caller::Developer => "developer",
    };
    if api.rate.take(who).is_err() {
        return Err(CognitoError::new(
            ErrorType::TooManyRequests,
            "Rate exceeded",
        ));
    }
    let route = Route::parse(&parts.method, raw_path)?;
    let id = match (route.scope(), &caller) {
        (Some((pool, id)), _) => {
            authorize(gw, api, &caller, pool, id).await?;
            id.to_owned()
        }
        (None, Caller::Developer) => {
            if let Route::Developer(op) = route {
                return super::admin::serve(gw, api, op, &parts.uri, &body).await;
            }
            return Err(unknown_operation(&parts.method, raw_path));
        }
        (None, Caller::Identity(_)) if matches!(route, Route::Developer(_)) => {
            return Err(caller::developer_only());
        }
        (None, Caller::Identity(_)) => return Err(unknown_operation(&parts.method, raw_path)),
    };
    let id = id.as_str();
    match route {
        Route::ListDatasets { .. } => list_datasets(gw, api, id, &parts.uri).await,
        Route::DescribeDataset { name, .. } => {
            let key = dataset_key(gw, id, &name)?;
            let dataset = describe(gw, &key).await?.ok_or_else(|| not_found(&name))?;
            Ok(ok(json!({ "Dataset": dataset })))
        }
        Route::UpdateRecords { name, .. } => update_records(gw, api, id, &name, &body, now).await,
        Route::DeleteDataset { name, .. } => {
            let key = dataset_key(gw, id, &name)?;
            let dataset = describe(gw, &key).await?.ok_or_else(|| not_found(&name))?;
            let key = Arc::new(key);
            let sync_count = gw
                .store
                .delete_dataset(&key, id)
                .await
                .map_err(store_error)?;
            gw.hub.publish_deleted(key, sync_count).await;
            Ok(ok(json!({ "Dataset": dataset })))
        }
        Route::ListRecords { name, .. } => list_records(gw, api, id, &name, &parts.uri, now).await,
        Route::DescribeIdentityUsage { .. } => {
            let owned = owned_datasets(gw, id).await?;
            let mut usage = json!({
                "IdentityId": id,
                "IdentityPoolId": api.pool_id,
                "DatasetCount": owned.len(),
                "DataStorage": owned.iter().map(|d| d.bytes).sum::<u64>(),
            });
            if let Some(last) = owned.iter().map(|d| d.last_modified).max() {
                usage["LastModifiedDate"] = seconds(last);
            }
            Ok(ok(json!({ "IdentityUsage": usage })))
        }
        // The model's answer for a pool without push sync: the WebSocket is Tandem's push.
        Route::PushSync { .. } => Err(CognitoError::new(
            ErrorType::InvalidConfiguration,
            "Push sync is not configured for this identity pool.",
        )),
        Route::Developer(_) | Route::Unknown => Err(CognitoError::new(
            ErrorType::UnknownOperation,
            "unknown operation",
        )),
    }
}

fn unknown_operation(method: &Method, raw_path: &str) -> CognitoError {
    CognitoError::new(
        ErrorType::UnknownOperation,
        format!("unknown operation {method} {raw_path}"),
    )
}

/// Identity credentials reach only their own identity in the configured pool, and not once
/// the identity was merged into another (its old credentials stop working); the developer
/// reaches any identity of the pool that was not merged away (an id the Identity endpoint
/// never issued is valid too: Cognito's developer may write for any identity id).
async fn authorize(
    gw: &Gateway,
    api: &SyncApi,
    caller: &Caller,
    pool: &str,
    id: &str,
) -> Result<(), CognitoError> {
    match caller {
        Caller::Identity(claims) => {
            if pool != api.pool_id || claims.pool != api.pool_id || id != claims.identity_id {
                return Err(forbidden(id));
            }
        }
        Caller::Developer => {
            if pool != api.pool_id {
                return Err(pool_not_found(pool));
            }
            if tandem_store::validate_identity_id(id).is_err() {
                return Err(invalid(
                    "IdentityId must be <region>:<lowercase uuid>, at most 55 characters",
                ));
            }
        }
    }
    let identity = gw
        .store
        .identity(&gw.config.pool, id)
        .await
        .map_err(store_error)?;
    if identity.is_some_and(|identity| identity.merged_into.is_some()) {
        return Err(forbidden(id));
    }
    Ok(())
}

fn dataset_key(gw: &Gateway, id: &str, name: &str) -> Result<DatasetKey, CognitoError> {
    // botocore and v3 drop `.` and `..` segments before signing, so an all-dot name could
    // never be addressed consistently.
    if name.bytes().all(|b| b == b'.') {
        return Err(invalid(format!("dataset name '{name}' is all dots")));
    }
    let key = DatasetKey::new(gw.config.pool.clone(), id, name);
    key.validate().map_err(store_error)?;
    Ok(key)
}

pub(super) fn pool_not_found(pool: &str) -> CognitoError {
    CognitoError::new(
        ErrorType::ResourceNotFound,
        format!(
            "IdentityPool '{}' not found.",
            pool.chars().take(128).collect::<String>()
        ),
    )
}

fn not_found(name: &str) -> CognitoError {
    CognitoError::new(
        ErrorType::ResourceNotFound,
        format!("Dataset '{name}' not found."),
    )
}

/// Tandem's milliseconds as Cognito's epoch seconds with a millisecond fraction.
pub(super) fn seconds(ms: i64) -> Value {
    json!(ms as f64 / 1000.0)
}

/// The caller's own live datasets, by name (grants are WebSocket-only).
async fn owned_datasets(gw: &Gateway, id: &str) -> Result<Vec<DatasetInfo>, CognitoError> {
    let mut datasets = gw
        .store
        .list_datasets(&gw.config.pool, id)
        .await
        .map_err(store_error)?;
    datasets.retain(|d| d.access == Access::Owner && d.dataset.owner.as_deref() == Some(id));
    datasets.sort_by(|a, b| a.dataset.name.cmp(&b.dataset.name));
    Ok(datasets)
}

/// The `Dataset` shape. The store keeps no creation time per incarnation yet, so
/// `CreationDate` is the last commit's time, and `LastModifiedBy` is the owner.
fn dataset_shape(id: &str, info: &DatasetInfo) -> Value {
    json!({
        "IdentityId": id,
        "DatasetName": info.dataset.name,
        "CreationDate": seconds(info.last_modified),
        "LastModifiedDate": seconds(info.last_modified),
        "LastModifiedBy": id,
        "DataStorage": info.bytes,
        "NumRecords": info.records,
    })
}

async fn describe(gw: &Gateway, key: &DatasetKey) -> Result<Option<Value>, CognitoError> {
    Ok(owned_datasets(gw, &key.owner)
        .await?
        .iter()
        .find(|d| d.dataset.name == key.name)
        .map(|d| dataset_shape(&key.owner, d)))
}

fn record_shape(record: &Record) -> Value {
    let mut shape = json!({
        "Key": record.key,
        "SyncCount": record.sync_count,
        "LastModifiedDate": seconds(record.last_modified),
        "LastModifiedBy": record.last_modified_by,
    });
    // A tombstone has no `Value` at all: Android reads a deletion as null, never "".
    if let Some(value) = &record.value {
        shape["Value"] = json!(value);
    }
    if let Some(device) = record.device_last_modified {
        shape["DeviceLastModifiedDate"] = seconds(device);
    }
    shape
}

#[derive(Deserialize)]
struct DatasetsParams {
    #[serde(rename = "maxResults")]
    max_results: Option<String>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

pub(super) fn query<T: DeserializeOwned>(uri: &axum::http::Uri) -> Result<T, CognitoError> {
    Query::<T>::try_from_uri(uri)
        .map(|Query(params)| params)
        .map_err(|e| invalid(format!("invalid query: {e}")))
}

pub(super) fn page_size(raw: Option<&str>, max: usize) -> Result<usize, CognitoError> {
    match raw {
        None => Ok(max),
        Some(raw) => match raw.parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n.min(max)),
            _ => Err(invalid(format!(
                "maxResults must be a positive integer, not '{raw}'"
            ))),
        },
    }
}

#[derive(Serialize, Deserialize)]
struct DatasetsPage {
    v: u32,
    id: String,
    after: String,
}

async fn list_datasets(
    gw: &Gateway,
    api: &SyncApi,
    id: &str,
    uri: &axum::http::Uri,
) -> Result<Response, CognitoError> {
    let params: DatasetsParams = query(uri)?;
    let max = page_size(params.max_results.as_deref(), MAX_DATASETS_PAGE)?;
    let owned = owned_datasets(gw, id).await?;
    let after = match params.next_token.as_deref() {
        Some(token) => {
            let page: DatasetsPage = open(&api.page_key, token)
                .filter(|p: &DatasetsPage| p.v == TOKEN_VERSION && p.id == id)
                .ok_or_else(|| invalid("invalid nextToken"))?;
            Some(page.after)
        }
        None => None,
    };
    let rest: Vec<&DatasetInfo> = owned
        .iter()
        .filter(|d| after.as_deref().is_none_or(|a| d.dataset.name.as_str() > a))
        .collect();
    let page = &rest[..rest.len().min(max)];
    let datasets: Vec<Value> = page.iter().map(|d| dataset_shape(id, d)).collect();
    let mut body = json!({ "Datasets": datasets, "Count": datasets.len() });
    if rest.len() > page.len()
        && let Some(last) = page.last()
    {
        let token = DatasetsPage {
            v: TOKEN_VERSION,
            id: id.to_owned(),
            after: last.dataset.name.clone(),
        };
        body["NextToken"] = json!(seal(&api.page_key, &token));
    }
    Ok(ok(body))
}

#[derive(Deserialize)]
struct RecordsParams {
    #[serde(rename = "lastSyncCount")]
    last_sync_count: Option<String>,
    #[serde(rename = "maxResults")]
    max_results: Option<String>,
    #[serde(rename = "nextToken")]
    next_token: Option<String>,
}

/// Where a ListRecords page resumes: every page reads at the first page's sync count, so a
/// commit between pages shows on none of them and the next sync picks it up whole.
#[derive(Serialize, Deserialize)]
struct RecordsPage {
    v: u32,
    pool: String,
    id: String,
    name: String,
    since: u64,
    snapshot: u64,
    #[serde(rename = "lastKey")]
    last_key: String,
}

#[derive(Serialize, Deserialize)]
struct SyncSession {
    v: u32,
    pool: String,
    #[serde(rename = "identityId")]
    identity_id: String,
    dataset: String,
    iat: u64,
}

async fn list_records(
    gw: &Gateway,
    api: &SyncApi,
    id: &str,
    name: &str,
    uri: &axum::http::Uri,
    now: SystemTime,
) -> Result<Response, CognitoError> {
    let params: RecordsParams = query(uri)?;
    let since = match params.last_sync_count.as_deref() {
        None | Some("") => 0,
        Some(raw) => raw
            .parse::<u64>()
            .map_err(|_| invalid(format!("lastSyncCount must be a count, not '{raw}'")))?,
    };
    let max = page_size(params.max_results.as_deref(), MAX_RECORDS_PAGE)?;
    let key = dataset_key(gw, id, name)?;
    let resume = match params.next_token.as_deref() {
        Some(token) => Some(
            open::<RecordsPage>(&api.page_key, token)
                .filter(|p| {
                    p.v == TOKEN_VERSION
                        && p.pool == api.pool_id
                        && p.id == id
                        && p.name == name
                        && p.since == since
                })
                .ok_or_else(|| invalid("invalid nextToken"))?,
        ),
        None => None,
    };
    let changes = gw
        .store
        .changes(&key, id, since)
        .await
        .map_err(store_error)?;
    let snapshot = resume.as_ref().map_or(changes.sync_count, |p| p.snapshot);
    let exists = !changes.deleted && changes.sync_count > 0;
    let records: Vec<&Record> = if changes.deleted {
        Vec::new()
    } else {
        changes
            .records
            .iter()
            .filter(|r| r.sync_count <= snapshot)
            // From the start, only what is live; since a count, deletions too.
            .filter(|r| since > 0 || r.value.is_some())
            .filter(|r| resume.as_ref().is_none_or(|p| r.key > p.last_key))
            .collect()
    };
    let page = &records[..records.len().min(max)];
    let merged = gw
        .store
        .merged_dataset_names(&key)
        .await
        .map_err(store_error)?;
    // Also once the dataset was re-created: the client's copy predates a delete.
    let deleted_after = since > 0
        && gw
            .store
            .last_deleted_sync_count(&key)
            .await
            .map_err(store_error)?
            > since;
    let session = SyncSession {
        v: TOKEN_VERSION,
        pool: api.pool_id.clone(),
        identity_id: id.to_owned(),
        dataset: name.to_owned(),
        iat: epoch_secs(now),
    };
    let shapes: Vec<Value> = page.iter().map(|r| record_shape(r)).collect();
    let mut body = json!({
        "Records": shapes,
        "Count": shapes.len(),
        "DatasetSyncCount": snapshot,
        "DatasetExists": exists,
        "DatasetDeletedAfterRequestedSyncCount": deleted_after,
        "SyncSessionToken": seal(&api.session_key, &session),
    });
    if !merged.is_empty() {
        body["MergedDatasetNames"] = json!(merged);
    }
    if records.len() > page.len()
        && let Some(last) = page.last()
    {
        let token = RecordsPage {
            v: TOKEN_VERSION,
            pool: api.pool_id.clone(),
            id: id.to_owned(),
            name: name.to_owned(),
            since,
            snapshot,
            last_key: last.key.clone(),
        };
        body["NextToken"] = json!(seal(&api.page_key, &token));
    }
    Ok(ok(body))
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateBody {
    sync_session_token: Option<String>,
    #[serde(default)]
    record_patches: Vec<RecordPatch>,
    device_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RecordPatch {
    op: String,
    key: String,
    value: Option<String>,
    sync_count: i64,
    device_last_modified_date: Option<f64>,
}

async fn update_records(
    gw: &Gateway,
    api: &SyncApi,
    id: &str,
    name: &str,
    body: &[u8],
    now: SystemTime,
) -> Result<Response, CognitoError> {
    let key = dataset_key(gw, id, name)?;
    let body: UpdateBody =
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid body: {e}")))?;
    let token = body
        .sync_session_token
        .as_deref()
        .ok_or_else(|| invalid("SyncSessionToken is required"))?;
    let session = open::<SyncSession>(&api.session_key, token)
        .filter(|s| {
            let age = epoch_secs(now).saturating_sub(s.iat);
            s.v == TOKEN_VERSION
                && s.pool == api.pool_id
                && s.identity_id == id
                && s.dataset == name
                && age <= SYNC_SESSION_LIFETIME.as_secs()
        })
        .is_some();
    if !session {
        return Err(invalid("Invalid or expired SyncSessionToken."));
    }
    if let Some(device) = &body.device_id
        && (device.is_empty() || device.chars().count() > MAX_DEVICE_ID)
    {
        return Err(invalid(format!(
            "DeviceId must be 1 to {MAX_DEVICE_ID} characters"
        )));
    }
    // Nothing to do: no commit, no dataset created, and an empty list, which is all
    // amazon-cognito-js can be given here without hanging (gotcha 1 is about a non-empty
    // request answered empty).
    if body.record_patches.is_empty() {
        return Ok(ok(json!({ "Records": [] })));
    }
    let patches = body
        .record_patches
        .iter()
        .map(|p| {
            let op = match p.op.as_str() {
                "replace" => PatchOp::Replace,
                "remove" => PatchOp::Remove,
                other => return Err(invalid(format!("unknown Op '{other}'"))),
            };
            let sync_count = u64::try_from(p.sync_count)
                .map_err(|_| invalid(format!("SyncCount of '{}' is negative", p.key)))?;
            Ok(Patch {
                op,
                key: p.key.clone(),
                value: match op {
                    PatchOp::Replace => p.value.clone(),
                    PatchOp::Remove => None,
                },
                sync_count,
                device_last_modified: p.device_last_modified_date.map(|s| (s * 1000.0) as i64),
            })
        })
        .collect::<Result<Vec<Patch>, CognitoError>>()?;
    // The sync hook stands where Cognito's Sync Trigger Lambda stood, with its errors.
    let patches = match crate::hook::check_update(gw, id, &key, body.device_id.as_deref(), patches)
        .await
        .map_err(store_error)?
    {
        crate::hook::Checked::Commit(patches) => patches,
        crate::hook::Checked::Rejected(message) => {
            return Err(CognitoError::new(ErrorType::LambdaRejected, message));
        }
        crate::hook::Checked::LambdaRejected(message) => {
            return Err(CognitoError::new(ErrorType::InvalidLambdaOutput, message));
        }
        crate::hook::Checked::Unavailable(e) => {
            return Err(CognitoError::new(ErrorType::LambdaThrottled, e.to_string()));
        }
    };
    let request = UpdateRequest {
        dataset: key.clone(),
        actor: id.to_owned(),
        device_id: body.device_id.clone(),
        patches,
    };
    match gw.store.update(request).await.map_err(store_error)? {
        UpdateOutcome::Committed { changed, snapshot } => {
            Metrics::add(&gw.metrics().commits, 1);
            // The same publish as a WebSocket `update`: subscribers on every node see it.
            let sync_count = snapshot.sync_count;
            gw.hub
                .publish_commit(
                    Arc::new(snapshot.dataset),
                    sync_count,
                    snapshot.records,
                    changed.clone(),
                )
                .await;
            let mut records = Vec::with_capacity(body.record_patches.len());
            let mut unwritten = Vec::new();
            for patch in &body.record_patches {
                match changed.iter().find(|r| r.key == patch.key) {
                    Some(record) => records.push(record_shape(record)),
                    None => {
                        unwritten.push(records.len());
                        records.push(json!({ "Key": patch.key, "SyncCount": 0 }));
                    }
                }
            }
            // A remove of what is absent or removed wrote nothing: it is answered with the
            // tombstone's count (0 if there is none), one entry per patch all the same.
            if !unwritten.is_empty() {
                let current = gw.store.changes(&key, id, 0).await.map_err(store_error)?;
                for i in unwritten {
                    if let Some(record) = current
                        .records
                        .iter()
                        .find(|r| Some(r.key.as_str()) == records[i]["Key"].as_str())
                    {
                        records[i]["SyncCount"] = json!(record.sync_count);
                    }
                }
            }
            Ok(ok(json!({ "Records": records })))
        }
        UpdateOutcome::Conflict {
            sync_count: _,
            conflicts,
        } => {
            Metrics::add(&gw.metrics().conflicts, 1);
            let message = conflicts
                .first()
                .map(|c| {
                    let sent = body
                        .record_patches
                        .iter()
                        .find(|p| p.key == c.key)
                        .map_or(0, |p| p.sync_count);
                    let server = c.server.as_ref().map_or(0, |r| r.sync_count);
                    format!("Current SyncCount for: {} is: {server} not: {sent}", c.key)
                })
                .unwrap_or_else(|| "a record's SyncCount is stale".to_owned());
            Err(CognitoError::new(ErrorType::ResourceConflict, message))
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn mac(key: &[u8; 32]) -> HmacSha256 {
    // HMAC takes keys of any length.
    match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("hmac accepts any key length"),
    }
}

/// `base64url(json).base64url(HMAC(key, json))`: only `[A-Za-z0-9_.-]`, safe in a query.
fn seal<T: Serialize>(key: &[u8; 32], payload: &T) -> String {
    // Structs of strings and integers always serialise.
    let payload = serde_json::to_vec(payload).unwrap_or_default();
    let mut m = mac(key);
    m.update(&payload);
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(&payload),
        URL_SAFE_NO_PAD.encode(m.finalize().into_bytes())
    )
}

/// The payload of a token [`seal`] made with `key`, or `None` (the MAC is compared in
/// constant time).
fn open<T: DeserializeOwned>(key: &[u8; 32], token: &str) -> Option<T> {
    let (payload, tag) = token.split_once('.')?;
    let payload = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
    let mut m = mac(key);
    m.update(&payload);
    m.verify_slice(&tag).ok()?;
    serde_json::from_slice(&payload).ok()
}

fn epoch_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit;
    use tandem_cognito::SessionClaims;

    const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
    const GUEST: &str = "us-east-1:aaaaaaaa-1111-4111-8111-aaaaaaaaaaaa";
    const INTO: &str = "us-east-1:bbbbbbbb-2222-4222-8222-bbbbbbbbbbbb";

    fn claims(identity: &str, pool: &str) -> Caller {
        Caller::Identity(SessionClaims {
            pool: pool.to_owned(),
            identity_id: identity.to_owned(),
            expiration: SystemTime::now() + Duration::from_secs(3600),
        })
    }

    #[tokio::test]
    async fn test_authorize_allows_only_the_own_live_identity_of_the_pool() {
        let test = testkit::gateway(crate::GatewayConfig {
            cognito: crate::CognitoConfig {
                cognito_identity_pool: Some(POOL.to_owned()),
                credential_secret: Some(vec![3; 32]),
                ..crate::CognitoConfig::default()
            },
            ..crate::GatewayConfig::default()
        });
        let gw = &test.gw;
        let api = gw.cognito_sync.as_ref().unwrap();
        let refused = |r: Result<(), CognitoError>| {
            assert_eq!(r.unwrap_err().error_type, ErrorType::NotAuthorized);
        };
        authorize(gw, api, &claims(GUEST, POOL), POOL, GUEST)
            .await
            .unwrap();
        refused(authorize(gw, api, &claims(GUEST, POOL), POOL, INTO).await);
        refused(authorize(gw, api, &claims(GUEST, "us-east-1:other"), POOL, GUEST).await);
        refused(authorize(gw, api, &claims(GUEST, POOL), "us-east-1:other", GUEST).await);

        // Once merged away, the guest's credentials reach nothing, its old data included.
        let pool = &gw.config.pool;
        gw.store.create_identity(pool, GUEST, true).await.unwrap();
        gw.store.create_identity(pool, INTO, false).await.unwrap();
        gw.store.merge_identity(pool, GUEST, INTO).await.unwrap();
        refused(authorize(gw, api, &claims(GUEST, POOL), POOL, GUEST).await);
        authorize(gw, api, &claims(INTO, POOL), POOL, INTO)
            .await
            .unwrap();
    }

    #[test]
    fn test_route_parses_the_model_paths() {
        let pool = "us-east-1%3Aabc";
        let route = Route::parse(
            &Method::GET,
            &format!("/identitypools/{pool}/identities/us-east-1%3Aid/datasets/d1/records"),
        )
        .unwrap();
        assert_eq!(
            route,
            Route::ListRecords {
                pool: "us-east-1:abc".into(),
                id: "us-east-1:id".into(),
                name: "d1".into()
            }
        );
        assert_eq!(
            Route::parse(&Method::GET, "/identitypools").unwrap(),
            Route::Developer(super::super::admin::DeveloperOp::ListIdentityPoolUsage)
        );
        assert_eq!(
            Route::parse(&Method::POST, "/identitypools/p/identity/i/device").unwrap(),
            Route::PushSync {
                pool: "p".into(),
                id: "i".into()
            }
        );
        assert_eq!(
            Route::parse(&Method::PUT, "/identitypools/p/identities/i/datasets/d").unwrap(),
            Route::Unknown
        );
    }

    #[test]
    fn test_sealed_token_refuses_a_tampered_payload() {
        let key = [7u8; 32];
        let token = seal(
            &key,
            &DatasetsPage {
                v: 1,
                id: "a".into(),
                after: "x".into(),
            },
        );
        assert!(open::<DatasetsPage>(&key, &token).is_some());
        assert!(open::<DatasetsPage>(&[8u8; 32], &token).is_none());
        let forged = seal(
            &[8u8; 32],
            &DatasetsPage {
                v: 1,
                id: "b".into(),
                after: "x".into(),
            },
        );
        let (payload, _) = forged.split_once('.').unwrap();
        let (_, tag) = token.split_once('.').unwrap();
        assert!(open::<DatasetsPage>(&key, &format!("{payload}.{tag}")).is_none());
    }
}
