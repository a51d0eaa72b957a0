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

use crate::{Broker, BrokerHealth, Event, EventHandler, FanoutError};
use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Client, Msg, Value};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tandem_store::DatasetKey;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The channel prefix when none is configured.
pub const DEFAULT_PREFIX: &str = "tandem";

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take before the connection counts as dead; bounds how long a
/// session's subscribe or publish can wait on a broken Redis.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle connection is checked, so a dead Redis is noticed without traffic.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect backoff: doubles from the first to the last, each wait jittered by ±50%.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_LAST: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE when re-subscribing after a reconnect.
const SUBSCRIBE_CHUNK: usize = 512;
/// Datasets (and revokes) whose failed publish is remembered for after the reconnect.
const MAX_UNSENT: usize = 10_000;
/// How long `close` waits for the background task.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

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
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

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

/// One connected pair: the pub/sub connection's command half and the publish connection.
#[derive(Clone)]
struct Link {
    sink: PubSubSink,
    publisher: MultiplexedConnection,
    /// Cancelled by whoever first sees the link fail; the background task then reconnects.
    broken: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Link {
    fn fail(&self, reason: String) {
        {
            let mut slot = self.reason.lock();
            if slot.is_none() {
                *slot = Some(reason);
            }
        }
        self.broken.cancel();
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .clone()
            .unwrap_or_else(|| "connection lost".to_owned())
    }
}

/// Events this node failed to publish, kept for re-publishing after the reconnect: per
/// dataset only the one with the highest sync count (a commit or a delete: pushes are whole
/// snapshots, so the latest covers the earlier ones), and every revoke, so that a revoke
/// always reaches the other nodes (re-sent late it may end a subscription that a new grant
/// allowed again; the client re-subscribes, which is the safe side of the race).
#[derive(Default)]
struct Unsent {
    latest: HashMap<Arc<DatasetKey>, Event>,
    revoked: HashSet<(Arc<DatasetKey>, String)>,
}

impl Unsent {
    /// Returns false when the event was dropped because the bound is reached.
    fn remember(&mut self, event: Event) -> bool {
        match event {
            Event::Revoked { dataset, identity } => {
                let key = (dataset, identity);
                if self.revoked.len() >= MAX_UNSENT && !self.revoked.contains(&key) {
                    return false;
                }
                self.revoked.insert(key);
                true
            }
            event => {
                let dataset = event.dataset().clone();
                match self.latest.get(&dataset) {
                    Some(kept) if sync_count(kept) >= sync_count(&event) => true,
                    None if self.latest.len() >= MAX_UNSENT => false,
                    _ => {
                        self.latest.insert(dataset, event);
                        true
                    }
                }
            }
        }
    }

    /// Everything remembered, revokes first (they end subscriptions before any push).
    fn take(&mut self) -> Vec<Event> {
        let mut events: Vec<Event> = self
            .revoked
            .drain()
            .map(|(dataset, identity)| Event::Revoked { dataset, identity })
            .collect();
        events.extend(self.latest.drain().map(|(_, event)| event));
        events
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.latest.len() + self.revoked.len()
    }
}

fn sync_count(event: &Event) -> u64 {
    match event {
        Event::Commit { sync_count, .. } | Event::Deleted { sync_count, .. } => *sync_count,
        Event::Revoked { .. } => 0,
    }
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

    fn remember(&self, event: Event) {
        let kept = self.state.lock().unsent.remember(event);
        if !kept {
            tracing::warn!(
                max = MAX_UNSENT,
                "too many unpublished datasets; other nodes see this one on their next resync"
            );
        }
        self.republish.notify_one();
    }

    async fn publish_on(&self, link: &Link, event: &Event) -> Result<(), String> {
        let channel = self.config.channel(event.dataset());
        let payload = encode(event);
        let mut publisher = link.publisher.clone();
        let mut command = ::redis::cmd("PUBLISH");
        command.arg(channel).arg(payload);
        within(COMMAND_TIMEOUT, command.query_async::<i64>(&mut publisher))
            .await
            .map(|_| ())
    }

    /// Hands one message from Redis to the handler; a payload that does not decode, or that
    /// names another dataset than its channel, is logged and dropped.
    fn deliver(&self, msg: &Msg) {
        let channel = msg.get_channel_name();
        match decode(msg.get_payload_bytes()) {
            Ok(event) => {
                if self.config.channel(event.dataset()) != channel {
                    tracing::warn!(channel, dataset = %event.dataset(), "dropping redis message for another dataset's channel");
                    return;
                }
                self.handler.on_event(event);
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "dropping undecodable redis message");
            }
        }
    }

