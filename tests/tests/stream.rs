//! The change stream end to end: real `tandem` processes on PostgreSQL and Redis (and one on
//! SQLite), a real webhook receiver that fails some requests, a real Redis Stream read
//! through a consumer group; a delivering node SIGKILLed mid-stream; dead letters; replay.

use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_client::UpdateResult;
use tandem_protocol::{DatasetRef, Patch};
use tandem_tests::cluster::{PgSchema, redis_url, unique};
use tandem_tests::webhook::{SECRET, Webhook, first_of_each};
use tandem_tests::{TestServer, eventually, http_get, tandem_bin};

const WAIT: Duration = Duration::from_secs(120);

/// The stream settings every test node gets: short lease and backoff so takeovers and
/// retries happen within a test.
fn stream_node(hook: &Webhook) -> tandem_tests::TestServerBuilder {
    TestServer::builder()
        .arg("--stream-webhook", hook.setting("hook"))
        .arg("--stream-secret", SECRET)
        .arg("--stream-lease-ttl", "2s")
        .arg("--stream-timeout", "1s")
        .arg("--stream-retry-initial", "20ms")
        .arg("--stream-retry-max", "200ms")
        .arg("--stream-poll-interval", "10ms")
}

/// `tandem_stream_leader{consumer}` of each node (0 for a node that does not answer).
async fn leaders(nodes: &[TestServer], alive: &[bool], consumer: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for (node, up) in nodes.iter().zip(alive) {
        if !up {
            out.push(0);
            continue;
        }
        let (_, body) = http_get(node.addr, "/metrics").await;
        let line = format!("tandem_stream_leader{{consumer=\"{consumer}\"}} ");
        out.push(
            body.lines()
                .find_map(|l| l.strip_prefix(&line).and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0),
        );
    }
    out
}

/// The node that delivers for `consumer`, once exactly one does.
async fn leader(nodes: &[TestServer], alive: &[bool], consumer: &str) -> usize {
    eventually(
        WAIT,
        &format!("one node delivering for {consumer}"),
        || async {
            let l = leaders(nodes, alive, consumer).await;
            (l.iter().sum::<u64>() == 1).then(|| l.iter().position(|v| *v == 1).unwrap())
        },
    )
    .await
}

