//! Tandem's gateway: the axum router (`GET /v1/sync` WebSocket, the REST API under
//! `/v1/datasets`, `/health`, `/ready`, the Cognito Identity endpoint at `POST /`), one
//! session per WebSocket connection (authentication, requests, subscriptions), JWT
//! verification, and the local hub that hands committed changes to local subscribers.
//!
//! It owns no data: the store is the truth and is called for every read and write, and the
//! broker carries commits between nodes. It installs no tracing subscriber and reads no
//! process environment (except the system trust store's `SSL_CERT_FILE` / `SSL_CERT_DIR`, read
//! by the TLS client when a JWKS URL is configured); the `tandem` binary wires it up.

pub mod auth;
pub mod cognito;
pub mod config;
mod connections;
mod demo;
mod history;
mod hook;
mod hub;
mod listener;
mod metrics;
mod origin;
mod outbox;
mod push;
mod rate;
mod rest;
mod session;
#[cfg(test)]
mod testkit;
mod throttle;

pub use auth::{AuthConfig, AuthError, Identity, IssuerConfig, JwksConfig, KeySource, Verifier};
pub use cognito::CognitoConfig;
pub use config::GatewayConfig;
pub use hook::{sign, signed_post};
use hub::Hub;
pub use hub::Subscribers;
pub use listener::{Listener, Peer};

