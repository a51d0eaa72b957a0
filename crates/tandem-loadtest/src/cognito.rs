//! The `cognito` scenario: W writers, each its own Cognito identity (GetId and
//! GetCredentialsForIdentity on the node's Identity endpoint), each sending SigV4-signed
//! UpdateRecords to its own dataset at R/s over one keep-alive HTTP/1.1 connection, and
//! optionally ListRecords at L/s over a second one. It measures what the Cognito Sync REST
//! API sustains on a node: commits/s, commit latency, errors by type.
//!
//! HTTP/1.1 has one request in flight per connection, so each writer is open loop the way
//! a `rooms` writer is: requests go at their scheduled times, a late one as soon as the
//! previous reply is in, and latency runs from the scheduled time. Each update replaces
//! the writer's one key with the sync count the last reply gave; after a conflict or a
//! lost connection the count is read back with ListRecords (not measured).

use crate::cli::CognitoArgs;
use crate::client::Shared;
use crate::conn::Fail;
use crate::error::LoadError;
use crate::http::{Http, Response};
use crate::ledger::{Outcome, WriteLedger};
use crate::run::Run;
use crate::scenario::{Finished, window};
use crate::sigv4::{self, Credentials};
use crate::stats::Stats;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

/// The key every update replaces.
const KEY: &str = "lt0";

/// One writer once set up: its identity, credentials, dataset and connections.
#[derive(Debug)]
struct Session {
    http: Http,
    reader: Option<Http>,
    creds: Credentials,
    region: String,
    /// `/identitypools/{pool}/identities/{id}/datasets/{name}`, percent-encoded.
    dataset_path: String,
    session_token: String,
    sync_count: u64,
}

/// `host:port` of a gateway URL (`ws://host:port/v1/sync`).
fn host_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest).to_owned()
}

fn encode(s: &str) -> String {
    s.replace(':', "%3A")
}

fn body_json(response: &Response) -> Value {
    serde_json::from_slice(&response.body).unwrap_or(Value::Null)
}

/// The failure a non-200 reply stands for: its Cognito error type, else its status.
fn refusal(response: &Response) -> Fail {
    let code = response
        .error_type
        .clone()
        .unwrap_or_else(|| format!("http_{}", response.status));
    Fail::new(code, String::from_utf8_lossy(&response.body).into_owned())
}

async fn identity_call(http: &mut Http, op: &str, body: Value) -> Result<Value, Fail> {
    let target = format!("AWSCognitoIdentityService.{op}");
    let response = http
        .request(
            "POST",
            "/",
            &[
                ("X-Amz-Target", &target),
                ("Content-Type", "application/x-amz-json-1.1"),
            ],
            body.to_string().as_bytes(),
        )
        .await?;
    if response.status != 200 {
        return Err(refusal(&response));
    }
    Ok(body_json(&response))
}

impl Session {
    async fn open(
        host: String,
        pool: String,
        dataset: String,
        reader: bool,
    ) -> Result<Session, Fail> {
        let mut http = Http::connect(&host).await?;
        let id = identity_call(&mut http, "GetId", json!({ "IdentityPoolId": pool })).await?;
        let identity = id["IdentityId"]
            .as_str()
            .ok_or_else(|| Fail::new("bad_response", "GetId: no IdentityId"))?
            .to_owned();
        let answer = identity_call(
            &mut http,
            "GetCredentialsForIdentity",
            json!({ "IdentityId": identity }),
        )
        .await?;
        let c = &answer["Credentials"];
        let field = |name: &str| {
            c[name].as_str().map(str::to_owned).ok_or_else(|| {
                Fail::new(
                    "bad_response",
                    format!("GetCredentialsForIdentity: no {name}"),
                )
            })
        };
        let creds = Credentials {
            access_key_id: field("AccessKeyId")?,
            secret_key: field("SecretKey")?,
            session_token: field("SessionToken")?,
        };
        let region = pool.split(':').next().unwrap_or("us-east-1").to_owned();
        let reader = match reader {
            true => Some(Http::connect(&host).await?),
            false => None,
        };
        let mut session = Session {
            http,
            reader,
            creds,
            region,
            dataset_path: format!(
                "/identitypools/{}/identities/{}/datasets/{dataset}",
                encode(&pool),
                encode(&identity)
            ),
            session_token: String::new(),
            sync_count: 0,
        };
        session.refresh().await?;
        Ok(session)
    }

    /// A signed request on the writer's connection (`reader` for the list connection).
    async fn signed(
        &mut self,
        reader: bool,
        method: &str,
        path_and_query: &str,
        body: &[u8],
    ) -> Result<Response, Fail> {
        let date = sigv4::amz_date(SystemTime::now());
        let http = match (reader, self.reader.as_mut()) {
            (true, Some(r)) => r,
            _ => &mut self.http,
        };
        let authorization = sigv4::authorization(
            &self.creds,
            &self.region,
            method,
            &http.host,
            path_and_query,
            body,
            &date,
        );
        http.request(
            method,
            path_and_query,
            &[
                ("Authorization", &authorization),
                ("X-Amz-Date", &date),
                ("X-Amz-Security-Token", &self.creds.session_token),
                ("Content-Type", "application/json"),
            ],
            body,
        )
        .await
    }

