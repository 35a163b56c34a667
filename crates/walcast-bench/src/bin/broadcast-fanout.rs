//! Broadcast fan-out: one sender per channel, N receivers per channel, delivered messages/s
//! and send→receipt latency, against walcast and against a plain Node.js `ws` room server
//! (`crates/walcast-bench/baseline/room-server.mjs`) under the same load.
//!
//! ```text
//! cargo build --release -p walcast-server --bin walcast -p walcast-bench
//! (cd crates/walcast-bench/baseline && npm ci)
//! target/release/broadcast-fanout --server both --channels 1 --receivers-per-channel 1000 \
//!     --rate 100,200,400,800 --server-cpus 0 --client-cpus 1
//! ```
//!
//! ```text
//!  parent (senders, one socket per channel) ──text broadcast {"t":epoch µs,"s":seq,"pad":…}──▶ server
//!     │  stdin: window <from> <to> / report / stop             open-loop schedule, --rate/s each
//!     ├─▶ worker process 1 (this binary, --worker, T runtime threads) ◀── receivers 0..k ◀──┘
//!     └─▶ worker process 2 …                                         ◀── receivers k..N
//!           stdout: joined … / report counted all gaps open closed codes histogram
//! ```
//!
//! What is measured, per rate step (all steps reuse the same connections):
//! - delivered msgs/s = deliveries of broadcasts *sent* inside the measured window (after the
//!   warm-up), received before the step's settle ended, divided by the window length;
//!   offered = rate × channels × receivers per channel; "sent" is what the senders managed
//!   (a starved sender shows here, not as a server loss);
//! - latency = receipt − send time, both `CLOCK_REALTIME` on this machine (one clock across
//!   processes), taken once per read(2), so frames that arrive together share a receipt time;
//! - gaps = sequence numbers a receiver skipped (lost without a close);
//! - sockets that ended during the run, by close code (`4008` is walcast's slow-client close),
//!   `eof` (no close frame) or `error`;
//! - CPU of the server and of the generator (parent + workers) over the step, % of one core.
//!
//! Receivers read with [`walcast_bench::rawws`]: one reused buffer per socket, no JSON parse,
//! the `"t":` and `"s":` fields found by byte search, statistics per runtime thread. The
//! receivers live in worker processes (the 20,000-fd cap per process) on alternating source
//! addresses (ephemeral ports); the senders in the parent. The server runs in its own process,
//! pinned with `--server-cpus`; the generator with `--client-cpus` (workers inherit it).
//!
//! Cluster cost (issue #13): `--nodes 1,3 --rounds 2` runs walcast as one node and as a
//! three-node cluster on one Redis (worker process w connects to node w mod N, sender c to
//! node c mod N), back to back, twice, and prints the server CPU per delivery (every node +
//! redis-server, read over exactly the measured window) and the cluster's ratio to the
//! one-node run of the same round (target: at most +25 %):
//!
//! ```text
//! target/release/broadcast-fanout --server walcast --receivers-per-channel 3000 --rate 40 \
//!     --nodes 1,3 --rounds 2 --workers 3
//! ```
//!
//! walcast's policy limits are lifted for the run unless set in the environment
//! (`MAX_JOINS_PER_SECOND`, `MAX_EVENTS_PER_SECOND`: the bench joins thousands of sockets at
//! once and a sweep step can push > 1,000 broadcasts/s into one channel). The per-socket send
//! queue (`SOCKET_SEND_QUEUE`, 4096) is left at its default.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_tungstenite::tungstenite::Message;
use walcast_bench::cost::{self, Cost};
use walcast_bench::harness::{self, CpuWindow, Harness, HarnessArgs};
use walcast_bench::rawws::{self, opcode, RawWs};
use walcast_bench::realtime::{self, Ws};
use walcast_bench::worker::{share, Worker};

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
    /// Broadcasts per second per channel; a comma-separated list is a sweep over the same
    /// connections, one step per rate.
    #[arg(long, value_delimiter = ',', default_value = "400")]
    rate: Vec<f64>,
    /// Warm-up seconds per step (not counted).
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Measured seconds per step.
    #[arg(long, default_value_t = 8)]
    duration_secs: u64,
    /// Payload padding in bytes (on top of the timestamp fields).
    #[arg(long, default_value_t = 64)]
    pad: usize,
    /// Receiver worker processes (each holds ≤ 19,000 sockets).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Runtime threads per worker process.
    #[arg(long, default_value_t = 2)]
    worker_threads: usize,
    /// Runtime threads of the parent (the senders).
    #[arg(long, default_value_t = 1)]
    sender_threads: usize,
    /// Source addresses, one per worker in turn.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1,127.0.0.2")]
    sources: Vec<IpAddr>,
    /// Read buffer per receiver, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    read_buffer: usize,
    /// Receivers connecting at once per worker.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// The baseline directory (with node_modules installed).
    #[arg(long, default_value = "crates/walcast-bench/baseline")]
    baseline_dir: String,
    /// walcast processes per run; a list runs each in turn (e.g. `1,3`: one node, then a
    /// three-node cluster on one Redis) and compares their server CPU per delivery.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    nodes: Vec<usize>,
    /// Times the whole `--nodes` list is run, back to back.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[command(flatten)]
    harness: HarnessArgs,

    /// Internal: run as a receiver worker.
    #[arg(long, hide = true)]
    worker: bool,
    #[arg(long, hide = true)]
    addr: Option<SocketAddr>,
    #[arg(long, hide = true)]
    token: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
    #[arg(long, hide = true)]
    source: Option<IpAddr>,
}

