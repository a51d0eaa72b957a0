//! Which browser pages may call this node, and which names `/dev/token` answers to.
//!
//! Browsers send `Origin` with every WebSocket upgrade and with cross-site requests; native
//! clients (the Rust SDK, Node, curl) send none, and a request without one is not checked.
//! The check keeps other sites' pages from using a visitor's browser against the node; it is
//! not authentication (tokens are). A page the node serves itself (same origin: the demo, the
//! JS SDK's browser tests) always passes; any other origin must be listed in
//! `allowed_origins`, where `*` allows every origin. Others get HTTP 403.
//!
//! Dev mode's `/dev/token` mints tokens for anyone who can reach it, which loopback-only
//! listening limits to this machine, except for DNS rebinding: a page whose own name now
//! resolves to 127.0.0.1 is same-origin with itself. Its requests carry its own name in
//! `Host`, so `/dev/token` answers only requests addressed to `localhost`, `127.0.0.1` or
//! `[::1]` at the node's port, or to a host named in `allowed_origins`.

use crate::Gateway;
use crate::throttle::Event;
use axum::extract::{Request, State};
use axum::http::header::{HOST, ORIGIN};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use serde::{Deserialize, Deserializer};
use std::sync::Arc;
use tandem_protocol::ErrorCode;

/// The longest piece of a refused header repeated in a reply or a log line.
const ECHO_CHARS: usize = 200;

/// A middleware for the routes a browser may call cross-site: refuses a request whose
/// `Origin` is neither this node's nor allowed.
pub(crate) async fn guard(
    State(gw): State<Arc<Gateway>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    if let Some(origin) = headers.get(ORIGIN) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        let host = host(headers, &request);
        if !allowed(&origin, host.as_deref(), &gw.config.allowed_origins) {
            let origin: String = origin.chars().take(ECHO_CHARS).collect();
            if gw.throttle.record(Event::OriginRefused) {
                tracing::info!(%origin, path = request.uri().path(), "origin refused");
            }
            return crate::error_response(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!(
                    "origin `{origin}` may not call this node: add it to allowed_origins (--allowed-origins)"
                ),
            );
        }
    }
    next.run(request).await
}

/// The refusal of a dev-mode request addressed to a name other than this machine's loopback
/// at the node's port or a host of `allowed_origins`; `None` when it may go on.
pub(crate) fn refuse_foreign_host(gw: &Gateway, headers: &HeaderMap) -> Option<Response> {
    let host = headers
        .get(HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned());
    if dev_host_allowed(
        host.as_deref(),
        gw.config.listen_port,
        &gw.config.allowed_origins,
    ) {
        return None;
    }
    let host: String = host.unwrap_or_default().chars().take(ECHO_CHARS).collect();
    if gw.throttle.record(Event::HostRefused) {
        tracing::info!(%host, "dev token refused for a foreign host");
    }
    Some(crate::error_response(
        StatusCode::FORBIDDEN,
        ErrorCode::Forbidden,
        format!(
            "host `{host}` is not this machine: /dev/token answers only requests to localhost, 127.0.0.1 or [::1] (dev mode)"
        ),
    ))
}

/// The request's `Host` (HTTP/1.1), or its URI's authority (HTTP/2).
fn host(headers: &HeaderMap, request: &Request) -> Option<String> {
    headers
        .get(HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .or_else(|| request.uri().authority().map(|a| a.to_string()))
}

/// Whether a request with `origin` to `host` passes: same origin, listed, or `*` listed.
/// `allowed` holds entries as [`parse`] wrote them.
pub(crate) fn allowed(origin: &str, host: Option<&str>, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == "*") {
        return true;
    }
    let Some((scheme, authority)) = split(origin) else {
        // `null` (a sandboxed frame, a file) and anything malformed.
        return false;
    };
    let same_origin = host
        .is_some_and(|host| authority == strip_default_port(&scheme, &host.to_ascii_lowercase()));
    same_origin
        || allowed
            .iter()
            .filter_map(|a| split(a))
            .any(|(s, a)| s == scheme && a == authority)
}

/// Whether `/dev/token` answers a request addressed to `host` on a node listening on `port`
/// (0: any port).
fn dev_host_allowed(host: Option<&str>, port: u16, allowed: &[String]) -> bool {
    let Some(host) = host.map(str::to_ascii_lowercase) else {
        return false;
    };
    let (name, host_port) = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, tail)) => (format!("[{ip}]"), tail.strip_prefix(':')),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, p)) => (name.to_owned(), Some(p)),
            None => (host.clone(), None),
        },
    };
    let host_port = match host_port {
        Some(p) => p.parse::<u16>().ok(),
        None => Some(80),
    };
    let loopback = matches!(name.as_str(), "localhost" | "127.0.0.1" | "[::1]");
    if loopback && host_port.is_some_and(|p| port == 0 || p == port) {
        return true;
    }
    allowed
        .iter()
        .filter_map(|a| split(a))
        .any(|(scheme, authority)| strip_default_port(&scheme, &host) == authority)
}

