//! Reconnect storm: after a deploy every client comes back at once. 10,000 sockets, each
//! joining one channel with one postgres_changes binding (INSERT on `public.bench`) under one
//! of 100 users' tokens, all joins released at the same instant. How long until every one
//! is live, and what does an unrelated socket's heartbeat see meanwhile?
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/reconnect-storm [--sockets 10000 --users 100] [--private]
//! ```
//!
//! Phases: (1) open every socket (raw WebSockets from `--sources`, `--connect-concurrency`
//! handshakes at a time; timed, reported apart); (2) release every join at once and time
//! until each has its `phx_reply` with status ok ("live"). A bystander socket, joined to a
//! channel of its own before the storm, sends a heartbeat every `--heartbeat-ms` (fixed rate,
//! each with its own ref, replies timed by ref, so a stall delays every heartbeat sent during
//! it) during phase 2; its round trips are reported as p50/p99/max, with when the worst was
//! sent and how many took over 50 ms.
//!
//! `--private` makes every channel private: each join is also authorized by a SELECT policy
//! on `realtime.messages` (created by the bench for role `anon`: topics `storm-*`, tokens with
//! a `sub`), the path of issue #11's batched private checks.
//!
//! The join limits are raised on the server (`--max-joins-per-second`,
//! `--max-joins-per-second-per-client`), as is `--max-connections`: the storm, not the
//! limiter, is what is measured. One process holds all sockets (10,001 descriptors, under the
//! 20,000 cap).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Parser;
use hdrhistogram::Histogram;
use tokio::sync::{watch, Semaphore};
use walcast_bench::harness::{self, Harness, HarnessArgs, JWT_SECRET};
use walcast_bench::rawws::{opcode, RawWs};

#[derive(Parser)]
#[command(about = "reconnect storm: 10,000 joins at once, time to all live, bystander heartbeat")]
struct Opts {
    #[arg(long, default_value_t = 10_000)]
    sockets: usize,
    /// Distinct users (token `sub`) the sockets are spread over.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Private channels (authorized by realtime.messages policies).
    #[arg(long)]
    private: bool,
    /// Handshakes in progress at once while opening the sockets (phase 1).
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Source addresses, sockets spread over them in turn (keeps clear of ephemeral-port
    /// exhaustion and of 127.0.0.1, where the harness picks free ports).
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.2,127.0.0.3")]
    sources: Vec<IpAddr>,
    /// The bystander's heartbeat interval during the storm (sent at this fixed rate, not
    /// after the previous reply).
    #[arg(long, default_value_t = 5)]
    heartbeat_ms: u64,
    /// Longest the storm may take before the run fails.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Runtime threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Nice value of the load generator's runtime threads (the 10,000 storm sockets), not of
    /// the bystander's thread. The generator stands for 10,000 other machines and the
    /// bystander for a client of its own; on one 2-core box, at 0 (the old mode) the
    /// bystander's own sends and reads wait for CPU behind the generator's.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=19))]
    generator_nice: i32,
    #[command(flatten)]
    harness: HarnessArgs,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    if let Some(cpus) = &o.harness.client_cpus {
        harness::pin_self(cpus)?;
    }
    let nice = o.generator_nice;
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads.max(1))
        .enable_all()
        .on_thread_start(move || {
            // Per thread on Linux (`setpriority(PRIO_PROCESS, 0)`); the bystander's thread,
            // started later with std::thread, keeps the process's value.
            if nice > 0 {
                let _ = rustix::process::setpriority_process(None, nice);
            }
        })
        .build()?
        .block_on(run(o))
}

fn token(sub: &str) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 3600;
    let claims = serde_json::json!({ "role": "anon", "sub": sub, "exp": exp });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

/// A join; `changes`: with the one INSERT binding on `public.bench`.
fn join_frame(topic: &str, token: &str, private: bool, changes: bool) -> String {
    let bindings = if changes {
        serde_json::json!([{"event": "INSERT", "schema": "public", "table": "bench"}])
    } else {
        serde_json::json!([])
    };
    serde_json::json!([
        "1",
        "1",
        topic,
        "phx_join",
        {
            "config": {
                "broadcast": {"self": false, "ack": false},
                "presence": {"key": "", "enabled": false},
                "postgres_changes": bindings,
                "private": private
            },
            "access_token": token
        }
    ])
    .to_string()
}

