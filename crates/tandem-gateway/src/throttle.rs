//! Log volume for what a client can cause at will (refused tokens, broken frames, dropped
//! connections, refused origins): every event is counted for `/metrics`, but only the first
//! `max_log_lines` of each kind per `log_interval` are logged; the rest are summed up in one
//! line ("suppressed similar events", with the count) when the interval ends. So a flood of
//! bad clients costs at most a few lines per kind and interval, however fast it comes, and an
//! operator still sees what happened and how often.
//!
//! The caller logs its own line (its fields, its level) when [`Throttle::record`] says so;
//! the throttle logs only the summaries, at the kind's level.

use crate::config::duration;
use parking_lot::Mutex;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Level;

/// A kind of client-caused event, each with its own budget of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A token refused in an `auth` frame or an `Authorization` header.
    TokenRefused,
    /// A peer that broke the WebSocket protocol (malformed frame, invalid UTF-8).
    ProtocolError,
    /// A peer that went away without a close frame, or a write to it that failed.
    AbruptDisconnect,
    /// A client closed as slow (replies piling up, a write past its deadline).
    SlowClient,
    /// A connection refused by `max_connections` or `max_connections_per_identity`.
    ConnectionLimit,
    /// A browser request from an origin that is not allowed.
    OriginRefused,
    /// A dev-mode `/dev/token` request addressed to a host that is not this machine.
    HostRefused,
    /// The sync hook gave no verdict (failed, timed out, or its breaker is open).
    HookFailed,
}

impl Event {
    const ALL: [Event; 8] = [
        Event::TokenRefused,
        Event::ProtocolError,
        Event::AbruptDisconnect,
        Event::SlowClient,
        Event::ConnectionLimit,
        Event::OriginRefused,
        Event::HostRefused,
        Event::HookFailed,
    ];

