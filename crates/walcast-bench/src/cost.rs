//! Cost per delivery: the CPU seconds the server side spent (every walcast node, and the
//! redis-server in cluster mode) against the deliveries the clients counted over the same
//! window, so that one node and a cluster can be compared on one 2-vCPU box where a cluster
//! cannot deliver more, only cost more.
//!
//! ```text
//!  t_a ─ CpuWindow::start (utime+stime of node0..nodeN-1, redis)   deliveries per node: d_a
//!   │        load runs; clients count each delivery against the node they are on
//!  t_b ─ CpuWindow::finish_secs                                    deliveries per node: d_b
//!
//!  deliveries per server CPU-second = Σ(d_b − d_a) / Σ CPU seconds (nodes + redis)
//!  per node:                         (d_b − d_a)[i] / CPU seconds of node i
//!  cluster overhead                  = (CPU/delivery of N nodes) / (CPU/delivery of 1 node) − 1
//!
//!  before the load, with every socket joined: an idle window → server CPU-s per second idle
//!  marginal CPU/delivery             = (CPU − idle rate × window) / deliveries
//! ```
//!
//! The idle figure separates what a node costs by existing (timers, heartbeats, the lease,
//! the presence beat, blocked Redis reads) from what each delivery costs; both matter for
//! sizing, only the second scales with traffic.
//!
//! Invariants:
//! - Both readings bracket the same instants (the CPU readings and the delivery counters are
//!   taken back to back), so rates cancel: a node that delivers less also shows less CPU.
//! - The comparison pairs runs of the same round (same binary, same load, back to back), so
//!   a change in the box's background load between rounds does not land in one side only.

/// One measured run: deliveries per node and CPU seconds per server process.
#[derive(Debug, Clone)]
pub struct Cost {
    /// walcast processes in the run (1 = single process, no Redis).
    pub nodes: usize,
    /// Round of the back-to-back comparison (1-based).
    pub round: usize,
    /// Length of the window, seconds.
    pub wall_secs: f64,
    /// Deliveries counted by the clients of node i inside the window.
    pub deliveries: Vec<u64>,
    /// CPU seconds inside the window: `node<i>` and `redis` (and anything else measured,
    /// which does not count as server CPU).
    pub cpu: Vec<(String, f64)>,
    /// Whether every expected delivery arrived (no loss, no duplicate) in the whole run.
    pub complete: bool,
    /// Load average when the run started.
    pub load: String,
    /// Bytes redis-server received and sent inside the window (cluster runs with a Redis
    /// the harness started).
    pub redis_net: Option<(u64, u64)>,
    /// Server CPU seconds per second (nodes + Redis) while every socket was joined and no
    /// load ran; `None` when not measured.
    pub idle_cpu_rate: Option<f64>,
    /// Bytes the nodes wrote to clients inside the window (`walcast_bytes_out_total`).
    pub client_bytes_out: Option<u64>,
}

impl Cost {
    pub fn total_deliveries(&self) -> u64 {
        self.deliveries.iter().sum()
    }

    fn cpu_of(&self, name: &str) -> f64 {
        // Folded from +0.0: an empty float `sum()` is -0.0, printed "-0.00".
        self.cpu
            .iter()
            .filter(|(n, _)| n == name)
            .fold(0.0, |acc, (_, s)| acc + s)
    }

    /// CPU seconds of the walcast nodes.
    pub fn node_cpu_secs(&self) -> f64 {
        (0..self.nodes).fold(0.0, |acc, i| acc + self.cpu_of(&format!("node{i}")))
    }

    /// CPU seconds of redis-server (0 without one).
    pub fn redis_cpu_secs(&self) -> f64 {
        self.cpu_of("redis")
    }

    /// Nodes and Redis.
    pub fn server_cpu_secs(&self) -> f64 {
        self.node_cpu_secs() + self.redis_cpu_secs()
    }

    /// Deliveries per server CPU-second (Redis included).
    pub fn per_cpu_sec(&self) -> f64 {
        self.total_deliveries() as f64 / self.server_cpu_secs().max(1e-9)
    }

    /// Server CPU microseconds per delivery (Redis included).
    pub fn us_per_delivery(&self) -> f64 {
        self.server_cpu_secs() * 1e6 / (self.total_deliveries().max(1) as f64)
    }

    /// Server CPU microseconds per delivery above the idle rate (Redis included).
    pub fn marginal_us_per_delivery(&self) -> Option<f64> {
        let idle = self.idle_cpu_rate? * self.wall_secs;
        Some(
            (self.server_cpu_secs() - idle).max(0.0) * 1e6
                / (self.total_deliveries().max(1) as f64),
        )
    }

    /// "in 1.2 / out 3.4 MB/s" of Redis's network, or "—".
    fn redis_net_rate(&self) -> String {
        match self.redis_net {
            Some((i, o)) => format!(
                "in {:.1} / out {:.1} kB/s",
                i as f64 / self.wall_secs.max(1e-9) / 1e3,
                o as f64 / self.wall_secs.max(1e-9) / 1e3
            ),
            None => "—".into(),
        }
    }

