//! Shared counters and latency histograms, written by every connection task and read by
//! the progress line and the final report.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A run's time base: nanoseconds since its start, plus the wall clock at that start (for
/// the markers' Unix timestamps).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    unix_start_ns: u64,
}

impl Clock {
    pub fn new() -> Clock {
        let unix_start_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, saturating_ns);
        Clock {
            start: Instant::now(),
            unix_start_ns,
        }
    }

    /// Nanoseconds since the run started.
    pub fn now(&self) -> u64 {
        saturating_ns(self.start.elapsed())
    }

    pub fn instant(&self, ns: u64) -> Instant {
        self.start + Duration::from_nanos(ns)
    }

    pub fn unix_ns(&self, ns: u64) -> u64 {
        self.unix_start_ns.saturating_add(ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

pub fn saturating_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Latencies are recorded in microseconds, from 1 µs to an hour, 3 significant digits.
#[allow(clippy::expect_used)]
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

const SHARDS: usize = 16;

/// A histogram split in shards so that thousands of tasks rarely wait on one lock.
pub struct ShardedHistogram {
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl std::fmt::Debug for ShardedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedHistogram").finish_non_exhaustive()
    }
}

impl Default for ShardedHistogram {
    fn default() -> Self {
        ShardedHistogram {
            shards: (0..SHARDS).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }
}

impl ShardedHistogram {
    /// The shard a task (by its slot) records into.
    pub fn shard(&self, slot: usize) -> parking_lot::MutexGuard<'_, Histogram<u64>> {
        self.shards[slot % SHARDS].lock()
    }

    pub fn record(&self, slot: usize, ns: u64) {
        record_ns(&mut self.shard(slot), ns);
    }

    /// All shards merged.
    pub fn merged(&self) -> Histogram<u64> {
        let mut all = new_histogram();
        for shard in &self.shards {
            let _ = all.add(&*shard.lock());
        }
        all
    }
}

/// Records a latency given in nanoseconds (at least 1 µs).
pub fn record_ns(h: &mut Histogram<u64>, ns: u64) {
    h.saturating_record((ns / 1000).max(1));
}

/// Everything a run counts. Writes and deliveries are counted only for measured writes
/// (scheduled after the warmup); errors and reconnects always.
#[derive(Debug, Default)]
pub struct Stats {
    /// Measured writes sent.
    pub sent: AtomicU64,
    /// Measured writes acknowledged (committed).
    pub acked: AtomicU64,
    /// Updates refused with a `conflict` frame.
    pub conflicts: AtomicU64,
    /// Measured writes scheduled but never sent (the writer was still waiting for a reply
    /// at the end).
    pub unsent: AtomicU64,
    /// Measured writes whose reply never came (connection lost, or the run ended first).
    pub unknown_outcome: AtomicU64,
    /// Writes delivered to subscribers (one per subscriber per covered write).
    pub delivered: AtomicU64,
    /// Live pushes (`dataset` and `delta` frames) received by subscribers that count
    /// deliveries, and their bytes; `delta_frames` of them were deltas.
    pub push_frames: AtomicU64,
    pub push_bytes: AtomicU64,
    pub delta_frames: AtomicU64,
    /// `snapshot` replies to re-subscribes after a reconnect, and their bytes.
    pub snapshot_frames: AtomicU64,
    pub snapshot_bytes: AtomicU64,
    /// Subscriptions that count deliveries, checked when their task ends, and how many of
    /// them had by then seen every writer's last committed write (the final state);
    /// `slow_*` the same for the slow readers among them.
    pub subscribers: AtomicU64,
    pub subscribers_final: AtomicU64,
    pub slow_subscribers: AtomicU64,
    pub slow_subscribers_final: AtomicU64,
    /// Connections currently open and set up.
    pub open: AtomicU64,
    /// Connections set up, counting each reconnect.
    pub established: AtomicU64,
    pub reconnects: AtomicU64,
    /// Measured ListRecords sent and answered 200 (`cognito` with --list-rate).
    pub lists_sent: AtomicU64,
    pub lists_ok: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Connections that ended while the run wanted them, by close code (1006: no close
    /// frame; 1005: a close frame without a code).
    closes: Mutex<BTreeMap<u16, u64>>,
    /// The features the server turned on, as the first `ready` said.
    features: Mutex<Option<Vec<String>>>,
    /// Scheduled send → subscriber receives a push that covers the write.
    pub delivery: ShardedHistogram,
    /// Scheduled send → the writer receives the ack.
    pub commit: ShardedHistogram,
    /// Scheduled send → the ListRecords reply.
    pub list: ShardedHistogram,
    /// Connect + auth (+ subscribe where the scenario subscribes at once).
    pub setup: ShardedHistogram,
}

impl Stats {
    pub fn error(&self, code: &str) {
        self.error_n(code, 1);
    }

    pub fn error_n(&self, code: &str, n: u64) {
        let mut errors = self.errors.lock();
        match errors.get_mut(code) {
            Some(count) => *count += n,
            None => {
                errors.insert(code.to_owned(), n);
            }
        }
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().clone()
    }

    pub fn close(&self, code: u16) {
        *self.closes.lock().entry(code).or_default() += 1;
    }

    pub fn closes(&self) -> BTreeMap<u16, u64> {
        self.closes.lock().clone()
    }

    /// Notes what a `ready` said it turned on (the first one is kept).
    pub fn features_on(&self, features: &[String]) {
        self.features
            .lock()
            .get_or_insert_with(|| features.to_vec());
    }

    pub fn features(&self) -> Option<Vec<String>> {
        self.features.lock().clone()
    }

    pub fn error_total(&self) -> u64 {
        self.errors.lock().values().sum()
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// One open connection fewer.
    pub fn sub_open(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }
}
