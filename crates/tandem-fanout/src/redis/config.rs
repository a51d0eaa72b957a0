//! Where the Redis broker connects and how it names a dataset's channel.

use std::fmt;
use tandem_store::DatasetKey;

/// The channel prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "tandem";

/// Where the broker connects and how it names its channels.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// A `redis://` (or `rediss://`, `redis+unix://`) URL; may carry a password and a db.
    pub url: String,
    /// Channels are `{prefix}:ds:{pool}:{owner}:{name}`; deployments sharing one Redis use
    /// different prefixes.
    pub prefix: String,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }

    /// The dataset's channel: `{prefix}:ds:{pool}:{owner}:{name}` with `%` and `:` in each
    /// part percent-encoded, so owners and names that contain `:` cannot collide.
    pub fn channel(&self, dataset: &DatasetKey) -> String {
        let mut channel = String::with_capacity(
            self.prefix.len() + 6 + dataset.pool.len() + dataset.owner.len() + dataset.name.len(),
        );
        channel.push_str(&self.prefix);
        channel.push_str(":ds");
        for part in [&dataset.pool, &dataset.owner, &dataset.name] {
            channel.push(':');
            for c in part.chars() {
                match c {
                    '%' => channel.push_str("%25"),
                    ':' => channel.push_str("%3A"),
                    c => channel.push(c),
                }
            }
        }
        channel
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig::new("redis://127.0.0.1:6379")
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact(&self.url))
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// The URL without its credentials, for logs.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
