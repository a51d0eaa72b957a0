//! Conformance cases of a pool's developer views and settings (`crate::admin`).

use super::{DEFAULT_POOL, Store, commit, ds, iid, login};
use crate::{Expect, MAX_IDENTITY_PAGE, StoreError, record_bytes};
use std::sync::Arc;
use tandem_protocol::Patch;

/// Identities page by id, merged-away ones left out, each with its providers and dates; an
/// identity created between pages shows up once, on a later page if it sorts after the
/// cursor. Default limits.
pub async fn case_identities_page_by_id(store: Arc<dyn Store>) {
    for n in [2, 4, 6, 8, 10, 12] {
        store
            .create_identity(DEFAULT_POOL, &iid(n), n % 4 == 2)
            .await
            .unwrap();
    }
    store
        .create_identity("other-pool", &iid(1), true)
        .await
        .unwrap();
    store
        .link_logins(
            DEFAULT_POOL,
            &iid(4),
            &[
                login("accounts.example.com", "a"),
                login("login.example.org", "b"),
            ],
        )
        .await
        .unwrap();
    // Guest 6 merges into 4: it is listed no more.
    store
        .merge_identity(DEFAULT_POOL, &iid(6), &iid(4))
        .await
        .unwrap();

    let first = store.identities(DEFAULT_POOL, None, 2).await.unwrap();
    let ids: Vec<&str> = first.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, [iid(2), iid(4)], "{first:?}");
    let four = &first[1];
    assert_eq!(
        four.providers,
        ["accounts.example.com", "login.example.org"]
    );
    assert!(
        four.created_at > 0 && four.last_modified >= four.created_at,
        "{four:?}"
    );
    assert!(first[0].providers.is_empty());

    // Created meanwhile: 3 sorts before the cursor (never shown in this walk), 9 after it.
    for n in [3, 9] {
        store
            .create_identity(DEFAULT_POOL, &iid(n), true)
            .await
            .unwrap();
    }
    let mut rest = Vec::new();
    let mut after = first.last().map(|i| i.id.clone());
    loop {
        let page = store
            .identities(DEFAULT_POOL, after.as_deref(), 2)
            .await
            .unwrap();
        assert!(page.len() <= 2);
        rest.extend(page.iter().map(|i| i.id.clone()));
        if page.len() < 2 {
            break;
        }
        after = page.last().map(|i| i.id.clone());
    }
    assert_eq!(rest, [iid(8), iid(9), iid(10), iid(12)]);

    let all = store
        .identities(DEFAULT_POOL, None, MAX_IDENTITY_PAGE)
        .await
        .unwrap();
    assert_eq!(all.len(), 7, "{all:?}");
    assert_eq!(
        store
            .identity_summary(DEFAULT_POOL, &iid(4))
            .await
            .unwrap()
            .as_ref(),
        Some(four)
    );
    assert_eq!(
        store.identity_summary(DEFAULT_POOL, &iid(6)).await.unwrap(),
        None,
        "merged away"
    );
    assert_eq!(
        store
            .identity_summary(DEFAULT_POOL, &iid(99))
            .await
            .unwrap(),
        None
    );
    let other = store.identities("other-pool", None, 10).await.unwrap();
    assert_eq!(other.len(), 1);
    for bad in [0, MAX_IDENTITY_PAGE + 1] {
        assert!(matches!(
            store.identities(DEFAULT_POOL, None, bad).await,
            Err(StoreError::BadRequest(_))
        ));
    }
    assert!(matches!(
        store.identities(DEFAULT_POOL, Some("alice"), 1).await,
        Err(StoreError::BadRequest(_))
    ));
}

