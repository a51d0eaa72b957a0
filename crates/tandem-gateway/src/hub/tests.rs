//! The hub without sockets: outboxes registered directly, a real SQLite store, the
//! in-process broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::{Hub, Subscriber, Subscribers};
use crate::outbox::{Outbox, Outgoing};
use crate::testkit::store;
use std::sync::Arc;
use std::time::Duration;
use tandem_fanout::LocalBroker;
use tandem_protocol::{Access, Patch};
use tandem_store::{DatasetKey, Store, UpdateOutcome, UpdateRequest};

fn hub(store: &Arc<dyn Store>) -> Hub {
    let subscribers = Subscribers::new(store.clone());
    let broker = Arc::new(LocalBroker::new(subscribers.handler()));
    Hub::new(subscribers, broker)
}

fn key() -> Arc<DatasetKey> {
    Arc::new(DatasetKey::new("default", "alice", "todo"))
}

/// Subscribes a fresh outbox as `identity` (session `id`), as a session does.
async fn subscribe(hub: &Hub, id: u64, identity: &str) -> Arc<Outbox> {
    let outbox = Arc::new(Outbox::new(16, 1 << 20));
    let subscriber = Subscriber {
        identity: Arc::from(identity),
        outbox: outbox.clone(),
    };
    let shared = hub.subscribe(key(), id, subscriber).await.unwrap();
    outbox.subscribe(shared, false);
    outbox
}

/// What the outbox holds now, as text.
async fn drain(outbox: &Outbox) -> Vec<String> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_millis(50), outbox.next_batch(&mut out, 64)).await;
    out.into_iter()
        .map(|o| match o {
            Outgoing::Frame(f) | Outgoing::Push(f, _) => f.as_str().to_owned(),
            Outgoing::Close(c) => format!("close {}", c.code()),
            Outgoing::Stop => "stop".to_owned(),
        })
        .collect()
}

async fn commit(store: &Arc<dyn Store>, value: &str, sync_count: u64) -> u64 {
    let request = UpdateRequest {
        dataset: (*key()).clone(),
        actor: "alice".to_owned(),
        device_id: None,
        patches: vec![Patch::replace("k", value, sync_count)],
    };
    match store.update(request).await.unwrap() {
        UpdateOutcome::Committed { snapshot, .. } => snapshot.sync_count,
        other => panic!("not committed: {other:?}"),
    }
}

#[tokio::test]
async fn test_hub_publish_reaches_subscribers_until_they_unsubscribe() {
    let (store, _dir) = store();
    let hub = hub(&store);
    let a = subscribe(&hub, 1, "alice").await;
    let b = subscribe(&hub, 2, "alice").await;
    assert_eq!(hub.subscribers().counts(), (2, 1));

    hub.publish_commit(key(), 1, Vec::new(), Vec::new()).await;
    assert_eq!(drain(&a).await.len(), 1);
    assert_eq!(drain(&b).await.len(), 1);

    assert!(hub.unsubscribe(&key(), 2).await);
    assert!(!hub.unsubscribe(&key(), 2).await);
    hub.publish_commit(key(), 2, Vec::new(), Vec::new()).await;
    let pushed = drain(&a).await;
    assert!(pushed[0].contains("\"syncCount\":2"), "{pushed:?}");
    assert!(drain(&b).await.is_empty());
    assert_eq!(hub.subscribers().counts(), (1, 1));
}

#[tokio::test]
async fn test_hub_coalesces_and_never_forwards_a_sync_count_twice_or_backwards() {
    let (store, _dir) = store();
    let hub = hub(&store);
    let a = subscribe(&hub, 1, "alice").await;
    for n in [3, 1, 5, 5, 4] {
        hub.publish_commit(key(), n, Vec::new(), Vec::new()).await;
    }
    let pushed = drain(&a).await;
    assert_eq!(pushed.len(), 1, "{pushed:?}");
    assert!(pushed[0].contains("\"syncCount\":5"), "{pushed:?}");
    hub.publish_commit(key(), 5, Vec::new(), Vec::new()).await;
    assert!(drain(&a).await.is_empty());
}

#[tokio::test]
async fn test_hub_revoke_ends_only_the_grantees_subscriptions() {
    let (store, _dir) = store();
    let hub = hub(&store);
    let owner = subscribe(&hub, 1, "alice").await;
    let bob = subscribe(&hub, 2, "bob").await;
    hub.publish_revoked(key(), "bob".to_owned()).await;
    let notice = drain(&bob).await;
    assert!(notice[0].contains("\"unsubscribed\""), "{notice:?}");
    assert!(!bob.is_subscribed(&key()));
    assert!(owner.is_subscribed(&key()));
    assert_eq!(hub.subscribers().counts(), (1, 1));
}

#[tokio::test]
async fn test_hub_delete_ends_subscriptions_that_have_not_seen_it() {
    let (store, _dir) = store();
    let hub = hub(&store);
    let a = subscribe(&hub, 1, "alice").await;
    hub.publish_deleted(key(), 1).await;
    let notice = drain(&a).await;
    assert!(notice[0].contains("\"deleted\""), "{notice:?}");
    assert_eq!(hub.subscribers().counts(), (0, 0));
}

#[tokio::test]
async fn test_hub_resync_forwards_missed_commits_and_ends_revoked_grants() {
    let (store, _dir) = store();
    let hub = hub(&store);
    store
        .grant(&key(), "alice", "bob", Access::Read)
        .await
        .unwrap();
    let owner = subscribe(&hub, 1, "alice").await;
    let bob = subscribe(&hub, 2, "bob").await;

    // Committed and revoked behind the hub's back, as during a broker outage.
    let n = commit(&store, "v1", 0).await;
    store.revoke(&key(), "alice", "bob").await.unwrap();
    hub.subscribers().resync().await;

    let pushed = drain(&owner).await;
    assert!(
        pushed[0].contains(&format!("\"syncCount\":{n}")),
        "{pushed:?}"
    );
    assert!(pushed[0].contains("\"v1\""), "{pushed:?}");
    let notice = drain(&bob).await;
    assert!(notice[0].contains("\"revoked\""), "{notice:?}");
    assert_eq!(hub.subscribers().counts(), (1, 1));

    // Nothing new: a second resync forwards nothing.
    hub.subscribers().resync().await;
    assert!(drain(&owner).await.is_empty());
}
