//! The delivery loop: one task per sink and node. The task that holds the sink's lease in
//! the store reads the log after the sink's acknowledged position, sends a batch, retries it
//! with exponential backoff (then dead-letters it, if attempts are bounded), and
//! acknowledges the batch's last entry only after the sink took it; the other nodes' tasks
//! wait for the lease. A node that dies stops renewing, and another takes over from the
//! acknowledged position after at most the lease's time: what the dead node sent but did
//! not acknowledge is sent again (at least once; consumers deduplicate on event ids).

use crate::config::StreamConfig;
use crate::event::{Event, encode_entry};
use crate::sink::Sink;
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tandem_store::{DeadLetter, Store, now_ms};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What one sink's task did, for `/metrics`.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    pub name: String,
    /// This node holds the sink's lease.
    pub leader: AtomicBool,
    /// The last log id the sink acknowledged (as this node last knew it).
    pub position: AtomicI64,
    /// The store's newest log id, read about once a second by the leader.
    pub head: AtomicI64,
    /// Server time of the oldest entry read but not yet acknowledged; 0 when caught up.
    pub oldest_pending_ms: AtomicI64,
    pub events: AtomicU64,
    pub batches: AtomicU64,
    /// Failed attempts (each is retried or dead-lettered).
    pub failures: AtomicU64,
    pub dead_lettered: AtomicU64,
}

/// The change stream of one node: a delivery task per configured sink.
pub struct ChangeStream {
    store: Arc<dyn Store>,
    consumers: Vec<Arc<ConsumerStats>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl std::fmt::Debug for ChangeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeStream")
            .field("consumers", &self.consumers.len())
            .finish_non_exhaustive()
    }
}

/// The sinks a configuration names, with their consumer names.
pub(crate) fn sinks(config: &StreamConfig) -> Result<Vec<(String, Sink)>, String> {
    config.validate()?;
    let mut sinks = Vec::new();
    for hook in &config.stream_webhooks {
        let sink = Sink::webhook(
            &hook.url,
            config.stream_secret.as_deref(),
            config.stream_timeout,
        )?;
        sinks.push((hook.name.clone(), sink));
    }
    if let Some(url) = &config.stream_redis {
        let sink = Sink::redis(url, &config.stream_redis_key, config.stream_redis_maxlen)?;
        sinks.push((StreamConfig::REDIS_CONSUMER.to_owned(), sink));
    }
    Ok(sinks)
}

impl ChangeStream {
    /// Starts a delivery task per sink; `node` names this node in the leases (unique per
    /// process). With no sink it only reports the store's forced log drops.
    pub fn start(
        store: Arc<dyn Store>,
        config: &StreamConfig,
        node: String,
    ) -> Result<Arc<ChangeStream>, String> {
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let mut consumers = Vec::new();
        for (name, sink) in sinks(config)? {
            let stats = Arc::new(ConsumerStats {
                name: name.clone(),
                ..ConsumerStats::default()
            });
            consumers.push(stats.clone());
            let task = Delivery {
                store: store.clone(),
                sink,
                stats,
                config: config.clone(),
                node: node.clone(),
                stop: stop.clone(),
                last_warning: Mutex::new(None),
            };
            tasks.spawn(task.run());
        }
        tasks.close();
        if !consumers.is_empty() {
            tracing::info!(consumers = consumers.len(), node, "change stream started");
        }
        Ok(Arc::new(ChangeStream {
            store,
            consumers,
            tasks,
            stop,
        }))
    }

    pub fn consumers(&self) -> &[Arc<ConsumerStats>] {
        &self.consumers
    }

    /// Stops delivering and gives up the leases, so another node takes over at once.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tasks.wait().await;
    }

    /// The stream's lines of `/metrics` (Prometheus text).
    pub fn metrics_text(&self) -> String {
        let mut out = String::new();
        let now = now_ms();
        let lines: [MetricLine; 7] = [
            (
                "tandem_stream_leader",
                "gauge",
                "1 when this node delivers for the consumer.",
                |c, _| i64::from(c.leader.load(Ordering::Relaxed)),
            ),
            (
                "tandem_stream_lag_events",
                "gauge",
                "Log entries not yet acknowledged by the consumer (leader only).",
                |c, _| {
                    if c.leader.load(Ordering::Relaxed) {
                        (c.head.load(Ordering::Relaxed) - c.position.load(Ordering::Relaxed)).max(0)
                    } else {
                        0
                    }
                },
            ),
            (
                "tandem_stream_lag_milliseconds",
                "gauge",
                "Age of the oldest entry read but not yet acknowledged; 0 when caught up.",
                |c, now| match c.oldest_pending_ms.load(Ordering::Relaxed) {
                    0 => 0,
                    t => (now - t).max(0),
                },
            ),
            (
                "tandem_stream_events_total",
                "counter",
                "Events delivered (or dead-lettered) by this node.",
                |c, _| c.events.load(Ordering::Relaxed) as i64,
            ),
            (
                "tandem_stream_batches_total",
                "counter",
                "Batches delivered by this node.",
                |c, _| c.batches.load(Ordering::Relaxed) as i64,
            ),
            (
                "tandem_stream_failures_total",
                "counter",
                "Failed delivery attempts (each retried or dead-lettered).",
                |c, _| c.failures.load(Ordering::Relaxed) as i64,
            ),
            (
                "tandem_stream_dead_letters_total",
                "counter",
                "Events this node gave up on and kept in the dead letters.",
                |c, _| c.dead_lettered.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, kind, help, value) in lines {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for c in &self.consumers {
                let _ = writeln!(out, "{name}{{consumer=\"{}\"}} {}", c.name, value(c, now));
            }
        }
        let forced = self.store.commit_log_forced_drops();
        let _ = writeln!(
            out,
            "# HELP tandem_commit_log_forced_drops_total Log entries compaction dropped before every consumer acknowledged them (the hard cap).\n# TYPE tandem_commit_log_forced_drops_total counter\ntandem_commit_log_forced_drops_total {forced}"
        );
        out
    }
}

