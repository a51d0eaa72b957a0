//! A sync hook the tests run: a real HTTP server on a loopback port that checks each
//! request's signature and answers by a policy the test can switch (decide, sleep, or be
//! gone), counting the calls.

use crate::http::{answer_json, read_request};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

pub const SECRET: &str = "hook-secret-0123456789";

/// How the hook answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Reject any value longer than 10 characters; upper-case the value of key `title`;
    /// accept the rest unchanged.
    Policy = 0,
    /// Answer after 3 s.
    Sleep = 1,
    /// Answer HTTP 500.
    Fail = 2,
}

pub struct Hook {
    pub addr: SocketAddr,
    mode: Arc<AtomicU8>,
    calls: Arc<AtomicUsize>,
    bad_signatures: Arc<AtomicUsize>,
    stopped: Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Hook {
    pub async fn start() -> Hook {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener)
    }

    /// Serves again on the same address after `stop` (the breaker test brings it back).
    pub async fn start_at(addr: SocketAddr) -> Hook {
        let listener = TcpListener::bind(addr).await.unwrap();
        Self::serve(listener)
    }

    fn serve(listener: TcpListener) -> Hook {
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(Mode::Policy as u8));
        let calls = Arc::new(AtomicUsize::new(0));
        let bad_signatures = Arc::new(AtomicUsize::new(0));
        let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (m, c, b, s) = (
            mode.clone(),
            calls.clone(),
            bad_signatures.clone(),
            stopped.clone(),
        );
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (m, c, b, s) = (m.clone(), c.clone(), b.clone(), s.clone());
                tokio::spawn(async move {
                    let _ = handle(stream, &m, &c, &b, &s).await;
                });
            }
        });
        Hook {
            addr,
            mode,
            calls,
            bad_signatures,
            stopped,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn bad_signatures(&self) -> usize {
        self.bad_signatures.load(Ordering::SeqCst)
    }

    /// Stops listening and drops open connections: calls get connection refused.
    pub fn stop(self) -> SocketAddr {
        self.stopped.store(true, Ordering::SeqCst);
        self.task.abort();
        self.addr
    }
}

async fn handle(
    mut stream: TcpStream,
    mode: &AtomicU8,
    calls: &AtomicUsize,
    bad_signatures: &AtomicUsize,
    stopped: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    loop {
        let Some(request) = read_request(&mut stream).await? else {
            return Ok(());
        };
        if stopped.load(Ordering::SeqCst) {
            // Gone: the connection drops without an answer.
            return Ok(());
        }
        let body = &request.body;
        calls.fetch_add(1, Ordering::SeqCst);
        if !request.signed_with(SECRET) {
            bad_signatures.fetch_add(1, Ordering::SeqCst);
        }
        let (status, answer) = match mode.load(Ordering::SeqCst) {
            1 => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                (200, json!({ "action": "accept" }))
            }
            2 => (500, json!({ "error": "boom" })),
            _ => (
                200,
                decide(&serde_json::from_slice(body).unwrap_or(Value::Null)),
            ),
        };
        answer_json(&mut stream, status, &answer).await?;
    }
}

fn decide(request: &Value) -> Value {
    let patches = request["patches"].as_array().cloned().unwrap_or_default();
    if patches
        .iter()
        .any(|p| p["value"].as_str().is_some_and(|v| v.chars().count() > 10))
    {
        return json!({ "action": "reject", "message": "values are at most 10 characters" });
    }
    let rewritten: Vec<Value> = patches
        .into_iter()
        .map(|mut p| {
            if p["key"] == "title"
                && let Some(v) = p["value"].as_str()
            {
                p["value"] = json!(v.to_uppercase());
            }
            p
        })
        .collect();
    json!({ "action": "accept", "patches": rewritten })
}
