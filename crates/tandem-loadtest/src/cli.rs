//! The command line: options every scenario shares, then one subcommand per scenario.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Duration;

/// The gateway a run talks to when no `--url` is given (the server's default listen address).
pub const DEFAULT_URL: &str = "ws://127.0.0.1:7420/v1/sync";

#[derive(Debug, Clone, Parser)]
#[command(
    name = "tandem-loadtest",
    version,
    about = "Load-test a Tandem server: fan-out, rooms, idle, connect, write and cognito scenarios",
    after_help = "Latency runs from each write's scheduled send time (open loop) to the moment a \
subscriber receives a push that contains it. A push covers every earlier write of its writer, so \
coalesced pushes still count; a write is lost for a subscriber only if no push or snapshot covered \
it by the end of the drain period."
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// Options shared by every scenario (they may be given before or after the scenario name).
#[derive(Debug, Clone, Args, Serialize)]
pub struct Common {
    /// Gateway WebSocket URL; repeat for several gateways (connections go round-robin; give
    /// all of them on the same side of the scenario name). `ws://host:port` gets the
    /// `/v1/sync` path added; `http(s)://` becomes `ws(s)://`.
    #[arg(long = "url", global = true, default_value = DEFAULT_URL)]
    pub urls: Vec<String>,
    /// HS256 secret to mint one token per load-test identity (the server's --jwt-secret).
    #[arg(long, global = true, env = "TANDEM_JWT_SECRET", hide_env_values = true)]
    #[serde(skip)]
    pub secret: Option<String>,
    /// A file holding the HS256 secret (e.g. the server data dir's `jwt-secret`).
    #[arg(long, global = true)]
    pub secret_file: Option<PathBuf>,
    /// A file of tokens, one per line; connection i uses line i mod n, and identities are
    /// whatever the tokens name.
    #[arg(long, global = true, conflicts_with_all = ["secret", "secret_file"])]
    pub token_file: Option<PathBuf>,
    /// `iss` claim for minted tokens (when the server requires one).
    #[arg(long, global = true)]
    pub jwt_issuer: Option<String>,
    /// `aud` claim for minted tokens (when the server requires one).
    #[arg(long, global = true)]
    pub jwt_audience: Option<String>,
    /// Measured sending time (after the warmup): 500ms, 30s, 5m.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub duration: Duration,
    /// Sending time before the measured window; its writes are sent but not counted.
    #[arg(long, global = true, default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub warmup: Duration,
    /// Time after the last scheduled send to wait for the last replies and pushes.
    #[arg(long, global = true, default_value = "5s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub drain: Duration,
    /// Print one JSON object with the report instead of the table.
    #[arg(long, global = true)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, global = true)]
    pub quiet: bool,
    /// New connections per second while setting up (0 = as fast as the concurrency allows).
    #[arg(long, global = true, default_value_t = 0.0)]
    pub connect_rate: f64,
    /// Connection handshakes in flight at once while setting up.
    #[arg(long, global = true, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Seed for the writers' start phases (default: random, reported).
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// Prefix of identities and dataset names, unique per run by default
    /// (`[a-zA-Z0-9_.:-]`, at most 64 characters).
    #[arg(long, global = true)]
    pub prefix: Option<String>,
    /// The server's process id, to read its memory (VmRSS) and CPU time from /proc on this
    /// machine. Repeat it (or give a comma-separated list) for several nodes: summed.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        conflicts_with = "server_metrics"
    )]
    pub server_pid: Vec<u32>,
    /// A node's metrics URL (`http://HOST:PORT/metrics`), to read its memory
    /// (`process_resident_memory_bytes`) where its pid is out of reach.
    #[arg(long, global = true)]
    pub server_metrics: Option<String>,
    /// Do not ask for the `delta` feature: subscribers get whole `dataset` frames (the
    /// protocol's default), e.g. to compare push sizes with and without deltas.
    #[arg(long, global = true)]
    pub no_delta: bool,
    /// Do not ask for the `lean` feature: records in server frames carry every field.
    #[arg(long, global = true)]
    pub no_lean: bool,
    /// Run a change stream webhook on this address during the run and report the stream's
    /// lag (commit to arrival) and redeliveries; start the node with
    /// `--stream-webhook NAME=http://ADDR/`.
    #[arg(long, global = true)]
    pub stream_listen: Option<std::net::SocketAddr>,
}

impl Common {
    /// The `auth` features every connection asks for: `delta` and `lean` unless turned off.
    pub fn features(&self) -> Vec<String> {
        let mut features = Vec::new();
        if !self.no_delta {
            features.push(tandem_protocol::FEATURE_DELTA.to_owned());
        }
        if !self.no_lean {
            features.push(tandem_protocol::FEATURE_LEAN.to_owned());
        }
        features
    }
}

