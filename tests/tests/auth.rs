//! Authentication end to end: refused tokens (expired, not yet valid, wrongly signed,
//! `alg: none`, algorithm confusion, wrong issuer or audience) get `unauthorized` and close
//! 4500 without touching data; RS256 and ES256 keys work; requests before `auth` are refused
//! on an open connection; no `auth` at all closes with 4004; a bearer header authenticates
//! at the upgrade, and a bad one refuses the upgrade.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::crypto::{CryptoProvider, rust_crypto};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tandem_client::{ClientError, Connection, UpdateResult};
use tandem_gateway::AuthError;
use tandem_protocol::{
    ClientFrame, CloseCode, DatasetRef, ErrorCode, Patch, Record, RequestId, ServerFrame,
};
use tandem_tests::{SECRET, TestServer, fixture};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long any single reply or close may take before a test fails.
const WAIT: Duration = Duration::from_secs(10);

const OTHER_SECRET: &str = "another-secret-0123456789abcdef0123456789abcdef";
const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "tandem";

fn now() -> i64 {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    i64::try_from(secs).unwrap()
}

/// Valid claims for `sub` for the next hour.
fn claims(sub: &str) -> Value {
    json!({ "sub": sub, "iat": now(), "exp": now() + 3600 })
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    // jsonwebtoken needs a process-wide crypto provider; the gateway installs the same one.
    let _ = CryptoProvider::install_default(&rust_crypto::DEFAULT_PROVIDER);
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

fn hs256(secret: &[u8], claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret), claims)
}

fn rs256(private_key: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private_key)).unwrap();
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
        claims,
    )
}

fn es256(private_key: &str, claims: &Value) -> String {
    let pem = std::fs::read(fixture(private_key)).unwrap();
    sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
        claims,
    )
}

/// An unsigned token: header `{"alg":"none"}`, an empty signature part.
fn alg_none(claims: &Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({ "alg": "none", "typ": "JWT" }).to_string());
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    format!("{header}.{payload}.")
}

/// The algorithm-confusion attack: HS256 "signed" with the RSA public key's PEM bytes as
/// the HMAC secret, which a naive verifier would accept with the RS256 key.
fn hs256_with_rsa_public_key(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa_public.pem")).unwrap();
    hs256(&pem, claims)
}

fn path_arg(path: PathBuf) -> String {
    path.display().to_string()
}

/// A server that accepts RS256 tokens only (no HS256 secret).
fn rsa_server() -> TestServer {
    TestServer::builder()
        .without_secret()
        .arg("--jwt-rsa-public-key", path_arg(fixture("rsa_public.pem")))
        .start()
}

async fn stored(conn: &Connection, ds: &DatasetRef) -> (u64, Vec<Record>) {
    conn.changes(ds.clone(), 0).await.unwrap()
}

/// Writes one record to the owner's "notes" (once) and returns what is stored.
async fn seed_notes(owner: &Connection) -> (u64, Vec<Record>) {
    let ds = DatasetRef::own("notes");
    if stored(owner, &ds).await.0 == 0 {
        let r = owner
            .update(ds.clone(), None, vec![Patch::replace("k", "v", 0)])
            .await
            .unwrap();
        assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    }
    stored(owner, &ds).await
}