    /// ListRecords from the start: the session token and the key's sync count.
    async fn refresh(&mut self) -> Result<(), Fail> {
        let path = format!("{}/records", self.dataset_path);
        let response = self.signed(false, "GET", &path, b"").await?;
        if response.status != 200 {
            return Err(refusal(&response));
        }
        let body = body_json(&response);
        self.session_token = body["SyncSessionToken"]
            .as_str()
            .ok_or_else(|| Fail::new("bad_response", "ListRecords: no SyncSessionToken"))?
            .to_owned();
        self.sync_count = body["Records"]
            .as_array()
            .and_then(|records| records.iter().find(|r| r["Key"] == KEY))
            .and_then(|r| r["SyncCount"].as_u64())
            .unwrap_or(0);
        Ok(())
    }

    async fn reconnect(&mut self) -> Result<(), Fail> {
        self.http = Http::connect(&self.http.host.clone()).await?;
        self.refresh().await
    }
}

pub async fn cognito(run: &mut Run, args: &CognitoArgs) -> Result<Finished, LoadError> {
    run.check_rate(args.rate)?;
    if args.list_rate != 0.0 {
        run.check_rate(args.list_rate)?;
    }
    if args.writers == 0 {
        return Err(LoadError::Options("--writers must be at least 1".into()));
    }
    if !args.pool.contains(':') {
        return Err(LoadError::Options(
            "--pool must be an identity pool id (`us-east-1:<uuid>`)".into(),
        ));
    }
    let prefix = run.prefix.clone();
    let hosts: Vec<String> = (0..args.writers).map(|i| host_of(run.url(i))).collect();
    let reader = args.list_rate > 0.0;
    let pool = args.pool.clone();
    let sessions = run
        .open_many(args.writers, None, |slot| {
            Session::open(
                hosts[slot].clone(),
                pool.clone(),
                format!("{prefix}-w{slot}"),
                reader,
            )
        })
        .await;
    if sessions.iter().all(Option::is_none) {
        return Err(LoadError::Setup(format!(
            "no writer could get credentials and list its dataset: {:?}",
            run.stats().errors()
        )));
    }
    run.connected();

    let (t0, start, end) = window(run);
    let shared = run.shared.clone();
    let hard = Instant::from(shared.clock.instant(end)) + run.common.drain;
    let spread = 1e9 / args.rate / args.writers as f64;
    let mut ledgers = Vec::new();
    let mut tasks = Vec::new();
    for (slot, session) in sessions.into_iter().enumerate() {
        let phase = (slot as f64 * spread) as u64;
        let ledger = Arc::new(WriteLedger::evenly(args.rate, t0 + phase, end, start));
        ledgers.push(ledger.clone());
        let Some(session) = session else {
            ledger.resolve_through(ledger.len());
            continue;
        };
        let lists = reader.then(|| WriteLedger::evenly(args.list_rate, t0 + phase, end, start));
        tasks.push(tokio::spawn(writer(
            session,
            ledger,
            lists,
            shared.clone(),
            slot,
            hard,
        )));
    }
    run.set_phase("warmup");
    tokio::time::sleep_until(shared.clock.instant(start).into()).await;
    run.set_phase("run");
    run.server_cpu_start();
    tokio::time::sleep_until(shared.clock.instant(end).into()).await;
    run.set_phase("drain");
    // Each task ends by itself once its last reply is in, or at `hard`.
    while !tasks.iter().all(tokio::task::JoinHandle::is_finished) && Instant::now() < hard {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    run.server_cpu_end();
    run.finish_tasks(tasks).await;
    Ok(Finished {
        measured: run.common.duration,
        ledgers,
        writes: true,
        deliveries: false,
        rss_end: run.server_rss(),
    })
}

/// One writer's updates, and its lists on the second connection, until done or `hard`.
async fn writer(
    mut session: Session,
    ledger: Arc<WriteLedger>,
    lists: Option<WriteLedger>,
    shared: Arc<Shared>,
    slot: usize,
    hard: Instant,
) {
    let Some(lists) = lists else {
        updates(&mut session, &ledger, &shared, slot, hard).await;
        return;
    };
    let mut reader = Session {
        http: match session.reader.take() {
            Some(r) => r,
            None => return,
        },
        reader: None,
        creds: session.creds.clone(),
        region: session.region.clone(),
        dataset_path: session.dataset_path.clone(),
        session_token: String::new(),
        sync_count: 0,
    };
    tokio::join!(
        updates(&mut session, &ledger, &shared, slot, hard),
        reads(&mut reader, &lists, &shared, slot, hard),
    );
}

async fn updates(
    session: &mut Session,
    ledger: &WriteLedger,
    shared: &Shared,
    slot: usize,
    hard: Instant,
) {
    let stats = &shared.stats;
    let clock = shared.clock;
    let mut known = true;
    for seq in 1..=ledger.len() {
        let scheduled = ledger.scheduled(seq);
        let measured = ledger.is_measured(seq);
        tokio::time::sleep_until(clock.instant(scheduled).into()).await;
        if !known {
            match tokio::time::timeout_at(hard, session.reconnect()).await {
                Ok(Ok(())) => known = true,
                Ok(Err(fail)) => stats.error(&fail.code),
                Err(_) => {}
            }
        }
        if !known || Instant::now() >= hard || shared.stop.is_cancelled() {
            unsent(ledger, seq, stats);
            return;
        }
        let body = format!(
            "{{\"SyncSessionToken\":\"{}\",\"DeviceId\":\"tandem-loadtest\",\"RecordPatches\":[{{\"Op\":\"replace\",\"Key\":\"{KEY}\",\"Value\":\"{seq}:{}\",\"SyncCount\":{}}}]}}",
            session.session_token,
            clock.unix_ns(scheduled),
            session.sync_count
        );
        if measured {
            Stats::add(&stats.sent, 1);
        }
        let path = session.dataset_path.clone();
        let result =
            tokio::time::timeout_at(hard, session.signed(false, "POST", &path, body.as_bytes()))
                .await;
        match result {
            Ok(Ok(response)) if response.status == 200 => {
                ledger.set_outcome(seq, Outcome::Committed);
                if measured {
                    Stats::add(&stats.acked, 1);
                    stats
                        .commit
                        .record(slot, clock.now().saturating_sub(scheduled));
                }
                match body_json(&response)["Records"][0]["SyncCount"].as_u64() {
                    Some(count) => session.sync_count = count,
                    None => known = false,
                }
            }
            Ok(Ok(response)) => {
                ledger.set_outcome(seq, Outcome::Failed);
                let fail = refusal(&response);
                if fail.code == "ResourceConflictException" {
                    Stats::add(&stats.conflicts, 1);
                } else {
                    stats.error(&fail.code);
                }
                // Read the count back before the next update.
                known = false;
            }
            Ok(Err(fail)) => {
                ledger.set_outcome(seq, Outcome::Unknown);
                if measured {
                    Stats::add(&stats.unknown_outcome, 1);
                }
                stats.error(&fail.code);
                known = false;
            }
            Err(_) => {
                ledger.set_outcome(seq, Outcome::Unknown);
                if measured {
                    Stats::add(&stats.unknown_outcome, 1);
                }
                stats.error("reply_timeout");
                ledger.resolve_through(seq);
                unsent(ledger, seq + 1, stats);
                return;
            }
        }
        ledger.resolve_through(seq);
    }
}

/// Books `from..` as never sent.
fn unsent(ledger: &WriteLedger, from: u64, stats: &Stats) {
    for seq in from..=ledger.len() {
        ledger.set_outcome(seq, Outcome::Unsent);
        if ledger.is_measured(seq) {
            Stats::add(&stats.unsent, 1);
        }
    }
    ledger.resolve_through(ledger.len());
}

/// ListRecords from the start at the schedule of `lists`; same open-loop rule as updates.
async fn reads(
    session: &mut Session,
    lists: &WriteLedger,
    shared: &Shared,
    slot: usize,
    hard: Instant,
) {
    let stats = &shared.stats;
    let clock = shared.clock;
    let path = format!("{}/records", session.dataset_path);
    for seq in 1..=lists.len() {
        let scheduled = lists.scheduled(seq);
        let measured = lists.is_measured(seq);
        tokio::time::sleep_until(clock.instant(scheduled).into()).await;
        if Instant::now() >= hard || shared.stop.is_cancelled() {
            return;
        }
        if measured {
            Stats::add(&stats.lists_sent, 1);
        }
        let result = tokio::time::timeout_at(hard, session.signed(false, "GET", &path, b"")).await;
        match result {
            Ok(Ok(response)) if response.status == 200 => {
                if measured {
                    Stats::add(&stats.lists_ok, 1);
                    stats
                        .list
                        .record(slot, clock.now().saturating_sub(scheduled));
                }
            }
            Ok(Ok(response)) => stats.error(&format!("list_{}", refusal(&response).code)),
            Ok(Err(fail)) => {
                stats.error(&format!("list_{}", fail.code));
                match Http::connect(&session.http.host.clone()).await {
                    Ok(http) => session.http = http,
                    Err(_) => return,
                }
            }
            Err(_) => {
                stats.error("list_reply_timeout");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_host_of_a_gateway_url() {
        assert_eq!(host_of("ws://127.0.0.1:7420/v1/sync"), "127.0.0.1:7420");
        assert_eq!(host_of("ws://node:80"), "node:80");
    }
}
