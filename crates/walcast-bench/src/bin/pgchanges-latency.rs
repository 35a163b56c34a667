//! Commit-to-client latency of postgres_changes: 100 subscribers, 1,000 single-row
//! commits/s, 30 s (target p50 ≤ 2 ms, p99 ≤ 10 ms, 100% delivered).
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/pgchanges-latency [--subscribers 100 --rate 1000 --duration-secs 30]
//! ```
//!
//! What is measured: for every (subscriber, row) pair, the time from the writer's COMMIT
//! returning (an `Instant` taken in this process right after `INSERT` returns in autocommit)
//! to the subscriber task reading the `postgres_changes` frame carrying that row's id (an
//! `Instant` from the same clock). A receipt that arrives before the writer recorded the
//! commit return counts as 0 ms and is reported separately ("early"). Also reported: the
//! latency of the *last* subscriber per row, delivered vs expected pairs, the achieved write
//! rate and the writer's lag behind its open-loop schedule (so coordinated omission shows),
//! and CPU of walcast, Postgres and this process.
//!
//! How: a throwaway Postgres (`synchronous_commit=off`) and `walcast serve` as a child,
//! subscribers over vsn 2.0.0 with 4 KiB read buffers, writes from a dedicated thread over
//! several connections on a fixed schedule (row k at t0 + (k−1)/rate). Nothing is pinned
//! unless `--server-cpus`/`--client-cpus`/`--pg-cpus` are given.

use anyhow::Result;
use clap::Parser;
use walcast_bench::pgchanges::{self, CommonArgs, Plan, Targets};

#[derive(Parser)]
#[command(about = "postgres_changes commit→client latency (100 subs × 1,000 commits/s)")]
struct Opts {
    /// WebSocket subscribers, one channel and one INSERT binding each.
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Single-row commits per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Measured seconds (after the warm-up).
    #[arg(long, default_value_t = 30)]
    duration_secs: u64,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let rt = pgchanges::runtime(&o.common)?;
    rt.block_on(pgchanges::run(Plan {
        name: "pgchanges-latency",
        subscribers: o.subscribers,
        rate: o.rate,
        duration_secs: o.duration_secs,
        common: o.common,
        targets: Targets {
            p50_ms: Some(2.0),
            p99_ms: Some(10.0),
            ..Default::default()
        },
    }))?;
    Ok(())
}
