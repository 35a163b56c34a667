//! The postgres_changes run shared by `pgchanges-latency` and `pgchanges-throughput`:
//! S subscribers on one INSERT binding each, an open-loop writer at R commits/s, and
//! commit→receipt latency on one clock.
//!
//! ```text
//!  writer thread ── INSERT id=k, COMMIT returns ──▶ CommitLog[k] = t_commit
//!        │                                              │ (same process, same Instant base)
//!  postgres ─▶ walcast ─▶ S sockets ─▶ subscriber task: t_recv; latency = t_recv − CommitLog[k]
//!                                         (t_recv < t_commit, or not yet logged → 0, "early")
//! ```
//!
//! Invariants:
//! - Every (subscriber, row) pair is accounted for: delivered once, duplicated, or missing.
//!   Row ids are dense `1..=rows`, so a per-subscriber bitset detects both loss and duplicates.
//! - Warm-up rows (the first `warmup × rate` ids) count for delivery but not for latency.
//! - Subscribers send a heartbeat every 25 s (spread over the period), as the official
//!   clients do, so the server's idle timeout never fires during a run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::cost::Cost;
use crate::harness::{self, CpuWindow, Harness, HarnessArgs};
use crate::realtime::{self, Classifier, Inbound, Ws};
use crate::writer::{self, CommitLog, WritePlan};

/// Options shared by both postgres_changes benchmarks.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub harness: HarnessArgs,
    /// Parallel writer connections.
    #[arg(long, default_value_t = 4)]
    pub writers: usize,
    /// Seconds written before the measured window (delivered, not in the latency figures).
    #[arg(long, default_value_t = 2)]
    pub warmup_secs: u64,
    /// Seconds to wait after the last commit for outstanding deliveries.
    #[arg(long, default_value_t = 10)]
    pub drain_secs: u64,
    /// WebSocket read buffer per client, bytes.
    #[arg(long, default_value_t = 4096)]
    pub read_buffer: usize,
    /// Bytes of the `body` text column of each row.
    #[arg(long, default_value_t = 64)]
    pub body_bytes: usize,
    /// Load-generator runtime worker threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Connections opened at once while setting up subscribers.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Diagnostic: re-arm TCP_QUICKACK on each client socket after every frame, so the
    /// client never delays its ACKs. If latency collapses with it, the server's writes are
    /// being held by Nagle's algorithm waiting for delayed ACKs (no TCP_NODELAY).
    #[arg(long)]
    pub client_quickack: bool,
}

/// Pass/fail thresholds printed next to the figures.
#[derive(Debug, Clone, Copy, Default)]
pub struct Targets {
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub min_msgs_per_sec: Option<f64>,
}

/// One run.
#[derive(Debug, Clone)]
pub struct Plan {
    pub name: &'static str,
    pub subscribers: usize,
    pub rate: f64,
    pub duration_secs: u64,
    pub common: CommonArgs,
    pub targets: Targets,
}

/// Build the client runtime after pinning (threads inherit the affinity).
pub fn runtime(common: &CommonArgs) -> Result<tokio::runtime::Runtime> {
    if let Some(cpus) = &common.harness.client_cpus {
        harness::pin_self(cpus)?;
    }
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(common.threads.max(1))
        .enable_all()
        .build()?)
}

struct Shared {
    quickack: bool,
    log: Arc<CommitLog>,
    measured_from: u64,
    delivered: AtomicU64,
    /// Deliveries counted per node (subscriber i is on node i mod N).
    per_node: Vec<AtomicU64>,
    last_recv_ns: Vec<AtomicU64>,
}

#[derive(Default)]
struct SubStats {
    hist: Option<Histogram<u64>>,
    received: u64,
    dups: u64,
    out_of_range: u64,
    unparsed: u64,
    early: u64,
    heartbeat_replies: u64,
    other: u64,
    other_sample: Option<String>,
    ended: Option<String>,
}

fn latency_hist() -> Histogram<u64> {
    Histogram::new_with_max(3_600_000_000_000, 3).expect("static histogram bounds are valid")
}

