//! The gateway's settings section: one field per setting, its default written once in
//! [`GatewayConfig`]'s `Default`, and read from a TOML file through serde. With the `clap`
//! feature the same fields are the `tandem serve` flags and `TANDEM_*` variables (the field's
//! doc is its help), so a new per-connection setting is one field here and nothing in the
//! binary. Also the duration syntax every setting shares (`90s`, `250ms`, `1h`).

use serde::{Deserialize, Serialize};
use std::time::Duration;
use tandem_store::DEFAULT_POOL;

/// Per-connection settings; every limit here has its own error or close code.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub pool: String,
    /// Bytes in one WebSocket frame or message; larger ones are refused while reading the
    /// header, without buffering the payload (`too_large` / `max_frame_bytes`, close 4501).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_FRAME_BYTES"))]
    pub max_frame_bytes: usize,
    /// Subscriptions on one connection (`limit_exceeded` / `max_subscriptions`).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_SUBSCRIPTIONS"))]
    pub max_subscriptions: usize,
    /// Unread replies queued for one connection before it is closed as slow.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_QUEUED_REPLIES"))]
    pub max_queued_replies: usize,
    /// Bytes of unsent replies (snapshots and notices included) before a client that does
    /// not read them is closed as slow (close 4001); one larger reply is always let through.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_QUEUED_BYTES"))]
    pub max_queued_bytes: usize,
    /// Frames one connection may send per second, in bursts of as many; more are refused with
    /// `rate_limited` / `max_requests_per_second`; 0 = unlimited.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_REQUESTS_PER_SECOND"))]
    pub max_requests_per_second: u32,
    /// WebSocket connections this node serves at once; more are refused at the upgrade with
    /// HTTP 503 (`limit_exceeded` / `max_connections`).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_CONNECTIONS"))]
    pub max_connections: usize,
    /// Sessions one identity may hold on this node at once; one more is refused at
    /// authentication (`limit_exceeded` / `max_connections_per_identity`, close 4005).
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_IDENTITY")
    )]
    pub max_connections_per_identity: usize,
    /// Connections that have not authenticated yet, on this node; more are refused at the
    /// upgrade with HTTP 503 (`max_unauthenticated_connections`). A token in the upgrade's
    /// `Authorization` header counts as authenticated.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_MAX_UNAUTHENTICATED_CONNECTIONS")
    )]
    pub max_unauthenticated_connections: usize,
    /// Bytes a connection may send before it authenticates (an `auth` frame is a few KB);
    /// past them it is closed with 4501 (`too_large` / `max_unauthenticated_bytes`).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_UNAUTHENTICATED_BYTES"))]
    pub max_unauthenticated_bytes: usize,
    /// Connections from one IP address at once; more are refused at the upgrade with HTTP
    /// 429 (`max_connections_per_ip`).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_CONNECTIONS_PER_IP"))]
    pub max_connections_per_ip: usize,
    /// New connections from one IP address per second, in bursts of as many; more are
    /// refused with HTTP 429 and `Retry-After` (`max_new_connections_per_ip`); 0 = unlimited.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_NEW_CONNECTIONS_PER_IP"))]
    pub max_new_connections_per_ip: u32,
    /// Peer addresses the per-IP limits do not apply to (comma-separated): by default
    /// loopback, where a local proxy or load generator connects from.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_IP_LIMITS_EXEMPT", value_delimiter = ',')
    )]
    pub ip_limits_exempt: Vec<std::net::IpAddr>,
    /// The longest a session lasts, whatever its token's `exp` says (close 4006); clients
    /// reconnect.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_MAX_SESSION_AGE", value_parser = duration::parse)
    )]
    pub max_session_age: Duration,
    /// How long an authenticated session with no subscriptions may go without a request
    /// (pings do not count) before it is closed (close 4007).
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_IDLE_TIMEOUT", value_parser = duration::parse)
    )]
    pub idle_timeout: Duration,
    /// `bad_request` answers one connection may get per `bad_frames_window`, in bursts of as
    /// many; the one past that closes the connection (close 4503). 0 = never.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_BAD_FRAMES"))]
    pub max_bad_frames: u32,
    /// The window `max_bad_frames` is counted over.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_BAD_FRAMES_WINDOW", value_parser = duration::parse)
    )]
    pub bad_frames_window: Duration,
    /// Time allowed to authenticate after connecting (close 4004).
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_AUTH_TIMEOUT", value_parser = duration::parse)
    )]
    pub auth_timeout: Duration,
    /// Time a socket write may make no progress (the socket takes not one byte) before the
    /// connection is closed as slow (close 4001). A reader that reads, however slowly, is
    /// kept: its pushes are conflated meanwhile.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_WRITE_TIMEOUT", value_parser = duration::parse)
    )]
    pub write_timeout: Duration,
    /// Bytes the kernel may hold unsent for one connection (`TCP_NOTSENT_LOWAT`); the rest of
    /// a slow reader's pushes wait in the outbox, where they are conflated, and the writer
    /// sees each sip of a slow reader as progress. 0 leaves the kernel's default (its whole
    /// send buffer, up to megabytes).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_UNSENT_SOCKET_BYTES"))]
    pub max_unsent_socket_bytes: u32,
    /// WebSocket read buffer per connection, bytes; small keeps idle connections cheap (it is
    /// allocated up front), larger reads big frames in fewer system calls.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_READ_BUFFER_BYTES"))]
    pub read_buffer_bytes: usize,
    /// WebSocket write buffer per connection, bytes.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_WRITE_BUFFER_BYTES"))]
    pub write_buffer_bytes: usize,
    /// Browser origins (`https://app.example.com`, comma-separated) whose pages may open
    /// `/v1/sync` and call `/dev/token`, besides the node's own pages (same origin, always
    /// allowed); `*` allows any. Browsers send `Origin`, native clients do not, and a request
    /// without one is not checked; one from another origin gets HTTP 403.
    #[serde(deserialize_with = "crate::origin::deserialize_list")]
    #[cfg_attr(
        feature = "clap",
        arg(
            long,
            env = "TANDEM_ALLOWED_ORIGINS",
            value_delimiter = ',',
            value_parser = crate::origin::parse
        )
    )]
    pub allowed_origins: Vec<String>,
    /// Log lines per `log_interval` for each kind of event a client can cause at will
    /// (refused token, protocol error, abrupt disconnect, slow client, refused connection,
    /// origin or host); the rest are counted in `/metrics` and summed up in one line.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_LOG_LINES"))]
    pub max_log_lines: u32,
    /// The interval `max_log_lines` applies to.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_LOG_INTERVAL", value_parser = duration::parse)
    )]
    pub log_interval: Duration,
    /// Bytes in one Cognito Sync request body; a larger one is refused with
    /// `LimitExceededException` before it is read whole (JSON escaping can grow a 1 MiB
    /// dataset sixfold, hence the default of 8 MiB).
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_COGNITO_MAX_BODY_BYTES"))]
    pub cognito_max_body_bytes: usize,
    /// Entries one `history` page may hold; a larger `limit` is lowered to it.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_HISTORY_PAGE"))]
    pub max_history_page: usize,
    /// Bytes in one request body of the REST API (`/v1/datasets/…`); a larger one is
    /// refused with HTTP 413 (`too_large` / `max_rest_body_bytes`) before it is read whole.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_MAX_REST_BODY_BYTES"))]
    pub max_rest_body_bytes: usize,
    /// REST API requests one identity may make per second on this node, in bursts of as
    /// many; more are refused with HTTP 429 and `Retry-After` (`rate_limited` /
    /// `max_rest_requests_per_second`); 0 = unlimited.
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_MAX_REST_REQUESTS_PER_SECOND")
    )]
    pub max_rest_requests_per_second: u32,
    /// An HTTP endpoint asked before every update commits (WebSocket and Cognito REST
    /// writes alike): it accepts, rewrites the patches, or rejects (`rejected`); when it fails
    /// or does not answer in `sync_hook_timeout` the update is refused as `unavailable`
    /// (docs/HOOKS.md). `http://host[:port]/path`; unset, no hook.
    #[serde(
        skip_serializing_if = "Option::is_none",
        deserialize_with = "crate::hook::deserialize_url"
    )]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_SYNC_HOOK_URL", value_parser = crate::hook::parse_url)
    )]
    pub sync_hook_url: Option<String>,
    /// The shared secret the hook's requests are signed with (`X-Tandem-Signature`);
    /// unset, requests are not signed.
    #[serde(skip_serializing)]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_SYNC_HOOK_SECRET", hide_env_values = true)
    )]
    pub sync_hook_secret: Option<String>,
    /// How long one hook call may take; past it the update is refused as `unavailable`.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_SYNC_HOOK_TIMEOUT", value_parser = duration::parse)
    )]
    pub sync_hook_timeout: Duration,
    /// Consecutive hook failures (errors or timeouts) that open its circuit breaker: while
    /// open, updates are refused as `unavailable` without calling the hook.
    #[cfg_attr(feature = "clap", arg(long, env = "TANDEM_SYNC_HOOK_BREAKER_FAILURES"))]
    pub sync_hook_breaker_failures: u32,
    /// How long the breaker stays open before one call tries the hook again.
    #[serde(with = "duration")]
    #[cfg_attr(
        feature = "clap",
        arg(long, env = "TANDEM_SYNC_HOOK_BREAKER_OPEN", value_parser = duration::parse)
    )]
    pub sync_hook_breaker_open: Duration,
    /// The port this node listens on, for dev mode's `Host` check; 0 = any. Set by the
    /// binary once it has bound the listener, never read from settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub listen_port: u16,
    /// Dev mode: the HS256 secret `GET /dev/token` mints demo tokens with. `None` (the
    /// default) disables the endpoint. Set by the binary, never read from settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub dev_token_secret: Option<Vec<u8>>,
    /// The store's write limits, announced in `ready.limits` (with `max_frame_bytes`) so
    /// that clients check and split updates before sending them. `None` announces nothing.
    /// Set by the binary from the store's settings, never read from settings.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub store_limits: Option<tandem_store::Limits>,
    /// The Cognito section ([`crate::CognitoConfig`]), read as its own section of the
    /// settings and handed over by the binary.
    #[serde(skip)]
    #[cfg_attr(feature = "clap", arg(skip))]
    pub cognito: crate::CognitoConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            pool: DEFAULT_POOL.to_owned(),
            max_frame_bytes: 2 * 1024 * 1024,
            max_subscriptions: 100,
            max_queued_replies: 1024,
            max_queued_bytes: 4 * 1024 * 1024,
            max_requests_per_second: 1000,
            max_connections: 20_000,
            max_connections_per_identity: 100,
            max_unauthenticated_connections: 1000,
            max_unauthenticated_bytes: 64 * 1024,
            max_connections_per_ip: 500,
            max_new_connections_per_ip: 50,
            ip_limits_exempt: vec![
                std::net::IpAddr::from([127, 0, 0, 1]),
                std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
            ],
            max_session_age: Duration::from_secs(24 * 3600),
            idle_timeout: Duration::from_secs(300),
            // A client with a bug in one kind of request keeps working on the rest (a bad
            // request a second, or a replayed backlog of under 100, never closes it); one
            // that sends little but bad frames is closed within seconds.
            max_bad_frames: 100,
            bad_frames_window: Duration::from_secs(10),
            auth_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_unsent_socket_bytes: 16 * 1024,
            read_buffer_bytes: 1024,
            write_buffer_bytes: 4 * 1024,
            allowed_origins: Vec::new(),
            max_log_lines: 10,
            log_interval: Duration::from_secs(10),
            cognito_max_body_bytes: 8 * 1024 * 1024,
            max_history_page: 500,
            max_rest_body_bytes: 64 * 1024,
            max_rest_requests_per_second: 100,
            sync_hook_url: None,
            sync_hook_secret: None,
            sync_hook_timeout: Duration::from_secs(5),
            sync_hook_breaker_failures: 5,
            sync_hook_breaker_open: Duration::from_secs(30),
            listen_port: 0,
            dev_token_secret: None,
            store_limits: None,
            cognito: crate::CognitoConfig::default(),
        }
    }
}