const LIFTED_LIMITS: [(&str, &str); 2] = [
    ("MAX_JOINS_PER_SECOND", "1000000"),
    ("MAX_EVENTS_PER_SECOND", "1000000"),
];

fn main() -> Result<()> {
    let o = Opts::parse();
    if o.worker {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(o.worker_threads.max(1))
            .enable_all()
            .build()?;
        return rt.block_on(worker(o));
    }
    if let Some(cpus) = &o.harness.client_cpus {
        harness::pin_self(cpus)?;
    }
    // No runtime thread exists yet, so nothing reads the environment concurrently.
    for (k, v) in LIFTED_LIMITS {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.sender_threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(parent(o))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// `some avg10` of /proc/pressure/cpu: the share of time runnable tasks waited for a CPU
/// (other engineers' builds on the shared box show here, not in the load generator's CPU).
fn cpu_pressure() -> String {
    std::fs::read_to_string("/proc/pressure/cpu")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()?
                .split_whitespace()
                .find_map(|f| f.strip_prefix("avg10=").map(|v| format!("{v}%")))
        })
        .unwrap_or_else(|| "n/a".into())
}

fn topic(c: usize) -> String {
    format!("realtime:fanout-{c}")
}

fn join_frame(topic: &str) -> String {
    format!(
        r#"["1","1","{topic}","phx_join",{{"config":{{"broadcast":{{"self":false,"ack":false}},"presence":{{"enabled":false}},"postgres_changes":[],"private":false}}}}]"#
    )
}

/// Longest a step waits for a lagging server's backlog after the senders stopped.
const SETTLE_MAX: Duration = Duration::from_secs(20);

const HEARTBEAT: &str = r#"[null,"hb","phoenix","heartbeat",{}]"#;

// ---------------------------------------------------------------------------------------
// Parent: servers, senders, steps, report.

/// One rate step against one server.
struct Step {
    rate: f64,
    offered: f64,
    sent: f64,
    delivered: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    gaps: u64,
    open: u64,
    closes: BTreeMap<String, u64>,
    server_cpu: f64,
    generator_cpu: f64,
    load: String,
    /// Server CPU per delivery over exactly the measured window.
    cost: Cost,
}

