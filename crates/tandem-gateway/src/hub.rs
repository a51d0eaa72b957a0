//! The local hub: which sessions on this node subscribe to which dataset. It receives the
//! broker's events and hands each push, encoded once, to every local subscriber's outbox.
//! It also keeps the node-level rule that a sync count is never forwarded twice or
//! backwards for a dataset.

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use axum::extract::ws::Utf8Bytes;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use tandem_fanout::{Channels, Event, EventHandler};
use tandem_protocol::{ServerFrame, UnsubscribeReason};
use tandem_store::{DatasetKey, Store};

pub type SessionId = u64;

#[derive(Debug, Clone)]
pub struct Subscriber {
    pub identity: Arc<str>,
    pub outbox: Arc<Outbox>,
}

struct Entry {
    /// The highest sync count this node has forwarded for the dataset.
    last_forwarded: AtomicU64,
    subscribers: HashMap<SessionId, Subscriber>,
}

pub struct Hub {
    datasets: RwLock<HashMap<Arc<DatasetKey>, Entry>>,
    metrics: Arc<Metrics>,
    channels: OnceLock<Arc<Channels>>,
    store: Arc<dyn Store>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("datasets", &self.datasets.read().len())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub(crate) fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Self {
        Hub {
            datasets: RwLock::new(HashMap::new()),
            metrics,
            channels: OnceLock::new(),
            store,
        }
    }

    /// Connects the hub to the node's channels; done once, right after the broker exists
    /// (the broker needs the hub as its handler first).
    pub fn attach(&self, channels: Arc<Channels>) {
        let _ = self.channels.set(channels);
    }

    fn channels(&self) -> Option<&Arc<Channels>> {
        self.channels.get()
    }

    /// Adds a local subscriber and subscribes the node to the dataset's channel if needed.
    /// Returns the hub's shared key for the dataset (the outbox slot uses it too).
    pub async fn add(
        &self,
        dataset: Arc<DatasetKey>,
        session: SessionId,
        subscriber: Subscriber,
    ) -> Result<Arc<DatasetKey>, tandem_fanout::FanoutError> {
        let key = {
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
        };
        if let Some(channels) = self.channels()
            && let Err(e) = channels.acquire(&key).await
        {
            self.remove_entry(&key, session);
            return Err(e);
        }
        Ok(key)
    }

    /// Removes a local subscriber; returns whether it was there. The node unsubscribes from
    /// the channel when its last local subscriber leaves.
    pub async fn remove(&self, dataset: &Arc<DatasetKey>, session: SessionId) -> bool {
        let removed = self.remove_entry(dataset, session);
        if removed && let Some(channels) = self.channels() {
            channels.release(dataset).await;
        }
        removed
    }

    fn remove_entry(&self, dataset: &Arc<DatasetKey>, session: SessionId) -> bool {
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

    /// Drops subscriptions the hub ended on its own (delete, revoke) from the channel refs.
    fn release_later(&self, dataset: Arc<DatasetKey>, count: usize) {
        if count == 0 {
            return;
        }
        if let Some(channels) = self.channels().cloned() {
            tokio::spawn(async move {
                for _ in 0..count {
                    channels.release(&dataset).await;
                }
            });
        }
    }

    /// The datasets with local subscribers.
    pub fn datasets(&self) -> Vec<Arc<DatasetKey>> {
        self.datasets.read().keys().cloned().collect()
    }

    fn forward_commit(&self, dataset: &DatasetKey, sync_count: u64, frame: &Utf8Bytes) {
        let map = self.datasets.read();
        let Some((key, entry)) = map.get_key_value(dataset) else {
            return;
        };
        let previous = entry.last_forwarded.fetch_max(sync_count, Ordering::AcqRel);
        if previous >= sync_count {
            return;
        }
        for subscriber in entry.subscribers.values() {
            subscriber.outbox.push(key, sync_count, frame);
        }
        Metrics::add(&self.metrics.pushes, entry.subscribers.len() as u64);
    }

    /// (subscriptions, datasets) on this node.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.datasets.read();
        (map.values().map(|e| e.subscribers.len()).sum(), map.len())
    }

    fn end_subscriptions(
        &self,
        dataset: &DatasetKey,
        frame: &Utf8Bytes,
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
                    s.outbox.end_subscription(&key, Some(frame.clone()));
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
        self.release_later(key, ended);
    }

    /// Re-reads every dataset with local subscribers from the store and forwards whatever is
    /// newer than what this node already forwarded. Used after fan-out faults, when events
    /// may have been missed: so it also re-checks every subscriber's access, ending the
    /// subscriptions of identities whose grant was revoked meanwhile.
    pub async fn resync(&self) {
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
            match self.store.snapshot(&dataset, &dataset.owner).await {
                Ok(snapshot) if snapshot.deleted => {
                    // A delete this node missed: end the subscriptions as the event would have.
                    let frame = ServerFrame::Deleted {
                        dataset: dataset.to_ref(),
                        sync_count: snapshot.sync_count,
                    }
                    .to_json();
                    self.end_deleted(&dataset, snapshot.sync_count, &Utf8Bytes::from(frame));
                }
                Ok(snapshot) => {
                    let frame = ServerFrame::Dataset {
                        dataset: dataset.to_ref(),
                        sync_count: snapshot.sync_count,
                        records: snapshot.records,
                    }
                    .to_json();
                    self.forward_commit(&dataset, snapshot.sync_count, &Utf8Bytes::from(frame));
                }
                Err(e) => {
                    tracing::warn!(dataset = %dataset, error = %e, "resync read failed");
                }
            }
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
}

/// The hub as the broker's handler needs a `'static` owner: the gateway wraps it in an Arc.
pub struct HubHandler(pub Arc<Hub>);

impl EventHandler for HubHandler {
    fn on_event(&self, event: Event) {
        match event {
            Event::Commit {
                dataset,
                sync_count,
                frame,
            } => match Utf8Bytes::try_from(frame) {
                Ok(frame) => self.0.forward_commit(&dataset, sync_count, &frame),
                Err(e) => tracing::warn!(dataset = %dataset, error = %e, "push frame is not utf-8"),
            },
            Event::Deleted {
                dataset,
                sync_count,
                frame,
            } => match Utf8Bytes::try_from(frame) {
                Ok(frame) => self.0.end_deleted(&dataset, sync_count, &frame),
                Err(e) => tracing::warn!(dataset = %dataset, error = %e, "frame is not utf-8"),
            },
            Event::Revoked { dataset, identity } => self.0.end_revoked(&dataset, &identity),
        }
    }

    fn on_resync(&self) {
        let hub = self.0.clone();
        tokio::spawn(async move { hub.resync().await });
    }
}
