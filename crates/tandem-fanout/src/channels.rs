//! Per-node channel refcounts: the first local subscriber to a dataset subscribes the node to
//! its channel, the last one to leave unsubscribes it. Concurrent first subscribers all wait
//! for the one confirmation; an unsubscribe racing a new subscriber cannot strand it.

use crate::{Broker, FanoutError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tandem_store::DatasetKey;

struct Entry {
    refs: usize,
    /// Held across the broker call so that subscribe and unsubscribe of one channel never
    /// interleave; the bool says whether the node is subscribed.
    gate: Arc<tokio::sync::Mutex<bool>>,
}

pub struct Channels {
    broker: Arc<dyn Broker>,
    entries: Mutex<HashMap<Arc<DatasetKey>, Entry>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("channels", &self.entries.lock().len())
            .finish_non_exhaustive()
    }
}

impl Channels {
    pub fn new(broker: Arc<dyn Broker>) -> Self {
        Channels {
            broker,
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Takes a reference on the dataset's channel; returns once the node's subscription is
    /// confirmed. On error the reference is not taken.
    pub async fn acquire(&self, dataset: &Arc<DatasetKey>) -> Result<(), FanoutError> {
        let gate = {
            let mut entries = self.entries.lock();
            let entry = entries.entry(dataset.clone()).or_insert_with(|| Entry {
                refs: 0,
                gate: Arc::new(tokio::sync::Mutex::new(false)),
            });
            entry.refs += 1;
            entry.gate.clone()
        };
        let mut subscribed = gate.lock().await;
        if !*subscribed {
            if let Err(e) = self.broker.subscribe(dataset).await {
                drop(subscribed);
                self.release(dataset).await;
                return Err(e);
            }
            *subscribed = true;
        }
        Ok(())
    }

    /// Drops a reference; the last one unsubscribes the node from the channel.
    pub async fn release(&self, dataset: &Arc<DatasetKey>) {
        let gate = {
            let mut entries = self.entries.lock();
            let Some(entry) = entries.get_mut(dataset) else {
                return;
            };
            entry.refs = entry.refs.saturating_sub(1);
            if entry.refs > 0 {
                return;
            }
            entry.gate.clone()
        };
        let mut subscribed = gate.lock().await;
        let still_unused = self
            .entries
            .lock()
            .get(dataset)
            .is_some_and(|e| e.refs == 0 && Arc::ptr_eq(&e.gate, &gate));
        if !still_unused {
            return;
        }
        if *subscribed {
            if let Err(e) = self.broker.unsubscribe(dataset).await {
                tracing::warn!(dataset = %dataset, error = %e, "channel unsubscribe failed");
            }
            *subscribed = false;
        }
        let mut entries = self.entries.lock();
        if entries
            .get(dataset)
            .is_some_and(|e| e.refs == 0 && Arc::ptr_eq(&e.gate, &gate))
        {
            entries.remove(dataset);
        }
    }

    /// How many channels the node holds a reference on.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerHealth, Event};
    use async_trait::async_trait;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[derive(Default)]
    struct CountingBroker {
        subs: AtomicUsize,
        unsubs: AtomicUsize,
    }

    #[async_trait]
    impl Broker for CountingBroker {
        async fn subscribe(&self, _: &Arc<DatasetKey>) -> Result<(), FanoutError> {
            tokio::task::yield_now().await;
            self.subs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn unsubscribe(&self, _: &Arc<DatasetKey>) -> Result<(), FanoutError> {
            tokio::task::yield_now().await;
            self.unsubs.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn publish(&self, _: Event) -> Result<(), FanoutError> {
            Ok(())
        }
        fn health(&self) -> BrokerHealth {
            BrokerHealth::Up
        }
        async fn close(&self) {}
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_channels_subscribe_once_per_node() {
        let broker = Arc::new(CountingBroker::default());
        let channels = Arc::new(Channels::new(broker.clone()));
        let key = Arc::new(DatasetKey::new("default", "u1", "ds"));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (c, k) = (channels.clone(), key.clone());
            tasks.push(tokio::spawn(async move { c.acquire(&k).await }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(broker.subs.load(Ordering::SeqCst), 1);
        for _ in 0..49 {
            channels.release(&key).await;
        }
        assert_eq!(broker.unsubs.load(Ordering::SeqCst), 0);
        channels.release(&key).await;
        assert_eq!(broker.unsubs.load(Ordering::SeqCst), 1);
        assert!(channels.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn test_channels_racing_release_and_acquire_end_subscribed() {
        let broker = Arc::new(CountingBroker::default());
        let channels = Arc::new(Channels::new(broker.clone()));
        let key = Arc::new(DatasetKey::new("default", "u1", "ds"));
        for _ in 0..200 {
            channels.acquire(&key).await.unwrap();
            let (c, k) = (channels.clone(), key.clone());
            let release = tokio::spawn(async move { c.release(&k).await });
            let (c, k) = (channels.clone(), key.clone());
            let acquire = tokio::spawn(async move { c.acquire(&k).await });
            release.await.unwrap();
            acquire.await.unwrap().unwrap();
            // One reference is held: the node must be subscribed.
            let subs = broker.subs.load(Ordering::SeqCst);
            let unsubs = broker.unsubs.load(Ordering::SeqCst);
            assert_eq!(subs, unsubs + 1);
            channels.release(&key).await;
        }
    }
}
