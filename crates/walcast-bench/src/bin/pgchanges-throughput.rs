//! Sustained postgres_changes fan-out: 500 subscribers × 500 single-row commits/s =
//! 250,000 delivered messages/s for 30 s, without loss (anchor target: p95 ≤ 50 ms).
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/pgchanges-throughput [--subscribers 500 --rate 500 --duration-secs 30]
//! ```
//!
//! What is measured: delivered messages per second inside the measured window (overall and
//! per one-second sample: min / median / max), delivered vs expected (subscriber, row) pairs,
//! duplicates, sockets the server closed, and the same commit→receipt latency percentiles as
//! `pgchanges-latency` (one clock: the writer's commit-return `Instant` vs the subscriber's
//! receipt `Instant`, early receipts as 0 and counted).
//!
//! How: the same harness and open-loop writer as `pgchanges-latency`; the load generator
//! classifies frames with byte searches (no JSON tree per message) on a two-thread runtime.
//! On this 2-vCPU box the generator, Postgres and walcast share the cores, so the figure is a
//! whole-box figure; pin with `--server-cpus`/`--client-cpus` to separate them.

use anyhow::Result;
use clap::Parser;
use walcast_bench::pgchanges::{self, CommonArgs, Plan, Targets};

#[derive(Parser)]
#[command(about = "postgres_changes sustained fan-out (500 subs × 500 commits/s)")]
struct Opts {
    /// WebSocket subscribers, one channel and one INSERT binding each.
    #[arg(long, default_value_t = 500)]
    subscribers: usize,
    /// Single-row commits per second.
    #[arg(long, default_value_t = 500.0)]
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
    let target = o.subscribers as f64 * o.rate;
    rt.block_on(pgchanges::run(Plan {
        name: "pgchanges-throughput",
        subscribers: o.subscribers,
        rate: o.rate,
        duration_secs: o.duration_secs,
        common: o.common,
        targets: Targets {
            p95_ms: Some(50.0),
            min_msgs_per_sec: Some(target),
            ..Default::default()
        },
    }))
}
