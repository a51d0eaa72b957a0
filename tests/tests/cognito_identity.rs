//! The Cognito Identity endpoint end to end (`shared/COGNITO.md` §3, §4, §6): GetId,
//! GetCredentialsForIdentity and GetOpenIdToken over plain HTTP against a real `tandem`
//! process, logins verified as JWTs of the configured issuer, the login-takeover rule, the
//! merge of a guest at login, and the open id token on `/v1/sync`.

use serde_json::{Value, json};
use std::time::Duration;
use tandem_client::Connection;
use tandem_protocol::{DatasetRef, Patch};
use tandem_tests::{SECRET, TestServer, fixture, now_secs, output_within, serve_command};

const POOL: &str = "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-3c8e9e2b7a10";
const ISSUER: &str = "https://login.example.com";
/// The Logins key of `ISSUER`: the issuer without `https://`.
const PROVIDER: &str = "login.example.com";

fn start() -> TestServer {
    TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .start()
}

/// A login token of the configured issuer for `sub`.
fn login(sub: &str) -> String {
    tandem_token::mint_hs256(
        SECRET.as_bytes(),
        sub,
        Duration::from_secs(3600),
        Some(ISSUER),
        None,
    )
    .unwrap()
}

fn logins(subs: &[&str]) -> Value {
    if subs.len() == 1 {
        return json!({ PROVIDER: login(subs[0]) });
    }
    // Several logins need several providers: the issuer under both of its names.
    json!({ PROVIDER: login(subs[0]), ISSUER: login(subs[1]) })
}

#[derive(Debug)]
struct Answer {
    status: u16,
    /// The head, lowercased.
    head: String,
    body: Value,
}

impl Answer {
    fn error_type(&self) -> &str {
        self.body["__type"].as_str().unwrap_or_default()
    }

    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or_default()
    }

    fn id(&self) -> String {
        assert_eq!(self.status, 200, "{self:?}");
        self.body["IdentityId"].as_str().unwrap().to_owned()
    }

    /// Asserts an Identity API error: 400, the type in the header and the body, no `code`.
    fn assert_error(&self, error_type: &str) {
        assert_eq!(self.status, 400, "{self:?}");
        assert_eq!(self.error_type(), error_type, "{self:?}");
        assert!(
            self.head
                .contains(&format!("x-amzn-errortype: {}", error_type.to_lowercase())),
            "{self:?}"
        );
        assert!(self.body.get("code").is_none(), "{self:?}");
    }
}

/// `POST /` with `X-Amz-Target: target` and `body`, as the SDKs send it (unsigned).
async fn post(server: &TestServer, target: &str, body: &[u8]) -> Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST / HTTP/1.1\r\nHost: {}\r\nX-Amz-Target: {target}\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        server.addr,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // A refused body may be cut off by the server; the answer is what matters.
    let _ = stream.write_all(body).await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Answer {
        status: head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        head: head.to_lowercase(),
        body: serde_json::from_str(body).unwrap_or(Value::Null),
    }
}

async fn call(server: &TestServer, op: &str, body: Value) -> Answer {
    let target = format!("AWSCognitoIdentityService.{op}");
    post(server, &target, body.to_string().as_bytes()).await
}

async fn get_id(server: &TestServer, logins: Option<Value>) -> Answer {
    let mut body = json!({ "IdentityPoolId": POOL });
    if let Some(logins) = logins {
        body["Logins"] = logins;
    }
    call(server, "GetId", body).await
}

async fn credentials(server: &TestServer, id: &str, logins: Option<Value>) -> Answer {
    let mut body = json!({ "IdentityId": id });
    if let Some(logins) = logins {
        body["Logins"] = logins;
    }
    call(server, "GetCredentialsForIdentity", body).await
}

async fn open_id_token(server: &TestServer, id: &str, logins: Option<Value>) -> String {
    let mut body = json!({ "IdentityId": id });
    if let Some(logins) = logins {
        body["Logins"] = logins;
    }
    let answer = call(server, "GetOpenIdToken", body).await;
    assert_eq!(answer.id(), id);
    answer.body["Token"].as_str().unwrap().to_owned()
}

