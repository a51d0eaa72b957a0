//! One task per connection: it sends its writer's updates on schedule, reads every frame,
//! books replies and pushes, and reconnects (with backoff, re-authenticating and
//! re-subscribing) when the server allows it. A slow reader takes at most one frame off its
//! socket per read interval, so the server's buffers and conflation, not this process,
//! absorb the difference. When the task ends it books whether its subscription reached the
//! final state and, along the way, every close by its code.

use crate::conn::{self, ConnectOptions, Fail, Kind, Ws};
use crate::ledger::Coverage;
use crate::marker;
use crate::stats::{Clock, Stats};
use crate::writer::Writer;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tandem_protocol::DatasetRef;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// What every connection task of a run shares.
#[derive(Debug, Default)]
pub struct Shared {
    pub clock: Clock,
    pub stats: Stats,
    /// Ends every task.
    pub stop: CancellationToken,
    /// Ends the writers: in flight becomes unknown, unsent becomes unsent.
    pub stop_writes: CancellationToken,
    /// Every writer has every outcome: subscribers may settle everything they covered.
    pub writers_done: CancellationToken,
    /// Writers not yet complete or finished.
    pub writers_open: AtomicUsize,
}

/// What one connection does.
#[derive(Debug)]
pub struct ClientPlan {
    /// The connection's index (token line, URL, histogram shard).
    pub slot: usize,
    pub url: String,
    pub token: String,
    /// The dataset it subscribes to, again after a reconnect.
    pub subscription: Option<DatasetRef>,
    /// Coverage of the subscribed dataset's writers, by marker index.
    pub follows: Vec<Coverage>,
    pub writer: Option<Writer>,
    /// Features and socket options, again after a reconnect.
    pub connect: ConnectOptions,
    /// A slow reader's least time between two frames read off the socket.
    pub read_interval: Option<Duration>,
}

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Runs one connection until `shared.stop` (or, for a connection that only writes, until
/// its writer is done). `ws` is already authenticated and subscribed. A plan with a writer
/// must have been counted in `shared.writers_open`.
pub async fn run(mut plan: ClientPlan, ws: Ws, shared: Arc<Shared>) {
    let stats = &shared.stats;
    let mut ws = Some(ws);
    Stats::add(&stats.open, 1);
    let mut writer_open = plan.writer.is_some();
    let mut done_seen = false;
    let mut attempt: u32 = 0;
    let mut retry_at: Option<Instant> = None;
    let mut gave_up = false;
    // A slow reader's next frame may be read at this time.
    let mut read_at: Option<Instant> = None;

    loop {
        let due = match (&ws, &plan.writer) {
            (Some(_), Some(w)) if writer_open => w.next_due().map(|ns| shared.clock.instant(ns)),
            _ => None,
        };
        tokio::select! {
            biased;
            () = shared.stop.cancelled() => break,
            () = shared.stop_writes.cancelled(), if writer_open => {
                if let Some(w) = plan.writer.as_mut() {
                    w.finish(stats);
                }
                close_writer(&mut writer_open, &shared);
            }
            () = shared.writers_done.cancelled(), if !done_seen => {
                done_seen = true;
                settle(&mut plan, &shared);
            }
            () = sleep_until(due), if due.is_some() => {
                if let (Some(socket), Some(w)) = (ws.as_mut(), plan.writer.as_mut())
                    && let Err(fail) = send_due(socket, w, &shared).await
                {
                    disconnected(&mut ws, &mut plan, &shared, fail, &mut retry_at, &mut attempt);
                }
            }
            () = sleep_until(retry_at), if ws.is_none() && retry_at.is_some() => {
                let attempt_result = tokio::select! {
                    r = reconnect(&mut plan, &shared) => Some(r),
                    () = shared.stop.cancelled() => None,
                };
                match attempt_result {
                    None => break,
                    Some(Ok(socket)) => {
                        ws = Some(socket);
                        retry_at = None;
                        attempt = 0;
                        Stats::add(&stats.open, 1);
                        Stats::add(&stats.established, 1);
                        Stats::add(&stats.reconnects, 1);
                    }
                    Some(Err(fail)) => {
                        stats.error(&fail.code);
                        if let Some(code) = fail.close {
                            stats.close(code);
                        }
                        if fail.retry {
                            attempt = attempt.saturating_add(1);
                            retry_at = Some(Instant::now() + backoff(attempt));
                        } else {
                            retry_at = None;
                            gave_up = true;
                        }
                    }
                }
            }
            message = next_message(&mut ws, read_at) => {
                if let Some(interval) = plan.read_interval {
                    read_at = Some(Instant::now() + interval);
                }
                match message {
                    Some(Ok(Message::Text(text))) => on_text(&mut plan, text.as_str(), &shared),
                    Some(Ok(Message::Close(frame))) => {
                        let fail = Fail::closed(
                            frame.as_ref().map(|f| u16::from(f.code)),
                            &frame.map(|f| f.reason.to_string()).unwrap_or_default(),
                        );
                        disconnected(&mut ws, &mut plan, &shared, fail, &mut retry_at, &mut attempt);
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        let fail = Fail::lost(e.to_string());
                        disconnected(&mut ws, &mut plan, &shared, fail, &mut retry_at, &mut attempt);
                    }
                    None => {
                        let fail = Fail::lost("socket ended");
                        disconnected(&mut ws, &mut plan, &shared, fail, &mut retry_at, &mut attempt);
                    }
                }
            }
        }
        if writer_open && plan.writer.as_ref().is_some_and(Writer::is_complete) {
            close_writer(&mut writer_open, &shared);
        }
        if ws.is_none() && retry_at.is_none() {
            gave_up = true;
        }
        if gave_up {
            break;
        }
        if !writer_open && plan.subscription.is_none() {
            // A writer-only connection has nothing left to do.
            break;
        }
    }

    if writer_open {
        if let Some(w) = plan.writer.as_mut() {
            w.finish(stats);
        }
        close_writer(&mut writer_open, &shared);
    }
    settle(&mut plan, &shared);
    book_final_state(&plan, stats);
    if let Some(socket) = ws {
        Stats::sub_open(stats);
        conn::close(socket).await;
    }
}

fn close_writer(writer_open: &mut bool, shared: &Shared) {
    if *writer_open {
        *writer_open = false;
        shared.writers_open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn backoff(attempt: u32) -> Duration {
    let base = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(5))
        .min(BACKOFF_MAX);
    let jitter = rand::random_range(0.0..0.5);
    base.mul_f64(1.0 + jitter)
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The next frame, not before `read_at` (a slow reader's pace).
async fn next_message(
    ws: &mut Option<Ws>,
    read_at: Option<Instant>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match ws {
        Some(ws) => {
            if let Some(at) = read_at {
                tokio::time::sleep_until(at.into()).await;
            }
            ws.next().await
        }
        None => std::future::pending().await,
    }
}

/// Whether the subscription ended having seen each writer's last committed write.
fn book_final_state(plan: &ClientPlan, stats: &Stats) {
    if plan.follows.is_empty() {
        return;
    }
    let at_final = plan.follows.iter().all(Coverage::has_final_state);
    Stats::add(&stats.subscribers, 1);
    Stats::add(&stats.subscribers_final, u64::from(at_final));
    if plan.read_interval.is_some() {
        Stats::add(&stats.slow_subscribers, 1);
        Stats::add(&stats.slow_subscribers_final, u64::from(at_final));
    }
}

/// Sends every update that is due (all at once when behind: open loop).
async fn send_due(ws: &mut Ws, writer: &mut Writer, shared: &Shared) -> Result<(), Fail> {
    let now = shared.clock.now();
    let mut sent = false;
    while let Some(due) = writer.next_due() {
        if due > now {
            break;
        }
        let frame = writer.next_frame(&shared.clock, &shared.stats);
        ws.feed(Message::text(frame))
            .await
            .map_err(|e| Fail::lost(e.to_string()))?;
        sent = true;
    }
    if sent {
        ws.flush().await.map_err(|e| Fail::lost(e.to_string()))?;
    }
    Ok(())
}

fn disconnected(
    ws: &mut Option<Ws>,
    plan: &mut ClientPlan,
    shared: &Shared,
    fail: Fail,
    retry_at: &mut Option<Instant>,
    attempt: &mut u32,
) {
    if ws.take().is_some() {
        Stats::sub_open(&shared.stats);
    }
    if let Some(w) = plan.writer.as_mut() {
        w.on_disconnect(&shared.stats);
    }
    if shared.stop.is_cancelled() {
        *retry_at = None;
        return;
    }
    shared.stats.error(&fail.code);
    if let Some(code) = fail.close {
        shared.stats.close(code);
    }
    if fail.retry {
        *attempt = 0;
        *retry_at = Some(Instant::now() + backoff(0));
    } else {
        *retry_at = None;
    }
}

async fn reconnect(plan: &mut ClientPlan, shared: &Shared) -> Result<Ws, Fail> {
    let (mut ws, ready) = conn::connect_auth(&plan.url, &plan.token, &plan.connect).await?;
    shared.stats.features_on(&ready.features);
    if let Some(dataset) = plan.subscription.clone() {
        let follows = &mut plan.follows;
        let slot = plan.slot;
        let mut other = |kind: Kind, text: &str| observe(follows, slot, kind, text, shared);
        let snapshot = conn::subscribe(&mut ws, &dataset, &mut other).await?;
        observe(follows, slot, Kind::Snapshot, &snapshot, shared);
    }
    Ok(ws)
}

fn on_text(plan: &mut ClientPlan, text: &str, shared: &Shared) {
    let stats = &shared.stats;
    match conn::kind(text) {
        kind @ (Kind::Dataset | Kind::Delta | Kind::Snapshot) => {
            observe(&mut plan.follows, plan.slot, kind, text, shared);
        }
        kind @ (Kind::Ack | Kind::Conflict | Kind::Error) => {
            let reply = conn::parse_reply(text).unwrap_or_default();
            match plan.writer.as_mut() {
                Some(w) if w.owns(reply.id) => {
                    w.on_reply(kind, &reply, shared.clock.now(), plan.slot, stats);
                    // Its own push may have come first (it is in the room it writes to).
                    settle(plan, shared);
                }
                _ if kind == Kind::Error => {
                    stats.error(reply.code.as_deref().unwrap_or("error"));
                }
                _ => {}
            }
        }
        Kind::Deleted => stats.error("deleted"),
        Kind::Unsubscribed => stats.error("unsubscribed"),
        Kind::Ready | Kind::Other => {}
    }
}

/// Books the markers of a `dataset`, `delta` or `snapshot` frame as coverage, then settles.
fn observe(follows: &mut [Coverage], slot: usize, kind: Kind, text: &str, shared: &Shared) {
    if follows.is_empty() {
        return;
    }
    let now = shared.clock.now();
    let stats = &shared.stats;
    let bytes = text.len() as u64;
    match kind {
        Kind::Dataset | Kind::Delta => {
            Stats::add(&stats.push_frames, 1);
            Stats::add(&stats.push_bytes, bytes);
            Stats::add(&stats.delta_frames, u64::from(kind == Kind::Delta));
        }
        Kind::Snapshot => {
            Stats::add(&stats.snapshot_frames, 1);
            Stats::add(&stats.snapshot_bytes, bytes);
        }
        _ => return,
    }
    marker::scan(text, follows.len(), |index, seq| {
        if let Some(coverage) = follows.get_mut(index) {
            coverage.observe(seq, now);
        }
    });
    settle_follows(follows, slot, shared);
}

fn settle(plan: &mut ClientPlan, shared: &Shared) {
    settle_follows(&mut plan.follows, plan.slot, shared);
}

fn settle_follows(follows: &mut [Coverage], slot: usize, shared: &Shared) {
    if follows.iter().all(Coverage::is_settled) {
        return;
    }
    let delivered = {
        let mut latency = shared.stats.delivery.shard(slot);
        follows.iter_mut().map(|c| c.settle(&mut latency)).sum()
    };
    Stats::add(&shared.stats.delivered, delivered);
}
