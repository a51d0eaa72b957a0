//! The fault suite: one scenario per fault, each against real `tandem` nodes, a real
//! PostgreSQL and a real Redis. Writers update keys through the Rust client and record every
//! write the server acknowledged; subscribers watch the same datasets, on another node where
//! there is one; `/ready` is polled on every node. The fault is injected mid-load and then
//! undone, the load goes on, and the suite checks what a user would: every acknowledged write
//! is in the store at its acknowledged value or a later one, and every subscriber ends at the
//! store's final state. The results are a table, printed and written to
//! `<target dir>/fault-suite.md` (CI prints that file after the tests).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_client::{ClientError, Connection, UpdateResult};
use tandem_protocol::{DatasetRef, Patch, Record, ServerFrame};
use tandem_tests::cluster::{PgDatabase, PgSchema, RedisServer, redis_url, start_nodes, unique};
use tandem_tests::{TestServer, try_http_status};
use tokio::sync::watch;
use tokio::task::{JoinHandle, block_in_place};
use tokio::time::Instant;

/// Every writer and subscriber is this identity, working on its own datasets.
const OWNER: &str = "owner";
const DATASETS: [&str; 2] = ["alpha", "beta"];
const WRITERS: usize = 3;
/// Each writer cycles through its own keys, so later writes replace earlier ones and a key's
/// stored value can be checked against the last one acknowledged.
const KEYS_PER_WRITER: u64 = 8;
/// Acknowledged writes wanted before each fault, during it where writes can succeed, and
/// again after recovery.
const WRITES_PER_PHASE: usize = 50;
/// Bounds on every loop, whatever a scenario does: a writer's attempts, a subscriber's
/// reconnects, a watcher's polls.
const MAX_ATTEMPTS: u64 = 3_000;
const MAX_RECONNECTS: usize = 400;
const MAX_POLLS: usize = 2_400;
/// Limits that let a failing run still print its table before nextest's slow-timeout (3
/// minutes) ends the test: a scenario normally takes a few seconds.
const SCENARIO_LIMIT: Duration = Duration::from_secs(60);
const SUITE_BUDGET: Duration = Duration::from_secs(150);
/// The longest any single wait in a scenario may take.
const WAIT: Duration = Duration::from_secs(20);
/// How long subscribers get to reach the final state once the load has stopped (they
/// normally have it already).
const CONVERGE: Duration = Duration::from_secs(10);
/// A request without an answer this long counts as lost; the client drops the connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Writers pause between writes so that the load leaves CPU to the nodes on a small machine.
const PACE: Duration = Duration::from_millis(5);
/// The pause before a retry after a refusal or a lost connection.
const RETRY: Duration = Duration::from_millis(50);
const READY_POLL: Duration = Duration::from_millis(50);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_faults_lose_no_acknowledged_write_and_every_subscriber_converges() {
    type Scenario = Pin<Box<dyn Future<Output = Outcome> + Send>>;
    let scenarios: Vec<(&str, Scenario)> = vec![
        (
            "SIGKILL mid-write (SQLite node)",
            Box::pin(sigkill_sqlite()),
        ),
        (
            "SIGKILL mid-write (1 of 2 PostgreSQL nodes)",
            Box::pin(sigkill_cluster_node()),
        ),
        ("Redis SIGKILL, then restarted", Box::pin(redis_sigkill())),
        ("Redis SIGSTOP, then SIGCONT", Box::pin(redis_sigstop())),
        (
            "PostgreSQL connections refused, then allowed",
            Box::pin(postgres_refused()),
        ),
        ("disk full (4 MiB tmpfs, SQLite)", Box::pin(disk_full())),
        (
            "SIGTERM under load (1 of 2 nodes), restarted",
            Box::pin(sigterm_under_load()),
        ),
    ];
    let mut rows = Vec::new();
    let suite_deadline = Instant::now() + SUITE_BUDGET;
    for (fault, scenario) in scenarios {
        // Each scenario runs as its own task, within its own time, so that one that panics or
        // hangs is a failed row and the table still shows the others.
        let outcome = if Instant::now() >= suite_deadline {
            Outcome::Failed("not run: the suite's time was spent".to_owned())
        } else {
            let mut task = tokio::spawn(scenario);
            let limit = suite_deadline.min(Instant::now() + SCENARIO_LIMIT);
            match tokio::time::timeout_at(limit, &mut task).await {
                Ok(Ok(outcome)) => outcome,
                Ok(Err(e)) => Outcome::Failed(panic_message(e)),
                Err(_) => {
                    task.abort();
                    Outcome::Failed("timed out".to_owned())
                }
            }
        };
        rows.push((fault, outcome));
    }

    let table = render(&rows);
    println!("{table}");
    let path = report_path();
    if let Err(e) = std::fs::write(&path, &table) {
        println!("could not write {}: {e}", path.display());
    }
    for (fault, outcome) in &rows {
        assert!(outcome.passed(), "{fault} failed:\n{table}");
    }
}

