//! Keys from a JWKS URL, served by a local HTTP server on 127.0.0.1:0 whose document the test
//! rotates: the first fetch, a new `kid` picked up after one refresh, a flood of unknown kids
//! costing no more fetches, documents over the size bound refused (with and without a
//! declared length), and a server that never answers cut off by the fetch timeout. Real time,
//! except for the timeout: the cooldown here is long enough that no test waits it out (the
//! timing of refreshes is pinned under paused time in `jwks`).

use super::*;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use parking_lot::Mutex;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::CancellationToken;

const ISSUER: &str = "https://login.example";

/// A JWKS endpoint whose document can be swapped, counting the requests it serves.
#[derive(Clone)]
struct JwksServer {
    document: Arc<Mutex<String>>,
    hits: Arc<AtomicU64>,
}

impl JwksServer {
    /// Serves `/jwks.json` (the document), `/chunked.json` (the same without a declared
    /// length) and `/missing.json` (404) on a loopback port; returns the base URL.
    async fn start(document: String, shutdown: &CancellationToken) -> (JwksServer, String) {
        let server = JwksServer {
            document: Arc::new(Mutex::new(document)),
            hits: Arc::new(AtomicU64::new(0)),
        };
        let app = Router::new()
            .route("/jwks.json", get(document_handler))
            .route("/chunked.json", get(chunked_handler))
            .route("/missing.json", get(|| async { StatusCode::NOT_FOUND }))
            .with_state(server.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        (server, base)
    }

    fn publish(&self, document: String) {
        *self.document.lock() = document;
    }

    fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn document_handler(State(server): State<JwksServer>) -> String {
    server.hits.fetch_add(1, Ordering::SeqCst);
    server.document.lock().clone()
}

async fn chunked_handler(State(server): State<JwksServer>) -> Body {
    server.hits.fetch_add(1, Ordering::SeqCst);
    let document = server.document.lock().clone();
    let chunks: Vec<Result<String, std::io::Error>> = document
        .as_bytes()
        .chunks(64)
        .map(|chunk| Ok(String::from_utf8_lossy(chunk).into_owned()))
        .collect();
    Body::from_stream(futures_util::stream::iter(chunks))
}

fn url_verifier(url: String, jwks: &JwksConfig) -> Verifier {
    let issuer = IssuerConfig {
        issuer: ISSUER.to_owned(),
        keys: KeySource::JwksUrl(url),
        audience: Some("app".to_owned()),
        subject_prefix: None,
    };
    Verifier::with_issuers(&AuthConfig::default(), &[issuer], jwks).unwrap()
}

fn signed(private_pem: &[u8], kid: &str) -> String {
    let claims = json!({ "sub": "alice", "exp": now() + 600, "iss": ISSUER, "aud": "app" });
    rs256_kid(private_pem, kid, &claims)
}

fn stats(verifier: &Verifier) -> JwksStats {
    verifier.jwks_stats().remove(0)
}

#[tokio::test]
async fn test_auth_jwks_url_key_rotation_is_picked_up_with_one_fetch() {
    let shutdown = CancellationToken::new();
    let (server, base) = JwksServer::start(jwks_doc(&[rsa_jwk(RSA_PUBLIC, "a")]), &shutdown).await;
    let jwks = JwksConfig {
        unknown_kid_cooldown: Duration::from_secs(3600),
        ..JwksConfig::default()
    };
    let verifier = url_verifier(format!("{base}/jwks.json"), &jwks);

    // Before the first fetch the issuer's tokens are refused with a reason to retry.
    let token_a = signed(RSA_PRIVATE, "a");
    assert_eq!(verifier.verify(&token_a), Err(AuthError::KeysNotLoaded));
    assert_eq!(AuthError::KeysNotLoaded.code(), ErrorCode::Unauthorized);
    let _tasks = verifier.spawn_refresh(&shutdown);
    until("key a", || verifier.verify(&token_a).is_ok()).await;

    // The document switches to key B; a token signed with B asks for one refresh.
    server.publish(jwks_doc(&[rsa_jwk(RSA_OTHER_PUBLIC, "b")]));
    let token_b = signed(RSA_OTHER_PRIVATE, "b");
    assert_eq!(verifier.verify(&token_b), Err(AuthError::UnknownKeyId));
    until("key b", || verifier.verify(&token_b).is_ok()).await;
    assert_eq!(verifier.verify(&token_b).unwrap().sub, "alice");
    // A is retired, not gone: tokens it signed before the rotation still verify.
    assert_eq!(verifier.verify(&token_a).unwrap().sub, "alice");

    // Tokens naming keys nobody published are refused, and cost no fetch within the cooldown.
    for n in 0..20 {
        let claims = json!({ "sub": "alice", "exp": now() + 600, "iss": ISSUER, "aud": "app" });
        let token = es256_kid(EC_PRIVATE, &format!("unknown-{n}"), &claims);
        assert_eq!(verifier.verify(&token), Err(AuthError::UnknownKeyId));
    }
    let seen = stats(&verifier);
    assert_eq!(seen.refresh_requests, 1, "{seen:?}");
    assert_eq!(server.hits(), 2, "the first fetch and one refresh");
    assert_eq!((seen.keys, seen.failures), (2, 0), "{seen:?}");
    shutdown.cancel();
}

#[tokio::test]
async fn test_auth_jwks_url_refuses_documents_over_the_size_bound() {
    let shutdown = CancellationToken::new();
    let document = jwks_doc(&[rsa_jwk(RSA_PUBLIC, "a")]);
    let size = document.len();
    let (_server, base) = JwksServer::start(document, &shutdown).await;
    let token = signed(RSA_PRIVATE, "a");

    for path in ["jwks.json", "chunked.json"] {
        let small = JwksConfig {
            max_document_bytes: size - 1,
            ..JwksConfig::default()
        };
        let verifier = url_verifier(format!("{base}/{path}"), &small);
        let _tasks = verifier.spawn_refresh(&shutdown);
        until("a refused fetch", || stats(&verifier).failures >= 1).await;
        assert!(!stats(&verifier).loaded, "{path}");
        assert_eq!(
            verifier.verify(&token),
            Err(AuthError::KeysNotLoaded),
            "{path}"
        );

        let exact = JwksConfig {
            max_document_bytes: size,
            ..JwksConfig::default()
        };
        let verifier = url_verifier(format!("{base}/{path}"), &exact);
        let _tasks = verifier.spawn_refresh(&shutdown);
        until("key a", || verifier.verify(&token).is_ok()).await;
    }
    shutdown.cancel();
}

#[tokio::test]
async fn test_auth_jwks_url_error_status_is_a_failed_fetch() {
    let shutdown = CancellationToken::new();
    let (_server, base) = JwksServer::start(jwks_doc(&[]), &shutdown).await;
    let verifier = url_verifier(format!("{base}/missing.json"), &JwksConfig::default());
    let _tasks = verifier.spawn_refresh(&shutdown);
    until("a failed fetch", || stats(&verifier).failures >= 1).await;
    let seen = stats(&verifier);
    assert!(!seen.loaded && seen.keys == 0, "{seen:?}");
    shutdown.cancel();
}

#[tokio::test(start_paused = true)]
async fn test_auth_jwks_url_fetch_that_never_answers_times_out() {
    // The kernel completes the connection, but nothing ever answers the request.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/jwks.json", silent.local_addr().unwrap());
    let jwks = JwksConfig {
        fetch_timeout: Duration::from_secs(5),
        ..JwksConfig::default()
    };
    let verifier = url_verifier(url, &jwks);
    let shutdown = CancellationToken::new();
    let _tasks = verifier.spawn_refresh(&shutdown);
    // Paused time runs ahead while the fetch waits, so the timeout ends it at once.
    until("a timed-out fetch", || stats(&verifier).failures >= 1).await;
    assert!(!stats(&verifier).loaded);
    shutdown.cancel();
}
