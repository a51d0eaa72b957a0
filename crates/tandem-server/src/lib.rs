//! The `tandem` binary's library half: settings (flags, env, TOML), logging, the start-up
//! checks (one process per SQLite data dir, see `lock`; the store's integrity check),
//! choosing and opening the backends, wiring the gateway, and the ordered shutdown (drain
//! delay with `/ready` 503, stop accepting, close sessions with "going away", wait with a
//! grace period, close the broker, close the store). It holds no sync logic of its own; the
//! gateway, store and fan-out crates do.

pub mod cognito_import;
pub mod config;
pub mod dump;
pub mod lock;

use anyhow::{Context, bail};
use config::{Cli, Command, LogFormat, ServeArgs, ServerConfig, Settings, StreamAction, TokenArgs};
use lock::DataDirLock;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tandem_fanout::{Broker, LocalBroker, RedisBroker, RedisConfig};
use tandem_gateway::cognito::config::OpenIdMint;
use tandem_gateway::{
    AuthConfig, CognitoConfig, Gateway, IssuerConfig, JwksConfig, KeySource, Subscribers, Verifier,
};
use tandem_store::{
    Limits, PostgresConfig, PostgresStore, SqliteStore, Store, StoreError, check_sqlite,
};
use tokio_util::sync::CancellationToken;

/// jemalloc, not the system's malloc: on the write path glibc's malloc and free were about a
/// fifth of the node's CPU, and jemalloc cuts the node's CPU per commit by ~20 % at the same
/// idle memory per connection (mimalloc, tried before, raised it by half):
/// docs/BENCHMARKS.md. Here in the library so that every binary that runs the service (the
/// `tandem` command, the end-to-end tests' copy of it) runs with it.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The file in the data dir that holds the generated HS256 secret.
pub const SECRET_FILE: &str = "jwt-secret";

/// `--store` for the embedded SQLite store in the data dir.
const SQLITE_STORE: &str = "sqlite";

