//! The sync hook: an HTTP endpoint the deployment names (`sync_hook_url`) that is asked
//! before every update commits, with the identity, the dataset, its current records and the
//! patches, and answers accept, accept with rewritten patches, or reject (what a Cognito Sync
//! Trigger Lambda did). Requests are signed (`X-Tandem-Signature: sha256=HMAC(secret,
//! timestamp + "." + body)` with `X-Tandem-Timestamp`), bounded by `sync_hook_timeout`, and a
//! circuit breaker stops calling an endpoint that keeps failing. A hook that fails, times out
//! or is skipped by the open breaker refuses the update with `unavailable` (retriable): nothing
//! is written without the hook's say. See docs/HOOKS.md.
//!
//! A Cognito pool's own SyncTrigger (`cognito::trigger`, set with SetCognitoEvents) takes
//! the deployment hook's place for that pool and speaks Cognito's event format; it goes
//! through the same [`HookClient`] (signing, timeout, bound in flight) with a breaker of
//! its own.

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full, Limited};
use hyper::Uri;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::time::{Duration, Instant};
use tandem_protocol::{DatasetRef, Patch, Record};

/// The most bytes of a hook's answer that are read.
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024;

/// Hook calls in flight at once on one node; more updates are refused as `unavailable`
/// at once rather than each holding a socket to a hook that is not keeping up.
const MAX_CALLS_IN_FLIGHT: usize = 64;

/// What the hook decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Commit these patches (the request's, or the hook's rewrite of them).
    Accept(Vec<Patch>),
    /// Refuse the update with this message.
    Reject(String),
    /// A pool's SyncTrigger (Cognito's event format) refused the update: it answered 4xx
    /// (the Lambda threw) or a 2xx that is not an event. The message says which.
    LambdaReject(String),
}

/// Why the hook gave no verdict; the update is refused as `unavailable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HookError {
    #[error("the sync hook did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the sync hook failed: {0}")]
    Failed(String),
    #[error("the sync hook is failing; not called until its breaker closes")]
    Open,
    #[error("too many sync hook calls in flight")]
    Busy,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Request<'a> {
    identity: &'a str,
    dataset: DatasetRef,
    device_id: Option<&'a str>,
    sync_count: u64,
    records: &'a [Record],
    patches: &'a [Patch],
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Answer {
    Accept {
        #[serde(default)]
        patches: Option<Vec<Patch>>,
    },
    Reject {
        #[serde(default)]
        message: Option<String>,
    },
}

/// One endpoint's circuit breaker: consecutive failures open it for a while; then one call
/// (the probe) tries again while the others are still refused, and its outcome closes or
/// re-opens it.
#[derive(Debug, Default)]
pub(crate) struct Breaker(Mutex<BreakerState>);

#[derive(Debug, Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    /// When the probe started; a probe whose update was dropped mid-call (its client went
    /// away) counts as over after twice the timeout, so the breaker cannot stay stuck.
    probing: Option<Instant>,
}

/// What every hook call of a node shares, whichever endpoint it calls (the deployment's
/// hook, a pool's SyncTrigger): the HTTP client, the signing secret, the timeout, the
/// breaker's settings and the bound on calls in flight.
pub(crate) struct HookClient {
    secret: Option<Vec<u8>>,
    timeout: Duration,
    failures_to_open: u32,
    open_for: Duration,
    /// Plain HTTP and HTTPS; `Err` if TLS could not be set up (every call then fails).
    client: Result<Client<HttpsConnector<HttpConnector>, Full<Bytes>>, String>,
    in_flight: tokio::sync::Semaphore,
}

