//! The unsent buffer: events this node failed to publish during an outage, kept (bounded)
//! and re-published on the next link so the other nodes catch up.

use super::Inner;
use super::link::Link;
use crate::Event;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tandem_store::DatasetKey;

/// Datasets (and revokes) whose failed publish is remembered for after the reconnect.
const MAX_UNSENT: usize = 10_000;

/// Events this node failed to publish, kept for re-publishing after the reconnect: per
/// dataset only the one with the highest sync count (a commit or a delete: pushes are whole
/// snapshots, so the latest covers the earlier ones), and every revoke, so that a revoke
/// always reaches the other nodes (re-sent late it may end a subscription that a new grant
/// allowed again; the client re-subscribes, which is the safe side of the race).
#[derive(Default)]
pub(super) struct Unsent {
    latest: HashMap<Arc<DatasetKey>, Event>,
    revoked: HashSet<(Arc<DatasetKey>, String)>,
}

impl Unsent {
    /// Returns false when the event was dropped because the bound is reached.
    pub(super) fn remember(&mut self, event: Event) -> bool {
        match event {
            Event::Revoked { dataset, identity } => {
                let key = (dataset, identity);
                if self.revoked.len() >= MAX_UNSENT && !self.revoked.contains(&key) {
                    return false;
                }
                self.revoked.insert(key);
                true
            }
            event => {
                let dataset = event.dataset().clone();
                match self.latest.get(&dataset) {
                    Some(kept) if sync_count(kept) >= sync_count(&event) => true,
                    None if self.latest.len() >= MAX_UNSENT => false,
                    _ => {
                        self.latest.insert(dataset, event);
                        true
                    }
                }
            }
        }
    }

    /// Everything remembered, revokes first (they end subscriptions before any push).
    pub(super) fn take(&mut self) -> Vec<Event> {
        let mut events: Vec<Event> = self
            .revoked
            .drain()
            .map(|(dataset, identity)| Event::Revoked { dataset, identity })
            .collect();
        events.extend(self.latest.drain().map(|(_, event)| event));
        events
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.latest.len() + self.revoked.len()
    }
}

fn sync_count(event: &Event) -> u64 {
    match event {
        Event::Commit { sync_count, .. } | Event::Deleted { sync_count, .. } => *sync_count,
        Event::Revoked { .. } => 0,
    }
}

impl Inner {
    pub(super) fn remember(&self, event: Event) {
        let kept = self.state.lock().unsent.remember(event);
        if !kept {
            tracing::warn!(
                max = MAX_UNSENT,
                "too many unpublished datasets; other nodes see this one on their next resync"
            );
        }
        self.republish.notify_one();
    }
}

/// Re-publishes the events that failed to publish, whenever some are waiting.
pub(super) async fn run_republisher(inner: Arc<Inner>, link: Link) {
    loop {
        tokio::select! {
            biased;
            _ = link.broken.cancelled() => return,
            _ = inner.republish.notified() => {}
        }
        let events = inner.state.lock().unsent.take();
        if events.is_empty() {
            continue;
        }
        let count = events.len();
        let mut events = events.into_iter();
        while let Some(event) = events.next() {
            if let Err(e) = inner.publish_on(&link, &event).await {
                let mut state = inner.state.lock();
                state.unsent.remember(event);
                for event in events {
                    state.unsent.remember(event);
                }
                drop(state);
                link.fail(format!("re-publish failed: {e}"));
                return;
            }
        }
        tracing::info!(
            count,
            "re-published events that could not be published during the outage"
        );
    }
}