/// Sends `auth` with `token` and, right behind it, an update to the owner's "notes".
/// Asserts the token is answered with `unauthorized` and the message of `expected`, the
/// connection is closed with 4500, the update is never answered, and the owner's data is
/// unchanged.
async fn assert_token_refused(
    server: &TestServer,
    owner: &Connection,
    token: &str,
    expected: AuthError,
) {
    let before = seed_notes(owner).await;
    let mut conn = Connection::open(&server.url(), None).await.unwrap();
    let auth = ClientFrame::Auth {
        id: Some(RequestId::Str("auth".into())),
        token: token.to_owned(),
        features: Vec::new(),
    };
    let update = ClientFrame::Update {
        id: RequestId::Str("update".into()),
        dataset: DatasetRef::new(owner.identity(), "notes"),
        device_id: None,
        patches: vec![Patch::replace("k", "stolen", before.0)],
    };
    conn.send_text(auth.to_json()).unwrap();
    conn.send_text(update.to_json()).unwrap();

    match conn.next_event_timeout(WAIT).await {
        Some(ServerFrame::Error {
            id,
            code,
            message,
            limit,
            max,
        }) => {
            assert_eq!(id, Some(RequestId::Str("auth".into())));
            assert_eq!(code, ErrorCode::Unauthorized, "{message}");
            assert_eq!(message, expected.to_string());
            assert_eq!((limit, max), (None, None));
        }
        other => panic!("expected an unauthorized error, got {other:?}"),
    }
    let closed = tokio::time::timeout(WAIT, conn.wait_closed())
        .await
        .expect("the server closes the connection");
    assert_eq!(
        closed.code,
        Some(CloseCode::Unauthorized.code()),
        "{closed:?}"
    );
    assert_eq!(closed.reason, CloseCode::Unauthorized.reason());
    // The pipelined update got no answer at all: the session ended at the refused token.
    assert_eq!(conn.next_event_timeout(WAIT).await, None);

    assert_eq!(stored(owner, &DatasetRef::own("notes")).await, before);
    owner.ping().await.unwrap();
}

/// Asserts `result` is a refusal with `code`; returns the message.
#[track_caller]
fn assert_error<T: std::fmt::Debug>(result: Result<T, ClientError>, code: ErrorCode) -> String {
    match result {
        Err(ClientError::Server {
            code: got, message, ..
        }) if got == code => message,
        other => panic!("expected a {code} error, got {other:?}"),
    }
}

#[tokio::test]
async fn test_auth_expired_token_gets_unauthorized_then_close_4500() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    // Expired an hour ago, far beyond the 30 s leeway.
    let token = hs256(
        SECRET.as_bytes(),
        &json!({ "sub": "alice", "iat": now() - 7200, "exp": now() - 3600 }),
    );
    assert_token_refused(&server, &owner, &token, AuthError::Expired).await;
    // Expired just past the leeway.
    let token = hs256(
        SECRET.as_bytes(),
        &json!({ "sub": "alice", "exp": now() - 31 - 5 }),
    );
    assert_token_refused(&server, &owner, &token, AuthError::Expired).await;
}

#[tokio::test]
async fn test_auth_not_yet_valid_token_gets_unauthorized_then_close_4500() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let token = hs256(
        SECRET.as_bytes(),
        &json!({ "sub": "alice", "nbf": now() + 3600, "exp": now() + 7200 }),
    );
    assert_token_refused(&server, &owner, &token, AuthError::NotYetValid).await;
}

#[tokio::test]
async fn test_auth_token_signed_with_another_secret_gets_unauthorized_then_close_4500() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let token = hs256(OTHER_SECRET.as_bytes(), &claims("alice"));
    assert_token_refused(&server, &owner, &token, AuthError::BadSignature).await;

    // A valid token with one payload character changed fails its signature too.
    let good = server.token("alice");
    let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
    let payload = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap();
    let forged = String::from_utf8(payload)
        .unwrap()
        .replace("\"alice\"", "\"alicf\"");
    parts[1] = URL_SAFE_NO_PAD.encode(forged);
    assert_token_refused(&server, &owner, &parts.join("."), AuthError::BadSignature).await;
}

#[tokio::test]
async fn test_auth_alg_none_token_gets_unauthorized_then_close_4500() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let token = alg_none(&claims("alice"));
    assert_token_refused(
        &server,
        &owner,
        &token,
        AuthError::UnsupportedAlgorithm("none".to_owned()),
    )
    .await;

    // `none` with the signature of a genuine token pasted on is refused the same way.
    let genuine = server.token("alice");
    let signature = genuine.rsplit('.').next().unwrap();
    let token = format!("{token}{signature}");
    assert_token_refused(
        &server,
        &owner,
        &token,
        AuthError::UnsupportedAlgorithm("none".to_owned()),
    )
    .await;
}

#[tokio::test]
async fn test_auth_malformed_token_gets_unauthorized_then_close_4500() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    for token in ["", "not-a-jwt", "a.b.c", "a.b"] {
        assert_token_refused(&server, &owner, token, AuthError::Malformed).await;
    }
}

