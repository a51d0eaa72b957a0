//! A Cognito SyncTrigger the tests run, as a ported Lambda handler would be: a real HTTP
//! server on a loopback port that takes Cognito's SyncTrigger event, checks the request's
//! signature (the deployment's sync hook secret, [`crate::hook::SECRET`]), and answers the
//! event back with `title` upper-cased, or 400 (the Lambda "throws") when a new value is
//! longer than 10 characters. It keeps every event it was sent.

use crate::http::{answer_json, read_request};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;

#[derive(Default)]
struct State {
    events: Mutex<Vec<Value>>,
    bad_signatures: AtomicUsize,
}

pub struct Trigger {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Trigger {
    pub async fn start() -> Trigger {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    while let Ok(Some(request)) = read_request(&mut stream).await {
                        if !request.signed_with(crate::hook::SECRET) {
                            state.bad_signatures.fetch_add(1, Ordering::SeqCst);
                        }
                        let event: Value =
                            serde_json::from_slice(&request.body).unwrap_or(Value::Null);
                        state.events.lock().unwrap().push(event.clone());
                        let (status, answer) = handler(event);
                        if answer_json(&mut stream, status, &answer).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Trigger { addr, state, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}/sync-trigger", self.addr)
    }

    pub fn events(&self) -> Vec<Value> {
        self.state.events.lock().unwrap().clone()
    }

    pub fn bad_signatures(&self) -> usize {
        self.state.bad_signatures.load(Ordering::SeqCst)
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a Lambda SyncTrigger handler does with the event: returns it, changed.
fn handler(mut event: Value) -> (u16, Value) {
    let Some(records) = event["datasetRecords"].as_object_mut() else {
        return (400, json!({ "message": "no datasetRecords" }));
    };
    for (key, record) in records.iter_mut() {
        if record["newValue"]
            .as_str()
            .is_some_and(|v| v.chars().count() > 10)
        {
            return (
                400,
                json!({ "errorMessage": format!("the value of {key} is over 10 characters") }),
            );
        }
        if key == "title"
            && let Some(v) = record["newValue"].as_str()
        {
            record["newValue"] = json!(v.to_uppercase());
        }
    }
    (200, event)
}
