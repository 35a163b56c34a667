//! Broadcast fan-out: one sender per channel, N receivers per channel, delivered messages/s
//! and send→receipt latency, against walcast and against a plain Node.js `ws` room server
//! (`crates/walcast-bench/baseline/room-server.mjs`) under the same load.
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! (cd crates/walcast-bench/baseline && npm ci)
//! target/release/broadcast-fanout --server both --channels 1 --receivers-per-channel 1000 --rate 400 \
//!     --server-cpus 0 --client-cpus 1
//! ```
//!
//! ```text
//!  sender socket (one per channel) ──text broadcast {"t":µs since start,"s":seq} at --rate/s──▶ server
//!  server ──▶ receivers (vsn 2.0.0 sockets, one channel each) ──▶ latency = now − t (one clock:
//!                                                                  the generator's own)
//! ```
//!
//! Open loop: the sender's schedule does not wait for deliveries. Counted: deliveries of
//! messages *sent* inside the measured window (after a warm-up), so the rate is what
//! receivers got, not what was sent. The server runs in its own process (the 20,000-fd cap
//! per process), pinned with `--server-cpus`; the generator with `--client-cpus`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use tokio_tungstenite::tungstenite::Message;
use walcast_bench::harness::{self, Harness, HarnessArgs};
use walcast_bench::realtime::{self, Ws};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Walcast,
    Baseline,
    Both,
}

#[derive(Parser)]
#[command(about = "broadcast fan-out: walcast vs a plain Node.js ws room server")]
struct Opts {
    #[arg(long, value_enum, default_value_t = Target::Both)]
    server: Target,
    /// Channels (topics), each with one sender.
    #[arg(long, default_value_t = 1)]
    channels: usize,
    /// Receivers joined to each channel.
    #[arg(long, default_value_t = 1000)]
    receivers_per_channel: usize,
    /// Broadcasts per second per channel.
    #[arg(long, default_value_t = 400.0)]
    rate: f64,
    /// Warm-up seconds (not counted).
    #[arg(long, default_value_t = 3)]
    warmup_secs: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Payload padding in bytes (on top of the timestamp fields).
    #[arg(long, default_value_t = 64)]
    pad: usize,
    /// Generator runtime worker threads.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// The baseline directory (with node_modules installed).
    #[arg(long, default_value = "crates/walcast-bench/baseline")]
    baseline_dir: String,
    #[command(flatten)]
    harness: HarnessArgs,
}

struct Stats {
    hist: Mutex<Histogram<u64>>,
    counted: AtomicU64,
    all: AtomicU64,
}

struct Report {
    name: &'static str,
    delivered_per_sec: f64,
    expected_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    if let Some(cpus) = &o.harness.client_cpus {
        harness::pin_self(cpus)?;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.client_threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut reports = Vec::new();
        if matches!(o.server, Target::Walcast | Target::Both) {
            let h = Harness::start(&o.harness).await?;
            let r = run_load("walcast", h.addr(), &h.token, &o).await;
            drop(h);
            reports.push(r?);
        }
        if matches!(o.server, Target::Baseline | Target::Both) {
            let (mut child, addr) = start_baseline(&o)?;
            let r = run_load("node-ws-baseline", addr, "x", &o).await;
            let _ = child.kill();
            let _ = child.wait();
            reports.push(r?);
        }
        println!(
            "broadcast-fanout: {} channel(s) × {} receivers, {}/s per channel, {} B pad, {} s measured; {}",
            o.channels,
            o.receivers_per_channel,
            o.rate,
            o.pad,
            o.duration_secs,
            o.harness.pinning()
        );
        println!("| server | delivered msgs/s | expected msgs/s | p50 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|");
        for r in &reports {
            println!(
                "| {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
                r.name, r.delivered_per_sec, r.expected_per_sec, r.p50_ms, r.p99_ms, r.max_ms
            );
        }
        if let [w, b] = &reports[..] {
            println!(
                "ratio walcast / baseline: {:.2}× delivered msgs/s",
                w.delivered_per_sec / b.delivered_per_sec.max(1.0)
            );
        }
        Ok(())
    })
}

fn start_baseline(o: &Opts) -> Result<(Child, SocketAddr)> {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.port()
    };
    let mut cmd = match &o.harness.server_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus, "node"]);
            c
        }
        None => Command::new("node"),
    };
    let mut child = cmd
        .arg("room-server.mjs")
        .arg(port.to_string())
        .current_dir(&o.baseline_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting node room-server.mjs (is node installed, and npm ci run?)")?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the baseline server did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((child, addr))
}

fn topic(c: usize) -> String {
    format!("realtime:fanout-{c}")
}

async fn join(ws: &mut Ws, topic: &str) -> Result<()> {
    let join = format!(
        r#"["1","1","{topic}","phx_join",{{"config":{{"broadcast":{{"self":false,"ack":false}},"presence":{{"enabled":false}},"postgres_changes":[],"private":false}}}}]"#
    );
    ws.send(Message::text(join)).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .context("join reply timed out")?;
        match msg {
            Some(Ok(Message::Text(t))) if t.contains("phx_reply") => {
                if t.contains(r#""status":"ok""#) {
                    return Ok(());
                }
                bail!("join refused: {t}");
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed during join"),
        }
    }
}

