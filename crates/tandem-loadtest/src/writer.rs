//! One writer: sends its scheduled updates (open loop) and books each reply in its ledger.
//!
//! Every update replaces the writer's marker key with the record sync count it expects.
//! A writer that is alone on its dataset (`fanout`, `write`) can predict that count (its
//! key is rewritten by every commit, so it is the dataset's count, one up per commit) and
//! pipelines: it sends at the scheduled time whatever is in flight. Writers that share a
//! dataset (`rooms`) cannot predict it (others' commits move the dataset's count), so they
//! keep one update in flight and send a late one as soon as the previous reply is in; its
//! latency still runs from its scheduled time.
//!
//! After a refusal the prediction is reset from the reply (a conflict carries the server's
//! record). Updates already in flight were built on the old prediction and are refused too;
//! an epoch number keeps their replies from resetting the prediction again. After a lost
//! connection the count is unknown (updates in flight may or may not have committed), so
//! the writer sends one update and waits for its reply before it pipelines again.

use crate::conn::{Kind, Reply};
use crate::ledger::{Outcome, WriteLedger};
use crate::stats::{Clock, Stats};
use std::collections::VecDeque;
use std::sync::Arc;
use tandem_protocol::DatasetRef;

#[derive(Debug, Clone, Copy)]
struct InFlight {
    seq: u64,
    epoch: u64,
    sync_count: u64,
}

#[derive(Debug)]
pub struct Writer {
    ledger: Arc<WriteLedger>,
    /// `{"type":"update","dataset":…,"patches":[{"op":"replace","key":"lt<i>","syncCount":`
    head: String,
    predictable: bool,
    next_seq: u64,
    next_count: u64,
    epoch: u64,
    /// Whether `next_count` is known to be right (false after a lost connection until a
    /// reply says what the server has).
    known: bool,
    in_flight: VecDeque<InFlight>,
    finished: bool,
}

impl Writer {
    /// `sync_count` is the marker key's record sync count after the setup write.
    pub fn new(
        ledger: Arc<WriteLedger>,
        dataset: &DatasetRef,
        key: &str,
        sync_count: u64,
        predictable: bool,
    ) -> Writer {
        let dataset = serde_json::to_string(dataset).unwrap_or_default();
        let key = serde_json::to_string(key).unwrap_or_default();
        Writer {
            ledger,
            head: format!(
                "{{\"type\":\"update\",\"dataset\":{dataset},\"patches\":[{{\"op\":\"replace\",\"key\":{key},\"syncCount\":"
            ),
            predictable,
            next_seq: 1,
            next_count: sync_count,
            epoch: 0,
            known: true,
            in_flight: VecDeque::new(),
            finished: false,
        }
    }

    /// Whether it may send before the previous reply is in.
    fn pipelines(&self) -> bool {
        self.predictable && self.known
    }

    pub fn ledger(&self) -> &Arc<WriteLedger> {
        &self.ledger
    }

    /// When the next update is due (ns since the run's start), if one may be sent now.
    pub fn next_due(&self) -> Option<u64> {
        if self.finished || self.next_seq > self.ledger.len() {
            return None;
        }
        if !self.in_flight.is_empty() && !self.pipelines() {
            return None;
        }
        Some(self.ledger.scheduled(self.next_seq))
    }

    /// Builds the next update and books it as in flight.
    pub fn next_frame(&mut self, clock: &Clock, stats: &Stats) -> String {
        let seq = self.next_seq;
        let scheduled = self.ledger.scheduled(seq);
        let frame = format!(
            "{}{},\"value\":\"{}:{}\"}}],\"id\":{}}}",
            self.head,
            self.next_count,
            seq,
            clock.unix_ns(scheduled),
            seq
        );
        self.in_flight.push_back(InFlight {
            seq,
            epoch: self.epoch,
            sync_count: self.next_count,
        });
        if self.predictable {
            self.next_count += 1;
        }
        self.next_seq += 1;
        if self.ledger.is_measured(seq) {
            Stats::add(&stats.sent, 1);
        }
        frame
    }

    /// Whether a reply with this id belongs to this writer.
    pub fn owns(&self, id: Option<u64>) -> bool {
        matches!((id, self.in_flight.front()), (Some(id), Some(f)) if f.seq == id)
    }

    /// Books the reply to the oldest update in flight (replies come in request order).
    pub fn on_reply(&mut self, kind: Kind, reply: &Reply, now: u64, slot: usize, stats: &Stats) {
        let Some(sent) = self.in_flight.pop_front() else {
            return;
        };
        let seq = sent.seq;
        let measured = self.ledger.is_measured(seq);
        match kind {
            Kind::Ack => {
                self.ledger.set_outcome(seq, Outcome::Committed);
                if measured {
                    Stats::add(&stats.acked, 1);
                    stats
                        .commit
                        .record(slot, now.saturating_sub(self.ledger.scheduled(seq)));
                }
                if !self.pipelines()
                    && let Some(count) = reply.sync_count
                {
                    // Alone on the dataset, the commit's count is the marker's; shared, the
                    // ack's count is still this record's count.
                    self.next_count = count;
                    self.known = true;
                }
            }
            Kind::Conflict => {
                self.ledger.set_outcome(seq, Outcome::Failed);
                Stats::add(&stats.conflicts, 1);
                if sent.epoch == self.epoch {
                    self.next_count = reply.conflict_sync_count();
                    self.epoch += 1;
                    self.known = true;
                }
            }
            _ => {
                self.ledger.set_outcome(seq, Outcome::Failed);
                stats.error(reply.code.as_deref().unwrap_or("unexpected_reply"));
                if sent.epoch == self.epoch {
                    self.next_count = sent.sync_count;
                    self.epoch += 1;
                }
            }
        }
        self.ledger.resolve_through(seq);
    }

