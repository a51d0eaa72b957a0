//! Command line, environment and TOML file settings. Precedence: flags > `TANDEM_*` env >
//! the file named by `--config` > defaults. Unknown file keys are an error.

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(
    name = "tandem",
    version,
    about = "Tandem: self-hosted real-time data sync"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sync service.
    Serve(ServeArgs),
    /// Mint an HS256 token with the server's secret (the data dir's, or --jwt-secret).
    Token(TokenArgs),
    /// Load-test a running deployment (the `tandem-loadtest` harness, built in): fanout,
    /// rooms, idle, connect, write.
    Load(Box<tandem_loadtest::Cli>),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// A TOML file; its data_dir, jwt_secret, jwt_secret_file, jwt_issuer and jwt_audience
    /// are used.
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    /// The identity the token names (`sub`).
    #[arg(long)]
    pub sub: String,
    /// How long the token is valid: 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: HumanDuration,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Plain,
    Json,
}

/// Every setting, all optional so that the sources can be layered.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on [default: 127.0.0.1:7420].
    #[arg(long, env = "TANDEM_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory for the database and the generated secret [default: ./tandem-data].
    #[arg(long, env = "TANDEM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// The store: `sqlite` (embedded, in the data dir) or a `postgres://` URL [default: sqlite].
    #[arg(long, env = "TANDEM_STORE")]
    pub store: Option<String>,
    /// PostgreSQL schema for Tandem's tables [default: tandem].
    #[arg(long, env = "TANDEM_POSTGRES_SCHEMA")]
    pub postgres_schema: Option<String>,
    /// PostgreSQL connections per node [default: 16].
    #[arg(long, env = "TANDEM_POSTGRES_POOL_SIZE")]
    pub postgres_pool_size: Option<usize>,
    /// How long start-up keeps retrying a PostgreSQL that cannot be reached before it gives
    /// up; 0 gives up at once [default: 60s].
    #[arg(long, env = "TANDEM_STORE_WAIT")]
    pub store_wait: Option<HumanDuration>,
    /// A `redis://` URL for fan-out between nodes [default: none, in-process fan-out].
    #[arg(long, env = "TANDEM_REDIS")]
    pub redis: Option<String>,
    /// Prefix of Tandem's Redis channels [default: tandem].
    #[arg(long, env = "TANDEM_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// HS256 secret (at least 32 bytes).
    #[arg(long, env = "TANDEM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A file holding the HS256 secret.
    #[arg(long, env = "TANDEM_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM files with RSA public keys for RS256 tokens (repeat or comma-separate).
    #[arg(
        long = "jwt-rsa-public-key",
        env = "TANDEM_JWT_RSA_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_rsa_public_keys: Option<Vec<PathBuf>>,
    /// PEM files with EC P-256 public keys for ES256 tokens (repeat or comma-separate).
    #[arg(
        long = "jwt-ec-public-key",
        env = "TANDEM_JWT_EC_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_ec_public_keys: Option<Vec<PathBuf>>,
    /// Required `iss` claim.
    #[arg(long, env = "TANDEM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "TANDEM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock leeway for exp/nbf [default: 30s].
    #[arg(long, env = "TANDEM_JWT_LEEWAY")]
    pub jwt_leeway: Option<HumanDuration>,

    /// Datasets one identity may own [default: 20].
    #[arg(long, env = "TANDEM_MAX_DATASETS")]
    pub max_datasets: Option<u64>,
    /// Live records in one dataset [default: 1024].
    #[arg(long, env = "TANDEM_MAX_RECORDS")]
    pub max_records: Option<u64>,
    /// Bytes of keys and values in one dataset [default: 1048576].
    #[arg(long, env = "TANDEM_MAX_DATASET_BYTES")]
    pub max_dataset_bytes: Option<u64>,
    /// Characters in a record key [default: 1024].
    #[arg(long, env = "TANDEM_MAX_KEY_LENGTH")]
    pub max_key_length: Option<u64>,
    /// Patches in one update [default: 1024].
    #[arg(long, env = "TANDEM_MAX_PATCHES")]
    pub max_patches: Option<u64>,
    /// Characters in a device id [default: 128].
    #[arg(long, env = "TANDEM_MAX_DEVICE_ID_LENGTH")]
    pub max_device_id_length: Option<u64>,
    /// Bytes in one WebSocket frame [default: 2097152].
    #[arg(long, env = "TANDEM_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<usize>,
    /// Subscriptions on one connection [default: 100].
    #[arg(long, env = "TANDEM_MAX_SUBSCRIPTIONS")]
    pub max_subscriptions: Option<usize>,
    /// Unread replies queued for one connection before it is closed as slow [default: 1024].
    #[arg(long, env = "TANDEM_MAX_QUEUED_REPLIES")]
    pub max_queued_replies: Option<usize>,
    /// Frames one connection may send per second, in bursts of as many; 0 = unlimited
    /// [default: 1000].
    #[arg(long, env = "TANDEM_MAX_REQUESTS_PER_SECOND")]
    pub max_requests_per_second: Option<u32>,
    /// WebSocket read buffer per connection, bytes [default: 1024]; small keeps idle
    /// connections cheap, larger reads big frames in fewer system calls.
    #[arg(long, env = "TANDEM_READ_BUFFER_BYTES")]
    pub read_buffer_bytes: Option<usize>,
    /// WebSocket write buffer per connection, bytes [default: 4096].
    #[arg(long, env = "TANDEM_WRITE_BUFFER_BYTES")]
    pub write_buffer_bytes: Option<usize>,
    /// Time allowed to authenticate after connecting [default: 10s].
    #[arg(long, env = "TANDEM_AUTH_TIMEOUT")]
    pub auth_timeout: Option<HumanDuration>,
    /// Time one socket write may take before the connection is closed as slow [default: 10s].
    #[arg(long, env = "TANDEM_WRITE_TIMEOUT")]
    pub write_timeout: Option<HumanDuration>,
    /// Time sessions get to close at shutdown [default: 10s].
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<HumanDuration>,
    /// Dev mode (loopback only): `GET /dev/token?sub=NAME` mints demo tokens for anyone.
    #[arg(long, env = "TANDEM_DEV", num_args = 0..=1, default_missing_value = "true")]
    pub dev: Option<bool>,
    /// Log format [default: plain]; the level comes from RUST_LOG [default: info].
    #[arg(long, env = "TANDEM_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
}

