//! A pool's SyncTrigger: where Cognito called a Lambda before each sync, Tandem POSTs
//! Cognito's own SyncTrigger event to the URL the developer set with SetCognitoEvents, so a
//! Lambda handler ports to an HTTP handler unchanged (docs/HOOKS.md):
//!
//! ```json
//! {"version":2,"eventType":"SyncTrigger","region":"us-east-1","identityPoolId":"…",
//!  "identityId":"…","datasetName":"…",
//!  "datasetRecords":{"key":{"oldValue":"a","newValue":"b","op":"replace"}}}
//! ```
//!
//! A 2xx answer is the event as the Lambda returned it: its `datasetRecords` are what
//! commits (a changed `newValue` or `op` rewrites a record, a key left out is not written,
//! a key added is written too). A 4xx answer (the Lambda threw) or a 2xx that is not such an
//! event refuses the update (`InvalidLambdaFunctionOutputException`); no answer, a 5xx, a
//! timeout or the open breaker refuse it as retriable (`LambdaThrottledException`). The call
//! itself is the deployment hook's ([`crate::hook::HookClient`]).
//!
//! The URL is a pool setting in the store, so every node uses it; each node keeps what it
//! read for `cognito_events_refresh` (the node that set it forgets its copy at once).

use crate::hook::{Breaker, HookClient, HookError, Verdict};
use hyper::Uri;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_protocol::{Patch, PatchOp, Record};
use tandem_store::{DatasetKey, Store, StoreError};

/// The pool setting that holds the SyncTrigger URL.
pub(crate) const SETTING: &str = "cognito.events.SyncTrigger";
/// The longest SyncTrigger URL accepted.
pub(crate) const MAX_URL_LEN: usize = 2048;
/// The event type Cognito knows and Tandem serves.
pub(crate) const SYNC_TRIGGER: &str = "SyncTrigger";
/// The most bytes of a hook's message repeated to the client.
const MAX_MESSAGE: usize = 1024;