/// Writes one record to the caller's dataset `notes`.
async fn write_notes(conn: &Connection) {
    conn.update(
        DatasetRef::own("notes"),
        None,
        vec![Patch::replace("k", "v", 0)],
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_guest_gets_credentials_and_a_token_that_works_on_sync() {
    let server = start();
    let guest = get_id(&server, None).await;
    let id = guest.id();
    assert!(id.starts_with("us-east-1:") && id.len() == 46, "{id}");
    assert!(
        guest
            .head
            .contains("content-type: application/x-amz-json-1.1"),
        "{guest:?}"
    );
    for header in [
        "x-amzn-requestid: ",
        "date: ",
        "access-control-allow-origin: *",
    ] {
        assert!(guest.head.contains(header), "{header}: {guest:?}");
    }
    assert_ne!(get_id(&server, None).await.id(), id, "a new guest per call");

    let creds = credentials(&server, &id, None).await;
    assert_eq!(creds.id(), id);
    let c = &creds.body["Credentials"];
    let akid = c["AccessKeyId"].as_str().unwrap();
    assert!(akid.starts_with("ASIA") && akid.len() == 20, "{akid}");
    assert!(!c["SecretKey"].as_str().unwrap().is_empty());
    assert!(!c["SessionToken"].as_str().unwrap().is_empty());
    let expiration = c["Expiration"].as_f64().unwrap();
    let now = now_secs() as f64;
    assert!(
        expiration > now + 3000.0 && expiration < now + 3700.0,
        "{expiration}"
    );

    let token = open_id_token(&server, &id, None).await;
    let conn = Connection::connect(&server.url(), &token).await.unwrap();
    assert_eq!(conn.identity(), id);
    // A 10-minute token (expires_at is in milliseconds).
    assert!(
        conn.expires_at() <= (now_secs() + 600 + 5) * 1000,
        "{}",
        conn.expires_at()
    );
    write_notes(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_guests_off_refuses_guests_but_not_logins() {
    let server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg("--cognito-guests", "false")
        .start();
    let refused = get_id(&server, None).await;
    refused.assert_error("NotAuthorizedException");
    assert_eq!(
        refused.message(),
        "Unauthenticated access is not supported for this identity pool."
    );
    let id = get_id(&server, Some(logins(&["alice"]))).await.id();
    assert_eq!(
        credentials(&server, &id, Some(logins(&["alice"])))
            .await
            .id(),
        id
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_logins_link_to_an_identity() {
    let server = start();
    let alice = get_id(&server, Some(logins(&["alice"]))).await.id();
    assert_eq!(get_id(&server, Some(logins(&["alice"]))).await.id(), alice);

    // A guest's unlinked login is linked to it; its id does not change.
    let guest = get_id(&server, None).await.id();
    assert_eq!(
        credentials(&server, &guest, Some(logins(&["bob"])))
            .await
            .id(),
        guest
    );
    assert_eq!(get_id(&server, Some(logins(&["bob"]))).await.id(), guest);

    // Two logins linked to two identities name no one.
    get_id(&server, Some(logins(&["alice", "bob"])))
        .await
        .assert_error("ResourceConflictException");

    // A token of another secret, another issuer or an unknown provider is refused.
    let forged = tandem_token::mint_hs256(
        b"another secret of at least thirty-two bytes!",
        "alice",
        Duration::from_secs(60),
        Some(ISSUER),
        None,
    )
    .unwrap();
    let unknown = json!({ "accounts.google.com": login("alice") });
    for bad in [
        json!({ PROVIDER: forged }),
        json!({ PROVIDER: "x.y.z" }),
        unknown,
    ] {
        let answer = get_id(&server, Some(bad)).await;
        answer.assert_error("NotAuthorizedException");
        assert!(
            answer.message().starts_with("Invalid login token."),
            "{answer:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_guest_logging_in_with_a_linked_login_is_merged() {
    let server = start();
    let alice = get_id(&server, Some(logins(&["alice"]))).await.id();
    let guest = get_id(&server, None).await.id();
    let token = open_id_token(&server, &guest, None).await;
    let conn = Connection::connect(&server.url(), &token).await.unwrap();
    write_notes(&conn).await;
    conn.close().await;

    let merged = credentials(&server, &guest, Some(logins(&["alice"]))).await;
    assert_eq!(
        merged.id(),
        alice,
        "the answer names the identity merged into"
    );

    let gone = credentials(&server, &guest, None).await;
    gone.assert_error("NotAuthorizedException");
    assert_eq!(
        gone.message(),
        format!("Access to Identity '{guest}' is forbidden.")
    );

    let token = open_id_token(&server, &alice, Some(logins(&["alice"]))).await;
    let conn = Connection::connect(&server.url(), &token).await.unwrap();
    let datasets = conn.list_datasets().await.unwrap();
    let names: Vec<&str> = datasets.iter().map(|d| d.dataset.name.as_str()).collect();
    assert_eq!(names, ["notes"], "the guest's dataset moved with the merge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_authenticated_identity_answers_only_to_its_own_logins() {
    let server = start();
    let alice = get_id(&server, Some(logins(&["alice"]))).await.id();

    // Knowing the id is not enough: no login, or a login of someone else, is refused, and
    // that login is not linked.
    for presented in [None, Some(logins(&["mallory"]))] {
        let answer = credentials(&server, &alice, presented).await;
        answer.assert_error("NotAuthorizedException");
        assert!(
            answer.message().starts_with("Logins don't match."),
            "{answer:?}"
        );
    }
    assert_ne!(
        get_id(&server, Some(logins(&["mallory"]))).await.id(),
        alice
    );

    // One linked login lets an extra one be linked.
    assert_eq!(
        credentials(&server, &alice, Some(logins(&["alice", "carol"])))
            .await
            .id(),
        alice
    );
    let carol_only = json!({ ISSUER: login("carol") });
    assert_eq!(get_id(&server, Some(carol_only)).await.id(), alice);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_bad_requests_get_their_documented_errors() {
    let server = start();
    post(&server, "AWSCognitoIdentityService.UnlinkIdentity", b"{}")
        .await
        .assert_error("UnknownOperationException");
    // A developer operation must be signed with the developer key.
    post(&server, "AWSCognitoIdentityService.ListIdentities", b"{}")
        .await
        .assert_error("MissingAuthenticationTokenException");
    post(&server, "AWSCognitoSyncService.GetId", b"{}")
        .await
        .assert_error("UnknownOperationException");
    call(
        &server,
        "GetId",
        json!({ "IdentityPoolId": "us-east-1:0f6a6b1e-2d7c-4f1b-9a55-000000000000" }),
    )
    .await
    .assert_error("ResourceNotFoundException");
    post(&server, "AWSCognitoIdentityService.GetId", b"{not json")
        .await
        .assert_error("InvalidParameterException");
    let oversized = vec![b' '; 200 * 1024];
    post(&server, "AWSCognitoIdentityService.GetId", &oversized)
        .await
        .assert_error("InvalidParameterException");
    let unknown = "us-east-1:00000000-0000-4000-8000-000000000000";
    let answer = credentials(&server, unknown, None).await;
    answer.assert_error("NotAuthorizedException");
    assert_eq!(
        answer.message(),
        format!("Access to Identity '{unknown}' is forbidden.")
    );

    // Without an identity pool the endpoint is off.
    let off = TestServer::start();
    let answer = call(&off, "GetId", json!({ "IdentityPoolId": POOL })).await;
    assert_eq!(answer.status, 404, "{answer:?}");
}

/// Two nodes on one PostgreSQL: an identity made on one is served, logged in and merged on
/// the other, and the other's open id token works on the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_identities_are_shared_by_the_nodes_of_one_postgresql() {
    let schema = tandem_tests::cluster::PgSchema::create();
    let node = || {
        TestServer::builder()
            .arg("--store", &schema.url)
            .arg("--postgres-schema", &schema.name)
            .arg("--cognito-identity-pool", POOL)
            .arg("--jwt-issuer", ISSUER)
            .start()
    };
    let (a, b) = (node(), node());
    let alice = get_id(&a, Some(logins(&["alice"]))).await.id();
    let guest = get_id(&a, None).await.id();
    let conn = Connection::connect(&a.url(), &open_id_token(&b, &guest, None).await)
        .await
        .unwrap();
    write_notes(&conn).await;
    conn.close().await;
    assert_eq!(
        credentials(&b, &guest, Some(logins(&["alice"]))).await.id(),
        alice
    );
    credentials(&a, &guest, None)
        .await
        .assert_error("NotAuthorizedException");
    let token = open_id_token(&a, &alice, Some(logins(&["alice"]))).await;
    let conn = Connection::connect(&b.url(), &token).await.unwrap();
    let names: Vec<String> = conn
        .list_datasets()
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.dataset.name)
        .collect();
    assert_eq!(names, ["notes"]);
}

/// An RS256 token of `issuer` for `sub`, signed with the fixture key.
fn rs256_login(issuer: &str, sub: &str) -> String {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let _ = jsonwebtoken::crypto::CryptoProvider::install_default(
        &jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER,
    );
    let claims = json!({ "sub": sub, "iss": issuer, "exp": now_secs() + 600 });
    let key =
        EncodingKey::from_rsa_pem(&std::fs::read(fixture("rsa_private.pem")).unwrap()).unwrap();
    jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_each_configured_issuer_is_a_login_provider() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tandem.toml");
    std::fs::write(
        &config,
        format!(
            "[[jwt_issuers]]\nissuer = \"https://idp.example\"\nrsa_public_keys = [{:?}]\n",
            fixture("rsa_public.pem").display().to_string()
        ),
    )
    .unwrap();
    let server = TestServer::builder()
        .arg("--cognito-identity-pool", POOL)
        .arg("--jwt-issuer", ISSUER)
        .arg("--config", config.display())
        .start();
    let alice = get_id(&server, Some(logins(&["alice"]))).await.id();
    let both = json!({ PROVIDER: login("alice"), "idp.example": rs256_login("https://idp.example", "a-1") });
    assert_eq!(credentials(&server, &alice, Some(both)).await.id(), alice);
    let idp_only = json!({ "idp.example": rs256_login("https://idp.example", "a-1") });
    assert_eq!(get_id(&server, Some(idp_only)).await.id(), alice);

    // The provider's key signs, but the token names another issuer.
    let foreign = json!({ "idp.example": rs256_login("https://other.example", "a-1") });
    get_id(&server, Some(foreign))
        .await
        .assert_error("NotAuthorizedException");
}

#[test]
fn test_cognito_malformed_pool_id_stops_the_node_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let output = output_within(
        serve_command(dir.path()).args(["--cognito-identity-pool", "us-east-1:NOT-A-UUID"]),
        Duration::from_secs(30),
    )
    .expect("the node exits");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("invalid cognito identity pool"), "{stderr}");
}

/// boto3 (pinned in tests/python/requirements.txt, in the venv `.ci/run` makes) walks the
/// endpoint as an app would; its guest's open id token then works on `/v1/sync`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_boto3_walk() {
    let Some(python) = std::env::var_os("TANDEM_TEST_PYTHON") else {
        println!("skipped: TANDEM_TEST_PYTHON is not set (.ci/run sets it to a venv with boto3)");
        return;
    };
    let server = start();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/cognito_identity.py");
    // The server is another process: blocking here holds up nothing it needs.
    let output = std::process::Command::new(python)
        .arg(script)
        .arg(server.http(""))
        .arg(POOL)
        .arg(PROVIDER)
        .arg(login("alice"))
        // Nothing from this machine's AWS setup: the calls must go unsigned.
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "boto3 walk failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    let conn = Connection::connect(&server.url(), result["token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(conn.identity(), result["guest"].as_str().unwrap());
}

/// A malformed body never acts: not a GetId that would make or link an identity, not a
/// GetCredentialsForIdentity or GetOpenIdToken that would link a login to a guest (or merge
/// it). The login in them stays unlinked, so the guest links it afterwards and keeps its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_cognito_malformed_bodies_get_invalid_parameter_and_change_nothing() {
    let server = start();
    let guest = get_id(&server, None).await.id();
    let dave = logins(&["dave"]);
    let get_id_body = json!({ "IdentityPoolId": POOL, "Logins": dave }).to_string();
    let as_guest = json!({ "IdentityId": guest, "Logins": dave }).to_string();
    let cut = |whole: &str| whole.as_bytes()[..whole.len() - 1].to_vec();
    let malformed = |whole: &str| -> Vec<Vec<u8>> {
        vec![
            cut(whole),
            format!("{whole} {{}}").into_bytes(),
            b"".to_vec(),
            b"null".to_vec(),
            b"[]".to_vec(),
            b"\xff\xfe{}".to_vec(),
        ]
    };
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    for body in malformed(&get_id_body) {
        cases.push(("GetId", body));
    }
    for op in ["GetCredentialsForIdentity", "GetOpenIdToken"] {
        for body in malformed(&as_guest) {
            cases.push((op, body));
        }
        for body in [
            json!({ "IdentityId": [guest], "Logins": dave }),
            json!({ "IdentityId": guest, "Logins": { PROVIDER: 5 } }),
            json!({ "IdentityId": guest, "Logins": [login("dave")] }),
        ] {
            cases.push((op, body.to_string().into_bytes()));
        }
        // A duplicate member: which one would count is the parser's guess.
        let duplicate = format!(
            r#"{{"IdentityId":"{guest}","Logins":{{"{PROVIDER}":"{}"}},"IdentityId":"{guest}"}}"#,
            login("dave")
        );
        cases.push((op, duplicate.into_bytes()));
    }
    for body in [
        json!({ "IdentityPoolId": 5, "Logins": dave }),
        json!({ "IdentityPoolId": POOL, "Logins": { PROVIDER: null } }),
    ] {
        cases.push(("GetId", body.to_string().into_bytes()));
    }
    for (op, body) in &cases {
        let answer = post(&server, &format!("AWSCognitoIdentityService.{op}"), body).await;
        assert_eq!(
            answer.error_type(),
            "InvalidParameterException",
            "{op} {}: {answer:?}",
            String::from_utf8_lossy(body)
        );
        answer.assert_error("InvalidParameterException");
    }
    // Dave's login is linked to nothing: the guest links it and keeps its id (a login linked
    // elsewhere would have merged the guest away).
    assert_eq!(
        credentials(&server, &guest, Some(dave.clone())).await.id(),
        guest
    );
    assert_eq!(get_id(&server, Some(dave)).await.id(), guest);
}
