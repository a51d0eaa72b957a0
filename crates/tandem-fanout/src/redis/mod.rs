//! The Redis broker for many gateway nodes: one Redis pub/sub channel per dataset, a node
//! subscribed to a channel only while it has local subscribers (`Channels` does the
//! refcounting), every commit published as the whole dataset frame with its sync count.
//!
//! Faults never stop a node: while Redis is unreachable it keeps accepting writes and
//! serving its own subscribers (a publish reaches the local handler first, directly), reports
//! itself `Degraded`, and reconnects with jittered exponential backoff. After a reconnect it
//! re-subscribes every channel it needs, then calls `EventHandler::on_resync` (the gateway
//! re-reads those datasets from the store, the source of truth) and re-publishes the latest
//! event per dataset that it failed to publish during the outage, so that subscribers on the
//! *other* nodes catch up on commits made here meanwhile.
//!
//! Not done here: Redis Cluster. Beyond one Redis the same design maps onto sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`, Redis 7): a dataset's channel hashes to one shard, so a node
//! keeps one pub/sub connection per shard that holds channels it needs and re-subscribes per
//! shard on a slot migration or failover (each counted as a fault: resync).
//!
//! By job: `config` (where to connect, channel names), `link` (connect, subscribe, serve,
//! reconnect with backoff), `unsent` (events kept through an outage and re-published after
//! it) and `codec` (the message envelope); the broker itself is here.

mod codec;
mod config;
mod link;
#[cfg(test)]
mod tests;
mod unsent;

pub use config::{DEFAULT_PREFIX, RedisConfig};

use self::config::redact;
use self::link::{COMMAND_TIMEOUT, Link, run, within};
use self::unsent::Unsent;
use crate::{Broker, BrokerHealth, Event, EventHandler, FanoutError};
use ::redis::Client;
use async_trait::async_trait;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use tandem_store::DatasetKey;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long `close` waits for the background task.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A checked configuration, ready to start a broker once the node's handler exists.
pub struct RedisBrokerBuilder {
    config: RedisConfig,
    client: Client,
}

impl fmt::Debug for RedisBrokerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBrokerBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisBrokerBuilder {
    /// Starts the broker and its background task (needs a tokio runtime). Never waits for
    /// Redis: if it is down the broker starts `Degraded` and keeps trying.
    pub fn start(self, handler: Arc<dyn EventHandler>) -> Arc<RedisBroker> {
        let inner = Arc::new(Inner {
            config: self.config,
            client: self.client,
            handler,
            state: Mutex::new(State {
                wanted: HashSet::new(),
                link: None,
                health: BrokerHealth::Degraded("redis: connecting".to_owned()),
                unsent: Unsent::default(),
                closed: false,
            }),
            republish: Notify::new(),
            shutdown: CancellationToken::new(),
        });
        let task = tokio::spawn(run(inner.clone()));
        Arc::new(RedisBroker {
            inner,
            task: Mutex::new(Some(task)),
        })
    }
}

/// The Redis backend of `Broker`. See the module docs for the fault model.
pub struct RedisBroker {
    inner: Arc<Inner>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("config", &self.inner.config)
            .field("health", &self.health())
            .finish_non_exhaustive()
    }
}

impl RedisBroker {
    /// Checks the configuration (only the URL can be wrong) without connecting.
    pub fn prepare(config: RedisConfig) -> Result<RedisBrokerBuilder, FanoutError> {
        let client = Client::open(config.url.as_str()).map_err(|e| {
            FanoutError::Unavailable(format!("invalid redis url {}: {e}", redact(&config.url)))
        })?;
        Ok(RedisBrokerBuilder { config, client })
    }

