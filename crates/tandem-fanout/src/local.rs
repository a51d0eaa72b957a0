//! The in-process broker for a single node: publishing is a direct call into the handler.

use crate::{Broker, BrokerHealth, Event, EventHandler, FanoutError};
use async_trait::async_trait;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tandem_store::DatasetKey;

pub struct LocalBroker {
    handler: Arc<dyn EventHandler>,
    closed: AtomicBool,
}

impl std::fmt::Debug for LocalBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBroker").finish_non_exhaustive()
    }
}

impl LocalBroker {
    pub fn new(handler: Arc<dyn EventHandler>) -> Self {
        LocalBroker {
            handler,
            closed: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl Broker for LocalBroker {
    async fn subscribe(&self, _dataset: &Arc<DatasetKey>) -> Result<(), FanoutError> {
        // Every publish reaches the handler; there is nothing to subscribe to.
        Ok(())
    }

    async fn unsubscribe(&self, _dataset: &Arc<DatasetKey>) -> Result<(), FanoutError> {
        Ok(())
    }

    async fn publish(&self, event: Event) -> Result<(), FanoutError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(FanoutError::Closed);
        }
        self.handler.on_event(event);
        Ok(())
    }

    fn health(&self) -> BrokerHealth {
        BrokerHealth::Up
    }

    async fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}
