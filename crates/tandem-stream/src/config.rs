//! The change stream's settings section (`stream_*` keys and flags).

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tandem_gateway::config::duration;

/// A webhook sink: its consumer name (its position in the store is kept under it, so
/// renaming one starts it afresh) and its URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookTarget {
    pub name: String,
    pub url: String,
}

/// `NAME=http://host[:port]/path`, as `--stream-webhook` takes it.
pub fn parse_webhook(s: &str) -> Result<WebhookTarget, String> {
    let (name, url) = s
        .split_once('=')
        .ok_or_else(|| format!("invalid stream webhook `{s}`: expected NAME=http://host/path"))?;
    let name = name.trim();
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "invalid stream webhook name `{name}`: 1-64 of [A-Za-z0-9_-]"
        ));
    }
    let uri: hyper::Uri = url
        .trim()
        .parse()
        .map_err(|e| format!("invalid stream webhook url `{url}`: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "invalid stream webhook url `{url}`: expected http://host[:port]/path (put TLS in front with a proxy on the same host)"
        ));
    }
    Ok(WebhookTarget {
        name: name.to_owned(),
        url: url.trim().to_owned(),
    })
}

fn deserialize_webhooks<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<WebhookTarget>, D::Error> {
    // The file takes the flag's form too: `stream_webhooks = ["orders=http://…"]`.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Entry {
        Flag(String),
        Table(WebhookTarget),
    }
    Vec::<Entry>::deserialize(d)?
        .into_iter()
        .map(|e| match e {
            Entry::Flag(s) => parse_webhook(&s).map_err(serde::de::Error::custom),
            Entry::Table(t) => {
                parse_webhook(&format!("{}={}", t.name, t.url)).map_err(serde::de::Error::custom)
            }
        })
        .collect()
}

/// The change stream's settings. No sink configured: no stream (the commit log is still
/// written, for history and for sinks added later, which start at the log's head).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// A webhook the change stream posts event batches to, as `NAME=http://host[:port]/path`
    /// (repeat for more; each is a consumer with its own position, named NAME).
    #[serde(
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "deserialize_webhooks"
    )]
    #[cfg_attr(
        feature = "clap",
        arg(long = "stream-webhook", env = "TANDEM_STREAM_WEBHOOKS", value_delimiter = ',', value_parser = parse_webhook)
    )]
    pub stream_webhooks: Vec<WebhookTarget>,
    /// The secret webhook requests are signed with (`X-Tandem-Signature`, as the sync
    /// hook's); unset, requests are not signed.
    #[serde(skip_serializing)]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_SECRET", hide_env_values = true)
    )]
    pub stream_secret: Option<String>,
    /// A `redis://` URL to `XADD` every event to (consumer `redis`); unset, no Redis sink.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_REDIS"))]
    pub stream_redis: Option<String>,
    /// The Redis Stream's key.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_REDIS_KEY"))]
    pub stream_redis_key: String,
    /// The Redis Stream's length cap (`XADD … MAXLEN ~`): older events are trimmed.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_REDIS_MAXLEN"))]
    pub stream_redis_maxlen: u64,
    /// Most events in one delivery (one webhook request, one Redis round trip).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_BATCH_EVENTS"))]
    pub stream_batch_events: usize,
    /// Most bytes of events in one delivery (a larger single event goes alone).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_BATCH_BYTES"))]
    pub stream_batch_bytes: usize,
    /// How often the delivering node looks for new log entries when it is caught up.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_POLL_INTERVAL", value_parser = duration::parse)
    )]
    pub stream_poll_interval: Duration,
    /// How long a node's delivery lease lasts without renewal: how long deliveries stop
    /// when the delivering node dies.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_LEASE_TTL", value_parser = duration::parse)
    )]
    pub stream_lease_ttl: Duration,
    /// The longest one delivery may take (a webhook request, a Redis call).
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_TIMEOUT", value_parser = duration::parse)
    )]
    pub stream_timeout: Duration,
    /// The wait after a first failed delivery; it doubles with each further failure.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_RETRY_INITIAL", value_parser = duration::parse)
    )]
    pub stream_retry_initial: Duration,
    /// The longest wait between two attempts.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_STREAM_RETRY_MAX", value_parser = duration::parse)
    )]
    pub stream_retry_max: Duration,
    /// Attempts of one batch before its events go to the dead letters and delivery moves
    /// on; 0 = retry for ever (the stream waits for the sink).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_STREAM_MAX_ATTEMPTS"))]
    pub stream_max_attempts: u32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            stream_webhooks: Vec::new(),
            stream_secret: None,
            stream_redis: None,
            stream_redis_key: "tandem:changes".into(),
            stream_redis_maxlen: 1_000_000,
            stream_batch_events: 500,
            stream_batch_bytes: 1024 * 1024,
            stream_poll_interval: Duration::from_millis(20),
            stream_lease_ttl: Duration::from_secs(10),
            stream_timeout: Duration::from_secs(5),
            stream_retry_initial: Duration::from_millis(200),
            stream_retry_max: Duration::from_secs(30),
            stream_max_attempts: 10,
        }
    }
}

