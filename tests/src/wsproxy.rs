//! A loopback WebSocket proxy that passes whole frames between a client and a real server
//! and can rewrite the server's text frames on the way: a server that speaks an older
//! protocol (e.g. a `ready` frame without `limits`) without keeping an older build around.
//! A TCP proxy cannot do this: frames are masked and split across reads.

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderMap, Uri};

/// Rewrites one text frame from the server.
pub type Rewrite = fn(&str) -> String;

pub struct WsProxy {
    pub addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl WsProxy {
    /// As a server that does not announce its write limits: `limits` is removed from every
    /// `ready` frame; everything else passes unchanged.
    pub async fn without_ready_limits(target: SocketAddr) -> WsProxy {
        WsProxy::start(target, strip_ready_limits).await
    }

    /// Forwards every connection to the server at `target` (same path, same headers), with
    /// each text frame from the server passed through `rewrite`.
    pub async fn start(target: SocketAddr, rewrite: Rewrite) -> WsProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind ws proxy");
        let addr = listener.local_addr().expect("ws proxy address");
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target, rewrite));
            }
        });
        WsProxy { addr, accept }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/v1/sync", self.addr)
    }
}

impl Drop for WsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// `ready` without `limits`; any other frame as it was.
pub fn strip_ready_limits(text: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut frame)) if frame["type"] == "ready" => {
            frame.remove("limits");
            serde_json::Value::Object(frame).to_string()
        }
        _ => text.to_owned(),
    }
}

/// One client connection: upgrade it, open the same upgrade to the server, then pass frames
/// both ways until either side ends. Failures just drop the connection, as a network would.
async fn relay(client: TcpStream, target: SocketAddr, rewrite: Rewrite) {
    let mut upgrade: Option<(Uri, HeaderMap)> = None;
    // The signature is tungstenite's `Callback`; its error type is not ours to shrink.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, response: Response| {
        upgrade = Some((request.uri().clone(), request.headers().clone()));
        Ok(response)
    };
    let Ok(client) = tokio_tungstenite::accept_hdr_async(client, callback).await else {
        return;
    };
    let Some((uri, headers)) = upgrade else {
        return;
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = format!("ws://{target}{path}")
        .into_client_request()
        .expect("upstream request");
    // The client's own headers (authorization, origin…); the handshake's are made anew.
    for (name, value) in &headers {
        let handshake = matches!(
            name.as_str(),
            "host"
                | "connection"
                | "upgrade"
                | "sec-websocket-key"
                | "sec-websocket-version"
                | "sec-websocket-extensions"
        );
        if !handshake {
            request.headers_mut().append(name, value.clone());
        }
    }
    let Ok((server, _)) = tokio_tungstenite::connect_async(request).await else {
        return;
    };
    let (mut to_client, mut from_client) = client.split();
    let (mut to_server, mut from_server) = server.split();
    // Pings and pongs are each hop's own (tungstenite answers them); the rest is forwarded.
    let up = async {
        while let Some(Ok(message)) = from_client.next().await {
            if matches!(message, Message::Ping(_) | Message::Pong(_)) {
                continue;
            }
            if to_server.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_server.close().await;
    };
    let down = async {
        while let Some(Ok(message)) = from_server.next().await {
            let message = match message {
                Message::Ping(_) | Message::Pong(_) => continue,
                Message::Text(text) => Message::text(rewrite(text.as_str())),
                other => other,
            };
            if to_client.send(message).await.is_err() {
                break;
            }
        }
        let _ = to_client.close().await;
    };
    tokio::join!(up, down);
}
