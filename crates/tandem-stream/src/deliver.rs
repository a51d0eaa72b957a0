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

/// This node's hold on the sink: the lease until `until` (ms; 0 = not held) and the
/// position the store gave with it.
struct Lease {
    until: i64,
    position: i64,
}

/// How a batch ended.
enum Sent {
    Delivered,
    /// Gave up on these events (the others of the batch went) after this many attempts
    /// with this error.
    GaveUp(Vec<usize>, u32, String),
    /// The lease ran out (or went to another node) before the batch went.
    LeaseLost,
    Stopped,
}

/// Less than this left on the lease after a delivery's timeout: renew first.
const LEASE_MARGIN_MS: i64 = 1_000;

/// Entries read at first after taking a lease; doubled after each batch that was not cut
/// by bytes, up to `stream_batch_events`.
const FIRST_READ: usize = 16;

impl Delivery {
    async fn run(self) {
        let name = self.stats.name.clone();
        let ttl_ms = millis(self.config.stream_lease_ttl);
        let mut lease = Lease {
            until: 0,
            position: 0,
        };
        let mut head_read = Instant::now() - Duration::from_secs(60);
        let mut store_wait = self.config.stream_retry_initial;
        // Entries read at once: small after a takeover, cut to what fitted in the last
        // batch's bytes when large entries filled it, doubled back after each batch that
        // was not cut, so a sink's memory stays near `stream_batch_bytes` rather than
        // `stream_batch_events` large entries (an update's entry can hold two copies of a
        // 1 MiB dataset, a replay's one).
        let mut read_limit = FIRST_READ.min(self.config.stream_batch_events);
        while !self.stop.is_cancelled() {
            let now = now_ms();
            if lease.until - now < ttl_ms / 2 {
                let held = lease.until != 0;
                match self.renew(&mut lease).await {
                    Ok(true) => {
                        if !held {
                            tracing::info!(consumer = %name, position = lease.position, "delivering the change stream from this node");
                            read_limit = FIRST_READ.min(self.config.stream_batch_events);
                            // A Redis Stream already past the log would swallow new events.
                            let checked = match self.store.log_head().await {
                                Ok(head) => self.sink.check(head).await,
                                Err(e) => Err(format!("reading the log head: {e}")),
                            };
                            if let Err(e) = checked {
                                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                                self.warn(&e);
                                self.release(&mut lease).await;
                                self.pause(self.config.stream_retry_max).await;
                                continue;
                            }
                        }
                        store_wait = self.config.stream_retry_initial;
                    }
                    Ok(false) => {
                        // Another node delivers; look again well within its lease.
                        self.pause(self.config.stream_lease_ttl / 4).await;
                        continue;
                    }
                    Err(e) => {
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
            let entries = match self.store.log_since(lease.position, asked).await {
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
            drop(entries);
            let cut = events.len() < asked;
            read_limit = if cut && bytes > self.config.stream_batch_bytes {
                events.len()
            } else {
                (read_limit * 2).min(self.config.stream_batch_events)
            };
            if let Some(last) = events.last() {
                let head = self.stats.head.load(Ordering::Relaxed).max(last.entry_id);
                self.stats.head.store(head, Ordering::Relaxed);
            }
            let last_id = events.last().map_or(lease.position, |e| e.entry_id);
            match self.send(&events, &mut lease).await {
                Sent::Stopped => break,
                Sent::LeaseLost => {
                    self.lose_lease(&mut lease);
                    continue;
                }
                Sent::GaveUp(failed, attempts, error) => {
                    let time = now_ms();
                    let letters: Vec<DeadLetter> = failed
                        .iter()
                        .map(|&i| DeadLetter {
                            entry_id: events[i].entry_id,
                            event: events[i].json.clone(),
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
                    tracing::warn!(consumer = %name, events = letters.len(), attempts, error = %error, "change stream events dead-lettered");
                    self.stats
                        .dead_lettered
                        .fetch_add(letters.len() as u64, Ordering::Relaxed);
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
                    lease.position = last_id;
                    self.stats.position.store(last_id, Ordering::Relaxed);
                    self.stats
                        .events
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    if !cut {
                        self.stats.oldest_pending_ms.store(0, Ordering::Relaxed);
                    }
                }
                Ok(false) => {
                    // Another node holds the lease now and will send this batch again.
                    self.lose_lease(&mut lease);
                }
                Err(e) => {
                    self.warn(&format!("acknowledging: {e}"));
                    // Re-leasing reads the position back: sent again only if it was lost.
                    lease.until = 0;
                }
            }
        }
        if self.stats.leader.load(Ordering::Relaxed) {
            self.release(&mut lease).await;
        }
    }

    /// Takes or renews the lease: `Ok(true)` when this node holds it (and `lease` has the
    /// store's position), `Ok(false)` when another node does.
    async fn renew(&self, lease: &mut Lease) -> Result<bool, tandem_store::StoreError> {
        let now = now_ms();
        let ttl_ms = millis(self.config.stream_lease_ttl);
        match self
            .store
            .stream_lease(&self.stats.name, &self.node, now, ttl_ms)
            .await?
        {
            Some(position) => {
                lease.until = now + ttl_ms;
                lease.position = position;
                self.stats.leader.store(true, Ordering::Relaxed);
                self.stats.position.store(position, Ordering::Relaxed);
                Ok(true)
            }
            None => {
                self.lose_lease(lease);
                Ok(false)
            }
        }
    }

    async fn release(&self, lease: &mut Lease) {
        let _ = self
            .store
            .stream_release(&self.stats.name, &self.node)
            .await;
        self.lose_lease(lease);
    }

    /// Renews the lease if less than `needed` ms of it would be left; whether this node
    /// still holds it at the same position.
    async fn keep(&self, lease: &mut Lease, needed: i64) -> bool {
        if lease.until - now_ms() >= needed {
            return true;
        }
        let position = lease.position;
        matches!(self.renew(lease).await, Ok(true)) && lease.position == position
    }

    /// Sends one batch until it goes, retrying with exponential backoff and jitter; renews
    /// the lease before an attempt that could outlast it and during the waits, so no other
    /// node takes the batch over while this one counts its attempts. When the attempts are
    /// spent, each event is tried once on its own, so only the events the sink refuses are
    /// given up on.
    async fn send(&self, events: &[Event], lease: &mut Lease) -> Sent {
        let timeout_ms = millis(self.config.stream_timeout);
        let ttl_ms = millis(self.config.stream_lease_ttl);
        let mut attempt = 0_u32;
        let mut wait = self.config.stream_retry_initial;
        let last_error = loop {
            if self.stop.is_cancelled() {
                return Sent::Stopped;
            }
            attempt += 1;
            if !self.keep(lease, timeout_ms + LEASE_MARGIN_MS).await {
                return Sent::LeaseLost;
            }
            match self.sink.deliver(events, self.config.stream_timeout).await {
                Ok(()) => return Sent::Delivered,
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    self.warn(&format!("delivery attempt {attempt} failed: {e}"));
                    let max = self.config.stream_max_attempts;
                    if max > 0 && attempt >= max {
                        break e;
                    }
                }
            }
            // Up to a quarter less, so nodes and sinks do not retry in step.
            let jitter = rand::random::<f64>() * 0.25;
            let mut left = wait.mul_f64(1.0 - jitter);
            // Waits in steps of at most a third of the lease, renewing between them.
            while !left.is_zero() {
                let step = left.min(self.config.stream_lease_ttl / 3);
                tokio::select! {
                    () = tokio::time::sleep(step) => {}
                    () = self.stop.cancelled() => return Sent::Stopped,
                }
                left -= step;
                if !self.keep(lease, ttl_ms / 2).await {
                    return Sent::LeaseLost;
                }
            }
            wait = (wait * 2).min(self.config.stream_retry_max);
        };
        if events.len() == 1 {
            return Sent::GaveUp(vec![0], attempt, last_error);
        }
        let mut failed = Vec::new();
        let mut error = last_error;
        for (i, event) in events.iter().enumerate() {
            if self.stop.is_cancelled() {
                return Sent::Stopped;
            }
            if !self.keep(lease, timeout_ms + LEASE_MARGIN_MS).await {
                return Sent::LeaseLost;
            }
            if let Err(e) = self
                .sink
                .deliver(std::slice::from_ref(event), self.config.stream_timeout)
                .await
            {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                failed.push(i);
                error = e;
            }
        }
        if failed.is_empty() {
            Sent::Delivered
        } else {
            Sent::GaveUp(failed, attempt, error)
        }
    }

    fn lose_lease(&self, lease: &mut Lease) {
        if lease.until != 0 || self.stats.leader.load(Ordering::Relaxed) {
            tracing::info!(consumer = %self.stats.name, "change stream lease held elsewhere");
        }
        lease.until = 0;
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
