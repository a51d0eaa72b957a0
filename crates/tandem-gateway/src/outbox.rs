//! A connection's outbound queue. Replies keep their order; live pushes are coalesced per
//! dataset: at most one unsent push per dataset waits, and a newer one replaces it in place
//! (a whole frame) or is merged into it (deltas), so a slow client costs memory bounded by
//! its datasets' sizes and still ends at the latest state.

use crate::push::{self, Delta, Push};
use axum::extract::ws::Utf8Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tandem_protocol::CloseCode;
use tandem_store::DatasetKey;
use tokio::sync::Notify;

/// What the writer task sends next.
#[derive(Debug, Clone)]
pub enum Outgoing {
    Frame(Utf8Bytes),
    /// A live push, and what kind (for the metrics).
    Push(Utf8Bytes, PushKind),
    Close(CloseCode),
    /// End without a close frame (the peer is gone).
    Stop,
}

enum Item {
    Frame(Utf8Bytes),
    /// The pending push of a dataset, if its slot still holds one with this sequence number.
    Push(Arc<DatasetKey>, u64),
    Close(Option<CloseCode>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushKind {
    /// A whole `dataset` frame.
    Whole,
    /// One commit's `delta`, shared by every subscriber.
    Delta,
    /// Several commits' deltas merged for one slow subscriber.
    Merged,
}

/// The unsent push of one subscription.
enum Pending {
    Whole(Arc<Push>),
    /// Consecutive commits' deltas on top of `base` (what the client holds), to be sent as
    /// one `delta`; `bytes` are their frames' sizes summed, kept below the whole frame's.
    /// Only the deltas and the newest push (for its whole frame) are held: a long chain of a
    /// large dataset must not keep every commit's whole frame alive.
    Deltas {
        base: u64,
        parts: Vec<Arc<Delta>>,
        newest: Arc<Push>,
        bytes: usize,
    },
}

struct Slot {
    /// The highest sync count queued or sent for this dataset; nothing at or below it is
    /// queued again. Once `based`, it is also the state the client holds after what is
    /// queued, the base of the next delta.
    last: u64,
    /// A subscribe reply was queued: `last` is a state the client will hold. Before it,
    /// pushes go whole.
    based: bool,
    /// Pushes of this subscription go as deltas where they can.
    delta: bool,
    /// The push at `last`, re-queued (whole) behind a subscribe reply that turned out older
    /// than a push already sent.
    last_push: Option<Arc<Push>>,
    pending: Option<(u64, Pending)>,
}

/// A connection's subscriptions (at most `max_subscriptions`, usually a handful). A scan by
/// pointer first finds the hub's shared key without hashing three strings on every push.
#[derive(Default)]
struct Slots(Vec<(Arc<DatasetKey>, Slot)>);

impl Slots {
    fn position(&self, key: &DatasetKey) -> Option<usize> {
        self.0
            .iter()
            .position(|(k, _)| std::ptr::eq(Arc::as_ptr(k), key))
            .or_else(|| self.0.iter().position(|(k, _)| **k == *key))
    }

    #[cfg(test)]
    fn contains_key(&self, key: &DatasetKey) -> bool {
        self.position(key).is_some()
    }

    fn get(&self, key: &DatasetKey) -> Option<&Slot> {
        let i = self.position(key)?;
        Some(&self.0[i].1)
    }

    fn get_mut(&mut self, key: &DatasetKey) -> Option<&mut Slot> {
        let i = self.position(key)?;
        Some(&mut self.0[i].1)
    }

    fn insert(&mut self, key: Arc<DatasetKey>, slot: Slot) {
        self.0.push((key, slot));
    }

    fn remove(&mut self, key: &DatasetKey) -> Option<Slot> {
        let i = self.position(key)?;
        Some(self.0.swap_remove(i).1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn keys(&self) -> impl Iterator<Item = &Arc<DatasetKey>> {
        self.0.iter().map(|(k, _)| k)
    }
}

struct State {
    queue: VecDeque<Item>,
    slots: Slots,
    /// Replies, subscribe replies and unsubscribe notices (not pushes) waiting in `queue`,
    /// and their bytes; bounded by `max_frames` and `max_bytes`.
    frames: usize,
    bytes: usize,
    seq: u64,
    closing: bool,
    /// Whole frames in the lean record encoding (the session's `lean` feature).
    lean: bool,
}

pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    max_frames: usize,
    max_bytes: usize,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

/// The queue is full of replies the client does not read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Outbox {
    /// An outbox that holds at most `max_frames` unsent replies and `max_bytes` of them (or
    /// one reply larger than that, so that a big snapshot can always be sent). Pushes do not
    /// count: there is at most one per subscription, and its bytes are shared by every
    /// subscriber of the dataset.
    pub fn new(max_frames: usize, max_bytes: usize) -> Self {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                slots: Slots::default(),
                frames: 0,
                bytes: 0,
                seq: 0,
                closing: false,
                lean: false,
            }),
            notify: Notify::new(),
            max_frames,
            max_bytes,
        }
    }