/// Parses the command line and runs it; the `tandem` binary's whole `main`.
pub fn main_entry() -> ExitCode {
    use clap::Parser;
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => run_serve(args).map(|()| ExitCode::SUCCESS),
        Command::Token(args) => run_token(args).map(|()| ExitCode::SUCCESS),
        Command::Check(args) => run_check(&args),
        Command::Load(cli) => return tandem_loadtest::main_with(*cli, "tandem load"),
        Command::Stream(args) => run_stream(args.action).map(|()| ExitCode::SUCCESS),
        Command::Export(args) => dump::run_export(&args).map(|()| ExitCode::SUCCESS),
        Command::Import(args) => dump::run_import(&args).map(|()| ExitCode::SUCCESS),
        Command::Backup(args) => dump::run_backup(&args).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tandem: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_token(args: TokenArgs) -> anyhow::Result<()> {
    let settings = args.settings()?.server;
    let secret = match explicit_secret(&settings)? {
        Some(secret) => secret,
        None => {
            let path = settings.data_dir.join(SECRET_FILE);
            read_secret_file(&path).with_context(|| {
                format!(
                    "no secret at {}: start `tandem serve --data-dir {}` once, or pass --jwt-secret",
                    path.display(),
                    settings.data_dir.display()
                )
            })?
        }
    };
    let token = tandem_token::mint_hs256(
        &secret,
        &args.sub,
        args.ttl,
        settings.jwt_issuer.as_deref(),
        settings.jwt_audience.as_deref(),
    )?;
    println!("{token}");
    Ok(())
}

/// The full integrity check of the data dir's SQLite file: a report on stdout, exit 0 when
/// intact and 1 when damaged (or when the check cannot run, with the reason on stderr).
fn run_check(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let server = args.settings()?.server;
    if server.store != SQLITE_STORE {
        bail!(
            "tandem check checks the embedded SQLite store, and --store is not `sqlite`: check PostgreSQL with its own tools (pg_amcheck)"
        );
    }
    let report = check_sqlite(&server.data_dir)?;
    let path = report.path.display();
    if report.is_intact() {
        println!(
            "{path}: intact (integrity_check ok, {} bytes in {} ms)",
            report.bytes,
            report.elapsed.as_millis()
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{path}: DAMAGED, integrity_check found {} problem(s):",
        report.problems.len()
    );
    for problem in &report.problems {
        println!("  {problem}");
    }
    println!("{}", report.restore_advice());
    Ok(ExitCode::FAILURE)
}

/// `tandem stream …`: opens the store as `serve` would (SQLite only while no node serves
/// the data dir) and acts on its commit log and stream consumers.
fn run_stream(action: StreamAction) -> anyhow::Result<()> {
    let args = match &action {
        StreamAction::Replay(a) => &a.serve,
        StreamAction::Consumers(a) => a,
        StreamAction::DeadLetters(a) => &a.serve,
        StreamAction::Forget(a) => &a.serve,
    };
    let settings = args.settings()?;
    init_logging(settings.server.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let server = &settings.server;
        let _lock = (server.store == SQLITE_STORE)
            .then(|| DataDirLock::acquire(&server.data_dir))
            .transpose()
            .context("the data dir is in use: stop the node that serves it first")?;
        let (store, _) = open_store(
            server,
            &server.data_dir,
            settings.limits.clone(),
            &CancellationToken::new(),
        )
        .await?;
        let outcome = stream_action(store.as_ref(), &action).await;
        store.close().await;
        outcome
    })
}

async fn stream_action(store: &dyn Store, action: &StreamAction) -> anyhow::Result<()> {
    match action {
        StreamAction::Replay(args) => {
            let report = tandem_stream::replay(store, args.pool.as_deref(), |r| {
                eprintln!("replay: {} datasets", r.datasets);
            })
            .await?;
            println!(
                "replayed {} datasets into the commit log (last entry {})",
                report.datasets, report.last_entry
            );
        }
        StreamAction::Consumers(_) => {
            let head = store.log_head().await?;
            let now = tandem_store::now_ms();
            println!("log head {head}");
            for c in store.stream_consumers().await? {
                let holder = match &c.lease_holder {
                    Some(node) if c.lease_until > now => node.as_str(),
                    _ => "-",
                };
                println!(
                    "{}\tposition {}\tbehind {}\tdelivering {}",
                    c.name,
                    c.position,
                    (head - c.position).max(0),
                    holder
                );
            }
        }
        StreamAction::DeadLetters(args) => {
            for letter in store
                .stream_dead_letters(&args.consumer, args.after, args.limit)
                .await?
            {
                let line = serde_json::json!({
                    "entryId": letter.entry_id,
                    "attempts": letter.attempts,
                    "time": letter.time,
                    "error": letter.error,
                    "event": serde_json::from_str::<serde_json::Value>(&letter.event)
                        .unwrap_or(serde_json::Value::String(letter.event.clone())),
                });
                println!("{line}");
            }
        }
        StreamAction::Forget(args) => {
            if store.stream_forget(&args.consumer).await? {
                println!("forgot consumer {}", args.consumer);
            } else {
                bail!("no consumer named {}", args.consumer);
            }
        }
    }
    Ok(())
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let settings = args.settings()?;
    init_logging(settings.server.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let skip_drain = CancellationToken::new();
        tokio::spawn(watch_signals(shutdown.clone(), skip_drain.clone()));
        serve_until(settings, shutdown, skip_drain).await
    })
}

/// A line on stdout that a node which cannot write it goes on without (its disk is full,
/// say), where `println!` would panic.
fn say(line: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

pub(crate) fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // A line that cannot be written (the log's disk is full) is dropped. By default the
    // logger reports that on stderr, and when that fails too `eprintln!` panics whatever
    // was logging: a session task (its client never answered) or the store's writer.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.init(),
    }
}