// ---- Scenarios ----

async fn sigkill_sqlite() -> Outcome {
    let mut server = block_in_place(TestServer::start);
    let (run, reader) = Run::on_one(&server).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    // Writers always have a request in flight: this kill lands mid-write.
    block_in_place(|| server.kill());
    // Down until a writer has lost an answer and `/ready` has gone unanswered.
    let noticed = run
        .hold_until(|run| {
            run.tally.unanswered.load(Ordering::Relaxed) > 0 && run.ready_is(0, "down")
        })
        .await;
    block_in_place(|| server.start_again());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let mut notes = vec!["restarted on the same data dir".to_owned()];
    if !noticed {
        notes.push("the kill went unnoticed".to_owned());
    }
    run.finish(&reader, notes).await
}

async fn sigkill_cluster_node() -> Outcome {
    let schema = PgSchema::create();
    let mut nodes = block_in_place(|| start_nodes(2, &schema.url, &schema.name, &redis_url()));
    let (run, reader) = Run::on_two(&nodes, Writers::FailOver).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    block_in_place(|| nodes[0].kill());
    // The writers fail over to the other node and go on there.
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    block_in_place(|| nodes[0].start_again());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    run.finish(
        &reader,
        vec!["clients failed over, node restarted".to_owned()],
    )
    .await
}

async fn redis_sigkill() -> Outcome {
    let schema = PgSchema::create();
    let mut redis = block_in_place(RedisServer::start);
    let nodes = block_in_place(|| start_nodes(2, &schema.url, &schema.name, &redis.url()));
    let (run, reader) = Run::on_two(&nodes, Writers::FirstNodeOnly).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    block_in_place(|| redis.kill());
    let at_fault = run.acked();
    let held = run
        .hold_until(|run| run.all_ready_are("503") && run.acked() >= at_fault + WRITES_PER_PHASE)
        .await;
    block_in_place(|| redis.start_again());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let notes = outage_notes(&run, held, at_fault);
    run.finish(&reader, notes).await
}

async fn redis_sigstop() -> Outcome {
    let schema = PgSchema::create();
    let redis = block_in_place(RedisServer::start);
    let nodes = block_in_place(|| start_nodes(2, &schema.url, &schema.name, &redis.url()));
    let (run, reader) = Run::on_two(&nodes, Writers::FirstNodeOnly).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    // A hung Redis: its sockets stay open and nothing answers.
    redis.pause();
    let at_fault = run.acked();
    let held = run
        .hold_until(|run| run.all_ready_are("503") && run.acked() >= at_fault + WRITES_PER_PHASE)
        .await;
    redis.resume();
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let notes = outage_notes(&run, held, at_fault);
    run.finish(&reader, notes).await
}

