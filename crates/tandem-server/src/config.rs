//! Command line, environment and TOML file settings. Precedence: flags > `TANDEM_*` env >
//! the file named by `--config` > defaults. Unknown file keys are an error.
//!
//! Each crate owns its section of [`Settings`]: [`ServerConfig`] here (listening, backends,
//! keys, logging), [`GatewayConfig`] (per-connection limits and timeouts), the store's
//! [`Limits`], the gateway's [`CognitoConfig`] and the change stream's [`StreamConfig`]. A
//! section is a plain struct whose `Default` is the only place a default is written; serde reads it from the file (missing keys keep the default), and its clap
//! derive makes each field a flag and a `TANDEM_*` variable with the field's doc as help.
//! So adding a setting is one field (doc, `#[arg(long, env = "TANDEM_NAME")]`) and its value
//! in that struct's `Default`, plus its row in the docs; the help shows the default, the
//! file accepts the key and the binary receives it in its section without further edits.
//!
//! Layering: the file (or nothing) is deserialized into the sections first, then clap's
//! matches of the flags and variables are applied over it ([`SettingFlags`]): those args are
//! never required, so a setting that is not given leaves the file's value or the default.

use clap::{ArgMatches, Args, FromArgMatches, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_gateway::config::duration;
use tandem_gateway::{CognitoConfig, GatewayConfig};
use tandem_store::{Limits, PostgresConfig};
use tandem_stream::StreamConfig;

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
    /// Check the SQLite database in the data dir for damage (the full `PRAGMA
    /// integrity_check`), with the settings `serve` would use; exits 0 when it is intact,
    /// 1 otherwise.
    Check(ServeArgs),
    /// Load-test a running deployment (the `tandem-loadtest` harness, built in): fanout,
    /// rooms, idle, connect, write.
    Load(Box<tandem_loadtest::Cli>),
    /// The change stream: replay the current state into it, list its consumers, show their
    /// dead letters, forget one (docs/HOOKS.md).
    Stream(StreamArgs),
    /// Writes everything the store holds (identities, logins, datasets with their records,
    /// tombstones and deleted ones included, grants) as a versioned JSON Lines dump, to stdout
    /// or --out. A SQLite data dir may be served meanwhile (docs/OPERATIONS.md).
    Export(crate::dump::ExportArgs),
    /// Imports a dump into an empty store of either backend, exactly as it was; resumable
    /// after an interruption (run it again with the same file).
    Import(crate::dump::ImportArgs),
    /// Copies the SQLite data dir's database to --out with SQLite's online backup API, while
    /// a node may be serving it, and checks the copy's integrity.
    Backup(crate::dump::BackupArgs),
}

#[derive(Debug, Args)]
pub struct StreamArgs {
    #[command(subcommand)]
    pub action: StreamAction,
}

#[derive(Debug, Subcommand)]
pub enum StreamAction {
    /// Appends every live dataset's current state (of one identity pool with --pool) to the
    /// commit log as a `snapshot` entry, so every sink receives it in order with the commits
    /// around it. The store must be reachable: PostgreSQL at any time; the SQLite data dir
    /// only while no node serves it.
    Replay(ReplayArgs),
    /// Lists the stream's consumers: position, entries behind the log's head, lease holder.
    Consumers(ServeArgs),
    /// Prints a consumer's dead letters (events it gave up on), one JSON object per line.
    DeadLetters(DeadLettersArgs),
    /// Removes a consumer that is no longer configured, so it stops holding back the
    /// commit log's compaction.
    Forget(ForgetArgs),
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Only this identity pool's datasets.
    #[arg(long)]
    pub pool: Option<String>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// The consumer (a webhook's name, or `redis`).
    pub consumer: String,
    /// Only dead letters of log entries after this id.
    #[arg(long, default_value_t = 0)]
    pub after: i64,
    /// At most this many.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
pub struct ForgetArgs {
    /// The consumer to remove.
    pub consumer: String,
    #[command(flatten)]
    pub serve: ServeArgs,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML file with any of the settings below (snake_case keys).
    #[arg(long, env = "TANDEM_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: SettingFlags,
}

impl ServeArgs {
    /// The defaults, the file over them, the flags and env over that.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        self.flags.over_file(self.config.as_deref())
    }
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
    #[arg(long, default_value = "1h", value_parser = duration::parse)]
    pub ttl: Duration,
    #[command(flatten)]
    pub flags: SettingFlags,
}

