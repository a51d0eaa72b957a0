//! The demo page and the JS SDK, embedded in the binary, and the dev-mode token endpoint.
//! Minting tokens over HTTP exists only when the operator asked for dev mode explicitly.
//!
//! The SDK is served twice: `/sdk/tandem.js`, the readable source, never cached, and
//! `/sdk/{version}/tandem.js`, the minified build (`clients/js/dist`, committed and checked
//! by the JS tests, so that building the server needs no node), cached for good because its
//! path changes with every version.

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
const SDK_MIN_JS: &str = include_str!("../../../clients/js/dist/tandem.min.js");
const SDK_MIN_JS_GZ: &[u8] = include_bytes!("../../../clients/js/dist/tandem.min.js.gz");

/// The SDK's version, as its source states it (`export const VERSION = '…';`).
fn sdk_version() -> &'static str {
    const MARK: &str = "export const VERSION = '";
    SDK_JS
        .split_once(MARK)
        .and_then(|(_, rest)| rest.split_once('\''))
        .map_or("", |(version, _)| version)
}

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

/// `GET /sdk/{version}/tandem.js`: the minified SDK of this version (other versions: 404),
/// gzip-encoded when the client accepts it.
pub(crate) async fn sdk_versioned(Path(version): Path<String>, headers: HeaderMap) -> Response {
    if version != sdk_version() {
        return (
            StatusCode::NOT_FOUND,
            format!(
                "this server has the JS SDK {} only: /sdk/{}/tandem.js",
                sdk_version(),
                sdk_version()
            ),
        )
            .into_response();
    }
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(accepts_gzip);
    let common = [
        (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
        (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        (header::VARY, "accept-encoding"),
    ];
    if gzip {
        (common, [(header::CONTENT_ENCODING, "gzip")], SDK_MIN_JS_GZ).into_response()
    } else {
        (common, SDK_MIN_JS).into_response()
    }
}

/// Whether an `Accept-Encoding` value allows gzip (`gzip` or `*`, without `q=0`).
fn accepts_gzip(value: &str) -> bool {
    value.split(',').any(|part| {
        let mut it = part.split(';');
        let coding = it.next().unwrap_or("").trim();
        let refused = it.any(|p| {
            p.trim()
                .strip_prefix("q=")
                .and_then(|q| q.trim().parse::<f32>().ok())
                .is_some_and(|q| q == 0.0)
        });
        (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_version_is_read_from_the_source_and_names_the_minified_build() {
        let v = sdk_version();
        assert!(!v.is_empty() && v.split('.').count() == 3, "version {v:?}");
        // The minified build starts with a banner naming its version: built from this source.
        assert!(
            SDK_MIN_JS.starts_with("/*! @tandem/client ") && SDK_MIN_JS.contains(&format!(" {v} ")),
            "clients/js/dist/tandem.min.js is not the build of version {v}: run `npm run build` in clients/js"
        );
        assert_eq!(&SDK_MIN_JS_GZ[..2], &[0x1f, 0x8b], "gzip magic");
    }

    #[test]
    fn accept_encoding() {
        assert!(accepts_gzip("gzip"));
        assert!(accepts_gzip("br, GZIP;q=0.5"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("identity"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("br"));
    }
}
