//! Unit tests of the Redis broker's parts that need no Redis: the envelope, channel names,
//! backoff, the unsent buffer and configuration checks.

use super::codec::{DecodeError, KIND_COMMIT, VERSION, decode, encode};
use super::link::{BACKOFF_FIRST, BACKOFF_LAST, backoff};
use super::unsent::Unsent;
use super::*;
use bytes::Bytes;

fn key(owner: &str, name: &str) -> Arc<DatasetKey> {
    Arc::new(DatasetKey::new("default", owner, name))
}

fn commit(dataset: &Arc<DatasetKey>, sync_count: u64) -> Event {
    Event::Commit {
        dataset: dataset.clone(),
        sync_count,
        frame: Bytes::from(format!("{{\"syncCount\":{sync_count}}}")),
        delta: sync_count
            .is_multiple_of(2)
            .then(|| Bytes::from(format!("{{\"d\":{sync_count}}}"))),
    }
}

#[test]
fn test_redis_envelope_round_trips_every_kind() {
    let dataset = key("auth0|a:b", "x:y.z");
    let events = [
        commit(&dataset, 7),
        commit(&dataset, 8),
        Event::Deleted {
            dataset: dataset.clone(),
            sync_count: u64::MAX,
            frame: Bytes::from_static(b""),
        },
        Event::Revoked {
            dataset: dataset.clone(),
            identity: "bob:1".to_owned(),
        },
    ];
    for event in events {
        assert_eq!(decode(&encode(&event)), Ok(event));
    }
}

#[test]
fn test_redis_envelope_rejects_bad_payloads_without_panicking() {
    let good = encode(&commit(&key("u", "d"), 3));
    // Every prefix short of the sync count is truncated; none may panic.
    for cut in 0..good.len() {
        let _ = decode(&good[..cut]);
    }
    assert_eq!(decode(b""), Err(DecodeError::Truncated));
    assert_eq!(decode(&[9, 1]), Err(DecodeError::Version(9)));
    assert_eq!(decode(&[VERSION, 42]), Err(DecodeError::Kind(42)));
    let mut huge = vec![VERSION, KIND_COMMIT];
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&huge), Err(DecodeError::Truncated));
    let mut bad_utf8 = vec![VERSION, KIND_COMMIT, 0, 0, 0, 1, 0xff];
    bad_utf8.extend_from_slice(&[0; 16]);
    assert_eq!(decode(&bad_utf8), Err(DecodeError::Utf8));
    let mut trailing = encode(&Event::Revoked {
        dataset: key("u", "d"),
        identity: "v".to_owned(),
    });
    trailing.push(0);
    assert_eq!(decode(&trailing), Err(DecodeError::Trailing));
}

#[test]
fn test_redis_channel_names_do_not_collide_on_colons() {
    let config = RedisConfig::new("redis://localhost");
    let a = config.channel(&key("a:b", "c"));
    let b = config.channel(&key("a", "b:c"));
    let c = config.channel(&key("a%3Ab", "c"));
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_eq!(a, "tandem:ds:default:a%3Ab:c");
    assert_eq!(b, "tandem:ds:default:a:b%3Ac");
    assert_eq!(c, "tandem:ds:default:a%253Ab:c");
}

#[test]
fn test_redis_backoff_doubles_and_stays_bounded() {
    for attempt in 1..100 {
        let wait = backoff(attempt);
        assert!(wait >= BACKOFF_FIRST / 2, "{attempt}: {wait:?}");
        assert!(wait <= BACKOFF_LAST.mul_f64(1.5), "{attempt}: {wait:?}");
    }
    assert!(backoff(1) < Duration::from_millis(76));
    assert!(backoff(30) >= Duration::from_secs(1));
}

#[test]
fn test_redis_unsent_keeps_latest_per_dataset_and_every_revoke() {
    let (a, b) = (key("u", "a"), key("u", "b"));
    let mut unsent = Unsent::default();
    assert!(unsent.remember(commit(&a, 5)));
    assert!(unsent.remember(commit(&a, 3)));
    assert!(unsent.remember(commit(&b, 1)));
    assert!(unsent.remember(Event::Deleted {
        dataset: b.clone(),
        sync_count: 2,
        frame: Bytes::new(),
    }));
    for _ in 0..2 {
        assert!(unsent.remember(Event::Revoked {
            dataset: a.clone(),
            identity: "v".to_owned(),
        }));
    }
    assert_eq!(unsent.len(), 3);
    let events = unsent.take();
    assert!(matches!(events[0], Event::Revoked { .. }));
    assert!(events.contains(&commit(&a, 5)));
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Deleted { sync_count: 2, .. }))
    );
    assert_eq!(unsent.len(), 0);
}

#[test]
fn test_redis_config_debug_hides_the_password() {
    let config = RedisConfig::new("redis://user:secret@host:6379/0");
    let shown = format!("{config:?}");
    assert!(!shown.contains("secret"), "{shown}");
    assert!(shown.contains("host:6379/0"), "{shown}");
}

#[tokio::test]
async fn test_redis_start_rejects_an_invalid_url() {
    struct Nothing;
    impl EventHandler for Nothing {
        fn on_event(&self, _: Event) {}
        fn on_resync(&self) {}
    }
    let result = RedisBroker::start(RedisConfig::new("not a url"), Arc::new(Nothing));
    assert!(matches!(result, Err(FanoutError::Unavailable(_))));
}

#[test]
fn test_redis_envelope_version_1_is_still_read() {
    let dataset = key("u", "d");
    // A version-1 commit: no delta length, the frame to the end.
    let mut v1 = vec![1, KIND_COMMIT];
    for part in ["default", "u", "d"] {
        v1.extend_from_slice(&(part.len() as u32).to_be_bytes());
        v1.extend_from_slice(part.as_bytes());
    }
    v1.extend_from_slice(&9u64.to_be_bytes());
    v1.extend_from_slice(b"{\"frame\":9}");
    assert_eq!(
        decode(&v1),
        Ok(Event::Commit {
            dataset,
            sync_count: 9,
            frame: Bytes::from_static(b"{\"frame\":9}"),
            delta: None,
        })
    );
}