/// Run the benchmark and print the report; returns the server CPU per delivery over the
/// measured window (after the warm-up). With `common.harness.nodes > 1` the subscribers are
/// spread round-robin over the nodes of a cluster.
pub async fn run(plan: Plan) -> Result<Cost> {
    let common = &plan.common;
    eprintln!(
        "{}: starting postgres and walcast ({})",
        plan.name,
        common.harness.pinning()
    );
    let load_start = harness::loadavg();
    // Every subscriber joins from 127.0.0.1: one "client" to the per-client join limit.
    let mut args = common.harness.clone();
    args.server_default("--max-joins-per-second-per-client", 100_000);
    args.server_default("--max-joins-per-second", 100_000);
    let mut h = Harness::start(&args).await?;
    let rows = ((common.warmup_secs + plan.duration_secs) as f64 * plan.rate).round() as u64;
    let measured_from = (common.warmup_secs as f64 * plan.rate).round() as u64 + 1;
    let log = Arc::new(CommitLog::new(Instant::now(), rows));
    let shared = Arc::new(Shared {
        quickack: common.client_quickack,
        log: log.clone(),
        measured_from,
        delivered: AtomicU64::new(0),
        per_node: (0..h.nodes.len()).map(|_| AtomicU64::new(0)).collect(),
        last_recv_ns: (0..rows).map(|_| AtomicU64::new(0)).collect(),
    });

    eprintln!("{}: connecting {} subscribers", plan.name, plan.subscribers);
    let t_connect = Instant::now();
    let addrs = h.addrs();
    let token: Arc<str> = h.token.clone().into();
    let read_buffer = common.read_buffer;
    let joined: Vec<Result<(usize, Ws, realtime::Joined)>> =
        futures_util::stream::iter(0..plan.subscribers)
            .map(|i| {
                let token = token.clone();
                let addr = addrs[i % addrs.len()];
                async move {
                    let mut ws = realtime::connect(addr, None, &token, read_buffer).await?;
                    let j = realtime::join(&mut ws, i, &token, Duration::from_secs(10)).await?;
                    Ok((i, ws, j))
                }
            })
            .buffer_unordered(common.connect_concurrency.max(1))
            .collect()
            .await;
    let mut sockets = Vec::new();
    let mut subscribed = 0;
    for j in joined {
        let (i, ws, joined) = j.with_context(|| format!("server log:\n{}", h.log_tail()))?;
        subscribed += usize::from(joined.subscribed);
        sockets.push((i, ws));
    }
    eprintln!(
        "{}: {} joined in {:.2}s ({} got \"Subscribed to PostgreSQL\")",
        plan.name,
        sockets.len(),
        t_connect.elapsed().as_secs_f64(),
        subscribed
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    for (i, ws) in sockets {
        tasks.push(tokio::spawn(subscriber(
            i,
            i % addrs.len(),
            ws,
            shared.clone(),
            rows,
            stop_rx.clone(),
        )));
    }
    let samples = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
    let sampler = tokio::spawn(sample_deliveries(
        shared.clone(),
        samples.clone(),
        stop_rx.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let pg_pid = h.postmaster_pid()?;
    let mut procs: Vec<(String, u32, bool)> = h
        .server_procs()
        .into_iter()
        .map(|(n, p)| (n, p, false))
        .collect();
    procs.push(("postgres".into(), pg_pid, true));
    procs.push(("bench".into(), std::process::id(), false));
    let proc_refs: Vec<(&str, u32, bool)> =
        procs.iter().map(|(n, p, t)| (n.as_str(), *p, *t)).collect();
    // Idle cost: every subscriber joined, nothing written yet.
    let idle_cpu_rate = crate::cost::idle_rate(&proc_refs, 5.0).await;
    let cpu = CpuWindow::start(&proc_refs);
    eprintln!(
        "{}: writing {} rows at {}/s over {} connections ({} s warm-up + {} s measured) to {} node(s)",
        plan.name,
        rows,
        plan.rate,
        common.writers,
        common.warmup_secs,
        plan.duration_secs,
        h.nodes.len()
    );
    let writer = writer::spawn(
        WritePlan {
            url: h.db.url().to_string(),
            rate: plan.rate,
            connections: common.writers,
            body_bytes: common.body_bytes,
        },
        log.clone(),
    );
    // The cost window starts after the warm-up (subscriptions, caches and Redis streams
    // settled) and ends with the last commit.
    tokio::time::sleep(Duration::from_secs(common.warmup_secs)).await;
    let per_node = |s: &Shared| -> Vec<u64> {
        s.per_node
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .collect()
    };
    let out_before = harness::metric_sum(&addrs, "walcast_bytes_out_total");
    let net_before = h.redis_net_bytes();
    let cost_cpu = CpuWindow::start(&proc_refs);
    let cost_before = per_node(&shared);
    let report = writer.await.context("writer thread vanished")??;
    let (cost_secs, cost_cpu) = cost_cpu.finish_secs();
    let cost_after = per_node(&shared);
    let net_after = h.redis_net_bytes();
    let out_after = harness::metric_sum(&addrs, "walcast_bytes_out_total");
    let cpu = cpu.finish();

    let expected = rows * plan.subscribers as u64;
    let drain_deadline = Instant::now() + Duration::from_secs(common.drain_secs);
    while shared.delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_after = Instant::now();
    let server_alive = h.check_alive();
    stop_tx.send_replace(true);
    let mut total = SubStats {
        hist: Some(latency_hist()),
        ..Default::default()
    };
    let mut incomplete = 0usize;
    let mut ended = Vec::new();
    for t in tasks {
        let s = t.await?;
        if s.received < rows {
            incomplete += 1;
        }
        if let Some(hh) = &s.hist {
            total
                .hist
                .as_mut()
                .expect("total histogram is always set")
                .add(hh)?;
        }
        total.received += s.received;
        total.dups += s.dups;
        total.out_of_range += s.out_of_range;
        total.unparsed += s.unparsed;
        total.early += s.early;
        total.heartbeat_replies += s.heartbeat_replies;
        total.other += s.other;
        if total.other_sample.is_none() {
            total.other_sample = s.other_sample;
        }
        if let Some(e) = s.ended {
            ended.push(e);
        }
    }
    let _ = sampler.await;
    let hist = total.hist.take().expect("total histogram is always set");

    // Last receiver of each measured row.
    let mut last_hist = latency_hist();
    let mut rows_fully_committed = 0u64;
    for id in measured_from..=rows {
        let c = log.committed_at(id);
        let r = shared.last_recv_ns[(id - 1) as usize].load(Ordering::Relaxed);
        if c > 0 && r > 0 {
            rows_fully_committed += 1;
            last_hist.saturating_record(r.saturating_sub(c));
        }
    }

    // Per-second delivery rate inside the measured window.
    let t0_ns = report.t0.saturating_duration_since(log.base()).as_nanos() as u64;
    let win_start = t0_ns + common.warmup_secs * 1_000_000_000;
    let win_end = win_start + plan.duration_secs * 1_000_000_000;
    let samples = samples.lock().expect("sampler does not panic").clone();
    let mut per_sec: Vec<f64> = samples
        .windows(2)
        .filter(|w| w[0].0 >= win_start && w[1].0 <= win_end)
        .map(|w| (w[1].1 - w[0].1) as f64 / ((w[1].0 - w[0].0) as f64 / 1e9))
        .collect();
    let in_window = |t: u64| -> u64 {
        samples
            .iter()
            .take_while(|s| s.0 <= t)
            .last()
            .map_or(0, |s| s.1)
    };
    let window_rate = samples
        .iter()
        .filter(|s| s.0 >= win_start && s.0 <= win_end)
        .map(|s| s.0)
        .min()
        .zip(
            samples
                .iter()
                .filter(|s| s.0 >= win_start && s.0 <= win_end)
                .map(|s| s.0)
                .max(),
        )
        .filter(|(a, b)| b > a)
        .map(|(a, b)| (in_window(b) - in_window(a)) as f64 / ((b - a) as f64 / 1e9))
        .unwrap_or(0.0);
    per_sec.sort_by(|a, b| a.total_cmp(b));

    let pcts = |h: &Histogram<u64>| {
        [0.5, 0.9, 0.99, 0.999]
            .iter()
            .map(|q| h.value_at_quantile(*q) as f64 / 1e6)
            .chain(std::iter::once(h.max() as f64 / 1e6))
            .collect::<Vec<f64>>()
    };
    let l = pcts(&hist);
    let last = pcts(&last_hist);
    let p95 = hist.value_at_quantile(0.95) as f64 / 1e6;
    let delivered_pct = total.received as f64 / expected as f64 * 100.0;
    let lag = &report.lag_us;
    let server_warnings = count_log_lines(&h.log_path);
    let addr = h.addr();
    let server_metrics = tokio::task::spawn_blocking(move || {
        harness::metric_lines(
            addr,
            &[
                "walcast_commit_to_send_seconds",
                "walcast_slow_client_disconnects_total",
                "walcast_deliveries_dropped_total",
                "walcast_changes_decoded_total",
                "walcast_frames_out_total",
            ],
        )
    })
    .await?;

    println!("== {} ==", plan.name);
    println!(
        "load average at start / end: {} / {}",
        load_start,
        harness::loadavg()
    );
    println!("command: {}", harness::command_line());
    println!(
        "machine: {} vCPU shared by postgres, walcast and the load generator; {}; postgres {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        common.harness.pinning(),
        common.harness.postgres_settings()
    );
    println!(
        "plan: {} subscribers x {} commits/s, {} s measured after {} s warm-up, {} writer connections, body {} B, client read buffer {} B, {} client threads",
        plan.subscribers,
        plan.rate,
        plan.duration_secs,
        common.warmup_secs,
        common.writers,
        common.body_bytes,
        common.read_buffer,
        common.threads
    );
    println!(
        "writes: {} committed, {} errors{}, achieved {:.1} commits/s; writer lag (start − scheduled) p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.committed,
        report.errors,
        report
            .first_error
            .as_ref()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        report.rate(),
        lag.value_at_quantile(0.5) as f64 / 1e3,
        lag.value_at_quantile(0.99) as f64 / 1e3,
        lag.max() as f64 / 1e3
    );
    println!(
        "delivery: {} of {} expected ({:.4}%), {} duplicates, {} unknown ids, {} unparsed, {} subscribers incomplete, {} sockets ended early{}",
        total.received,
        expected,
        delivered_pct,
        total.dups,
        total.out_of_range,
        total.unparsed,
        incomplete,
        ended.len(),
        ended
            .first()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default()
    );
    println!(
        "throughput: {:.0} delivered msgs/s over the measured window; per second min {:.0} / median {:.0} / max {:.0}; drain finished {:.2} s after the last commit",
        window_rate,
        per_sec.first().copied().unwrap_or(0.0),
        per_sec.get(per_sec.len() / 2).copied().unwrap_or(0.0),
        per_sec.last().copied().unwrap_or(0.0),
        drained_after
            .saturating_duration_since(report.t0 + report.elapsed)
            .as_secs_f64()
    );
    println!(
        "latency commit→receipt, all (subscriber,row) pairs [{} samples]: p50 {:.3} ms, p90 {:.3} ms, p95 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms; {} receipts before the COMMIT returned (counted as 0)",
        hist.len(),
        l[0], l[1], p95, l[2], l[3], l[4],
        total.early
    );
    println!(
        "latency commit→last subscriber, per row [{} rows]: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
        rows_fully_committed, last[0], last[1], last[2], last[3], last[4]
    );
    println!(
        "cpu during writes (% of one core): {}",
        harness::format_cpu(&cpu)
    );
    println!(
        "other frames: {} heartbeat replies, {} other{}; server {} (log {}: {} warn/error/slow-client lines)",
        total.heartbeat_replies,
        total.other,
        total
            .other_sample
            .as_ref()
            .map(|s| format!(" (first: {s})"))
            .unwrap_or_default(),
        match &server_alive {
            Ok(()) => "alive".to_string(),
            Err(e) => format!("DIED: {e}"),
        },
        h.log_path.display(),
        server_warnings
    );

    println!("server metrics (node 0): {}", server_metrics.join(" | "));

    let mut verdicts = Vec::new();
    let mut check = |name: &str, ok: bool| {
        verdicts.push(format!("{name} {}", if ok { "met" } else { "MISSED" }))
    };
    check(
        "delivery 100%",
        total.received == expected && total.dups == 0,
    );
    if let Some(t) = plan.targets.p50_ms {
        check(&format!("p50 ≤ {t} ms"), l[0] <= t);
    }
    if let Some(t) = plan.targets.p95_ms {
        check(&format!("p95 ≤ {t} ms"), p95 <= t);
    }
    if let Some(t) = plan.targets.p99_ms {
        check(&format!("p99 ≤ {t} ms"), l[2] <= t);
    }
    if let Some(t) = plan.targets.min_msgs_per_sec {
        // Sustained = the measured-window rate keeps up with the offered load (the writer's
        // achieved rate × subscribers, within 2%) and no backlog is left when writes stop.
        let offered = report.rate() * plan.subscribers as f64;
        let drain = drained_after
            .saturating_duration_since(report.t0 + report.elapsed)
            .as_secs_f64();
        check(
            &format!(
                "≥ {t:.0} msgs/s sustained (offered {offered:.0}/s, kept up within 2% and drained ≤ 1 s)"
            ),
            offered >= t * 0.99 && window_rate >= offered * 0.98 && drain <= 1.0,
        );
    }
    println!("targets: {}", verdicts.join("; "));
    println!(
        "SUMMARY {}: {} subs x {:.0} commits/s for {} s ({}; {}): delivered {}/{} ({:.4}%), {:.0} msgs/s; commit→receipt p50 {:.2} / p90 {:.2} / p99 {:.2} / p99.9 {:.2} / max {:.2} ms ({} early); last-receiver p99 {:.2} ms; writes {:.1}/s, writer lag p99 {:.2} ms; cpu {}; targets: {}. Command: {}",
        plan.name,
        plan.subscribers,
        plan.rate,
        plan.duration_secs,
        common.harness.pinning(),
        common.harness.postgres_settings(),
        total.received,
        expected,
        delivered_pct,
        window_rate,
        l[0], l[1], l[2], l[3], l[4],
        total.early,
        last[2],
        report.rate(),
        lag.value_at_quantile(0.99) as f64 / 1e3,
        harness::format_cpu(&cpu),
        verdicts.join("; "),
        harness::command_line()
    );
    h.check_alive().ok();
    Ok(Cost {
        nodes: h.nodes.len(),
        round: 0,
        wall_secs: cost_secs,
        deliveries: cost_after
            .iter()
            .zip(&cost_before)
            .map(|(a, b)| a - b)
            .collect(),
        cpu: cost_cpu,
        complete: total.received == expected && total.dups == 0,
        load: load_start,
        redis_net: net_before
            .zip(net_after)
            .map(|((i0, o0), (i1, o1))| (i1 - i0, o1 - o0)),
        idle_cpu_rate: Some(idle_cpu_rate),
        client_bytes_out: Some((out_after - out_before).max(0.0) as u64),
    })
}

fn count_log_lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("slow client"))
        .count()
}

async fn sample_deliveries(
    shared: Arc<Shared>,
    out: Arc<Mutex<Vec<(u64, u64)>>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(1000));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let s = (shared.log.now_ns(), shared.delivered.load(Ordering::Relaxed));
                out.lock().expect("sampler lock is never poisoned").push(s);
            }
            _ = stop.changed() => return,
        }
    }
}