#[derive(Debug, Clone, Subcommand, Serialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum Scenario {
    /// One dataset, S subscribers, one writer at R updates/s, document of P bytes.
    Fanout(FanoutArgs),
    /// G groups of K users sharing one dataset each; every user writes its own key at r/s
    /// and subscribes to its group's dataset.
    Rooms(RoomsArgs),
    /// C connections authenticated and subscribed, then quiet; reports the server's memory
    /// per connection with --server-pid or --server-metrics.
    Idle(IdleArgs),
    /// N connections, each connect + auth + subscribe: rate and latency of setting up.
    Connect(ConnectArgs),
    /// W writers each on its own dataset at R updates/s: durable commits/s and commit latency.
    Write(WriteArgs),
    /// W writers, each its own Cognito identity and dataset, sending SigV4-signed
    /// UpdateRecords at R/s (and ListRecords at L/s) over HTTP/1.1: commits/s and latency.
    Cognito(CognitoArgs),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::Fanout(_) => "fanout",
            Scenario::Rooms(_) => "rooms",
            Scenario::Idle(_) => "idle",
            Scenario::Connect(_) => "connect",
            Scenario::Write(_) => "write",
            Scenario::Cognito(_) => "cognito",
        }
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct FanoutArgs {
    /// Subscriber connections.
    #[arg(long, default_value_t = 10)]
    pub subscribers: usize,
    /// Updates per second from the one writer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Bytes of the document (filler records pad the dataset to about this size).
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    /// Records in the document: the writer's marker and N-1 filler records of about equal
    /// size (default: the marker and one filler). Only the marker changes on each write.
    #[arg(long)]
    pub records: Option<usize>,
    /// Slow readers read at most this many frames per second from their socket (they sleep
    /// between reads), so the server has to conflate their pushes.
    #[arg(long)]
    pub read_rate: Option<f64>,
    /// Which subscribers read at --read-rate: a count (`50`), a fraction (`0.1`) or a
    /// percentage (`10%`) of --subscribers, the first ones. Default: all of them.
    #[arg(long, requires = "read_rate", value_parser = parse_slow_readers)]
    pub slow_readers: Option<SlowReaders>,
    /// Receive buffer (SO_RCVBUF, bytes) of the slow readers' sockets; the kernel doubles it.
    /// Default: the system's (autotuned, up to megabytes, which hides slowness for a while).
    #[arg(long, requires = "read_rate")]
    pub recv_buffer: Option<u32>,
}

/// Which fan-out subscribers read slowly.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowReaders {
    Count(usize),
    Fraction(f64),
}

impl SlowReaders {
    /// How many of `total` subscribers.
    pub fn of(self, total: usize) -> usize {
        match self {
            SlowReaders::Count(n) => n.min(total),
            SlowReaders::Fraction(f) => ((f * total as f64).round() as usize).min(total),
        }
    }
}

