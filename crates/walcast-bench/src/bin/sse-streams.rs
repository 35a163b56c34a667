//! SSE streams: N (default 10,000) concurrent `GET /api/changes` server-sent event streams on
//! `public.bench` (INSERT), then one change fanned out to all of them, a few times.
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/sse-streams [--streams 10000 --rounds 5]
//! ```
//!
//! What is measured:
//! - server RSS per stream = (VmRSS of the server once every stream is open and
//!   `--settle-secs` passed − VmRSS before the first one) / streams open, from
//!   `/proc/<pid>/status`;
//! - fan-out per round: one INSERT (its own transaction, `synchronous_commit=on` unless told
//!   otherwise, so the walsender sends it at once); from the INSERT returning to the first
//!   and to the last of the N streams reading its `change` event, and the spread (last −
//!   first) — the time to write one event to every stream;
//! - that every stream got every round's event exactly once.
//!
//! How: one client process (N sockets fit its 20,000 fd cap), every connection from
//! `--source` (127.0.0.2: clear of the ephemeral ports of 127.0.0.1), each stream read by a
//! task that counts `event: change` lines. The server is started with join rates raised (each
//! stream counts as a join) and `--max-connections` above N.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use walcast_bench::harness::{self, Harness, HarnessArgs};

#[derive(Parser, Debug)]
#[command(about = "concurrent SSE change streams: server RSS per stream and fan-out time")]
struct Opts {
    /// Streams in total.
    #[arg(long, default_value_t = 10_000)]
    streams: usize,
    /// Changes fanned out (one per round).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Seconds between "all open" and the RSS reading.
    #[arg(long, default_value_t = 5)]
    settle_secs: u64,
    /// Source address of the client connections.
    #[arg(long, default_value = "127.0.0.2")]
    source: IpAddr,
    /// Streams opened at once.
    #[arg(long, default_value_t = 128)]
    connect_concurrency: usize,
    /// Runtime threads of the client.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[command(flatten)]
    harness: HarnessArgs,
}

/// Arrivals of the current round's event, nanoseconds since the bench started.
#[derive(Default)]
struct Arrivals {
    events: AtomicUsize,
    first_ns: AtomicU64,
    last_ns: AtomicU64,
}

fn main() -> Result<()> {
    let mut o = Opts::parse();
    if o.harness.synchronous_commit == "off" {
        // The default of the shared harness delays what the walsender sends by up to
        // wal_writer_delay; a fan-out time should not include that.
        o.harness.synchronous_commit = "on".into();
    }
    if let Some(cpus) = &o.harness.client_cpus {
        harness::pin_self(cpus)?;
    }
    let max = (o.streams + 1000).to_string();
    for a in [
        format!("--max-connections={max}"),
        "--max-joins-per-second=1000000".into(),
        "--max-joins-per-second-per-client=1000000".into(),
    ] {
        o.harness.server_arg.push(a);
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(o.threads.max(1))
        .enable_all()
        .build()?
        .block_on(run(o))
}

async fn open_stream(
    server: SocketAddr,
    source: IpAddr,
    path: &str,
) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut s = socket.connect(server).await?;
    s.set_nodelay(true)?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await? == 0 {
            bail!("closed before the headers");
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    if !text.starts_with("HTTP/1.1 200") {
        bail!("refused: {}", text.lines().next().unwrap_or(""));
    }
    Ok(s)
}

/// Read a stream until it ends, counting `event: change` lines into `arrivals`.
async fn read_stream(mut s: tokio::net::TcpStream, arrivals: Arc<Arrivals>, epoch: Instant) {
    const NEEDLE: &[u8] = b"event: change";
    let mut buf = vec![0u8; 2048];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        carry.extend_from_slice(&buf[..n]);
        let found = memchr::memmem::find_iter(&carry, NEEDLE).count();
        if found > 0 {
            let now = epoch.elapsed().as_nanos() as u64;
            let _ = arrivals
                .first_ns
                .compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
            arrivals.last_ns.fetch_max(now, Ordering::AcqRel);
            arrivals.events.fetch_add(found, Ordering::AcqRel);
        }
        // Keep only a tail that may hold the start of a needle split across reads.
        let keep = carry.len().min(NEEDLE.len() - 1);
        let cut = carry.len() - keep;
        if found > 0 {
            carry.clear();
        } else {
            carry.drain(..cut);
        }
    }
}

