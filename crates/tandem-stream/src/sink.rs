//! Where events go: a webhook endpoint (one signed `POST` per batch) or a Redis Stream (one
//! script call per batch that `XADD`s each event under an id derived from its log entry, so
//! a batch delivered twice, after a failover, adds each event once).

use crate::event::Event;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

/// One sink of the change stream.
pub enum Sink {
    Webhook(Webhook),
    Redis(RedisSink),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Webhook(w) => write!(f, "Webhook({})", w.url),
            Sink::Redis(r) => write!(f, "Redis({})", r.key),
        }
    }
}

impl Sink {
    pub fn webhook(url: &str, secret: Option<&str>, timeout: Duration) -> Result<Sink, String> {
        let url: Uri = url
            .parse()
            .map_err(|e| format!("invalid url `{url}`: {e}"))?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        Ok(Sink::Webhook(Webhook {
            url,
            secret: secret.map(|s| s.as_bytes().to_vec()),
            client: Client::builder(TokioExecutor::new()).build(connector),
        }))
    }

    pub fn redis(url: &str, key: &str, max_len: u64) -> Result<Sink, String> {
        let client = redis::Client::open(url).map_err(|e| format!("invalid redis url: {e}"))?;
        Ok(Sink::Redis(RedisSink {
            client,
            connection: tokio::sync::Mutex::new(None),
            key: key.to_owned(),
            max_len: max_len.max(1),
            script: redis::Script::new(XADD_ONCE),
        }))
    }

    /// Whether the sink can take the log's events from here: a Redis Stream whose last
    /// entry is past the log's `head` (a database restored or failed over to an older state,
    /// or a key another deployment writes) would refuse every new event as already added.
    pub async fn check(&self, head: i64) -> Result<(), String> {
        let Sink::Redis(r) = self else {
            return Ok(());
        };
        let top = r.top().await?;
        match top {
            Some(top) if top > head => Err(format!(
                "the Redis Stream `{}` ends at entry {top}, past the commit log's newest entry {head}: its events would be refused as already added; point --stream-redis-key at a new key (or delete this one) after a database restore or failover",
                r.key
            )),
            _ => Ok(()),
        }
    }

    /// Delivers a batch, in order; `Err` means it may be delivered in part and is retried
    /// whole (consumers deduplicate on the event id).
    pub async fn deliver(&self, events: &[Event], timeout: Duration) -> Result<(), String> {
        let call = async {
            match self {
                Sink::Webhook(w) => w.post(events).await,
                Sink::Redis(r) => r.add(events).await,
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => {
                if let Sink::Redis(r) = self {
                    // The connection may hold a half-sent call; start afresh.
                    *r.connection.lock().await = None;
                }
                Err(format!("no answer within {timeout:?}"))
            }
        }
    }
}

pub struct Webhook {
    url: Uri,
    secret: Option<Vec<u8>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Webhook {
    async fn post(&self, events: &[Event]) -> Result<(), String> {
        let body = batch_body(events);
        let range = match (events.first(), events.last()) {
            (Some(first), Some(last)) => {
                vec![("x-tandem-events", format!("{}..{}", first.id, last.id))]
            }
            _ => Vec::new(),
        };
        let request = tandem_gateway::signed_post(
            self.url.clone(),
            self.secret.as_deref(),
            Bytes::from(body),
            &range,
        )?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        // Read (and drop) the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("http status {status}"))
        }
    }
}

/// `{"events":[…]}`: the encoded events spliced in as they are.
fn batch_body(events: &[Event]) -> String {
    let size: usize = events.iter().map(|e| e.json.len() + 1).sum();
    let mut body = String::with_capacity(size + 16);
    body.push_str(r#"{"events":["#);
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&event.json);
    }
    body.push_str("]}");
    body
}

/// Adds each event unless the stream already holds its id or a later one (a redelivery):
/// Redis refuses an `XADD` id at or below the stream's top, which the script skips; any
/// other error fails the call.
const XADD_ONCE: &str = r"
local added = 0
for i = 2, #ARGV, 3 do
  local r = redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[i], 'id', ARGV[i + 1], 'event', ARGV[i + 2])
  if type(r) == 'table' and r.err then
    if not string.find(r.err, 'equal or smaller', 1, true) then
      return redis.error_reply(r.err)
    end
  else
    added = added + 1
  end
end
return added
";

pub struct RedisSink {
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<redis::aio::MultiplexedConnection>>,
    key: String,
    max_len: u64,
    script: redis::Script,
}

impl RedisSink {
    async fn connection(&self) -> Result<redis::aio::MultiplexedConnection, String> {
        let mut slot = self.connection.lock().await;
        match slot.as_ref() {
            Some(c) => Ok(c.clone()),
            None => {
                let c = self
                    .client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| format!("redis connect failed: {e}"))?;
                *slot = Some(c.clone());
                Ok(c)
            }
        }
    }

    /// The log id of the stream's last entry (`<id>-<n>`), if it has one.
    async fn top(&self) -> Result<Option<i64>, String> {
        let mut connection = self.connection().await?;
        let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
            .arg(&self.key)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut connection)
            .await
            .map_err(|e| format!("reading the Redis Stream's end failed: {e}"))?;
        Ok(last
            .first()
            .and_then(|(id, _)| id.split('-').next()?.parse().ok()))
    }

    async fn add(&self, events: &[Event]) -> Result<(), String> {
        let mut connection = self.connection().await?;
        let mut invocation = self.script.key(&self.key);
        invocation.arg(self.max_len);
        for event in events {
            invocation
                .arg(format!("{}-0", event.entry_id))
                .arg(&event.id)
                .arg(&event.json);
        }
        let outcome: Result<u64, redis::RedisError> =
            invocation.invoke_async(&mut connection).await;
        match outcome {
            Ok(_) => Ok(()),
            Err(e) => {
                if e.is_io_error() || e.is_connection_dropped() {
                    *self.connection.lock().await = None;
                }
                Err(format!("redis XADD failed: {e}"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_batch_body_is_an_events_array() {
        let e = |id: i64| Event {
            entry_id: id,
            id: id.to_string(),
            json: format!(r#"{{"id":"{id}"}}"#),
        };
        let body = batch_body(&[e(1), e(2)]);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["events"][1]["id"], "2");
    }
}
