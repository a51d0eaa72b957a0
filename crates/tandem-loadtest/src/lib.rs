//! Tandem's load-test harness: scenarios that drive a running server over real WebSockets
//! and report what it sustained. It owns the scenarios, open-loop scheduling, the
//! counting and the report; it does not start servers or tune them, and it holds no sync
//! logic (it speaks the wire protocol of `tandem-protocol` like any client).
//!
//! Scenarios: `fanout` (one dataset, S subscribers, one writer at R updates/s, a document
//! of P bytes), `rooms` (G groups of K users sharing one dataset each, every user writing
//! its own key at r/s), `idle` (C connections authenticated and subscribed, then quiet;
//! the server's memory per connection with `--server-pid`), `connect` (connect + auth +
//! subscribe rate), `write` (W writers each on its own dataset: durable commits/s and
//! commit latency), `cognito` (W Cognito identities sending SigV4-signed UpdateRecords,
//! and optionally ListRecords, over HTTP/1.1: commits/s and latency through the REST API).
//!
//! **Open loop.** Each writer's updates are scheduled at fixed times (start + i/R, rooms
//! with a seeded random phase per user) and sent at those times whatever the replies; a
//! writer that falls behind sends at once and its latencies still run from the scheduled
//! times (coordinated omission corrected). A writer that shares its dataset (`rooms`) must
//! know its record's sync count, so it keeps one update in flight; a late update is sent
//! as soon as the previous reply is in and shows up as latency.
//!
//! **Counting.** Every update carries a marker record (`lt<i>` = `<seq>:<scheduled unix
//! ns>`), which subscribers find by a plain text search of the push (`dataset` or, with the
//! `delta` feature every connection asks for unless `--no-delta`, `delta`). The server
//! coalesces pushes for slow readers (at most one pending per dataset, deltas merged), so a
//! subscriber may skip seqs: a push showing writer `w` at `seq` **covers** every write of
//! `w` up to `seq`.
//! A committed write scheduled after the warmup counts as delivered to a subscriber
//! once, at the first push or snapshot that covers it; its latency is that push's
//! receive time minus the write's scheduled send time. Expected deliveries are committed
//! measured writes × the dataset's subscribers; a write is lost for a subscriber only if
//! nothing covered it by the end of the drain period. Refused, unsent and unanswered
//! writes are neither expected nor delivered (they are reported on their own).
//!
//! Every loop is bounded by a count and a deadline: writers by their schedule, the drain
//! by `--drain`, connection set-up by its count (and `--duration` in `connect`), so a run
//! ends by itself.

pub mod cli;
pub mod client;
pub mod cognito;
pub mod conn;
pub mod error;
pub mod host;
pub mod http;
pub mod ledger;
pub mod marker;
pub mod report;
pub mod run;
pub mod scenario;
pub mod sigv4;
pub mod stats;
pub mod stream;
pub mod token;
pub mod writer;

pub use cli::{Cli, Scenario};
pub use error::LoadError;
pub use report::Report;

/// The whole command: runs `cli` on a new multi-threaded runtime and prints the report (a
/// table, or one JSON object with `--json`). Exit status: 0 on a completed run, also with
/// loss or errors (they are in the report); 1 when the run could not be set up; 2 on bad
/// options. Shared by `tandem-loadtest` and `tandem load`; `name` prefixes error lines.
pub fn main_with(cli: Cli, name: &str) -> std::process::ExitCode {
    use std::process::ExitCode;
    let json = cli.common.json;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(report) => {
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            ExitCode::SUCCESS
        }
        Err(e @ LoadError::Options(_)) => {
            eprintln!("{name}: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the scenario the command line names and returns its report. Must be called on a
/// multi-threaded tokio runtime.
pub async fn run(cli: Cli) -> Result<Report, LoadError> {
    let mut run = run::Run::new(&cli)?;
    let sink = match cli.common.stream_listen {
        Some(addr) => Some(stream::StreamSink::start(addr).await.map_err(|e| {
            LoadError::Options(format!("--stream-listen {addr}: cannot listen: {e}"))
        })?),
        None => None,
    };
    let finished = match &cli.scenario {
        Scenario::Fanout(args) => scenario::fanout(&mut run, args).await,
        Scenario::Rooms(args) => scenario::rooms(&mut run, args).await,
        Scenario::Idle(args) => scenario::idle(&mut run, args).await,
        Scenario::Connect(args) => scenario::connect(&mut run, args).await,
        Scenario::Write(args) => scenario::write(&mut run, args).await,
        Scenario::Cognito(args) => cognito::cognito(&mut run, args).await,
    };
    match finished {
        Ok(f) => {
            let mut report = run
                .report(
                    &cli.scenario,
                    f.measured,
                    &f.ledgers,
                    f.writes,
                    f.deliveries,
                    f.rss_end,
                )
                .await;
            report.stream = sink.map(|s| s.report());
            Ok(report)
        }
        Err(e) => {
            run.abort().await;
            Err(e)
        }
    }
}