/// The first SIGINT/SIGTERM starts the shutdown; a second one ends the drain delay.
async fn watch_signals(shutdown: CancellationToken, skip_drain: CancellationToken) {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .inspect_err(|e| {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT shuts down");
        })
        .ok();
    for (n, token) in [shutdown, skip_drain].into_iter().enumerate() {
        #[cfg(unix)]
        match term.as_mut() {
            Some(term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!(signal = n + 1, "shutdown signal received");
        token.cancel();
    }
}

/// Runs the service until `shutdown` is cancelled, then shuts down in order, the drain
/// delay (`drain_delay`) first.
pub async fn serve(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    serve_until(settings, shutdown, CancellationToken::new()).await
}

/// [`serve`], where cancelling `skip_drain` ends the drain delay early.
async fn serve_until(
    settings: Settings,
    shutdown: CancellationToken,
    skip_drain: CancellationToken,
) -> anyhow::Result<()> {
    let Settings {
        server,
        gateway: mut gateway_config,
        limits,
        cognito,
        stream: stream_config,
    } = settings;
    let listen = server.listen;
    let data_dir = server.data_dir.clone();
    // Before anything is written in the data dir; held until the store is closed. With
    // PostgreSQL the data dir holds only the secret, which nodes on one host may share.
    let _lock = (server.store == SQLITE_STORE)
        .then(|| DataDirLock::acquire(&data_dir))
        .transpose()?;
    let issuers = issuers(&server)?;
    let (auth, generated) = auth_config(&server, &data_dir, listen, !issuers.is_empty())?;
    let verifier = Verifier::with_issuers(&auth, &issuers, &jwks_config(&server))
        .context("invalid jwt settings")?;
    // JWKS documents are fetched and refreshed in the background until shutdown.
    verifier.spawn_refresh(&shutdown);
    if server.dev {
        if !listen.ip().is_loopback() {
            bail!("refusing dev mode on {listen}: dev mode mints tokens for anyone, loopback only");
        }
        let Some(secret) = auth.hs256_secret.clone() else {
            bail!("dev mode needs an hs256 secret (the generated one, or --jwt-secret)");
        };
        gateway_config.dev_token_secret = Some(secret);
    }
    gateway_config.cognito = cognito_config(cognito, &auth)?;
    // Announced in `ready`, so that clients split and check updates before sending them.
    gateway_config.store_limits = Some(limits.clone());
    // BulkPublish replays into this node's stream and waits for these sinks.
    gateway_config.cognito.stream_sinks = stream_config.consumer_names();
    let grace = server.shutdown_grace;
    let drain_delay = server.drain_delay;

    stream_config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid change stream settings: {e}"))?;
    let (store, store_kind) = open_store(&server, &data_dir, limits, &shutdown).await?;
    let redis = server
        .redis
        .as_ref()
        .map(|url| {
            RedisBroker::prepare(RedisConfig {
                url: url.clone(),
                prefix: server.redis_prefix.clone(),
            })
            .context("invalid --redis url")
        })
        .transpose()?;
    let broker_kind = if redis.is_some() { "redis" } else { "local" };
    // The registry first, then the broker that delivers into it, then the gateway.
    let subscribers = Subscribers::new(store.clone());
    let broker: Arc<dyn Broker> = match redis {
        Some(redis) => redis.start(subscribers.handler()),
        None => Arc::new(LocalBroker::new(subscribers.handler())),
    };

    let listener = bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    let local = listener.local_addr()?;
    // Dev mode's Host check needs the port, which `--listen …:0` leaves to the kernel.
    gateway_config.listen_port = local.port();
    let unsent = gateway_config.max_unsent_socket_bytes;
    let gateway = Gateway::new(gateway_config, subscribers, broker, verifier);
    // Started once nothing can fail before the shutdown that stops it (and gives its leases
    // back). The name in its leases is unique even for two nodes on one host.
    let node_name = format!(
        "{}:{}:{:08x}",
        local,
        std::process::id(),
        rand::random::<u32>()
    );
    let stream = tandem_stream::ChangeStream::start(store.clone(), &stream_config, node_name)
        .map_err(|e| anyhow::anyhow!("invalid change stream settings: {e}"))?;
    let metrics_stream = stream.clone();
    gateway.add_metrics(Box::new(move || metrics_stream.metrics_text()));
    // TCP_NODELAY, the kernel's unsent bytes and each connection's read budget before it
    // authenticates.
    let listener = tandem_gateway::Listener::new(listener, unsent);
    tracing::info!(addr = %local, data_dir = %data_dir.display(), store = store_kind, broker = broker_kind, "tandem listening");
    if server.dev {
        tracing::warn!(
            "dev mode: GET /dev/token mints tokens for anyone; never use it in production"
        );
        say(format_args!(
            "tandem demo at http://{local}/?user=alice&board=alice/groceries"
        ));
    }
    if generated {
        tracing::info!(
            "no jwt keys configured: using the generated secret in {}; mint a token with: tandem token --data-dir {} --sub user-1",
            data_dir.join(SECRET_FILE).display(),
            data_dir.display()
        );
    }
    // Tests and scripts read the bound address from this line.
    say(format_args!("tandem listening on {local}"));

    let stop_accepting = CancellationToken::new();
    let server = axum::serve(
        listener,
        gateway
            .router()
            .into_make_service_with_connect_info::<tandem_gateway::Peer>(),
    )
    .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
    let server = tokio::spawn(async move { server.await });

    shutdown.cancelled().await;
    if !drain_delay.is_zero() {
        // Load balancers see `/ready` 503 and stop sending new clients; whatever they still
        // send meanwhile is served, and closed with the rest below.
        gateway.start_draining();
        tracing::info!(
            drain_delay_ms = drain_delay.as_millis() as u64,
            "shutting down: draining, /ready answers 503"
        );
        tokio::select! {
            () = tokio::time::sleep(drain_delay) => {}
            () = skip_drain.cancelled() => tracing::info!("drain delay cut short"),
        }
    }
    tracing::info!("shutting down: closing sessions");
    stop_accepting.cancel();
    let clean = gateway.shutdown(grace).await;
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "http server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "http server task failed"),
        Err(_) => tracing::warn!("http server did not stop in time"),
    }
    gateway.broker().close().await;
    // Gives up the stream's leases, so another node delivers at once; a delivery in flight
    // ends within its timeout.
    if tokio::time::timeout(Duration::from_secs(10), stream.stop())
        .await
        .is_err()
    {
        tracing::warn!("the change stream did not stop in time; its leases run out instead");
    }
    store.close().await;
    tracing::info!(clean, "shutdown complete");
    Ok(())
}

/// The kernel caps the queue at `net.core.somaxconn`; tokio's default of 1024 drops SYNs in
/// connection bursts (clients then wait a one-second retransmit).
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The embedded SQLite store in the data dir by default; PostgreSQL for a `postgres://` URL.
pub(crate) async fn open_store(
    server: &ServerConfig,
    data_dir: &Path,
    limits: Limits,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<dyn Store>, &'static str)> {
    match server.store.as_str() {
        SQLITE_STORE => {
            let store = SqliteStore::open(data_dir, limits)
                .with_context(|| format!("cannot open the store in {}", data_dir.display()))?;
            Ok((Arc::new(store), "sqlite"))
        }
        url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let mut config = PostgresConfig::new(url);
            config.schema = server.postgres_schema.clone();
            config.pool_size = server.postgres_pool_size;
            config.batch_interval = server.postgres_batch_interval;
            let store = connect_postgres(config, limits, server.store_wait, shutdown)
                .await
                .context("cannot open the postgresql store")?;
            Ok((Arc::new(store), "postgres"))
        }
        other => bail!("--store must be `sqlite` or a postgres:// url, not `{other}`"),
    }
}