impl TokenArgs {
    /// The defaults, the file over them, the flags and env over that.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        self.flags.over_file(self.config.as_deref())
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// Every setting, one section per crate that reads it. In a TOML file the sections' keys
/// stand side by side at the top level, as the flags do on the command line.
#[derive(Debug, Clone, Default, PartialEq, Eq, Args, Serialize)]
pub struct Settings {
    #[command(flatten)]
    #[serde(flatten)]
    pub server: ServerConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub gateway: GatewayConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub limits: Limits,
    #[command(flatten)]
    #[serde(flatten)]
    pub cognito: CognitoConfig,
    #[command(flatten)]
    #[serde(flatten)]
    pub stream: StreamConfig,
}

/// The binary's own section: where to listen, which backends, the keys, logging, shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    #[arg(long, env = "TANDEM_LISTEN")]
    pub listen: SocketAddr,
    /// Directory for the database and the generated secret.
    #[arg(long, env = "TANDEM_DATA_DIR")]
    pub data_dir: PathBuf,
    /// The store: `sqlite` (embedded, in the data dir) or a `postgres://` URL.
    #[arg(long, env = "TANDEM_STORE")]
    pub store: String,
    /// PostgreSQL schema for Tandem's tables.
    #[arg(long, env = "TANDEM_POSTGRES_SCHEMA")]
    pub postgres_schema: String,
    /// PostgreSQL connections per node.
    #[arg(long, env = "TANDEM_POSTGRES_POOL_SIZE")]
    pub postgres_pool_size: usize,
    /// The least time between the starts of two PostgreSQL update batches: under load,
    /// updates arriving within it commit in one transaction (less database CPU per commit,
    /// up to this much more latency); a quiet store starts a batch at once. 0 = no wait.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_POSTGRES_BATCH_INTERVAL", value_parser = duration::parse)]
    pub postgres_batch_interval: Duration,
    /// How long start-up keeps retrying a PostgreSQL that cannot be reached before it gives
    /// up; 0 gives up at once.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_STORE_WAIT", value_parser = duration::parse)]
    pub store_wait: Duration,
    /// A `redis://` URL for fan-out between nodes; unset, fan-out stays in this process.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_REDIS")]
    pub redis: Option<String>,
    /// Prefix of Tandem's Redis channels.
    #[arg(long, env = "TANDEM_REDIS_PREFIX")]
    pub redis_prefix: String,
    /// HS256 secret (at least 32 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A file holding the HS256 secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM files with RSA public keys for RS256 tokens (repeat or comma-separate).
    #[arg(
        long = "jwt-rsa-public-key",
        env = "TANDEM_JWT_RSA_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_rsa_public_keys: Vec<PathBuf>,
    /// PEM files with EC P-256 public keys for ES256 tokens (repeat or comma-separate).
    #[arg(
        long = "jwt-ec-public-key",
        env = "TANDEM_JWT_EC_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_ec_public_keys: Vec<PathBuf>,
    /// Required `iss` claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// A JWKS URL with the keys of the `--jwt-issuer` (https, or http on loopback); its
    /// tokens must carry that `iss` (and `--jwt-audience`, if set).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// A JWKS file with the keys of the `--jwt-issuer`, read again on the refresh schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[arg(long, env = "TANDEM_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,
    /// More issuers, each with its own keys and audience (TOML only: `[[jwt_issuers]]` with
    /// `issuer`, `audience`, `subject_prefix`, and one of `jwks_url`, `jwks_file`, or
    /// `rsa_public_keys`/`ec_public_keys`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[arg(skip)]
    pub jwt_issuers: Vec<IssuerSettings>,
    /// How often each JWKS is fetched again.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_JWT_JWKS_REFRESH_INTERVAL", value_parser = duration::parse)]
    pub jwt_jwks_refresh_interval: Duration,
    /// The least time between two JWKS fetches caused by tokens with an unknown `kid`.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_JWT_JWKS_UNKNOWN_KID_COOLDOWN", value_parser = duration::parse)]
    pub jwt_jwks_unknown_kid_cooldown: Duration,
    /// The longest one JWKS fetch may take.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_JWT_JWKS_FETCH_TIMEOUT", value_parser = duration::parse)]
    pub jwt_jwks_fetch_timeout: Duration,
    /// The largest JWKS document accepted, in bytes.
    #[arg(long, env = "TANDEM_JWT_JWKS_MAX_DOCUMENT_BYTES")]
    pub jwt_jwks_max_document_bytes: usize,
    /// The most keys one JWKS may hold, and kept per issuer (current and retired).
    #[arg(long, env = "TANDEM_JWT_JWKS_MAX_KEY_COUNT")]
    pub jwt_jwks_max_key_count: usize,
    /// How long a key that left its JWKS is still accepted.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_JWT_JWKS_RETIRED_KEY_TTL", value_parser = duration::parse)]
    pub jwt_jwks_retired_key_ttl: Duration,
    /// Clock leeway for exp/nbf.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_JWT_LEEWAY", value_parser = duration::parse)]
    pub jwt_leeway: Duration,
    /// Time sessions get to close at shutdown.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_SHUTDOWN_GRACE", value_parser = duration::parse)]
    pub shutdown_grace: Duration,
    /// Time between SIGTERM and closing sessions: `/ready` answers 503 while the node goes on
    /// serving, so a load balancer stops sending it new clients first; 0 closes at once. A
    /// second SIGTERM or SIGINT ends the delay.
    #[serde(with = "duration")]
    #[arg(long, env = "TANDEM_DRAIN_DELAY", value_parser = duration::parse)]
    pub drain_delay: Duration,
    /// Dev mode (loopback only): `GET /dev/token?sub=NAME` mints demo tokens for anyone.
    #[arg(
        long,
        env = "TANDEM_DEV",
        num_args = 0..=1,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub dev: bool,
    /// Log format; the level comes from RUST_LOG (info when unset).
    #[arg(long, env = "TANDEM_LOG_FORMAT")]
    pub log_format: LogFormat,
}

