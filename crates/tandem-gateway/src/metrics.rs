//! Counters behind `GET /metrics` (Prometheus text format). Updated with relaxed atomic adds,
//! once per request or per commit, never per subscriber.

use crate::throttle::Throttle;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_protocol::ErrorCode;

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub commits: AtomicU64,
    pub conflicts: AtomicU64,
    /// Pushes handed to local subscribers' outboxes (before coalescing).
    pub pushes: AtomicU64,
    pub sessions_opened: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
}

impl Metrics {
    pub fn error(&self, code: ErrorCode) {
        if let Some(i) = ErrorCode::ALL.iter().position(|c| *c == code) {
            self.errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// The gauges the gateway reads at scrape time.
pub(crate) struct Gauges {
    pub sessions: usize,
    pub subscriptions: usize,
    pub datasets: usize,
    pub broker_up: bool,
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

pub(crate) fn render(m: &Metrics, g: &Gauges, throttle: &Throttle) -> String {
    let mut out = String::with_capacity(2048);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    metric(
        &mut out,
        "tandem_gateway_sessions",
        "gauge",
        "Open WebSocket sessions.",
        g.sessions as u64,
    );
    metric(
        &mut out,
        "tandem_gateway_sessions_opened_total",
        "counter",
        "WebSocket sessions opened.",
        get(&m.sessions_opened),
    );
    metric(
        &mut out,
        "tandem_gateway_subscriptions",
        "gauge",
        "Live subscriptions on this node.",
        g.subscriptions as u64,
    );
    metric(
        &mut out,
        "tandem_gateway_datasets",
        "gauge",
        "Datasets with subscribers on this node.",
        g.datasets as u64,
    );
    metric(
        &mut out,
        "tandem_gateway_commits_total",
        "counter",
        "Updates committed and acknowledged through this node.",
        get(&m.commits),
    );
    metric(
        &mut out,
        "tandem_gateway_conflicts_total",
        "counter",
        "Updates refused with a conflict.",
        get(&m.conflicts),
    );
    metric(
        &mut out,
        "tandem_gateway_pushes_total",
        "counter",
        "Pushes handed to local subscribers before coalescing.",
        get(&m.pushes),
    );
    metric(
        &mut out,
        "tandem_broker_up",
        "gauge",
        "1 when the broker reaches its peers, 0 when degraded.",
        u64::from(g.broker_up),
    );
    if let Some(bytes) = resident_memory_bytes() {
        // The standard name, so dashboards and the load-test harness (`idle --server-metrics`)
        // read a node's memory without access to its host.
        metric(
            &mut out,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the tandem process in bytes.",
            bytes,
        );
    }
    out.push_str("# HELP tandem_gateway_errors_total Error frames sent, by code.\n# TYPE tandem_gateway_errors_total counter\n");
    for (code, count) in ErrorCode::ALL.iter().zip(&m.errors) {
        let _ = writeln!(
            out,
            "tandem_gateway_errors_total{{code=\"{code}\"}} {}",
            get(count)
        );
    }
    throttle.render(&mut out);
    out
}

/// This process's resident memory (`VmRSS` in `/proc/self/status`); absent off Linux.
fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}
