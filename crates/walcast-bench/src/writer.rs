//! Open-loop single-row commit generator.
//!
//! ```text
//!  row id k (1-based) is scheduled at t0 + (k-1)/rate and owned by connection (k-1) % W
//!  connection j: for each of its ids: sleep until scheduled (never if late)
//!                 → INSERT … VALUES (k, …)   (autocommit: one commit per row)
//!                 → CommitLog[k] = Instant of the COMMIT returning
//! ```
//!
//! Invariants:
//! - The schedule is fixed up front: a slow commit never moves later ones back, it only makes
//!   them start late. That lateness (start − scheduled) is the writer lag and is reported, so
//!   coordinated omission is visible rather than hidden.
//! - The writers run on their own OS thread and current-thread runtime: the commit-return
//!   instant is not delayed by subscriber tasks queued on the shared workers.
//! - [`CommitLog`] holds nanoseconds since a shared base `Instant`, 0 = not committed yet,
//!   so subscribers on other threads compare on one clock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// Commit-return times by row id, on one clock.
pub struct CommitLog {
    base: Instant,
    done_ns: Vec<AtomicU64>,
}

impl CommitLog {
    /// Room for ids `1..=rows`.
    pub fn new(base: Instant, rows: u64) -> CommitLog {
        CommitLog {
            base,
            done_ns: (0..rows).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The shared clock origin.
    pub fn base(&self) -> Instant {
        self.base
    }

    /// Nanoseconds since the base.
    pub fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Commit-return time of row `id` (ns since base), 0 when it has not returned (yet).
    pub fn committed_at(&self, id: u64) -> u64 {
        id.checked_sub(1)
            .and_then(|i| self.done_ns.get(i as usize))
            .map_or(0, |a| a.load(Ordering::Acquire))
    }

    fn record(&self, id: u64, at: Instant) {
        let ns = (at.saturating_duration_since(self.base).as_nanos() as u64).max(1);
        self.done_ns[(id - 1) as usize].store(ns, Ordering::Release);
    }

    /// Number of rows.
    pub fn rows(&self) -> u64 {
        self.done_ns.len() as u64
    }
}

/// What to write.
#[derive(Debug, Clone)]
pub struct WritePlan {
    pub url: String,
    /// Commits per second.
    pub rate: f64,
    /// Parallel connections.
    pub connections: usize,
    /// Bytes of the `body` text column.
    pub body_bytes: usize,
}

/// What the writers did.
#[derive(Debug)]
pub struct WriteReport {
    pub committed: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// start − scheduled, µs.
    pub lag_us: Histogram<u64>,
    /// First scheduled time to last commit return.
    pub elapsed: Duration,
    /// Instant the schedule started.
    pub t0: Instant,
}

impl WriteReport {
    /// Achieved commits per second.
    pub fn rate(&self) -> f64 {
        self.committed as f64 / self.elapsed.as_secs_f64()
    }
}

/// Run the plan on a dedicated thread; resolves when every row was attempted.
pub fn spawn(
    plan: WritePlan,
    log: Arc<CommitLog>,
) -> tokio::sync::oneshot::Receiver<Result<WriteReport>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-writer".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = match rt {
                Ok(rt) => rt.block_on(write_all(plan, log)),
                Err(e) => Err(e.into()),
            };
            let _ = tx.send(result);
        })
        .expect("spawning the writer thread (process out of threads?)");
    rx
}

async fn write_all(plan: WritePlan, log: Arc<CommitLog>) -> Result<WriteReport> {
    let mut clients = Vec::new();
    for _ in 0..plan.connections {
        let c = walcast_testkit::connect(&plan.url).await?;
        let stmt = c
            .prepare("INSERT INTO public.bench (id, n, body) VALUES ($1, $2, $3)")
            .await
            .context("preparing the insert")?;
        clients.push((c, stmt));
    }
    let body: String = "x".repeat(plan.body_bytes);
    let t0 = Instant::now() + Duration::from_millis(50);
    let interval_ns = 1e9 / plan.rate;
    let rows = log.rows();
    let w = plan.connections as u64;
    let mut tasks = Vec::new();
    for (j, (client, stmt)) in clients.into_iter().enumerate() {
        let log = log.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut lag = Histogram::<u64>::new_with_max(3_600_000_000, 3)
                .expect("static histogram bounds are valid");
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            let mut last_return = t0;
            let mut k = j as u64 + 1;
            while k <= rows {
                let scheduled = t0 + Duration::from_nanos(((k - 1) as f64 * interval_ns) as u64);
                tokio::time::sleep_until(scheduled.into()).await;
                let start = Instant::now();
                lag.saturating_record(start.saturating_duration_since(scheduled).as_micros() as u64);
                let n = k as i64;
                match client.execute(&stmt, &[&n, &n, &body]).await {
                    Ok(_) => {
                        let at = Instant::now();
                        log.record(k, at);
                        last_return = at;
                        ok += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                k += w;
            }
            (lag, ok, errors, first_error, last_return)
        }));
    }
    let mut report = WriteReport {
        committed: 0,
        errors: 0,
        first_error: None,
        lag_us: Histogram::new_with_max(3_600_000_000, 3).expect("static histogram bounds"),
        elapsed: Duration::ZERO,
        t0,
    };
    let mut last = t0;
    for t in tasks {
        let (lag, ok, errors, first_error, last_return) = t.await?;
        report.lag_us.add(lag)?;
        report.committed += ok;
        report.errors += errors;
        if report.first_error.is_none() {
            report.first_error = first_error;
        }
        last = last.max(last_return);
    }
    report.elapsed = last.saturating_duration_since(t0);
    Ok(report)
}