/// Read until a text frame for which `done` returns `Some`, answering nothing else.
async fn until<T>(ws: &mut RawWs, mut done: impl FnMut(&[u8]) -> Option<T>) -> Result<T> {
    loop {
        while let Some((op, r)) = ws.next_frame()? {
            match op {
                opcode::TEXT => {
                    if let Some(t) = done(ws.payload(r)) {
                        return Ok(t);
                    }
                }
                opcode::CLOSE => bail!("the server closed the socket"),
                _ => {}
            }
        }
        if ws.fill().await? == 0 {
            bail!("the connection ended");
        }
    }
}

/// The join reply's status, when `frame` is the reply to join ref "1".
fn join_status(frame: &[u8]) -> Option<Result<(), String>> {
    let v: serde_json::Value = serde_json::from_slice(frame).ok()?;
    (v[1] == "1" && v[3] == "phx_reply").then(|| {
        if v[4]["status"] == "ok" {
            Ok(())
        } else {
            Err(v[4].to_string())
        }
    })
}

/// The bystander's round trips during the storm.
#[derive(Default)]
struct Beats {
    /// Round trips, µs.
    rtt: Option<Histogram<u64>>,
    /// The slowest round trip: its length (µs) and when it was sent, after the release.
    worst: (u64, Duration),
    /// Heartbeats sent and round trips over [`STALL_US`].
    sent: u64,
    stalled: u64,
}

/// A round trip over this counts as a stall (issue #11's bound).
const STALL_US: u64 = 50_000;

