//! Two users share a dataset and see each other's edits live.

use tandem_client::UpdateResult;
use tandem_protocol::{Access, DatasetRef, Patch, ServerFrame};
use tandem_tests::{TestServer, next_push};

#[tokio::test]
async fn test_sharing_update_reaches_other_user_live_as_whole_dataset() {
    let server = TestServer::start();
    let alice = server.connect("alice").await;
    let mut bob = server.connect("bob").await;

    let list = DatasetRef::own("groceries");
    let r = alice
        .update(
            list.clone(),
            Some("phone".into()),
            vec![Patch::replace("milk", "2", 0)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 1, .. }),
        "{r:?}"
    );
    alice
        .grant(list.clone(), "bob", Access::Write)
        .await
        .unwrap();

    let shared = DatasetRef::new("alice", "groceries");
    let (n, records) = bob.subscribe(shared.clone()).await.unwrap();
    assert_eq!(n, 1);
    assert_eq!(records.len(), 1);

    alice
        .update(list.clone(), None, vec![Patch::replace("eggs", "12", 0)])
        .await
        .unwrap();
    let (n, records) = next_push(&mut bob).await;
    assert_eq!(n, 2);
    let keys: Vec<_> = records
        .iter()
        .map(|r| (r.key.as_str(), r.value.as_deref()))
        .collect();
    assert_eq!(keys, [("eggs", Some("12")), ("milk", Some("2"))]);

    // Bob writes back with the sync count he saw; Alice, subscribed, sees it.
    let mut alice = alice;
    alice.subscribe(list.clone()).await.unwrap();
    let milk = records.iter().find(|r| r.key == "milk").unwrap();
    let r = bob
        .update(
            shared.clone(),
            None,
            vec![Patch::replace("milk", "3", milk.sync_count)],
        )
        .await
        .unwrap();
    assert!(
        matches!(r, UpdateResult::Committed { sync_count: 3, .. }),
        "{r:?}"
    );
    let (n, records) = next_push(&mut alice).await;
    assert_eq!(n, 3);
    let milk = records.iter().find(|r| r.key == "milk").unwrap();
    assert_eq!(milk.value.as_deref(), Some("3"));
    assert_eq!(milk.last_modified_by, "bob");
    let _ = ServerFrame::Pong { id: None };
}