impl std::fmt::Debug for HookClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HookClient")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl HookClient {
    pub(crate) fn from_config(config: &crate::GatewayConfig) -> HookClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.sync_hook_timeout));
        connector.enforce_http(false);
        let client = crate::auth::client_tls().map(|tls| {
            let connector = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(tls)
                .https_or_http()
                .enable_http1()
                .wrap_connector(connector);
            Client::builder(TokioExecutor::new()).build(connector)
        });
        if let Err(e) = &client {
            tracing::error!(error = %e, "sync hook client unusable: every hooked update will be refused");
        }
        HookClient {
            secret: config
                .sync_hook_secret
                .as_ref()
                .map(|s| s.as_bytes().to_vec()),
            timeout: config.sync_hook_timeout,
            failures_to_open: config.sync_hook_breaker_failures.max(1),
            open_for: config.sync_hook_breaker_open,
            client,
            in_flight: tokio::sync::Semaphore::new(MAX_CALLS_IN_FLIGHT),
        }
    }

    /// POSTs `body` to `url` under `breaker` and the timeout (the answer's body included);
    /// `read` turns the answer's status and body into a result, or into a failure (`Err`)
    /// that counts towards opening the breaker.
    pub(crate) async fn post<T>(
        &self,
        breaker: &Breaker,
        url: Uri,
        body: Vec<u8>,
        read: impl FnOnce(hyper::StatusCode, Bytes) -> Result<T, String>,
    ) -> Result<T, HookError> {
        let Ok(_permit) = self.in_flight.try_acquire() else {
            return Err(HookError::Busy);
        };
        let probe = {
            let mut state = breaker.0.lock();
            let now = Instant::now();
            let probing = state
                .probing
                .is_some_and(|since| now.duration_since(since) < self.timeout * 2);
            match state.open_until {
                Some(until) if probing || now < until => return Err(HookError::Open),
                // Half open: this call is the probe; the others stay refused until it ends.
                Some(_) => {
                    state.probing = Some(now);
                    true
                }
                None => false,
            }
        };
        let outcome = match tokio::time::timeout(self.timeout, self.call(url, body)).await {
            Ok(Ok((status, answer))) => read(status, answer).map_err(HookError::Failed),
            Ok(Err(e)) => Err(HookError::Failed(e)),
            Err(_) => Err(HookError::Timeout(self.timeout)),
        };
        let mut state = breaker.0.lock();
        if probe {
            state.probing = None;
        }
        match outcome {
            Ok(answer) => {
                state.failures = 0;
                state.open_until = None;
                Ok(answer)
            }
            Err(e) => {
                state.failures += 1;
                if probe || state.failures >= self.failures_to_open {
                    state.open_until = Some(Instant::now() + self.open_for);
                    tracing::warn!(error = %e, open_for_ms = self.open_for.as_millis() as u64, "sync hook failing, breaker open");
                }
                Err(e)
            }
        }
    }

    async fn call(&self, url: Uri, body: Vec<u8>) -> Result<(hyper::StatusCode, Bytes), String> {
        let client = self.client.as_ref().map_err(Clone::clone)?;
        let request = signed_post(url, self.secret.as_deref(), Bytes::from(body), &[])?;
        let response = client
            .request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer failed: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// The deployment's hook (`sync_hook_url`), in Tandem's own format.
pub(crate) struct SyncHook {
    /// The configured URL, or why it is not one (then every update is refused: a hook that
    /// was meant to be asked is never silently skipped).
    url: Result<Uri, String>,
    breaker: Breaker,
}

impl std::fmt::Debug for SyncHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncHook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// `sync_hook_url` from a settings file, through [`parse_url`].
pub(crate) fn deserialize_url<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<String>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|url| parse_url(&url).map_err(serde::de::Error::custom))
        .transpose()
}

/// What an update becomes after the hook: the patches to commit, or the refusal.
pub(crate) enum Checked {
    Commit(Vec<Patch>),
    Rejected(String),
    /// Refused by a pool's SyncTrigger (Cognito: `InvalidLambdaFunctionOutputException`).
    LambdaRejected(String),
    Unavailable(HookError),
}

/// Runs the hook that applies to an update, if any: the pool's SyncTrigger (set with
/// SetCognitoEvents) wins over the deployment's hook. Reads the dataset's current records
/// for it (outside any store lock: the stale check at commit still guards the result).
pub(crate) async fn check_update(
    gw: &crate::Gateway,
    identity: &str,
    key: &tandem_store::DatasetKey,
    device_id: Option<&str>,
    patches: Vec<Patch>,
) -> Result<Checked, tandem_store::StoreError> {
    let trigger = match &gw.cognito_sync {
        Some(api) => gw
            .triggers
            .get(gw.store.as_ref(), &key.pool)
            .await?
            .map(|t| (api, t)),
        None => None,
    };
    if trigger.is_none() && gw.hook.is_none() {
        return Ok(Checked::Commit(patches));
    }
    let current = gw.store.snapshot(key, identity).await?;
    let verdict = match (&trigger, &gw.hook) {
        (Some((api, trigger)), _) => {
            crate::cognito::trigger::check(
                &gw.hook_client,
                trigger,
                &api.pool_id,
                key,
                &current.records,
                &patches,
            )
            .await
        }
        (None, Some(hook)) => {
            hook.check(
                &gw.hook_client,
                identity,
                key.to_ref(),
                device_id,
                current.sync_count,
                &current.records,
                &patches,
            )
            .await
        }
        (None, None) => Ok(Verdict::Accept(patches)),
    };
    Ok(match verdict {
        Ok(Verdict::Accept(patches)) => Checked::Commit(patches),
        Ok(Verdict::Reject(message)) => Checked::Rejected(message),
        Ok(Verdict::LambdaReject(message)) => Checked::LambdaRejected(message),
        Err(e) => {
            if gw.throttle.record(crate::throttle::Event::HookFailed) {
                tracing::warn!(error = %e, "sync hook gave no verdict; update refused");
            }
            Checked::Unavailable(e)
        }
    })
}

