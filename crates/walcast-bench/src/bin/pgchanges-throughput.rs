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
//! Cluster cost (issue #13): `--nodes 1,3 --rounds 2` runs the same load against one node and
//! against three nodes on one Redis (subscribers round-robin over the nodes), back to back,
//! twice, and prints server CPU per delivery (nodes + redis-server) and the cluster's ratio
//! to the one-node run of the same round (target: at most +25 %):
//!
//! ```text
//! target/release/pgchanges-throughput --subscribers 1500 --rate 100 --nodes 1,3 --rounds 2
//! ```
//!
//! How: the same harness and open-loop writer as `pgchanges-latency`; the load generator
//! classifies frames with byte searches (no JSON tree per message) on a two-thread runtime.
//! On this 2-vCPU box the generator, Postgres and walcast share the cores, so the figure is a
//! whole-box figure; pin with `--server-cpus`/`--client-cpus` to separate them.

use anyhow::Result;
use clap::Parser;
use walcast_bench::cost;
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
    /// walcast processes per run; a list runs each in turn (e.g. `1,3`: one node, then a
    /// three-node cluster on one Redis) and compares their server CPU per delivery.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    nodes: Vec<usize>,
    /// Times the whole `--nodes` list is run, back to back.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    #[command(flatten)]
    common: CommonArgs,
}

fn main() -> Result<()> {
    let o = Opts::parse();
    let rt = pgchanges::runtime(&o.common)?;
    let target = o.subscribers as f64 * o.rate;
    let mut costs = Vec::new();
    for round in 1..=o.rounds.max(1) {
        for &nodes in &o.nodes {
            let mut common = o.common.clone();
            common.harness.nodes = nodes;
            let mut c = rt.block_on(pgchanges::run(Plan {
                name: "pgchanges-throughput",
                subscribers: o.subscribers,
                rate: o.rate,
                duration_secs: o.duration_secs,
                common,
                targets: Targets {
                    p95_ms: Some(50.0),
                    min_msgs_per_sec: Some(target),
                    ..Default::default()
                },
            }))?;
            c.round = round;
            costs.push(c);
        }
    }
    if costs.len() > 1 || o.nodes.iter().any(|n| *n > 1) {
        cost::print_comparison("pgchanges-throughput", &costs, 0.25);
    }
    Ok(())
}