/// Connects, retrying with backoff while PostgreSQL refuses or cannot be reached
/// (`Unavailable`: down, not accepting connections, but also a wrong password or a missing
/// database, which look the same from here; each try logs the reason) until `wait` has
/// passed or the node is told to stop. Any other error (a bad URL or schema, a failed
/// migration) ends at once.
async fn connect_postgres(
    config: PostgresConfig,
    limits: Limits,
    wait: Duration,
    shutdown: &CancellationToken,
) -> Result<PostgresStore, StoreError> {
    // A wait too long to represent means "until told to stop".
    let deadline = tokio::time::Instant::now().checked_add(wait);
    let mut backoff = Duration::from_millis(250);
    loop {
        match PostgresStore::connect(config.clone(), limits.clone()).await {
            Err(StoreError::Unavailable(reason))
                if deadline.is_none_or(|d| tokio::time::Instant::now() < d) =>
            {
                tracing::warn!(
                    %reason,
                    retry_in_ms = backoff.as_millis() as u64,
                    "waiting for postgresql"
                );
                let pause = deadline.map_or(backoff, |d| {
                    backoff.min(d.saturating_duration_since(tokio::time::Instant::now()))
                });
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = shutdown.cancelled() => {
                        return Err(StoreError::Unavailable(format!(
                            "stopped while waiting for postgresql: {reason}"
                        )));
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            result => return result,
        }
    }
}

fn explicit_secret(settings: &ServerConfig) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(secret) = &settings.jwt_secret {
        return Ok(Some(secret.as_bytes().to_vec()));
    }
    if let Some(path) = &settings.jwt_secret_file {
        return read_secret_file(path).map(Some);
    }
    Ok(None)
}

fn read_secret_file(path: &Path) -> anyhow::Result<Vec<u8>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let secret = text.trim();
    if secret.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(secret.as_bytes().to_vec())
}

