//! The local hub: which sessions on this node subscribe to which dataset, and the one place
//! that turns a committed change into a push. Sessions subscribe and unsubscribe through it
//! (it keeps the node on each dataset's broker channel while it has local subscribers) and
//! publish through it (it encodes each push frame once and hands it to the broker).
//!
//! Who owns what: the [`Subscribers`] registry is made first, with the store; the broker is
//! made with the registry's handler (events from the broker are delivered straight into
//! it); the hub is made last and owns the broker's channels. Nothing points back: the
//! registry never calls the broker, and the channel references it ends on its own (delete,
//! revoke) are handed to the hub through a queue.

mod subscribers;
#[cfg(test)]
mod tests;

pub use subscribers::Subscribers;
pub(crate) use subscribers::{SessionId, Subscriber};

use crate::metrics::Metrics;
use crate::push;
use bytes::Bytes;
use std::sync::{Arc, Weak};
use tandem_fanout::{Broker, Channels, Event, FanoutError};
use tandem_protocol::{Record, ServerFrame};
use tandem_store::DatasetKey;
use tokio::sync::mpsc;

pub(crate) struct Hub {
    subscribers: Arc<Subscribers>,
    channels: Arc<Channels>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("subscribers", &self.subscribers)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// The hub over a registry and the broker that was made with the registry's handler.
    pub(crate) fn new(subscribers: Arc<Subscribers>, broker: Arc<dyn Broker>) -> Hub {
        let channels = Arc::new(Channels::new(broker));
        if let Some(released) = subscribers.take_released() {
            spawn_releaser(Arc::downgrade(&channels), released);
        }
        Hub {
            subscribers,
            channels,
        }
    }

    pub(crate) fn subscribers(&self) -> &Arc<Subscribers> {
        &self.subscribers
    }

    pub(crate) fn broker(&self) -> &Arc<dyn Broker> {
        self.channels.broker()
    }

    pub(crate) fn metrics(&self) -> &Arc<Metrics> {
        self.subscribers.metrics()
    }

    /// Adds a local subscriber and subscribes the node to the dataset's channel if needed
    /// (returning once the broker confirmed it). Returns the hub's shared key for the
    /// dataset (the outbox slot uses it too).
    pub(crate) async fn subscribe(
        &self,
        dataset: Arc<DatasetKey>,
        session: SessionId,
        subscriber: Subscriber,
    ) -> Result<Arc<DatasetKey>, FanoutError> {
        let key = self.subscribers.insert(dataset, session, subscriber);
        if let Err(e) = self.channels.acquire(&key).await {
            self.subscribers.remove(&key, session);
            return Err(e);
        }
        Ok(key)
    }

    /// Removes a local subscriber; returns whether it was there. The node unsubscribes from
    /// the channel when its last local subscriber leaves.
    pub(crate) async fn unsubscribe(&self, dataset: &Arc<DatasetKey>, session: SessionId) -> bool {
        let removed = self.subscribers.remove(dataset, session);
        if removed {
            self.channels.release(dataset).await;
        }
        removed
    }

    /// Publishes a commit: the `dataset` push (the whole dataset, `records`) and the `delta`
    /// push (what the commit wrote, `changed`, ordered by key) are encoded here, once, and
    /// the same bytes go to every subscriber on every node. The commit is already durable,
    /// so a broker fault is only logged (subscribers catch up on resync).
    pub(crate) async fn publish_commit(
        &self,
        dataset: Arc<DatasetKey>,
        sync_count: u64,
        records: Vec<Record>,
        changed: Vec<Record>,
    ) {
        let frame = Bytes::from(push::whole_frame(&dataset, sync_count, records));
        let delta = Some(Bytes::from(push::delta_frame(
            &dataset, sync_count, changed,
        )));
        self.publish(Event::Commit {
            dataset,
            sync_count,
            frame,
            delta,
        })
        .await;
    }

    /// Publishes a delete: subscribers get `deleted` and their subscriptions end.
    pub(crate) async fn publish_deleted(&self, dataset: Arc<DatasetKey>, sync_count: u64) {
        let frame = deleted_frame(&dataset, sync_count);
        self.publish(Event::Deleted {
            dataset,
            sync_count,
            frame,
        })
        .await;
    }

    /// Publishes a revoke: the grantee's subscriptions to the dataset end on every node.
    pub(crate) async fn publish_revoked(&self, dataset: Arc<DatasetKey>, identity: String) {
        self.publish(Event::Revoked { dataset, identity }).await;
    }

    async fn publish(&self, event: Event) {
        if let Err(e) = self.broker().publish(event).await {
            // The broker warns once per outage; this is per write.
            tracing::debug!(error = %e, "publish failed; subscribers catch up on resync");
        }
    }
}

/// Releases the channel references of subscriptions the registry ended on its own. Holds
/// the channels weakly, so it ends with the hub.
fn spawn_releaser(
    channels: Weak<Channels>,
    mut released: mpsc::UnboundedReceiver<(Arc<DatasetKey>, usize)>,
) {
    tokio::spawn(async move {
        while let Some((dataset, count)) = released.recv().await {
            let Some(channels) = channels.upgrade() else {
                return;
            };
            for _ in 0..count {
                channels.release(&dataset).await;
            }
        }
    });
}

/// The notice that a dataset was deleted at a sync count.
pub(crate) fn deleted_frame(dataset: &DatasetKey, sync_count: u64) -> Bytes {
    Bytes::from(
        ServerFrame::Deleted {
            dataset: dataset.to_ref(),
            sync_count,
        }
        .to_json(),
    )
}
