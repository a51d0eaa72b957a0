//! The registry of local subscribers: dataset → the sessions on this node that subscribe to
//! it. It receives the broker's events (as the broker's handler) and hands each push, encoded
//! once, to every local subscriber's outbox; it keeps the node-level rule that a sync count
//! is never forwarded twice or backwards for a dataset; and after a fan-out fault it re-reads
//! its datasets from the store. It never calls the broker.

use super::deleted_frame;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::push::{self, Push};
use axum::extract::ws::Utf8Bytes;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_fanout::{Event, EventHandler};
use tandem_protocol::{CloseCode, ServerFrame, UnsubscribeReason};
use tandem_store::{DatasetKey, Store};
use tokio::sync::mpsc;

pub(crate) type SessionId = u64;

#[derive(Debug, Clone)]
pub(crate) struct Subscriber {
    pub identity: Arc<str>,
    pub outbox: Arc<Outbox>,
}

struct Entry {
    /// The highest sync count this node has forwarded for the dataset.
    last_forwarded: AtomicU64,
    subscribers: HashMap<SessionId, Subscriber>,
}

/// Channel references to give back: (dataset, how many subscriptions ended).
type Released = (Arc<DatasetKey>, usize);

pub struct Subscribers {
    datasets: RwLock<HashMap<Arc<DatasetKey>, Entry>>,
    metrics: Arc<Metrics>,
    store: Arc<dyn Store>,
    released_tx: mpsc::UnboundedSender<Released>,
    /// Taken once by the hub, which owns the channels to release.
    released_rx: Mutex<Option<mpsc::UnboundedReceiver<Released>>>,
}

impl std::fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscribers")
            .field("datasets", &self.datasets.read().len())
            .finish_non_exhaustive()
    }
}

impl Subscribers {
    /// An empty registry; `store` is read on resync.
    pub fn new(store: Arc<dyn Store>) -> Arc<Subscribers> {
        let (released_tx, released_rx) = mpsc::unbounded_channel();
        Arc::new(Subscribers {
            datasets: RwLock::new(HashMap::new()),
            metrics: Arc::new(Metrics::default()),
            store,
            released_tx,
            released_rx: Mutex::new(Some(released_rx)),
        })
    }

    /// The handler to make the node's broker with: it delivers the broker's events here.
    pub fn handler(self: &Arc<Self>) -> Arc<dyn EventHandler> {
        Arc::new(Handler(self.clone()))
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub(super) fn take_released(&self) -> Option<mpsc::UnboundedReceiver<Released>> {
        self.released_rx.lock().take()
    }

    /// Adds a subscriber; returns the registry's shared key for the dataset.
    pub(super) fn insert(
        &self,
        dataset: Arc<DatasetKey>,
        session: SessionId,
        subscriber: Subscriber,
    ) -> Arc<DatasetKey> {
        let mut map = self.datasets.write();
        let key = match map.get_key_value(&dataset) {
            Some((k, _)) => k.clone(),
            None => dataset,
        };
        map.entry(key.clone())
            .or_insert_with(|| Entry {
                last_forwarded: AtomicU64::new(0),
                subscribers: HashMap::new(),
            })
            .subscribers
            .insert(session, subscriber);
        key
    }

    /// Removes a subscriber; returns whether it was there.
    pub(super) fn remove(&self, dataset: &Arc<DatasetKey>, session: SessionId) -> bool {
        let mut map = self.datasets.write();
        let Some(entry) = map.get_mut(dataset) else {
            return false;
        };
        let removed = entry.subscribers.remove(&session).is_some();
        if entry.subscribers.is_empty() {
            map.remove(dataset);
        }
        removed
    }

    /// The datasets with local subscribers.
    pub(crate) fn datasets(&self) -> Vec<Arc<DatasetKey>> {
        self.datasets.read().keys().cloned().collect()
    }

    /// (subscriptions, datasets) on this node.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let map = self.datasets.read();
        (map.values().map(|e| e.subscribers.len()).sum(), map.len())
    }

    fn forward_commit(&self, push: Push) {
        let map = self.datasets.read();
        let Some((key, entry)) = map.get_key_value(&push.dataset) else {
            return;
        };
        let previous = entry
            .last_forwarded
            .fetch_max(push.sync_count, Ordering::AcqRel);
        if previous >= push.sync_count {
            return;
        }
        let push = Arc::new(push);
        for subscriber in entry.subscribers.values() {
            subscriber.outbox.push(key, &push);
        }
        Metrics::add(&self.metrics.pushes, entry.subscribers.len() as u64);
    }

