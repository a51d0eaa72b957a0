//! The Sync API's developer operations (COGNITO.md §7), for the developer key only: the
//! pool's usage, its events (a SyncTrigger URL, see [`super::trigger`]), its stream
//! configuration as far as Cognito's shape can say it, and BulkPublish, which is
//! `tandem stream replay --pool` run in the background with a status every node can read.
//!
//! BulkPublish's status is a pool setting in the store (JSON), written only by
//! compare-and-swap: of two nodes starting one at once, one wins and the other answers
//! `DuplicateRequestException`. The node that runs it renews a heartbeat in the status; a
//! status whose heartbeat is older than [`STALE_AFTER`] belongs to a node that stopped and
//! reads as FAILED (and may be started again). SUCCEEDED means every sink this node
//! delivers to has acknowledged the last snapshot entry: the data reached the stream, as
//! Cognito's "published to the configured stream" says.

use super::sync::{SyncApi, invalid, ok, page_size, pool_not_found, query, seconds, store_error};
use super::trigger;
use crate::Gateway;
use axum::http::{Method, Uri};
use axum::response::Response;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tandem_cognito::{CognitoError, ErrorType};
use tandem_store::{Expect, Store, now_ms};
use tokio_util::sync::CancellationToken;

/// The pool setting that holds the last BulkPublish's status.
const BULK_PUBLISH: &str = "cognito.bulkpublish";
/// How often the node running a BulkPublish renews its heartbeat.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A running BulkPublish whose heartbeat is older than this was left by a node that stopped.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(60);
/// How often a BulkPublish looks whether the sinks have the snapshot entries yet.
const DELIVERY_POLL: Duration = Duration::from_millis(250);
/// The model's bound on ListIdentityPoolUsage's `maxResults`.
const MAX_POOLS_PAGE: usize = 60;

/// A developer operation and the pool it names.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum DeveloperOp {
    ListIdentityPoolUsage,
    DescribeIdentityPoolUsage(String),
    GetCognitoEvents(String),
    SetCognitoEvents(String),
    GetIdentityPoolConfiguration(String),
    SetIdentityPoolConfiguration(String),
    BulkPublish(String),
    GetBulkPublishDetails(String),
}

impl DeveloperOp {
    /// The operation a (decoded) path names, as the service model routes it.
    pub(crate) fn parse(method: &Method, segments: &[&str]) -> Option<DeveloperOp> {
        let (get, post) = (*method == Method::GET, *method == Method::POST);
        let pool = |p: &str| p.to_owned();
        Some(match *segments {
            ["identitypools"] if get => DeveloperOp::ListIdentityPoolUsage,
            ["identitypools", p] if get => DeveloperOp::DescribeIdentityPoolUsage(pool(p)),
            ["identitypools", p, "events"] if get => DeveloperOp::GetCognitoEvents(pool(p)),
            ["identitypools", p, "events"] if post => DeveloperOp::SetCognitoEvents(pool(p)),
            ["identitypools", p, "configuration"] if get => {
                DeveloperOp::GetIdentityPoolConfiguration(pool(p))
            }
            ["identitypools", p, "configuration"] if post => {
                DeveloperOp::SetIdentityPoolConfiguration(pool(p))
            }
            ["identitypools", p, "bulkpublish"] if post => DeveloperOp::BulkPublish(pool(p)),
            ["identitypools", p, "getBulkPublishDetails"] if post => {
                DeveloperOp::GetBulkPublishDetails(pool(p))
            }
            _ => return None,
        })
    }

    fn pool(&self) -> Option<&str> {
        match self {
            DeveloperOp::ListIdentityPoolUsage => None,
            DeveloperOp::DescribeIdentityPoolUsage(p)
            | DeveloperOp::GetCognitoEvents(p)
            | DeveloperOp::SetCognitoEvents(p)
            | DeveloperOp::GetIdentityPoolConfiguration(p)
            | DeveloperOp::SetIdentityPoolConfiguration(p)
            | DeveloperOp::BulkPublish(p)
            | DeveloperOp::GetBulkPublishDetails(p) => Some(p),
        }
    }
}