impl StreamConfig {
    /// Whether any sink is configured.
    pub fn is_enabled(&self) -> bool {
        !self.stream_webhooks.is_empty() || self.stream_redis.is_some()
    }

    /// The consumer name of the Redis sink.
    pub const REDIS_CONSUMER: &'static str = "redis";

    /// The consumer names of the configured sinks, webhooks first: what Cognito's
    /// BulkPublish waits for.
    pub fn consumer_names(&self) -> Vec<String> {
        self.stream_webhooks
            .iter()
            .map(|w| w.name.clone())
            .chain(
                self.stream_redis
                    .as_ref()
                    .map(|_| Self::REDIS_CONSUMER.to_owned()),
            )
            .collect()
    }

    /// Checks what the types cannot: a lease must outlast a delivery, or two nodes could
    /// deliver at once.
    pub fn validate(&self) -> Result<(), String> {
        if self.stream_lease_ttl < self.stream_timeout * 2 {
            return Err(format!(
                "stream_lease_ttl ({:?}) must be at least twice stream_timeout ({:?})",
                self.stream_lease_ttl, self.stream_timeout
            ));
        }
        if self.stream_batch_events == 0 || self.stream_batch_bytes == 0 {
            return Err("stream_batch_events and stream_batch_bytes must be above 0".into());
        }
        let mut names: Vec<&str> = self
            .stream_webhooks
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        if self.stream_redis.is_some() {
            names.push(Self::REDIS_CONSUMER);
        }
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(
                "stream consumer names must be unique (`redis` is the Redis sink's)".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_webhook_setting_is_name_equals_http_url() {
        let w = parse_webhook("orders=http://127.0.0.1:9000/events").unwrap();
        assert_eq!(w.name, "orders");
        assert_eq!(w.url, "http://127.0.0.1:9000/events");
        assert!(parse_webhook("http://127.0.0.1:9000/events").is_err());
        assert!(parse_webhook("a b=http://x/").is_err());
        assert!(parse_webhook("x=https://example.com/").is_err());
    }

    #[test]
    fn test_stream_config_refuses_a_lease_shorter_than_two_deliveries() {
        let mut c = StreamConfig::default();
        assert!(c.validate().is_ok());
        c.stream_lease_ttl = Duration::from_secs(5);
        assert!(c.validate().is_err());
    }

    #[test]
    fn test_stream_config_refuses_a_webhook_named_like_the_redis_sink() {
        let c = StreamConfig {
            stream_webhooks: vec![parse_webhook("redis=http://127.0.0.1:1/").unwrap()],
            stream_redis: Some("redis://127.0.0.1/".into()),
            ..StreamConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