async fn postgres_refused() -> Outcome {
    let db = block_in_place(PgDatabase::create);
    let schema = unique("s");
    let nodes = block_in_place(|| start_nodes(2, &db.url, &schema, &redis_url()));
    let (run, reader) = Run::on_two(&nodes, Writers::FailOver).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    block_in_place(|| db.cut_off());
    let held = run
        .hold_until(|run| run.all_ready_are("503") && run.tally.refused() > 0)
        .await;
    block_in_place(|| db.restore());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let mut notes = vec![];
    if !held {
        notes.push("503 on every node and a refusal not both seen".to_owned());
    }
    run.finish(&reader, notes).await
}

async fn disk_full() -> Outcome {
    if !running_as_root() {
        return Outcome::Skipped("skipped (not root)".to_owned());
    }
    let tmpfs = match block_in_place(|| Tmpfs::mount("4m")) {
        Ok(tmpfs) => tmpfs,
        Err(e) => return Outcome::Skipped(format!("skipped ({e})")),
    };
    let data_dir = tempfile::tempdir_in(tmpfs.path()).expect("data dir on the tmpfs");
    let server = block_in_place(|| TestServer::builder().data_dir(data_dir).start());
    let (run, reader) = Run::on_one(&server).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    let filler = tmpfs.path().join("filler");
    let filled = block_in_place(|| fill(&filler));
    let failed_before = run.tally.refused();
    // A store that cannot commit refuses writes as retriable and is not ready.
    let held = run
        .hold_until(|run| run.tally.refused() >= failed_before + 3 && run.all_ready_are("503"))
        .await;
    let codes: Vec<String> = run.tally.refused.lock().unwrap().keys().cloned().collect();
    std::fs::remove_file(&filler).expect("free the tmpfs");
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let mut notes = vec![format!("filled with {} KiB", filled >> 10)];
    if !held {
        notes.push("refused writes and /ready 503 not both seen while full".to_owned());
    }
    let outcome = run.finish(&reader, notes).await;
    drop(server);
    drop(tmpfs);
    if !held || codes.iter().any(|code| code != "unavailable") {
        return Outcome::Failed(format!(
            "a full disk must refuse writes with unavailable only and make /ready 503: refused with {codes:?}, {outcome:?}"
        ));
    }
    outcome
}

async fn sigterm_under_load() -> Outcome {
    let schema = PgSchema::create();
    let mut nodes = block_in_place(|| start_nodes(2, &schema.url, &schema.name, &redis_url()));
    let (run, reader) = Run::on_two(&nodes, Writers::FailOver).await;
    run.wait_for_acks(WRITES_PER_PHASE).await;
    let clean = block_in_place(|| nodes[0].terminate());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    block_in_place(|| nodes[0].start_again());
    run.wait_for_more_acks(WRITES_PER_PHASE).await;
    let mut notes = vec!["clients moved, node restarted".to_owned()];
    if !clean {
        notes.push("node did not exit 0".to_owned());
    }
    let outcome = run.finish(&reader, notes).await;
    // The drain delay: a load balancer sees 503 before the node stops listening.
    let drained =
        matches!(&outcome, Outcome::Ran(m) if m.ready.starts_with("node 1: 200→503→down"));
    if !drained {
        return Outcome::Failed(format!(
            "SIGTERM must drain (/ready 503) before the node goes: {outcome:?}"
        ));
    }
    outcome
}

fn outage_notes(run: &Run, held: bool, at_fault: usize) -> Vec<String> {
    let mut notes = vec![format!(
        "{} writes acknowledged during the outage",
        run.acked_at_recovery().saturating_sub(at_fault)
    )];
    if !held {
        notes.push("503 not seen on every node".to_owned());
    }
    notes
}

// ---- The load: writers, subscribers, `/ready` watchers ----

/// Where a client connects: a node's URL and a token for `OWNER`.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    token: String,
}

impl Endpoint {
    fn of(server: &TestServer) -> Endpoint {
        Endpoint {
            url: server.url(),
            token: server.token(OWNER),
        }
    }

    async fn connect(&self) -> Option<Connection> {
        let mut conn =
            tokio::time::timeout(REQUEST_TIMEOUT, Connection::connect(&self.url, &self.token))
                .await
                .ok()?
                .ok()?;
        conn.set_request_timeout(REQUEST_TIMEOUT);
        Some(conn)
    }
}

