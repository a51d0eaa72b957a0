//! Raw WebSocket connections to a gateway: open, authenticate, subscribe, pipeline
//! requests, and tell server frames apart cheaply (by their leading `type`, without
//! parsing a whole dataset).

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::time::Duration;
use tandem_protocol::{ClientFrame, DatasetRef, RequestId};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Time one setup step (upgrade, auth, subscribe, a setup write) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// Request ids the harness uses for its own setup requests; writes use their seq (small).
pub const SETUP_ID_BASE: u64 = 1 << 48;

/// Why a setup step failed; `code` is what the report counts it under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fail {
    pub code: String,
    pub detail: String,
    /// Whether trying again later may work (the close code, or a refused token, says no).
    pub retry: bool,
    /// How the connection ended, when it did: the close frame's code, 1005 for a close
    /// frame without one, 1006 for a connection lost without a close frame.
    pub close: Option<u16>,
}

/// RFC 6455's "no status received": a close frame without a code.
pub const CLOSE_NO_STATUS: u16 = 1005;
/// RFC 6455's "abnormal closure": the connection ended without a close frame.
pub const CLOSE_ABNORMAL: u16 = 1006;

impl Fail {
    pub fn new(code: impl Into<String>, detail: impl Into<String>) -> Fail {
        Fail {
            code: code.into(),
            detail: detail.into(),
            retry: true,
            close: None,
        }
    }

    /// The connection ended without a close frame (reset, EOF, a failed read or write).
    pub fn lost(detail: impl Into<String>) -> Fail {
        Fail {
            close: Some(CLOSE_ABNORMAL),
            ..Fail::new("connection_lost", detail)
        }
    }

    pub fn closed(code: Option<u16>, reason: &str) -> Fail {
        match code {
            Some(code) => Fail {
                code: format!("closed_{code}"),
                detail: format!("closed by the server: {code} {reason}"),
                retry: tandem_protocol::should_reconnect(code),
                close: Some(code),
            },
            None => Fail {
                close: Some(CLOSE_NO_STATUS),
                ..Fail::new("connection_lost", reason.to_owned())
            },
        }
    }
}

impl std::fmt::Display for Fail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.detail)
    }
}

/// Small buffers: a load test holds thousands of these. Buffers grow for large pushes.
fn config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_message_size(Some(64 * 1024 * 1024))
        .max_frame_size(Some(64 * 1024 * 1024))
}

/// `ws://host:port` gets `/v1/sync`; `http(s)://` becomes `ws(s)://`; a bare `host:port`
/// becomes `ws://host:port/v1/sync`.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    let (scheme, rest) = match url.split_once("://") {
        Some(("http", rest)) => ("ws", rest),
        Some(("https", rest)) => ("wss", rest),
        Some((scheme, rest)) => (scheme, rest),
        None => ("ws", url),
    };
    if rest.contains('/') {
        format!("{scheme}://{rest}")
    } else {
        format!("{scheme}://{rest}/v1/sync")
    }
}

/// How a connection is opened and authenticated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectOptions {
    /// The `auth` frame's opt-in features (`delta`, `lean`).
    pub features: Vec<String>,
    /// `SO_RCVBUF` for the socket, set before connecting so the TCP window stays small (a
    /// slow reader whose kernel buffer holds megabytes would hide its slowness from the
    /// server for minutes). `None`: the system's default (autotuned).
    pub recv_buffer: Option<u32>,
}

/// Opens the WebSocket (TCP with `TCP_NODELAY`, upgrade).
pub async fn open(url: &str, options: &ConnectOptions) -> Result<Ws, Fail> {
    let connect = async {
        match options.recv_buffer {
            None => tokio_tungstenite::connect_async_with_config(url, Some(config()), true)
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| Fail::new("connect_failed", e.to_string())),
            Some(bytes) => {
                let tcp = tcp_with_recv_buffer(url, bytes).await?;
                let tcp = MaybeTlsStream::Plain(tcp);
                tokio_tungstenite::client_async_with_config(url, tcp, Some(config()))
                    .await
                    .map(|(ws, _)| ws)
                    .map_err(|e| Fail::new("connect_failed", e.to_string()))
            }
        }
    };
    tokio::time::timeout(STEP_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| {
            Err(Fail::new(
                "connect_timeout",
                format!("no upgrade within {STEP_TIMEOUT:?}"),
            ))
        })
}

