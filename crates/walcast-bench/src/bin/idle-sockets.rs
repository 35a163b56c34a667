//! Idle sockets: N (default 19,000) WebSocket connections, each joined to one channel with a
//! postgres_changes INSERT binding on `public.bench`, heartbeating every 25 s like the official
//! clients, held for 60 s. Targets: ≤ 8 KB of server RSS per socket, idle server CPU ≤ 5% of
//! one core.
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/idle-sockets [--sockets 19000 --hold-secs 60]
//! ```
//!
//! What is measured:
//! - server RSS per socket = (VmRSS of the server after every socket joined and `--settle-secs`
//!   passed − VmRSS before the first connect) / sockets joined, from `/proc/<pid>/status`;
//!   kernel `Slab:` growth from `/proc/meminfo` over the same interval, per connection (both
//!   ends of each loopback connection are in it, and so are the clients' sockets);
//! - idle server CPU = Δ(utime + stime) of the server over `--cpu-secs` (30 s) starting after
//!   the settle time, as % of one core; heartbeats (N / 25 per second) are part of "idle";
//! - sockets still open at the end of the hold, heartbeat replies vs heartbeats sent.
//!
//! How: the fd cap is 20,000 per process, so the clients live in worker processes (this binary
//! re-executed with `--worker`, ≤ `--per-worker` sockets each, default 9,500), each worker on
//! its own source address (127.0.0.2, 127.0.0.3 by default) to keep clear of ephemeral-port
//! exhaustion. Workers report over stdout (`joined …`, `final …`) and stop on `stop` on stdin.
//! The server itself must hold N sockets + its Postgres connections under its own 20,000 cap.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use walcast_bench::harness::{self, CpuWindow, Harness, HarnessArgs};
use walcast_bench::realtime::{self, Classifier, Inbound, Ws};
use walcast_bench::worker::{share, Worker};

#[derive(Parser, Debug)]
#[command(about = "idle WebSocket connections: server RSS per socket and idle CPU")]
struct Opts {
    /// Sockets in total.
    #[arg(long, default_value_t = 19_000)]
    sockets: usize,
    /// Sockets per worker process (each process has a 20,000 fd cap).
    #[arg(long, default_value_t = 9_500)]
    per_worker: usize,
    /// Seconds the sockets are held after the last one joined.
    #[arg(long, default_value_t = 60)]
    hold_secs: u64,
    /// Seconds between "all joined" and the RSS reading.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Seconds of the idle CPU window (starts after the settle time).
    #[arg(long, default_value_t = 30)]
    cpu_secs: u64,
    /// Heartbeat interval per socket, seconds.
    #[arg(long, default_value_t = 25)]
    heartbeat_secs: u64,
    /// Source addresses, one per worker in turn. Not 127.0.0.1: thousands of TIME_WAIT
    /// ports left there after a run make later "bind a free port on 127.0.0.1" picks
    /// (Postgres, the server) collide.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.2,127.0.0.3")]
    sources: Vec<IpAddr>,
    /// WebSocket read buffer per client, bytes.
    #[arg(long, default_value_t = 4096)]
    read_buffer: usize,
    /// Connections opened at once per worker.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Runtime threads per worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    harness: HarnessArgs,

