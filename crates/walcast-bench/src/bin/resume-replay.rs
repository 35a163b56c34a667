//! Session resume at scale: 1,000 sessions drop at once, 500 commits/s land for 30 s while
//! they are away, then all of them reconnect and rejoin at once. How fast does walcast replay
//! what each one missed?
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/resume-replay [--sessions 1000 --rate 500 --outage-secs 30 --groups 100]
//! ```
//!
//! Each session is one raw WebSocket (`session_id=bench-<i>`, vsn 2.0.0) with one channel and
//! one INSERT binding filtered `n=eq.<i mod groups>`; the writer commits single rows with
//! `n = id mod groups`, so every session misses `rate × outage / groups` rows (150 by default:
//! 150,000 deliveries buffered server-side). Before dropping, every socket sends a heartbeat
//! and waits for its reply, so nothing before the outage may repeat.
//!
//! Reported: time from the first reconnect until every session has every row it missed,
//! replayed deliveries per second over that time, missing and repeated rows (both must be 0),
//! walcast's RSS before and after the outage.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use memchr::memmem;
use tokio::sync::Semaphore;
use walcast_bench::harness::{self, Harness, HarnessArgs};
use walcast_bench::rawws::{self, opcode, RawWs};

#[derive(Parser)]
#[command(about = "session resume: 1,000 sessions replayed after a 30 s outage")]
struct Opts {
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
    /// Single-row commits per second while the sessions are away.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    #[arg(long, default_value_t = 30)]
    outage_secs: u64,
    /// Distinct filter values: each session sees one group's rows.
    #[arg(long, default_value_t = 100)]
    groups: u64,
    /// Connections opened at once.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    #[command(flatten)]
    harness: HarnessArgs,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(o))
}

fn path(token: &str, i: usize) -> String {
    format!("/socket/websocket?apikey={token}&vsn=2.0.0&session_id=bench-session-{i:06}")
}

fn join_frame(token: &str, i: usize, groups: u64) -> String {
    let group = i as u64 % groups;
    serde_json::json!([
        "1",
        "1",
        format!("realtime:resume-{i}"),
        "phx_join",
        {
            "config": {
                "postgres_changes": [
                    {"event": "INSERT", "schema": "public", "table": "bench", "filter": format!("n=eq.{group}")}
                ]
            },
            "access_token": token
        }
    ])
    .to_string()
}

/// Read frames until one contains `needle`.
async fn wait_for(ws: &mut RawWs, needle: &[u8], timeout: Duration) -> Result<()> {
    let finder = memmem::Finder::new(needle);
    tokio::time::timeout(timeout, async {
        loop {
            while let Some((op, r)) = ws.next_frame()? {
                if op == opcode::TEXT && finder.find(ws.payload(r)).is_some() {
                    return Ok(());
                }
            }
            if ws.fill().await? == 0 {
                bail!(
                    "closed while waiting for {}",
                    String::from_utf8_lossy(needle)
                );
            }
        }
    })
    .await
    .context("timed out")?
}

/// Connect, join and wait for the join reply.
async fn open(addr: SocketAddr, token: &str, i: usize, groups: u64) -> Result<RawWs> {
    let mut ws = RawWs::connect(addr, None, &path(token, i), 16 * 1024).await?;
    ws.send_text(&join_frame(token, i, groups)).await?;
    wait_for(&mut ws, b"\"phx_reply\"", Duration::from_secs(60)).await?;
    Ok(ws)
}