/// Send a heartbeat every `interval`, each with its own ref, without waiting for the
/// previous reply, and time each reply by its ref: a stall then shows in every heartbeat
/// sent during it, so the percentiles reflect the share of the storm spent stalled (a
/// send-then-wait loop would record one sample per stall). Stops sending at `stop`, then
/// waits (a bounded time) for the replies still due.
async fn beat(
    ws: &mut RawWs,
    interval: Duration,
    released: Instant,
    mut stop: watch::Receiver<bool>,
) -> Result<Beats> {
    let finder = memchr::memmem::Finder::new(b"\"hb");
    let mut sent_at: Vec<Option<Instant>> = Vec::new();
    let mut out = Beats {
        rtt: Some(Histogram::<u64>::new(3)?),
        ..Beats::default()
    };
    let mut outstanding = 0u64;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut stopping: Option<tokio::time::Instant> = None;
    loop {
        // Frames already buffered first: every reply is timed when it is read.
        while let Some((op, r)) = ws.next_frame()? {
            match op {
                opcode::TEXT => {
                    let now = Instant::now();
                    let Some(n) = walcast_bench::rawws::number_after(ws.payload(r), &finder) else {
                        continue;
                    };
                    let Some(sent) = sent_at.get_mut(n as usize).and_then(Option::take) else {
                        continue;
                    };
                    outstanding -= 1;
                    let us = now.duration_since(sent).as_micros().max(1) as u64;
                    if let Some(h) = out.rtt.as_mut() {
                        h.record(us)?;
                    }
                    if us > STALL_US {
                        out.stalled += 1;
                    }
                    if us > out.worst.0 {
                        out.worst = (us, sent.duration_since(released));
                    }
                }
                opcode::CLOSE => bail!("the server closed the bystander"),
                _ => {}
            }
        }
        if stopping.is_some() && outstanding == 0 {
            return Ok(out);
        }
        let give_up =
            stopping.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            n = ws.fill() => {
                if n? == 0 {
                    bail!("the bystander's connection ended");
                }
            }
            _ = tick.tick(), if stopping.is_none() => {
                out.sent += 1;
                let n = sent_at.len();
                sent_at.push(Some(Instant::now()));
                outstanding += 1;
                ws.send_text(&format!(r#"[null,"hb{n}","phoenix","heartbeat",{{}}]"#)).await?;
            }
            _ = stop.wait_for(|s| *s), if stopping.is_none() => {
                stopping = Some(tokio::time::Instant::now() + Duration::from_secs(10));
            }
            _ = tokio::time::sleep_until(give_up), if stopping.is_some() => {
                bail!("{outstanding} bystander heartbeats unanswered 10 s after the storm");
            }
        }
    }
}

async fn run(mut o: Opts) -> Result<()> {
    if o.sources.is_empty() || o.users == 0 {
        bail!("--sources and --users must not be empty");
    }
    for (flag, value) in [
        ("--max-connections", (o.sockets + 200).to_string()),
        ("--max-joins-per-second", "1000000".to_string()),
        ("--max-joins-per-second-per-client", "1000000".to_string()),
        ("--max-pending-connections", "4096".to_string()),
        ("--idle-timeout-secs", "600".to_string()),
    ] {
        if !o.harness.server_arg.iter().any(|a| a.starts_with(flag)) {
            o.harness.server_arg.push(format!("{flag}={value}"));
        }
    }
    eprintln!(
        "reconnect-storm: starting postgres and walcast ({})",
        o.harness.pinning()
    );
    let load_start = harness::loadavg();
    let mut h = Harness::start(&o.harness).await?;
    if o.private {
        let sql = h.db.connect().await?;
        sql.batch_execute(
            "CREATE POLICY storm_read ON realtime.messages FOR SELECT TO anon
               USING (realtime.topic() LIKE 'storm-%'
                      AND (pg_catalog.current_setting('request.jwt.claims', true)::jsonb ->> 'sub') LIKE 'user-%')",
        )
        .await
        .context("creating the realtime.messages policy (was the realtime schema applied?)")?;
    }
    let addr = h.addr();
    let tokens: Vec<String> = (0..o.users)
        .map(|u| token(&format!("user-{u}")))
        .collect::<Result<_>>()?;

    // The bystander: a plain channel of its own (no postgres_changes, so the storm meets a
    // cold table cache, as after a deploy), joined before anything else. It lives on a
    // thread and runtime of its own: behind the 10,000 storm sockets in this process's run
    // queue, its round trips would measure the load generator, not the server.
    let path = |t: &str| format!("/socket/websocket?apikey={t}&vsn=2.0.0");
    let bystander_token = token("bystander")?;
    let bystander_path = path(&bystander_token);
    let (beat_ready_tx, beat_ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let (beat_go_tx, beat_go_rx) = tokio::sync::oneshot::channel::<Instant>();
    let (beat_stop_tx, beat_stop_rx) = watch::channel(false);
    let interval = Duration::from_millis(o.heartbeat_ms.max(1));
    let beats = std::thread::spawn(move || -> Result<Beats> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let joined = async {
                let mut ws = RawWs::connect(addr, None, &bystander_path, 4096).await?;
                ws.send_text(&join_frame(
                    "realtime:bystander",
                    &bystander_token,
                    false,
                    false,
                ))
                .await?;
                until(&mut ws, join_status)
                    .await?
                    .map_err(|e| anyhow::anyhow!("the bystander's join was refused: {e}"))?;
                anyhow::Ok(ws)
            };
            let mut bystander = match joined.await {
                Ok(ws) => {
                    let _ = beat_ready_tx.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = beat_ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let Ok(released) = beat_go_rx.await else {
                return Ok(Beats::default());
            };
            beat(&mut bystander, interval, released, beat_stop_rx).await
        })
    });
    beat_ready_rx
        .await
        .context("the bystander thread ended early")??;

    // Phase 1: every socket open, waiting for the signal.
    let (go_tx, go_rx) = watch::channel::<Option<Instant>>(None);
    let (stop_tx, stop_rx) = watch::channel(false);
    let connecting = Arc::new(Semaphore::new(o.connect_concurrency.max(1)));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<Result<()>>();
    let live_at = Arc::new(Mutex::new(Histogram::<u64>::new(3)?));
    let refused = Arc::new(AtomicU64::new(0));
    let first_refusal = Arc::new(Mutex::new(None::<String>));
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(o.sockets);
    for i in 0..o.sockets {
        let t = tokens[i % o.users].clone();
        let source = o.sources[i % o.sources.len()];
        let (connecting, opened, mut go, mut stop) = (
            connecting.clone(),
            opened_tx.clone(),
            go_rx.clone(),
            stop_rx.clone(),
        );
        let (live_at, refused, first_refusal) =
            (live_at.clone(), refused.clone(), first_refusal.clone());
        let private = o.private;
        tasks.push(tokio::spawn(async move {
            let permit = connecting.acquire().await;
            let ws = RawWs::connect(addr, Some(source), &path(&t), 2048).await;
            drop(permit);
            let mut ws = match ws {
                Ok(ws) => {
                    let _ = opened.send(Ok(()));
                    ws
                }
                Err(e) => {
                    let _ = opened.send(Err(e));
                    return;
                }
            };
            let frame = join_frame(&format!("realtime:storm-{i}"), &t, private, true);
            let Ok(released) = go
                .wait_for(Option::is_some)
                .await
                .map(|g| (*g).unwrap_or_else(Instant::now))
            else {
                return;
            };
            let answer = async {
                ws.send_text(&frame).await?;
                until(&mut ws, join_status).await
            };
            match answer.await {
                Ok(Ok(())) => {
                    let us = released.elapsed().as_micros() as u64;
                    let _ = live_at
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(us.max(1));
                }
                Ok(Err(reply)) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    first_refusal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(reply);
                }
                Err(e) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    first_refusal
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(format!("{e:#}"));
                }
            }
            // Held open until the end of the run, like a live client.
            let _ = stop.wait_for(|s| *s).await;
            drop(ws);
        }));
    }
    drop(opened_tx);
    let mut open = 0;
    while let Some(r) = opened_rx.recv().await {
        r.context("opening a socket")?;
        open += 1;
        if open == o.sockets {
            break;
        }
    }
    let connect_time = started.elapsed();
    h.check_alive()?;
    eprintln!(
        "reconnect-storm: {open} sockets open in {:.2} s; releasing the joins",
        connect_time.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Phase 2: the storm, with the bystander's heartbeats alongside.
    let cpu = harness::CpuWindow::start(&[
        ("walcast", h.server_pid(), false),
        ("postgres", h.postmaster_pid()?, true),
    ]);
    let released = Instant::now();
    go_tx.send(Some(released))?;
    let _ = beat_go_tx.send(released);
    let deadline = released + Duration::from_secs(o.timeout_secs);
    loop {
        let answered = live_at.lock().unwrap_or_else(|p| p.into_inner()).len()
            + refused.load(Ordering::Relaxed);
        if answered as usize >= o.sockets {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "only {answered} of {} joins answered within {} s; server log:\n{}",
                o.sockets,
                o.timeout_secs,
                h.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let storm = released.elapsed();
    let cpu = cpu.finish();
    beat_stop_tx.send(true)?;
    let beats = beats
        .join()
        .map_err(|_| anyhow::anyhow!("the bystander thread panicked"))??;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    h.check_alive()?;

    let live = live_at.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let refused = refused.load(Ordering::Relaxed);
    let ms = |us: u64| us as f64 / 1000.0;
    println!("reconnect-storm: {}", harness::command_line());
    println!(
        "  {} sockets, {} users, {} channels, one INSERT binding each; {}; generator nice {}; load before {load_start}",
        o.sockets,
        o.users,
        if o.private { "private" } else { "public" },
        o.harness.pinning(),
        o.generator_nice
    );
    println!(
        "  sockets opened in {:.2} s ({} handshakes at a time)",
        connect_time.as_secs_f64(),
        o.connect_concurrency
    );
    println!(
        "  all {} live {:.2} s after the joins were released (join reply ok: p50 {:.0} ms, p99 {:.0} ms); refused {refused}",
        live.len(),
        live.max() as f64 / 1e6,
        ms(live.value_at_quantile(0.5)),
        ms(live.value_at_quantile(0.99)),
    );
    let rtt = beats.rtt.clone().unwrap_or(Histogram::<u64>::new(3)?);
    println!(
        "  bystander heartbeat every {} ms (fixed rate, timed by ref) during the storm: {} round trips, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (sent {:.0} ms after the release); {} over {} ms ({:.1} %)",
        o.heartbeat_ms,
        rtt.len(),
        ms(rtt.value_at_quantile(0.5)),
        ms(rtt.value_at_quantile(0.99)),
        ms(rtt.max()),
        beats.worst.1.as_secs_f64() * 1000.0,
        beats.stalled,
        STALL_US / 1000,
        100.0 * beats.stalled as f64 / beats.sent.max(1) as f64,
    );
    println!(
        "  storm wall time {:.2} s; cpu during it: {} | load after {}",
        storm.as_secs_f64(),
        harness::format_cpu(&cpu),
        harness::loadavg()
    );
    println!(
        "  join lookups: {}",
        harness::metric_lines(
            addr,
            &[
                "walcast_catalog_cache_lookups_total",
                "walcast_private_read_batches_total",
                "walcast_private_read_checks_total",
            ],
        )
        .join("; ")
    );
    if refused > 0 {
        bail!(
            "{refused} joins were refused; the first: {}",
            first_refusal
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default()
        );
    }
    Ok(())
}