    /// "node0 41,000/s (12.1 s CPU, 496,000) · node1 …" per node.
    fn per_node(&self) -> String {
        (0..self.nodes)
            .map(|i| {
                let cpu = self.cpu_of(&format!("node{i}"));
                let d = self.deliveries.get(i).copied().unwrap_or(0);
                format!(
                    "node{i}: {} deliveries, {cpu:.2} s CPU, {:.0}/CPU-s",
                    d,
                    d as f64 / cpu.max(1e-9)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// The comparison table (markdown) and, per round, the cost of each cluster run relative to
/// the one-node run of the same round against the `max_overhead` target (0.25 = +25 %).
pub fn print_comparison(title: &str, costs: &[Cost], max_overhead: f64) {
    println!("== {title}: server CPU per delivery, one node vs cluster ==");
    println!("| round | nodes | load at start | window s | deliveries | deliveries/s | walcast CPU s (all nodes) | redis CPU s | redis network | deliveries per server CPU-s | server CPU µs/delivery | idle server CPU (% of a core) | marginal µs/delivery | client bytes/delivery | complete | per node |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for c in costs {
        println!(
            "| {} | {} | {} | {:.1} | {} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {:.2} | {} | {} | {} | {} | {} |",
            c.round,
            c.nodes,
            c.load,
            c.wall_secs,
            c.total_deliveries(),
            c.total_deliveries() as f64 / c.wall_secs.max(1e-9),
            c.node_cpu_secs(),
            c.redis_cpu_secs(),
            c.redis_net_rate(),
            c.per_cpu_sec(),
            c.us_per_delivery(),
            c.idle_cpu_rate
                .map_or("—".into(), |r| format!("{:.1} %", r * 100.0)),
            c.marginal_us_per_delivery()
                .map_or("—".into(), |m| format!("{m:.2}")),
            c.client_bytes_out.map_or("—".into(), |b| format!(
                "{:.0}",
                b as f64 / c.total_deliveries().max(1) as f64
            )),
            if c.complete { "yes" } else { "NO" },
            c.per_node()
        );
    }
    for c in costs.iter().filter(|c| c.nodes > 1) {
        let Some(base) = costs.iter().find(|b| b.round == c.round && b.nodes <= 1) else {
            continue;
        };
        let overhead = c.us_per_delivery() / base.us_per_delivery().max(1e-9) - 1.0;
        let marginal = c
            .marginal_us_per_delivery()
            .zip(base.marginal_us_per_delivery())
            .map_or(String::new(), |(m, b)| {
                format!(
                    "; above idle: {m:.2} vs {b:.2} µs/delivery, {:+.1} %",
                    (m / b.max(1e-9) - 1.0) * 100.0
                )
            });
        println!(
            "RATIO {title} round {}: {} nodes cost {:.2} µs/delivery vs {:.2} on 1 node: {:+.1} % server CPU per delivery (Redis included; target ≤ {:+.0} %: {}){marginal}",
            c.round,
            c.nodes,
            c.us_per_delivery(),
            base.us_per_delivery(),
            overhead * 100.0,
            max_overhead * 100.0,
            if overhead <= max_overhead { "met" } else { "MISSED" }
        );
    }
}

/// Server CPU seconds per second over `secs` of no load (`procs` as for
/// [`crate::harness::CpuWindow`]; only `node<i>` and `redis` count).
pub async fn idle_rate(procs: &[(&str, u32, bool)], secs: f64) -> f64 {
    let w = crate::harness::CpuWindow::start(procs);
    tokio::time::sleep(std::time::Duration::from_secs_f64(secs)).await;
    let (wall, cpu) = w.finish_secs();
    let server: f64 = cpu
        .iter()
        .filter(|(n, _)| n.starts_with("node") || n == "redis")
        .fold(0.0, |acc, (_, s)| acc + s);
    server / wall.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(nodes: usize, deliveries: Vec<u64>, cpu: &[(&str, f64)]) -> Cost {
        Cost {
            nodes,
            round: 1,
            wall_secs: 10.0,
            deliveries,
            cpu: cpu.iter().map(|(n, s)| (n.to_string(), *s)).collect(),
            complete: true,
            load: String::new(),
            redis_net: None,
            idle_cpu_rate: Some(0.1),
            client_bytes_out: None,
        }
    }

    #[test]
    fn redis_counts_as_server_cpu_and_other_processes_do_not() {
        let c = cost(
            2,
            vec![600, 400],
            &[
                ("node0", 3.0),
                ("node1", 1.0),
                ("redis", 1.0),
                ("bench", 9.0),
            ],
        );
        assert_eq!(c.total_deliveries(), 1000);
        assert_eq!(c.server_cpu_secs(), 5.0);
        assert_eq!(c.per_cpu_sec(), 200.0);
        assert_eq!(c.us_per_delivery(), 5000.0);
        // 0.1 CPU-s/s idle over 10 s = 1 s of the 5.
        assert_eq!(c.marginal_us_per_delivery(), Some(4000.0));
    }
}