fn read_pems(paths: &[PathBuf]) -> anyhow::Result<Vec<Vec<u8>>> {
    paths
        .iter()
        .map(|p| std::fs::read(p).with_context(|| format!("cannot read key file {}", p.display())))
        .collect()
}

/// The issuers with keys of their own: `--jwt-jwks-url`/`--jwt-jwks-file` for `--jwt-issuer`,
/// and every `[[jwt_issuers]]` of the file.
fn issuers(settings: &ServerConfig) -> anyhow::Result<Vec<IssuerConfig>> {
    let mut issuers = Vec::new();
    let flag = match (&settings.jwt_jwks_url, &settings.jwt_jwks_file) {
        (Some(_), Some(_)) => bail!("set one of --jwt-jwks-url and --jwt-jwks-file, not both"),
        (Some(url), None) => Some(KeySource::JwksUrl(url.clone())),
        (None, Some(file)) => Some(KeySource::JwksFile(file.clone())),
        (None, None) => None,
    };
    if let Some(keys) = flag {
        let Some(issuer) = settings.jwt_issuer.clone() else {
            bail!(
                "--jwt-jwks-url and --jwt-jwks-file need --jwt-issuer: the iss their tokens carry"
            );
        };
        issuers.push(IssuerConfig {
            issuer,
            keys,
            audience: settings.jwt_audience.clone(),
            subject_prefix: None,
        });
    }
    for entry in &settings.jwt_issuers {
        let keys = match (&entry.jwks_url, &entry.jwks_file) {
            (Some(url), None)
                if entry.rsa_public_keys.is_empty() && entry.ec_public_keys.is_empty() =>
            {
                KeySource::JwksUrl(url.clone())
            }
            (None, Some(file))
                if entry.rsa_public_keys.is_empty() && entry.ec_public_keys.is_empty() =>
            {
                KeySource::JwksFile(file.clone())
            }
            (None, None)
                if !entry.rsa_public_keys.is_empty() || !entry.ec_public_keys.is_empty() =>
            {
                KeySource::Pem {
                    rs256_public_keys: read_pems(&entry.rsa_public_keys)?,
                    es256_public_keys: read_pems(&entry.ec_public_keys)?,
                }
            }
            _ => bail!(
                "jwt_issuers entry {:?}: give exactly one of jwks_url, jwks_file, or rsa_public_keys/ec_public_keys",
                entry.issuer
            ),
        };
        issuers.push(IssuerConfig {
            issuer: entry.issuer.clone(),
            keys,
            audience: entry.audience.clone(),
            subject_prefix: entry.subject_prefix.clone(),
        });
    }
    Ok(issuers)
}

