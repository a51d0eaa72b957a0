//! A change stream webhook the tests run: a real HTTP server on a loopback port that checks
//! each request's signature, fails every `fail_every`-th request with HTTP 500 (the others
//! are kept), and records the events of the requests it accepted, in arrival order.

use crate::http::{answer_json, read_request};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

pub const SECRET: &str = "stream-secret-0123456789";

#[derive(Default)]
struct State {
    events: Mutex<Vec<Value>>,
    requests: AtomicUsize,
    failed: AtomicUsize,
    bad_signatures: AtomicUsize,
    /// 0 = never fail; n = fail requests n, 2n, 3n, …; usize::MAX = fail all.
    fail_every: AtomicUsize,
}

pub struct Webhook {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Webhook {
    pub async fn start(fail_every: usize) -> Webhook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        state.fail_every.store(fail_every, Ordering::SeqCst);
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    while let Ok(Some(request)) = read_request(&mut stream).await {
                        let n = state.requests.fetch_add(1, Ordering::SeqCst) + 1;
                        if !request.signed_with(SECRET) {
                            state.bad_signatures.fetch_add(1, Ordering::SeqCst);
                        }
                        let every = state.fail_every.load(Ordering::SeqCst);
                        let fail = every == usize::MAX || (every > 0 && n.is_multiple_of(every));
                        let status = if fail {
                            state.failed.fetch_add(1, Ordering::SeqCst);
                            500
                        } else {
                            let body: Value =
                                serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                            if let Some(events) = body["events"].as_array() {
                                state.events.lock().unwrap().extend(events.iter().cloned());
                            }
                            200
                        };
                        if answer_json(&mut stream, status, &json!({})).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Webhook { addr, state, task }
    }

    /// The `--stream-webhook` value for this receiver.
    pub fn setting(&self, name: &str) -> String {
        format!("{name}=http://{}/events", self.addr)
    }

    pub fn set_fail_every(&self, n: usize) {
        self.state.fail_every.store(n, Ordering::SeqCst);
    }

    /// Every event accepted so far, in arrival order (redeliveries included).
    pub fn events(&self) -> Vec<Value> {
        self.state.events.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn failed(&self) -> usize {
        self.state.failed.load(Ordering::SeqCst)
    }

    pub fn bad_signatures(&self) -> usize {
        self.state.bad_signatures.load(Ordering::SeqCst)
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events with the same `id` counted once (the first), in first-arrival order.
pub fn first_of_each(events: &[Value]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    events
        .iter()
        .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_owned()))
        .cloned()
        .collect()
}