async fn parent(o: Opts) -> Result<()> {
    if o.rate.iter().any(|r| *r <= 0.0) {
        bail!("--rate values must be positive");
    }
    if o.sources.is_empty() {
        bail!("--sources is empty");
    }
    let load_start = harness::loadavg();
    let mut results: Vec<(String, Vec<Step>)> = Vec::new();
    let compare_nodes = o.nodes.len() > 1 || o.nodes.iter().any(|n| *n > 1) || o.rounds > 1;
    if matches!(o.server, Target::Walcast | Target::Both) {
        for round in 1..=o.rounds.max(1) {
            for &nodes in &o.nodes {
                let name = if compare_nodes {
                    format!("walcast {nodes} node(s), round {round}")
                } else {
                    "walcast".to_string()
                };
                let mut args = o.harness.clone();
                args.nodes = nodes;
                // Every receiver joins from one address: the per-client join limit (meant
                // for one real client) would refuse most of them.
                args.server_default("--max-joins-per-second-per-client", 1_000_000);
                let mut h = Harness::start(&args).await?;
                let redis_port = h.redis.as_ref().map(|r| r.port());
                let r = run_load(
                    &name,
                    &h.addrs(),
                    &h.token,
                    &h.server_procs(),
                    redis_port,
                    &o,
                )
                .await;
                let alive = h.check_alive();
                let slow_closes: usize = h
                    .nodes
                    .iter()
                    .map(|n| {
                        std::fs::read_to_string(&n.log_path)
                            .unwrap_or_default()
                            .matches("closing a slow client")
                            .count()
                    })
                    .sum();
                eprintln!("{name}: {slow_closes} slow-client closes in the server logs");
                drop(h);
                alive?;
                let mut steps = r?;
                for s in &mut steps {
                    s.cost.round = round;
                }
                results.push((name, steps));
            }
        }
    }
    if matches!(o.server, Target::Baseline | Target::Both) {
        let (mut child, addr) = start_baseline(&o)?;
        let procs = [("node0".to_string(), child.id())];
        let r = run_load("node-ws-baseline", &[addr], "x", &procs, None, &o).await;
        let _ = child.kill();
        let _ = child.wait();
        results.push(("node-ws-baseline".to_string(), r?));
    }

    let receivers = o.channels * o.receivers_per_channel;
    println!("== broadcast-fanout ==");
    println!("command: {}", harness::command_line());
    println!(
        "shape: {} channel(s) × {} receivers = {receivers} receivers, {} B pad, warm-up {} s + {} s measured per step",
        o.channels, o.receivers_per_channel, o.pad, o.warmup_secs, o.duration_secs
    );
    println!(
        "generator: parent ({} thread(s), {} sender socket(s)) + {} worker process(es) × {} thread(s), sources {:?}; {}",
        o.sender_threads,
        o.channels,
        o.workers.max(1),
        o.worker_threads,
        o.sources,
        o.harness.pinning()
    );
    println!(
        "machine: {} vCPU; load average at start / end: {load_start} / {}; cpu pressure (some avg10) at end {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        harness::loadavg(),
        cpu_pressure()
    );
    println!("| server | rate/ch | offered msgs/s | sent msgs/s | delivered msgs/s | delivered/offered | p50 ms | p99 ms | max ms | gaps | sockets open | closed (code: n) | server cpu | server cpu µs/delivery | generator cpu | load avg / cpu psi |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, steps) in &results {
        for s in steps {
            let closes = if s.closes.is_empty() {
                "0".to_string()
            } else {
                s.closes
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            println!(
                "| {name} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.1} | {:.1} | {:.1} | {} | {} | {closes} | {:.0}% | {:.2} | {:.0}% | {} |",
                s.rate,
                s.offered,
                s.sent,
                s.delivered,
                s.delivered / s.offered,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                s.gaps,
                s.open,
                s.server_cpu,
                s.server_cpu * 1e4 / s.delivered.max(1.0),
                s.generator_cpu,
                s.load
            );
        }
    }
    if compare_nodes {
        for (i, &rate) in o.rate.iter().enumerate() {
            let costs: Vec<Cost> = results
                .iter()
                .filter(|(n, _)| n.starts_with("walcast"))
                .filter_map(|(_, steps)| steps.get(i).map(|s| s.cost.clone()))
                .collect();
            cost::print_comparison(
                &format!("broadcast-fanout {rate}/s per channel"),
                &costs,
                0.25,
            );
        }
    }
    if let [(_, w), (bn, b)] = &results[..] {
        if bn != "node-ws-baseline" {
            return Ok(());
        }
        for (sw, sb) in w.iter().zip(b) {
            println!(
                "ratio walcast / baseline at {}/s per channel: {:.2}× delivered msgs/s (p99 {:.1} vs {:.1} ms)",
                sw.rate,
                sw.delivered / sb.delivered.max(1.0),
                sw.p99_ms,
                sb.p99_ms
            );
        }
        let best = |s: &[Step]| s.iter().map(|x| x.delivered).fold(0.0, f64::max);
        println!(
            "ratio of the best delivered rates in the sweep: {:.2}× ({:.0} vs {:.0} msgs/s)",
            best(w) / best(b).max(1.0),
            best(w),
            best(b)
        );
    }
    Ok(())
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
        .stdout(Stdio::null())
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

async fn join_sender(ws: &mut Ws, topic: &str) -> Result<()> {
    ws.send(Message::text(join_frame(topic))).await?;
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

/// Worker w connects to node `w mod addrs.len()`: the count is rounded up to a multiple of
/// the nodes so that every node holds the same share of the receivers.
async fn spawn_workers(
    name: &str,
    addrs: &[SocketAddr],
    token: &str,
    o: &Opts,
) -> Result<Vec<Worker>> {
    let total = o.channels * o.receivers_per_channel;
    let n = o
        .workers
        .max(1)
        .max(total.div_ceil(19_000))
        .next_multiple_of(addrs.len());
    let mut workers = Vec::with_capacity(n);
    for w in 0..n {
        let (first, count) = share(total, w, n);
        let source = o.sources[w % o.sources.len()];
        workers.push(Worker::spawn([
            "--addr".to_string(),
            addrs[w % addrs.len()].to_string(),
            "--token".into(),
            token.into(),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--source".into(),
            source.to_string(),
            "--channels".into(),
            o.channels.to_string(),
            "--worker-threads".into(),
            o.worker_threads.to_string(),
            "--read-buffer".into(),
            o.read_buffer.to_string(),
            "--connect-concurrency".into(),
            o.connect_concurrency.to_string(),
        ])?);
    }
    let started = Instant::now();
    let (mut joined, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    for w in &mut workers {
        let line = w
            .lines
            .next_line()
            .await?
            .context("worker exited before reporting its joins")?;
        let f: Vec<&str> = line.splitn(4, ' ').collect();
        if f.first() != Some(&"joined") || f.len() < 3 {
            bail!("unexpected worker line: {line}");
        }
        joined += f[1].parse::<u64>()?;
        failed += f[2].parse::<u64>()?;
        if let Some(e) = f.get(3) {
            first_error.get_or_insert_with(|| e.to_string());
        }
    }
    eprintln!(
        "{name}: {joined} receivers joined, {failed} failed{} in {:.1} s ({n} worker processes)",
        first_error
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        started.elapsed().as_secs_f64()
    );
    if joined == 0 {
        bail!("no receiver joined");
    }
    Ok(workers)
}

async fn send_line(workers: &mut [Worker], line: &str) -> Result<()> {
    for w in workers.iter_mut() {
        w.stdin.write_all(line.as_bytes()).await?;
        w.stdin.flush().await?;
    }
    Ok(())
}

/// `server_procs` are the server's processes (`node<i>`, `redis`), whose CPU is the server's.
async fn run_load(
    name: &str,
    addrs: &[SocketAddr],
    token: &str,
    server_procs: &[(String, u32)],
    redis_port: Option<u16>,
    o: &Opts,
) -> Result<Vec<Step>> {
    eprintln!(
        "{name}: connecting {} receivers to {} node(s)",
        o.channels * o.receivers_per_channel,
        addrs.len()
    );
    let mut workers = spawn_workers(name, addrs, token, o).await?;
    let mut senders: Vec<(Ws, u64)> = Vec::with_capacity(o.channels);
    for c in 0..o.channels {
        let mut ws = realtime::connect(addrs[c % addrs.len()], None, token, 4096).await?;
        join_sender(&mut ws, &topic(c)).await?;
        senders.push((ws, 0));
    }
    let mut procs: Vec<(String, u32, bool)> = server_procs
        .iter()
        .map(|(n, p)| (n.clone(), *p, false))
        .collect();
    procs.push(("parent".into(), std::process::id(), false));
    for (i, w) in workers.iter().enumerate() {
        if let Some(p) = w.child.id() {
            procs.push((format!("worker{i}"), p, false));
        }
    }
    let proc_refs: Vec<(&str, u32, bool)> =
        procs.iter().map(|(n, p, t)| (n.as_str(), *p, *t)).collect();
    let pad: Arc<str> = "x".repeat(o.pad).into();
    // Idle cost: every receiver joined, nothing sent yet.
    let idle_cpu_rate = cost::idle_rate(&proc_refs, 5.0).await;
    let mut steps = Vec::new();
    for &rate in &o.rate {
        let load = format!("{} / psi {}", harness::loadavg(), cpu_pressure());
        let lead = Duration::from_millis(200);
        let step_start = now_us() + lead.as_micros() as u64;
        let w0 = step_start + o.warmup_secs * 1_000_000;
        let w1 = w0 + o.duration_secs * 1_000_000;
        send_line(&mut workers, &format!("window {w0} {w1}\n")).await?;
        let cpu = CpuWindow::start(&proc_refs);
        // The cost window: CPU read exactly at w0 and w1, the instants that bound the
        // broadcasts whose deliveries are counted.
        let cost_window = {
            let procs = procs.clone();
            let addrs = addrs.to_vec();
            tokio::spawn(async move {
                let until = |t: u64| Duration::from_micros(t.saturating_sub(now_us()));
                tokio::time::sleep(until(w0)).await;
                let refs: Vec<(&str, u32, bool)> =
                    procs.iter().map(|(n, p, t)| (n.as_str(), *p, *t)).collect();
                let net = || redis_port.and_then(harness::redis_net_bytes);
                let out = || harness::metric_sum(&addrs, "walcast_bytes_out_total");
                let out_before = out();
                let net_before = net();
                let window = CpuWindow::start(&refs);
                tokio::time::sleep(until(w1)).await;
                let (secs, cpu) = window.finish_secs();
                let net = net_before
                    .zip(net())
                    .map(|((i0, o0), (i1, o1))| (i1 - i0, o1 - o0));
                let bytes_out = (out() - out_before).max(0.0) as u64;
                (secs, cpu, net, bytes_out)
            })
        };
        let base = tokio::time::Instant::now() + lead;
        let period = Duration::from_secs_f64(1.0 / rate);
        let channels = o.channels;
        let mut tasks = Vec::with_capacity(channels);
        for (c, (mut ws, mut seq)) in senders.drain(..).enumerate() {
            let topic = topic(c);
            let pad = pad.clone();
            tasks.push(tokio::spawn(async move {
                // Channel phases spread over one period.
                let phase = period.mul_f64(c as f64 / channels as f64);
                let mut tick = tokio::time::interval_at(base + phase, period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let mut in_window = 0u64;
                loop {
                    tick.tick().await;
                    let t = now_us();
                    if t >= w1 {
                        break;
                    }
                    seq += 1;
                    let frame = format!(
                        r#"["1",null,"{topic}","broadcast",{{"type":"broadcast","event":"tick","payload":{{"t":{t},"s":{seq},"pad":"{pad}"}}}}]"#
                    );
                    if ws.send(Message::text(frame)).await.is_err() {
                        return Err(anyhow::anyhow!("sender {c} lost its socket"));
                    }
                    if t >= w0 {
                        in_window += 1;
                    }
                }
                anyhow::Ok((ws, seq, in_window))
            }));
        }
        let mut sent_in_window = 0u64;
        for t in tasks {
            let (ws, seq, n) = t.await??;
            senders.push((ws, seq));
            sent_in_window += n;
        }
        send_line(&mut workers, "report\n").await?;
        let cpu = cpu.finish();
        let (cost_secs, cost_cpu, redis_net, bytes_out) = cost_window.await?;
        let mut per_node = vec![0u64; addrs.len()];
        let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
        let (mut counted, mut all, mut gaps, mut open) = (0u64, 0u64, 0u64, 0u64);
        let mut closes = BTreeMap::new();
        for (wi, w) in workers.iter_mut().enumerate() {
            let line = w
                .lines
                .next_line()
                .await?
                .context("worker exited before its report")?;
            let r = WorkerReport::parse(&line)?;
            per_node[wi % addrs.len()] += r.counted;
            counted += r.counted;
            all += r.all;
            gaps += r.gaps;
            open += r.open;
            for (k, v) in r.closes {
                *closes.entry(k).or_insert(0) += v;
            }
            for (v, c) in r.hist {
                hist.record_n(v.max(1), c)?;
            }
        }
        let secs = (w1 - w0) as f64 / 1e6;
        let pct = |prefix: &str| {
            cpu.iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, p)| p)
                .sum::<f64>()
        };
        let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
        let complete = gaps == 0
            && closes.is_empty()
            && counted == sent_in_window * o.receivers_per_channel as u64;
        let step = Step {
            rate,
            offered: rate * (o.channels * o.receivers_per_channel) as f64,
            sent: sent_in_window as f64 * o.receivers_per_channel as f64 / secs,
            delivered: counted as f64 / secs,
            p50_ms: ms(0.50),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
            gaps,
            open,
            closes,
            server_cpu: pct("node") + pct("redis"),
            generator_cpu: pct("parent") + pct("worker"),
            cost: Cost {
                nodes: addrs.len(),
                round: 1,
                wall_secs: cost_secs,
                deliveries: per_node,
                cpu: cost_cpu,
                complete,
                load: load.clone(),
                redis_net,
                idle_cpu_rate: Some(idle_cpu_rate),
                client_bytes_out: Some(bytes_out),
            },
            load,
        };
        eprintln!(
            "{name}: rate {rate}/s per channel: delivered {:.0}/s of {:.0} offered ({all} deliveries in all), p50 {:.1} ms, p99 {:.1} ms, {} open, closes {:?}, cpu {}",
            step.delivered,
            step.offered,
            step.p50_ms,
            step.p99_ms,
            step.open,
            step.closes,
            harness::format_cpu(&cpu)
        );
        steps.push(step);
    }
    let _ = send_line(&mut workers, "stop\n").await;
    for mut w in workers {
        let _ = w.child.wait().await;
    }
    Ok(steps)
}

/// `report <counted> <all> <gaps> <open> <closes> <histogram>` from a worker.
struct WorkerReport {
    counted: u64,
    all: u64,
    gaps: u64,
    open: u64,
    closes: Vec<(String, u64)>,
    hist: Vec<(u64, u64)>,
}

impl WorkerReport {
    fn parse(line: &str) -> Result<WorkerReport> {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() != 7 || f[0] != "report" {
            bail!("unexpected worker line: {line}");
        }
        let pairs = |s: &str| -> Result<Vec<(String, u64)>> {
            if s == "-" {
                return Ok(Vec::new());
            }
            s.split(',')
                .map(|p| {
                    let (k, v) = p.rsplit_once(':').context("pair without ':'")?;
                    Ok((k.to_string(), v.parse()?))
                })
                .collect()
        };
        Ok(WorkerReport {
            counted: f[1].parse()?,
            all: f[2].parse()?,
            gaps: f[3].parse()?,
            open: f[4].parse()?,
            closes: pairs(f[5])?,
            hist: pairs(f[6])?
                .into_iter()
                .map(|(k, v)| Ok((k.parse()?, v)))
                .collect::<Result<_>>()?,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Worker: receivers.

/// Statistics of the receivers running on one runtime thread.
struct Shard {
    hist: Histogram<u64>,
    counted: u64,
    all: u64,
    gaps: u64,
}

static SHARDS: Mutex<Vec<Arc<Mutex<Shard>>>> = Mutex::new(Vec::new());
static WINDOW_START: AtomicU64 = AtomicU64::new(u64::MAX);
static WINDOW_END: AtomicU64 = AtomicU64::new(u64::MAX);
static OPEN: AtomicU64 = AtomicU64::new(0);
static CLOSES: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

thread_local! {
    static SHARD: Arc<Mutex<Shard>> = {
        let s = Arc::new(Mutex::new(Shard {
            hist: Histogram::new_with_bounds(1, 600_000_000, 3)
                .expect("constant histogram bounds are valid"),
            counted: 0,
            all: 0,
            gaps: 0,
        }));
        SHARDS.lock().expect("shard registry never poisoned").push(s.clone());
        s
    };
}

fn shards() -> Vec<Arc<Mutex<Shard>>> {
    SHARDS
        .lock()
        .expect("shard registry never poisoned")
        .clone()
}

async fn raw_join(ws: &mut RawWs, topic: &str) -> Result<()> {
    ws.send_text(&join_frame(topic)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        while let Some((op, r)) = ws.next_frame()? {
            let f = ws.payload(r);
            match op {
                opcode::TEXT if memchr::memmem::find(f, b"phx_reply").is_some() => {
                    if memchr::memmem::find(f, br#""status":"ok""#).is_some() {
                        return Ok(());
                    }
                    bail!("join refused: {}", String::from_utf8_lossy(f));
                }
                opcode::CLOSE => bail!("closed during join: {:?}", rawws::close_code(f)),
                _ => {}
            }
        }
        let n = tokio::time::timeout_at(deadline, ws.fill())
            .await
            .context("join reply timed out")??;
        if n == 0 {
            bail!("socket ended during join");
        }
    }
}

async fn worker(o: Opts) -> Result<()> {
    let addr = o.addr.context("--addr is required with --worker")?;
    let token = o
        .token
        .clone()
        .context("--token is required with --worker")?;
    let path: Arc<str> = format!("/socket/websocket?apikey={token}&vsn=2.0.0").into();
    let (source, channels, read_buffer) = (o.source, o.channels.max(1), o.read_buffer);
    let results: Vec<Result<()>> = futures_util::stream::iter(o.first..o.first + o.count)
        .map(|i| {
            let path = path.clone();
            async move {
                let mut ws = RawWs::connect(addr, source, &path, read_buffer).await?;
                raw_join(&mut ws, &topic(i % channels)).await?;
                OPEN.fetch_add(1, Ordering::Relaxed);
                let phase = Duration::from_millis((i as u64 * 7919) % 20_000);
                tokio::spawn(receive(ws, phase));
                Ok(())
            }
        })
        .buffer_unordered(o.connect_concurrency.max(1))
        .collect()
        .await;
    let (mut joined, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    for r in results {
        match r {
            Ok(()) => joined += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}").replace('\n', " "));
            }
        }
    }
    let mut out = std::io::stdout();
    writeln!(
        out,
        "joined {joined} {failed}{}",
        first_error.map(|e| format!(" {e}")).unwrap_or_default()
    )?;
    out.flush()?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            ["window", from, to] => {
                for s in shards() {
                    let mut s = s.lock().expect("shard never poisoned");
                    s.hist.reset();
                    s.counted = 0;
                    s.all = 0;
                    s.gaps = 0;
                }
                WINDOW_START.store(from.parse()?, Ordering::Relaxed);
                WINDOW_END.store(to.parse()?, Ordering::Relaxed);
            }
            ["report"] => {
                let line = settle_and_report().await;
                writeln!(out, "{line}")?;
                out.flush()?;
            }
            ["stop"] => break,
            _ => bail!("unknown command: {line}"),
        }
    }
    Ok(())
}

/// Wait until frames stop arriving (a server that fell behind is still draining its backlog,
/// window deliveries included; bounded by `SETTLE_MAX`), then the report line.
async fn settle_and_report() -> String {
    let received = || {
        shards()
            .iter()
            .map(|s| s.lock().expect("shard never poisoned").all)
            .sum::<u64>()
    };
    let started = Instant::now();
    let mut last = received();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = received();
        if now == last || started.elapsed() > SETTLE_MAX {
            break;
        }
        last = now;
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)
        .expect("constant histogram bounds are valid");
    let (mut counted, mut all, mut gaps) = (0u64, 0u64, 0u64);
    for s in shards() {
        let s = s.lock().expect("shard never poisoned");
        let _ = hist.add(&s.hist);
        counted += s.counted;
        all += s.all;
        gaps += s.gaps;
    }
    let closes = CLOSES.lock().expect("never poisoned");
    let closes = if closes.is_empty() {
        "-".to_string()
    } else {
        closes
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let h = if hist.is_empty() {
        "-".to_string()
    } else {
        hist.iter_recorded()
            .map(|v| {
                format!(
                    "{}:{}",
                    v.value_iterated_to(),
                    v.count_since_last_iteration()
                )
            })
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "report {counted} {all} {gaps} {} {closes} {h}",
        OPEN.load(Ordering::Relaxed)
    )
}

/// One receiver: read, find `"t":`/`"s":` by byte search, count; heartbeat every 25 s.
async fn receive(mut ws: RawWs, phase: Duration) {
    let t_needle = Finder::new(b"\"t\":");
    let s_needle = Finder::new(b"\"s\":");
    let hb_every = Duration::from_secs(25);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + phase, hb_every);
    let mut last_s = 0u64;
    let mut latencies: Vec<u64> = Vec::with_capacity(64);
    let mut pong: Option<Vec<u8>> = None;
    let why = 'run: loop {
        let now = now_us();
        let (w0, w1) = (
            WINDOW_START.load(Ordering::Relaxed),
            WINDOW_END.load(Ordering::Relaxed),
        );
        let (mut all, mut gaps) = (0u64, 0u64);
        let mut ended = None;
        loop {
            match ws.next_frame() {
                Ok(Some((op, r))) => {
                    let f = ws.payload(r);
                    match op {
                        opcode::TEXT | opcode::BINARY | opcode::CONTINUATION => {
                            let Some(t) = rawws::number_after(f, &t_needle) else {
                                continue;
                            };
                            all += 1;
                            if let Some(s) = rawws::number_after(f, &s_needle) {
                                if last_s != 0 && s > last_s + 1 {
                                    gaps += s - last_s - 1;
                                }
                                last_s = last_s.max(s);
                            }
                            if t >= w0 && t < w1 {
                                latencies.push(now.saturating_sub(t));
                            }
                        }
                        opcode::CLOSE => {
                            ended = Some(
                                rawws::close_code(f).map_or("close".to_string(), |c| c.to_string()),
                            );
                            break;
                        }
                        opcode::PING => pong = Some(f.to_vec()),
                        _ => {}
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    ended = Some("bad-frame".to_string());
                    break;
                }
            }
        }
        if all > 0 {
            SHARD.with(|s| {
                let mut s = s.lock().expect("shard never poisoned");
                s.all += all;
                s.gaps += gaps;
                s.counted += latencies.len() as u64;
                for v in latencies.drain(..) {
                    let _ = s.hist.record(v.max(1));
                }
            });
        }
        if let Some(why) = ended {
            break 'run why;
        }
        if let Some(p) = pong.take() {
            if ws.send_frame(opcode::PONG, &p).await.is_err() {
                break 'run "error".to_string();
            }
        }
        tokio::select! {
            n = ws.fill() => match n {
                Ok(0) => break 'run "eof".to_string(),
                Ok(_) => {}
                Err(_) => break 'run "error".to_string(),
            },
            _ = hb.tick() => {
                if ws.send_text(HEARTBEAT).await.is_err() {
                    break 'run "error".to_string();
                }
            }
        }
    };
    OPEN.fetch_sub(1, Ordering::Relaxed);
    *CLOSES
        .lock()
        .expect("never poisoned")
        .entry(why)
        .or_insert(0) += 1;
}
