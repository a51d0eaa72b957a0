//! Counters behind `GET /metrics` (Prometheus text format). Updated with relaxed atomic adds,
//! once per request or per commit, never per subscriber.

use crate::outbox::PushKind;
use crate::throttle::Throttle;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use tandem_protocol::{CloseCode, ErrorCode};

/// Why the node closed a connection, for `tandem_gateway_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CloseReason {
    /// The close frame the session queued (4001 here means the reply bounds were hit).
    Code(CloseCode),
    /// The socket took no byte for `write_timeout` (sent as 4001).
    WriteStalled,
}

impl CloseReason {
    const COUNT: usize = CloseCode::ALL.len() + 1;

    fn index(self) -> usize {
        match self {
            CloseReason::Code(code) => CloseCode::ALL
                .iter()
                .position(|c| *c == code)
                .unwrap_or(CloseCode::ALL.len()),
            CloseReason::WriteStalled => CloseCode::ALL.len(),
        }
    }

    fn label(self) -> (u16, &'static str) {
        match self {
            CloseReason::WriteStalled => (CloseCode::Slow.code(), "write_stalled"),
            CloseReason::Code(code) => (
                code.code(),
                match code {
                    CloseCode::GoingAway => "going_away",
                    CloseCode::Slow => "reply_queue_full",
                    CloseCode::TokenExpired => "token_expired",
                    CloseCode::Internal => "internal",
                    CloseCode::AuthTimeout => "auth_timeout",
                    CloseCode::TooManyConnections => "too_many_connections",
                    CloseCode::SessionAge => "session_age",
                    CloseCode::Idle => "idle",
                    CloseCode::Unauthorized => "unauthorized",
                    CloseCode::MessageTooBig => "message_too_big",
                    CloseCode::ProtocolError => "protocol_error",
                    CloseCode::TooManyBadFrames => "too_many_bad_frames",
                },
            ),
        }
    }
}

/// Pushes one writer batch sent, by kind: counted locally, added to the node's counters
/// once per batch.
#[derive(Debug, Default)]
pub(crate) struct PushesSent {
    frames: [u64; 3],
    bytes: [u64; 3],
}

impl PushesSent {
    pub fn add(&mut self, kind: PushKind, bytes: usize) {
        let i = kind as usize;
        self.frames[i] += 1;
        self.bytes[i] += bytes as u64;
    }
}

const PUSH_KINDS: [(PushKind, &str); 3] = [
    (PushKind::Whole, "dataset"),
    (PushKind::Delta, "delta"),
    (PushKind::Merged, "merged_delta"),
];

#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub commits: AtomicU64,
    pub conflicts: AtomicU64,
    /// Pushes handed to local subscribers' outboxes (before coalescing).
    pub pushes: AtomicU64,
    pub sessions_opened: AtomicU64,
    errors: [AtomicU64; ErrorCode::ALL.len()],
    closes: [AtomicU64; CloseReason::COUNT],
    push_frames: [AtomicU64; 3],
    push_bytes: [AtomicU64; 3],
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

    pub fn closed(&self, reason: CloseReason) {
        self.closes[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub fn pushes_sent(&self, sent: &PushesSent) {
        for i in 0..3 {
            if sent.frames[i] > 0 {
                self.push_frames[i].fetch_add(sent.frames[i], Ordering::Relaxed);
                self.push_bytes[i].fetch_add(sent.bytes[i], Ordering::Relaxed);
            }
        }
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
    out.push_str("# HELP tandem_gateway_push_frames_total Push frames written to sockets, by kind.\n# TYPE tandem_gateway_push_frames_total counter\n");
    for (i, (_, kind)) in PUSH_KINDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "tandem_gateway_push_frames_total{{kind=\"{kind}\"}} {}",
            get(&m.push_frames[i])
        );
    }
    out.push_str("# HELP tandem_gateway_push_bytes_total Bytes of push frames written to sockets (payload), by kind.\n# TYPE tandem_gateway_push_bytes_total counter\n");
    for (i, (_, kind)) in PUSH_KINDS.iter().enumerate() {
        let _ = writeln!(
            out,
            "tandem_gateway_push_bytes_total{{kind=\"{kind}\"}} {}",
            get(&m.push_bytes[i])
        );
    }
    out.push_str("# HELP tandem_gateway_closes_total Connections the node closed, by close code and reason.\n# TYPE tandem_gateway_closes_total counter\n");
    let reasons = CloseCode::ALL
        .into_iter()
        .map(CloseReason::Code)
        .chain([CloseReason::WriteStalled]);
    for reason in reasons {
        let (code, label) = reason.label();
        let _ = writeln!(
            out,
            "tandem_gateway_closes_total{{code=\"{code}\",reason=\"{label}\"}} {}",
            get(&m.closes[reason.index()])
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