/// `scheme://authority` in lower case with the scheme's default port left out (as browsers
/// write `Origin`), or `None` when it is not one.
fn split(origin: &str) -> Option<(String, String)> {
    let origin = origin.trim().to_ascii_lowercase();
    let (scheme, authority) = origin.split_once("://")?;
    let valid_scheme = scheme
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    let valid_authority = !authority.is_empty()
        && !authority
            .chars()
            .any(|c| c.is_whitespace() || "/?#@".contains(c));
    (valid_scheme && valid_authority)
        .then(|| (scheme.to_owned(), strip_default_port(scheme, authority)))
}

fn strip_default_port(scheme: &str, authority: &str) -> String {
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return authority.to_owned(),
    };
    authority
        .strip_suffix(default)
        .unwrap_or(authority)
        .to_owned()
}

/// One `allowed_origins` entry as a setting gives it: `*`, or an origin
/// (`https://app.example.com`, `http://localhost:3000`; a trailing `/` is dropped), written
/// back in the form requests are compared with.
pub(crate) fn parse(entry: &str) -> Result<String, String> {
    let entry = entry.trim();
    if entry == "*" {
        return Ok(entry.to_owned());
    }
    split(entry.strip_suffix('/').unwrap_or(entry))
        .map(|(scheme, authority)| format!("{scheme}://{authority}"))
        .ok_or_else(|| {
            format!(
                "invalid origin `{entry}`: expected scheme://host[:port] (e.g. https://app.example.com) or *"
            )
        })
}

/// `allowed_origins` from a settings file, each entry through [`parse`].
pub(crate) fn deserialize_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|entry| parse(entry).map_err(serde::de::Error::custom))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(entries: &[&str]) -> Vec<String> {
        entries.iter().map(|e| parse(e).unwrap()).collect()
    }

    #[test]
    fn test_origin_same_origin_passes_without_settings() {
        assert!(allowed(
            "http://127.0.0.1:7420",
            Some("127.0.0.1:7420"),
            &[]
        ));
        assert!(allowed(
            "http://LOCALHOST:7420",
            Some("localhost:7420"),
            &[]
        ));
        // Behind a TLS proxy that keeps the name: the default port is implied on both sides.
        assert!(allowed(
            "https://sync.example.com",
            Some("sync.example.com"),
            &[]
        ));
        assert!(allowed(
            "https://sync.example.com",
            Some("sync.example.com:443"),
            &[]
        ));
        assert!(!allowed(
            "http://127.0.0.1:7421",
            Some("127.0.0.1:7420"),
            &[]
        ));
        assert!(!allowed(
            "https://evil.example",
            Some("127.0.0.1:7420"),
            &[]
        ));
        assert!(!allowed("https://evil.example", None, &[]));
        assert!(!allowed("null", Some("127.0.0.1:7420"), &[]));
    }

    #[test]
    fn test_origin_listed_and_wildcard() {
        let listed = list(&["https://App.example.com/", "http://localhost:3000"]);
        assert!(allowed(
            "https://app.example.com",
            Some("sync.example.com"),
            &listed
        ));
        assert!(allowed(
            "http://localhost:3000",
            Some("127.0.0.1:7420"),
            &listed
        ));
        assert!(!allowed(
            "http://app.example.com",
            Some("sync.example.com"),
            &listed
        ));
        assert!(!allowed("https://app.example.com.evil", Some("x"), &listed));
        // The node's own pages still pass when others are listed.
        assert!(allowed(
            "http://127.0.0.1:7420",
            Some("127.0.0.1:7420"),
            &listed
        ));
        let any = list(&["*"]);
        assert!(allowed(
            "https://evil.example",
            Some("127.0.0.1:7420"),
            &any
        ));
        assert!(allowed("null", None, &any));
    }

    #[test]
    fn test_origin_entries_are_checked_and_normalized() {
        assert_eq!(
            parse("https://a.example.com:443/").unwrap(),
            "https://a.example.com"
        );
        assert_eq!(
            parse(" HTTP://Dev.Local:8080 ").unwrap(),
            "http://dev.local:8080"
        );
        assert_eq!(parse("*").unwrap(), "*");
        for bad in [
            "app.example.com",
            "https://",
            "https://a.example.com/app",
            "null",
            "",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        let from_file: Result<crate::GatewayConfig, _> =
            serde_json::from_str(r#"{"allowed_origins": ["https://ok.example", "nope"]}"#);
        assert!(
            from_file
                .unwrap_err()
                .to_string()
                .contains("invalid origin `nope`")
        );
    }

    #[test]
    fn test_origin_dev_host_is_loopback_at_the_port_or_configured() {
        for host in [
            "localhost:7420",
            "127.0.0.1:7420",
            "[::1]:7420",
            "LocalHost:7420",
        ] {
            assert!(dev_host_allowed(Some(host), 7420, &[]), "{host}");
        }
        for host in [
            "evil.example:7420",
            "localhost:7421",
            "localhost",
            "127.0.0.1.evil.example:7420",
            "[::1]",
            "localhost:x",
        ] {
            assert!(!dev_host_allowed(Some(host), 7420, &[]), "{host}");
        }
        assert!(!dev_host_allowed(None, 7420, &[]));
        assert!(dev_host_allowed(Some("localhost"), 80, &[]));
        let listed = list(&["http://devbox.lan:7420", "*"]);
        assert!(dev_host_allowed(Some("devbox.lan:7420"), 7420, &listed));
        assert!(!dev_host_allowed(Some("evil.example:7420"), 7420, &listed));
    }
}