    /// The connection ended: updates in flight have no known outcome.
    pub fn on_disconnect(&mut self, stats: &Stats) {
        if !self.in_flight.is_empty() {
            self.known = false;
        }
        self.abandon_in_flight(stats);
        self.epoch += 1;
    }

    fn abandon_in_flight(&mut self, stats: &Stats) {
        let mut last = None;
        for sent in self.in_flight.drain(..) {
            self.ledger.set_outcome(sent.seq, Outcome::Unknown);
            if self.ledger.is_measured(sent.seq) {
                Stats::add(&stats.unknown_outcome, 1);
            }
            last = Some(sent.seq);
        }
        if let Some(seq) = last {
            self.ledger.resolve_through(seq);
        }
    }

    /// Every update sent and answered.
    pub fn is_complete(&self) -> bool {
        self.next_seq > self.ledger.len() && self.in_flight.is_empty()
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Ends the writer: what is in flight has no known outcome, what was not sent is
    /// booked as unsent. Idempotent.
    pub fn finish(&mut self, stats: &Stats) {
        if self.finished {
            return;
        }
        self.abandon_in_flight(stats);
        for seq in self.next_seq..=self.ledger.len() {
            self.ledger.set_outcome(seq, Outcome::Unsent);
            if self.ledger.is_measured(seq) {
                Stats::add(&stats.unsent, 1);
            }
        }
        self.next_seq = self.ledger.len() + 1;
        self.ledger.resolve_through(self.ledger.len());
        self.finished = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::parse_reply;

    fn writer(predictable: bool) -> (Writer, Stats, Clock) {
        let ledger = Arc::new(WriteLedger::new(vec![0, 10, 20, 30], 0));
        let w = Writer::new(ledger, &DatasetRef::new("o", "d"), "lt0", 1, predictable);
        (w, Stats::default(), Clock::new())
    }

    #[test]
    fn test_writer_frame_is_a_valid_update() {
        let (mut w, stats, clock) = writer(true);
        let text = w.next_frame(&clock, &stats);
        let frame = tandem_protocol::decode_client_frame(&text).unwrap();
        let tandem_protocol::ClientFrame::Update { id, patches, .. } = frame else {
            panic!("not an update: {text}");
        };
        assert_eq!(id, tandem_protocol::RequestId::Num(1));
        assert_eq!(patches[0].key, "lt0");
        assert_eq!(patches[0].sync_count, 1);
        assert!(patches[0].value.as_deref().unwrap().starts_with("1:"));
        // Predicted: the next update expects the count this one will commit at.
        assert!(w.next_frame(&clock, &stats).contains("\"syncCount\":2,"));
        assert_eq!(Stats::get(&stats.sent), 2);
    }

    #[test]
    fn test_writer_resets_its_prediction_once_per_refusal() {
        let (mut w, stats, clock) = writer(true);
        for _ in 0..3 {
            w.next_frame(&clock, &stats);
        }
        let conflict = parse_reply(
            r#"{"type":"conflict","id":1,"syncCount":5,"conflicts":[{"key":"lt0","server":{"syncCount":5}}]}"#,
        )
        .unwrap();
        w.on_reply(Kind::Conflict, &conflict, 1, 0, &stats);
        // The two in flight after it conflict as well but do not reset again.
        let later = parse_reply(
            r#"{"type":"conflict","id":2,"syncCount":5,"conflicts":[{"key":"lt0","server":{"syncCount":5}}]}"#,
        )
        .unwrap();
        let next = w.next_frame(&clock, &stats);
        assert!(next.contains("\"syncCount\":5,"), "{next}");
        w.on_reply(Kind::Conflict, &later, 2, 0, &stats);
        assert_eq!(Stats::get(&stats.conflicts), 2);
        assert_eq!(w.ledger().outcome(1), Outcome::Failed);
        assert_eq!(w.ledger().resolved(), 2);
        w.finish(&stats);
        assert_eq!(Stats::get(&stats.unknown_outcome), 2);
        assert!(w.ledger().is_resolved());
    }

    #[test]
    fn test_writer_probes_once_after_a_lost_connection() {
        let (mut w, stats, clock) = writer(true);
        w.next_frame(&clock, &stats);
        w.on_disconnect(&stats);
        assert_eq!(Stats::get(&stats.unknown_outcome), 1);
        assert_eq!(w.next_due(), Some(10));
        w.next_frame(&clock, &stats);
        // The count is unknown: no pipelining until the reply.
        assert_eq!(w.next_due(), None);
        let ack = parse_reply(r#"{"type":"ack","id":2,"syncCount":3}"#).unwrap();
        w.on_reply(Kind::Ack, &ack, 50, 0, &stats);
        assert!(w.next_frame(&clock, &stats).contains("\"syncCount\":3,"));
        assert!(w.next_due().is_some());
    }

    #[test]
    fn test_writer_sharing_a_dataset_keeps_one_update_in_flight() {
        let (mut w, stats, clock) = writer(false);
        assert_eq!(w.next_due(), Some(0));
        w.next_frame(&clock, &stats);
        assert_eq!(w.next_due(), None);
        let ack = parse_reply(r#"{"type":"ack","id":1,"syncCount":9}"#).unwrap();
        assert!(w.owns(Some(1)));
        w.on_reply(Kind::Ack, &ack, 50, 0, &stats);
        assert_eq!(w.next_due(), Some(10));
        assert!(w.next_frame(&clock, &stats).contains("\"syncCount\":9,"));
        assert_eq!(Stats::get(&stats.acked), 1);
        w.finish(&stats);
        assert_eq!(Stats::get(&stats.unsent), 2);
    }
}