    /// Ends the subscriptions `which` selects, each with `notice`.
    fn end_subscriptions(
        &self,
        dataset: &DatasetKey,
        notice: &Utf8Bytes,
        which: impl Fn(&Subscriber) -> bool,
    ) {
        let (key, ended) = {
            let mut map = self.datasets.write();
            let Some(key) = map.get_key_value(dataset).map(|(k, _)| k.clone()) else {
                return;
            };
            let Some(entry) = map.get_mut(dataset) else {
                return;
            };
            let mut ended = 0;
            entry.subscribers.retain(|_, s| {
                if which(s) {
                    if s.outbox.unsubscribe(&key, Some(notice.clone())).is_err() {
                        // The notice does not fit in the reply bound: the client is not reading.
                        s.outbox.close(CloseCode::Slow);
                    }
                    ended += 1;
                    false
                } else {
                    true
                }
            });
            if entry.subscribers.is_empty() {
                map.remove(dataset);
            }
            (key, ended)
        };
        if ended > 0 {
            // Fails only when the hub is gone, and its channels with it.
            let _ = self.released_tx.send((key, ended));
        }
    }

    fn end_revoked(&self, dataset: &DatasetKey, identity: &str) {
        let frame = ServerFrame::Unsubscribed {
            dataset: dataset.to_ref(),
            reason: UnsubscribeReason::Revoked,
        }
        .to_json();
        self.end_subscriptions(dataset, &Utf8Bytes::from(frame), |s| {
            *s.identity == *identity
        });
    }

    /// Ends the subscriptions to a deleted dataset of every subscriber that has not yet seen
    /// the delete's sync count, unless this node already forwarded a commit after the delete
    /// (a late or re-published delete of a since re-created dataset). A subscriber that came
    /// after the delete (its snapshot is at the delete's count) keeps its subscription.
    fn end_deleted(&self, dataset: &DatasetKey, sync_count: u64, frame: &Utf8Bytes) {
        let stale = self
            .datasets
            .read()
            .get(dataset)
            .is_some_and(|e| e.last_forwarded.load(Ordering::Acquire) > sync_count);
        if !stale {
            self.end_subscriptions(dataset, frame, |s| {
                s.outbox
                    .last_sent(dataset)
                    .is_some_and(|last| last < sync_count)
            });
        }
    }

    /// Delivers one broker event to the local subscribers.
    pub(crate) fn deliver(&self, event: Event) {
        match event {
            Event::Commit {
                dataset,
                sync_count,
                frame,
                delta,
            } => {
                let delta = delta.map(Utf8Bytes::try_from).transpose();
                match (Utf8Bytes::try_from(frame), delta) {
                    (Ok(frame), Ok(delta)) => {
                        self.forward_commit(Push::new(dataset, sync_count, frame, delta));
                    }
                    (Err(e), _) | (_, Err(e)) => {
                        tracing::warn!(dataset = %dataset, error = %e, "push frame is not utf-8");
                    }
                }
            }
            Event::Deleted {
                dataset,
                sync_count,
                frame,
            } => match Utf8Bytes::try_from(frame) {
                Ok(frame) => self.end_deleted(&dataset, sync_count, &frame),
                Err(e) => tracing::warn!(dataset = %dataset, error = %e, "frame is not utf-8"),
            },
            Event::Revoked { dataset, identity } => self.end_revoked(&dataset, &identity),
        }
    }

    /// Re-reads every dataset with local subscribers from the store and forwards whatever is
    /// newer than what this node already forwarded. Used after fan-out faults, when events
    /// may have been missed: so it also re-checks every subscriber's access, ending the
    /// subscriptions of identities whose grant was revoked meanwhile.
    pub(crate) async fn resync(&self) {
        for dataset in self.datasets() {
            let identities: Vec<Arc<str>> = {
                let map = self.datasets.read();
                let Some(entry) = map.get(&dataset) else {
                    continue;
                };
                let mut ids: Vec<Arc<str>> = entry
                    .subscribers
                    .values()
                    .map(|s| s.identity.clone())
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            };
            for identity in identities {
                if *identity == *dataset.owner {
                    continue;
                }
                match self.store.access(&dataset, &identity).await {
                    Ok(Some(_)) => {}
                    Ok(None) => self.end_revoked(&dataset, &identity),
                    Err(e) => {
                        tracing::warn!(dataset = %dataset, error = %e, "resync access check failed");
                    }
                }
            }
            // The same frames a publish would have carried, delivered to this node only; no
            // delta: what changed since each subscriber's state is not known here.
            match self.store.snapshot(&dataset, &dataset.owner).await {
                Ok(snapshot) if snapshot.deleted => self.deliver(Event::Deleted {
                    frame: deleted_frame(&dataset, snapshot.sync_count),
                    dataset,
                    sync_count: snapshot.sync_count,
                }),
                Ok(snapshot) => self.deliver(Event::Commit {
                    frame: push::whole_frame(&dataset, snapshot.sync_count, snapshot.records)
                        .into(),
                    dataset,
                    sync_count: snapshot.sync_count,
                    delta: None,
                }),
                Err(e) => {
                    tracing::warn!(dataset = %dataset, error = %e, "resync read failed");
                }
            }
        }
    }
}

/// The registry as the broker's handler.
struct Handler(Arc<Subscribers>);

impl EventHandler for Handler {
    fn on_event(&self, event: Event) {
        self.0.deliver(event);
    }

    fn on_resync(&self) {
        let subscribers = self.0.clone();
        tokio::spawn(async move { subscribers.resync().await });
    }
}
