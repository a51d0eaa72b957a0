//! The command layer and the transport without a socket: sessions over channels against a
//! real SQLite store and the in-process broker.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::GatewayConfig;
use crate::testkit::gateway;
use axum::extract::ws::Message;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite;

fn ds(name: &str) -> serde_json::Value {
    json!({ "name": name })
}

#[tokio::test]
async fn test_session_update_is_acked_and_pushed_to_subscribers() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let mut watcher = t.connect("alice").await;
    let snap = watcher
        .request(json!({"type": "subscribe", "id": 1, "dataset": ds("todo")}))
        .await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["syncCount"], 0);

    let ack = alice
        .request(json!({"type": "update", "id": 2, "dataset": ds("todo"),
            "patches": [{"op": "replace", "key": "milk", "value": "2", "syncCount": 0}]}))
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["syncCount"], 1);

    let push = watcher.recv().await;
    assert_eq!(push["type"], "dataset");
    assert_eq!(push["syncCount"], 1);
    assert_eq!(push["records"][0]["key"], "milk");
    assert_eq!(push["records"][0]["value"], "2");
}

#[tokio::test]
async fn test_session_stale_update_gets_conflict_with_server_record() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let update = |id: u64, value: &str| {
        json!({"type": "update", "id": id, "dataset": ds("todo"),
            "patches": [{"op": "replace", "key": "milk", "value": value, "syncCount": 0}]})
    };
    assert_eq!(alice.request(update(1, "2")).await["type"], "ack");
    let conflict = alice.request(update(2, "3")).await;
    assert_eq!(conflict["type"], "conflict", "{conflict}");
    assert_eq!(conflict["conflicts"][0]["key"], "milk");
    assert_eq!(conflict["conflicts"][0]["server"]["value"], "2");
}

#[tokio::test]
async fn test_session_requests_before_auth_are_refused_and_auth_timeout_closes() {
    let t = gateway(GatewayConfig {
        auth_timeout: Duration::from_millis(200),
        ..GatewayConfig::default()
    });
    let mut anon = t.connect_with(None, 16);
    let reply = anon
        .request(json!({"type": "subscribe", "id": 1, "dataset": ds("todo")}))
        .await;
    assert_eq!(reply["code"], "unauthorized", "{reply}");
    // Ping needs no identity.
    assert_eq!(
        anon.request(json!({"type": "ping", "id": 2})).await["type"],
        "pong"
    );
    assert_eq!(anon.close_code().await, Some(4004));
}

#[tokio::test]
async fn test_session_grant_revoke_ends_the_grantees_subscription() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let mut bob = t.connect("bob").await;
    let shared = json!({"owner": "alice", "name": "list"});
    let refused = bob
        .request(json!({"type": "subscribe", "id": 1, "dataset": shared}))
        .await;
    assert_eq!(refused["code"], "forbidden", "{refused}");

    let grant = alice
        .request(json!({"type": "grant", "id": 2, "dataset": ds("list"), "identity": "bob", "access": "read"}))
        .await;
    assert_eq!(grant["type"], "ack", "{grant}");
    let snap = bob
        .request(json!({"type": "subscribe", "id": 3, "dataset": shared}))
        .await;
    assert_eq!(snap["type"], "snapshot", "{snap}");

    let revoke = alice
        .request(json!({"type": "revoke", "id": 4, "dataset": ds("list"), "identity": "bob"}))
        .await;
    assert_eq!(revoke["type"], "ack", "{revoke}");
    let notice = bob.recv().await;
    assert_eq!(notice["type"], "unsubscribed", "{notice}");
    assert_eq!(notice["reason"], "revoked");
    assert_eq!(t.gw.hub.subscribers().counts(), (0, 0));
}

#[tokio::test]
async fn test_session_delete_tells_subscribers_and_lists_datasets() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let mut watcher = t.connect("alice").await;
    alice
        .request(json!({"type": "update", "id": 1, "dataset": ds("a"),
            "patches": [{"op": "replace", "key": "k", "value": "v", "syncCount": 0}]}))
        .await;
    let list = alice
        .request(json!({"type": "list_datasets", "id": 2}))
        .await;
    assert_eq!(list["datasets"][0]["dataset"]["name"], "a", "{list}");
    watcher
        .request(json!({"type": "subscribe", "id": 3, "dataset": ds("a")}))
        .await;
    let ack = alice
        .request(json!({"type": "delete_dataset", "id": 4, "dataset": ds("a")}))
        .await;
    assert_eq!(ack["syncCount"], 2, "{ack}");
    let deleted = watcher.recv().await;
    assert_eq!(deleted["type"], "deleted", "{deleted}");
    let changes = alice
        .request(json!({"type": "changes", "id": 5, "dataset": ds("a"), "since": 0}))
        .await;
    assert_eq!(
        changes["records"][0]["value"],
        serde_json::Value::Null,
        "{changes}"
    );
}

