//! The counting: what each writer sent and how it ended ([`WriteLedger`]), and which of
//! those writes each subscriber has received ([`Coverage`]).
//!
//! A push is a whole-dataset snapshot or a `delta` of the keys that changed, and the server
//! may coalesce pushes (merge deltas) for a slow reader, so a subscriber can skip sequence
//! numbers. Each write rewrites its writer's marker and a writer's commits land in seq
//! order, so a push whose marker says writer `w` is at `seq` **covers** every write of `w`
//! up to `seq` (a merged delta keeps the newest version of each key; a delta without `w`'s
//! marker says nothing about `w`). Each committed,
//! measured write counts as delivered to a subscriber once, at the first push (or
//! snapshot) that covers it, with latency = that push's receive time − the write's
//! scheduled send time. Writes that failed (conflict, error), were never sent, or whose
//! reply never came are neither expected nor delivered. Because the outcome of a skipped
//! write may not be known yet when the push arrives (its reply can reach the writer after
//! the push reaches the subscriber), coverage is recorded first and settled once the
//! writer has the replies.
//!
//! The ledger also keeps, per write, the earliest time any subscriber other than the
//! writer's own connection received a push covering it: the **first delivery**, which is
//! when the write became visible to someone else (a per-write minimum, so memory stays one
//! word per scheduled write).

use crate::stats::record_ns;
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Sent (or not yet sent); no reply yet.
    Pending = 0,
    /// Acknowledged: durable, and must reach every subscriber.
    Committed = 1,
    /// Refused (`conflict` or `error`): nothing was written.
    Failed = 2,
    /// Sent, but the connection ended (or the run did) before the reply.
    Unknown = 3,
    /// Never sent.
    Unsent = 4,
}

impl Outcome {
    fn from_u8(v: u8) -> Outcome {
        match v {
            1 => Outcome::Committed,
            2 => Outcome::Failed,
            3 => Outcome::Unknown,
            4 => Outcome::Unsent,
            _ => Outcome::Pending,
        }
    }
}

/// One writer's schedule and the outcome of each of its writes. Sequence numbers start at
/// 1; seq 0 is the marker the setup write leaves.
#[derive(Debug)]
pub struct WriteLedger {
    /// Scheduled send time of seq `i + 1`, ns since the run's start.
    scheduled: Vec<u64>,
    /// The first seq scheduled after the warmup.
    measured_from: u64,
    outcome: Vec<AtomicU8>,
    /// Every seq at or below this has its final outcome.
    resolved: AtomicU64,
    committed_measured: AtomicU64,
    /// Subscriptions that follow this writer's dataset.
    followers: AtomicU64,
    /// Per seq, the earliest receive time (ns) of a push covering it at a subscriber other
    /// than the writer; `NOT_DELIVERED` until one does.
    first_delivery: Vec<AtomicU64>,
}

const NOT_DELIVERED: u64 = u64::MAX;

impl WriteLedger {
    /// `scheduled` must be ascending; writes scheduled before `measured_from_ns` are warmup.
    pub fn new(scheduled: Vec<u64>, measured_from_ns: u64) -> WriteLedger {
        let measured_from = scheduled
            .iter()
            .position(|&t| t >= measured_from_ns)
            .unwrap_or(scheduled.len()) as u64
            + 1;
        let outcome = scheduled.iter().map(|_| AtomicU8::new(0)).collect();
        let first_delivery = scheduled
            .iter()
            .map(|_| AtomicU64::new(NOT_DELIVERED))
            .collect();
        WriteLedger {
            scheduled,
            measured_from,
            outcome,
            resolved: AtomicU64::new(0),
            committed_measured: AtomicU64::new(0),
            followers: AtomicU64::new(0),
            first_delivery,
        }
    }

