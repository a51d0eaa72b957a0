//! Getting a JWKS document's bytes: over HTTPS (plain HTTP only to a loopback host) with a
//! size bound, or from a file with the same bound. The caller bounds the time.
//!
//! TLS is rustls with the ring provider; the trusted roots are Mozilla's (bundled) plus the
//! system's store. Redirects are not followed, so a document is read from the URL as
//! configured and never from a downgraded or foreign one.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Uri;
use hyper::header::{ACCEPT, CONTENT_LENGTH, USER_AGENT};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where one issuer's document is read from.
pub(in crate::auth) enum Source {
    Url { uri: Uri, client: Arc<HttpFetcher> },
    File(PathBuf),
}

impl Source {
    /// The URL or path, for logs.
    pub(in crate::auth) fn describe(&self) -> String {
        match self {
            Source::Url { uri, .. } => uri.to_string(),
            Source::File(path) => path.display().to_string(),
        }
    }

    /// The document's bytes, at most `max_bytes` of them.
    pub(in crate::auth) async fn read(&self, max_bytes: usize) -> Result<Bytes, String> {
        match self {
            Source::Url { uri, client } => client.get(uri, max_bytes).await,
            Source::File(path) => read_file(path, max_bytes).await,
        }
    }
}

/// A URL a document may be fetched from: `https://`, or `http://` to a loopback host.
pub(in crate::auth) fn parse_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("jwks url {url:?} is not a valid url"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("jwks url {url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(uri),
        Some("http") if is_loopback(host) => Ok(uri),
        _ => Err(format!(
            "jwks url {url:?} must use https (http only for 127.0.0.1, [::1] or localhost)"
        )),
    }
}

fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The TLS settings of Tandem's outgoing HTTPS calls (JWKS fetches, a pool's SyncTrigger):
/// Mozilla's roots plus the system's, with the ring provider named.
pub(crate) fn client_tls() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    // A host without a system store, or with unreadable entries, still has Mozilla's roots.
    let (added, _ignored) =
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    tracing::debug!(system_roots = added, "https client trust roots loaded");
    // Name the provider instead of relying on a process-wide default, which would be
    // ambiguous if another crate in the build enabled a second one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls setup failed: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One HTTP client for every JWKS URL. Fetches are rare, so no connection is kept idle.
pub(in crate::auth) struct HttpFetcher {
    client: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

impl HttpFetcher {
    pub(in crate::auth) fn new() -> Result<HttpFetcher, String> {
        let tls = client_tls()?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(connector);
        Ok(HttpFetcher { client })
    }

    async fn get(&self, uri: &Uri, max_bytes: usize) -> Result<Bytes, String> {
        let request = hyper::Request::get(uri.clone())
            .header(ACCEPT, "application/jwk-set+json, application/json")
            .header(USER_AGENT, concat!("tandem/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| format!("bad request: {e}"))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("http status {status}"));
        }
        let declared = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.parse::<u64>().ok());
        if declared.is_some_and(|len| len > max_bytes as u64) {
            return Err(too_large(max_bytes));
        }
        let body = Limited::new(response.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    too_large(max_bytes)
                } else {
                    format!("reading the body failed: {e}")
                }
            })?;
        Ok(body.to_bytes())
    }
}

async fn read_file(path: &Path, max_bytes: usize) -> Result<Bytes, String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || read_file_now(&path, max_bytes))
        .await
        .map_err(|e| format!("file read task failed: {e}"))?
}

/// Reads a file of at most `max_bytes`, blocking; at start, and on a blocking thread after.
pub(in crate::auth) fn read_file_now(path: &Path, max_bytes: usize) -> Result<Bytes, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() > max_bytes {
        return Err(too_large(max_bytes));
    }
    Ok(Bytes::from(bytes))
}

fn too_large(max_bytes: usize) -> String {
    format!("document larger than max_document_bytes {max_bytes}")
}

/// hyper's top-level errors say little ("client error (Connect)"); the causes say why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