impl std::fmt::Debug for GatewayConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayConfig")
            .field("pool", &self.pool)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("max_queued_replies", &self.max_queued_replies)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("max_requests_per_second", &self.max_requests_per_second)
            .field("max_connections", &self.max_connections)
            .field(
                "max_connections_per_identity",
                &self.max_connections_per_identity,
            )
            .field(
                "max_unauthenticated_connections",
                &self.max_unauthenticated_connections,
            )
            .field("max_unauthenticated_bytes", &self.max_unauthenticated_bytes)
            .field("max_connections_per_ip", &self.max_connections_per_ip)
            .field(
                "max_new_connections_per_ip",
                &self.max_new_connections_per_ip,
            )
            .field("ip_limits_exempt", &self.ip_limits_exempt)
            .field("max_session_age", &self.max_session_age)
            .field("idle_timeout", &self.idle_timeout)
            .field("max_bad_frames", &self.max_bad_frames)
            .field("bad_frames_window", &self.bad_frames_window)
            .field("auth_timeout", &self.auth_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("max_unsent_socket_bytes", &self.max_unsent_socket_bytes)
            .field("allowed_origins", &self.allowed_origins)
            .field("max_log_lines", &self.max_log_lines)
            .field("log_interval", &self.log_interval)
            .field("cognito_max_body_bytes", &self.cognito_max_body_bytes)
            .field("max_history_page", &self.max_history_page)
            .field("max_rest_body_bytes", &self.max_rest_body_bytes)
            .field(
                "max_rest_requests_per_second",
                &self.max_rest_requests_per_second,
            )
            .field("sync_hook_url", &self.sync_hook_url)
            .field("sync_hook_timeout", &self.sync_hook_timeout)
            .field("listen_port", &self.listen_port)
            .field("dev_mode", &self.dev_token_secret.is_some())
            .field("store_limits", &self.store_limits)
            .field("cognito", &self.cognito)
            .finish_non_exhaustive()
    }
}

