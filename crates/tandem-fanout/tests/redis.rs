//! `RedisBroker` against a real Redis: the shared one on 127.0.0.1:6379 (a unique channel
//! prefix per test) and, for outages, a private `redis-server` each test starts and kills.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use parking_lot::Mutex;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_fanout::{
    Broker, BrokerHealth, Event, EventHandler, FanoutError, RedisBroker, RedisConfig,
};
use tandem_store::DatasetKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

const SHARED_REDIS: &str = "redis://127.0.0.1:6379";
const WAIT: Duration = Duration::from_secs(10);

/// Records what the broker hands to this node.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<Event>>,
    resyncs: AtomicUsize,
}

impl EventHandler for Recorder {
    fn on_event(&self, event: Event) {
        self.events.lock().push(event);
    }

    fn on_resync(&self) {
        self.resyncs.fetch_add(1, Ordering::SeqCst);
    }
}

impl Recorder {
    /// The sync counts of the commits received for `dataset`, in arrival order.
    fn commits(&self, dataset: &DatasetKey) -> Vec<u64> {
        self.events
            .lock()
            .iter()
            .filter_map(|e| match e {
                Event::Commit {
                    dataset: d,
                    sync_count,
                    ..
                } if **d == *dataset => Some(*sync_count),
                _ => None,
            })
            .collect()
    }

    fn has(&self, dataset: &DatasetKey, sync_count: u64) -> bool {
        self.commits(dataset).contains(&sync_count)
    }

    fn resyncs(&self) -> usize {
        self.resyncs.load(Ordering::SeqCst)
    }
}

fn unique_prefix() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "tandem-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    )
}

fn key(owner: &str, name: &str) -> Arc<DatasetKey> {
    Arc::new(DatasetKey::new("default", owner, name))
}

fn commit(dataset: &Arc<DatasetKey>, sync_count: u64) -> Event {
    Event::Commit {
        dataset: dataset.clone(),
        sync_count,
        frame: Bytes::from(format!(
            "{{\"type\":\"dataset\",\"syncCount\":{sync_count}}}"
        )),
        delta: None,
    }
}

/// A node: a broker and the handler it delivers to.
struct Node {
    broker: Arc<RedisBroker>,
    handler: Arc<Recorder>,
}

fn node(url: &str, prefix: &str) -> Node {
    let handler = Arc::new(Recorder::default());
    let config = RedisConfig {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
    };
    let broker = RedisBroker::start(config, handler.clone()).unwrap();
    Node { broker, handler }
}

/// Two nodes on the shared Redis with their own prefix, both connected.
async fn two_nodes() -> (Node, Node) {
    let prefix = unique_prefix();
    let (a, b) = (node(SHARED_REDIS, &prefix), node(SHARED_REDIS, &prefix));
    wait_up(&a).await;
    wait_up(&b).await;
    (a, b)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_up(node: &Node) {
    wait_until("broker up", || node.broker.health() == BrokerHealth::Up).await;
}

async fn wait_degraded(node: &Node) {
    wait_until("broker degraded", || {
        matches!(node.broker.health(), BrokerHealth::Degraded(_))
    })
    .await;
}

/// How many clients Redis says are subscribed to `channel`.
async fn subscribers(url: &str, channel: &str) -> i64 {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (_, count): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .unwrap();
    count
}

/// A `redis-server` of this test's own, on a free port, killed on drop.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    async fn start_on(port: u16) -> PrivateRedis {
        let mut redis = PrivateRedis { port, child: None };
        redis.restart().await;
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        self.child = Some(child);
        let client = redis::Client::open(self.url()).unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return;
            }
            assert!(Instant::now() < deadline, "private redis did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Open,
    /// Connections are closed and new ones dropped: Redis looks down to this node only.
    Cut,
    /// Connections stay open but nothing is forwarded: a silent network partition.
    Frozen,
}

