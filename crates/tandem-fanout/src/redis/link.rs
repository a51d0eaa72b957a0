//! The link to Redis and its lifecycle: connect both connections, subscribe every wanted
//! channel, serve messages to the handler, ping while idle, and on any fault tear the link
//! down and reconnect with jittered exponential backoff.

use super::Inner;
use super::codec::{decode, encode};
use super::config::redact;
use super::unsent::run_republisher;
use crate::{BrokerHealth, Event};
use ::redis::aio::{MultiplexedConnection, PubSubSink, PubSubStream};
use ::redis::{AsyncConnectionConfig, Msg, Value};
use futures_util::StreamExt;
use parking_lot::Mutex;
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one command may take before the connection counts as dead; bounds how long a
/// session's subscribe or publish can wait on a broken Redis.
pub(super) const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an idle connection is checked, so a dead Redis is noticed without traffic.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Reconnect backoff: doubles from the first to the last, each wait jittered by ±50%.
pub(super) const BACKOFF_FIRST: Duration = Duration::from_millis(50);
pub(super) const BACKOFF_LAST: Duration = Duration::from_secs(2);
/// Channels per SUBSCRIBE when re-subscribing after a reconnect.
const SUBSCRIBE_CHUNK: usize = 512;

/// One connected pair: the pub/sub connection's command half and the publish connection.
#[derive(Clone)]
pub(super) struct Link {
    pub(super) sink: PubSubSink,
    publisher: MultiplexedConnection,
    /// Cancelled by whoever first sees the link fail; the background task then reconnects.
    pub(super) broken: CancellationToken,
    reason: Arc<Mutex<Option<String>>>,
}

impl Link {
    pub(super) fn fail(&self, reason: String) {
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

impl Inner {
    pub(super) async fn publish_on(&self, link: &Link, event: &Event) -> Result<(), String> {
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
pub(super) async fn run(inner: Arc<Inner>) {
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
pub(super) fn backoff(attempt: u32) -> Duration {
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

/// Runs a Redis command with a deadline; errors become strings for health and logs.
pub(super) async fn within<T>(
    limit: Duration,
    command: impl Future<Output = ::redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, command).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("timed out after {} ms", limit.as_millis())),
    }
}
