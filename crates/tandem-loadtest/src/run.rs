//! The parts every scenario uses: the run's context (gateways, tokens, prefix, shared
//! counters), setting up many connections at a bounded rate, the progress line, driving the
//! connection tasks through the sending window and the drain, and assembling the report.

use crate::cli::{Cli, Common};
use crate::client::{self, ClientPlan, Shared};
use crate::conn::{self, Fail, Kind, Ws};
use crate::error::LoadError;
use crate::host::{self, CpuMeter};
use crate::ledger::WriteLedger;
use crate::marker;
use crate::report::{
    self, Connections, Deliveries, Generator, Latency, Reads, Report, Server, Writes,
};
use crate::stats::Stats;
use crate::token::Tokens;
use parking_lot::Mutex;
use std::future::Future;
use std::io::{IsTerminal, Write as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tandem_protocol::{Access, ClientFrame, DatasetRef, Patch, RequestId};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Writes one writer may be scheduled to send in a run; bounds the ledger's memory.
pub const MAX_WRITES_PER_WRITER: f64 = 10_000_000.0;

/// The run's context, handed to the scenario.
#[derive(Debug)]
pub struct Run {
    pub common: Common,
    pub urls: Vec<String>,
    pub tokens: Tokens,
    pub prefix: String,
    pub seed: u64,
    pub shared: Arc<Shared>,
    phase: Arc<Mutex<&'static str>>,
    cpu: CpuMeter,
    progress: Option<(JoinHandle<()>, tokio_util::sync::CancellationToken)>,
    /// Connections the scenario wants and the set-up phase's wall time.
    target: u64,
    setup_seconds: f64,
    failed: u64,
    memory: Option<host::MemorySource>,
    rss_start: Option<u64>,
    rss_connected: Option<u64>,
    /// The servers' CPU times and the clock (ns) at the first measured send, then what they
    /// used up to the end of the drain and the window's length in seconds.
    server_cpu_from: Option<(host::CpuTimes, u64)>,
    server_cpu_used: Option<(host::CpuTimes, f64)>,
}

impl Run {
    /// Checks the common options, reads or prepares tokens, picks the prefix and seed.
    pub fn new(cli: &Cli) -> Result<Run, LoadError> {
        let common = cli.common.clone();
        if common.urls.is_empty() {
            return Err(LoadError::Options("give at least one --url".into()));
        }
        if !(common.connect_rate >= 0.0 && common.connect_rate.is_finite()) {
            return Err(LoadError::Options(
                "--connect-rate must be 0 or a positive number".into(),
            ));
        }
        if common.connect_concurrency == 0 {
            return Err(LoadError::Options(
                "--connect-concurrency must be at least 1".into(),
            ));
        }
        let prefix = match &common.prefix {
            Some(p) => {
                let ok = !p.is_empty()
                    && p.len() <= 64
                    && p.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c));
                if !ok {
                    return Err(LoadError::Options(
                        "--prefix must be 1-64 characters of [a-zA-Z0-9_.:-]".into(),
                    ));
                }
                p.clone()
            }
            None => format!("lt{:08x}", rand::random::<u32>()),
        };
        let idle = match &cli.scenario {
            crate::cli::Scenario::Idle(a) => a.idle_for,
            _ => Duration::ZERO,
        };
        let run_time = common.warmup + common.duration + common.drain + idle;
        let ttl = (run_time + Duration::from_secs(600)).max(Duration::from_secs(3600));
        // Cognito writers get their credentials from the node, not from a token.
        let tokens = match &cli.scenario {
            crate::cli::Scenario::Cognito(_) => Tokens::File(vec![String::new()]),
            _ => Tokens::from_options(&common, ttl)?,
        };
        let urls = common.urls.iter().map(|u| conn::normalize_url(u)).collect();
        let seed = common.seed.unwrap_or_else(rand::random);
        let shared = Arc::new(Shared::default());
        let phase = Arc::new(Mutex::new("setup"));
        let progress = (!common.quiet).then(|| spawn_progress(shared.clone(), phase.clone()));
        let memory = match (common.server_pid.as_slice(), &common.server_metrics) {
            ([_, ..], _) => Some(host::MemorySource::Pids(common.server_pid.clone())),
            ([], Some(url)) if url.starts_with("http://") => {
                Some(host::MemorySource::Metrics(url.clone()))
            }
            ([], Some(url)) => {
                return Err(LoadError::Options(format!(
                    "--server-metrics must be an http:// URL, not `{url}`"
                )));
            }
            ([], None) => None,
        };
        if let Some(pid) = common
            .server_pid
            .iter()
            .find(|&&pid| host::cpu_times(&[pid]).is_none())
        {
            return Err(LoadError::Options(format!(
                "--server-pid {pid}: no such process on this machine (/proc/{pid}/stat)"
            )));
        }
        let rss_start = memory.as_ref().and_then(host::MemorySource::rss_kib);
        if let (Some(host::MemorySource::Metrics(url)), None) = (&memory, rss_start) {
            return Err(LoadError::Options(format!(
                "--server-metrics {url}: no process_resident_memory_bytes there (is it a \
                 tandem node's /metrics, reachable over plain http?)"
            )));
        }
        Ok(Run {
            common,
            urls,
            tokens,
            prefix,
            seed,
            shared,
            phase,
            cpu: CpuMeter::start(),
            progress,
            target: 0,
            setup_seconds: 0.0,
            failed: 0,
            memory,
            rss_start,
            rss_connected: None,
            server_cpu_from: None,
            server_cpu_used: None,
        })
    }

    /// How every connection opens and authenticates: the features the options ask for.
    pub fn connect_options(&self) -> conn::ConnectOptions {
        conn::ConnectOptions {
            features: self.common.features(),
            recv_buffer: None,
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    pub fn url(&self, slot: usize) -> &str {
        &self.urls[slot % self.urls.len()]
    }

    pub fn token(&self, slot: usize, identity: &str) -> Result<String, LoadError> {
        self.tokens.token(slot, identity)
    }

    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock() = phase;
    }

    /// Rejects a rate that is not positive or schedules too many writes.
    pub fn check_rate(&self, rate: f64) -> Result<(), LoadError> {
        if !(rate > 0.0 && rate.is_finite()) {
            return Err(LoadError::Options(
                "--rate must be a positive number".into(),
            ));
        }
        let writes = rate * (self.common.warmup + self.common.duration).as_secs_f64();
        if writes > MAX_WRITES_PER_WRITER {
            return Err(LoadError::Options(format!(
                "--rate x (--warmup + --duration) schedules {writes:.0} writes per writer; at most {MAX_WRITES_PER_WRITER:.0}"
            )));
        }
        Ok(())
    }

    /// Sets up `n` connections with `open(slot)`, at most `--connect-concurrency` at once
    /// and at `--connect-rate` when set; slots not started by `deadline` are skipped.
    /// Records each success's time in the set-up histogram. Results are in slot order.
    pub async fn open_many<T, F, Fut>(
        &mut self,
        n: usize,
        deadline: Option<Instant>,
        open: F,
    ) -> Vec<Option<T>>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = Result<T, Fail>> + Send + 'static,
        T: Send + 'static,
    {
        self.target += n as u64;
        let started = Instant::now();
        let semaphore = Arc::new(Semaphore::new(self.common.connect_concurrency));
        let rate = self.common.connect_rate;
        let mut handles = Vec::with_capacity(n);
        for slot in 0..n {
            let future = open(slot);
            let semaphore = semaphore.clone();
            let shared = self.shared.clone();
            handles.push(tokio::spawn(async move {
                let scheduled =
                    (rate > 0.0).then(|| started + Duration::from_secs_f64(slot as f64 / rate));
                if let Some(at) = scheduled {
                    tokio::time::sleep_until(at.into()).await;
                }
                let _permit = semaphore.acquire_owned().await.ok()?;
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    shared.stats.error("not_attempted");
                    return None;
                }
                let began = scheduled.unwrap_or_else(Instant::now);
                let result = match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), future)
                        .await
                        .unwrap_or_else(|_| Err(Fail::new("connect_timeout", "run deadline"))),
                    None => future.await,
                };
                match result {
                    Ok(value) => {
                        shared
                            .stats
                            .setup
                            .record(slot, crate::stats::saturating_ns(began.elapsed()));
                        Stats::add(&shared.stats.established, 1);
                        Some(value)
                    }
                    Err(fail) => {
                        shared.stats.error(&fail.code);
                        None
                    }
                }
            }));
        }
        let mut results = Vec::with_capacity(n);
        for handle in handles {
            results.push(handle.await.ok().flatten());
        }
        self.failed += results.iter().filter(|r| r.is_none()).count() as u64;
        self.setup_seconds += started.elapsed().as_secs_f64();
        results
    }

    /// Counts connections that were set up but failed a later setup step (subscribe).
    pub fn count_failed(&mut self, n: usize) {
        self.failed += n as u64;
    }

    /// The server's memory now, when --server-pid is given.
    pub fn server_rss(&self) -> Option<u64> {
        self.memory.as_ref().and_then(host::MemorySource::rss_kib)
    }

    /// Notes the server's memory once every connection is set up.
    pub fn connected(&mut self) {
        self.rss_connected = self.memory.as_ref().and_then(host::MemorySource::rss_kib);
    }

    /// Starts the server CPU window (with --server-pid): call at the first measured send.
    pub fn server_cpu_start(&mut self) {
        let now = self.shared.clock.now();
        self.server_cpu_from = host::cpu_times(&self.common.server_pid).map(|t| (t, now));
    }

    /// Ends the server CPU window: call when the drain ends, before connections close.
    pub fn server_cpu_end(&mut self) {
        let now = self.shared.clock.now();
        self.server_cpu_used = match (
            self.server_cpu_from,
            host::cpu_times(&self.common.server_pid),
        ) {
            (Some((from, at)), Some(to)) => {
                Some((from.until(to), now.saturating_sub(at) as f64 / 1e9))
            }
            _ => None,
        };
    }

    /// Runs the connection tasks through the sending window (which ends at `window_end`,
    /// ns on the run's clock) and the drain, then stops them. Returns once every task ended,
    /// with the server's memory just before they were stopped.
    pub async fn drive(
        &mut self,
        clients: Vec<(ClientPlan, Ws)>,
        ledgers: &[Arc<WriteLedger>],
        window_start: u64,
        window_end: u64,
    ) -> Option<u64> {
        let shared = self.shared.clone();
        let writers = clients.iter().filter(|(p, _)| p.writer.is_some()).count();
        shared.writers_open.store(writers, Ordering::Release);
        let tasks: Vec<JoinHandle<()>> = clients
            .into_iter()
            .map(|(plan, ws)| tokio::spawn(client::run(plan, ws, shared.clone())))
            .collect();
        let clock = shared.clock;
        if clock.now() < window_start {
            self.set_phase("warmup");
            tokio::time::sleep_until(clock.instant(window_start).into()).await;
        }
        self.set_phase("run");
        self.server_cpu_start();
        tokio::time::sleep_until(clock.instant(window_end).into()).await;
        self.set_phase("drain");
        let hard = clock.instant(window_end) + self.common.drain;
        loop {
            if shared.writers_open.load(Ordering::Acquire) == 0 {
                shared.writers_done.cancel();
                let expected: u64 = ledgers.iter().map(|l| l.expected_deliveries()).sum();
                if Stats::get(&shared.stats.delivered) >= expected {
                    break;
                }
            }
            if Instant::now() >= hard {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if !shared.writers_done.is_cancelled() {
            // The drain ran out with writers still waiting for replies: end them, then let
            // the subscribers settle what they covered.
            shared.stop_writes.cancel();
            let until = Instant::now() + Duration::from_secs(2);
            while shared.writers_open.load(Ordering::Acquire) > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            shared.writers_done.cancel();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.server_cpu_end();
        let rss_end = self.server_rss();
        self.finish_tasks(tasks).await;
        rss_end
    }

    /// Stops every connection task and waits for them (bounded).
    pub async fn finish_tasks(&mut self, tasks: Vec<JoinHandle<()>>) {
        self.set_phase("closing");
        self.shared.stop.cancel();
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(until, task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// The report; `writes` and `deliveries` say which sections the scenario has.
    pub async fn report(
        mut self,
        scenario: &crate::cli::Scenario,
        measured: Duration,
        ledgers: &[Arc<WriteLedger>],
        writes: bool,
        deliveries: bool,
        rss_end: Option<u64>,
    ) -> Report {
        if let Some((task, stop)) = self.progress.take() {
            stop.cancel();
            let _ = task.await;
        }
        let stats = &self.shared.stats;
        let secs = measured.as_secs_f64();
        let per_second = |n: u64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
        let established_at_setup = self.target - self.failed;
        let writes = writes.then(|| {
            let acked = Stats::get(&stats.acked);
            Writes {
                sent: Stats::get(&stats.sent),
                acked,
                conflicts: Stats::get(&stats.conflicts),
                unsent: Stats::get(&stats.unsent),
                unknown_outcome: Stats::get(&stats.unknown_outcome),
                commits_per_second: per_second(acked),
                commit_latency_ms: Latency::from_histogram(&stats.commit.merged()),
            }
        });
        let deliveries = deliveries.then(|| {
            let expected: u64 = ledgers.iter().map(|l| l.expected_deliveries()).sum();
            let received = Stats::get(&stats.delivered);
            let subscribers = Stats::get(&stats.subscribers);
            let push_frames = Stats::get(&stats.push_frames);
            let push_bytes = Stats::get(&stats.push_bytes);
            let ratio = |n: u64, d: u64| if d > 0 { n as f64 / d as f64 } else { 0.0 };
            Deliveries {
                expected,
                received,
                lost: expected.saturating_sub(received),
                per_second: per_second(received),
                subscribers,
                push_frames,
                push_bytes,
                delta_frames: Stats::get(&stats.delta_frames),
                push_frames_per_subscriber: ratio(push_frames, subscribers),
                push_bytes_per_subscriber: ratio(push_bytes, subscribers),
                bytes_per_push: ratio(push_bytes, push_frames),
                snapshot_frames: Stats::get(&stats.snapshot_frames),
                snapshot_bytes: Stats::get(&stats.snapshot_bytes),
                at_final_sync_count: Stats::get(&stats.subscribers_final),
                slow_readers: Stats::get(&stats.slow_subscribers),
                slow_at_final_sync_count: Stats::get(&stats.slow_subscribers_final),
                latency_ms: Latency::from_histogram(&stats.delivery.merged()),
                first_latency_ms: {
                    let mut first = crate::stats::new_histogram();
                    for ledger in ledgers {
                        ledger.record_first_deliveries(&mut first);
                    }
                    Latency::from_histogram(&first)
                },
            }
        });
        let lists_sent = Stats::get(&stats.lists_sent);
        let reads = (lists_sent > 0).then(|| {
            let ok = Stats::get(&stats.lists_ok);
            Reads {
                sent: lists_sent,
                ok,
                per_second: per_second(ok),
                latency_ms: Latency::from_histogram(&stats.list.merged()),
            }
        });
        let cpu = self.server_cpu_used.map(|(used, window)| {
            report::ServerCpu::new(
                used.user,
                used.system,
                window,
                deliveries.as_ref().map(|d| d.received),
                writes.as_ref().map(|w| w.acked),
            )
        });
        let server = self.memory.as_ref().map(|memory| Server {
            pids: match memory {
                host::MemorySource::Pids(pids) => pids.clone(),
                host::MemorySource::Metrics(_) => Vec::new(),
            },
            metrics: match memory {
                host::MemorySource::Metrics(url) => Some(url.clone()),
                host::MemorySource::Pids(_) => None,
            },
            cpu,
            rss_start_kib: self.rss_start,
            rss_connected_kib: self.rss_connected,
            rss_end_kib: rss_end,
            rss_per_connection_bytes: match (self.rss_start, self.rss_connected) {
                (Some(a), Some(b)) if established_at_setup > 0 => {
                    Some((b as f64 - a as f64) * 1024.0 / established_at_setup as f64)
                }
                _ => None,
            },
        });
        let (cpu_seconds, wall_seconds, cpu_percent) = self.cpu.read();
        Report {
            scenario: scenario.name().to_owned(),
            params: serde_json::to_value(scenario).unwrap_or_default(),
            prefix: self.prefix.clone(),
            seed: self.seed,
            urls: self.urls.clone(),
            measured_seconds: secs,
            features: (!matches!(scenario, crate::cli::Scenario::Cognito(_))).then(|| {
                report::Features {
                    asked: self.common.features(),
                    accepted: stats.features(),
                }
            }),
            connections: Connections {
                target: self.target,
                established: established_at_setup,
                failed: self.failed,
                reconnects: Stats::get(&stats.reconnects),
                setup_seconds: self.setup_seconds,
                setup_per_second: if self.setup_seconds > 0.0 {
                    established_at_setup as f64 / self.setup_seconds
                } else {
                    0.0
                },
                setup_latency_ms: Latency::from_histogram(&stats.setup.merged()),
            },
            writes,
            reads,
            deliveries,
            errors: stats.errors(),
            closes: stats
                .closes()
                .into_iter()
                .map(|(code, n)| (code.to_string(), n))
                .collect(),
            generator: Generator {
                cpu_percent,
                cpu_seconds,
                wall_seconds,
                cores: host::cores(),
            },
            server,
            stream: None,
            counting: report::COUNTING_RULE,
        }
    }

    /// Stops the progress line early (on a setup failure).
    pub async fn abort(&mut self) {
        self.shared.stop.cancel();
        if let Some((task, stop)) = self.progress.take() {
            stop.cancel();
            let _ = task.await;
        }
    }
}

/// The setup write: every writer's marker at seq 0 and `fillers` filler records of about
/// equal size, so the dataset holds about `size` bytes (keys and values). Returns the
/// dataset's sync count after it (every record's too).
pub async fn setup_write(
    ws: &mut Ws,
    dataset: &DatasetRef,
    writers: usize,
    fillers: usize,
    size: usize,
) -> Result<u64, Fail> {
    let mut patches: Vec<Patch> = (0..writers)
        .map(|i| Patch::replace(marker::key(i), marker::value(0, 0), 0))
        .collect();
    patches.extend(filler_patches(writers, fillers, size));
    let id = conn::SETUP_ID_BASE + 2;
    let frame = ClientFrame::Update {
        id: RequestId::Num(id),
        dataset: dataset.clone(),
        device_id: None,
        patches,
    }
    .to_json();
    let answer = conn::request(ws, id, frame, &mut |_, _| {}).await?;
    if answer.kind == Kind::Conflict {
        return Err(Fail::new(
            "conflict",
            format!(
                "dataset {} already exists: use a fresh --prefix",
                dataset.name
            ),
        ));
    }
    let answer = answer.expect(Kind::Ack, "setup write")?;
    answer
        .reply
        .sync_count
        .ok_or_else(|| Fail::new("unexpected_reply", "setup ack without a sync count"))
}

/// The filler records' patches. One filler (the default) is left out when the markers fill
/// `size` alone; several always exist, each at least one byte.
fn filler_patches(writers: usize, fillers: usize, size: usize) -> Vec<Patch> {
    let keys = marker::pad_keys(fillers);
    let key_bytes: usize = keys.iter().map(String::len).sum();
    // A marker is about 3 + 24 bytes of key and value once writing starts.
    let pad = size.saturating_sub(writers * 28 + key_bytes);
    if fillers == 1 && pad == 0 {
        return Vec::new();
    }
    let each = (pad / fillers.max(1)).max(1);
    keys.into_iter()
        .map(|key| Patch::replace(key, "x".repeat(each), 0))
        .collect()
}

/// Grants `access` on `dataset` to each identity, pipelined on the owner's connection.
pub async fn grant_all(
    ws: &mut Ws,
    dataset: &DatasetRef,
    identities: &[String],
    access: Access,
) -> Result<(), Fail> {
    let frames = identities
        .iter()
        .enumerate()
        .map(|(i, identity)| {
            let id = conn::SETUP_ID_BASE + 16 + i as u64;
            let frame = ClientFrame::Grant {
                id: RequestId::Num(id),
                dataset: dataset.clone(),
                identity: identity.clone(),
                access,
            };
            (id, frame.to_json())
        })
        .collect();
    for answer in conn::pipeline(ws, frames, 64, &mut |_, _| {}).await? {
        answer.expect(Kind::Ack, "grant")?;
    }
    Ok(())
}

fn spawn_progress(
    shared: Arc<Shared>,
    phase: Arc<Mutex<&'static str>>,
) -> (JoinHandle<()>, tokio_util::sync::CancellationToken) {
    let stop = tokio_util::sync::CancellationToken::new();
    let done = stop.clone();
    let task = tokio::spawn(async move {
        let tty = std::io::stderr().is_terminal();
        let started = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut cpu = CpuMeter::start();
        loop {
            tokio::select! {
                () = done.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let stats = &shared.stats;
            let (_, _, cpu_percent) = cpu.read();
            cpu = CpuMeter::start();
            let p99 = stats.delivery.merged();
            let p99 = if p99.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.1}ms", p99.value_at_quantile(0.99) as f64 / 1000.0)
            };
            let line = format!(
                "[{:6.1}s] {:<7} conns {} (set up {}) sent {} acked {} delivered {} p99 {} errors {} reconnects {} cpu {}",
                started.elapsed().as_secs_f64(),
                *phase.lock(),
                Stats::get(&stats.open),
                Stats::get(&stats.established),
                Stats::get(&stats.sent),
                Stats::get(&stats.acked),
                Stats::get(&stats.delivered),
                p99,
                stats.error_total(),
                Stats::get(&stats.reconnects),
                cpu_percent.map_or("?".to_owned(), |p| format!("{p:.0}%")),
            );
            let mut err = std::io::stderr().lock();
            if tty {
                let _ = write!(err, "\r\x1b[K{line}");
            } else {
                let _ = writeln!(err, "{line}");
            }
            let _ = err.flush();
        }
        if tty {
            let _ = writeln!(std::io::stderr());
        }
    });
    (task, stop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(patches: &[Patch]) -> usize {
        patches
            .iter()
            .map(|p| p.key.len() + p.value.as_deref().map_or(0, str::len))
            .sum()
    }

    #[test]
    fn test_run_fillers_spread_the_document_over_equal_records() {
        // 20 records of a ~1 KiB document: the marker and 19 fillers.
        let fillers = filler_patches(1, 19, 1024);
        assert_eq!(fillers.len(), 19);
        let sizes: Vec<usize> = fillers
            .iter()
            .map(|p| p.value.as_ref().unwrap().len())
            .collect();
        assert!(sizes.windows(2).all(|w| w[0] == w[1]), "{sizes:?}");
        let total = bytes(&fillers) + 28;
        assert!((1000..=1024).contains(&total), "{total}");
    }

    #[test]
    fn test_run_one_filler_keeps_the_old_document() {
        let fillers = filler_patches(1, 1, 1024);
        assert_eq!(fillers.len(), 1);
        assert_eq!(fillers[0].key, "zpad");
        assert_eq!(bytes(&fillers) + 28, 1024);
        // Markers alone fill a tiny document: no filler.
        assert!(filler_patches(5, 1, 100).is_empty());
        // Asked-for fillers exist however small the document.
        assert_eq!(filler_patches(5, 3, 100).len(), 3);
    }
}