/// The `"t":<µs>` value of a broadcast frame.
fn sent_at(frame: &[u8], needle: &Finder<'_>) -> Option<u64> {
    let at = needle.find(frame)? + 4;
    let digits = frame[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&frame[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

async fn run_load(name: &'static str, addr: SocketAddr, token: &str, o: &Opts) -> Result<Report> {
    let start = Instant::now();
    let stats = Arc::new(Stats {
        hist: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3)?),
        counted: AtomicU64::new(0),
        all: AtomicU64::new(0),
    });
    let window_start_us = Arc::new(AtomicU64::new(u64::MAX));
    let window_end_us = Arc::new(AtomicU64::new(u64::MAX));
    let stop = Arc::new(AtomicBool::new(false));

    // Receivers, connected and joined a few at a time.
    let total = o.channels * o.receivers_per_channel;
    eprintln!("{name}: connecting {total} receivers");
    let mut receivers = Vec::with_capacity(total);
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut joins = Vec::with_capacity(total);
    for i in 0..total {
        let c = i % o.channels;
        let sem = sem.clone();
        let token = token.to_string();
        joins.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let mut ws = realtime::connect(addr, None, &token, 4096).await?;
            join(&mut ws, &topic(c)).await?;
            anyhow::Ok(ws)
        }));
    }
    for j in joins {
        receivers.push(j.await??);
    }
    eprintln!(
        "{name}: {total} receivers joined in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let mut tasks = Vec::new();
    for mut ws in receivers {
        let stats = stats.clone();
        let (ws_start, ws_end) = (window_start_us.clone(), window_end_us.clone());
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let needle = Finder::new(b"\"t\":");
            let mut local: Vec<u64> = Vec::with_capacity(256);
            let flush = |local: &mut Vec<u64>| {
                if let Ok(mut h) = stats.hist.lock() {
                    for v in local.drain(..) {
                        let _ = h.record(v.max(1));
                    }
                }
            };
            while let Some(msg) = ws.next().await {
                let data = match msg {
                    Ok(Message::Text(t)) => t,
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Some(t) = sent_at(data.as_bytes(), &needle) else {
                    continue;
                };
                stats.all.fetch_add(1, Ordering::Relaxed);
                if t >= ws_start.load(Ordering::Relaxed) && t < ws_end.load(Ordering::Relaxed) {
                    let now = start.elapsed().as_micros() as u64;
                    stats.counted.fetch_add(1, Ordering::Relaxed);
                    local.push(now.saturating_sub(t));
                    if local.len() >= 256 {
                        flush(&mut local);
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
            }
            flush(&mut local);
        }));
    }

    // Senders: one socket per channel, open-loop schedule.
    let mut senders = Vec::with_capacity(o.channels);
    for c in 0..o.channels {
        let mut ws = realtime::connect(addr, None, token, 4096).await?;
        join(&mut ws, &topic(c)).await?;
        senders.push(ws);
    }
    let period = Duration::from_secs_f64(1.0 / o.rate);
    let run_for = Duration::from_secs(o.warmup_secs + o.duration_secs);
    let pad = "x".repeat(o.pad);
    let mut send_tasks = Vec::new();
    for (c, ws) in senders.into_iter().enumerate() {
        let topic = topic(c);
        let pad = pad.clone();
        send_tasks.push(tokio::spawn(async move {
            // Spread channel phases over one period.
            let phase = period.mul_f64((c % 64) as f64 / 64.0);
            let mut tick = tokio::time::interval_at((Instant::now() + phase).into(), period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let (mut tx, mut rx) = ws.split();
            // Drain whatever the server sends the sender (replies), so its queue never fills.
            let drain = tokio::spawn(async move { while rx.next().await.is_some() {} });
            let mut seq: u64 = 0;
            let began = Instant::now();
            let mut last_hb = Instant::now();
            while began.elapsed() < run_for {
                tick.tick().await;
                seq += 1;
                let t = start.elapsed().as_micros() as u64;
                let frame = format!(
                    r#"["1",null,"{topic}","broadcast",{{"type":"broadcast","event":"tick","payload":{{"t":{t},"s":{seq},"pad":"{pad}"}}}}]"#
                );
                if tx.send(Message::text(frame)).await.is_err() {
                    break;
                }
                if last_hb.elapsed() > Duration::from_secs(20) {
                    last_hb = Instant::now();
                    let _ = tx
                        .send(Message::text(r#"[null,"hb","phoenix","heartbeat",{}]"#))
                        .await;
                }
            }
            drain.abort();
            seq
        }));
    }
    let warm = Duration::from_secs(o.warmup_secs);
    tokio::time::sleep(warm).await;
    let ws0 = start.elapsed().as_micros() as u64;
    window_start_us.store(ws0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(o.duration_secs)).await;
    let ws1 = start.elapsed().as_micros() as u64;
    window_end_us.store(ws1, Ordering::Relaxed);
    let mut sent = 0;
    for t in send_tasks {
        sent += t.await.unwrap_or(0);
    }
    // Let in-flight deliveries of the window arrive (bounded).
    let settle = Instant::now();
    let mut last = stats.counted.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stats.counted.load(Ordering::Relaxed);
        if now == last || settle.elapsed() > Duration::from_secs(10) {
            break;
        }
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    for t in &tasks {
        t.abort();
    }
    let window_secs = (ws1 - ws0) as f64 / 1e6;
    let counted = stats.counted.load(Ordering::Relaxed);
    let h = stats.hist.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    eprintln!(
        "{name}: sent {sent}, received {} deliveries in all",
        stats.all.load(Ordering::Relaxed)
    );
    Ok(Report {
        name,
        delivered_per_sec: counted as f64 / window_secs,
        expected_per_sec: o.rate * (o.channels * o.receivers_per_channel) as f64,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
    })
}