/// A metric's name, type, help and its value for one consumer at a time (ms).
type MetricLine = (
    &'static str,
    &'static str,
    &'static str,
    fn(&ConsumerStats, i64) -> i64,
);

/// One sink's task on this node.
struct Delivery {
    store: Arc<dyn Store>,
    sink: Sink,
    stats: Arc<ConsumerStats>,
    config: StreamConfig,
    node: String,
    stop: CancellationToken,
    last_warning: Mutex<Option<Instant>>,
}

/// How a batch ended.
enum Sent {
    Delivered,
    /// Gave up after this many attempts with this error.
    GaveUp(u32, String),
    /// The lease ran out (or went to another node) before the batch went.
    LeaseLost,
    Stopped,
}

/// Less than this left on the lease after a delivery's timeout: renew first.
const LEASE_MARGIN_MS: i64 = 1_000;

impl Delivery {
    async fn run(self) {
        let name = self.stats.name.clone();
        let ttl_ms = millis(self.config.stream_lease_ttl);
        let timeout_ms = millis(self.config.stream_timeout);
        // This node's view of its lease: valid until `lease_until` (0: not held).
        let mut lease_until = 0_i64;
        let mut position = 0_i64;
        let mut head_read = Instant::now() - Duration::from_secs(60);
        let mut store_wait = self.config.stream_retry_initial;
        // Entries read at once: cut to what fitted in the last batch's bytes when large
        // entries filled it, doubled back after each batch that was not cut, so a sink's
        // memory stays near `stream_batch_bytes` rather than `stream_batch_events` large
        // entries.
        let mut read_limit = self.config.stream_batch_events;
        while !self.stop.is_cancelled() {
            let now = now_ms();
            if lease_until - now < ttl_ms / 2 {
                match self
                    .store
                    .stream_lease(&name, &self.node, now, ttl_ms)
                    .await
                {
                    Ok(Some(p)) => {
                        if lease_until == 0 {
                            tracing::info!(consumer = %name, position = p, "delivering the change stream from this node");
                        }
                        lease_until = now + ttl_ms;
                        position = p;
                        self.stats.leader.store(true, Ordering::Relaxed);
                        self.stats.position.store(p, Ordering::Relaxed);
                        store_wait = self.config.stream_retry_initial;
                    }
                    Ok(None) => {
                        self.lose_lease(&mut lease_until);
                        // Another node delivers; look again well within its lease.
                        self.pause(self.config.stream_lease_ttl / 4).await;
                        continue;
                    }
                    Err(e) => {
                        self.lose_lease(&mut lease_until);
                        self.warn(&format!("lease: {e}"));
                        self.pause(store_wait).await;
                        store_wait = (store_wait * 2).min(self.config.stream_retry_max);
                        continue;
                    }
                }
            }
            if head_read.elapsed() >= Duration::from_secs(1) {
                head_read = Instant::now();
                if let Ok(head) = self.store.log_head().await {
                    self.stats.head.store(head, Ordering::Relaxed);
                }
            }
            let asked = read_limit;
            let entries = match self.store.log_since(position, asked).await {
                Ok(entries) => entries,
                Err(e) => {
                    self.warn(&format!("reading the log: {e}"));
                    self.pause(store_wait).await;
                    store_wait = (store_wait * 2).min(self.config.stream_retry_max);
                    continue;
                }
            };
            let Some(first) = entries.first() else {
                self.stats.oldest_pending_ms.store(0, Ordering::Relaxed);
                self.pause(self.config.stream_poll_interval).await;
                continue;
            };
            self.stats
                .oldest_pending_ms
                .store(first.server_time, Ordering::Relaxed);
            let mut events: Vec<Event> = Vec::with_capacity(entries.len());
            let mut bytes = 0;
            for entry in &entries {
                let event = encode_entry(entry);
                bytes += event.json.len();
                if !events.is_empty() && bytes > self.config.stream_batch_bytes {
                    break;
                }
                events.push(event);
            }
            read_limit = if events.len() < entries.len() {
                events.len()
            } else {
                (read_limit * 2).min(self.config.stream_batch_events)
            };
            if let Some(last) = events.last() {
                let head = self.stats.head.load(Ordering::Relaxed).max(last.entry_id);
                self.stats.head.store(head, Ordering::Relaxed);
            }
            let last_id = events.last().map_or(position, |e| e.entry_id);
            match self
                .send(&events, &mut lease_until, position, ttl_ms, timeout_ms)
                .await
            {
                Sent::Stopped => break,
                Sent::LeaseLost => {
                    self.lose_lease(&mut lease_until);
                    continue;
                }
                Sent::GaveUp(attempts, error) => {
                    let time = now_ms();
                    let letters: Vec<DeadLetter> = events
                        .iter()
                        .map(|e| DeadLetter {
                            entry_id: e.entry_id,
                            event: e.json.clone(),
                            error: error.clone(),
                            attempts,
                            time,
                        })
                        .collect();
                    if let Err(e) = self.store.stream_dead_letter(&name, &letters).await {
                        // Not acknowledged: the batch is read and tried again.
                        self.warn(&format!("keeping dead letters: {e}"));
                        self.pause(store_wait).await;
                        continue;
                    }
                    tracing::warn!(consumer = %name, events = events.len(), attempts, error = %error, "change stream batch dead-lettered");
                    self.stats
                        .dead_lettered
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                }
                Sent::Delivered => {
                    self.stats.batches.fetch_add(1, Ordering::Relaxed);
                }
            }
            match self
                .store
                .stream_ack(&name, &self.node, last_id, now_ms())
                .await
            {
                Ok(true) => {
                    position = last_id;
                    self.stats.position.store(last_id, Ordering::Relaxed);
                    self.stats
                        .events
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    if entries.len() == events.len()
                        && entries.len() < self.config.stream_batch_events
                    {
                        self.stats.oldest_pending_ms.store(0, Ordering::Relaxed);
                    }
                }
                Ok(false) => {
                    // Another node holds the lease now and will send this batch again.
                    self.lose_lease(&mut lease_until);
                }
                Err(e) => {
                    self.warn(&format!("acknowledging: {e}"));
                    // Re-leasing reads the position back: sent again only if it was lost.
                    lease_until = 0;
                }
            }
        }
        if self.stats.leader.load(Ordering::Relaxed) {
            let _ = self.store.stream_release(&name, &self.node).await;
            self.stats.leader.store(false, Ordering::Relaxed);
        }
    }