async fn run(o: Opts) -> Result<()> {
    let epoch = Instant::now();
    let h = Harness::start(&o.harness).await?;
    let server = h.addr();
    let pid = h.server_pid();
    let path = format!(
        "/api/changes?schema=public&table=bench&event=INSERT&apikey={}",
        h.token
    );
    let rss_before = harness::rss_kib(pid)?;
    let arrivals = Arc::new(Arrivals::default());
    let opened_at = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(o.connect_concurrency.max(1)));
    let mut opens = Vec::with_capacity(o.streams);
    for _ in 0..o.streams {
        let permit = sem.clone().acquire_owned().await?;
        let path = path.clone();
        let source = o.source;
        let arrivals = arrivals.clone();
        opens.push(tokio::spawn(async move {
            let s = open_stream(server, source, &path).await;
            drop(permit);
            let s = s?;
            tokio::spawn(read_stream(s, arrivals, epoch));
            anyhow::Ok(())
        }));
    }
    let mut open = 0usize;
    let mut first_error = None;
    for t in opens {
        match t.await? {
            Ok(()) => open += 1,
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let open_secs = opened_at.elapsed().as_secs_f64();
    if open < o.streams {
        bail!(
            "only {open} of {} streams opened; first error: {:?}; server log:\n{}",
            o.streams,
            first_error,
            h.log_tail()
        );
    }
    tokio::time::sleep(Duration::from_secs(o.settle_secs)).await;
    let rss_after = harness::rss_kib(pid)?;
    let per_stream_kib = (rss_after.saturating_sub(rss_before)) as f64 / open as f64;
    let sql = h.db.connect().await.context("connecting to write")?;
    let mut rows = Vec::new();
    for round in 0..o.rounds {
        arrivals.events.store(0, Ordering::Release);
        arrivals.first_ns.store(0, Ordering::Release);
        arrivals.last_ns.store(0, Ordering::Release);
        let id = round as i64 + 1;
        sql.execute(
            "INSERT INTO public.bench (id, n, body) VALUES ($1, $1, 'fan-out')",
            &[&id],
        )
        .await?;
        let committed = epoch.elapsed().as_nanos() as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        while arrivals.events.load(Ordering::Acquire) < open {
            if Instant::now() > deadline {
                bail!(
                    "round {round}: only {} of {open} streams got the change within 60 s",
                    arrivals.events.load(Ordering::Acquire)
                );
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Anything more would be a repeat.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let events = arrivals.events.load(Ordering::Acquire);
        if events != open {
            bail!("round {round}: {events} events for {open} streams (repeats)");
        }
        let first = arrivals.first_ns.load(Ordering::Acquire);
        let last = arrivals.last_ns.load(Ordering::Acquire);
        let ms = |ns: u64| ns as f64 / 1e6;
        rows.push((
            ms(first.saturating_sub(committed)),
            ms(last.saturating_sub(committed)),
            ms(last.saturating_sub(first)),
        ));
    }
    println!("sse-streams: {}", harness::command_line());
    println!(
        "machine: {} vCPU shared by postgres, walcast and the client; {}; {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        o.harness.pinning(),
        o.harness.postgres_settings()
    );
    println!(
        "streams open: {open} in {open_secs:.1} s; server RSS {rss_before} KiB -> {rss_after} KiB = {per_stream_kib:.1} KiB per stream"
    );
    println!("round  insert->first ms  insert->last ms  spread (last-first) ms");
    for (i, (a, b, c)) in rows.iter().enumerate() {
        println!("{:>5}  {a:>16.1}  {b:>15.1}  {c:>22.1}", i + 1);
    }
    let mut lasts: Vec<f64> = rows.iter().map(|r| r.1).collect();
    lasts.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (lasts.first(), lasts.last()) {
        println!(
            "fan-out of one change to {open} streams (insert->last): min {min:.1} ms, median {:.1} ms, max {max:.1} ms; every stream got every change exactly once",
            lasts[lasts.len() / 2]
        );
    }
    Ok(())
}