/// `50` (a count), `0.1` (a fraction), `10%` (a percentage) or `all`.
pub fn parse_slow_readers(s: &str) -> Result<SlowReaders, String> {
    let s = s.trim();
    let bad = || {
        format!(
            "invalid --slow-readers `{s}`: expected a count (50), a fraction (0.1), a percentage (10%) or `all`"
        )
    };
    if s == "all" {
        return Ok(SlowReaders::Fraction(1.0));
    }
    let fraction = if let Some(percent) = s.strip_suffix('%') {
        percent.trim().parse::<f64>().map_err(|_| bad())? / 100.0
    } else if s.contains('.') {
        s.parse::<f64>().map_err(|_| bad())?
    } else {
        return s.parse().map(SlowReaders::Count).map_err(|_| bad());
    };
    if (0.0..=1.0).contains(&fraction) {
        Ok(SlowReaders::Fraction(fraction))
    } else {
        Err(bad())
    }
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct RoomsArgs {
    /// Groups, one shared dataset each.
    #[arg(long, default_value_t = 10)]
    pub groups: usize,
    /// Users per group; each writes and subscribes.
    #[arg(long, default_value_t = 5)]
    pub group_size: usize,
    /// Updates per second from each user.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Bytes of each group's document.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Records in each group's document: one marker per member and filler records of about
    /// equal size for the rest (default: the markers and one filler).
    #[arg(long)]
    pub records: Option<usize>,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct IdleArgs {
    /// Connections to open and hold.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
    /// How long to hold them quiet once all are set up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "as_secs")]
    pub idle_for: Duration,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct ConnectArgs {
    /// Connections to set up (each: WebSocket upgrade, auth, subscribe); --duration bounds
    /// the whole attempt.
    #[arg(long, default_value_t = 100)]
    pub connections: usize,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct WriteArgs {
    /// Writers, each with its own identity, connection and dataset.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Updates per second from each writer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Bytes of each writer's document.
    #[arg(long, default_value_t = 256)]
    pub size: usize,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct CognitoArgs {
    /// The node's Cognito identity pool (its --cognito-identity-pool).
    #[arg(long)]
    pub pool: String,
    /// Writers, each with its own identity, credentials, connection and dataset.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Signed UpdateRecords per second from each writer.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,
    /// Signed ListRecords per second from each writer, on a second connection (0 = none).
    #[arg(long, default_value_t = 0.0)]
    pub list_rate: f64,
}

/// `500ms`, `90s`, `30m`, `1h`, `1.5s`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration `{s}`: expected e.g. 500ms, 30s, 5m"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("invalid duration unit `{other}` in `{s}`")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cli_common_options_go_before_or_after_the_scenario() {
        let cli = Cli::try_parse_from([
            "tandem-loadtest",
            "--url",
            "ws://a/v1/sync",
            "--url",
            "ws://b/v1/sync",
            "fanout",
            "--subscribers",
            "5",
            "--duration",
            "1500ms",
        ])
        .unwrap();
        assert_eq!(cli.common.urls, ["ws://a/v1/sync", "ws://b/v1/sync"]);
        assert_eq!(cli.common.duration, Duration::from_millis(1500));
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("not fanout");
        };
        assert_eq!(args.subscribers, 5);
        let cli = Cli::try_parse_from(["tandem-loadtest", "write", "--json"]).unwrap();
        assert!(cli.common.json);
        assert_eq!(cli.common.urls, [DEFAULT_URL]);
    }

    #[test]
    fn test_cli_features_default_to_delta_and_lean() {
        let cli = Cli::try_parse_from(["tandem-loadtest", "fanout"]).unwrap();
        assert_eq!(cli.common.features(), ["delta", "lean"]);
        let cli = Cli::try_parse_from(["tandem-loadtest", "fanout", "--no-delta"]).unwrap();
        assert_eq!(cli.common.features(), ["lean"]);
        let cli =
            Cli::try_parse_from(["tandem-loadtest", "--no-lean", "rooms", "--no-delta"]).unwrap();
        assert!(cli.common.features().is_empty());
    }

    #[test]
    fn test_cli_fanout_slow_reader_options_parse() {
        let cli = Cli::try_parse_from([
            "tandem-loadtest",
            "fanout",
            "--records",
            "20",
            "--read-rate",
            "20",
            "--slow-readers",
            "10%",
            "--recv-buffer",
            "8192",
        ])
        .unwrap();
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("not fanout");
        };
        assert_eq!(args.records, Some(20));
        assert_eq!(args.read_rate, Some(20.0));
        assert_eq!(args.slow_readers, Some(SlowReaders::Fraction(0.1)));
        assert_eq!(args.recv_buffer, Some(8192));
        // --slow-readers means nothing without a read rate.
        assert!(Cli::try_parse_from(["tandem-loadtest", "fanout", "--slow-readers", "5"]).is_err());
        let cli = Cli::try_parse_from(["tandem-loadtest", "rooms", "--records", "8"]).unwrap();
        let Scenario::Rooms(args) = cli.scenario else {
            panic!("not rooms");
        };
        assert_eq!(args.records, Some(8));
    }

    #[test]
    fn test_cli_slow_readers_parse_counts_fractions_and_percentages() {
        assert_eq!(parse_slow_readers("50").unwrap(), SlowReaders::Count(50));
        assert_eq!(
            parse_slow_readers("0.25").unwrap(),
            SlowReaders::Fraction(0.25)
        );
        assert_eq!(
            parse_slow_readers("10%").unwrap(),
            SlowReaders::Fraction(0.1)
        );
        assert_eq!(
            parse_slow_readers("all").unwrap(),
            SlowReaders::Fraction(1.0)
        );
        assert!(parse_slow_readers("1.5").is_err());
        assert!(parse_slow_readers("150%").is_err());
        assert!(parse_slow_readers("-3").is_err());
        assert!(parse_slow_readers("some").is_err());
        assert_eq!(SlowReaders::Count(50).of(10), 10);
        assert_eq!(SlowReaders::Fraction(0.25).of(10), 3);
        assert_eq!(SlowReaders::Fraction(1.0).of(1000), 1000);
    }

    #[test]
    fn test_cli_durations_parse() {
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
