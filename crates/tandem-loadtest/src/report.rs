//! The end-of-run report: one struct, printed as a table for people or as one JSON object
//! (`--json`) for machines.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// How deliveries are counted, stated in every report.
pub const COUNTING_RULE: &str = "a push (dataset or delta) covers every write of its writer up to the seq \
in its marker (pushes coalesce, deltas merge); each committed measured write counts once per subscriber \
at the first push or snapshot that covers it, latency = receive time - scheduled send time; expected = \
committed measured writes x subscribers of the dataset; lost = expected - received after the drain; a \
subscriber ends at the final sync count when it saw every writer's last committed write";

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    /// The scenario's own options.
    pub params: serde_json::Value,
    pub prefix: String,
    pub seed: u64,
    pub urls: Vec<String>,
    /// The measured sending window (after the warmup), or the idle/connect phase.
    pub measured_seconds: f64,
    /// The `auth` features asked for and those the server turned on (WebSocket scenarios).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub features: Option<Features>,
    pub connections: Connections,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<Writes>,
    /// ListRecords (`cognito` with --list-rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reads: Option<Reads>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deliveries: Option<Deliveries>,
    /// Errors by code: the server's error codes, `closed_<close code>`, `connection_lost`,
    /// `connect_failed`, `reply_timeout`, …
    pub errors: BTreeMap<String, u64>,
    /// Connections that ended during the run, by close code: the server's close frame's code
    /// (4001 slow, …), 1006 when the connection ended without a close frame, 1005 when the
    /// close frame had no code. The run's own closes at the end are not counted.
    pub closes: BTreeMap<String, u64>,
    pub generator: Generator,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    /// The change stream's webhook (`--stream-listen`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<StreamReport>,
    pub counting: &'static str,
}

