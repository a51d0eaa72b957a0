//! The five WebSocket scenarios (`cognito` is in its own module): how each sets up its connections and datasets, and what it runs.
//!
//! Names are derived from the run's prefix: identities `<prefix>-w<i>` (writers),
//! `<prefix>-s<i>` (fan-out subscribers), `<prefix>-g<g>-u<u>` (room members),
//! `<prefix>-c<i>` (idle and connect); datasets `<prefix>-fan`, `<prefix>-room<g>`,
//! `<prefix>-w<i>`, `<prefix>-idle`. With --token-file the identities are the tokens'.

use crate::cli::{ConnectArgs, FanoutArgs, IdleArgs, RoomsArgs, SlowReaders, WriteArgs};
use crate::client::ClientPlan;
use crate::conn::{self, ConnectOptions, Fail, Ws};
use crate::error::LoadError;
use crate::ledger::{Coverage, WriteLedger};
use crate::marker;
use crate::run::{Run, grant_all, setup_write};
use crate::writer::Writer;
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_protocol::{Access, DatasetRef};
use tokio::sync::Semaphore;

/// What a scenario hands to the report.
#[derive(Debug)]
pub struct Finished {
    pub measured: Duration,
    pub ledgers: Vec<Arc<WriteLedger>>,
    pub writes: bool,
    pub deliveries: bool,
    pub rss_end: Option<u64>,
}

/// Time between the end of setup and the first scheduled write, so every task is running.
const START_DELAY: Duration = Duration::from_millis(200);

/// Setup steps (per-group writes and grants, subscribes) in flight at once.
const SETUP_CONCURRENCY: usize = 64;