/// A write the server acknowledged.
#[derive(Debug, Clone)]
struct Ack {
    dataset: usize,
    key: String,
    /// The value written, a number that only grows per key.
    seq: u64,
    sync_count: u64,
}

impl Tally {
    fn refused(&self) -> usize {
        self.refused.lock().unwrap().values().sum()
    }
}

#[derive(Debug, Default)]
struct Tally {
    acks: Mutex<Vec<Ack>>,
    /// Writes the server answered with an error (nothing acknowledged), by error code.
    refused: Mutex<BTreeMap<String, usize>>,
    /// Writes whose answer never came (connection lost or timed out): outcome unknown.
    unanswered: AtomicUsize,
}

/// A subscriber's view of a dataset: the newest sync count it was told and the live records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct View {
    sync_count: u64,
    records: BTreeMap<String, String>,
}

impl View {
    fn of(sync_count: u64, records: &[Record]) -> View {
        View {
            sync_count,
            records: records
                .iter()
                .filter_map(|r| r.value.clone().map(|v| (r.key.clone(), v)))
                .collect(),
        }
    }
}

/// `/ready` on one node: the statuses seen, each change once (`down` when nothing answers).
struct ReadyWatch {
    seen: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl ReadyWatch {
    fn spawn(addr: SocketAddr) -> ReadyWatch {
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                for _ in 0..MAX_POLLS {
                    let status = match try_http_status(addr, "/ready").await {
                        Some(code) => code.to_string(),
                        None => "down".to_owned(),
                    };
                    {
                        let mut seen = seen.lock().unwrap();
                        if seen.last() != Some(&status) {
                            seen.push(status);
                        }
                    }
                    tokio::time::sleep(READY_POLL).await;
                }
            }
        });
        ReadyWatch { seen, task }
    }

    fn latest(&self) -> Option<String> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// Drops the history before the latest status (the start, before the load).
    fn forget_before_latest(&self) {
        let mut seen = self.seen.lock().unwrap();
        let keep = seen.len().saturating_sub(1);
        seen.drain(..keep);
    }

    fn transitions(&self) -> String {
        self.seen.lock().unwrap().join("→")
    }
}

/// Where writers go when their node does.
#[derive(Debug, Clone, Copy)]
enum Writers {
    /// To the other node, as clients behind a load balancer would.
    FailOver,
    /// Nowhere: they keep to the first node (for faults that leave it up).
    FirstNodeOnly,
}

/// One scenario's load, from start to the final check.
struct Run {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<()>>,
    subscribers: Vec<(JoinHandle<()>, watch::Receiver<View>)>,
    ready: Vec<ReadyWatch>,
    /// Acknowledged writes when the last phase began, for the notes.
    recovered_at: AtomicUsize,
}