/// Checks a SyncTrigger URL: `http://` or `https://` with a host, at most 2048 bytes.
pub(crate) fn parse_url(url: &str) -> Result<Uri, String> {
    if url.len() > MAX_URL_LEN {
        return Err(format!(
            "the SyncTrigger URL is longer than {MAX_URL_LEN} bytes"
        ));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("the SyncTrigger must be an http(s) URL: {e}"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        return Err(
            "the SyncTrigger must be an http:// or https:// URL with a host (Tandem calls an HTTP endpoint where Cognito called a Lambda)"
                .to_owned(),
        );
    }
    Ok(uri)
}

/// A pool's SyncTrigger as a node uses it: its URL and that URL's breaker.
#[derive(Debug)]
pub(crate) struct Trigger {
    pub(crate) url: String,
    uri: Uri,
    breaker: Breaker,
}

struct Cached {
    read_at: Instant,
    trigger: Option<Arc<Trigger>>,
}

/// Each pool's SyncTrigger as this node last read it.
pub(crate) struct Triggers {
    refresh: Duration,
    cache: Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl Triggers {
    pub(crate) fn new(refresh: Duration) -> Triggers {
        Triggers {
            refresh,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The pool's trigger, read from the store when this node's copy is older than the
    /// refresh interval. A URL that did not change keeps its breaker.
    pub(crate) async fn get(
        &self,
        store: &dyn Store,
        pool: &str,
    ) -> Result<Option<Arc<Trigger>>, StoreError> {
        if let Some(cached) = self.cache.lock().get(pool)
            && cached.read_at.elapsed() < self.refresh
        {
            return Ok(cached.trigger.clone());
        }
        let url = store.pool_setting(pool, SETTING).await?;
        let mut cache = self.cache.lock();
        let previous = cache.get(pool).and_then(|c| c.trigger.clone());
        let trigger = match url {
            None => None,
            Some(url) if previous.as_ref().is_some_and(|p| p.url == url) => previous,
            Some(url) => match parse_url(&url) {
                Ok(uri) => Some(Arc::new(Trigger {
                    url,
                    uri,
                    breaker: Breaker::default(),
                })),
                // Only SetCognitoEvents writes it, after the same check.
                Err(e) => {
                    return Err(StoreError::Internal(format!(
                        "the pool's stored SyncTrigger is unusable: {e}"
                    )));
                }
            },
        };
        cache.insert(
            pool.to_owned(),
            Cached {
                read_at: Instant::now(),
                trigger: trigger.clone(),
            },
        );
        Ok(trigger)
    }

    /// Forgets this node's copy of the pool's trigger (after this node changed it).
    pub(crate) fn forget(&self, pool: &str) {
        self.cache.lock().remove(pool);
    }
}

/// One record of the event, as Cognito sends it and as the Lambda returns it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EventRecord {
    #[serde(default)]
    old_value: Option<String>,
    #[serde(default)]
    new_value: Option<String>,
    op: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Event<'a> {
    version: u32,
    event_type: &'a str,
    region: &'a str,
    identity_pool_id: &'a str,
    identity_id: &'a str,
    dataset_name: &'a str,
    dataset_records: BTreeMap<&'a str, EventRecord>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Returned {
    dataset_records: BTreeMap<String, EventRecord>,
}

/// Asks the pool's trigger about an update of `key` (now holding the live `records`).
pub(crate) async fn check(
    client: &HookClient,
    trigger: &Trigger,
    pool_id: &str,
    key: &DatasetKey,
    records: &[Record],
    patches: &[Patch],
) -> Result<Verdict, HookError> {
    let current = |k: &str| records.iter().find(|r| r.key == k);
    let event = Event {
        version: 2,
        event_type: SYNC_TRIGGER,
        region: pool_id
            .split_once(':')
            .map_or(pool_id, |(region, _)| region),
        identity_pool_id: pool_id,
        identity_id: &key.owner,
        dataset_name: &key.name,
        dataset_records: patches
            .iter()
            .map(|p| {
                let record = EventRecord {
                    old_value: current(&p.key).and_then(|r| r.value.clone()),
                    new_value: match p.op {
                        PatchOp::Replace => p.value.clone(),
                        PatchOp::Remove => None,
                    },
                    op: op_name(p.op).to_owned(),
                };
                (p.key.as_str(), record)
            })
            .collect(),
    };
    let body = serde_json::to_vec(&event).map_err(|e| HookError::Failed(e.to_string()))?;
    let answer = client
        .post(
            &trigger.breaker,
            trigger.uri.clone(),
            body,
            |status, body| {
                if status.is_success() {
                    Ok(Ok(body))
                } else if status.is_client_error() {
                    Ok(Err(format!(
                        "the SyncTrigger refused the update ({status}): {}",
                        message(&body)
                    )))
                } else {
                    Err(format!("http status {status}"))
                }
            },
        )
        .await?;
    let body = match answer {
        Ok(body) => body,
        Err(refusal) => return Ok(Verdict::LambdaReject(refusal)),
    };
    Ok(match rewrite(&body, records, patches) {
        Ok(patches) => Verdict::Accept(patches),
        Err(e) => Verdict::LambdaReject(format!("the SyncTrigger returned an invalid event: {e}")),
    })
}

fn op_name(op: PatchOp) -> &'static str {
    match op {
        PatchOp::Replace => "replace",
        PatchOp::Remove => "remove",
    }
}

/// A refusal's text: the body's `message` or `errorMessage` (a Lambda's error shape), else
/// the body itself, cut short.
fn message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Error {
        message: Option<String>,
        error_message: Option<String>,
    }
    let text = serde_json::from_slice::<Error>(body)
        .ok()
        .and_then(|e| e.message.or(e.error_message))
        .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
    let mut text: String = text.chars().filter(|c| !c.is_control()).collect();
    if text.len() > MAX_MESSAGE {
        let mut cut = MAX_MESSAGE;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// The patches the returned event asks for: each of its records, in the request's order
/// first; a record the request did not have is written against the sync count of the live
/// record (0 if none), so the stale check still guards it.
fn rewrite(body: &[u8], records: &[Record], patches: &[Patch]) -> Result<Vec<Patch>, String> {
    let returned: Returned = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(returned.dataset_records.len());
    let mut rest = returned.dataset_records;
    let to_patch = |key: &str, record: EventRecord, base: Option<&Patch>| {
        let op = match record.op.as_str() {
            "replace" => PatchOp::Replace,
            "remove" => PatchOp::Remove,
            other => return Err(format!("record '{key}' has op '{other}'")),
        };
        if op == PatchOp::Replace && record.new_value.is_none() {
            return Err(format!("record '{key}' is a replace without a newValue"));
        }
        let sync_count = base.map_or_else(
            || {
                records
                    .iter()
                    .find(|r| r.key == key)
                    .map_or(0, |r| r.sync_count)
            },
            |p| p.sync_count,
        );
        Ok(Patch {
            op,
            key: key.to_owned(),
            value: match op {
                PatchOp::Replace => record.new_value,
                PatchOp::Remove => None,
            },
            sync_count,
            device_last_modified: base.and_then(|p| p.device_last_modified),
        })
    };
    for patch in patches {
        if let Some(record) = rest.remove(&patch.key) {
            out.push(to_patch(&patch.key, record, Some(patch))?);
        }
    }
    for (key, record) in rest {
        out.push(to_patch(&key, record, None)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, value: &str, sync_count: u64) -> Record {
        Record {
            key: key.into(),
            value: Some(value.into()),
            sync_count,
            last_modified: 0,
            last_modified_by: "u".into(),
            device_last_modified: None,
            device_id: None,
        }
    }

    #[test]
    fn test_trigger_url_must_be_http_or_https() {
        assert!(parse_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(parse_url("https://hooks.example.com/sync").is_ok());
        for bad in [
            "arn:aws:lambda:us-east-1:123456789012:function:f",
            "ftp://example.com/x",
            "/relative",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        let long = format!("http://example.com/{}", "a".repeat(MAX_URL_LEN));
        assert!(parse_url(&long).is_err());
    }

    #[test]
    fn test_trigger_rewrite_keeps_order_counts_and_drops_what_is_left_out() {
        let records = [record("a", "old", 3), record("z", "zz", 7)];
        let patches = [
            Patch::replace("b", "new", 0),
            Patch::replace("a", "x", 3),
            Patch::remove("c", 0),
        ];
        let body = br#"{"version":2,"datasetRecords":{
            "a":{"oldValue":"old","newValue":"X!","op":"replace"},
            "b":{"newValue":"new","op":"remove"},
            "z":{"newValue":"added","op":"replace"}}}"#;
        let out = rewrite(body, &records, &patches).unwrap();
        assert_eq!(
            out,
            [
                Patch::remove("b", 0),
                Patch::replace("a", "X!", 3),
                Patch::replace("z", "added", 7),
            ]
        );
    }

    #[test]
    fn test_trigger_rewrite_refuses_malformed_events() {
        let patches = [Patch::replace("a", "x", 0)];
        for body in [
            &b"not json"[..],
            br#"{"datasetRecords":[]}"#,
            br#"{"version":2}"#,
            br#"{"datasetRecords":{"a":{"newValue":"x","op":"upsert"}}}"#,
            br#"{"datasetRecords":{"a":{"op":"replace"}}}"#,
        ] {
            assert!(
                rewrite(body, &[], &patches).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn test_trigger_message_reads_lambda_error_shapes() {
        assert_eq!(message(br#"{"message":"too big"}"#), "too big");
        assert_eq!(message(br#"{"errorMessage":"boom"}"#), "boom");
        assert_eq!(message(b" plain text\n"), "plain text");
        assert_eq!(
            message("é".repeat(MAX_MESSAGE).as_bytes()).len(),
            MAX_MESSAGE
        );
    }
}