#[tokio::test]
async fn test_session_malformed_and_binary_frames_get_bad_request_and_the_session_stays() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    alice.send_message(Message::Text("{not json".into()));
    assert_eq!(alice.recv().await["code"], "bad_request");
    alice.send_message(Message::Binary(vec![1, 2, 3].into()));
    assert_eq!(alice.recv().await["code"], "bad_request");
    assert_eq!(
        alice.request(json!({"type": "ping", "id": 9})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn test_session_too_large_frame_closes_with_4501() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let capacity = tungstenite::error::CapacityError::MessageTooLong {
        size: 10,
        max_size: 5,
    };
    alice.send_raw(Err(axum::Error::new(tungstenite::Error::Capacity(
        capacity,
    ))));
    let error = alice.recv().await;
    assert_eq!(error["limit"], "max_frame_bytes", "{error}");
    assert_eq!(alice.close_code().await, Some(4501));
}

#[tokio::test]
async fn test_session_frames_over_the_rate_get_rate_limited_whether_or_not_they_decode() {
    let t = gateway(GatewayConfig {
        max_requests_per_second: 4,
        ..GatewayConfig::default()
    });
    let mut alice = t.connect("alice").await;
    for _ in 0..3 {
        alice.send_message(Message::Text("{not json".into()));
    }
    alice.send_message(Message::Binary(vec![1, 2, 3].into()));
    // The bucket is empty: garbage, binary frames and requests are all refused unread,
    // except for the id of a frame that has one.
    alice.send_message(Message::Text("{not json".into()));
    alice.send_message(Message::Binary(vec![1, 2, 3].into()));
    alice.send(json!({"type": "frobnicate", "id": "f1"}));
    alice.send(json!({"type": "ping", "id": 7}));
    let mut replies = Vec::new();
    for _ in 0..8 {
        let reply = alice.recv().await;
        replies.push((reply["code"].clone(), reply["id"].clone()));
    }
    let bad = (json!("bad_request"), json!(null));
    let limited = |id: serde_json::Value| (json!("rate_limited"), id);
    assert_eq!(
        replies,
        [
            bad.clone(),
            bad.clone(),
            bad.clone(),
            bad,
            limited(json!(null)),
            limited(json!(null)),
            limited(json!("f1")),
            limited(json!(7)),
        ]
    );
}

#[tokio::test]
async fn test_session_bad_request_answers_past_max_bad_frames_close_with_4503() {
    let t = gateway(GatewayConfig {
        max_bad_frames: 3,
        ..GatewayConfig::default()
    });
    let mut alice = t.connect("alice").await;
    // Every kind of `bad_request` counts: garbage, a binary frame, a request the store
    // refuses as malformed. Other answers do not.
    alice.send_message(Message::Text("{not json".into()));
    assert_eq!(alice.recv().await["code"], "bad_request");
    alice.send_message(Message::Binary(vec![1, 2, 3].into()));
    assert_eq!(alice.recv().await["code"], "bad_request");
    let refused = alice
        .request(json!({"type": "subscribe", "id": 1, "dataset": ds("not a name")}))
        .await;
    assert_eq!(refused["code"], "bad_request", "{refused}");
    let forbidden = alice
        .request(json!({"type": "subscribe", "id": 2, "dataset": {"owner": "bob", "name": "x"}}))
        .await;
    assert_eq!(forbidden["code"], "forbidden", "{forbidden}");
    assert_eq!(
        alice.request(json!({"type": "ping", "id": 3})).await["type"],
        "pong"
    );
    // The fourth is answered, then the connection closes and reads nothing more.
    let last = alice.request(json!({"type": "nope", "id": 4})).await;
    assert_eq!(last["code"], "bad_request", "{last}");
    alice.send(json!({"type": "ping", "id": 5}));
    match alice.next_message().await {
        Some(Message::Close(Some(frame))) => assert_eq!(frame.code, 4503),
        other => panic!("expected close 4503, got {other:?}"),
    }
}

#[tokio::test]
async fn test_session_max_bad_frames_zero_never_closes() {
    let t = gateway(GatewayConfig {
        max_bad_frames: 0,
        max_requests_per_second: 0,
        ..GatewayConfig::default()
    });
    let mut alice = t.connect("alice").await;
    for _ in 0..500 {
        alice.send_message(Message::Text("{not json".into()));
    }
    for _ in 0..500 {
        assert_eq!(alice.recv().await["code"], "bad_request");
    }
    assert_eq!(
        alice.request(json!({"type": "ping", "id": 1})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn test_session_subscribe_storm_from_a_client_that_does_not_read_is_closed_as_slow() {
    let t = gateway(GatewayConfig {
        max_queued_replies: 8,
        // Long: the queue bound, not the write deadline, must end this session.
        write_timeout: Duration::from_secs(60),
        ..GatewayConfig::default()
    });
    // The test reads nothing: the session's writes stall after one message, as on a socket
    // whose peer stopped reading.
    let alice = t.connect_with(Some("alice"), 1);
    for id in 0..200 {
        alice.send(json!({"type": "subscribe", "id": id, "dataset": ds("todo")}));
    }
    // Snapshot replies count against the bound: the session stops reading and gives up its
    // subscription instead of queueing 200 snapshots.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !alice.session_stopped_reading() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the session was not closed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    while t.gw.hub.subscribers().counts() != (0, 0) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscription was not dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn test_session_shutdown_closes_with_going_away() {
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    assert!(t.gw.shutdown(Duration::from_secs(5)).await);
    assert_eq!(alice.close_code().await, Some(4000));
}

#[tokio::test]
async fn test_session_one_identity_holds_at_most_max_connections_per_identity() {
    let t = gateway(GatewayConfig {
        max_connections_per_identity: 2,
        ..GatewayConfig::default()
    });
    let first = t.connect("alice").await;
    let _second = t.connect("alice").await;
    let mut third = t.connect_with(Some("alice"), 16);
    let refused = third.recv().await;
    assert_eq!(
        refused["limit"], "max_connections_per_identity",
        "{refused}"
    );
    assert_eq!(third.close_code().await, Some(4005));
    // Another identity is not affected, and a closed session frees its place.
    let _bob = t.connect("bob").await;
    drop(first);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = t.connect_with(Some("alice"), 16);
        if again.recv().await["type"] == "ready" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the place was not freed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn test_session_ends_at_max_session_age_even_with_a_token_that_never_expires() {
    let t = gateway(GatewayConfig {
        max_session_age: Duration::from_millis(300),
        ..GatewayConfig::default()
    });
    let forever = crate::Identity {
        sub: "alice".to_owned(),
        expires_at: i64::MAX,
    };
    let mut alice = t.connect_identity(Some(forever), 16);
    assert_eq!(alice.recv().await["type"], "ready");
    assert_eq!(alice.close_code().await, Some(4006));
}

#[tokio::test]
async fn test_session_without_subscriptions_is_closed_when_idle_and_kept_while_subscribed() {
    let t = gateway(GatewayConfig {
        idle_timeout: Duration::from_millis(300),
        ..GatewayConfig::default()
    });
    let mut idle = t.connect("alice").await;
    let mut busy = t.connect("alice").await;
    busy.request(json!({"type": "subscribe", "id": 1, "dataset": ds("todo")}))
        .await;
    // Pings do not keep a session without subscriptions open.
    idle.send(json!({"type": "ping", "id": 1}));
    assert_eq!(idle.close_code().await, Some(4007));
    // The idle timeout is the behaviour under test: wait past it, then the subscribed
    // session still answers.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        busy.request(json!({"type": "ping", "id": 2})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn test_session_reset_without_close_is_an_abrupt_disconnect_not_a_protocol_error() {
    use crate::throttle::Event;
    let t = gateway(GatewayConfig::default());
    let mut alice = t.connect("alice").await;
    let reset = tungstenite::error::ProtocolError::ResetWithoutClosingHandshake;
    alice.send_raw(Err(axum::Error::new(tungstenite::Error::Protocol(reset))));
    // The peer is gone: no close frame is written to it.
    assert_eq!(alice.close_code().await, None);
    assert_eq!(t.gw.throttle.count(Event::AbruptDisconnect).0, 1);
    assert_eq!(t.gw.throttle.count(Event::ProtocolError).0, 0);

    let mut bob = t.connect("bob").await;
    let broken = tungstenite::error::ProtocolError::NonZeroReservedBits;
    bob.send_raw(Err(axum::Error::new(tungstenite::Error::Protocol(broken))));
    assert_eq!(bob.close_code().await, Some(4502));
    assert_eq!(t.gw.throttle.count(Event::ProtocolError).0, 1);
}

#[tokio::test]
async fn test_ready_announces_the_write_limits_when_the_binary_set_them() {
    let t = gateway(GatewayConfig {
        store_limits: Some(tandem_store::Limits {
            max_key_length: 8,
            max_patches: 3,
            ..tandem_store::Limits::default()
        }),
        max_frame_bytes: 4096,
        ..GatewayConfig::default()
    });
    let mut alice = t.connect_with(Some("alice"), 16);
    let ready = alice.recv().await;
    assert_eq!(ready["type"], "ready");
    let limits = &ready["limits"];
    assert_eq!(limits["maxKeyLength"], 8, "{ready}");
    assert_eq!(limits["maxPatches"], 3);
    assert_eq!(limits["maxRecords"], 1024);
    assert_eq!(limits["maxDatasetBytes"], 1024 * 1024);
    assert_eq!(limits["maxDeviceIdLength"], 128);
    assert_eq!(limits["maxFrameBytes"], 4096);
    // Without them (an embedding that does not say) `ready` has no `limits` at all.
    let t = gateway(GatewayConfig::default());
    let mut bob = t.connect_with(Some("bob"), 16);
    let ready = bob.recv().await;
    assert_eq!(ready["type"], "ready");
    assert!(ready.get("limits").is_none(), "{ready}");
}