#[tokio::test]
async fn test_auth_rs256_token_is_accepted_with_the_rsa_public_key() {
    let server = rsa_server();
    let token = rs256("rsa_private.pem", &claims("alice"));
    let alice = Connection::connect(&server.url(), &token).await.unwrap();
    assert_eq!(alice.identity(), "alice");
    let r = alice
        .update(
            DatasetRef::own("notes"),
            None,
            vec![Patch::replace("k", "v", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
}

#[tokio::test]
async fn test_auth_rs256_token_signed_by_another_rsa_key_is_refused() {
    let server = rsa_server();
    let owner = Connection::connect(&server.url(), &rs256("rsa_private.pem", &claims("alice")))
        .await
        .unwrap();
    let token = rs256("rsa_other_private.pem", &claims("alice"));
    assert_token_refused(&server, &owner, &token, AuthError::BadSignature).await;
}

#[tokio::test]
async fn test_auth_hs256_token_signed_with_the_rsa_public_key_is_refused() {
    let server = rsa_server();
    let owner = Connection::connect(&server.url(), &rs256("rsa_private.pem", &claims("alice")))
        .await
        .unwrap();
    let token = hs256_with_rsa_public_key(&claims("alice"));
    // No HS256 key is configured, so HS256 is not an algorithm this server accepts at all.
    assert_token_refused(
        &server,
        &owner,
        &token,
        AuthError::UnsupportedAlgorithm("HS256".to_owned()),
    )
    .await;
}

#[tokio::test]
async fn test_auth_hs256_token_signed_with_the_rsa_public_key_is_refused_when_a_secret_is_also_configured()
 {
    let server = TestServer::builder()
        .arg("--jwt-rsa-public-key", path_arg(fixture("rsa_public.pem")))
        .start();
    // Both configured algorithms work with their own keys.
    let owner = server.connect("alice").await;
    let via_rsa = Connection::connect(&server.url(), &rs256("rsa_private.pem", &claims("alice")))
        .await
        .unwrap();
    assert_eq!(via_rsa.identity(), "alice");

    // HS256 is checked against the secret only, never against the RSA key's bytes.
    let token = hs256_with_rsa_public_key(&claims("alice"));
    assert_token_refused(&server, &owner, &token, AuthError::BadSignature).await;
    via_rsa.ping().await.unwrap();
}

#[tokio::test]
async fn test_auth_es256_token_is_accepted_with_the_ec_public_key() {
    let server = TestServer::builder()
        .without_secret()
        .arg("--jwt-ec-public-key", path_arg(fixture("ec_public.pem")))
        .start();
    let token = es256("ec_private.pem", &claims("alice"));
    let alice = Connection::connect(&server.url(), &token).await.unwrap();
    assert_eq!(alice.identity(), "alice");
    let r = alice
        .update(
            DatasetRef::own("notes"),
            None,
            vec![Patch::replace("k", "v", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );

    // A token from another EC key, and an HS256 token, are refused.
    let other = es256("ec_other_private.pem", &claims("alice"));
    assert_token_refused(&server, &alice, &other, AuthError::BadSignature).await;
    let hs = hs256(SECRET.as_bytes(), &claims("alice"));
    assert_token_refused(
        &server,
        &alice,
        &hs,
        AuthError::UnsupportedAlgorithm("HS256".to_owned()),
    )
    .await;
}

fn iss_aud_server() -> TestServer {
    TestServer::builder()
        .arg("--jwt-issuer", ISSUER)
        .arg("--jwt-audience", AUDIENCE)
        .start()
}

fn with(mut claims: Value, extra: Value) -> Value {
    if let (Value::Object(map), Value::Object(extra)) = (&mut claims, extra) {
        map.extend(extra);
    }
    claims
}

async fn iss_aud_owner(server: &TestServer) -> Connection {
    let token = hs256(
        SECRET.as_bytes(),
        &with(claims("alice"), json!({ "iss": ISSUER, "aud": AUDIENCE })),
    );
    Connection::connect(&server.url(), &token).await.unwrap()
}

#[tokio::test]
async fn test_auth_issuer_and_audience_are_accepted_when_they_match() {
    let server = iss_aud_server();
    let alice = iss_aud_owner(&server).await;
    assert_eq!(alice.identity(), "alice");
    seed_notes(&alice).await;
    // `aud` may be a list that contains the configured audience.
    let token = hs256(
        SECRET.as_bytes(),
        &with(
            claims("alice"),
            json!({ "iss": ISSUER, "aud": ["other-app", AUDIENCE] }),
        ),
    );
    let again = Connection::connect(&server.url(), &token).await.unwrap();
    assert_eq!(stored(&again, &DatasetRef::own("notes")).await.0, 1);
}

#[tokio::test]
async fn test_auth_wrong_or_missing_issuer_is_refused() {
    let server = iss_aud_server();
    let owner = iss_aud_owner(&server).await;
    let wrong = hs256(
        SECRET.as_bytes(),
        &with(
            claims("alice"),
            json!({ "iss": "https://evil.example", "aud": AUDIENCE }),
        ),
    );
    assert_token_refused(&server, &owner, &wrong, AuthError::WrongIssuer).await;
    let missing = hs256(
        SECRET.as_bytes(),
        &with(claims("alice"), json!({ "aud": AUDIENCE })),
    );
    assert_token_refused(&server, &owner, &missing, AuthError::MissingClaim("iss")).await;
}

#[tokio::test]
async fn test_auth_wrong_or_missing_audience_is_refused() {
    let server = iss_aud_server();
    let owner = iss_aud_owner(&server).await;
    let wrong = hs256(
        SECRET.as_bytes(),
        &with(
            claims("alice"),
            json!({ "iss": ISSUER, "aud": ["other-app", "x"] }),
        ),
    );
    assert_token_refused(&server, &owner, &wrong, AuthError::WrongAudience).await;
    let missing = hs256(
        SECRET.as_bytes(),
        &with(claims("alice"), json!({ "iss": ISSUER })),
    );
    assert_token_refused(&server, &owner, &missing, AuthError::MissingClaim("aud")).await;
}

#[tokio::test]
async fn test_auth_request_before_auth_gets_unauthorized_and_a_later_auth_succeeds() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let before = seed_notes(&owner).await;
    let notes = DatasetRef::new("alice", "notes");

    let mut conn = Connection::open(&server.url(), None).await.unwrap();
    assert_error(
        conn.update(
            notes.clone(),
            None,
            vec![Patch::replace("k", "w", before.0)],
        )
        .await,
        ErrorCode::Unauthorized,
    );
    assert_error(conn.subscribe(notes.clone()).await, ErrorCode::Unauthorized);
    assert_error(
        conn.changes(notes.clone(), 0).await,
        ErrorCode::Unauthorized,
    );
    assert_error(conn.list_datasets().await, ErrorCode::Unauthorized);
    assert_error(
        conn.delete_dataset(notes.clone()).await,
        ErrorCode::Unauthorized,
    );

    // The connection is still open: ping works, and authenticating now succeeds.
    assert!(conn.closed().is_none());
    conn.ping().await.unwrap();
    let ready = conn
        .request(|id| ClientFrame::Auth {
            id: Some(id),
            token: server.token("alice"),
            features: Vec::new(),
        })
        .await
        .unwrap();
    assert!(
        matches!(&ready, ServerFrame::Ready { identity, .. } if identity == "alice"),
        "{ready:?}"
    );
    let (n, records) = conn.subscribe(notes.clone()).await.unwrap();
    assert_eq!(n, before.0);
    assert_eq!(records, before.1);
    assert_eq!(stored(&owner, &DatasetRef::own("notes")).await, before);
    // And the session now writes.
    let r = conn
        .update(notes, None, vec![Patch::replace("k", "w", before.0)])
        .await
        .unwrap();
    assert!(matches!(r, UpdateResult::Committed { .. }), "{r:?}");
    assert!(conn.next_event_timeout(WAIT).await.is_some(), "live push");
}

#[tokio::test]
async fn test_auth_no_auth_frame_closes_with_4004_after_auth_timeout() {
    let server = TestServer::builder().arg("--auth-timeout", "1s").start();
    let authenticated = server.connect("alice").await;

    let conn = Connection::open(&server.url(), None).await.unwrap();
    // Pings are answered but do not count as authenticating.
    conn.ping().await.unwrap();
    let closed = tokio::time::timeout(WAIT, conn.wait_closed())
        .await
        .expect("the server closes an unauthenticated connection");
    assert_eq!(
        closed.code,
        Some(CloseCode::AuthTimeout.code()),
        "{closed:?}"
    );
    assert_eq!(closed.reason, CloseCode::AuthTimeout.reason());
    assert!(CloseCode::AuthTimeout.reconnect());

    // The authenticated connection on the same server is not affected.
    authenticated.ping().await.unwrap();
    assert!(authenticated.closed().is_none());
}

#[tokio::test]
async fn test_auth_header_bearer_token_authenticates_without_an_auth_frame() {
    let server = TestServer::start();
    let alice = Connection::connect_with_header(&server.url(), &server.token("alice"))
        .await
        .unwrap();
    assert_eq!(alice.identity(), "alice");
    let r = alice
        .update(
            DatasetRef::own("notes"),
            None,
            vec![Patch::replace("k", "v", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );

    // Other algorithms work in the header too.
    let server = rsa_server();
    let token = rs256("rsa_private.pem", &claims("bob"));
    let bob = Connection::connect_with_header(&server.url(), &token)
        .await
        .unwrap();
    assert_eq!(bob.identity(), "bob");
    bob.list_datasets().await.unwrap();
}

/// A WebSocket upgrade request with `Authorization: Bearer <token>`; returns the HTTP status
/// and body.
async fn upgrade_with_bearer(addr: SocketAddr, token: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET /v1/sync HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, stream.read_to_string(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn test_auth_header_bearer_with_bad_token_is_refused_at_upgrade() {
    let server = TestServer::start();
    let owner = server.connect("alice").await;
    let before = seed_notes(&owner).await;
    let cases = [
        (
            hs256(
                SECRET.as_bytes(),
                &json!({ "sub": "alice", "exp": now() - 3600 }),
            ),
            AuthError::Expired,
        ),
        (
            hs256(
                SECRET.as_bytes(),
                &json!({ "sub": "alice", "nbf": now() + 3600, "exp": now() + 7200 }),
            ),
            AuthError::NotYetValid,
        ),
        (
            hs256(OTHER_SECRET.as_bytes(), &claims("alice")),
            AuthError::BadSignature,
        ),
        (
            alg_none(&claims("alice")),
            AuthError::UnsupportedAlgorithm("none".to_owned()),
        ),
        ("garbage".to_owned(), AuthError::Malformed),
    ];
    for (token, expected) in cases {
        let refused = Connection::open(&server.url(), Some(token.as_str())).await;
        match refused {
            Err(ClientError::Connect(message)) => assert!(message.contains("401"), "{message}"),
            other => panic!("expected the upgrade to be refused, got {other:?}"),
        }
        let (status, body) = upgrade_with_bearer(server.addr, &token).await;
        assert_eq!(status, 401, "{body}");
        let frame: ServerFrame = serde_json::from_str(&body).unwrap();
        assert_eq!(
            frame,
            ServerFrame::error(None, ErrorCode::Unauthorized, expected.to_string())
        );
    }

    assert_eq!(stored(&owner, &DatasetRef::own("notes")).await, before);
    // A good header token still upgrades.
    let alice = Connection::connect_with_header(&server.url(), &server.token("alice"))
        .await
        .unwrap();
    assert_eq!(stored(&alice, &DatasetRef::own("notes")).await, before);
}

#[tokio::test]
async fn test_auth_refresh_with_another_identity_is_forbidden_and_session_stays() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let before = seed_notes(&alice).await;

    let switched = alice
        .request(|id| ClientFrame::Auth {
            id: Some(id),
            token: server.token("mallory"),
            features: Vec::new(),
        })
        .await;
    assert_error(switched, ErrorCode::Forbidden);

    // Still Alice, still open, and a refresh for the same identity is accepted.
    assert!(alice.closed().is_none());
    assert_eq!(stored(&alice, &DatasetRef::own("notes")).await, before);
    let ready = alice
        .request(|id| ClientFrame::Auth {
            id: Some(id),
            token: server.token("alice"),
            features: Vec::new(),
        })
        .await
        .unwrap();
    assert!(
        matches!(&ready, ServerFrame::Ready { identity, .. } if identity == "alice"),
        "{ready:?}"
    );
    let mallory = server.connect("mallory").await;
    assert!(mallory.list_datasets().await.unwrap().is_empty());
}
