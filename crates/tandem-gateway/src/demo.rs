//! The demo page and the JS SDK, embedded in the binary, and the dev-mode token endpoint.
//! Minting tokens over HTTP exists only when the operator asked for dev mode explicitly.

use crate::Gateway;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_protocol::ErrorCode;

const INDEX_HTML: &str = include_str!("demo/index.html");
const APP_JS: &str = include_str!("demo/app.js");
const STYLE_CSS: &str = include_str!("demo/style.css");
const SDK_JS: &str = include_str!("../../../clients/js/src/tandem.js");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

pub(crate) async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub(crate) async fn sdk() -> Response {
    asset("text/javascript; charset=utf-8", SDK_JS)
}

pub(crate) async fn file(Path(name): Path<String>) -> Response {
    match name.as_str() {
        "app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        "index.html" => asset("text/html; charset=utf-8", INDEX_HTML),
        _ => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

/// `GET /dev/token?sub=NAME`: a one-hour token for anyone who asks. Dev mode only.
/// Its origin is checked by the router; a page on a name rebound to 127.0.0.1 is refused here.
pub(crate) async fn token(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(secret) = &gw.config.dev_token_secret else {
        return crate::error_response(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "dev mode is off: tokens come from your app's own auth (start with --dev to try the demo)",
        );
    };
    if let Some(refused) = crate::origin::refuse_foreign_host(&gw, &headers) {
        return refused;
    }
    let Some(sub) = query.get("sub").filter(|s| !s.is_empty()) else {
        return crate::error_response(
            StatusCode::BAD_REQUEST,
            ErrorCode::BadRequest,
            "missing query parameter `sub`",
        );
    };
    match tandem_token::mint_hs256(secret, sub, Duration::from_secs(3600), None, None) {
        Ok(token) => axum::Json(serde_json::json!({ "token": token })).into_response(),
        Err(e) => {
            let e = crate::AuthError::from(e);
            crate::error_response(StatusCode::BAD_REQUEST, e.code(), e.to_string())
        }
    }
}