    /// Connects both connections, subscribes every wanted channel, and installs the link.
    async fn connect(&self) -> Result<(Link, PubSubStream), String> {
        let pubsub = within(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT));
        let publisher = within(
            CONNECT_TIMEOUT,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await?;
        let (mut sink, stream) = pubsub.split();
        let mut subscribed: HashSet<String> = HashSet::new();
        // Subscribe until the wanted set stops moving, then install the link under the same
        // lock that `subscribe` takes: a channel wanted from then on is subscribed by its
        // caller, one wanted before is subscribed here.
        loop {
            let (add, remove) = {
                let mut state = self.state.lock();
                let add: Vec<String> = state.wanted.difference(&subscribed).cloned().collect();
                let remove: Vec<String> = subscribed.difference(&state.wanted).cloned().collect();
                if add.is_empty() && remove.is_empty() {
                    if state.closed {
                        return Err("broker closed".to_owned());
                    }
                    let link = Link {
                        sink,
                        publisher,
                        broken: CancellationToken::new(),
                        reason: Arc::new(Mutex::new(None)),
                    };
                    state.link = Some(link.clone());
                    state.health = BrokerHealth::Up;
                    return Ok((link, stream));
                }
                (add, remove)
            };
            for chunk in add.chunks(SUBSCRIBE_CHUNK) {
                within(COMMAND_TIMEOUT * 2, sink.subscribe(chunk)).await?;
                subscribed.extend(chunk.iter().cloned());
            }
            for chunk in remove.chunks(SUBSCRIBE_CHUNK) {
                within(COMMAND_TIMEOUT * 2, sink.unsubscribe(chunk)).await?;
                for channel in chunk {
                    subscribed.remove(channel);
                }
            }
        }
    }

    /// Reads messages until the link breaks (returns its reason) or the broker shuts down.
    async fn serve(self: &Arc<Self>, link: &Link, mut stream: PubSubStream) -> Option<String> {
        // The library's reader forwards into an unbounded channel: nothing is ever dropped
        // for lagging, and the handler is synchronous and non-blocking.
        tokio::spawn(run_pinger(link.clone()));
        tokio::spawn(run_republisher(self.clone(), link.clone()));
        self.handler.on_resync();
        self.republish.notify_one();
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return None,
                _ = link.broken.cancelled() => return Some(link.reason()),
                msg = stream.next() => match msg {
                    Some(msg) => self.deliver(&msg),
                    None => {
                        link.fail("connection closed".to_owned());
                        return Some(link.reason());
                    }
                },
            }
        }
    }

    /// Drops the link; on shutdown unsubscribes first (best effort).
    async fn teardown(&self, link: Link, reason: &str) {
        let wanted: Vec<String> = {
            let mut state = self.state.lock();
            state.link = None;
            state.health = BrokerHealth::Degraded(format!("redis: {reason}"));
            state.wanted.iter().cloned().collect()
        };
        link.fail(reason.to_owned());
        if self.shutdown.is_cancelled() && !wanted.is_empty() {
            let mut sink = link.sink.clone();
            let _ = within(COMMAND_TIMEOUT, sink.unsubscribe(wanted)).await;
        }
    }
}

