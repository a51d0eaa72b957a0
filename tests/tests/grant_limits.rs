//! Grants are bounded: an owner cannot make an unbounded number of grants, on datasets that
//! exist or on names it never wrote.

use tandem_client::{ClientError, Connection};
use tandem_protocol::{Access, DatasetRef, ErrorCode, LimitCode};
use tandem_tests::TestServer;

async fn grant_all(owner: &Connection, name: &str, grantees: std::ops::Range<u32>) {
    for i in grantees {
        owner
            .grant(DatasetRef::own(name), &format!("friend-{i}"), Access::Read)
            .await
            .unwrap_or_else(|e| panic!("grant {i} on {name}: {e}"));
    }
}

fn assert_grant_limit(result: Result<(), ClientError>, limit: LimitCode, max: u64) {
    match result {
        Err(ClientError::Server {
            code,
            limit: Some(l),
            max: Some(m),
            ..
        }) => {
            assert_eq!(code, ErrorCode::LimitExceeded);
            assert_eq!((l, m), (limit, max));
        }
        other => panic!("expected limit_exceeded {limit} ({max}), got {other:?}"),
    }
}

#[tokio::test]
async fn test_grant_limits_refuse_grants_past_the_dataset_and_owner_limits() {
    // Limits small enough to reach quickly.
    let server = TestServer::builder()
        .arg("--max-grants-per-dataset", 100)
        .arg("--max-grants-per-owner", 150)
        .start();
    let alice = server.connect("alice").await;

    // None of these names is ever written.
    grant_all(&alice, "a", 0..100).await;
    assert_grant_limit(
        alice
            .grant(DatasetRef::own("a"), "friend-100", Access::Read)
            .await,
        LimitCode::MaxGrantsPerDataset,
        100,
    );
    // Changing a grant's access is not a new grant.
    alice
        .grant(DatasetRef::own("a"), "friend-0", Access::Write)
        .await
        .unwrap();

    grant_all(&alice, "b", 0..50).await;
    assert_grant_limit(
        alice
            .grant(DatasetRef::own("c"), "friend-0", Access::Read)
            .await,
        LimitCode::MaxGrantsPerOwner,
        150,
    );
    assert!(alice.closed().is_none(), "the connection stays open");

    // A revoke frees a slot; other owners have their own.
    alice
        .revoke(DatasetRef::own("b"), "friend-0")
        .await
        .unwrap();
    alice
        .grant(DatasetRef::own("c"), "friend-0", Access::Read)
        .await
        .unwrap();
    let bob = server.connect("bob").await;
    bob.grant(DatasetRef::own("a"), "friend-0", Access::Read)
        .await
        .unwrap();
}