    /// Writes evenly at `rate`/s from `phase_ns`, up to (not including) `end_ns`; `rate` must be
    /// positive and finite.
    pub fn evenly(rate: f64, phase_ns: u64, end_ns: u64, measured_from_ns: u64) -> WriteLedger {
        let interval = 1e9 / rate;
        let mut scheduled = Vec::new();
        let mut k = 0u64;
        loop {
            let t = phase_ns as f64 + k as f64 * interval;
            if t >= end_ns as f64 {
                break;
            }
            scheduled.push(t as u64);
            k += 1;
        }
        WriteLedger::new(scheduled, measured_from_ns)
    }

    /// The number of writes (the highest seq).
    pub fn len(&self) -> u64 {
        self.scheduled.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    pub fn scheduled(&self, seq: u64) -> u64 {
        index(seq).map_or(0, |i| self.scheduled[i])
    }

    pub fn is_measured(&self, seq: u64) -> bool {
        seq >= self.measured_from && seq <= self.len()
    }

    /// Measured writes in the schedule.
    pub fn measured(&self) -> u64 {
        (self.len() + 1).saturating_sub(self.measured_from)
    }

    pub fn outcome(&self, seq: u64) -> Outcome {
        index(seq).map_or(Outcome::Pending, |i| {
            Outcome::from_u8(self.outcome[i].load(Ordering::Acquire))
        })
    }

    pub fn set_outcome(&self, seq: u64, outcome: Outcome) {
        if let Some(i) = index(seq).filter(|&i| i < self.outcome.len()) {
            let before = self.outcome[i].swap(outcome as u8, Ordering::AcqRel);
            if outcome == Outcome::Committed
                && before != Outcome::Committed as u8
                && self.is_measured(seq)
            {
                self.committed_measured.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Every seq at or below `seq` now has its final outcome.
    pub fn resolve_through(&self, seq: u64) {
        self.resolved
            .fetch_max(seq.min(self.len()), Ordering::AcqRel);
    }

    pub fn resolved(&self) -> u64 {
        self.resolved.load(Ordering::Acquire)
    }

    pub fn is_resolved(&self) -> bool {
        self.resolved() >= self.len()
    }

    pub fn add_follower(&self) {
        self.followers.fetch_add(1, Ordering::Relaxed);
    }

    pub fn followers(&self) -> u64 {
        self.followers.load(Ordering::Relaxed)
    }

    pub fn committed_measured(&self) -> u64 {
        self.committed_measured.load(Ordering::Relaxed)
    }

    /// The highest seq known to have committed (0: none; the setup write's marker).
    pub fn last_committed(&self) -> u64 {
        (1..=self.len())
            .rev()
            .find(|&seq| self.outcome(seq) == Outcome::Committed)
            .unwrap_or(0)
    }

    /// Deliveries owed: every committed measured write, to every follower.
    pub fn expected_deliveries(&self) -> u64 {
        self.committed_measured() * self.followers()
    }

    /// A subscriber other than the writer received a push covering `seq` at `at_ns`.
    pub fn delivered_to_other(&self, seq: u64, at_ns: u64) {
        if let Some(first) = index(seq).and_then(|i| self.first_delivery.get(i)) {
            first.fetch_min(at_ns, Ordering::AcqRel);
        }
    }

    /// Records, for each committed measured write some other subscriber received, its
    /// first delivery latency (first receive − scheduled send) into `latency`. Writes no
    /// other subscriber received are left out (they show as lost deliveries).
    pub fn record_first_deliveries(&self, latency: &mut Histogram<u64>) {
        for seq in self.measured_from..=self.len() {
            if self.outcome(seq) != Outcome::Committed {
                continue;
            }
            let at = index(seq).map_or(NOT_DELIVERED, |i| {
                self.first_delivery[i].load(Ordering::Acquire)
            });
            if at != NOT_DELIVERED {
                record_ns(latency, at.saturating_sub(self.scheduled(seq)));
            }
        }
    }
}

fn index(seq: u64) -> Option<usize> {
    seq.checked_sub(1).and_then(|i| usize::try_from(i).ok())
}

/// What one subscription has received of one writer's writes.
#[derive(Debug)]
pub struct Coverage {
    ledger: std::sync::Arc<WriteLedger>,
    /// Every seq at or below this is counted (delivered or not owed).
    settled: u64,
    /// The highest seq any push covered.
    highest: u64,
    /// Covered but not yet settled: (covered up to seq, received at ns).
    waiting: VecDeque<(u64, u64)>,
    /// The subscription is on the writer's own connection (rooms): its deliveries count,
    /// but not as anyone else's first delivery.
    own: bool,
}

impl Coverage {
    pub fn new(ledger: std::sync::Arc<WriteLedger>) -> Coverage {
        Coverage {
            ledger,
            settled: 0,
            highest: 0,
            waiting: VecDeque::new(),
            own: false,
        }
    }

    /// Coverage of the writes the same connection sends.
    pub fn of_own_writes(ledger: std::sync::Arc<WriteLedger>) -> Coverage {
        Coverage {
            own: true,
            ..Coverage::new(ledger)
        }
    }

    /// A push received at `now_ns` shows this writer at `seq`.
    pub fn observe(&mut self, seq: u64, now_ns: u64) {
        let seq = seq.min(self.ledger.len());
        if seq > self.highest {
            self.highest = seq;
            self.waiting.push_back((seq, now_ns));
        }
    }

    /// Counts covered writes whose outcome is known: returns how many were delivered and
    /// records their latencies into `latency`.
    pub fn settle(&mut self, latency: &mut Histogram<u64>) -> u64 {
        let resolved = self.ledger.resolved();
        let mut delivered = 0;
        while let Some(&(upto, at)) = self.waiting.front() {
            let end = upto.min(resolved);
            for seq in self.settled + 1..=end {
                if self.ledger.is_measured(seq) && self.ledger.outcome(seq) == Outcome::Committed {
                    delivered += 1;
                    record_ns(latency, at.saturating_sub(self.ledger.scheduled(seq)));
                    if !self.own {
                        self.ledger.delivered_to_other(seq, at);
                    }
                }
            }
            self.settled = self.settled.max(end);
            if end < upto {
                break;
            }
            self.waiting.pop_front();
        }
        delivered
    }

    /// Whether a push showed this writer's last committed write: the subscriber holds the
    /// writer's final state.
    pub fn has_final_state(&self) -> bool {
        self.highest >= self.ledger.last_committed()
    }

    /// Whether there is nothing covered left to settle.
    pub fn is_settled(&self) -> bool {
        self.waiting.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::new_histogram;
    use std::sync::Arc;

    #[test]
    fn test_ledger_evenly_schedules_the_window_and_skips_the_warmup() {
        // 10/s for 1 s of warmup and 2 s measured: 30 writes, the last 20 measured.
        let l = WriteLedger::evenly(10.0, 0, 3_000_000_000, 1_000_000_000);
        assert_eq!(l.len(), 30);
        assert_eq!(l.measured(), 20);
        assert!(!l.is_measured(10));
        assert!(l.is_measured(11));
        assert_eq!(l.scheduled(11), 1_000_000_000);
    }

    #[test]
    fn test_coverage_counts_skipped_writes_once_with_their_own_latency() {
        let ledger = Arc::new(WriteLedger::new(vec![0, 1000, 2000, 3000, 4000], 0));
        let mut cov = Coverage::new(ledger.clone());
        let mut h = new_histogram();
        // A coalesced push shows seq 3 before any reply reached the writer.
        cov.observe(3, 10_000);
        assert_eq!(cov.settle(&mut h), 0);
        for seq in 1..=3 {
            ledger.set_outcome(seq, Outcome::Committed);
        }
        ledger.resolve_through(3);
        cov.observe(2, 20_000); // older than what was seen: ignored
        assert_eq!(cov.settle(&mut h), 3);
        assert_eq!(h.len(), 3);
        // Seq 4 failed; seq 5 committed and is covered later.
        ledger.set_outcome(4, Outcome::Failed);
        ledger.set_outcome(5, Outcome::Committed);
        ledger.resolve_through(5);
        ledger.add_follower();
        cov.observe(5, 50_000);
        assert_eq!(cov.settle(&mut h), 1);
        assert!(cov.is_settled());
        assert_eq!(ledger.expected_deliveries(), 4);
        // Latency of seq 1: received at 10 µs, scheduled at 0.
        assert_eq!(h.min(), 8);
        assert_eq!(h.max(), 46);
    }

    #[test]
    fn test_coverage_has_the_final_state_once_it_saw_the_last_commit() {
        let ledger = Arc::new(WriteLedger::new(vec![0, 1000, 2000], 0));
        let mut cov = Coverage::new(ledger.clone());
        // Nothing committed: the setup state is final.
        assert!(cov.has_final_state());
        ledger.set_outcome(1, Outcome::Committed);
        ledger.set_outcome(2, Outcome::Committed);
        ledger.set_outcome(3, Outcome::Failed);
        assert_eq!(ledger.last_committed(), 2);
        cov.observe(1, 10);
        assert!(!cov.has_final_state());
        // A conflated push jumps straight to the last commit.
        cov.observe(2, 20);
        assert!(cov.has_final_state());
    }

    #[test]
    fn test_ledger_first_delivery_is_the_earliest_other_subscriber() {
        // Three writes, the first one warmup; seq 3 fails.
        let ledger = Arc::new(WriteLedger::new(vec![0, 1_000_000, 2_000_000], 500_000));
        ledger.set_outcome(1, Outcome::Committed);
        ledger.set_outcome(2, Outcome::Committed);
        ledger.set_outcome(3, Outcome::Failed);
        ledger.resolve_through(3);
        let mut own = Coverage::of_own_writes(ledger.clone());
        let mut late = Coverage::new(ledger.clone());
        let mut early = Coverage::new(ledger.clone());
        let mut every = new_histogram();
        // The writer's own push comes first and does not count as a first delivery.
        own.observe(3, 1_100_000);
        // A slow subscriber sees seq 2 at 9 ms, settled first; a faster one at 1.9 ms.
        late.observe(3, 9_000_000);
        early.observe(2, 1_900_000);
        assert_eq!(own.settle(&mut every), 1);
        assert_eq!(late.settle(&mut every), 1);
        assert_eq!(early.settle(&mut every), 1);
        assert_eq!(every.len(), 3);
        let mut first = new_histogram();
        ledger.record_first_deliveries(&mut first);
        // Only seq 2 (measured, committed): 1.9 ms - 1 ms (µs below 2048 are exact).
        assert_eq!(first.len(), 1);
        assert_eq!(first.max(), 900);
        assert_eq!(first.min(), 900);
    }

    #[test]
    fn test_ledger_first_delivery_leaves_out_writes_only_the_writer_saw() {
        let ledger = Arc::new(WriteLedger::new(vec![0, 1000], 0));
        ledger.set_outcome(1, Outcome::Committed);
        ledger.set_outcome(2, Outcome::Committed);
        ledger.resolve_through(2);
        let mut own = Coverage::of_own_writes(ledger.clone());
        let mut other = Coverage::new(ledger.clone());
        let mut every = new_histogram();
        own.observe(2, 5000);
        other.observe(1, 7000);
        own.settle(&mut every);
        other.settle(&mut every);
        let mut first = new_histogram();
        ledger.record_first_deliveries(&mut first);
        assert_eq!(first.len(), 1);
        assert_eq!(first.max(), 7);
    }

    #[test]
    fn test_coverage_leaves_unresolved_writes_uncounted() {
        let ledger = Arc::new(WriteLedger::new(vec![0, 1000], 0));
        let mut cov = Coverage::new(ledger.clone());
        let mut h = new_histogram();
        ledger.set_outcome(1, Outcome::Committed);
        ledger.resolve_through(1);
        cov.observe(2, 5000);
        assert_eq!(cov.settle(&mut h), 1);
        assert!(!cov.is_settled());
        ledger.set_outcome(2, Outcome::Unknown);
        ledger.resolve_through(2);
        assert_eq!(cov.settle(&mut h), 0);
        assert!(cov.is_settled());
    }
}