/// The background task: connect, serve, and on any fault reconnect with backoff.
async fn run(inner: Arc<Inner>) {
    let target = redact(&inner.config.url);
    // When the current outage began and how many attempts it took; `None` while connected.
    let mut outage: Option<(Instant, u32)> = None;
    let mut first = true;
    loop {
        let connected = tokio::select! {
            _ = inner.shutdown.cancelled() => break,
            connected = inner.connect() => connected,
        };
        match connected {
            Ok((link, stream)) => {
                match outage.take() {
                    Some((since, attempts)) => tracing::info!(
                        redis = %target,
                        outage_ms = since.elapsed().as_millis() as u64,
                        attempts,
                        "redis connection restored; channels re-subscribed, resyncing from the store"
                    ),
                    None => tracing::info!(redis = %target, "redis connected"),
                }
                first = false;
                let reason = inner.serve(&link, stream).await;
                let reason = reason.unwrap_or_else(|| "broker closed".to_owned());
                inner.teardown(link, &reason).await;
                if inner.shutdown.is_cancelled() {
                    break;
                }
                tracing::warn!(redis = %target, reason = %reason, "redis connection lost; writes go on, other nodes catch up after the reconnect");
                outage = Some((Instant::now(), 0));
            }
            Err(e) => {
                inner.set_health(BrokerHealth::Degraded(format!("redis unreachable: {e}")));
                let (_, attempts) = outage.get_or_insert_with(|| {
                    if first {
                        tracing::warn!(redis = %target, error = %e, "redis unreachable at start; serving local subscribers only until it is back");
                    }
                    (Instant::now(), 0)
                });
                *attempts += 1;
                tracing::debug!(redis = %target, error = %e, attempt = *attempts, "redis reconnect failed");
                let wait = backoff(*attempts);
                tokio::select! {
                    _ = inner.shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    let mut state = inner.state.lock();
    state.link = None;
    state.health = BrokerHealth::Degraded("redis: broker closed".to_owned());
}

/// The wait before reconnect attempt `attempt` (1-based): doubling from `BACKOFF_FIRST`
/// up to `BACKOFF_LAST`, times a random factor in [0.5, 1.5).
fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_LAST);
    base.mul_f64(rand::random_range(0.5..1.5))
}

/// Pings both connections while the link lives, so a dead Redis is noticed without traffic.
async fn run_pinger(link: Link) {
    let mut sink = link.sink.clone();
    let mut publisher = link.publisher.clone();
    let ping = ::redis::cmd("PING");
    loop {
        tokio::select! {
            _ = link.broken.cancelled() => return,
            _ = tokio::time::sleep(PING_INTERVAL) => {}
        }
        let subscriber = within(COMMAND_TIMEOUT, sink.ping::<Value>());
        let publisher = within(COMMAND_TIMEOUT, ping.query_async::<Value>(&mut publisher));
        let (subscriber, publisher) = tokio::join!(subscriber, publisher);
        if let Err(e) = subscriber.and(publisher) {
            link.fail(format!("ping failed: {e}"));
            return;
        }
    }
}

/// Re-publishes the events that failed to publish, whenever some are waiting.
async fn run_republisher(inner: Arc<Inner>, link: Link) {
    loop {
        tokio::select! {
            biased;
            _ = link.broken.cancelled() => return,
            _ = inner.republish.notified() => {}
        }
        let events = inner.state.lock().unsent.take();
        if events.is_empty() {
            continue;
        }
        let count = events.len();
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            if let Err(e) = inner.publish_on(&link, &event).await {
                let mut state = inner.state.lock();
                state.unsent.remember(event);
                for event in events {
                    state.unsent.remember(event);
                }
                drop(state);
                link.fail(format!("re-publish failed: {e}"));
                return;
            }
        }
        tracing::info!(
            count,
            "re-published events that could not be published during the outage"
        );
    }
}

/// Runs a Redis command with a deadline; errors become strings for health and logs.
async fn within<T>(
    limit: Duration,
    command: impl Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {} ms", limit.as_millis())),
    }
}