    /// Takes room for one reply of `len` bytes, or says the queue is full.
    fn admit(&self, s: &mut State, len: usize) -> Result<(), Full> {
        if s.frames >= self.max_frames || (s.bytes > 0 && s.bytes + len > self.max_bytes) {
            return Err(Full);
        }
        s.frames += 1;
        s.bytes += len;
        Ok(())
    }

    /// Queues a reply. Fails when the queue's bounds are reached.
    pub fn send(&self, frame: Utf8Bytes) -> Result<(), Full> {
        let mut s = self.state.lock();
        if s.closing {
            return Ok(());
        }
        self.admit(&mut s, frame.len())?;
        s.queue.push_back(Item::Frame(frame));
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    /// Whole pushes from now on in the lean encoding (or not).
    pub fn set_lean(&self, lean: bool) {
        self.state.lock().lean = lean;
    }

    /// Sets whether an existing subscription's pushes go as deltas; false when the connection
    /// is not (or no longer) subscribed to the dataset.
    pub fn set_delta(&self, dataset: &DatasetKey, delta: bool) -> bool {
        match self.state.lock().slots.get_mut(dataset) {
            Some(slot) => {
                slot.delta = delta;
                true
            }
            None => false,
        }
    }

    /// Starts accepting pushes for a dataset, as deltas or whole frames. Returns false if it
    /// was already subscribed (then only the push form changes, from the next push on).
    pub fn subscribe(&self, dataset: Arc<DatasetKey>, delta: bool) -> bool {
        let mut s = self.state.lock();
        if let Some(slot) = s.slots.get_mut(&dataset) {
            slot.delta = delta;
            return false;
        }
        s.slots.insert(
            dataset,
            Slot {
                last: 0,
                based: false,
                delta,
                last_push: None,
                pending: None,
            },
        );
        true
    }

    #[cfg(test)]
    pub fn is_subscribed(&self, dataset: &DatasetKey) -> bool {
        self.state.lock().slots.contains_key(dataset)
    }

    /// The highest sync count queued or sent for a subscribed dataset.
    pub fn last_sent(&self, dataset: &DatasetKey) -> Option<u64> {
        self.state.lock().slots.get(dataset).map(|slot| slot.last)
    }

    pub fn subscription_count(&self) -> usize {
        self.state.lock().slots.len()
    }

    pub fn subscriptions(&self) -> Vec<Arc<DatasetKey>> {
        self.state.lock().slots.keys().cloned().collect()
    }

    /// Stops pushes for a dataset, drops an unsent one, and queues `notice` (the reason) if
    /// given. Returns whether it was subscribed; `Full` when the notice does not fit in the
    /// bounds (the subscription has ended all the same).
    pub fn unsubscribe(
        &self,
        dataset: &DatasetKey,
        notice: Option<Utf8Bytes>,
    ) -> Result<bool, Full> {
        let mut s = self.state.lock();
        let existed = s.slots.remove(dataset).is_some();
        if let (true, Some(frame), false) = (existed, notice, s.closing) {
            self.admit(&mut s, frame.len())?;
            s.queue.push_back(Item::Frame(frame));
            drop(s);
            self.notify.notify_one();
        }
        Ok(existed)
    }

    /// Queues a live push unless an equal or newer sync count was already queued or sent.
    /// An unsent older push of the same dataset is replaced in place, or, when both are
    /// deltas that follow on each other, merged with it (unless the merge would be larger
    /// than the whole frame, which then replaces it).
    pub fn push(&self, dataset: &Arc<DatasetKey>, push: &Arc<Push>) {
        let mut s = self.state.lock();
        if s.closing {
            return;
        }
        let seq = s.seq + 1;
        let Some(slot) = s.slots.get_mut(dataset) else {
            return;
        };
        let n = push.sync_count;
        if n <= slot.last {
            return;
        }
        let delta = push
            .delta()
            .filter(|_| slot.delta && slot.based && n == slot.last + 1)
            .cloned();
        let base = slot.last;
        slot.last = n;
        slot.last_push = Some(push.clone());
        if let Some((_, pending)) = &mut slot.pending {
            // The queue entry keeps its position and sequence number.
            match (pending, delta) {
                (
                    Pending::Deltas {
                        parts,
                        newest,
                        bytes,
                        ..
                    },
                    Some(delta),
                ) if *bytes + delta.frame.len() <= push.whole_len() => {
                    *bytes += delta.frame.len();
                    parts.push(delta);
                    *newest = push.clone();
                }
                (pending, _) => *pending = Pending::Whole(push.clone()),
            }
            return;
        }
        let pending = match delta {
            Some(delta) => Pending::Deltas {
                base,
                bytes: delta.frame.len(),
                parts: vec![delta],
                newest: push.clone(),
            },
            None => Pending::Whole(push.clone()),
        };
        slot.pending = Some((seq, pending));
        s.seq = seq;
        s.queue.push_back(Item::Push(dataset.clone(), seq));
        drop(s);
        self.notify.notify_one();
    }

    /// Queues a subscribe reply carrying the dataset at `sync_count`; an unsent push at or
    /// below it is dropped, and the newest push, if newer than the reply (pending or already
    /// sent), is queued behind the reply as a whole frame, so the client always ends at the
    /// newest state. A reply like any other, it counts against the bounds.
    pub fn snapshot(
        &self,
        dataset: &Arc<DatasetKey>,
        sync_count: u64,
        frame: Utf8Bytes,
    ) -> Result<(), Full> {
        let mut s = self.state.lock();
        if s.closing {
            return Ok(());
        }
        self.admit(&mut s, frame.len())?;
        s.queue.push_back(Item::Frame(frame));
        s.seq += 1;
        let seq = s.seq;
        let mut requeue = false;
        if let Some(slot) = s.slots.get_mut(dataset) {
            slot.pending = None;
            slot.based = true;
            if slot.last > sync_count {
                slot.pending = slot.last_push.clone().map(|p| (seq, Pending::Whole(p)));
                requeue = slot.pending.is_some();
            } else {
                slot.last = sync_count;
                slot.last_push = None;
            }
        }
        if requeue {
            s.queue.push_back(Item::Push(dataset.clone(), seq));
        }
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    /// Queues a close frame; everything queued before it is still sent, nothing after.
    pub fn close(&self, code: CloseCode) {
        let mut s = self.state.lock();
        if s.closing {
            return;
        }
        s.closing = true;
        s.queue.push_back(Item::Close(Some(code)));
        drop(s);
        self.notify.notify_one();
    }

    /// Ends the writer after what is queued, without a close frame.
    pub fn stop(&self) {
        let mut s = self.state.lock();
        if s.closing {
            return;
        }
        s.closing = true;
        s.queue.push_back(Item::Close(None));
        drop(s);
        self.notify.notify_one();
    }

    pub fn is_closing(&self) -> bool {
        self.state.lock().closing
    }

    /// Moves up to `max` ready items into `out`, waiting until there is at least one.
    pub async fn next_batch(&self, out: &mut Vec<Outgoing>, max: usize) {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock();
                while out.len() < max {
                    let Some(item) = s.queue.pop_front() else {
                        break;
                    };
                    match item {
                        Item::Frame(f) => {
                            s.frames -= 1;
                            s.bytes -= f.len();
                            out.push(Outgoing::Frame(f));
                        }
                        Item::Push(dataset, seq) => {
                            let lean = s.lean;
                            if let Some(slot) = s.slots.get_mut(&dataset)
                                && slot.pending.as_ref().is_some_and(|(p, _)| *p == seq)
                                && let Some((_, pending)) = slot.pending.take()
                            {
                                out.push(materialize(&dataset, pending, lean, slot.delta));
                            }
                        }
                        Item::Close(code) => {
                            s.queue.clear();
                            out.push(code.map_or(Outgoing::Stop, Outgoing::Close));
                            break;
                        }
                    }
                }
            }
            if !out.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The frame an unsent push becomes when the writer takes it: the deltas merged, unless
/// the subscription no longer wants deltas, a delta does not read back, or the merge came
/// out larger than the whole frame (records of earlier commits gain a `syncCount`).
fn materialize(dataset: &DatasetKey, pending: Pending, lean: bool, delta: bool) -> Outgoing {
    match pending {
        Pending::Whole(p) => Outgoing::Push(p.whole(lean), PushKind::Whole),
        Pending::Deltas { newest, .. } if !delta => {
            Outgoing::Push(newest.whole(lean), PushKind::Whole)
        }
        Pending::Deltas {
            base,
            parts,
            newest,
            ..
        } => match parts.as_slice() {
            [one] => Outgoing::Push(one.frame.clone(), PushKind::Delta),
            _ => match push::merge(dataset, base, &parts) {
                Some(merged) if merged.len() <= newest.whole_len() => {
                    Outgoing::Push(merged, PushKind::Merged)
                }
                _ => Outgoing::Push(newest.whole(lean), PushKind::Whole),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<DatasetKey> {
        Arc::new(DatasetKey::new("default", "u1", "ds"))
    }

    /// A push whose whole frame reads `p<n>` and delta `d<n>` (not frames: the outbox does
    /// not look inside unless it merges).
    fn p(k: &Arc<DatasetKey>, n: u64) -> Arc<Push> {
        Arc::new(Push::new(
            k.clone(),
            n,
            format!("p{n}").into(),
            Some(format!("d{n}").into()),
        ))
    }

    fn texts(out: &[Outgoing]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Outgoing::Frame(f) | Outgoing::Push(f, _) => f.as_str().to_owned(),
                Outgoing::Close(c) => format!("close {}", c.code()),
                Outgoing::Stop => "stop".to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn test_outbox_coalesces_pushes_per_dataset() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), false);
        ob.send("r1".into()).unwrap();
        for n in 1..=100u64 {
            ob.push(&k, &p(&k, n));
        }
        ob.send("r2".into()).unwrap();
        ob.push(&k, &p(&k, 50));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["r1", "p100", "r2"]);
    }

    #[tokio::test]
    async fn test_outbox_snapshot_orders_against_pending_push() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), false);
        ob.push(&k, &p(&k, 3));
        ob.snapshot(&k, 5, "s5".into()).unwrap();
        ob.push(&k, &p(&k, 4));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s5"]);

        ob.push(&k, &p(&k, 9));
        ob.snapshot(&k, 7, "s7".into()).unwrap();
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s7", "p9"]);

        // A push already sent before an older subscribe reply is sent again after it.
        ob.push(&k, &p(&k, 12));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["p12"]);
        ob.snapshot(&k, 11, "s11".into()).unwrap();
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s11", "p12"]);
    }

    #[tokio::test]
    async fn test_outbox_bounds_replies_and_stops_after_close() {
        let ob = Outbox::new(2, 1 << 20);
        ob.send("a".into()).unwrap();
        ob.send("b".into()).unwrap();
        assert_eq!(ob.send("c".into()), Err(Full));
        ob.close(CloseCode::GoingAway);
        ob.send("d".into()).unwrap();
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["a", "b", "close 4000"]);
    }

    #[tokio::test]
    async fn test_outbox_ended_subscription_drops_pending_push() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), false);
        ob.push(&k, &p(&k, 1));
        assert!(ob.unsubscribe(&k, Some("bye".into())).unwrap());
        ob.push(&k, &p(&k, 2));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["bye"]);
    }

    #[tokio::test]
    async fn test_outbox_bounds_snapshots_and_notices_like_replies() {
        let ob = Outbox::new(2, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), false);
        ob.snapshot(&k, 1, "s1".into()).unwrap();
        ob.snapshot(&k, 1, "s1 again".into()).unwrap();
        assert_eq!(ob.snapshot(&k, 1, "s1 third".into()), Err(Full));
        assert_eq!(ob.unsubscribe(&k, Some("bye".into())), Err(Full));
        assert!(!ob.is_subscribed(&k));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s1", "s1 again"]);
    }

    #[tokio::test]
    async fn test_outbox_bounds_reply_bytes_but_always_admits_one_reply() {
        let ob = Outbox::new(100, 10);
        ob.send("123456".into()).unwrap();
        assert_eq!(ob.send("123456".into()), Err(Full));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["123456"]);
        // An empty queue takes one reply of any size.
        ob.send("a reply longer than ten bytes".into()).unwrap();
        assert_eq!(ob.send("x".into()), Err(Full));
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        ob.send("x".into()).unwrap();
    }

    fn real(k: &Arc<DatasetKey>, n: u64, value: &str) -> Arc<Push> {
        let record = tandem_protocol::Record {
            key: format!("k{}", n % 2),
            value: Some(value.to_owned()),
            sync_count: n,
            last_modified: 1,
            last_modified_by: "u1".into(),
            device_id: None,
            device_last_modified: None,
        };
        // The whole dataset holds four more records, so that a delta is smaller than it.
        let mut all: Vec<_> = (0..4)
            .map(|i| tandem_protocol::Record {
                key: format!("z{i}"),
                ..record.clone()
            })
            .collect();
        all.push(record.clone());
        Arc::new(Push::new(
            k.clone(),
            n,
            push::whole_frame(k, n, all).into(),
            Some(push::delta_frame(k, n, vec![record]).into()),
        ))
    }

    async fn take(ob: &Outbox) -> Vec<(String, Option<PushKind>)> {
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        out.into_iter()
            .map(|o| match o {
                Outgoing::Push(f, kind) => (f.as_str().to_owned(), Some(kind)),
                Outgoing::Frame(f) => (f.as_str().to_owned(), None),
                _ => ("close".to_owned(), None),
            })
            .collect()
    }

    #[tokio::test]
    async fn test_outbox_sends_deltas_on_a_known_base_and_merges_them() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), true);
        // Before the subscribe reply the client's base is unknown: whole.
        ob.push(&k, &real(&k, 1, "a"));
        ob.snapshot(&k, 2, "s2".into()).unwrap();
        assert_eq!(take(&ob).await, [("s2".to_owned(), None)]);
        ob.push(&k, &real(&k, 3, "b"));
        let sent = take(&ob).await;
        assert_eq!(sent[0].1, Some(PushKind::Delta));
        assert!(
            sent[0].0.contains(r#""baseSyncCount":2,"syncCount":3"#),
            "{sent:?}"
        );
        // Two more while unsent: one merged delta from 3 to 5 with the newest of each key.
        ob.push(&k, &real(&k, 4, "c"));
        ob.push(&k, &real(&k, 5, "d"));
        let sent = take(&ob).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1, Some(PushKind::Merged));
        let frame = tandem_protocol::ServerFrame::from_json(&sent[0].0).unwrap();
        let tandem_protocol::ServerFrame::Delta {
            base_sync_count,
            sync_count,
            records,
            ..
        } = frame
        else {
            panic!("{sent:?}")
        };
        assert_eq!((base_sync_count, sync_count), (3, 5));
        let values: Vec<_> = records.iter().map(|r| r.value.clone().unwrap()).collect();
        assert_eq!(values, ["c", "d"]);
        // A gap (6 never came here): whole.
        ob.push(&k, &real(&k, 7, "e"));
        assert_eq!(take(&ob).await[0].1, Some(PushKind::Whole));
        // A merge that would outgrow the whole frame becomes the whole frame.
        ob.push(&k, &real(&k, 8, "f"));
        for n in 9..=20 {
            ob.push(&k, &real(&k, n, "g"));
        }
        let sent = take(&ob).await;
        assert_eq!(sent[0].1, Some(PushKind::Whole));
        assert!(sent[0].0.contains(r#""syncCount":20"#));
        // A whole-frame subscription never gets deltas.
        ob.subscribe(k.clone(), false);
        ob.push(&k, &real(&k, 21, "h"));
        assert_eq!(take(&ob).await[0].1, Some(PushKind::Whole));
    }

    #[tokio::test]
    async fn test_outbox_delta_chain_holds_deltas_not_every_whole_frame() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), true);
        ob.snapshot(&k, 0, "s0".into()).unwrap();
        take(&ob).await;
        // The writer is stuck: 500 commits of a ~100 KB dataset, one small change each.
        let mut weak = Vec::new();
        for n in 1..=500u64 {
            let p = Arc::new(Push::new(
                k.clone(),
                n,
                "x".repeat(100_000).into(),
                Some(push::delta_frame(&k, n, vec![]).into()),
            ));
            weak.push(Arc::downgrade(&p));
            ob.push(&k, &p);
        }
        let alive = weak.iter().filter(|w| w.strong_count() > 0).count();
        assert!(alive <= 2, "{alive} whole frames held by one subscriber");
        let sent = take(&ob).await;
        assert_eq!(sent[0].1, Some(PushKind::Merged));
        assert!(sent[0].0.contains(r#""baseSyncCount":0,"syncCount":500"#));
    }

    #[tokio::test]
    async fn test_outbox_set_delta_only_touches_a_live_subscription() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        assert!(!ob.set_delta(&k, true));
        ob.subscribe(k.clone(), false);
        assert!(ob.set_delta(&k, true));
        // The hub ended it (a delete, a revoke): a re-subscribe must start afresh.
        ob.unsubscribe(&k, None).unwrap();
        assert!(!ob.set_delta(&k, true));
        assert!(!ob.is_subscribed(&k));
    }

    #[tokio::test]
    async fn test_outbox_pending_deltas_go_whole_once_deltas_are_turned_off() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone(), true);
        ob.snapshot(&k, 2, "s2".into()).unwrap();
        take(&ob).await;
        ob.push(&k, &real(&k, 3, "a"));
        assert!(ob.set_delta(&k, false));
        assert_eq!(take(&ob).await[0].1, Some(PushKind::Whole));
    }
}