/// Per dataset (owner), the sync counts of its update events in first-arrival order.
fn sync_counts_by_owner(events: &[Value]) -> BTreeMap<String, Vec<u64>> {
    let mut by_owner: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in first_of_each(events) {
        if e["type"] == "update" {
            by_owner
                .entry(e["owner"].as_str().unwrap().to_owned())
                .or_default()
                .push(e["syncCount"].as_u64().unwrap());
        }
    }
    by_owner
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_delivers_every_commit_in_order_across_a_sigkill_and_a_flaky_webhook() {
    const DATASETS: usize = 20;
    const COMMITS: usize = 500;
    let schema = PgSchema::create();
    // Every fifth request fails: 20 %.
    let hook = Webhook::start(5).await;
    let stream_key = unique("tandem-stream");
    let prefix = unique("tandem-e2e");
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", &stream_key, "readers", "0", "MKSTREAM"])
        .query_async(&mut redis)
        .await
        .unwrap();
    let mut nodes: Vec<TestServer> = (0..3)
        .map(|_| {
            stream_node(&hook)
                .arg("--store", &schema.url)
                .arg("--postgres-schema", &schema.name)
                .arg("--postgres-pool-size", 4)
                .arg("--redis", redis_url())
                .arg("--redis-prefix", &prefix)
                .arg("--stream-redis", redis_url())
                .arg("--stream-redis-key", &stream_key)
                .arg("--stream-max-attempts", 0)
                .start()
        })
        .collect();
    let mut alive = vec![true; 3];
    // The nodes delivering for either sink are killed: both take-overs are exercised.
    let mut victims = vec![
        leader(&nodes, &alive, "hook").await,
        leader(&nodes, &alive, "redis").await,
    ];
    victims.dedup();
    let survivors: Vec<usize> = (0..3).filter(|i| !victims.contains(i)).collect();

    // Writers on the surviving nodes (every commit acknowledged), and writers on the
    // victims, whose commits are in flight when they die (only what was acknowledged must
    // arrive); the victims are killed a third of the way in.
    let written = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for d in 0..DATASETS {
        let conn = nodes[survivors[d % survivors.len()]]
            .connect(&format!("writer-{d}"))
            .await;
        let written = written.clone();
        writers.push(tokio::spawn(async move {
            let dataset = DatasetRef::own("log");
            for k in 0..COMMITS {
                let patch = Patch::replace("n", k.to_string(), k as u64);
                match conn
                    .update(dataset.clone(), None, vec![patch])
                    .await
                    .unwrap()
                {
                    UpdateResult::Committed { sync_count, .. } => {
                        assert_eq!(sync_count, k as u64 + 1)
                    }
                    other => panic!("{other:?}"),
                }
                written.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut doomed = Vec::new();
    for (i, v) in victims.iter().enumerate() {
        for j in 0..2 {
            let owner = format!("doomed-{i}-{j}");
            let conn = nodes[*v].connect(&owner).await;
            let acked = Arc::new(AtomicUsize::new(0));
            let counter = acked.clone();
            doomed.push((owner, acked));
            tokio::spawn(async move {
                for k in 0..COMMITS {
                    let patch = Patch::replace("n", k.to_string(), k as u64);
                    match conn.update(DatasetRef::own("log"), None, vec![patch]).await {
                        Ok(UpdateResult::Committed { .. }) => {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        _ => return,
                    }
                }
            });
        }
    }
    let total = DATASETS * COMMITS;
    eventually(WAIT, "a third of the commits", || async {
        (written.load(Ordering::Relaxed) >= total / 3).then_some(())
    })
    .await;
    for v in &victims {
        nodes[*v].kill();
        alive[*v] = false;
    }
    for w in writers {
        w.await.unwrap();
    }
    for consumer in ["hook", "redis"] {
        let taker = leader(&nodes, &alive, consumer).await;
        assert!(!victims.contains(&taker));
    }
    let doomed_acked: Vec<(String, usize)> = doomed
        .iter()
        .map(|(owner, n)| (owner.clone(), n.load(Ordering::SeqCst)))
        .collect();
    assert!(
        doomed_acked.iter().any(|(_, n)| *n > 0),
        "no commit on a killed node"
    );
    let total = total + doomed_acked.iter().map(|(_, n)| n).sum::<usize>();

    // Whether every acknowledged commit is in `events` (a victim's in-flight commit may be
    // there too, so counting events is not enough).
    let complete = |events: &[Value]| {
        let by_owner = sync_counts_by_owner(events);
        (0..DATASETS).all(|d| {
            by_owner
                .get(&format!("writer-{d}"))
                .is_some_and(|c| c.len() >= COMMITS)
        }) && doomed_acked
            .iter()
            .all(|(owner, n)| by_owner.get(owner).map_or(0, Vec::len) >= *n)
    };

    // The webhook: every acknowledged commit at least once, in order per dataset, none
    // missing.
    let deadline = std::time::Instant::now() + WAIT;
    let events = loop {
        let events = hook.events();
        if complete(&events) {
            break events;
        }
        if std::time::Instant::now() > deadline {
            let logs: Vec<String> = nodes.iter().map(|n| n.log()).collect();
            panic!(
                "{} of {total} events at the webhook ({} requests, {} failed); logs:\n{}",
                first_of_each(&events).len(),
                hook.requests(),
                hook.failed(),
                logs.join("\n-----\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every surviving writer's commits in order, none missing; the victims' writers: every
    // acknowledged commit, and perhaps the one in flight.
    let expected: Vec<u64> = (1..=COMMITS as u64).collect();
    let check_all = |events: &[Value], sink: &str| {
        let by_owner = sync_counts_by_owner(events);
        for d in 0..DATASETS {
            let owner = format!("writer-{d}");
            assert_eq!(
                by_owner[&owner], expected,
                "{owner}'s events at the {sink} out of order or missing"
            );
        }
        for (owner, acked) in &doomed_acked {
            let counts = by_owner.get(owner).cloned().unwrap_or_default();
            let expected: Vec<u64> = (1..=counts.len() as u64).collect();
            assert_eq!(counts, expected, "{owner}'s events out of order");
            assert!(
                counts.len() >= *acked,
                "{owner}: {} of {acked}",
                counts.len()
            );
        }
    };
    check_all(&events, "webhook");
    assert!(hook.failed() > 0, "the webhook failed no request");
    assert_eq!(hook.bad_signatures(), 0);
    let webhook_ids: HashSet<String> = first_of_each(&events)
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();

    // The Redis Stream, read through a consumer group: the same events, each exactly once
    // (a redelivered batch does not add them again).
    let mut seen: Vec<Value> = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg(&[
                "GROUP",
                "readers",
                "reader-1",
                "COUNT",
                "1000",
                "STREAMS",
                &stream_key,
                ">",
            ])
            .query_async(&mut redis)
            .await
            .unwrap();
        let ids: Vec<_> = reply.keys.into_iter().flat_map(|k| k.ids).collect();
        if ids.is_empty() {
            if complete(&seen) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {total} events in the redis stream",
                seen.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for id in ids {
            let event: String = id.get("event").unwrap();
            seen.push(serde_json::from_str::<Value>(&event).unwrap());
        }
    }
    let redis_ids: HashSet<String> = seen
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        redis_ids.len(),
        seen.len(),
        "the redis stream holds duplicates"
    );
    check_all(&seen, "redis stream");
    // Both sinks carry the same events (one may have an in-flight commit's the other has
    // not read yet).
    let common = redis_ids.intersection(&webhook_ids).count();
    assert!(
        common >= total,
        "{common} events in both sinks, {total} acknowledged"
    );
}

/// `tandem stream ARGS…` against a store; its stdout, asserting it succeeded.
fn stream_cli(args: &[&str]) -> String {
    let out = Command::new(tandem_bin())
        .arg("stream")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tandem stream {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn write(node: &TestServer, who: &str, name: &str, values: &[&str]) {
    let conn = node.connect(who).await;
    for (k, v) in values.iter().enumerate() {
        let patch = Patch::replace("k", *v, k as u64);
        let outcome = conn
            .update(DatasetRef::own(name), Some("dev-1".into()), vec![patch])
            .await
            .unwrap();
        assert!(
            matches!(outcome, UpdateResult::Committed { .. }),
            "{outcome:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_dead_letters_a_batch_the_webhook_keeps_refusing_and_moves_on() {
    // SQLite, one node: the stream needs no PostgreSQL.
    let hook = Webhook::start(usize::MAX).await;
    let mut node = stream_node(&hook).arg("--stream-max-attempts", 2).start();
    leader(std::slice::from_ref(&node), &[true], "hook").await;
    write(&node, "alice", "notes", &["a", "b", "c"]).await;
    eventually(WAIT, "three events dead-lettered", || async {
        (tandem_tests::metric(&node, "tandem_stream_dead_letters_total{consumer=\"hook\"}").await
            >= 3)
            .then_some(())
    })
    .await;
    assert!(
        tandem_tests::metric(&node, "tandem_stream_failures_total{consumer=\"hook\"}").await >= 2
    );
    assert!(hook.events().is_empty());

    // The webhook is back: the stream has moved past the dead letters.
    hook.set_fail_every(0);
    write(&node, "bob", "notes", &["z"]).await;
    let events = eventually(WAIT, "bob's commit at the webhook", || async {
        let events = hook.events();
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["owner"], "bob");
    assert_eq!(events[0]["records"][0]["value"], "z");
    assert_eq!(events[0]["deviceId"], "dev-1");

    // The dead letters, through the CLI once the node is stopped (it holds the data dir).
    assert!(node.terminate());
    let data_dir = node.data_dir().to_str().unwrap().to_owned();
    let letters = stream_cli(&["dead-letters", "hook", "--data-dir", &data_dir]);
    let letters: Vec<Value> = letters
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(letters.len(), 3, "{letters:?}");
    let values: Vec<&str> = letters
        .iter()
        .map(|l| l["event"]["records"][0]["value"].as_str().unwrap())
        .collect();
    assert_eq!(values, ["a", "b", "c"]);
    assert_eq!(letters[0]["attempts"], 2);
    assert!(letters[0]["error"].as_str().unwrap().contains("500"));
    let consumers = stream_cli(&["consumers", "--data-dir", &data_dir]);
    assert!(consumers.contains("hook\tposition"), "{consumers}");

    // A replay while the node is stopped; the node delivers it when it is back.
    let out = stream_cli(&["replay", "--data-dir", &data_dir]);
    assert!(out.contains("replayed 2 datasets"), "{out}");
    node.start_again();
    let snapshots = eventually(WAIT, "the snapshots at the webhook", || async {
        let snapshots: Vec<Value> = hook
            .events()
            .into_iter()
            .filter(|e| e["type"] == "snapshot")
            .collect();
        (snapshots.len() >= 2).then_some(snapshots)
    })
    .await;
    let owners: Vec<&str> = snapshots
        .iter()
        .map(|s| s["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners, ["alice", "bob"]);
    assert_eq!(snapshots[0]["records"][0]["value"], "c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_replay_sends_every_live_dataset_as_a_snapshot() {
    let schema = PgSchema::create();
    let hook = Webhook::start(0).await;
    let node = stream_node(&hook)
        .arg("--store", &schema.url)
        .arg("--postgres-schema", &schema.name)
        .start();
    leader(std::slice::from_ref(&node), &[true], "hook").await;
    write(&node, "alice", "notes", &["a", "b"]).await;
    write(&node, "bob", "todo", &["x"]).await;
    write(&node, "carol", "gone", &["y"]).await;
    node.connect("carol")
        .await
        .delete_dataset(DatasetRef::own("gone"))
        .await
        .unwrap();
    eventually(WAIT, "the commits at the webhook", || async {
        (hook.events().len() >= 5).then_some(())
    })
    .await;

    // While the node runs: the CLI appends snapshots to the log, the node delivers them.
    let out = stream_cli(&[
        "replay",
        "--store",
        &schema.url,
        "--postgres-schema",
        &schema.name,
    ]);
    assert!(out.contains("replayed 2 datasets"), "{out}");
    let snapshots = eventually(WAIT, "two snapshots at the webhook", || async {
        let snapshots: Vec<Value> = hook
            .events()
            .into_iter()
            .filter(|e| e["type"] == "snapshot")
            .collect();
        (snapshots.len() >= 2).then_some(snapshots)
    })
    .await;
    let by_owner: BTreeMap<&str, &Value> = snapshots
        .iter()
        .map(|s| (s["owner"].as_str().unwrap(), s))
        .collect();
    assert_eq!(by_owner.len(), 2);
    assert_eq!(by_owner["alice"]["syncCount"], 2);
    assert_eq!(by_owner["alice"]["records"][0]["value"], "b");
    assert_eq!(by_owner["bob"]["records"][0]["value"], "x");
    assert!(!by_owner.contains_key("carol"));
}

/// The sum over nodes of one `/metrics` value.
async fn metric_sum(nodes: &[TestServer], name: &str) -> u64 {
    let mut sum = 0;
    for node in nodes {
        sum += tandem_tests::metric(node, name).await;
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_two_nodes_dead_letter_after_the_attempts_even_when_waits_outlast_the_lease() {
    // Waits of 1, 2 and 3 s between attempts (less up to a quarter), a 2 s lease: without
    // renewing during the waits the other node takes over before the last attempt and starts
    // counting again, and nothing is ever dead-lettered.
    let schema = PgSchema::create();
    let hook = Webhook::start(usize::MAX).await;
    let nodes: Vec<TestServer> = (0..2)
        .map(|_| {
            TestServer::builder()
                .arg("--store", &schema.url)
                .arg("--postgres-schema", &schema.name)
                .arg("--stream-webhook", hook.setting("hook"))
                .arg("--stream-secret", SECRET)
                .arg("--stream-lease-ttl", "2s")
                .arg("--stream-timeout", "500ms")
                .arg("--stream-retry-initial", "1s")
                .arg("--stream-retry-max", "3s")
                .arg("--stream-max-attempts", 4)
                .arg("--stream-poll-interval", "10ms")
                .start()
        })
        .collect();
    leader(&nodes, &[true, true], "hook").await;
    write(&nodes[0], "alice", "notes", &["a"]).await;
    eventually(WAIT, "the event dead-lettered", || async {
        (metric_sum(
            &nodes,
            "tandem_stream_dead_letters_total{consumer=\"hook\"}",
        )
        .await
            >= 1)
            .then_some(())
    })
    .await;
    assert_eq!(
        metric_sum(&nodes, "tandem_stream_failures_total{consumer=\"hook\"}").await,
        4,
        "attempts were restarted by a take-over"
    );
    assert_eq!(hook.requests(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_stream_refuses_a_redis_stream_past_the_log_until_it_is_cleared() {
    let hook = Webhook::start(0).await;
    let key = unique("tandem-stream-ahead");
    let redis = redis::Client::open(redis_url()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    // What a restored database's lower ids would run into: a stream already far ahead.
    let _: String = redis::cmd("XADD")
        .arg(&[&key, "999999999-0", "id", "old", "event", "{}"])
        .query_async(&mut redis)
        .await
        .unwrap();
    let node = stream_node(&hook)
        .arg("--stream-redis", redis_url())
        .arg("--stream-redis-key", &key)
        .start();
    write(&node, "alice", "notes", &["a"]).await;
    eventually(WAIT, "the redis sink refusing", || async {
        (tandem_tests::metric(&node, "tandem_stream_failures_total{consumer=\"redis\"}").await >= 1)
            .then_some(())
    })
    .await;
    let len: u64 = redis::cmd("XLEN")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(len, 1, "an event went into a stream past the log");
    assert!(node.log().contains("past the commit log"), "{}", node.log());
    // The webhook is not held up by the redis sink.
    eventually(WAIT, "the webhook's event", || async {
        (!hook.events().is_empty()).then_some(())
    })
    .await;

    let _: u64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
    let entries = eventually(WAIT, "the event in the cleared stream", || {
        let mut redis = redis.clone();
        let key = key.clone();
        async move {
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&[&key, "-", "+"])
                .query_async(&mut redis)
                .await
                .unwrap();
            (!entries.is_empty()).then_some(entries)
        }
    })
    .await;
    assert_eq!(entries.len(), 1);
    let _: u64 = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut redis)
        .await
        .unwrap();
}