macro_rules! layer {
    ($a:expr, $b:expr, $($field:ident),+ $(,)?) => {
        Settings { $($field: $a.$field.or($b.$field)),+ }
    };
}

impl Settings {
    /// Fills every setting missing here from `lower`.
    pub fn or(self, lower: Settings) -> Settings {
        layer!(
            self,
            lower,
            listen,
            data_dir,
            store,
            postgres_schema,
            postgres_pool_size,
            store_wait,
            redis,
            redis_prefix,
            jwt_secret,
            jwt_secret_file,
            jwt_rsa_public_keys,
            jwt_ec_public_keys,
            jwt_issuer,
            jwt_audience,
            jwt_leeway,
            max_datasets,
            max_records,
            max_dataset_bytes,
            max_key_length,
            max_patches,
            max_device_id_length,
            max_frame_bytes,
            max_subscriptions,
            max_queued_replies,
            max_requests_per_second,
            read_buffer_bytes,
            write_buffer_bytes,
            auth_timeout,
            write_timeout,
            shutdown_grace,
            dev,
            log_format,
        )
    }

    /// Reads a TOML settings file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Settings::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Settings, toml::de::Error> {
        toml::from_str(text)
    }

    /// Layers the optional file under these settings (which came from flags and env).
    pub fn with_file(self, file: Option<&std::path::Path>) -> anyhow::Result<Settings> {
        match file {
            Some(path) => Ok(self.or(Settings::from_file(path)?)),
            None => Ok(self),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("tandem-data"))
    }

    pub fn listen(&self) -> SocketAddr {
        self.listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 7420)))
    }
}

/// A duration written as `500ms`, `90s`, `30m`, `1h`, `7d`, or plain seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration `{s}`: expected e.g. 90s, 30m, 1h"))?;
        let secs = match unit.trim() {
            "ms" => return Ok(HumanDuration(Duration::from_millis(n))),
            "" | "s" => n,
            "m" => n.saturating_mul(60),
            "h" => n.saturating_mul(3600),
            "d" => n.saturating_mul(86_400),
            other => return Err(format!("invalid duration unit `{other}` in `{s}`")),
        };
        Ok(HumanDuration(Duration::from_secs(secs)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(HumanDuration(Duration::from_secs(n))),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_flags_win_over_file() {
        let file = Settings::from_toml(
            "listen = \"127.0.0.1:9000\"\nmax_records = 7\nauth_timeout = \"3s\"\n",
        )
        .unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:9001".parse().unwrap()),
            ..Settings::default()
        };
        let merged = flags.or(file);
        assert_eq!(merged.listen().port(), 9001);
        assert_eq!(merged.max_records, Some(7));
        assert_eq!(
            merged.auth_timeout,
            Some(HumanDuration(Duration::from_secs(3)))
        );
    }

    #[test]
    fn test_config_unknown_file_key_is_an_error() {
        let err = Settings::from_toml("listn = \"127.0.0.1:9000\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn test_config_durations_parse() {
        assert_eq!(
            "90s".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(90)
        );
        assert_eq!(
            "1h".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(3600)
        );
        assert_eq!(
            "250ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(250)
        );
        assert_eq!(
            "15".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(15)
        );
        assert!("1y".parse::<HumanDuration>().is_err());
        assert!("".parse::<HumanDuration>().is_err());
    }
}