/// A `sync_hook_url` as a setting gives it: `http://host[:port]/path`.
pub(crate) fn parse_url(url: &str) -> Result<String, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("invalid sync hook url `{url}`: {e}"))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(format!(
            "invalid sync hook url `{url}`: expected http://host[:port]/path (put TLS in front with a proxy on the same host)"
        ));
    }
    Ok(url.to_owned())
}

impl SyncHook {
    /// The hook a deployment configured, if any.
    pub(crate) fn from_config(config: &crate::GatewayConfig) -> Option<SyncHook> {
        let url = config.sync_hook_url.as_deref()?;
        let url = parse_url(url).and_then(|u| u.parse::<Uri>().map_err(|e| e.to_string()));
        if let Err(e) = &url {
            tracing::error!(error = %e, "sync hook url unusable: every update will be refused");
        }
        Some(SyncHook {
            url,
            breaker: Breaker::default(),
        })
    }

    /// Asks the hook about an update of `dataset` (at `sync_count`, holding `records`).
    #[expect(
        clippy::too_many_arguments,
        reason = "the hook request's fields, each named"
    )]
    pub(crate) async fn check(
        &self,
        client: &HookClient,
        identity: &str,
        dataset: DatasetRef,
        device_id: Option<&str>,
        sync_count: u64,
        records: &[Record],
        patches: &[Patch],
    ) -> Result<Verdict, HookError> {
        let url = self.url.clone().map_err(HookError::Failed)?;
        let body = serde_json::to_vec(&Request {
            identity,
            dataset,
            device_id,
            sync_count,
            records,
            patches,
        })
        .map_err(|e| HookError::Failed(e.to_string()))?;
        let answer = client
            .post(&self.breaker, url, body, |status, body| {
                if !status.is_success() {
                    return Err(format!("http status {status}"));
                }
                serde_json::from_slice::<Answer>(&body)
                    .map_err(|e| format!("unreadable answer: {e}"))
            })
            .await?;
        Ok(match answer {
            Answer::Accept { patches: Some(p) } => Verdict::Accept(p),
            Answer::Accept { patches: None } => Verdict::Accept(patches.to_vec()),
            Answer::Reject { message } => {
                Verdict::Reject(message.unwrap_or_else(|| "rejected by the sync hook".to_owned()))
            }
        })
    }
}

/// A JSON `POST` as Tandem sends its hooks and webhooks: `X-Tandem-Timestamp` (Unix
/// seconds), and with a secret `X-Tandem-Signature` ([`sign`]); `extra` headers after them.
pub fn signed_post(
    url: Uri,
    secret: Option<&[u8]>,
    body: Bytes,
    extra: &[(&str, String)],
) -> Result<hyper::Request<Full<Bytes>>, String> {
    let timestamp = tandem_store::now_ms() / 1000;
    let mut request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("tandem/", env!("CARGO_PKG_VERSION")),
        )
        .header("x-tandem-timestamp", timestamp.to_string());
    if let Some(secret) = secret {
        request = request.header("x-tandem-signature", sign(secret, timestamp, &body));
    }
    for (name, value) in extra {
        request = request.header(*name, value);
    }
    request
        .body(Full::new(body))
        .map_err(|e| format!("bad request: {e}"))
}

/// `sha256=` and the hex HMAC-SHA256 of `timestamp.body` under the secret.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    // HMAC takes a key of any length; the error case cannot happen.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_hook_signature_is_hmac_of_timestamp_dot_body() {
        // Python: hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
        let sig = sign(b"s3cret", 1_700_000_000, b"{}");
        assert!(sig.starts_with("sha256="));
        assert_eq!(sig.len(), 7 + 64);
        assert_ne!(sig, sign(b"s3cret", 1_700_000_001, b"{}"));
    }

    #[test]
    fn test_hook_url_must_be_plain_http() {
        assert!(parse_url("http://127.0.0.1:9000/hook").is_ok());
        assert!(parse_url("https://example.com/hook").is_err());
        assert!(parse_url("not a url").is_err());
    }
}
