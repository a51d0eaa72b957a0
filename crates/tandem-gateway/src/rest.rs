//! The REST API (docs/PROTOCOL.md §10): `/v1/datasets/{owner}/{name}/…` with the same JWT
//! as the WebSocket's `auth`, in `Authorization: Bearer`, the pool the WebSocket uses, and
//! JSON errors with the protocol's codes (`{"type":"error","code","message"}`, plus `limit`
//! and `max` for a limit) under an HTTP status that says the same. Each handler is the
//! WebSocket request of the same name (see `history`).

use crate::Gateway;
use crate::history::{self, Page};
use crate::throttle::Event;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tandem_protocol::{DatasetRef, ErrorCode, HistoryEntry, Record, ServerFrame};
use tandem_store::{DatasetKey, StoreError};

/// The HTTP status of an error code.
fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest | ErrorCode::LimitExceeded => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::HistoryUnavailable => StatusCode::GONE,
    }
}

/// An error frame (without an id) as a response, counted as the WebSocket's are.
fn error_frame(gw: &Gateway, frame: ServerFrame) -> Response {
    let status = match &frame {
        ServerFrame::Error { code, .. } => {
            gw.metrics().error(*code);
            status_of(*code)
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        frame.to_json(),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

fn error(gw: &Gateway, code: ErrorCode, message: impl Into<String>) -> Response {
    error_frame(gw, ServerFrame::error(None, code, message))
}

fn store_error(gw: &Gateway, e: &StoreError) -> Response {
    error_frame(gw, crate::session::store_error(None, e))
}

fn json<T: Serialize>(body: &T) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(body).unwrap_or_default(),
    )
        .into_response()
}

/// The caller's identity from its bearer token, within its request rate; or the refusal
/// (boxed: a response is large, the identity small).
fn authenticate(gw: &Gateway, headers: &HeaderMap) -> Result<String, Box<Response>> {
    let Some(token) = crate::bearer_token(headers) else {
        return Err(Box::new(error(
            gw,
            ErrorCode::Unauthorized,
            "send the token as `Authorization: Bearer <jwt>`",
        )));
    };
    let identity = match gw.verifier.verify(token) {
        Ok(identity) => identity.sub,
        Err(e) => {
            if gw.throttle.record(Event::TokenRefused) {
                tracing::info!(error = %e, "token refused on the REST API");
            }
            return Err(Box::new(error(gw, ErrorCode::Unauthorized, e.to_string())));
        }
    };
    if let Err(wait) = gw.rest_rate.take(&identity) {
        let (limit, max) = gw.rest_rate.limit();
        let mut response = error_frame(
            gw,
            ServerFrame::limit_error(
                None,
                limit,
                max,
                format!("more than {max} REST requests per second; retry after {wait:?}"),
            ),
        );
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        return Err(Box::new(response));
    }
    Ok(identity)
}

/// The dataset a path names, in the node's pool.
fn dataset(gw: &Gateway, owner: String, name: String) -> Result<DatasetKey, Box<Response>> {
    let key = DatasetKey::new(gw.config.pool.clone(), owner, name);
    key.validate().map_err(|e| Box::new(store_error(gw, &e)))?;
    Ok(key)
}

fn bad_path(gw: &Gateway, e: PathRejection) -> Response {
    error(
        gw,
        ErrorCode::BadRequest,
        format!("invalid path: {}", e.body_text()),
    )
}

#[derive(Deserialize)]
pub(crate) struct HistoryQuery {
    before: Option<i64>,
    limit: Option<u32>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct HistoryBody {
    dataset: DatasetRef,
    sync_count: u64,
    entries: Vec<HistoryEntry>,
    next: Option<i64>,
}

/// `GET /v1/datasets/{owner}/{name}/history?before=&limit=`
pub(crate) async fn get_history(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let identity = match authenticate(&gw, &headers) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let Path((owner, name)) = match path {
        Ok(path) => path,
        Err(e) => return bad_path(&gw, e),
    };
    let Query(query) = match query {
        Ok(query) => query,
        Err(e) => {
            return error(
                &gw,
                ErrorCode::BadRequest,
                format!("invalid query: {}", e.body_text()),
            );
        }
    };
    let key = match dataset(&gw, owner, name) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    match history::history(&gw, &identity, &key, query.before, query.limit).await {
        Ok(Page {
            sync_count,
            entries,
            next,
        }) => json(&HistoryBody {
            dataset: key.to_ref(),
            sync_count,
            entries,
            next,
        }),
        Err(e) => store_error(&gw, &e),
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ReadAtBody {
    dataset: DatasetRef,
    sync_count: u64,
    records: Vec<Record>,
}

/// `GET /v1/datasets/{owner}/{name}/at/{syncCount}`
pub(crate) async fn get_at(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let identity = match authenticate(&gw, &headers) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let Path((owner, name, sync_count)) = match path {
        Ok(path) => path,
        Err(e) => return bad_path(&gw, e),
    };
    let Ok(sync_count) = sync_count.parse::<u64>() else {
        return error(
            &gw,
            ErrorCode::BadRequest,
            "the sync count must be a non-negative integer",
        );
    };
    let key = match dataset(&gw, owner, name) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    match gw.store.read_at(&key, &identity, sync_count).await {
        Ok(snapshot) => json(&ReadAtBody {
            dataset: key.to_ref(),
            sync_count: snapshot.sync_count,
            records: snapshot.records,
        }),
        Err(e) => store_error(&gw, &e),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RestoreRequest {
    sync_count: u64,
    #[serde(default)]
    device_id: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RestoreBody {
    dataset: DatasetRef,
    sync_count: u64,
}

/// `POST /v1/datasets/{owner}/{name}/restore` with `{"syncCount": n, "deviceId"?: "…"}`
pub(crate) async fn post_restore(
    State(gw): State<Arc<Gateway>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let identity = match authenticate(&gw, &headers) {
        Ok(identity) => identity,
        Err(response) => return *response,
    };
    let Path((owner, name)) = match path {
        Ok(path) => path,
        Err(e) => return bad_path(&gw, e),
    };
    let max = gw.config.max_rest_body_bytes;
    let Ok(body) = axum::body::to_bytes(body, max).await else {
        return error_frame(
            &gw,
            ServerFrame::limit_error(
                None,
                tandem_protocol::LimitCode::MaxRestBodyBytes,
                max as u64,
                format!("request body larger than {max} bytes"),
            ),
        );
    };
    let request: RestoreRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(&gw, ErrorCode::BadRequest, format!("invalid body: {e}")),
    };
    let key = match dataset(&gw, owner, name) {
        Ok(key) => key,
        Err(response) => return *response,
    };
    match history::restore(&gw, &identity, &key, request.sync_count, request.device_id).await {
        Ok(sync_count) => json(&RestoreBody {
            dataset: key.to_ref(),
            sync_count,
        }),
        Err(e) => error_frame(&gw, e.frame(None)),
    }
}