/// One `[[jwt_issuers]]` entry of the TOML file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rsa_public_keys: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ec_public_keys: Vec<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let jwks = tandem_gateway::JwksConfig::default();
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7420)),
            data_dir: PathBuf::from("tandem-data"),
            store: "sqlite".to_owned(),
            postgres_schema: PostgresConfig::DEFAULT_SCHEMA.to_owned(),
            postgres_pool_size: PostgresConfig::DEFAULT_POOL_SIZE,
            postgres_batch_interval: PostgresConfig::DEFAULT_BATCH_INTERVAL,
            // Nodes and their database are often started together (compose, a rebooted
            // host), and a node that exits at once only leaves the retrying to whatever
            // restarts it.
            store_wait: Duration::from_secs(60),
            redis: None,
            redis_prefix: tandem_fanout::DEFAULT_PREFIX.to_owned(),
            jwt_secret: None,
            jwt_secret_file: None,
            jwt_rsa_public_keys: Vec::new(),
            jwt_ec_public_keys: Vec::new(),
            jwt_issuer: None,
            jwt_audience: None,
            jwt_jwks_url: None,
            jwt_jwks_file: None,
            jwt_issuers: Vec::new(),
            jwt_jwks_refresh_interval: jwks.refresh_interval,
            jwt_jwks_unknown_kid_cooldown: jwks.unknown_kid_cooldown,
            jwt_jwks_fetch_timeout: jwks.fetch_timeout,
            jwt_jwks_max_document_bytes: jwks.max_document_bytes,
            jwt_jwks_max_key_count: jwks.max_keys,
            jwt_jwks_retired_key_ttl: jwks.retired_key_ttl,
            jwt_leeway: Duration::from_secs(tandem_gateway::auth::DEFAULT_LEEWAY_SECS),
            shutdown_grace: Duration::from_secs(10),
            // Two failed checks of a load balancer that checks `/ready` every 2 s (the
            // compose file's HAProxy) and a little more.
            drain_delay: Duration::from_secs(5),
            dev: false,
            log_format: LogFormat::Plain,
        }
    }
}

/// A settings file: the sections side by side, and what none of them knows.
#[derive(Deserialize)]
struct SettingsFile {
    #[serde(flatten)]
    server: ServerConfig,
    #[serde(flatten)]
    gateway: GatewayConfig,
    #[serde(flatten)]
    limits: Limits,
    #[serde(flatten)]
    cognito: CognitoConfig,
    #[serde(flatten)]
    stream: StreamConfig,
    #[serde(flatten)]
    unknown: BTreeMap<String, toml::Value>,
}