/// Durations as settings write them: `500ms`, `90s`, `30m`, `1h`, `7d`, or plain seconds
/// (a TOML integer or a string of digits). Use as `#[serde(with = "duration")]` and as a clap
/// `value_parser = duration::parse`.
pub mod duration {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (digits, unit) = s.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid duration `{s}`: expected e.g. 90s, 30m, 1h"))?;
        let secs = match unit.trim() {
            "ms" => return Ok(Duration::from_millis(n)),
            "" | "s" => n,
            "m" => n.saturating_mul(60),
            "h" => n.saturating_mul(3600),
            "d" => n.saturating_mul(86_400),
            other => return Err(format!("invalid duration unit `{other}` in `{s}`")),
        };
        Ok(Duration::from_secs(secs))
    }

    /// The form [`parse`] reads back: whole seconds as `90s`, anything finer as `ms`.
    pub fn format(d: Duration) -> String {
        if d.subsec_nanos() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        }
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_config_durations_parse() {
        assert_eq!(duration::parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(duration::parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(
            duration::parse("250ms").unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration::parse("15").unwrap(), Duration::from_secs(15));
        assert!(duration::parse("1y").is_err());
        assert!(duration::parse("").is_err());
    }

    #[test]
    fn test_config_duration_format_reads_back() {
        for d in [
            Duration::from_secs(10),
            Duration::from_millis(250),
            Duration::ZERO,
        ] {
            assert_eq!(duration::parse(&duration::format(d)).unwrap(), d);
        }
        assert_eq!(duration::format(Duration::from_secs(60)), "60s");
    }

    #[test]
    fn test_config_missing_keys_take_the_defaults() {
        let config: GatewayConfig =
            serde_json::from_str(r#"{"max_subscriptions": 3, "auth_timeout": "2s"}"#).unwrap();
        assert_eq!(config.max_subscriptions, 3);
        assert_eq!(config.auth_timeout, Duration::from_secs(2));
        let defaults = GatewayConfig::default();
        assert_eq!(config.max_frame_bytes, defaults.max_frame_bytes);
        assert_eq!(config.pool, defaults.pool);
    }

    #[test]
    fn test_config_unknown_key_is_an_error() {
        let err = serde_json::from_str::<GatewayConfig>(r#"{"pool": "x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }
}