fn setup_failed(run: &Run, what: &str, fail: Option<&Fail>) -> LoadError {
    let detail = match fail {
        Some(f) => f.to_string(),
        None => {
            let errors = run.stats().errors();
            if errors.is_empty() {
                "no detail".to_owned()
            } else {
                errors
                    .iter()
                    .map(|(code, n)| format!("{code} x{n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        }
    };
    LoadError::Setup(format!("{what}: {detail}"))
}

/// The (url, token) of each slot in `slots`, with the identity each is minted for.
fn credentials(
    run: &Run,
    slots: impl Iterator<Item = (usize, String)>,
) -> Result<Vec<(String, String)>, LoadError> {
    slots
        .map(|(slot, identity)| Ok((run.url(slot).to_owned(), run.token(slot, &identity)?)))
        .collect()
}

/// Opens and authenticates one connection per credential, each with `options(slot)`.
async fn connect_all(
    run: &mut Run,
    credentials: Arc<Vec<(String, String)>>,
    options: impl Fn(usize) -> ConnectOptions,
) -> Vec<Member> {
    let options: Arc<Vec<ConnectOptions>> = Arc::new((0..credentials.len()).map(options).collect());
    let shared = run.shared.clone();
    run.open_many(credentials.len(), None, move |i| {
        let (url, token) = credentials[i].clone();
        let options = options.clone();
        let shared = shared.clone();
        async move {
            let (ws, ready) = conn::connect_auth(&url, &token, &options[i]).await?;
            shared.stats.features_on(&ready.features);
            Ok((ws, ready.identity, (url, token)))
        }
    })
    .await
}

/// Filler records for `records` in all with `markers` marker records (`None`: one filler).
fn fillers(records: Option<usize>, markers: usize) -> Result<usize, LoadError> {
    match records {
        None => Ok(1),
        Some(n) if n > markers => Ok(n - markers),
        Some(_) => Err(LoadError::Options(format!(
            "--records must be more than the {markers} marker record(s) (one per writer)"
        ))),
    }
}

/// Slowest read rate a slow reader may have: it still reads once every 10 s.
const MIN_READ_RATE: f64 = 0.1;

/// Subscribes each connection to its dataset; failures are counted and dropped.
async fn subscribe_all(run: &mut Run, conns: Vec<Option<(Ws, DatasetRef)>>) -> Vec<Option<Ws>> {
    let semaphore = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let handles: Vec<_> = conns
        .into_iter()
        .map(|c| {
            let semaphore = semaphore.clone();
            let shared = run.shared.clone();
            tokio::spawn(async move {
                let (mut ws, dataset) = c?;
                let _permit = semaphore.acquire_owned().await.ok()?;
                match conn::subscribe(&mut ws, &dataset, &mut |_, _| {}).await {
                    Ok(_) => Some(ws),
                    Err(fail) => {
                        shared.stats.error(&fail.code);
                        None
                    }
                }
            })
        })
        .collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut failed = 0;
    for h in handles {
        let ws = h.await.ok().flatten();
        out.push(ws);
    }
    for _ in out.iter().filter(|w| w.is_none()) {
        failed += 1;
    }
    run.count_failed(failed);
    out
}

/// The sending window on the run's clock: (first write, start of measuring, end).
pub(crate) fn window(run: &Run) -> (u64, u64, u64) {
    let clock = run.shared.clock;
    let t0 = clock.now() + crate::stats::saturating_ns(START_DELAY);
    let start = t0 + crate::stats::saturating_ns(run.common.warmup);
    let end = start + crate::stats::saturating_ns(run.common.duration);
    (t0, start, end)
}

pub async fn fanout(run: &mut Run, args: &FanoutArgs) -> Result<Finished, LoadError> {
    run.check_rate(args.rate)?;
    if args.subscribers == 0 {
        return Err(LoadError::Options(
            "--subscribers must be at least 1".into(),
        ));
    }
    let fillers = fillers(args.records, 1)?;
    let read_interval = match args.read_rate {
        None => None,
        Some(rate) if rate >= MIN_READ_RATE && rate.is_finite() => {
            Some(Duration::from_secs_f64(1.0 / rate))
        }
        Some(_) => {
            return Err(LoadError::Options(format!(
                "--read-rate must be at least {MIN_READ_RATE} frames/s"
            )));
        }
    };
    // The first `slow` subscribers read at --read-rate.
    let slow = match read_interval {
        Some(_) => args
            .slow_readers
            .unwrap_or(SlowReaders::Fraction(1.0))
            .of(args.subscribers),
        None => 0,
    };
    let options = run.connect_options();
    let slow_options = ConnectOptions {
        recv_buffer: args.recv_buffer,
        ..options.clone()
    };
    let sub_options = |i: usize| {
        if i < slow {
            slow_options.clone()
        } else {
            options.clone()
        }
    };
    let prefix = run.prefix.clone();
    let writer_creds = credentials(run, std::iter::once((0, format!("{prefix}-w0"))))?;
    let Some((mut writer_ws, owner, writer_cred)) =
        connect_all(run, Arc::new(writer_creds), |_| options.clone())
            .await
            .pop()
            .flatten()
    else {
        return Err(setup_failed(run, "the writer cannot connect", None));
    };
    let dataset = DatasetRef::new(owner.clone(), format!("{prefix}-fan"));
    let d0 = setup_write(&mut writer_ws, &dataset, 1, fillers, args.size)
        .await
        .map_err(|f| setup_failed(run, "setup write", Some(&f)))?;

    let sub_creds = credentials(
        run,
        (0..args.subscribers).map(|i| (i + 1, format!("{prefix}-s{i}"))),
    )?;
    let subs = connect_all(run, Arc::new(sub_creds), sub_options).await;
    if subs.iter().all(Option::is_none) {
        return Err(setup_failed(run, "no subscriber can connect", None));
    }
    let grantees = grantees(&subs, &owner);
    grant_all(&mut writer_ws, &dataset, &grantees, Access::Read)
        .await
        .map_err(|f| setup_failed(run, "grants", Some(&f)))?;
    let creds: Vec<Option<(String, String)>> = subs
        .iter()
        .map(|s| s.as_ref().map(|(_, _, c)| c.clone()))
        .collect();
    let subscribed = subscribe_all(
        run,
        subs.into_iter()
            .map(|s| s.map(|(ws, _, _)| (ws, dataset.clone())))
            .collect(),
    )
    .await;
    run.connected();

    let (t0, start, end) = window(run);
    let ledger = Arc::new(WriteLedger::evenly(args.rate, t0, end, start));
    let mut clients = vec![(
        ClientPlan {
            slot: 0,
            url: writer_cred.0,
            token: writer_cred.1,
            subscription: None,
            follows: Vec::new(),
            writer: Some(Writer::new(
                ledger.clone(),
                &dataset,
                &marker::key(0),
                d0,
                true,
            )),
            connect: options.clone(),
            read_interval: None,
        },
        writer_ws,
    )];
    for (i, (ws, cred)) in subscribed.into_iter().zip(creds).enumerate() {
        let (Some(ws), Some((url, token))) = (ws, cred) else {
            continue;
        };
        ledger.add_follower();
        clients.push((
            ClientPlan {
                slot: i + 1,
                url,
                token,
                subscription: Some(dataset.clone()),
                follows: vec![Coverage::new(ledger.clone())],
                writer: None,
                connect: sub_options(i),
                read_interval: read_interval.filter(|_| i < slow),
            },
            ws,
        ));
    }
    let ledgers = vec![ledger];
    let rss_end = run.drive(clients, &ledgers, start, end).await;
    Ok(Finished {
        measured: run.common.duration,
        ledgers,
        writes: true,
        deliveries: true,
        rss_end,
    })
}

/// One room once set up: its dataset, the count after the setup write, its members.
struct Room {
    dataset: DatasetRef,
    sync_count: u64,
    members: Vec<Option<(Ws, (String, String))>>,
}

pub async fn rooms(run: &mut Run, args: &RoomsArgs) -> Result<Finished, LoadError> {
    run.check_rate(args.rate)?;
    if args.groups == 0 || args.group_size == 0 {
        return Err(LoadError::Options(
            "--groups and --group-size must be at least 1".into(),
        ));
    }
    let (groups, size) = (args.groups, args.group_size);
    let fillers = fillers(args.records, size)?;
    let options = run.connect_options();
    let prefix = run.prefix.clone();
    let creds = credentials(
        run,
        (0..groups * size)
            .map(|slot| (slot, format!("{prefix}-g{}-u{}", slot / size, slot % size))),
    )?;
    let mut conns = connect_all(run, Arc::new(creds), |_| options.clone())
        .await
        .into_iter();
    if conns.as_slice().iter().all(Option::is_none) {
        return Err(setup_failed(run, "no member can connect", None));
    }

    // Per room: the first member owns the dataset, writes every marker and the filler,
    // grants the others write access; then every member subscribes.
    let semaphore = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let mut handles = Vec::with_capacity(groups);
    for g in 0..groups {
        let members: Vec<_> = conns.by_ref().take(size).collect();
        let semaphore = semaphore.clone();
        let name = format!("{prefix}-room{g}");
        let doc_size = args.size;
        let shared = run.shared.clone();
        handles.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.ok();
            setup_room(members, name, fillers, doc_size, &shared).await
        }));
    }
    let mut rooms = Vec::with_capacity(groups);
    let mut failed = 0;
    for handle in handles {
        match handle.await {
            Ok(Ok(room)) => {
                failed += room.members.iter().filter(|m| m.is_none()).count();
                rooms.push(Some(room));
            }
            Ok(Err((fail, lost))) => {
                run.stats().error(&fail.code);
                failed += lost;
                rooms.push(None);
            }
            Err(_) => rooms.push(None),
        }
    }
    run.count_failed(failed);
    if rooms.iter().all(Option::is_none) {
        return Err(setup_failed(run, "no room could be set up", None));
    }
    run.connected();

    let (t0, start, end) = window(run);
    let mut rng = rand::rngs::StdRng::seed_from_u64(run.seed);
    let interval_ns = 1e9 / args.rate;
    let mut clients = Vec::new();
    let mut ledgers = Vec::new();
    for (g, room) in rooms.into_iter().enumerate() {
        let group_ledgers: Vec<Arc<WriteLedger>> = (0..size)
            .map(|_| {
                let phase = (rng.random::<f64>() * interval_ns) as u64;
                Arc::new(WriteLedger::evenly(args.rate, t0 + phase, end, start))
            })
            .collect();
        let Some(room) = room else {
            for ledger in &group_ledgers {
                ledger.resolve_through(ledger.len());
            }
            ledgers.extend(group_ledgers);
            continue;
        };
        let present = room.members.iter().filter(|m| m.is_some()).count();
        for ledger in &group_ledgers {
            for _ in 0..present {
                ledger.add_follower();
            }
        }
        for (u, member) in room.members.into_iter().enumerate() {
            let ledger = &group_ledgers[u];
            let Some((ws, (url, token))) = member else {
                // Never sent: not expected anywhere.
                ledger.resolve_through(ledger.len());
                continue;
            };
            clients.push((
                ClientPlan {
                    slot: g * size + u,
                    url,
                    token,
                    subscription: Some(room.dataset.clone()),
                    follows: group_ledgers
                        .iter()
                        .enumerate()
                        .map(|(w, l)| {
                            if w == u {
                                Coverage::of_own_writes(l.clone())
                            } else {
                                Coverage::new(l.clone())
                            }
                        })
                        .collect(),
                    writer: Some(Writer::new(
                        ledger.clone(),
                        &room.dataset,
                        &marker::key(u),
                        room.sync_count,
                        false,
                    )),
                    connect: options.clone(),
                    read_interval: None,
                },
                ws,
            ));
        }
        ledgers.extend(group_ledgers);
    }
    let rss_end = run.drive(clients, &ledgers, start, end).await;
    Ok(Finished {
        measured: run.common.duration,
        ledgers,
        writes: true,
        deliveries: true,
        rss_end,
    })
}

type Member = Option<(Ws, String, (String, String))>;

/// The distinct identities of the connected members, less the owner, who needs no grant.
fn grantees(members: &[Member], owner: &str) -> Vec<String> {
    let set: BTreeSet<&String> = members
        .iter()
        .flatten()
        .map(|(_, identity, _)| identity)
        .filter(|identity| identity.as_str() != owner)
        .collect();
    set.into_iter().cloned().collect()
}

/// Sets up one room. On failure, returns how many connected members it loses.
async fn setup_room(
    members: Vec<Member>,
    name: String,
    fillers: usize,
    doc_size: usize,
    shared: &crate::client::Shared,
) -> Result<Room, (Fail, usize)> {
    let size = members.len();
    let present = members.iter().filter(|m| m.is_some()).count();
    let mut members = members.into_iter();
    let Some(Some((mut owner_ws, owner, owner_cred))) = members.next() else {
        return Err((
            Fail::new(
                "room_owner_failed",
                "the room's first member did not connect",
            ),
            present,
        ));
    };
    let dataset = DatasetRef::new(owner.clone(), name);
    let sync_count = setup_write(&mut owner_ws, &dataset, size, fillers, doc_size)
        .await
        .map_err(|f| (f, present))?;
    let others: Vec<Member> = members.collect();
    let grantees = grantees(&others, &owner);
    grant_all(&mut owner_ws, &dataset, &grantees, Access::Write)
        .await
        .map_err(|f| (f, present))?;
    let all = std::iter::once(Some((owner_ws, owner, owner_cred))).chain(others);
    let subscribing = all.map(|m| {
        let dataset = dataset.clone();
        async move {
            let (mut ws, _, cred) = m?;
            match conn::subscribe(&mut ws, &dataset, &mut |_, _| {}).await {
                Ok(_) => Some((ws, cred)),
                Err(fail) => {
                    shared.stats.error(&fail.code);
                    None
                }
            }
        }
    });
    let members = futures_util::future::join_all(subscribing).await;
    Ok(Room {
        dataset,
        sync_count,
        members,
    })
}

pub async fn write(run: &mut Run, args: &WriteArgs) -> Result<Finished, LoadError> {
    run.check_rate(args.rate)?;
    if args.writers == 0 {
        return Err(LoadError::Options("--writers must be at least 1".into()));
    }
    let prefix = run.prefix.clone();
    let creds = credentials(
        run,
        (0..args.writers).map(|i| (i, format!("{prefix}-w{i}"))),
    )?;
    let options = run.connect_options();
    let conns = connect_all(run, Arc::new(creds), |_| options.clone()).await;
    if conns.iter().all(Option::is_none) {
        return Err(setup_failed(run, "no writer can connect", None));
    }
    let semaphore = Arc::new(Semaphore::new(SETUP_CONCURRENCY));
    let handles: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let semaphore = semaphore.clone();
            let name = format!("{prefix}-w{i}");
            let size = args.size;
            tokio::spawn(async move {
                let (mut ws, identity, cred) = c?;
                let _permit = semaphore.acquire_owned().await.ok()?;
                let dataset = DatasetRef::new(identity, name);
                Some(
                    setup_write(&mut ws, &dataset, 1, 1, size)
                        .await
                        .map(|count| (ws, cred, dataset, count)),
                )
            })
        })
        .collect();
    let mut ready = Vec::with_capacity(handles.len());
    let mut failed = 0;
    let mut first_fail = None;
    for h in handles {
        match h.await.ok().flatten() {
            Some(Ok(w)) => ready.push(Some(w)),
            Some(Err(fail)) => {
                run.stats().error(&fail.code);
                failed += 1;
                first_fail.get_or_insert(fail);
                ready.push(None);
            }
            None => ready.push(None),
        }
    }
    run.count_failed(failed);
    if ready.iter().all(Option::is_none) {
        return Err(setup_failed(
            run,
            "no writer could set up its dataset",
            first_fail.as_ref(),
        ));
    }
    run.connected();

    let (t0, start, end) = window(run);
    // Writers start evenly spread over one interval.
    let spread = 1e9 / args.rate / args.writers as f64;
    let mut clients = Vec::new();
    let mut ledgers = Vec::new();
    for (i, w) in ready.into_iter().enumerate() {
        let phase = (i as f64 * spread) as u64;
        let ledger = Arc::new(WriteLedger::evenly(args.rate, t0 + phase, end, start));
        ledgers.push(ledger.clone());
        let Some((ws, (url, token), dataset, count)) = w else {
            ledger.resolve_through(ledger.len());
            continue;
        };
        clients.push((
            ClientPlan {
                slot: i,
                url,
                token,
                subscription: None,
                follows: Vec::new(),
                writer: Some(Writer::new(ledger, &dataset, &marker::key(0), count, true)),
                connect: options.clone(),
                read_interval: None,
            },
            ws,
        ));
    }
    let rss_end = run.drive(clients, &ledgers, start, end).await;
    Ok(Finished {
        measured: run.common.duration,
        ledgers,
        writes: true,
        deliveries: false,
        rss_end,
    })
}