    /// Internal: run as a client worker.
    #[arg(long, hide = true)]
    worker: bool,
    #[arg(long, hide = true)]
    server: Option<SocketAddr>,
    #[arg(long, hide = true)]
    token: Option<String>,
    #[arg(long, hide = true, default_value_t = 0)]
    first: usize,
    #[arg(long, hide = true, default_value_t = 0)]
    count: usize,
    #[arg(long, hide = true)]
    source: Option<IpAddr>,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    if !o.worker {
        if let Some(cpus) = &o.harness.client_cpus {
            harness::pin_self(cpus)?;
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(if o.worker { o.threads.max(1) } else { 1 })
        .enable_all()
        .build()?;
    if o.worker {
        rt.block_on(worker(o))
    } else {
        rt.block_on(parent(o))
    }
}

async fn parent(mut o: Opts) -> Result<()> {
    if o.sources.is_empty() {
        bail!("--sources is empty");
    }
    // The server's own connection cap (default 16,384) must not be what is measured.
    if !o
        .harness
        .server_arg
        .iter()
        .any(|a| a.starts_with("--max-connections"))
    {
        o.harness
            .server_arg
            .push(format!("--max-connections={}", o.sockets + 100));
    }
    eprintln!(
        "idle-sockets: starting postgres and walcast ({})",
        o.harness.pinning()
    );
    let load_start = harness::loadavg();
    let mut h = Harness::start(&o.harness).await?;
    let pid = h.server_pid();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_before = harness::rss_kib(pid)?;
    let slab_before = harness::slab_kib()?;

    let per = o.per_worker.max(1);
    let n_workers = o.sockets.div_ceil(per).max(2);
    let mut workers = Vec::new();
    let t_connect = Instant::now();
    let join_cpu = CpuWindow::start(&[("walcast", pid, false)]);
    for w in 0..n_workers {
        let (first, count) = share(o.sockets, w, n_workers);
        let source = o.sources[w % o.sources.len()];
        workers.push(Worker::spawn([
            "--server".to_string(),
            h.addr().to_string(),
            "--token".into(),
            h.token.clone(),
            "--first".into(),
            first.to_string(),
            "--count".into(),
            count.to_string(),
            "--source".into(),
            source.to_string(),
            "--heartbeat-secs".into(),
            o.heartbeat_secs.to_string(),
            "--read-buffer".into(),
            o.read_buffer.to_string(),
            "--connect-concurrency".into(),
            o.connect_concurrency.to_string(),
            "--threads".into(),
            o.threads.to_string(),
        ])?);
    }
    eprintln!(
        "idle-sockets: {n_workers} workers connecting {} sockets",
        o.sockets
    );
    let (mut joined, mut failed, mut subscribed) = (0u64, 0u64, 0u64);
    let mut join_errors = Vec::new();
    for w in &mut workers {
        let line = w
            .lines
            .next_line()
            .await?
            .context("worker exited before reporting its joins")?;
        let f: Vec<&str> = line.splitn(5, ' ').collect();
        if f.first() != Some(&"joined") || f.len() < 4 {
            bail!("unexpected worker line: {line}");
        }
        joined += f[1].parse::<u64>()?;
        failed += f[2].parse::<u64>()?;
        subscribed += f[3].parse::<u64>()?;
        if let Some(e) = f.get(4) {
            join_errors.push(e.to_string());
        }
    }
    let join_secs = t_connect.elapsed().as_secs_f64();
    if joined == 0 {
        bail!("no socket joined: {}", join_errors.join("; "));
    }
    let join_cpu = join_cpu.finish().first().map_or(0.0, |c| c.1);
    let t_joined = Instant::now();
    eprintln!(
        "idle-sockets: {joined} joined, {failed} failed in {join_secs:.1}s; settling {} s",
        o.settle_secs
    );
    tokio::time::sleep(Duration::from_secs(o.settle_secs)).await;
    h.check_alive()?;
    let rss_after = harness::rss_kib(pid)?;
    let slab_after = harness::slab_kib()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());

    let mut procs: Vec<(String, u32, bool)> = vec![("walcast".into(), pid, false)];
    procs.push(("postgres".into(), h.postmaster_pid()?, true));
    for (i, w) in workers.iter().enumerate() {
        if let Some(p) = w.child.id() {
            procs.push((format!("worker{i}"), p, false));
        }
    }
    let proc_refs: Vec<(&str, u32, bool)> =
        procs.iter().map(|(n, p, t)| (n.as_str(), *p, *t)).collect();
    let cpu = CpuWindow::start(&proc_refs);
    eprintln!("idle-sockets: measuring idle cpu for {} s", o.cpu_secs);
    tokio::time::sleep(Duration::from_secs(o.cpu_secs)).await;
    let cpu = cpu.finish();
    let hold_end = t_joined + Duration::from_secs(o.hold_secs);
    tokio::time::sleep_until(hold_end.into()).await;
    h.check_alive()?;
    let rss_end = harness::rss_kib(pid)?;

    let (mut alive, mut ended, mut hb_sent, mut hb_replies, mut other) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut end_reasons = Vec::new();
    for w in &mut workers {
        w.stdin.write_all(b"stop\n").await?;
        w.stdin.flush().await?;
        let line = w
            .lines
            .next_line()
            .await?
            .context("worker exited before its final report")?;
        let f: Vec<&str> = line.splitn(7, ' ').collect();
        if f.first() != Some(&"final") || f.len() < 6 {
            bail!("unexpected worker line: {line}");
        }
        alive += f[1].parse::<u64>()?;
        ended += f[2].parse::<u64>()?;
        hb_sent += f[3].parse::<u64>()?;
        hb_replies += f[4].parse::<u64>()?;
        other += f[5].parse::<u64>()?;
        if let Some(r) = f.get(6) {
            end_reasons.push(r.to_string());
        }
    }
    for mut w in workers {
        let _ = w.child.wait().await;
    }

    let server_cpu = cpu.first().map_or(0.0, |c| c.1);
    let per_socket = (rss_after as f64 - rss_before as f64) * 1024.0 / joined.max(1) as f64;
    let slab_per = (slab_after as f64 - slab_before as f64) * 1024.0 / joined.max(1) as f64;
    let kib = |k: u64| k as f64 / 1024.0;
    println!("== idle-sockets ==");
    println!(
        "load average at start / end: {load_start} / {}",
        harness::loadavg()
    );
    println!("command: {}", harness::command_line());
    println!(
        "machine: {} vCPU shared by postgres, walcast and {} client worker processes; {}; sources {:?}; extra server args {:?}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        n_workers,
        o.harness.pinning(),
        o.sources,
        o.harness.server_arg
    );
    println!(
        "sockets: {joined} joined, {failed} failed{} in {join_secs:.1} s ({:.0} connect+join/s, {} worker(s) × ≤{} concurrent), {subscribed} got \"Subscribed to PostgreSQL\"; server cpu during the joins {join_cpu:.0}% of one core; server holds {fds} fds",
        join_errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default(),
        (joined + failed) as f64 / join_secs,
        n_workers,
        o.connect_concurrency,
    );
    println!(
        "server RSS: {:.1} MiB before, {:.1} MiB after join+{} s, {:.1} MiB at end of hold → {:.0} bytes per socket (target ≤ 8 KB){}",
        kib(rss_before),
        kib(rss_after),
        o.settle_secs,
        kib(rss_end),
        per_socket,
        if per_socket <= 8000.0 { " met" } else { " MISSED" }
    );
    println!(
        "kernel slab: +{:.1} MiB → {:.0} bytes per connection (both loopback ends)",
        (slab_after as f64 - slab_before as f64) / 1024.0,
        slab_per
    );
    println!(
        "idle cpu over {} s (% of one core): {} → server {:.1}% (target ≤ 5%){}",
        o.cpu_secs,
        harness::format_cpu(&cpu),
        server_cpu,
        if server_cpu <= 5.0 { " met" } else { " MISSED" }
    );
    println!(
        "hold {} s: {alive} sockets open at the end, {ended} ended early{}; heartbeats {hb_replies} replied of {hb_sent} sent; {other} other frames",
        o.hold_secs,
        end_reasons.first().map(|e| format!(" (first: {e})")).unwrap_or_default(),
    );
    println!(
        "SUMMARY idle-sockets: {joined}/{} sockets joined and {alive} still open after {} s; server RSS {:.0} B/socket (target ≤ 8 KB: {}), kernel slab {:.0} B/connection; idle server cpu {:.1}% of one core (target ≤ 5%: {}); heartbeats {hb_replies}/{hb_sent} replied; {}. Command: {}",
        o.sockets,
        o.hold_secs,
        per_socket,
        if per_socket <= 8000.0 { "met" } else { "MISSED" },
        slab_per,
        server_cpu,
        if server_cpu <= 5.0 { "met" } else { "MISSED" },
        o.harness.pinning(),
        harness::command_line()
    );
    Ok(())
}

#[derive(Default)]
struct Counters {
    ended: AtomicU64,
    hb_sent: AtomicU64,
    hb_replies: AtomicU64,
    other: AtomicU64,
    first_end: Mutex<Option<String>>,
}

async fn worker(o: Opts) -> Result<()> {
    let server = o.server.context("--server is required with --worker")?;
    let token: Arc<str> = o.token.context("--token is required with --worker")?.into();
    let source = o.source;
    let read_buffer = o.read_buffer;
    let counters = Arc::new(Counters::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let period = Duration::from_secs(o.heartbeat_secs.max(1));
    // Each socket starts heartbeating as soon as it has joined: a socket that waited for the
    // whole connect phase in silence would hit the server's idle timeout.
    let results: Vec<Result<(bool, tokio::task::JoinHandle<()>)>> =
        futures_util::stream::iter(o.first..o.first + o.count)
            .map(|i| {
                let token = token.clone();
                let counters = counters.clone();
                let stop_rx = stop_rx.clone();
                async move {
                    let mut ws = realtime::connect(server, source, &token, read_buffer).await?;
                    let j = realtime::join(&mut ws, i, &token, Duration::from_secs(10)).await?;
                    let task = tokio::spawn(hold(i, ws, period, counters, stop_rx));
                    Ok((j.subscribed, task))
                }
            })
            .buffer_unordered(o.connect_concurrency.max(1))
            .collect()
            .await;
    let (mut joined, mut failed, mut subscribed) = (0u64, 0u64, 0u64);
    let mut first_error = None;
    let mut tasks = Vec::new();
    for r in results {
        match r {
            Ok((sub, task)) => {
                joined += 1;
                subscribed += u64::from(sub);
                tasks.push(task);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}").replace('\n', " "));
            }
        }
    }
    let mut out = tokio::io::stdout();
    out.write_all(
        format!(
            "joined {joined} {failed} {subscribed}{}\n",
            first_error.map(|e| format!(" {e}")).unwrap_or_default()
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        if line.trim() == "stop" {
            break;
        }
    }
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    let c = &counters;
    let ended = c.ended.load(Ordering::Relaxed);
    let first_end = c
        .first_end
        .lock()
        .expect("never poisoned")
        .clone()
        .map(|e| format!(" {}", e.replace('\n', " ")))
        .unwrap_or_default();
    out.write_all(
        format!(
            "final {} {ended} {} {} {}{first_end}\n",
            joined - ended,
            c.hb_sent.load(Ordering::Relaxed),
            c.hb_replies.load(Ordering::Relaxed),
            c.other.load(Ordering::Relaxed),
        )
        .as_bytes(),
    )
    .await?;
    out.flush().await?;
    Ok(())
}

async fn hold(
    i: usize,
    mut ws: Ws,
    period: Duration,
    c: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let classifier = Classifier::default();
    let phase = Duration::from_millis((i as u64 * 7919) % period.as_millis().max(1) as u64);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    let mut r = 0u64;
    let end = |c: &Counters, why: String| {
        c.ended.fetch_add(1, Ordering::Relaxed);
        c.first_end
            .lock()
            .expect("never poisoned")
            .get_or_insert(why);
    };
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => match classifier.classify(t.as_bytes()) {
                    Inbound::Reply => { c.hb_replies.fetch_add(1, Ordering::Relaxed); }
                    _ => { c.other.fetch_add(1, Ordering::Relaxed); }
                },
                Some(Ok(Message::Close(f))) => { end(&c, format!("close frame {f:?}")); return; }
                Some(Ok(_)) => {}
                Some(Err(e)) => { end(&c, format!("error {e}")); return; }
                None => { end(&c, "end of stream".into()); return; }
            },
            _ = hb.tick() => {
                r += 1;
                if let Err(e) = ws.send(Message::text(realtime::heartbeat_frame(r))).await {
                    end(&c, format!("heartbeat send failed: {e}"));
                    return;
                }
                c.hb_sent.fetch_add(1, Ordering::Relaxed);
            }
            _ = stop.changed() => return,
        }
    }
}