/// A TCP proxy in front of Redis for one node, so a test can take that node's path to
/// Redis away while the other nodes keep theirs.
struct Proxy {
    port: u16,
    path_tx: watch::Sender<Path>,
    /// Connections currently forwarding bytes.
    forwarding: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (path_tx, path_rx) = watch::channel(Path::Open);
        let forwarding = Arc::new(AtomicUsize::new(0));
        let count = forwarding.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (path_rx, count) = (path_rx.clone(), count.clone());
                tokio::spawn(Self::forward(client, upstream, path_rx, count));
            }
        });
        Proxy {
            port,
            path_tx,
            forwarding,
            task,
        }
    }

    async fn forward(
        mut client: TcpStream,
        upstream: &str,
        mut path_rx: watch::Receiver<Path>,
        forwarding: Arc<AtomicUsize>,
    ) {
        let path = *path_rx.borrow_and_update();
        match path {
            Path::Cut => return,
            Path::Frozen => {
                // Hold the socket without answering until the path changes.
                let _ = path_rx.changed().await;
                return;
            }
            Path::Open => {}
        }
        let Ok(mut server) = TcpStream::connect(upstream).await else {
            return;
        };
        forwarding.fetch_add(1, Ordering::SeqCst);
        let frozen = tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
            path = path_rx.wait_for(|p| *p != Path::Open) => path.is_ok_and(|p| *p == Path::Frozen),
        };
        forwarding.fetch_sub(1, Ordering::SeqCst);
        if frozen {
            let _ = path_rx.changed().await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn set(&self, path: Path) {
        self.path_tx.send_replace(path);
    }

    /// Takes the path away and waits until no connection forwards any more.
    async fn take_away(&self, path: Path) {
        self.set(path);
        wait_until("proxy stops forwarding", || {
            self.forwarding.load(Ordering::SeqCst) == 0
        })
        .await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        self.set(Path::Cut);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_publish_reaches_other_node_once_and_own_node_locally() {
    let (a, b) = two_nodes().await;
    let dataset = key("u1", "notes");
    a.broker.subscribe(&dataset).await.unwrap();
    b.broker.subscribe(&dataset).await.unwrap();

    a.broker.publish(commit(&dataset, 1)).await.unwrap();
    // Local delivery is direct: done by the time publish returns.
    assert_eq!(a.handler.commits(&dataset).first(), Some(&1));
    wait_until("b receives 1", || b.handler.has(&dataset, 1)).await;

    a.broker.publish(commit(&dataset, 2)).await.unwrap();
    wait_until("b receives 2", || b.handler.has(&dataset, 2)).await;
    assert_eq!(b.handler.commits(&dataset), [1, 2]);
    // A also gets its own events back through Redis; the hub's sync-count filter drops them.
    wait_until("a's echo", || a.handler.commits(&dataset).len() == 4).await;
    assert_eq!(b.handler.resyncs(), 1, "one resync, at the first connect");

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_no_delivery_without_subscription_or_after_unsubscribe() {
    let (a, b) = two_nodes().await;
    let (other, marker, later) = (key("u1", "other"), key("u1", "marker"), key("u1", "later"));
    b.broker.subscribe(&marker).await.unwrap();

    // Redis keeps one publisher's order: once the marker is in, `other` would be too.
    a.broker.publish(commit(&other, 1)).await.unwrap();
    a.broker.publish(commit(&marker, 1)).await.unwrap();
    wait_until("b receives the marker", || b.handler.has(&marker, 1)).await;
    assert!(b.handler.commits(&other).is_empty());

    b.broker.unsubscribe(&marker).await.unwrap();
    let channel = b.broker.config().channel(&marker);
    assert_eq!(subscribers(SHARED_REDIS, &channel).await, 0);
    b.broker.subscribe(&later).await.unwrap();
    a.broker.publish(commit(&marker, 2)).await.unwrap();
    a.broker.publish(commit(&later, 1)).await.unwrap();
    wait_until("b receives later", || b.handler.has(&later, 1)).await;
    assert_eq!(b.handler.commits(&marker), [1]);

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_subscribe_returns_only_once_confirmed() {
    let (a, b) = two_nodes().await;
    // A publish right after subscribe returns must arrive; with an unconfirmed subscribe it
    // would race the SUBSCRIBE and be lost now and then.
    for i in 0..30 {
        let dataset = key("u1", &format!("ds{i}"));
        b.broker.subscribe(&dataset).await.unwrap();
        a.broker.publish(commit(&dataset, 1)).await.unwrap();
        wait_until("the publish after subscribe", || b.handler.has(&dataset, 1)).await;
    }
    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_colons_in_owner_and_name_route_to_the_right_dataset() {
    let (a, b) = two_nodes().await;
    let wanted = key("auth0|a:b", "c");
    let lookalike = key("auth0|a", "b:c");
    b.broker.subscribe(&wanted).await.unwrap();

    a.broker.publish(commit(&lookalike, 9)).await.unwrap();
    a.broker.publish(commit(&wanted, 1)).await.unwrap();
    wait_until("b receives its dataset", || b.handler.has(&wanted, 1)).await;
    let events = b.handler.events.lock().clone();
    assert_eq!(events, [commit(&wanted, 1)]);

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_bad_payload_is_dropped_and_delivery_goes_on() {
    let (a, b) = two_nodes().await;
    let dataset = key("u1", "notes");
    b.broker.subscribe(&dataset).await.unwrap();

    let client = redis::Client::open(SHARED_REDIS).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = b.broker.config().channel(&dataset);
    for garbage in [
        &b""[..],
        b"\x01",
        b"\x01\x01\xff\xff\xff\xff",
        b"not an envelope",
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(garbage)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    a.broker.publish(commit(&dataset, 1)).await.unwrap();
    wait_until("the good event", || b.handler.has(&dataset, 1)).await;
    assert_eq!(b.handler.events.lock().len(), 1);
    assert_eq!(b.broker.health(), BrokerHealth::Up);

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_close_unsubscribes_and_refuses_further_calls() {
    let prefix = unique_prefix();
    let a = node(SHARED_REDIS, &prefix);
    wait_up(&a).await;
    let dataset = key("u1", "notes");
    a.broker.subscribe(&dataset).await.unwrap();
    let channel = a.broker.config().channel(&dataset);
    assert_eq!(subscribers(SHARED_REDIS, &channel).await, 1);

    a.broker.close().await;
    assert!(matches!(a.broker.health(), BrokerHealth::Degraded(_)));
    assert_eq!(
        a.broker.publish(commit(&dataset, 1)).await,
        Err(FanoutError::Closed)
    );
    assert_eq!(a.broker.subscribe(&dataset).await, Err(FanoutError::Closed));
    assert!(a.handler.commits(&dataset).is_empty());
    let deadline = Instant::now() + WAIT;
    while subscribers(SHARED_REDIS, &channel).await != 0 {
        assert!(Instant::now() < deadline, "still subscribed after close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_restart_degrades_then_recovers_resyncs_and_resubscribes() {
    let mut redis = PrivateRedis::start_on(PrivateRedis::free_port()).await;
    let prefix = unique_prefix();
    let (a, b) = (node(&redis.url(), &prefix), node(&redis.url(), &prefix));
    wait_up(&a).await;
    wait_up(&b).await;
    let (dataset, joined) = (key("u1", "notes"), key("u2", "joined-in-outage"));
    a.broker.subscribe(&dataset).await.unwrap();
    b.broker.subscribe(&dataset).await.unwrap();
    a.broker.publish(commit(&dataset, 1)).await.unwrap();
    wait_until("b receives 1", || b.handler.has(&dataset, 1)).await;
    let (resyncs_a, resyncs_b) = (a.handler.resyncs(), b.handler.resyncs());

    redis.kill();
    wait_degraded(&a).await;
    wait_degraded(&b).await;
    // Writes go on: the local handler still gets the event, the caller learns it did not
    // reach the others.
    let result = a.broker.publish(commit(&dataset, 2)).await;
    assert!(
        matches!(result, Err(FanoutError::Unavailable(_))),
        "{result:?}"
    );
    assert!(a.handler.has(&dataset, 2));
    // Subscribing during the outage does not wait for Redis.
    tokio::time::timeout(Duration::from_secs(2), b.broker.subscribe(&joined))
        .await
        .expect("subscribe does not block while degraded")
        .unwrap();

    redis.restart().await;
    wait_up(&a).await;
    wait_up(&b).await;
    // Whether A's re-publish of 2 reaches B depends on which node reconnected first; B's
    // resync (a store read in the gateway) is what covers it here. The re-publish itself is
    // checked where only one node loses Redis (the proxy tests below).
    wait_until("both nodes resync", || {
        a.handler.resyncs() > resyncs_a && b.handler.resyncs() > resyncs_b
    })
    .await;
    // Channels are subscribed again, including the one asked for during the outage.
    b.broker.publish(commit(&dataset, 3)).await.unwrap();
    wait_until("a receives 3", || a.handler.has(&dataset, 3)).await;
    a.broker.publish(commit(&joined, 1)).await.unwrap();
    wait_until("b receives joined", || b.handler.has(&joined, 1)).await;

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_starts_degraded_without_redis_and_recovers_when_it_starts() {
    let port = PrivateRedis::free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let prefix = unique_prefix();
    let a = node(&url, &prefix);
    assert!(matches!(a.broker.health(), BrokerHealth::Degraded(_)));
    let dataset = key("u1", "notes");
    tokio::time::timeout(Duration::from_secs(2), a.broker.subscribe(&dataset))
        .await
        .expect("subscribe does not block while degraded")
        .unwrap();
    let result = a.broker.publish(commit(&dataset, 1)).await;
    assert!(
        matches!(result, Err(FanoutError::Unavailable(_))),
        "{result:?}"
    );
    assert!(a.handler.has(&dataset, 1));
    assert!(matches!(a.broker.health(), BrokerHealth::Degraded(_)));

    let _redis = PrivateRedis::start_on(port).await;
    wait_up(&a).await;
    wait_until("a resyncs", || a.handler.resyncs() >= 1).await;
    let b = node(&url, &prefix);
    wait_up(&b).await;
    b.broker.publish(commit(&dataset, 2)).await.unwrap();
    wait_until("a receives 2", || a.handler.has(&dataset, 2)).await;

    a.broker.close().await;
    b.broker.close().await;
}

/// One node loses Redis (the proxy cuts or freezes its path) while the other stays up.
async fn one_node_partitioned(path: Path) {
    let proxy = Proxy::start("127.0.0.1:6379").await;
    let prefix = unique_prefix();
    let (a, b) = (node(&proxy.url(), &prefix), node(SHARED_REDIS, &prefix));
    wait_up(&a).await;
    wait_up(&b).await;
    let dataset = key("u1", "notes");
    a.broker.subscribe(&dataset).await.unwrap();
    b.broker.subscribe(&dataset).await.unwrap();
    let resyncs_a = a.handler.resyncs();

    proxy.take_away(path).await;
    // Published before the broker noticed: the command times out instead of hanging.
    let started = Instant::now();
    let result = a.broker.publish(commit(&dataset, 1)).await;
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "publish blocked for {:?}",
        started.elapsed()
    );
    assert!(
        matches!(result, Err(FanoutError::Unavailable(_))),
        "{result:?}"
    );
    wait_degraded(&a).await;
    assert_eq!(b.broker.health(), BrokerHealth::Up);
    assert!(a.handler.has(&dataset, 1), "local delivery goes on");
    // Meanwhile B commits something A cannot hear about.
    b.broker.publish(commit(&dataset, 2)).await.unwrap();

    proxy.set(Path::Open);
    wait_up(&a).await;
    // The commit A could not publish reaches B after A's reconnect...
    wait_until("b receives the re-published 1", || {
        b.handler.has(&dataset, 1)
    })
    .await;
    assert_eq!(
        b.handler
            .commits(&dataset)
            .iter()
            .filter(|s| **s == 1)
            .count(),
        1
    );
    // ...and A resyncs from the store for what it missed (2 is not re-sent by B).
    wait_until("a resyncs", || a.handler.resyncs() > resyncs_a).await;
    assert!(!a.handler.has(&dataset, 2));
    // A's channel is subscribed again.
    b.broker.publish(commit(&dataset, 3)).await.unwrap();
    wait_until("a receives 3", || a.handler.has(&dataset, 3)).await;

    a.broker.close().await;
    b.broker.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_one_node_cut_off_republishes_its_failed_events_after_reconnect() {
    one_node_partitioned(Path::Cut).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redis_silent_partition_is_detected_by_ping_and_recovered() {
    one_node_partitioned(Path::Frozen).await;
}
