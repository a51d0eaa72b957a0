//! A connection's outbound queue. Replies keep their order; live pushes are coalesced per
//! dataset: at most one unsent push per dataset waits, and a newer one replaces it in place,
//! so a slow client costs bounded memory and still ends at the latest state.

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

struct Slot {
    /// The highest sync count queued or sent for this dataset; nothing at or below it is
    /// queued again.
    last: u64,
    /// The push at `last` (shared bytes), re-queued behind a subscribe reply that turned out
    /// older than a push already sent.
    last_frame: Option<Utf8Bytes>,
    pending: Option<(u64, Utf8Bytes)>,
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

    /// Starts accepting pushes for a dataset. Returns false if it was already subscribed.
    pub fn subscribe(&self, dataset: Arc<DatasetKey>) -> bool {
        let mut s = self.state.lock();
        if s.slots.contains_key(&dataset) {
            return false;
        }
        s.slots.insert(
            dataset,
            Slot {
                last: 0,
                last_frame: None,
                pending: None,
            },
        );
        true
    }

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

    /// Queues a live push unless an equal or newer sync count was already queued or sent;
    /// replaces an unsent older push of the same dataset in place.
    pub fn push(&self, dataset: &Arc<DatasetKey>, sync_count: u64, frame: &Utf8Bytes) {
        let mut s = self.state.lock();
        if s.closing {
            return;
        }
        let seq = s.seq + 1;
        let Some(slot) = s.slots.get_mut(dataset) else {
            return;
        };
        if sync_count <= slot.last {
            return;
        }
        slot.last = sync_count;
        slot.last_frame = Some(frame.clone());
        if let Some((_, bytes)) = &mut slot.pending {
            // Replaced in place: the queue entry keeps its position and sequence number.
            *bytes = frame.clone();
            return;
        }
        slot.pending = Some((seq, frame.clone()));
        s.seq = seq;
        s.queue.push_back(Item::Push(dataset.clone(), seq));
        drop(s);
        self.notify.notify_one();
    }

    /// Queues a subscribe reply carrying the dataset at `sync_count`; an unsent push at or
    /// below it is dropped, and the newest push, if newer than the reply (pending or already
    /// sent), is queued behind the reply, so the client always ends at the newest state.
    /// A reply like any other, it counts against the bounds.
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
            if slot.last > sync_count {
                slot.pending = slot.last_frame.clone().map(|f| (seq, f));
                requeue = slot.pending.is_some();
            } else {
                slot.last = sync_count;
                slot.last_frame = None;
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
                            if let Some(slot) = s.slots.get_mut(&dataset)
                                && slot.pending.as_ref().is_some_and(|(p, _)| *p == seq)
                                && let Some((_, f)) = slot.pending.take()
                            {
                                out.push(Outgoing::Frame(f));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<DatasetKey> {
        Arc::new(DatasetKey::new("default", "u1", "ds"))
    }

    fn texts(out: &[Outgoing]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Outgoing::Frame(f) => f.as_str().to_owned(),
                Outgoing::Close(c) => format!("close {}", c.code()),
                Outgoing::Stop => "stop".to_owned(),
            })
            .collect()
    }

    #[tokio::test]
    async fn test_outbox_coalesces_pushes_per_dataset() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone());
        ob.send("r1".into()).unwrap();
        for n in 1..=100u64 {
            ob.push(&k, n, &Utf8Bytes::from(format!("p{n}")));
        }
        ob.send("r2".into()).unwrap();
        ob.push(&k, 50, &"old".into());
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["r1", "p100", "r2"]);
    }

    #[tokio::test]
    async fn test_outbox_snapshot_orders_against_pending_push() {
        let ob = Outbox::new(8, 1 << 20);
        let k = key();
        ob.subscribe(k.clone());
        ob.push(&k, 3, &"p3".into());
        ob.snapshot(&k, 5, "s5".into()).unwrap();
        ob.push(&k, 4, &"p4".into());
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s5"]);

        ob.push(&k, 9, &"p9".into());
        ob.snapshot(&k, 7, "s7".into()).unwrap();
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["s7", "p9"]);

        // A push already sent before an older subscribe reply is sent again after it.
        ob.push(&k, 12, &"p12".into());
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
        ob.subscribe(k.clone());
        ob.push(&k, 1, &"p1".into());
        assert!(ob.unsubscribe(&k, Some("bye".into())).unwrap());
        ob.push(&k, 2, &"p2".into());
        let mut out = Vec::new();
        ob.next_batch(&mut out, 64).await;
        assert_eq!(texts(&out), ["bye"]);
    }

    #[tokio::test]
    async fn test_outbox_bounds_snapshots_and_notices_like_replies() {
        let ob = Outbox::new(2, 1 << 20);
        let k = key();
        ob.subscribe(k.clone());
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
}