    /// `prepare` then `start`: fails only for an invalid URL.
    pub fn start(
        config: RedisConfig,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Arc<RedisBroker>, FanoutError> {
        Ok(Self::prepare(config)?.start(handler))
    }

    pub fn config(&self) -> &RedisConfig {
        &self.inner.config
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.inner.shutdown.cancel();
    }
}

#[async_trait]
impl Broker for RedisBroker {
    /// Records the channel as wanted, and when connected returns once Redis confirmed the
    /// SUBSCRIBE. When disconnected it returns at once: the reconnect subscribes the channel
    /// before the resync re-reads the dataset, so nothing is missed either way.
    async fn subscribe(&self, dataset: &Arc<DatasetKey>) -> Result<(), FanoutError> {
        let channel = self.inner.config.channel(dataset);
        let link = {
            let mut state = self.inner.state.lock();
            if state.closed {
                return Err(FanoutError::Closed);
            }
            state.wanted.insert(channel.clone());
            state.link.clone()
        };
        if let Some(link) = link {
            let mut sink = link.sink.clone();
            let result = within(COMMAND_TIMEOUT, sink.subscribe(channel.as_str())).await;
            if let Err(e) = result {
                // A fault like any other: the reconnect re-subscribes and resyncs.
                link.fail(format!("subscribe failed: {e}"));
            }
        }
        Ok(())
    }

    async fn unsubscribe(&self, dataset: &Arc<DatasetKey>) -> Result<(), FanoutError> {
        let channel = self.inner.config.channel(dataset);
        let link = {
            let mut state = self.inner.state.lock();
            state.wanted.remove(&channel);
            state.link.clone()
        };
        if let Some(link) = link {
            let mut sink = link.sink.clone();
            if let Err(e) = within(COMMAND_TIMEOUT, sink.unsubscribe(channel.as_str())).await {
                // The reconnect subscribes only wanted channels, which cleans this up.
                link.fail(format!("unsubscribe failed: {e}"));
            }
        }
        Ok(())
    }

    /// Delivers to this node's handler first (no Redis round trip, and it works during an
    /// outage), then publishes to Redis. The copy that comes back from Redis to this node is
    /// dropped by the hub's sync-count filter. On failure the event is remembered (latest
    /// per dataset) and re-published after the reconnect, and `Unavailable` is returned.
    async fn publish(&self, event: Event) -> Result<(), FanoutError> {
        let link = {
            let state = self.inner.state.lock();
            if state.closed {
                return Err(FanoutError::Closed);
            }
            state.link.clone()
        };
        self.inner.handler.on_event(event.clone());
        let error = match link {
            None => self.inner.degraded_reason(),
            Some(link) => match self.inner.publish_on(&link, &event).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    link.fail(format!("publish failed: {e}"));
                    e
                }
            },
        };
        self.inner.remember(event);
        Err(FanoutError::Unavailable(error))
    }

    fn health(&self) -> BrokerHealth {
        self.inner.state.lock().health.clone()
    }

    /// Stops the background task, which unsubscribes and drops both connections.
    async fn close(&self) {
        self.inner.state.lock().closed = true;
        self.inner.shutdown.cancel();
        let task = self.task.lock().take();
        if let Some(task) = task
            && tokio::time::timeout(CLOSE_TIMEOUT, task).await.is_err()
        {
            tracing::warn!("redis broker task did not stop in time");
        }
    }
}

struct Inner {
    config: RedisConfig,
    client: Client,
    handler: Arc<dyn EventHandler>,
    state: Mutex<State>,
    /// Wakes the current link's republisher when events wait in `State::unsent`.
    republish: Notify,
    shutdown: CancellationToken,
}

struct State {
    /// The channels this node needs: every one is subscribed on a connected link.
    wanted: HashSet<String>,
    /// Set only once every wanted channel is subscribed on it.
    link: Option<Link>,
    health: BrokerHealth,
    unsent: Unsent,
    closed: bool,
}

impl Inner {
    fn degraded_reason(&self) -> String {
        match &self.state.lock().health {
            BrokerHealth::Degraded(reason) => reason.clone(),
            BrokerHealth::Up => "redis: reconnecting".to_owned(),
        }
    }

    fn set_health(&self, health: BrokerHealth) {
        self.state.lock().health = health;
    }
}