/// A pool's usage counts its live identities and live datasets only. Default limits.
pub async fn case_pool_usage_counts_live_data(store: Arc<dyn Store>) {
    let empty = store.pool_usage(DEFAULT_POOL).await.unwrap();
    assert_eq!(
        (
            empty.identities,
            empty.datasets,
            empty.bytes,
            empty.last_modified
        ),
        (0, 0, 0, None)
    );
    for n in [1, 2] {
        store
            .create_identity(DEFAULT_POOL, &iid(n), true)
            .await
            .unwrap();
    }
    store
        .merge_identity(DEFAULT_POOL, &iid(1), &iid(2))
        .await
        .unwrap();
    let (_, a) = commit(
        &*store,
        &ds("alice", "a"),
        "alice",
        vec![Patch::replace("k", "value", 0), Patch::replace("j", "v", 0)],
    )
    .await;
    commit(
        &*store,
        &ds("bob", "b"),
        "bob",
        vec![Patch::replace("x", "y", 0)],
    )
    .await;
    commit(
        &*store,
        &ds("bob", "gone"),
        "bob",
        vec![Patch::replace("x", "y", 0)],
    )
    .await;
    store
        .delete_dataset(&ds("bob", "gone"), "bob")
        .await
        .unwrap();
    let usage = store.pool_usage(DEFAULT_POOL).await.unwrap();
    assert_eq!(usage.identities, 1);
    assert_eq!(usage.datasets, 2);
    assert_eq!(
        usage.bytes,
        record_bytes("k", "value") + record_bytes("j", "v") + record_bytes("x", "y")
    );
    assert!(usage.last_modified >= Some(a.records[0].last_modified));
    assert_eq!(store.pool_usage("other-pool").await.unwrap().datasets, 0);
}

/// Pool settings: set, compare-and-swap, clear, per pool, bounded; of racers expecting it
/// unset, exactly one writes. Default limits.
pub async fn case_pool_settings_compare_and_swap(store: Arc<dyn Store>) {
    let (pool, name) = (DEFAULT_POOL, "events.SyncTrigger");
    assert_eq!(store.pool_setting(pool, name).await.unwrap(), None);
    assert!(
        store
            .put_pool_setting(pool, name, Some("http://a"), Expect::Any)
            .await
            .unwrap()
    );
    assert_eq!(
        store.pool_setting(pool, name).await.unwrap().as_deref(),
        Some("http://a")
    );
    assert_eq!(store.pool_setting("other-pool", name).await.unwrap(), None);
    // A wrong expectation writes nothing.
    for expect in [Expect::Value(None), Expect::Value(Some("http://b"))] {
        assert!(
            !store
                .put_pool_setting(pool, name, Some("http://c"), expect)
                .await
                .unwrap()
        );
        assert!(
            !store
                .put_pool_setting(pool, name, None, expect)
                .await
                .unwrap()
        );
    }
    assert_eq!(
        store.pool_setting(pool, name).await.unwrap().as_deref(),
        Some("http://a")
    );
    assert!(
        store
            .put_pool_setting(
                pool,
                name,
                Some("http://b"),
                Expect::Value(Some("http://a"))
            )
            .await
            .unwrap()
    );
    assert!(
        store
            .put_pool_setting(pool, name, None, Expect::Value(Some("http://b")))
            .await
            .unwrap()
    );
    assert_eq!(store.pool_setting(pool, name).await.unwrap(), None);
    assert!(
        store
            .put_pool_setting(pool, name, None, Expect::Any)
            .await
            .unwrap()
    );
    assert!(
        store
            .put_pool_setting(pool, name, None, Expect::Value(None))
            .await
            .unwrap()
    );

    let racers: Vec<_> = (0..8)
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let value = format!("node-{i}");
                store
                    .put_pool_setting(DEFAULT_POOL, "job", Some(&value), Expect::Value(None))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = 0;
    for racer in racers {
        winners += usize::from(racer.await.unwrap());
    }
    assert_eq!(winners, 1);
    assert!(
        store
            .pool_setting(pool, "job")
            .await
            .unwrap()
            .is_some_and(|v| v.starts_with("node-"))
    );

    let big = "v".repeat(crate::MAX_SETTING_VALUE + 1);
    assert!(matches!(
        store
            .put_pool_setting(pool, name, Some(&big), Expect::Any)
            .await,
        Err(StoreError::BadRequest(_))
    ));
    assert!(matches!(
        store.pool_setting(pool, "").await,
        Err(StoreError::BadRequest(_))
    ));
}
