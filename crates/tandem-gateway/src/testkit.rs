//! Test helpers: a gateway over a real SQLite store in a temporary directory and the
//! in-process broker, and sessions driven through channels instead of sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::auth::{AuthConfig, Identity, Verifier};
use crate::hub::Subscribers;
use crate::{Gateway, GatewayConfig};
use axum::extract::ws::Message;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tandem_fanout::LocalBroker;
use tandem_store::{Limits, SqliteStore, Store};
use tokio::sync::mpsc;

pub(crate) struct TestGateway {
    pub gw: Arc<Gateway>,
    _dir: tempfile::TempDir,
}

pub(crate) fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(dir.path(), Limits::default()).unwrap();
    (Arc::new(store), dir)
}

pub(crate) fn gateway(config: GatewayConfig) -> TestGateway {
    let (store, dir) = store();
    let subscribers = Subscribers::new(store);
    let broker = Arc::new(LocalBroker::new(subscribers.handler()));
    let verifier = Verifier::new(&AuthConfig {
        hs256_secret: Some(vec![7; 32]),
        ..AuthConfig::default()
    })
    .unwrap();
    TestGateway {
        gw: Gateway::new(config, subscribers, broker, verifier),
        _dir: dir,
    }
}

/// A session over channels: what the test sends is what the session reads, what the
/// session writes the test receives.
pub(crate) struct TestClient {
    to_session: mpsc::UnboundedSender<Result<Message, axum::Error>>,
    from_session: mpsc::Receiver<Message>,
}

impl TestGateway {
    /// A session authenticated as `sub` (as by an `Authorization` header). `sink_capacity`
    /// bounds the messages the session can write before the test reads them, like a socket
    /// buffer; a full one makes the session's writes wait.
    pub(crate) fn connect_with(&self, sub: Option<&str>, sink_capacity: usize) -> TestClient {
        let pre_auth = sub.map(|sub| Identity {
            sub: sub.to_owned(),
            expires_at: tandem_store::now_ms() / 1000 + 3600,
        });
        self.connect_identity(pre_auth, sink_capacity)
    }

    /// A session that starts as `pre_auth` (as by an `Authorization` header), if given.
    pub(crate) fn connect_identity(
        &self,
        pre_auth: Option<Identity>,
        sink_capacity: usize,
    ) -> TestClient {
        let (to_session, session_rx) = mpsc::unbounded_channel();
        let (session_tx, from_session) = mpsc::channel(sink_capacity);
        let stream = Box::pin(futures_util::stream::unfold(
            session_rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        ));
        let sink = Box::pin(futures_util::sink::unfold(
            session_tx,
            |tx, message: Message| async move {
                tx.send(message).await.map_err(axum::Error::new)?;
                Ok::<_, axum::Error>(tx)
            },
        ));
        tokio::spawn(crate::session::serve(
            self.gw.clone(),
            sink,
            stream,
            pre_auth,
            None,
        ));
        TestClient {
            to_session,
            from_session,
        }
    }

    pub(crate) async fn connect(&self, sub: &str) -> TestClient {
        let mut client = self.connect_with(Some(sub), 1024);
        let ready = client.recv().await;
        assert_eq!(ready["type"], "ready", "{ready}");
        client
    }
}

impl TestClient {
    pub(crate) fn send(&self, frame: Value) {
        self.send_message(Message::Text(frame.to_string().into()));
    }

    pub(crate) fn send_message(&self, message: Message) {
        self.send_raw(Ok(message));
    }

    pub(crate) fn send_raw(&self, message: Result<Message, axum::Error>) {
        let _ = self.to_session.send(message);
    }

    /// Whether the session stopped reading (its read loop ended and dropped the stream).
    pub(crate) fn session_stopped_reading(&self) -> bool {
        self.to_session.is_closed()
    }

    /// The next message the session wrote, within five seconds.
    pub(crate) async fn next_message(&mut self) -> Option<Message> {
        tokio::time::timeout(Duration::from_secs(5), self.from_session.recv())
            .await
            .expect("the session wrote nothing within 5 s")
    }

    /// The next text frame, as JSON.
    pub(crate) async fn recv(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(text)) => serde_json::from_str(text.as_str()).unwrap(),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Sends a request and returns the first frame that answers its id.
    pub(crate) async fn request(&mut self, frame: Value) -> Value {
        let id = frame["id"].clone();
        self.send(frame);
        loop {
            let reply = self.recv().await;
            if reply["id"] == id {
                return reply;
            }
        }
    }

    /// Reads until the session closes; returns the close code it sent, if any.
    pub(crate) async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next_message().await {
                Some(Message::Close(frame)) => return frame.map(|f| f.code),
                Some(_) => continue,
                None => return None,
            }
        }
    }
}