use axum::Extension;
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tandem_fanout::{Broker, BrokerHealth};
use tandem_protocol::{ErrorCode, LimitCode, ServerFrame};
use tandem_store::Store;
use throttle::{Event, Throttle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One gateway node: shared by every session and HTTP handler.
pub struct Gateway {
    config: GatewayConfig,
    store: Arc<dyn Store>,
    hub: Hub,
    connections: connections::Connections,
    verifier: Verifier,
    /// The Cognito Identity endpoint, when an identity pool is configured.
    cognito_identity: Option<cognito::identity::IdentityEndpoint>,
    /// Counts what clients cause at will and keeps its log lines few.
    throttle: Arc<Throttle>,
    shutdown: CancellationToken,
    /// Set at SIGTERM, before `shutdown`: `/ready` answers 503 while sessions go on.
    draining: AtomicBool,
    sessions: TaskTracker,
    next_session: AtomicU64,
    session_salt: u64,
    /// The Cognito Sync API, when a Cognito identity pool is configured.
    cognito_sync: Option<cognito::sync::SyncApi>,
    /// The deployment's sync hook, when one is configured.
    hook: Option<hook::SyncHook>,
    /// What every hook call shares (the deployment's hook and the pools' SyncTriggers).
    hook_client: hook::HookClient,
    /// Each Cognito pool's SyncTrigger, as this node last read it from the store.
    triggers: cognito::trigger::Triggers,
    /// The REST API's per-identity request rate.
    rest_rate: history::RestRate,
    /// More `/metrics` lines from parts the binary wires in (the change stream).
    extra_metrics: parking_lot::Mutex<Vec<MetricsSource>>,
}

/// Renders some `/metrics` lines (Prometheus text) when asked.
pub type MetricsSource = Box<dyn Fn() -> String + Send + Sync>;

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gateway {
    /// Builds a gateway over a registry of subscribers and the broker that was made with the
    /// registry's handler ([`Subscribers::handler`]); the store is the registry's.
    pub fn new(
        config: GatewayConfig,
        subscribers: Arc<Subscribers>,
        broker: Arc<dyn Broker>,
        verifier: Verifier,
    ) -> Arc<Gateway> {
        let store = subscribers.store().clone();
        Arc::new(Gateway {
            connections: connections::Connections::new(&config),
            cognito_sync: cognito::sync::SyncApi::from_config(&config),
            throttle: Throttle::new(config.max_log_lines, config.log_interval),
            cognito_identity: cognito::identity::IdentityEndpoint::new(&config.cognito),
            hook: hook::SyncHook::from_config(&config),
            hook_client: hook::HookClient::from_config(&config),
            triggers: cognito::trigger::Triggers::new(config.cognito.cognito_events_refresh),
            rest_rate: history::RestRate::new(config.max_rest_requests_per_second),
            extra_metrics: parking_lot::Mutex::new(Vec::new()),
            config,
            store,
            hub: Hub::new(subscribers, broker),
            verifier,
            shutdown: CancellationToken::new(),
            draining: AtomicBool::new(false),
            sessions: TaskTracker::new(),
            next_session: AtomicU64::new(1),
            session_salt: rand::random::<u64>() & 0xffff_ffff,
        })
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        self.hub.broker()
    }

    fn metrics(&self) -> &Arc<metrics::Metrics> {
        self.hub.metrics()
    }

    /// Open WebSocket sessions.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    fn next_session_id(&self) -> (u64, String) {
        let n = self.next_session.fetch_add(1, Ordering::Relaxed);
        (n, format!("{:08x}-{n:x}", self.session_salt))
    }

    /// Adds lines to `/metrics` (the binary's change stream).
    pub fn add_metrics(&self, source: MetricsSource) {
        self.extra_metrics.lock().push(source);
    }

    pub fn router(self: &Arc<Self>) -> Router {
        // What a page on another site could call from a visitor's browser (REST routes
        // belong here too): only allowed origins.
        let browser_api = Router::new()
            .route("/dev/token", get(demo::token))
            .route("/v1/sync", get(sync))
            .route(
                "/v1/datasets/{owner}/{name}/history",
                get(rest::get_history),
            )
            .route(
                "/v1/datasets/{owner}/{name}/at/{sync_count}",
                get(rest::get_at),
            )
            .route(
                "/v1/datasets/{owner}/{name}/restore",
                post(rest::post_restore),
            )
            .route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                origin::guard,
            ));
        Router::new()
            .merge(browser_api)
            // `POST /` is the Cognito Identity endpoint (404 while it is off).
            .route(
                "/",
                get(demo::index)
                    .post(cognito::identity::handle)
                    .options(cognito::identity::preflight),
            )
            .route("/demo/{file}", get(demo::file))
            .route("/sdk/tandem.js", get(demo::sdk))
            .route("/sdk/{version}/tandem.js", get(demo::sdk_versioned))
            .route("/health", get(health))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics_text))
            // Signed with SigV4, so no cookie rides along: open to every origin (CORS).
            .route("/identitypools", any(cognito::sync::handle))
            .route("/identitypools/{*rest}", any(cognito::sync::handle))
            .with_state(self.clone())
    }

    /// Closes every session with "going away, reconnect" (after the request each is
    /// handling, so in-flight commits finish) and waits for them up to `grace`. Returns
    /// whether all ended in time. Call after the listener stopped accepting.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shutdown.cancel();
        self.sessions.close();
        let ended = tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_ok();
        if !ended {
            tracing::warn!(
                open = self.sessions.len(),
                grace_ms = grace.as_millis() as u64,
                "sessions still open after the grace period"
            );
        }
        // The counts of lines left out in the interval the node stops in.
        self.throttle.flush();
        ended
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// From now on `/ready` answers 503 (`shuttingDown`) so that load balancers stop sending
    /// new clients, while sessions and new upgrades are still served: the drain delay
    /// before [`Gateway::shutdown`].
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