/// Serves a developer operation; the caller has checked the developer key.
pub(crate) async fn serve(
    gw: &Gateway,
    api: &SyncApi,
    op: DeveloperOp,
    uri: &Uri,
    body: &[u8],
) -> Result<Response, CognitoError> {
    if let Some(pool) = op.pool()
        && pool != api.pool_id
    {
        return Err(pool_not_found(pool));
    }
    let store_pool = gw.config.pool.as_str();
    match op {
        DeveloperOp::ListIdentityPoolUsage => {
            #[derive(Deserialize)]
            struct Params {
                #[serde(rename = "maxResults")]
                max_results: Option<String>,
            }
            let params: Params = query(uri)?;
            let max = page_size(params.max_results.as_deref(), MAX_POOLS_PAGE)?;
            let usage = pool_usage(gw, api).await?;
            Ok(ok(json!({
                "IdentityPoolUsages": [usage],
                "MaxResults": max,
                "Count": 1,
            })))
        }
        DeveloperOp::DescribeIdentityPoolUsage(_) => Ok(ok(
            json!({ "IdentityPoolUsage": pool_usage(gw, api).await? }),
        )),
        DeveloperOp::GetCognitoEvents(_) => {
            let url = gw
                .store
                .pool_setting(store_pool, trigger::SETTING)
                .await
                .map_err(store_error)?;
            let events: BTreeMap<&str, String> = url
                .into_iter()
                .map(|url| (trigger::SYNC_TRIGGER, url))
                .collect();
            Ok(ok(json!({ "Events": events })))
        }
        DeveloperOp::SetCognitoEvents(_) => {
            let url = events_input(body)?;
            gw.store
                .put_pool_setting(store_pool, trigger::SETTING, url.as_deref(), Expect::Any)
                .await
                .map_err(store_error)?;
            gw.triggers.forget(store_pool);
            // Not the URL itself: it may carry a token in its query.
            tracing::info!(set = url.is_some(), "cognito SyncTrigger changed");
            Ok(ok(json!({})))
        }
        DeveloperOp::GetIdentityPoolConfiguration(_) => {
            let sinks = &gw.config.cognito.stream_sinks;
            let mut streams = json!({
                "StreamingStatus": if sinks.is_empty() { "DISABLED" } else { "ENABLED" },
            });
            if !sinks.is_empty() {
                streams["StreamName"] = json!(sinks.join(","));
            }
            Ok(ok(json!({
                "IdentityPoolId": api.pool_id,
                "CognitoStreams": streams,
            })))
        }
        DeveloperOp::SetIdentityPoolConfiguration(_) => Err(invalid(
            "SetIdentityPoolConfiguration is not supported: Tandem's change stream is configured on each node with --stream-webhook / --stream-redis, and its push is the WebSocket (docs/COGNITO.md)",
        )),
        DeveloperOp::BulkPublish(_) => bulk_publish(gw, api).await,
        DeveloperOp::GetBulkPublishDetails(_) => {
            let status = read_status(gw.store.as_ref(), store_pool).await?;
            let mut body = json!({
                "IdentityPoolId": api.pool_id,
                "BulkPublishStatus": "NOT_STARTED",
            });
            if let Some((_, status)) = status {
                let status = status.seen_at(now_ms());
                body["BulkPublishStatus"] = json!(status.status);
                body["BulkPublishStartTime"] = seconds(status.started);
                if let Some(completed) = status.completed {
                    body["BulkPublishCompleteTime"] = seconds(completed);
                }
                if let Some(failure) = status.failure {
                    body["FailureMessage"] = json!(failure);
                }
            }
            Ok(ok(body))
        }
    }
}

/// The `IdentityPoolUsage` shape. Tandem counts no sync sessions, so `SyncSessionsCount`
/// is left out.
async fn pool_usage(gw: &Gateway, api: &SyncApi) -> Result<Value, CognitoError> {
    let usage = gw
        .store
        .pool_usage(&gw.config.pool)
        .await
        .map_err(store_error)?;
    let mut shape = json!({
        "IdentityPoolId": api.pool_id,
        "DataStorage": usage.bytes,
    });
    if let Some(last) = usage.last_modified {
        shape["LastModifiedDate"] = seconds(last);
    }
    Ok(shape)
}

/// SetCognitoEvents' `Events`: the SyncTrigger URL, or `None` (empty or absent) to remove it.
fn events_input(body: &[u8]) -> Result<Option<String>, CognitoError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Input {
        events: Option<BTreeMap<String, String>>,
    }
    let input: Input =
        serde_json::from_slice(body).map_err(|e| invalid(format!("invalid body: {e}")))?;
    let mut events = input.events.ok_or_else(|| invalid("Events is required"))?;
    let url = events.remove(trigger::SYNC_TRIGGER);
    if let Some(other) = events.keys().next() {
        return Err(invalid(format!(
            "unknown event type '{}': Tandem has only SyncTrigger",
            other.chars().take(64).collect::<String>()
        )));
    }
    match url.filter(|u| !u.is_empty()) {
        None => Ok(None),
        Some(url) => {
            trigger::parse_url(&url).map_err(invalid)?;
            Ok(Some(url))
        }
    }
}