/// A TCP connection to the URL's host with `SO_RCVBUF` set before the handshake (the window
/// scale is fixed then) and `TCP_NODELAY`.
async fn tcp_with_recv_buffer(url: &str, bytes: u32) -> Result<TcpStream, Fail> {
    let failed = |e: &dyn std::fmt::Display| Fail::new("connect_failed", format!("{url}: {e}"));
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = if authority
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    let addr = tokio::net::lookup_host(&authority)
        .await
        .map_err(|e| failed(&e))?
        .next()
        .ok_or_else(|| failed(&"no address"))?;
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| failed(&e))?;
    socket.set_recv_buffer_size(bytes).map_err(|e| failed(&e))?;
    let tcp = socket.connect(addr).await.map_err(|e| failed(&e))?;
    tcp.set_nodelay(true).map_err(|e| failed(&e))?;
    Ok(tcp)
}

/// The kind of a server frame, read from its leading `{"type":"…"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dataset,
    Delta,
    Snapshot,
    Ack,
    Conflict,
    Error,
    Ready,
    Deleted,
    Unsubscribed,
    Other,
}

pub fn kind(text: &str) -> Kind {
    let Some(rest) = text.strip_prefix("{\"type\":\"") else {
        return Kind::Other;
    };
    let name = rest.split('"').next().unwrap_or_default();
    match name {
        "dataset" => Kind::Dataset,
        "delta" => Kind::Delta,
        "snapshot" => Kind::Snapshot,
        "ack" => Kind::Ack,
        "conflict" => Kind::Conflict,
        "error" => Kind::Error,
        "ready" => Kind::Ready,
        "deleted" => Kind::Deleted,
        "unsubscribed" => Kind::Unsubscribed,
        _ => Kind::Other,
    }
}

/// The few fields of a reply the harness needs; records are skipped.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub sync_count: Option<u64>,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub identity: Option<String>,
    /// `ready`: the features the server turned on.
    #[serde(default)]
    pub features: Vec<String>,
    #[serde(default)]
    pub conflicts: Vec<ConflictReply>,
}