async fn sync(
    State(gw): State<Arc<Gateway>>,
    peer: Option<Extension<ConnectInfo<Peer>>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if gw.is_shutting_down() {
        return error_response(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "server is shutting down",
        );
    }
    let pre_auth = match bearer_token(&headers) {
        Some(token) => match gw.verifier.verify(token) {
            Ok(identity) => Some(identity),
            Err(e) => {
                if gw.throttle.record(Event::TokenRefused) {
                    tracing::info!(error = %e, "token refused at the upgrade");
                }
                return error_response(
                    StatusCode::UNAUTHORIZED,
                    ErrorCode::Unauthorized,
                    e.to_string(),
                );
            }
        },
        None => None,
    };
    let peer = peer.map(|Extension(ConnectInfo(peer))| peer);
    // Counted before the upgrade: a refused client costs no session at all.
    let admitted = match gw
        .connections
        .admit(peer.as_ref().map(|p| p.addr.ip()), pre_auth.is_some())
    {
        Ok(admitted) => admitted,
        Err(refused) => return refused_response(&gw, refused),
    };
    let progress = peer.as_ref().map(|p| p.progress.clone());
    let budget = match (&pre_auth, peer) {
        (None, Some(peer)) => {
            peer.budget.arm(gw.config.max_unauthenticated_bytes);
            Some(peer.budget)
        }
        _ => None,
    };
    let config = &gw.config;
    ws.max_message_size(config.max_frame_bytes)
        .max_frame_size(config.max_frame_bytes)
        .read_buffer_size(config.read_buffer_bytes)
        .write_buffer_size(config.write_buffer_bytes)
        .on_upgrade(move |socket| {
            let tracker = gw.sessions.clone();
            let conn = session::Conn {
                admitted,
                budget,
                progress,
            };
            tracker.track_future(session::run(gw, socket, pre_auth, conn))
        })
}

/// The answer to an upgrade a connection limit refused: 503 for the node's limits (try
/// another node), 429 for the peer's own.
fn refused_response(gw: &Gateway, refused: connections::Refused) -> Response {
    gw.metrics().error(refused.limit.error_code());
    let max = refused.max;
    if gw.throttle.record(Event::ConnectionLimit) {
        tracing::info!(limit = %refused.limit, max, "connection refused at the upgrade");
    }
    let message = match refused.limit {
        LimitCode::MaxConnections => {
            format!("this node serves at most {max} connections; retry later or elsewhere")
        }
        LimitCode::MaxUnauthenticatedConnections => format!(
            "this node has {max} connections that have not authenticated; retry later or elsewhere"
        ),
        LimitCode::MaxConnectionsPerIp => {
            format!("at most {max} connections from one address")
        }
        _ => format!("at most {max} new connections per second from one address"),
    };
    let status = match refused.limit {
        LimitCode::MaxConnections | LimitCode::MaxUnauthenticatedConnections => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::TOO_MANY_REQUESTS,
    };
    let body = ServerFrame::limit_error(None, refused.limit, max, message).to_json();
    let mut response = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(wait) = refused.retry_after {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs.max(1)));
    }
    response
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub(crate) fn error_response(
    status: StatusCode,
    code: ErrorCode,
    message: impl Into<String>,
) -> Response {
    let body = ServerFrame::error(None, code, message).to_json();
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn health() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    let (subscriptions, datasets) = gw.hub.subscribers().counts();
    let gauges = metrics::Gauges {
        sessions: gw.session_count(),
        subscriptions,
        datasets,
        broker_up: gw.broker().health() == BrokerHealth::Up,
    };
    let mut text = metrics::render(gw.metrics(), &gauges, &gw.throttle);
    for source in gw.extra_metrics.lock().iter() {
        text.push_str(&source());
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Ready when the store answers and the broker reaches its peers; degraded (503) otherwise,
/// with the reason, so a load balancer stops sending new clients here.
async fn ready(State(gw): State<Arc<Gateway>>) -> Response {
    let store = gw.store.health().await;
    let broker = gw.broker().health();
    let shutting_down = gw.is_shutting_down() || gw.draining.load(Ordering::Relaxed);
    let ok = store.is_ok() && broker == BrokerHealth::Up && !shutting_down;
    let body = serde_json::json!({
        "status": if ok { "ready" } else { "degraded" },
        "store": match &store { Ok(()) => "up".to_owned(), Err(e) => e.to_string() },
        "broker": match &broker { BrokerHealth::Up => "up".to_owned(), BrokerHealth::Degraded(r) => r.clone() },
        "shuttingDown": shutting_down,
        "sessions": gw.session_count(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}