fn jwks_config(settings: &ServerConfig) -> JwksConfig {
    JwksConfig {
        refresh_interval: settings.jwt_jwks_refresh_interval,
        unknown_kid_cooldown: settings.jwt_jwks_unknown_kid_cooldown,
        fetch_timeout: settings.jwt_jwks_fetch_timeout,
        max_document_bytes: settings.jwt_jwks_max_document_bytes,
        max_keys: settings.jwt_jwks_max_key_count,
        retired_key_ttl: settings.jwt_jwks_retired_key_ttl,
    }
}

/// The verifier's keys. With none configured, a generated secret kept in the data dir is
/// used, and only on a loopback address: an exposed server must have keys set on purpose.
fn auth_config(
    settings: &ServerConfig,
    data_dir: &Path,
    listen: SocketAddr,
    has_issuers: bool,
) -> anyhow::Result<(AuthConfig, bool)> {
    let rsa = read_pems(&settings.jwt_rsa_public_keys)?;
    let ec = read_pems(&settings.jwt_ec_public_keys)?;
    let mut secret = explicit_secret(settings)?;
    let mut generated = false;
    let jwks_flag = settings.jwt_jwks_url.is_some() || settings.jwt_jwks_file.is_some();
    if secret.is_none() && rsa.is_empty() && ec.is_empty() && !has_issuers {
        if !listen.ip().is_loopback() {
            bail!(
                "refusing to listen on {listen} without explicitly configured jwt keys: set --jwt-secret, --jwt-secret-file, --jwt-rsa-public-key or --jwt-ec-public-key"
            );
        }
        secret = Some(load_or_generate_secret(data_dir)?);
        generated = true;
    }
    let config = AuthConfig {
        hs256_secret: secret,
        rs256_public_keys: rsa,
        es256_public_keys: ec,
        // With a JWKS flag, --jwt-issuer and --jwt-audience belong to that issuer.
        issuer: settings.jwt_issuer.clone().filter(|_| !jwks_flag),
        audience: settings.jwt_audience.clone().filter(|_| !jwks_flag),
        leeway_secs: settings.jwt_leeway.as_secs(),
    };
    Ok((config, generated))
}

/// The Cognito section with what the binary adds: the credential keys' secret (the
/// `--cognito-secret-file`'s, else the HS256 secret) and GetOpenIdToken's signing key (the
/// HS256 secret, with the default keys' `iss` and `aud`, so `/v1/sync` accepts its tokens).
fn cognito_config(mut cognito: CognitoConfig, auth: &AuthConfig) -> anyhow::Result<CognitoConfig> {
    let Some(pool) = &cognito.cognito_identity_pool else {
        return Ok(cognito);
    };
    tandem_gateway::cognito::config::validate_pool_id(pool).map_err(anyhow::Error::msg)?;
    let secret = match &cognito.cognito_secret_file {
        Some(path) => read_secret_file(path)?,
        None => auth.hs256_secret.clone().context(
            "--cognito-identity-pool needs --cognito-secret-file or an hs256 secret to derive credentials from",
        )?,
    };
    tandem_token::check_secret(&secret).context("the cognito secret")?;
    cognito.credential_secret = Some(secret);
    cognito.open_id = auth.hs256_secret.clone().map(|hs256_secret| OpenIdMint {
        hs256_secret,
        issuer: auth.issuer.clone(),
        audience: auth.audience.clone(),
    });
    Ok(cognito)
}

fn load_or_generate_secret(data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = data_dir.join(SECRET_FILE);
    if path.exists() {
        return read_secret_file(&path);
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let secret = tandem_token::generate_secret();
    write_private(&path, secret.as_bytes())?;
    Ok(secret.into_bytes())
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    Ok(())
}