#[derive(Debug, Deserialize)]
pub struct ConflictReply {
    pub key: String,
    pub server: Option<ServerRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerRecord {
    /// Absent in the lean encoding when it is the frame's `syncCount`.
    #[serde(default)]
    pub sync_count: Option<u64>,
}

impl Reply {
    /// The server's record count of the first conflict (0 when the key has no record); a
    /// lean record without one has the frame's.
    pub fn conflict_sync_count(&self) -> u64 {
        self.conflicts
            .first()
            .and_then(|c| c.server.as_ref())
            .map_or(0, |r| r.sync_count.or(self.sync_count).unwrap_or(0))
    }
}

pub fn parse_reply(text: &str) -> Option<Reply> {
    serde_json::from_str(text).ok()
}

/// A reply that matched a request, with its kind.
#[derive(Debug)]
pub struct Answer {
    pub kind: Kind,
    pub reply: Reply,
    pub text: String,
}

impl Answer {
    /// The reply as a failure if it is not of the wanted kind.
    pub fn expect(self, want: Kind, what: &str) -> Result<Answer, Fail> {
        if self.kind == want {
            return Ok(self);
        }
        if self.kind == Kind::Error {
            let code = self.reply.code.clone().unwrap_or_else(|| "error".into());
            return Err(Fail {
                detail: format!(
                    "{what}: {code}: {}",
                    self.reply.message.clone().unwrap_or_default()
                ),
                retry: code != "unauthorized" && code != "forbidden",
                code,
                close: None,
            });
        }
        let mut text = self.text;
        text.truncate(200);
        Err(Fail::new(
            "unexpected_reply",
            format!("{what}: unexpected reply {text}"),
        ))
    }
}

/// Sends `frames` (whose ids are `ids`, in order) with at most `window` unanswered, and
/// returns the replies in the same order. Frames that are not replies go to `other`.
pub async fn pipeline(
    ws: &mut Ws,
    frames: Vec<(u64, String)>,
    window: usize,
    other: &mut (dyn FnMut(Kind, &str) + Send),
) -> Result<Vec<Answer>, Fail> {
    let window = window.max(1);
    let mut answers = Vec::with_capacity(frames.len());
    let ids: Vec<u64> = frames.iter().map(|(id, _)| *id).collect();
    let mut frames = frames.into_iter();
    let mut sent = 0;
    while answers.len() < ids.len() {
        while sent < ids.len() && sent - answers.len() < window {
            let Some((_, text)) = frames.next() else {
                break;
            };
            ws.feed(Message::text(text))
                .await
                .map_err(|e| Fail::lost(e.to_string()))?;
            sent += 1;
        }
        ws.flush().await.map_err(|e| Fail::lost(e.to_string()))?;
        let want = ids[answers.len()];
        let answer = tokio::time::timeout(STEP_TIMEOUT, read_reply(ws, want, other))
            .await
            .map_err(|_| {
                Fail::new("reply_timeout", format!("no reply within {STEP_TIMEOUT:?}"))
            })??;
        answers.push(answer);
    }
    Ok(answers)
}

/// Sends one request and waits for its reply.
pub async fn request(
    ws: &mut Ws,
    id: u64,
    text: String,
    other: &mut (dyn FnMut(Kind, &str) + Send),
) -> Result<Answer, Fail> {
    let mut answers = pipeline(ws, vec![(id, text)], 1, other).await?;
    answers
        .pop()
        .ok_or_else(|| Fail::new("unexpected_reply", "no reply"))
}

/// Reads frames until the reply with id `want`.
async fn read_reply(
    ws: &mut Ws,
    want: u64,
    other: &mut (dyn FnMut(Kind, &str) + Send),
) -> Result<Answer, Fail> {
    loop {
        let text = match ws.next().await {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Err(Fail::closed(
                    frame.as_ref().map(|f| u16::from(f.code)),
                    &frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(Fail::lost(e.to_string())),
            None => return Err(Fail::lost("socket ended")),
        };
        let text = text.as_str();
        let kind = kind(text);
        let is_reply = matches!(
            kind,
            Kind::Snapshot | Kind::Ack | Kind::Conflict | Kind::Error | Kind::Ready
        );
        if is_reply && let Some(reply) = parse_reply(text) {
            if reply.id == Some(want) {
                return Ok(Answer {
                    kind,
                    reply,
                    text: text.to_owned(),
                });
            }
            if kind == Kind::Error && reply.id.is_none() {
                return Err(Fail::new(
                    reply.code.unwrap_or_else(|| "error".into()),
                    reply.message.unwrap_or_default(),
                ));
            }
        }
        other(kind, text);
    }
}

pub fn auth_frame(id: u64, token: &str, features: &[String]) -> String {
    ClientFrame::Auth {
        id: Some(RequestId::Num(id)),
        token: token.to_owned(),
        features: features.to_vec(),
    }
    .to_json()
}

pub fn subscribe_frame(id: u64, dataset: &DatasetRef) -> String {
    ClientFrame::Subscribe {
        id: RequestId::Num(id),
        dataset: dataset.clone(),
        delta: None,
        since: None,
    }
    .to_json()
}

/// What `ready` said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ready {
    pub identity: String,
    /// The asked-for features the server turned on.
    pub features: Vec<String>,
}

/// Opens a connection and authenticates it; returns what the server's `ready` said.
pub async fn connect_auth(
    url: &str,
    token: &str,
    options: &ConnectOptions,
) -> Result<(Ws, Ready), Fail> {
    let mut ws = open(url, options).await?;
    let answer = request(
        &mut ws,
        SETUP_ID_BASE,
        auth_frame(SETUP_ID_BASE, token, &options.features),
        &mut |_, _| {},
    )
    .await?
    .expect(Kind::Ready, "auth")
    .map_err(|mut f| {
        if f.code == "unauthorized" {
            f.retry = false;
        }
        f
    })?;
    let ready = Ready {
        identity: answer.reply.identity.unwrap_or_default(),
        features: answer.reply.features,
    };
    Ok((ws, ready))
}

/// Subscribes; returns the snapshot frame's text.
pub async fn subscribe(
    ws: &mut Ws,
    dataset: &DatasetRef,
    other: &mut (dyn FnMut(Kind, &str) + Send),
) -> Result<String, Fail> {
    let id = SETUP_ID_BASE + 1;
    let answer = request(ws, id, subscribe_frame(id, dataset), other)
        .await?
        .expect(Kind::Snapshot, "subscribe")?;
    Ok(answer.text)
}

/// Closes politely without waiting long for the server's answer.
pub async fn close(mut ws: Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_conn_kind_reads_the_leading_type() {
        assert_eq!(kind(r#"{"type":"dataset","dataset":{}}"#), Kind::Dataset);
        assert_eq!(kind(r#"{"type":"ack","id":1}"#), Kind::Ack);
        assert_eq!(kind(r#"{"type":"delta","dataset":{}}"#), Kind::Delta);
        assert_eq!(kind(r#"{"type":"datasets","id":1}"#), Kind::Other);
        assert_eq!(kind("[]"), Kind::Other);
    }

    #[test]
    fn test_conn_reply_reads_a_conflict() {
        let r = parse_reply(r#"{"type":"conflict","id":4,"dataset":{"owner":"a","name":"b"},"syncCount":6,"conflicts":[{"key":"lt0","server":{"key":"lt0","value":"1:2","syncCount":6,"lastModified":1,"lastModifiedBy":"a"}}]}"#).unwrap();
        assert_eq!(r.id, Some(4));
        assert_eq!(r.conflicts[0].server.as_ref().unwrap().sync_count, Some(6));
        assert_eq!(r.conflict_sync_count(), 6);
    }

    #[test]
    fn test_conn_reply_reads_a_lean_conflict() {
        // The lean encoding leaves out the record's count when it is the frame's.
        let frame = tandem_protocol::ServerFrame::Conflict {
            id: RequestId::Num(4),
            dataset: DatasetRef::new("a", "b"),
            sync_count: 6,
            conflicts: vec![tandem_protocol::Conflict {
                key: "lt0".into(),
                server: Some(tandem_protocol::Record {
                    key: "lt0".into(),
                    value: Some("1:2".into()),
                    sync_count: 6,
                    last_modified: 1,
                    last_modified_by: "a".into(),
                    device_id: None,
                    device_last_modified: None,
                }),
            }],
        }
        .encode(tandem_protocol::Encoding::Lean);
        assert!(!frame.contains("\"lastModifiedBy\""), "{frame}");
        let r = parse_reply(&frame).unwrap();
        assert_eq!(r.conflicts[0].server.as_ref().unwrap().sync_count, None);
        assert_eq!(r.conflict_sync_count(), 6);
    }

    #[test]
    fn test_conn_ready_reads_the_features() {
        let r = parse_reply(r#"{"type":"ready","id":1,"identity":"a","session":"s","protocol":1,"expiresAt":1,"features":["delta","lean"]}"#).unwrap();
        assert_eq!(r.features, ["delta", "lean"]);
        let r = parse_reply(
            r#"{"type":"ready","id":1,"identity":"a","session":"s","protocol":1,"expiresAt":1}"#,
        )
        .unwrap();
        assert!(r.features.is_empty());
    }

    #[test]
    fn test_conn_auth_frame_asks_for_features() {
        let text = auth_frame(1, "t", &["delta".to_owned(), "lean".to_owned()]);
        assert!(text.contains(r#""features":["delta","lean"]"#), "{text}");
        assert!(!auth_frame(1, "t", &[]).contains("features"));
    }

    #[test]
    fn test_conn_urls_are_normalized() {
        assert_eq!(
            normalize_url("127.0.0.1:7420"),
            "ws://127.0.0.1:7420/v1/sync"
        );
        assert_eq!(normalize_url("http://h:1"), "ws://h:1/v1/sync");
        assert_eq!(normalize_url("wss://h/v1/sync"), "wss://h/v1/sync");
    }
}