/// What the run's change stream webhook received.
#[derive(Debug, Clone, Serialize)]
pub struct StreamReport {
    pub requests: u64,
    /// Distinct events (by id).
    pub events: u64,
    /// Events received again (redeliveries).
    pub duplicates: u64,
    /// Commit (the event's server time) to arrival, over distinct events.
    pub lag_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Features {
    pub asked: Vec<String>,
    /// What the first `ready` named (`None`: no connection got that far).
    pub accepted: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Connections {
    /// Connections the scenario wanted.
    pub target: u64,
    /// Set up at the start.
    pub established: u64,
    pub failed: u64,
    pub reconnects: u64,
    /// Wall time of the set-up phase and connections set up per second in it.
    pub setup_seconds: f64,
    pub setup_per_second: f64,
    /// Connect + auth (+ subscribe in `idle` and `connect`), from the scheduled start when
    /// --connect-rate is set.
    pub setup_latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Writes {
    pub sent: u64,
    pub acked: u64,
    pub conflicts: u64,
    /// Scheduled in the window but never sent (a writer sharing a dataset waits for its
    /// previous reply).
    pub unsent: u64,
    /// Sent, but no reply came (connection lost or the run ended first).
    pub unknown_outcome: u64,
    pub commits_per_second: f64,
    /// Scheduled send → ack (durable commit).
    pub commit_latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reads {
    pub sent: u64,
    /// Answered 200.
    pub ok: u64,
    pub per_second: f64,
    /// Scheduled send → reply.
    pub latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deliveries {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub per_second: f64,
    /// Subscriptions that count deliveries.
    pub subscribers: u64,
    /// Live pushes received (`dataset` and `delta` frames), all subscribers together, their
    /// bytes, and how many were deltas.
    pub push_frames: u64,
    pub push_bytes: u64,
    pub delta_frames: u64,
    pub push_frames_per_subscriber: f64,
    pub push_bytes_per_subscriber: f64,
    /// push_bytes / push_frames.
    pub bytes_per_push: f64,
    /// `snapshot` replies to re-subscribes after reconnects, and their bytes.
    pub snapshot_frames: u64,
    pub snapshot_bytes: u64,
    /// Subscribers that had, when the run ended, seen every writer's last committed write.
    pub at_final_sync_count: u64,
    /// Slow readers (`fanout --read-rate`) among the subscribers, and how many of them ended
    /// at the final sync count.
    pub slow_readers: u64,
    pub slow_at_final_sync_count: u64,
    /// Scheduled send → a subscriber receives a push that covers the write; one sample per
    /// delivery (every subscriber).
    pub latency_ms: Latency,
    /// Scheduled send → the first subscriber other than the writer's own connection receives
    /// a push (or snapshot) that covers the write; one sample per committed measured write
    /// that reached someone. Compare with `writes.commit_latency_ms`.
    pub first_latency_ms: Latency,
}

#[derive(Debug, Clone, Serialize)]
pub struct Generator {
    /// CPU used by this process over the run, as a share of all its cores.
    pub cpu_percent: Option<f64>,
    pub cpu_seconds: Option<f64>,
    pub wall_seconds: f64,
    pub cores: usize,
}

/// What the server CPU window covers, stated in every report that has one.
pub const SERVER_CPU_WINDOW: &str = "first measured send to the end of the drain";

#[derive(Debug, Clone, Serialize)]
pub struct Server {
    /// With --server-pid (several nodes: their figures are summed).
    pub pids: Vec<u32>,
    /// With --server-metrics.
    pub metrics: Option<String>,
    /// VmRSS before the scenario's connections were set up.
    pub rss_start_kib: Option<u64>,
    /// VmRSS once every connection was set up.
    pub rss_connected_kib: Option<u64>,
    /// VmRSS at the end, before the connections were closed.
    pub rss_end_kib: Option<u64>,
    /// (connected - start) / connections set up.
    pub rss_per_connection_bytes: Option<f64>,
    /// With --server-pid, in scenarios with a sending window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<ServerCpu>,
}

/// The servers' CPU time (all threads, summed over --server-pid) over [`SERVER_CPU_WINDOW`].
#[derive(Debug, Clone, Serialize)]
pub struct ServerCpu {
    pub window: &'static str,
    pub window_seconds: f64,
    pub user_seconds: f64,
    pub system_seconds: f64,
    /// (user + system) / window: 100 is one core busy all the time.
    pub percent_of_one_core: f64,
    /// (user + system) / deliveries received, in µs (fanout, rooms).
    pub per_delivery_us: Option<f64>,
    /// (user + system) / writes acknowledged, in µs.
    pub per_commit_us: Option<f64>,
}

impl ServerCpu {
    /// From the CPU used over a window of `window_seconds`, and what the run counted.
    pub fn new(
        user_seconds: f64,
        system_seconds: f64,
        window_seconds: f64,
        deliveries: Option<u64>,
        commits: Option<u64>,
    ) -> ServerCpu {
        let total = user_seconds + system_seconds;
        let per = |n: Option<u64>| n.filter(|&n| n > 0).map(|n| total * 1e6 / n as f64);
        ServerCpu {
            window: SERVER_CPU_WINDOW,
            window_seconds,
            user_seconds,
            system_seconds,
            percent_of_one_core: if window_seconds > 0.0 {
                100.0 * total / window_seconds
            } else {
                0.0
            },
            per_delivery_us: per(deliveries),
            per_commit_us: per(commits),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Latency {
    /// From a histogram of microseconds.
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: h.mean() / 1000.0,
        }
    }
}

impl Report {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The human summary table.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "  {name:<22} {value}");
        };
        row("scenario", format!("{} {}", self.scenario, self.params));
        row("prefix / seed", format!("{} / {}", self.prefix, self.seed));
        row("gateways", self.urls.join(", "));
        row("measured", format!("{:.2} s", self.measured_seconds));
        if let Some(f) = &self.features {
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_owned()
                } else {
                    v.join(", ")
                }
            };
            row(
                "features",
                format!(
                    "asked {}; server turned on {}",
                    list(&f.asked),
                    f.accepted.as_deref().map_or("?".to_owned(), list)
                ),
            );
        }
        let c = &self.connections;
        row(
            "connections",
            format!(
                "{} of {} set up, {} failed, {} reconnects",
                c.established, c.target, c.failed, c.reconnects
            ),
        );
        row(
            "setup rate",
            format!(
                "{:.1} conn/s over {:.3} s",
                c.setup_per_second, c.setup_seconds
            ),
        );
        row("setup latency", latency(&c.setup_latency_ms));
        if let Some(w) = &self.writes {
            row(
                "writes",
                format!(
                    "{} sent, {} acked, {} conflicts, {} unsent, {} unknown outcome",
                    w.sent, w.acked, w.conflicts, w.unsent, w.unknown_outcome
                ),
            );
            row("commits/s", format!("{:.1}", w.commits_per_second));
            if self.deliveries.is_none() {
                row("commit latency", latency(&w.commit_latency_ms));
            }
        }
        if let Some(r) = &self.reads {
            row("reads", format!("{} sent, {} ok", r.sent, r.ok));
            row("reads/s", format!("{:.1}", r.per_second));
            row("read latency", latency(&r.latency_ms));
        }
        if let Some(d) = &self.deliveries {
            let loss = if d.expected == 0 {
                0.0
            } else {
                100.0 * d.lost as f64 / d.expected as f64
            };
            row(
                "deliveries",
                format!(
                    "{} received of {} expected, {} lost ({loss:.3}%)",
                    d.received, d.expected, d.lost
                ),
            );
            row("deliveries/s", format!("{:.1}", d.per_second));
            row(
                "push frames",
                format!(
                    "{} ({} deltas), {}; per subscriber {:.1} frames, {}; {:.0} B per push",
                    d.push_frames,
                    d.delta_frames,
                    bytes(d.push_bytes),
                    d.push_frames_per_subscriber,
                    bytes(d.push_bytes_per_subscriber.round() as u64),
                    d.bytes_per_push
                ),
            );
            if d.snapshot_frames > 0 {
                row(
                    "resubscribe snapshots",
                    format!("{}, {}", d.snapshot_frames, bytes(d.snapshot_bytes)),
                );
            }
            let slow = if d.slow_readers > 0 {
                format!(
                    " (slow readers {} of {})",
                    d.slow_at_final_sync_count, d.slow_readers
                )
            } else {
                String::new()
            };
            row(
                "final state",
                format!(
                    "ended at final sync count: {} of {}{slow}",
                    d.at_final_sync_count, d.subscribers
                ),
            );
            // The three latencies together, from the same scheduled send: the writer's ack,
            // the first other subscriber's push, every subscriber's push.
            if let Some(w) = &self.writes {
                row("commit latency", latency(&w.commit_latency_ms));
            }
            row("first delivery", latency(&d.first_latency_ms));
            row("delivery latency", latency(&d.latency_ms));
            if let Some(w) = self
                .writes
                .as_ref()
                .filter(|_| d.first_latency_ms.count > 0)
            {
                let (ack, first) = (w.commit_latency_ms.p50, d.first_latency_ms.p50);
                row(
                    "ack vs first p50",
                    format!(
                        "ack {ack:.2} ms {} first delivery {first:.2} ms ({:+.2} ms)",
                        if ack <= first { "<=" } else { ">" },
                        ack - first
                    ),
                );
            }
        }
        let errors = if self.errors.is_empty() {
            "none".to_owned()
        } else {
            self.errors
                .iter()
                .map(|(code, n)| format!("{code} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        row("errors", errors);
        let closes = if self.closes.is_empty() {
            "none".to_owned()
        } else {
            self.closes
                .iter()
                .map(|(code, n)| format!("{code} x{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        row("closes", closes);
        let g = &self.generator;
        row(
            "generator cpu",
            match (g.cpu_percent, g.cpu_seconds) {
                (Some(p), Some(s)) => format!(
                    "{p:.1}% of {} cores ({s:.2} cpu-s over {:.2} s){}",
                    g.cores,
                    g.wall_seconds,
                    if p > 80.0 {
                        "  SATURATED: figures are the generator's limit"
                    } else {
                        ""
                    }
                ),
                _ => "unknown".to_owned(),
            },
        );
        if let Some(s) = &self.server {
            let kib = |v: Option<u64>| v.map_or("?".to_owned(), |v| format!("{v} KiB"));
            row(
                "server rss",
                format!(
                    "{}: {} at start, {} connected, {} at end",
                    match s.pids.as_slice() {
                        [] => s.metrics.clone().unwrap_or_default(),
                        [pid] => format!("pid {pid}"),
                        pids => format!(
                            "pids {} (summed)",
                            pids.iter()
                                .map(u32::to_string)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    },
                    kib(s.rss_start_kib),
                    kib(s.rss_connected_kib),
                    kib(s.rss_end_kib)
                ),
            );
            if let Some(per) = s.rss_per_connection_bytes {
                row("server rss/conn", format!("{:.0} bytes", per));
            }
            if let Some(c) = &s.cpu {
                row(
                    "server cpu",
                    format!(
                        "{:.2} s user + {:.2} s system over {:.2} s ({}), {:.1}% of one core",
                        c.user_seconds,
                        c.system_seconds,
                        c.window_seconds,
                        c.window,
                        c.percent_of_one_core
                    ),
                );
                let per: Vec<String> =
                    [("delivery", c.per_delivery_us), ("commit", c.per_commit_us)]
                        .into_iter()
                        .filter_map(|(what, us)| us.map(|us| format!("{what} {us:.1} us")))
                        .collect();
                if !per.is_empty() {
                    row("server cpu per", per.join(", "));
                }
            }
        }
        if let Some(s) = &self.stream {
            row(
                "stream",
                format!(
                    "{} events in {} requests, {} redelivered",
                    s.events, s.requests, s.duplicates
                ),
            );
            row("stream lag", latency(&s.lag_ms));
        }
        if self.deliveries.is_some() {
            let _ = writeln!(out, "  counting: {}", self.counting);
        }
        out
    }
}

fn latency(l: &Latency) -> String {
    if l.count == 0 {
        return "no samples".to_owned();
    }
    // Fixed widths, so rows printed together line up.
    format!(
        "p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>7.2}  (n={})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.count
    )
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_server_cpu_per_delivery_and_per_commit() {
        // 1.5 s user + 0.5 s system over 10 s, 100,000 deliveries of 1,000 commits.
        let c = ServerCpu::new(1.5, 0.5, 10.0, Some(100_000), Some(1_000));
        assert_eq!(c.percent_of_one_core, 20.0);
        assert_eq!(c.per_delivery_us, Some(20.0));
        assert_eq!(c.per_commit_us, Some(2000.0));
        // Nothing delivered (the write scenario) or nothing counted: no ratio.
        let c = ServerCpu::new(1.0, 0.0, 0.0, None, Some(0));
        assert_eq!((c.per_delivery_us, c.per_commit_us), (None, None));
        assert_eq!(c.percent_of_one_core, 0.0);
    }
}