    /// Sends one batch until it goes, retrying with exponential backoff and jitter; renews
    /// the lease before an attempt that could outlast it.
    async fn send(
        &self,
        events: &[Event],
        lease_until: &mut i64,
        position: i64,
        ttl_ms: i64,
        timeout_ms: i64,
    ) -> Sent {
        let mut attempt = 0_u32;
        let mut wait = self.config.stream_retry_initial;
        loop {
            if self.stop.is_cancelled() {
                return Sent::Stopped;
            }
            attempt += 1;
            let now = now_ms();
            if *lease_until - now < timeout_ms + LEASE_MARGIN_MS {
                match self
                    .store
                    .stream_lease(&self.stats.name, &self.node, now, ttl_ms)
                    .await
                {
                    Ok(Some(p)) if p == position => *lease_until = now + ttl_ms,
                    _ => return Sent::LeaseLost,
                }
            }
            match self.sink.deliver(events, self.config.stream_timeout).await {
                Ok(()) => return Sent::Delivered,
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.warn(&format!("delivery attempt {attempt} failed: {e}"));
                    let max = self.config.stream_max_attempts;
                    if max > 0 && attempt >= max {
                        return Sent::GaveUp(attempt, e);
                    }
                }
            }
            // Up to a quarter less, so nodes and sinks do not retry in step.
            let jitter = rand::random::<f64>() * 0.25;
            let pause = wait.mul_f64(1.0 - jitter);
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return Sent::Stopped,
            }
            wait = (wait * 2).min(self.config.stream_retry_max);
        }
    }

    fn lose_lease(&self, lease_until: &mut i64) {
        if *lease_until != 0 || self.stats.leader.load(Ordering::Relaxed) {
            tracing::info!(consumer = %self.stats.name, "change stream lease held elsewhere");
        }
        *lease_until = 0;
        self.stats.leader.store(false, Ordering::Relaxed);
        self.stats.oldest_pending_ms.store(0, Ordering::Relaxed);
    }

    async fn pause(&self, d: Duration) {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.stop.cancelled() => {}
        }
    }

    /// A warning at most every ten seconds per sink: a sink that is down fails every
    /// attempt, and the log must not grow with it.
    fn warn(&self, message: &str) {
        let mut last = self.last_warning.lock();
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(consumer = %self.stats.name, "change stream: {message}");
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