impl Settings {
    /// Reads a TOML settings file.
    pub fn from_file(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
        Settings::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))
    }

    /// Reads TOML settings; a missing key keeps its default. The error is one line.
    pub fn from_toml(text: &str) -> Result<Settings, String> {
        let file: SettingsFile = toml::from_str(text).map_err(|e| describe(&e, text))?;
        if !file.unknown.is_empty() {
            let keys: Vec<String> = file.unknown.keys().map(|k| format!("`{k}`")).collect();
            return Err(format!(
                "unknown field {}: the keys are the flags of `tandem serve --help` in snake_case",
                keys.join(", ")
            ));
        }
        Ok(Settings {
            server: file.server,
            gateway: file.gateway,
            limits: file.limits,
            cognito: file.cognito,
            stream: file.stream,
        })
    }

    /// Each setting that has a default, by its clap id (= file key), written as a flag
    /// takes it: the sections' `Default`s, seen through serde.
    pub fn defaults() -> Vec<(String, String)> {
        let Ok(table) = toml::Table::try_from(Settings::default()) else {
            return Vec::new();
        };
        table
            .iter()
            .filter_map(|(key, value)| Some((key.clone(), flag_text(value)?)))
            .collect()
    }
}

/// A TOML value as it would be written after its flag; `None` for an empty list.
fn flag_text(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(s) => Some(s.clone()),
        toml::Value::Array(items) if items.is_empty() => None,
        toml::Value::Array(items) => Some(
            items
                .iter()
                .filter_map(flag_text)
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}

/// One line for a file toml or a section refused. toml's own errors quote the offending lines,
/// and a value a section refuses reaches serde through the flattened sections without its
/// key, so the key is found by reading the values one at a time.
fn describe(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim_end();
    let Ok(table) = text.parse::<toml::Table>() else {
        return match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {message}")
            }
            None => message.to_owned(),
        };
    };
    table
        .into_iter()
        .find_map(|(key, value)| {
            let alone = toml::Value::Table(toml::Table::from_iter([(key.clone(), value)]));
            alone
                .try_into::<SettingsFile>()
                .is_err()
                .then(|| format!("{key}: {message}"))
        })
        .unwrap_or_else(|| message.to_owned())
}

/// The settings given as flags or `TANDEM_*` variables, kept as clap matched them until the
/// file they go over has been read. Its args are never required (a setting not given keeps
/// the file's value, else the default), and each one's help ends with its default.
#[derive(Debug, Clone)]
pub struct SettingFlags(ArgMatches);

impl SettingFlags {
    /// These flags over the file's settings, or over the defaults without a file.
    pub fn over_file(&self, file: Option<&Path>) -> anyhow::Result<Settings> {
        let lower = match file {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        self.over(lower)
    }

    /// These flags over `lower`.
    pub fn over(&self, mut lower: Settings) -> anyhow::Result<Settings> {
        // Cannot fail: the same derive made the args and reads them back.
        lower
            .update_from_arg_matches(&self.0)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim()))?;
        Ok(lower)
    }
}

