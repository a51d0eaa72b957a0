//! The broker trait and the events it carries.

use crate::FanoutError;
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use tandem_store::DatasetKey;

/// What one node tells the others about a dataset. Frames are encoded once, by the node
/// that committed, and forwarded byte for byte to every subscriber on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A commit: `frame` is the encoded `dataset` push at `sync_count` (the whole dataset,
    /// lean record encoding); `delta`, when the committing node knew it, the encoded `delta`
    /// push from `sync_count - 1` (only the records the commit wrote, lean encoding).
    Commit {
        dataset: Arc<DatasetKey>,
        sync_count: u64,
        frame: Bytes,
        delta: Option<Bytes>,
    },
    /// The dataset was deleted: `frame` is the encoded `deleted` frame.
    Deleted {
        dataset: Arc<DatasetKey>,
        sync_count: u64,
        frame: Bytes,
    },
    /// `identity` lost its access; its subscriptions to the dataset end.
    Revoked {
        dataset: Arc<DatasetKey>,
        identity: String,
    },
}

impl Event {
    pub fn dataset(&self) -> &Arc<DatasetKey> {
        match self {
            Event::Commit { dataset, .. }
            | Event::Deleted { dataset, .. }
            | Event::Revoked { dataset, .. } => dataset,
        }
    }
}

/// Receives the events the broker delivers to this node.
pub trait EventHandler: Send + Sync + 'static {
    fn on_event(&self, event: Event);

    /// Events may have been missed (a reconnect, a lagging subscription): the handler should
    /// re-read every dataset it has local subscribers for from the store.
    fn on_resync(&self);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerHealth {
    Up,
    /// The broker works locally but cannot reach its peers; writes go on, live pushes to
    /// other nodes wait for the reconnect and resync.
    Degraded(String),
}

/// Node-level pub/sub: one subscription per dataset channel per node.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Subscribes this node to a dataset's channel; returns once the subscription is
    /// confirmed, so that no later commit can be missed.
    async fn subscribe(&self, dataset: &Arc<DatasetKey>) -> Result<(), FanoutError>;

    async fn unsubscribe(&self, dataset: &Arc<DatasetKey>) -> Result<(), FanoutError>;

    /// Publishes an event to every node subscribed to its dataset, this one included.
    async fn publish(&self, event: Event) -> Result<(), FanoutError>;

    fn health(&self) -> BrokerHealth;

    async fn close(&self);
}