// The message envelope: a version byte, a kind byte, the dataset as three length-prefixed
// strings, then for a commit or a delete the sync count and the frame bytes verbatim (to the
// end of the message), for a revoke the identity as a fourth string. Lengths and the sync
// count are big-endian u32 and u64.

const VERSION: u8 = 1;
const KIND_COMMIT: u8 = 1;
const KIND_DELETED: u8 = 2;
const KIND_REVOKED: u8 = 3;

fn encode(event: &Event) -> Vec<u8> {
    let dataset = event.dataset();
    let tail = match event {
        Event::Commit { frame, .. } | Event::Deleted { frame, .. } => 8 + frame.len(),
        Event::Revoked { identity, .. } => 4 + identity.len(),
    };
    let mut out = Vec::with_capacity(
        2 + 12 + dataset.pool.len() + dataset.owner.len() + dataset.name.len() + tail,
    );
    let kind = match event {
        Event::Commit { .. } => KIND_COMMIT,
        Event::Deleted { .. } => KIND_DELETED,
        Event::Revoked { .. } => KIND_REVOKED,
    };
    out.extend_from_slice(&[VERSION, kind]);
    for part in [&dataset.pool, &dataset.owner, &dataset.name] {
        put_str(&mut out, part);
    }
    match event {
        Event::Commit {
            sync_count, frame, ..
        }
        | Event::Deleted {
            sync_count, frame, ..
        } => {
            out.extend_from_slice(&sync_count.to_be_bytes());
            out.extend_from_slice(frame);
        }
        Event::Revoked { identity, .. } => put_str(&mut out, identity),
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Dataset parts and identities are validated far below 4 GiB.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum DecodeError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown envelope version {0}")]
    Version(u8),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("string is not utf-8")]
    Utf8,
    #[error("trailing bytes after a revoke")]
    Trailing,
}

fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let mut reader = Reader(bytes);
    let version = reader.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = reader.u8()?;
    if !matches!(kind, KIND_COMMIT | KIND_DELETED | KIND_REVOKED) {
        return Err(DecodeError::Kind(kind));
    }
    let pool = reader.string()?;
    let owner = reader.string()?;
    let name = reader.string()?;
    let dataset = Arc::new(DatasetKey::new(pool, owner, name));
    match kind {
        KIND_REVOKED => {
            let identity = reader.string()?;
            if !reader.0.is_empty() {
                return Err(DecodeError::Trailing);
            }
            Ok(Event::Revoked { dataset, identity })
        }
        _ => {
            let sync_count = reader.u64()?;
            let frame = Bytes::copy_from_slice(reader.0);
            Ok(if kind == KIND_COMMIT {
                Event::Commit {
                    dataset,
                    sync_count,
                    frame,
                }
            } else {
                Event::Deleted {
                    dataset,
                    sync_count,
                    frame,
                }
            })
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut buf = [0u8; 8];
        buf.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(buf))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let mut buf = [0u8; 4];
        buf.copy_from_slice(self.take(4)?);
        let len = u32::from_be_bytes(buf) as usize;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(owner: &str, name: &str) -> Arc<DatasetKey> {
        Arc::new(DatasetKey::new("default", owner, name))
    }

    fn commit(dataset: &Arc<DatasetKey>, sync_count: u64) -> Event {
        Event::Commit {
            dataset: dataset.clone(),
            sync_count,
            frame: Bytes::from(format!("{{\"syncCount\":{sync_count}}}")),
        }
    }

    #[test]
    fn test_redis_envelope_round_trips_every_kind() {
        let dataset = key("auth0|a:b", "x:y.z");
        let events = [
            commit(&dataset, 7),
            Event::Deleted {
                dataset: dataset.clone(),
                sync_count: u64::MAX,
                frame: Bytes::from_static(b""),
            },
            Event::Revoked {
                dataset: dataset.clone(),
                identity: "bob:1".to_owned(),
            },
        ];
        for event in events {
            assert_eq!(decode(&encode(&event)), Ok(event));
        }
    }

    #[test]
    fn test_redis_envelope_rejects_bad_payloads_without_panicking() {
        let good = encode(&commit(&key("u", "d"), 3));
        // Every prefix short of the sync count is truncated; none may panic.
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        assert_eq!(decode(b""), Err(DecodeError::Truncated));
        assert_eq!(decode(&[9, 1]), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[VERSION, 42]), Err(DecodeError::Kind(42)));
        let mut huge = vec![VERSION, KIND_COMMIT];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&huge), Err(DecodeError::Truncated));
        let mut bad_utf8 = vec![VERSION, KIND_COMMIT, 0, 0, 0, 1, 0xff];
        bad_utf8.extend_from_slice(&[0; 16]);
        assert_eq!(decode(&bad_utf8), Err(DecodeError::Utf8));
        let mut trailing = encode(&Event::Revoked {
            dataset: key("u", "d"),
            identity: "v".to_owned(),
        });
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(DecodeError::Trailing));
    }

    #[test]
    fn test_redis_channel_names_do_not_collide_on_colons() {
        let config = RedisConfig::new("redis://localhost");
        let a = config.channel(&key("a:b", "c"));
        let b = config.channel(&key("a", "b:c"));
        let c = config.channel(&key("a%3Ab", "c"));
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_eq!(a, "tandem:ds:default:a%3Ab:c");
        assert_eq!(b, "tandem:ds:default:a:b%3Ac");
        assert_eq!(c, "tandem:ds:default:a%253Ab:c");
    }

    #[test]
    fn test_redis_backoff_doubles_and_stays_bounded() {
        for attempt in 1..100 {
            let wait = backoff(attempt);
            assert!(wait >= BACKOFF_FIRST / 2, "{attempt}: {wait:?}");
            assert!(wait <= BACKOFF_LAST.mul_f64(1.5), "{attempt}: {wait:?}");
        }
        assert!(backoff(1) < Duration::from_millis(76));
        assert!(backoff(30) >= Duration::from_secs(1));
    }

    #[test]
    fn test_redis_unsent_keeps_latest_per_dataset_and_every_revoke() {
        let (a, b) = (key("u", "a"), key("u", "b"));
        let mut unsent = Unsent::default();
        assert!(unsent.remember(commit(&a, 5)));
        assert!(unsent.remember(commit(&a, 3)));
        assert!(unsent.remember(commit(&b, 1)));
        assert!(unsent.remember(Event::Deleted {
            dataset: b.clone(),
            sync_count: 2,
            frame: Bytes::new(),
        }));
        for _ in 0..2 {
            assert!(unsent.remember(Event::Revoked {
                dataset: a.clone(),
                identity: "v".to_owned(),
            }));
        }
        assert_eq!(unsent.len(), 3);
        let events = unsent.take();
        assert!(matches!(events[0], Event::Revoked { .. }));
        assert!(events.contains(&commit(&a, 5)));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Deleted { sync_count: 2, .. }))
        );
        assert_eq!(unsent.len(), 0);
    }

    #[test]
    fn test_redis_config_debug_hides_the_password() {
        let config = RedisConfig::new("redis://user:secret@host:6379/0");
        let shown = format!("{config:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("host:6379/0"), "{shown}");
    }

    #[tokio::test]
    async fn test_redis_start_rejects_an_invalid_url() {
        struct Nothing;
        impl EventHandler for Nothing {
            fn on_event(&self, _: Event) {}
            fn on_resync(&self) {}
        }
        let result = RedisBroker::start(RedisConfig::new("not a url"), Arc::new(Nothing));
        assert!(matches!(result, Err(FanoutError::Unavailable(_))));
    }
}