    /// The `event` label in `/metrics` and in the summary lines.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Event::TokenRefused => "token_refused",
            Event::ProtocolError => "protocol_error",
            Event::AbruptDisconnect => "abrupt_disconnect",
            Event::SlowClient => "slow_client",
            Event::ConnectionLimit => "connection_limit",
            Event::OriginRefused => "origin_refused",
            Event::HostRefused => "host_refused",
            Event::HookFailed => "hook_failed",
        }
    }

    /// The level its lines are logged at; the summary takes the same.
    fn level(self) -> Level {
        match self {
            // Everyday on mobile networks: worth a count, not a line at the default level.
            Event::AbruptDisconnect => Level::DEBUG,
            _ => Level::INFO,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One kind's current interval.
#[derive(Debug)]
struct Window {
    opened: Instant,
    logged: u32,
    suppressed: u64,
    /// A task waits for the interval's end to log the summary.
    flush_pending: bool,
}

#[derive(Debug)]
pub(crate) struct Throttle {
    max_lines: u32,
    interval: Duration,
    windows: [Mutex<Window>; Event::ALL.len()],
    counts: [AtomicU64; Event::ALL.len()],
    suppressed: [AtomicU64; Event::ALL.len()],
}

impl Throttle {
    pub(crate) fn new(max_lines: u32, interval: Duration) -> Arc<Throttle> {
        let now = Instant::now();
        Arc::new(Throttle {
            max_lines,
            interval,
            windows: std::array::from_fn(|_| {
                Mutex::new(Window {
                    opened: now,
                    logged: 0,
                    suppressed: 0,
                    flush_pending: false,
                })
            }),
            counts: Default::default(),
            suppressed: Default::default(),
        })
    }

    /// Counts one event; returns whether the caller logs its line (it is within this
    /// interval's budget). A suppressed one is summed up when the interval ends.
    pub(crate) fn record(self: &Arc<Self>, event: Event) -> bool {
        let i = event.index();
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut window = self.windows[i].lock();
        let ended = self.ended(&window, now).then(|| {
            window.opened = now;
            window.logged = 0;
            std::mem::take(&mut window.suppressed)
        });
        let log = window.logged < self.max_lines;
        let mut flush = false;
        if log {
            window.logged += 1;
        } else {
            window.suppressed += 1;
            self.suppressed[i].fetch_add(1, Ordering::Relaxed);
            flush = !std::mem::replace(&mut window.flush_pending, true);
        }
        drop(window);
        if let Some(n) = ended {
            self.summary(event, n);
        }
        if flush {
            self.spawn_flush(event);
        }
        log
    }

    fn ended(&self, window: &Window, now: Instant) -> bool {
        window
            .opened
            .checked_add(self.interval)
            .is_some_and(|end| now >= end)
    }

    /// Logs the summary of `event`'s interval when it ends, even if no event comes after.
    fn spawn_flush(self: &Arc<Self>, event: Event) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let throttle = self.clone();
        runtime.spawn(async move {
            loop {
                let opened = throttle.windows[event.index()].lock().opened;
                // An interval too long for an `Instant` ends at shutdown's `flush`.
                let Some(end) = opened.checked_add(throttle.interval) else {
                    return;
                };
                tokio::time::sleep_until(end).await;
                let mut window = throttle.windows[event.index()].lock();
                if window.opened != opened {
                    // A later event began a new interval (and summed up this one).
                    continue;
                }
                window.flush_pending = false;
                let n = std::mem::take(&mut window.suppressed);
                drop(window);
                throttle.summary(event, n);
                return;
            }
        });
    }

    /// Logs every summary not yet logged, for a node that stops mid-interval.
    pub(crate) fn flush(&self) {
        for event in Event::ALL {
            let n = std::mem::take(&mut self.windows[event.index()].lock().suppressed);
            self.summary(event, n);
        }
    }

    fn summary(&self, event: Event, suppressed: u64) {
        if suppressed == 0 {
            return;
        }
        let interval = duration::format(self.interval);
        let level = event.level();
        let event = event.name();
        // One call per level: tracing fixes a call site's level at compile time.
        match level {
            Level::DEBUG => {
                tracing::debug!(event, suppressed, %interval, "suppressed similar events");
            }
            _ => tracing::info!(event, suppressed, %interval, "suppressed similar events"),
        }
    }

    /// The `/metrics` series: every event, and the log lines left out.
    pub(crate) fn render(&self, out: &mut String) {
        let series = [
            (
                "tandem_gateway_events_total",
                "Client-caused events that are logged at a bounded pace, by kind; every one is counted here.",
                &self.counts,
            ),
            (
                "tandem_gateway_log_lines_suppressed_total",
                "Log lines of those events left out, summed up in one line per interval.",
                &self.suppressed,
            ),
        ];
        for (name, help, counters) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
            for (event, count) in Event::ALL.iter().zip(counters) {
                let _ = writeln!(
                    out,
                    "{name}{{event=\"{}\"}} {}",
                    event.name(),
                    count.load(Ordering::Relaxed)
                );
            }
        }
    }

    /// (events, log lines left out) of one kind.
    #[cfg(test)]
    pub(crate) fn count(&self, event: Event) -> (u64, u64) {
        let i = event.index();
        (
            self.counts[i].load(Ordering::Relaxed),
            self.suppressed[i].load(Ordering::Relaxed),
        )
    }

    #[cfg(test)]
    fn pending(&self, event: Event) -> u64 {
        self.windows[event.index()].lock().suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn test_throttle_logs_the_first_lines_then_counts_the_rest() {
        let throttle = Throttle::new(3, Duration::from_secs(10));
        let logged = (0..100)
            .filter(|_| throttle.record(Event::TokenRefused))
            .count();
        assert_eq!(logged, 3);
        assert_eq!(throttle.count(Event::TokenRefused), (100, 97));
        assert_eq!(throttle.pending(Event::TokenRefused), 97);
        // Other kinds have their own budget.
        assert!(throttle.record(Event::ProtocolError));
        assert_eq!(throttle.count(Event::ProtocolError), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn test_throttle_sums_up_when_the_interval_ends_without_another_event() {
        let throttle = Throttle::new(1, Duration::from_secs(10));
        for _ in 0..5 {
            throttle.record(Event::AbruptDisconnect);
        }
        assert_eq!(throttle.pending(Event::AbruptDisconnect), 4);
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert_eq!(
            throttle.pending(Event::AbruptDisconnect),
            4,
            "not before the end"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(throttle.pending(Event::AbruptDisconnect), 0, "summed up");
        // The metric keeps the total.
        assert_eq!(throttle.count(Event::AbruptDisconnect), (5, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn test_throttle_new_interval_has_a_new_budget() {
        let throttle = Throttle::new(2, Duration::from_secs(10));
        for _ in 0..10 {
            throttle.record(Event::SlowClient);
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        let logged = (0..10)
            .filter(|_| throttle.record(Event::SlowClient))
            .count();
        assert_eq!(logged, 2);
        assert_eq!(throttle.count(Event::SlowClient), (20, 16));
        // The second interval's summary is still due, and comes at its end.
        assert_eq!(throttle.pending(Event::SlowClient), 8);
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert_eq!(throttle.pending(Event::SlowClient), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn test_throttle_flush_sums_up_at_once() {
        let throttle = Throttle::new(0, Duration::from_secs(3600));
        assert!(!throttle.record(Event::ConnectionLimit));
        assert_eq!(throttle.pending(Event::ConnectionLimit), 1);
        throttle.flush();
        assert_eq!(throttle.pending(Event::ConnectionLimit), 0);
    }

    #[test]
    fn test_throttle_renders_every_kind() {
        let throttle = Throttle::new(1, Duration::from_secs(1));
        let mut out = String::new();
        throttle.render(&mut out);
        for event in Event::ALL {
            assert!(
                out.contains(&format!(
                    "tandem_gateway_events_total{{event=\"{}\"}} 0",
                    event.name()
                )),
                "{out}"
            );
        }
    }
}