async fn run(o: Opts) -> Result<()> {
    let joins = o.sessions * 4;
    let mut args = o.harness.clone();
    args.server_default("--max-joins-per-second", joins);
    args.server_default("--max-joins-per-second-per-client", joins);
    args.server_default("--idle-timeout-secs", 600);
    let h = Harness::start(&args).await?;
    let addr = h.addr();
    let token = h.token.clone();
    println!(
        "resume-replay: {} | {}",
        harness::command_line(),
        harness::loadavg()
    );

    // Phase 1: every session joins, says something, and drops.
    let gate = Arc::new(Semaphore::new(o.connect_concurrency));
    let mut tasks = Vec::new();
    for i in 0..o.sessions {
        let (gate, token) = (gate.clone(), token.clone());
        let groups = o.groups;
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await?;
            let mut ws = open(addr, &token, i, groups).await?;
            ws.send_text(r#"[null,"hb","phoenix","heartbeat",{}]"#)
                .await?;
            wait_for(&mut ws, b"\"hb\"", Duration::from_secs(30)).await?;
            anyhow::Ok(ws)
        }));
    }
    let mut sockets = Vec::new();
    for t in tasks {
        sockets.push(t.await??);
    }
    // Let every join's stream position settle before the outage.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(sockets);
    let rss_before = harness::rss_kib(h.server_pid()).unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let parked = harness::metric_lines(addr, &["walcast_session_channels_parked "]);

    // The outage: rows land while nobody is connected.
    let rows = (o.rate * o.outage_secs as f64) as u64;
    let client = h.db.connect().await?;
    let insert = client
        .prepare("INSERT INTO public.bench (id, n, body) VALUES ($1, $2, $3)")
        .await?;
    let body = "x".repeat(64);
    let t0 = Instant::now();
    for id in 1..=rows {
        let at = t0 + Duration::from_secs_f64((id - 1) as f64 / o.rate);
        tokio::time::sleep_until(at.into()).await;
        let (id, n) = (id as i64, (id % o.groups) as i64);
        client.execute(&insert, &[&id, &n, &body]).await?;
    }
    let wrote = t0.elapsed();
    // Let the stream route the outage into the parked buffers.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_away = harness::rss_kib(h.server_pid()).unwrap_or(0);
    let buffered = harness::metric_lines(addr, &["walcast_session_buffered_bytes "]);

    // Phase 2: everyone back at once.
    let id_at = memmem::Finder::new(b"\"record\":{\"id\":");
    let id_at = Arc::new(id_at.into_owned());
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..o.sessions {
        let (gate, token, id_at) = (gate.clone(), token.clone(), id_at.clone());
        let groups = o.groups;
        let want: HashSet<u64> = (1..=rows)
            .filter(|id| id % groups == i as u64 % groups)
            .collect();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut ws = open(addr, &token, i, groups).await?;
            drop(permit);
            let (mut got, mut repeats, mut resync) = (HashSet::new(), 0u64, false);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
            let resync_at = memmem::Finder::new(b"ResyncRequired");
            while got.len() < want.len() {
                while let Some((op, r)) = ws.next_frame()? {
                    if op != opcode::TEXT {
                        continue;
                    }
                    let frame = ws.payload(r);
                    resync |= resync_at.find(frame).is_some();
                    if let Some(id) = rawws::number_after(frame, &id_at) {
                        if !got.insert(id) {
                            repeats += 1;
                        }
                    }
                }
                if got.len() == want.len() {
                    break;
                }
                // A session that never completes is reported as missing rows, not an error.
                match tokio::time::timeout_at(deadline, ws.fill()).await {
                    Ok(Ok(n)) if n > 0 => {}
                    _ => break,
                }
            }
            let missing = want.difference(&got).count() as u64;
            anyhow::Ok((
                got.len() as u64,
                missing,
                repeats,
                resync,
                started.elapsed(),
            ))
        }));
    }
    let (mut delivered, mut missing, mut repeats, mut last) = (0, 0, 0, Duration::ZERO);
    let (mut resyncs, mut incomplete) = (0, 0);
    for t in tasks {
        let (d, m, r, resync, at) = t.await??;
        delivered += d;
        missing += m;
        repeats += r;
        resyncs += u64::from(resync);
        incomplete += u64::from(m > 0);
        last = last.max(at);
    }
    let rss_after = harness::rss_kib(h.server_pid()).unwrap_or(0);
    println!(
        "outage: {rows} rows in {:.1} s; parked: {parked:?}; buffered: {buffered:?}",
        wrote.as_secs_f64()
    );
    println!(
        "replay: {} sessions back, {delivered} deliveries in {:.2} s = {:.0} deliveries/s; missing {missing}, repeated {repeats}",
        o.sessions,
        last.as_secs_f64(),
        delivered as f64 / last.as_secs_f64()
    );
    println!(
        "walcast RSS: {rss_before} KiB before the outage, {rss_away} KiB with the buffers full, {rss_after} KiB after the replay | {}",
        harness::loadavg()
    );
    println!("sessions told ResyncRequired: {resyncs}; sessions incomplete: {incomplete}");
    if missing > 0 || repeats > 0 {
        bail!("{missing} rows missing, {repeats} repeated");
    }
    Ok(())
}