async fn subscriber(
    i: usize,
    node: usize,
    mut ws: Ws,
    shared: Arc<Shared>,
    rows: u64,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let classifier = Classifier::default();
    let mut st = SubStats {
        hist: Some(latency_hist()),
        ..Default::default()
    };
    let mut hist = st.hist.take().expect("just set");
    let mut seen = vec![0u64; (rows as usize).div_ceil(64)];
    let period = Duration::from_secs(25);
    // Spread heartbeats over the period so they do not arrive as one burst.
    let phase = Duration::from_millis((i as u64 * 7919) % 25_000);
    let mut hb = tokio::time::interval_at(tokio::time::Instant::now() + phase, period);
    let mut hb_ref = 0u64;
    loop {
        tokio::select! {
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if shared.quickack {
                        let _ = ws.get_ref().set_quickack(true);
                    }
                    let bytes = t.as_bytes();
                    match classifier.classify(bytes) {
                        Inbound::Change(Some(id)) => {
                            let recv = shared.log.now_ns();
                            if id == 0 || id > rows {
                                st.out_of_range += 1;
                                continue;
                            }
                            let (w, b) = (((id - 1) / 64) as usize, (id - 1) % 64);
                            if seen[w] & (1 << b) != 0 {
                                st.dups += 1;
                                continue;
                            }
                            seen[w] |= 1 << b;
                            st.received += 1;
                            shared.delivered.fetch_add(1, Ordering::Relaxed);
                            shared.per_node[node].fetch_add(1, Ordering::Relaxed);
                            shared.last_recv_ns[(id - 1) as usize].fetch_max(recv, Ordering::Relaxed);
                            if id >= shared.measured_from {
                                let c = shared.log.committed_at(id);
                                if c == 0 || c > recv {
                                    st.early += 1;
                                    hist.saturating_record(0);
                                } else {
                                    hist.saturating_record(recv - c);
                                }
                            }
                        }
                        Inbound::Change(None) => st.unparsed += 1,
                        Inbound::Reply => st.heartbeat_replies += 1,
                        Inbound::Other => {
                            st.other += 1;
                            if st.other_sample.is_none() {
                                st.other_sample = Some(t.as_str().chars().take(300).collect());
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(c))) => {
                    st.ended = Some(format!("close frame {c:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    st.ended = Some(format!("error {e}"));
                    break;
                }
                None => {
                    st.ended = Some("end of stream".into());
                    break;
                }
            },
            _ = hb.tick() => {
                hb_ref += 1;
                if let Err(e) = ws.send(Message::text(realtime::heartbeat_frame(hb_ref))).await {
                    st.ended = Some(format!("heartbeat send failed: {e}"));
                    break;
                }
            }
            _ = stop.changed() => break,
        }
    }
    st.hist = Some(hist);
    st
}