/// Opens `n` connections that each authenticate and subscribe to their identity's own
/// `<prefix>-idle` dataset (no grants needed, nothing written).
async fn open_subscribed(
    run: &mut Run,
    n: usize,
    deadline: Option<Instant>,
) -> Result<Vec<Option<(Ws, (String, String))>>, LoadError> {
    let prefix = run.prefix.clone();
    let creds = Arc::new(credentials(
        run,
        (0..n).map(|i| (i, format!("{prefix}-c{i}"))),
    )?);
    let dataset = DatasetRef::own(format!("{prefix}-idle"));
    let options = Arc::new(run.connect_options());
    let shared = run.shared.clone();
    Ok(run
        .open_many(n, deadline, move |i| {
            let (url, token) = creds[i].clone();
            let dataset = dataset.clone();
            let options = options.clone();
            let shared = shared.clone();
            async move {
                let (mut ws, ready) = conn::connect_auth(&url, &token, &options).await?;
                shared.stats.features_on(&ready.features);
                conn::subscribe(&mut ws, &dataset, &mut |_, _| {}).await?;
                Ok((ws, (url, token)))
            }
        })
        .await)
}

pub async fn idle(run: &mut Run, args: &IdleArgs) -> Result<Finished, LoadError> {
    if args.connections == 0 {
        return Err(LoadError::Options(
            "--connections must be at least 1".into(),
        ));
    }
    let conns = open_subscribed(run, args.connections, None).await?;
    if conns.iter().all(Option::is_none) {
        return Err(setup_failed(run, "no connection could be set up", None));
    }
    run.connected();
    let dataset = DatasetRef::own(format!("{}-idle", run.prefix));
    let shared = run.shared.clone();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .filter_map(|(slot, c)| {
            let (ws, (url, token)) = c?;
            let plan = ClientPlan {
                slot,
                url,
                token,
                subscription: Some(dataset.clone()),
                follows: Vec::new(),
                writer: None,
                connect: run.connect_options(),
                read_interval: None,
            };
            Some(tokio::spawn(crate::client::run(plan, ws, shared.clone())))
        })
        .collect();
    run.set_phase("idle");
    tokio::time::sleep(args.idle_for).await;
    let rss_end = run.server_rss();
    run.finish_tasks(tasks).await;
    Ok(Finished {
        measured: args.idle_for,
        ledgers: Vec::new(),
        writes: false,
        deliveries: false,
        rss_end,
    })
}

pub async fn connect(run: &mut Run, args: &ConnectArgs) -> Result<Finished, LoadError> {
    if args.connections == 0 {
        return Err(LoadError::Options(
            "--connections must be at least 1".into(),
        ));
    }
    let started = Instant::now();
    let deadline = started + run.common.duration;
    let conns = open_subscribed(run, args.connections, Some(deadline)).await?;
    let measured = started.elapsed();
    if conns.iter().all(Option::is_none) {
        return Err(setup_failed(run, "no connection could be set up", None));
    }
    run.connected();
    let rss_end = run.server_rss();
    run.set_phase("closing");
    let closing: Vec<_> = conns
        .into_iter()
        .flatten()
        .map(|(ws, _)| tokio::spawn(conn::close(ws)))
        .collect();
    for c in closing {
        let _ = c.await;
    }
    Ok(Finished {
        measured,
        ledgers: Vec::new(),
        writes: false,
        deliveries: false,
        rss_end,
    })
}