impl Run {
    /// Watches `/ready` on `nodes` and, once every one is ready, starts the writers (each on
    /// `writer_endpoints`, first to last) and, for each dataset, one subscriber per entry of
    /// `subscriber_endpoints`.
    async fn start(
        writer_endpoints: Vec<Endpoint>,
        subscriber_endpoints: Vec<Vec<Endpoint>>,
        nodes: &[&TestServer],
    ) -> Run {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ready: Vec<ReadyWatch> = nodes.iter().map(|n| ReadyWatch::spawn(n.addr)).collect();
        // A node connects to Redis after it listens: the load starts on ready nodes, so the
        // transitions show the fault's, not the start's.
        let deadline = Instant::now() + WAIT;
        while !ready.iter().all(|r| r.latest().as_deref() == Some("200")) {
            assert!(Instant::now() < deadline, "the nodes never became ready");
            tokio::time::sleep(READY_POLL).await;
        }
        for r in &ready {
            r.forget_before_latest();
        }
        let mut subscribers = Vec::new();
        for dataset in 0..DATASETS.len() {
            for endpoints in &subscriber_endpoints {
                let (view_tx, view_rx) = watch::channel(View::default());
                let task = tokio::spawn(run_subscriber(endpoints.clone(), dataset, view_tx));
                subscribers.push((task, view_rx));
            }
        }
        let writers = (0..WRITERS)
            .map(|w| {
                tokio::spawn(run_writer(
                    w,
                    writer_endpoints.clone(),
                    tally.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        Run {
            tally,
            stop,
            writers,
            subscribers,
            ready,
            recovered_at: AtomicUsize::new(0),
        }
    }

    /// One node: writers and subscribers (two per dataset) on it; returns its endpoint, to
    /// read the store back through.
    async fn on_one(node: &TestServer) -> (Run, Endpoint) {
        let endpoint = Endpoint::of(node);
        let run = Run::start(
            vec![endpoint.clone()],
            vec![vec![endpoint.clone()]; 2],
            &[node],
        )
        .await;
        (run, endpoint)
    }

    /// Two nodes: writers on the first; for each dataset a subscriber on the second and one
    /// on the first, each falling back to the other node if its own goes away. Returns the
    /// second node's endpoint, to read the store back through.
    async fn on_two(nodes: &[TestServer], writers: Writers) -> (Run, Endpoint) {
        let (first, second) = (Endpoint::of(&nodes[0]), Endpoint::of(&nodes[1]));
        let writer_endpoints = match writers {
            Writers::FailOver => vec![first.clone(), second.clone()],
            Writers::FirstNodeOnly => vec![first.clone()],
        };
        let run = Run::start(
            writer_endpoints,
            vec![
                vec![second.clone(), first.clone()],
                vec![first.clone(), second.clone()],
            ],
            &[&nodes[0], &nodes[1]],
        )
        .await;
        (run, second)
    }

    fn acked(&self) -> usize {
        self.tally.acks.lock().unwrap().len()
    }

    fn acked_at_recovery(&self) -> usize {
        self.recovered_at.load(Ordering::Relaxed)
    }

    fn ready_is(&self, node: usize, status: &str) -> bool {
        self.ready[node].latest().as_deref() == Some(status)
    }

    fn all_ready_are(&self, status: &str) -> bool {
        self.ready
            .iter()
            .all(|r| r.latest().as_deref() == Some(status))
    }

    /// Polls `done` until it holds or `WAIT` passes; returns whether it held.
    async fn hold_until(&self, done: impl Fn(&Run) -> bool) -> bool {
        let deadline = Instant::now() + WAIT;
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    async fn wait_for_acks(&self, n: usize) -> bool {
        self.hold_until(|run| run.acked() >= n).await
    }

    /// Waits for `n` more acknowledged writes than now (the load goes on through or after
    /// the fault).
    async fn wait_for_more_acks(&self, n: usize) -> bool {
        let now = self.acked();
        self.recovered_at.store(now, Ordering::Relaxed);
        self.wait_for_acks(now + n).await
    }

    /// Stops the writers, waits for every node to be ready again, reads every dataset back
    /// through `reader`, counts acknowledged writes that are missing, and waits for every
    /// subscriber to reach the final state.
    async fn finish(mut self, reader: &Endpoint, mut notes: Vec<String>) -> Outcome {
        self.stop.store(true, Ordering::Relaxed);
        for writer in std::mem::take(&mut self.writers) {
            writer.await.expect("writer task");
        }
        if !self.hold_until(|run| run.all_ready_are("200")).await {
            notes.push("not every node ready again".to_owned());
        }
        let acks = self.tally.acks.lock().unwrap().clone();
        let finals = read_back(reader).await;

        let missing = acks
            .iter()
            .filter(|ack| {
                let stored = finals[ack.dataset]
                    .1
                    .iter()
                    .find(|r| r.key == ack.key)
                    .and_then(|r| Some((r.value.as_deref()?.parse::<u64>().ok()?, r.sync_count)));
                !matches!(stored, Some((seq, n)) if seq >= ack.seq && n >= ack.sync_count)
            })
            .count();

        let total = self.subscribers.len();
        let mut converged = 0;
        // One deadline for all: they converge (or not) at the same time, in their own tasks.
        let deadline = Instant::now() + CONVERGE;
        for (i, (task, mut view_rx)) in self.subscribers.into_iter().enumerate() {
            let want = &finals[i / (total / DATASETS.len())].0;
            let reached = tokio::time::timeout_at(deadline, view_rx.wait_for(|v| v == want)).await;
            if matches!(reached, Ok(Ok(_))) {
                converged += 1;
            }
            task.abort();
        }

        let ready = self
            .ready
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.task.abort();
                if self.ready.len() == 1 {
                    r.transitions()
                } else {
                    format!("node {}: {}", i + 1, r.transitions())
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        let refused = self.tally.refused.lock().unwrap().clone();
        notes.push(format!(
            "{} refused{}, {} unanswered",
            self.tally.refused(),
            if refused.is_empty() {
                String::new()
            } else {
                let codes: Vec<String> = refused.iter().map(|(c, n)| format!("{c} ×{n}")).collect();
                format!(" ({})", codes.join(", "))
            },
            self.tally.unanswered.load(Ordering::Relaxed)
        ));
        Outcome::Ran(Measured {
            acknowledged: acks.len(),
            missing,
            converged,
            subscribers: total,
            ready,
            notes: notes.join("; "),
        })
    }
}

/// Each dataset as the store has it after recovery: the final view and every record.
async fn read_back(reader: &Endpoint) -> Vec<(View, Vec<Record>)> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(conn) = reader.connect().await {
            let mut out = Vec::new();
            for name in DATASETS {
                match conn.changes(DatasetRef::own(name), 0).await {
                    Ok((n, records)) => out.push((View::of(n, &records), records)),
                    Err(_) => break,
                }
            }
            if out.len() == DATASETS.len() {
                return out;
            }
        }
        assert!(Instant::now() < deadline, "could not read the store back");
        tokio::time::sleep(RETRY).await;
    }
}

/// Writes `w{w}-k{n}` keys in turn into each dataset until told to stop, reconnecting
/// through `endpoints` in turn after a lost connection. A conflict means an earlier write
/// whose answer was lost did commit: the writer takes the server's sync count and goes on.
async fn run_writer(w: usize, endpoints: Vec<Endpoint>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    let mut conn: Option<Connection> = None;
    let mut next_endpoint = 0;
    let mut seen: BTreeMap<(usize, String), u64> = BTreeMap::new();
    for seq in 0..MAX_ATTEMPTS {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        tokio::time::sleep(PACE).await;
        if conn.is_none() {
            conn = endpoints[next_endpoint % endpoints.len()].connect().await;
            if conn.is_none() {
                next_endpoint += 1;
                tokio::time::sleep(RETRY).await;
                continue;
            }
        }
        let Some(c) = conn.as_ref() else { continue };
        let dataset = (seq % DATASETS.len() as u64) as usize;
        let key = format!("w{w}-k{}", (seq / 2) % KEYS_PER_WRITER);
        let base = seen.get(&(dataset, key.clone())).copied().unwrap_or(0);
        let patch = Patch::replace(key.clone(), seq.to_string(), base);
        match c
            .update(DatasetRef::own(DATASETS[dataset]), None, vec![patch])
            .await
        {
            Ok(UpdateResult::Committed {
                sync_count,
                records,
            }) => {
                let stamped = records
                    .iter()
                    .find(|r| r.key == key)
                    .map_or(sync_count, |r| r.sync_count);
                seen.insert((dataset, key.clone()), stamped);
                tally.acks.lock().unwrap().push(Ack {
                    dataset,
                    key,
                    seq,
                    sync_count: stamped,
                });
            }
            Ok(UpdateResult::Conflict { conflicts, .. }) => {
                let current = conflicts
                    .iter()
                    .find(|c| c.key == key)
                    .and_then(|c| c.server.as_ref())
                    .map_or(0, |r| r.sync_count);
                seen.insert((dataset, key), current);
            }
            Err(ClientError::Server { code, .. }) => {
                *tally
                    .refused
                    .lock()
                    .unwrap()
                    .entry(code.to_string())
                    .or_default() += 1;
                tokio::time::sleep(RETRY).await;
            }
            Err(_) => {
                tally.unanswered.fetch_add(1, Ordering::Relaxed);
                conn = None;
                next_endpoint += 1;
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Keeps `view_tx` at the newest state of one dataset: a snapshot at subscribe, then every
/// push; after a lost connection it subscribes again through the next endpoint, as a client
/// behind a load balancer would.
async fn run_subscriber(endpoints: Vec<Endpoint>, dataset: usize, view_tx: watch::Sender<View>) {
    let dataset = DatasetRef::own(DATASETS[dataset]);
    let advance = |view: View| {
        view_tx.send_if_modified(|current| {
            let newer = view.sync_count >= current.sync_count && view != *current;
            if newer {
                *current = view;
            }
            newer
        });
    };
    for attempt in 0..MAX_RECONNECTS {
        if attempt > 0 {
            tokio::time::sleep(RETRY).await;
        }
        let Some(mut conn) = endpoints[attempt % endpoints.len()].connect().await else {
            continue;
        };
        let Ok((n, records)) = conn.subscribe(dataset.clone()).await else {
            continue;
        };
        advance(View::of(n, &records));
        while let Some(frame) = conn.next_event().await {
            if let ServerFrame::Dataset {
                sync_count,
                records,
                ..
            } = frame
            {
                advance(View::of(sync_count, &records));
            }
        }
    }
}

// ---- Disk full ----

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A tmpfs of a given size, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, so that a file still open cannot leave the mount behind.
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes zeros to `path` until the file system is full; returns the bytes written.
fn fill(path: &std::path::Path) -> u64 {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("filler file");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0;
    // Bounded: a 4 MiB tmpfs is full after 64 chunks.
    for _ in 0..1_000 {
        match file.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => written += n as u64,
        }
    }
    // Page-cache pages still count on tmpfs: make sure the last partial writes are in.
    let _ = file.sync_all();
    written
}

// ---- The table ----

#[derive(Debug)]
struct Measured {
    acknowledged: usize,
    missing: usize,
    converged: usize,
    subscribers: usize,
    ready: String,
    notes: String,
}

#[derive(Debug)]
enum Outcome {
    Ran(Measured),
    Skipped(String),
    Failed(String),
}

impl Outcome {
    fn passed(&self) -> bool {
        match self {
            Outcome::Ran(m) => m.missing == 0 && m.converged == m.subscribers,
            Outcome::Skipped(_) => true,
            Outcome::Failed(_) => false,
        }
    }
}

fn render(rows: &[(&str, Outcome)]) -> String {
    let mut out = String::from(
        "## Fault suite\n\n\
         | fault | acknowledged writes | missing after recovery | subscribers converged \
         | /ready transitions | result | notes |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (fault, outcome) in rows {
        let line = match outcome {
            Outcome::Ran(m) => format!(
                "| {fault} | {} | {} | {}/{} | {} | {} | {} |",
                m.acknowledged,
                m.missing,
                m.converged,
                m.subscribers,
                m.ready,
                if outcome.passed() { "pass" } else { "FAIL" },
                m.notes
            ),
            Outcome::Skipped(why) => format!("| {fault} | - | - | - | - | {why} | |"),
            Outcome::Failed(why) => {
                format!(
                    "| {fault} | - | - | - | - | FAIL | {} |",
                    why.replace('\n', " ")
                )
            }
        };
        let _ = writeln!(out, "{line}");
    }
    out
}

fn panic_message(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panicked".to_owned()),
        Err(e) => e.to_string(),
    }
}

/// `<target dir>/fault-suite.md`: the test runs from `<target dir>/<profile>/deps/`.
fn report_path() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.ancestors()
        .nth(3)
        .map_or_else(std::env::temp_dir, PathBuf::from)
        .join("fault-suite.md")
}