/// A BulkPublish's status as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Status {
    /// NOT_STARTED never is stored: IN_PROGRESS, SUCCEEDED or FAILED.
    status: String,
    started: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    completed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<String>,
    /// When the running node last said it runs (ms).
    heartbeat: i64,
}

impl Status {
    fn running(&self, now: i64) -> bool {
        self.status == "IN_PROGRESS" && now - self.heartbeat < millis(STALE_AFTER)
    }

    /// The status as a reader sees it at `now`: a run whose node stopped reads as FAILED.
    fn seen_at(self, now: i64) -> Status {
        if self.status == "IN_PROGRESS" && !self.running(now) {
            return Status {
                status: "FAILED".into(),
                failure: Some("the node running the bulk publish stopped".into()),
                ..self
            };
        }
        self
    }

    fn text(&self) -> String {
        // A struct of strings and integers always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The stored status and its text (for a compare-and-swap), if any.
async fn read_status(
    store: &dyn Store,
    pool: &str,
) -> Result<Option<(String, Status)>, CognitoError> {
    let Some(text) = store
        .pool_setting(pool, BULK_PUBLISH)
        .await
        .map_err(store_error)?
    else {
        return Ok(None);
    };
    let status = serde_json::from_str(&text).map_err(|e| {
        tracing::warn!(error = %e, "unreadable bulk publish status in the store");
        CognitoError::new(ErrorType::InternalError, "internal error")
    })?;
    Ok(Some((text, status)))
}

async fn bulk_publish(gw: &Gateway, api: &SyncApi) -> Result<Response, CognitoError> {
    let sinks = gw.config.cognito.stream_sinks.clone();
    if sinks.is_empty() {
        return Err(CognitoError::new(
            ErrorType::InvalidConfiguration,
            "Cognito streams are not configured for this identity pool: configure the change stream with --stream-webhook or --stream-redis on this node first",
        ));
    }
    let pool = gw.config.pool.clone();
    let now = now_ms();
    let current = read_status(gw.store.as_ref(), &pool).await?;
    if current.as_ref().is_some_and(|(_, s)| s.running(now)) {
        return Err(duplicate());
    }
    let status = Status {
        status: "IN_PROGRESS".into(),
        started: now,
        completed: None,
        failure: None,
        heartbeat: now,
    };
    let text = status.text();
    let expect = Expect::Value(current.as_ref().map(|(text, _)| text.as_str()));
    let won = gw
        .store
        .put_pool_setting(&pool, BULK_PUBLISH, Some(&text), expect)
        .await
        .map_err(store_error)?;
    if !won {
        // Another node started one between the read and the write.
        return Err(duplicate());
    }
    tracing::info!(pool = %pool, "cognito bulk publish started");
    let run = Run {
        store: gw.store.clone(),
        pool,
        sinks,
        status,
        text,
        timeout: gw.config.cognito.cognito_bulk_publish_timeout,
    };
    tokio::spawn(run.run(gw.shutdown.clone()));
    Ok(ok(json!({ "IdentityPoolId": api.pool_id })))
}

fn duplicate() -> CognitoError {
    CognitoError::new(
        ErrorType::DuplicateRequest,
        "A bulk publish is already in progress for this identity pool.",
    )
}

/// A BulkPublish running on this node.
struct Run {
    store: Arc<dyn Store>,
    pool: String,
    sinks: Vec<String>,
    status: Status,
    /// The stored text of `status`, which the next write expects.
    text: String,
    timeout: Duration,
}

impl Run {
    async fn run(mut self, shutdown: CancellationToken) {
        let (store, pool, sinks) = (self.store.clone(), self.pool.clone(), self.sinks.clone());
        let work = async move {
            let report = tandem_store::replay(store.as_ref(), Some(&pool), |_| {})
                .await
                .map_err(|e| format!("reading the datasets failed: {e}"))?;
            delivered(store.as_ref(), &sinks, report.last_entry).await?;
            Ok::<u64, String>(report.datasets)
        };
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.tick().await;
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(work, deadline);
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                () = &mut deadline => break Err(format!(
                    "the stream did not take the data within {:?} (cognito_bulk_publish_timeout)",
                    self.timeout
                )),
                () = shutdown.cancelled() => break Err("the node running the bulk publish shut down".to_owned()),
                _ = heartbeat.tick() => {}
            }
            let mut renewed = self.status.clone();
            renewed.heartbeat = now_ms();
            if !self.put(renewed).await {
                tracing::warn!("bulk publish status taken over by another node; not reported here");
                return;
            }
        };
        let mut done = self.status.clone();
        done.completed = Some(now_ms());
        done.heartbeat = now_ms();
        match &outcome {
            Ok(datasets) => {
                tracing::info!(pool = %self.pool, datasets, "cognito bulk publish succeeded");
                done.status = "SUCCEEDED".into();
            }
            Err(e) => {
                tracing::warn!(pool = %self.pool, error = %e, "cognito bulk publish failed");
                done.status = "FAILED".into();
                done.failure = Some(e.clone());
            }
        }
        self.put(done).await;
    }