impl Args for SettingFlags {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let mut cmd = Settings::augment_args_for_update(cmd);
        for (id, default) in Settings::defaults() {
            if cmd.get_arguments().any(|arg| arg.get_id() == id.as_str()) {
                cmd = cmd.mut_arg(id, |arg| show_default(arg, &default));
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for SettingFlags {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        Ok(SettingFlags(matches.clone()))
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        self.0 = matches.clone();
        Ok(())
    }
}

/// Appends clap's own `[default: …]` note to the help: a real clap default would count as
/// given and hide the file's value.
fn show_default(arg: clap::Arg, default: &str) -> clap::Arg {
    let note = format!("[default: {default}]");
    let help = match arg.get_help() {
        Some(help) => format!("{help} {note}"),
        None => note.clone(),
    };
    let long_help = arg.get_long_help().map(|long| format!("{long}\n\n{note}"));
    let arg = arg.help(help);
    match long_help {
        Some(long) => arg.long_help(long),
        None => arg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// The flags as `tandem serve ARGS` gives them, with no variable read from this process.
    fn flags(args: &[&str]) -> SettingFlags {
        let cmd = Cli::command().mut_subcommand("serve", |serve| {
            serve.mut_args(|arg| arg.env(None::<&'static str>))
        });
        let matches = cmd
            .try_get_matches_from(["tandem", "serve"].iter().chain(args))
            .unwrap();
        match Cli::from_arg_matches(&matches).unwrap().command {
            Command::Serve(serve) => serve.flags,
            other => panic!("{other:?}"),
        }
    }

    fn help_of(id: &str) -> String {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let arg = serve
            .get_arguments()
            .find(|arg| arg.get_id() == id)
            .unwrap();
        arg.get_help().unwrap().to_string()
    }

    #[test]
    fn test_config_flags_win_over_file() {
        let file = Settings::from_toml(
            "listen = \"127.0.0.1:9000\"\nmax_records = 7\nauth_timeout = \"3s\"\n",
        )
        .unwrap();
        let merged = flags(&["--listen", "127.0.0.1:9001"]).over(file).unwrap();
        assert_eq!(merged.server.listen.port(), 9001);
        assert_eq!(merged.limits.max_records, 7);
        assert_eq!(merged.gateway.auth_timeout, Duration::from_secs(3));
    }

    #[test]
    fn test_config_flag_over_file_over_default() {
        let file = Settings::from_toml(
            "max_records = 7\nmax_patches = 9\ndev = true\nshutdown_grace = 4\n\
             jwt_rsa_public_keys = [\"file.pem\"]\n",
        )
        .unwrap();
        let merged = flags(&["--max-records", "5", "--jwt-rsa-public-key", "a.pem,b.pem"])
            .over(file)
            .unwrap();
        let defaults = Settings::default();
        assert_eq!(merged.limits.max_records, 5, "flag over file");
        assert_eq!(merged.limits.max_patches, 9, "file over default");
        assert!(
            merged.server.dev,
            "a file's boolean is not reset by the absent flag"
        );
        assert_eq!(merged.server.shutdown_grace, Duration::from_secs(4));
        assert_eq!(
            merged.server.jwt_rsa_public_keys,
            [PathBuf::from("a.pem"), PathBuf::from("b.pem")],
            "a list given as a flag replaces the file's"
        );
        assert_eq!(merged.limits.max_datasets, defaults.limits.max_datasets);
        assert_eq!(merged.gateway, defaults.gateway);
    }

    #[test]
    fn test_config_no_flags_and_no_file_are_the_defaults() {
        assert_eq!(flags(&[]).over_file(None).unwrap(), Settings::default());
        let dev = flags(&["--dev"]).over(Settings::default()).unwrap();
        assert!(dev.server.dev);
    }

    #[test]
    fn test_config_unknown_file_key_is_an_error() {
        let err = Settings::from_toml("listn = \"127.0.0.1:9000\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = Settings::from_toml("pool = \"other\"").unwrap_err();
        assert!(err.contains("unknown field `pool`"), "{err}");
    }

    #[test]
    fn test_config_bad_file_value_is_one_line() {
        let cases = [
            ("max_patches = 3\nmax_records = \"many\"\n", "max_records: "),
            ("listen = \n", "line 1: "),
            ("\n\nauth_timeout = \"1y\"", "auth_timeout: "),
        ];
        for (text, start) in cases {
            let err = Settings::from_toml(text).unwrap_err();
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.starts_with(start), "{err}");
        }
    }

    #[test]
    fn test_config_file_of_every_default_reads_back() {
        let text = toml::to_string(&Settings::default()).unwrap();
        assert_eq!(Settings::from_toml(&text).unwrap(), Settings::default());
    }

    #[test]
    fn test_config_help_shows_each_default() {
        assert!(
            help_of("max_records").ends_with("[default: 1024]"),
            "{}",
            help_of("max_records")
        );
        assert!(help_of("listen").ends_with("[default: 127.0.0.1:7420]"));
        assert!(help_of("store_wait").ends_with("[default: 60s]"));
        let defaults = Settings::defaults();
        assert!(defaults.len() > 20, "{defaults:?}");
        for (id, default) in defaults {
            assert!(
                help_of(&id).ends_with(&format!("[default: {default}]")),
                "{id}: {}",
                help_of(&id)
            );
        }
    }

    #[test]
    fn test_config_every_setting_is_a_flag_and_a_tandem_variable() {
        let cmd = Cli::command();
        let serve = cmd.find_subcommand("serve").unwrap();
        let mut count = 0;
        for arg in serve.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            count += 1;
            let env = format!("TANDEM_{}", id.to_uppercase());
            assert_eq!(arg.get_env(), Some(std::ffi::OsStr::new(&env)), "{id}");
            // The key lists take one key per flag, so their flags are singular.
            let long = id.replace('_', "-");
            let long = ["-keys", "-webhooks"]
                .iter()
                .find_map(|plural| {
                    long.strip_suffix(plural)
                        .map(|l| (l, &plural[..plural.len() - 1]))
                })
                .map_or(long.clone(), |(l, singular)| format!("{l}{singular}"));
            assert_eq!(arg.get_long(), Some(long.as_str()), "{id}");
        }
        assert!(count > 30, "{count}");
    }
}