    /// Writes `status` if the stored one is still this run's last; whether it was.
    async fn put(&mut self, status: Status) -> bool {
        let text = status.text();
        match self
            .store
            .put_pool_setting(
                &self.pool,
                BULK_PUBLISH,
                Some(&text),
                Expect::Value(Some(&self.text)),
            )
            .await
        {
            Ok(true) => {
                self.status = status;
                self.text = text;
                true
            }
            Ok(false) => false,
            // A store hiccup: the next heartbeat tries again (the status stays running).
            Err(e) => {
                tracing::warn!(error = %e, "bulk publish status not written");
                true
            }
        }
    }
}

/// Waits until every one of `sinks` acknowledged log entry `last`.
async fn delivered(store: &dyn Store, sinks: &[String], last: i64) -> Result<(), String> {
    if last == 0 {
        return Ok(());
    }
    loop {
        let consumers = store
            .stream_consumers()
            .await
            .map_err(|e| format!("reading the stream's positions failed: {e}"))?;
        let behind = sinks.iter().any(|sink| {
            consumers
                .iter()
                .find(|c| &c.name == sink)
                .is_none_or(|c| c.position < last)
        });
        if !behind {
            return Ok(());
        }
        tokio::time::sleep(DELIVERY_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_developer_op_routes() {
        let parse = |m: &Method, path: &str| {
            let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
            DeveloperOp::parse(m, &segments)
        };
        assert_eq!(
            parse(&Method::POST, "/identitypools/p/events"),
            Some(DeveloperOp::SetCognitoEvents("p".into()))
        );
        assert_eq!(
            parse(&Method::POST, "/identitypools/p/getBulkPublishDetails"),
            Some(DeveloperOp::GetBulkPublishDetails("p".into()))
        );
        assert_eq!(
            parse(&Method::GET, "/identitypools/p"),
            Some(DeveloperOp::DescribeIdentityPoolUsage("p".into()))
        );
        assert_eq!(parse(&Method::DELETE, "/identitypools/p/events"), None);
        assert_eq!(parse(&Method::GET, "/identitypools/p/identities/i"), None);
    }

    #[test]
    fn test_events_input_sets_clears_and_validates() {
        assert_eq!(
            events_input(br#"{"Events":{"SyncTrigger":"https://h.example/x"}}"#).unwrap(),
            Some("https://h.example/x".into())
        );
        assert_eq!(
            events_input(br#"{"Events":{"SyncTrigger":""}}"#).unwrap(),
            None
        );
        assert_eq!(events_input(br#"{"Events":{}}"#).unwrap(), None);
        for bad in [
            &br#"{}"#[..],
            br#"{"Events":{"SyncTrigger":"arn:aws:lambda:us-east-1:1:function:f"}}"#,
            br#"{"Events":{"Other":"http://h/x"}}"#,
            b"nope",
        ] {
            let err = events_input(bad).unwrap_err();
            assert_eq!(err.error_type, ErrorType::InvalidParameter);
        }
    }

    #[test]
    fn test_bulk_publish_status_of_a_stopped_node_reads_failed() {
        let status = Status {
            status: "IN_PROGRESS".into(),
            started: 1_000,
            completed: None,
            failure: None,
            heartbeat: 1_000,
        };
        assert!(status.running(1_000 + millis(STALE_AFTER) - 1));
        let seen = status.seen_at(1_000 + millis(STALE_AFTER));
        assert_eq!(seen.status, "FAILED");
        assert!(seen.failure.is_some());
    }
}
