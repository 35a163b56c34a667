//! The common bench harness: a throwaway Postgres, the `bench` table, the `walcast serve`
//! child process, readiness, tokens, CPU pinning and `/proc` readings.
//!
//! ```text
//!  bench process ──PgCluster::start──▶ postgres (synchronous_commit=off, own temp dir)
//!       │   CREATE TABLE bench, ROLE anon, PUBLICATION walcast
//!       ├──spawn [taskset -c CPUS] walcast serve --port P --bind 127.0.0.1 --slot bench
//!       │        stdout+stderr ─▶ $TMPDIR/walcast-bench-<pid>.log
//!       └──GET /readyz (raw HTTP/1.1 over TCP) until 200, then clients connect
//! ```
//!
//! With `nodes > 1` (cluster mode) the harness also starts a throwaway `redis-server` (or
//! uses `--redis-url`) and N `walcast serve` processes on the same database, slot and Redis:
//!
//! ```text
//!  node 0 (started first, ready = it holds the streaming lease) ─┐
//!  node 1 … node N-1 (started once node 0 is ready: followers)  ─┼─ redis-server
//!  every node: --redis-url R --node-id bench-<i>, own port/log  ─┘
//! ```
//!
//! Invariants:
//! - The server children are killed when the [`Harness`] is dropped, the cluster and the
//!   Redis it started removed with it.
//! - Node 0 is the streamer at the start of a run: it is ready (it streams the slot) before
//!   any other node exists.
//! - `taskset` execs the server, so the child's pid *is* the server's pid (for `/proc`).
//! - Pinning of the bench process itself happens before any runtime thread exists, so every
//!   thread (and every re-executed worker) inherits it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::Args;
use walcast_testkit::{ClusterOptions, PgCluster, RedisServer, TestDb};

/// The JWT secret the server is started with (a benchmark, not a secret).
pub const JWT_SECRET: &str = "walcast-bench-secret-at-least-32-bytes-long";

/// Options shared by every bench binary that starts a server.
#[derive(Debug, Clone, Args)]
pub struct HarnessArgs {
    /// The walcast binary (defaults to `walcast` next to this binary).
    #[arg(long)]
    pub walcast: Option<PathBuf>,
    /// Pin the server to these CPUs (`taskset -c` list, e.g. `0`); default: not pinned.
    #[arg(long)]
    pub server_cpus: Option<String>,
    /// Pin the load generator (this process and its workers) to these CPUs; default: not pinned.
    #[arg(long)]
    pub client_cpus: Option<String>,
    /// Pin Postgres (postmaster and every backend) to these CPUs; default: not pinned.
    #[arg(long)]
    pub pg_cpus: Option<String>,
    /// RUST_LOG for the server (info is low-volume: start, shutdown, slow-client closes).
    #[arg(long, default_value = "info")]
    pub server_log: String,
    /// Postgres `synchronous_commit`. With `off`, a logical walsender only sends WAL the
    /// WAL writer has flushed, i.e. up to `wal_writer_delay` after the COMMIT returned.
    #[arg(long, default_value = "off")]
    pub synchronous_commit: String,
    /// Postgres `wal_writer_delay` (how often the WAL writer flushes async commits).
    #[arg(long, default_value = "200ms")]
    pub wal_writer_delay: String,
    /// Extra argument for `walcast serve`, repeatable (e.g. `--server-arg=--max-connections=20000`).
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,
    /// Cluster runs: an existing Redis for the nodes (default: start a throwaway
    /// redis-server per run, whose CPU and network are then measured too). It must be empty
    /// for each run: every run starts a new Postgres with the slot `bench`, and the change
    /// stream's keys of an earlier run (its last published position) would make the new
    /// streamer skip transactions.
    #[arg(long)]
    pub redis_url: Option<String>,
    /// walcast processes to start (set by the binaries that take `--nodes`); 0 or 1 is the
    /// single process without Redis, more is cluster mode.
    #[arg(skip)]
    pub nodes: usize,
}

impl HarnessArgs {
    /// Pass `--flag=value` to `walcast serve` unless the command line already sets `flag`.
    /// Benchmarks open every socket from one address, so per-client limits meant for one
    /// real client (the join rate, say) would otherwise be what they measure.
    pub fn server_default(&mut self, flag: &str, value: impl std::fmt::Display) {
        let set = self
            .server_arg
            .iter()
            .any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        if !set {
            self.server_arg.push(format!("{flag}={value}"));
        }
    }

    /// "server: 0, client: 1, postgres: unpinned" for the report.
    pub fn pinning(&self) -> String {
        let p = |c: &Option<String>| c.clone().unwrap_or_else(|| "unpinned".into());
        format!(
            "server cpus {}, client cpus {}, postgres cpus {}",
            p(&self.server_cpus),
            p(&self.client_cpus),
            p(&self.pg_cpus)
        )
    }

    /// "synchronous_commit=off, wal_writer_delay=200ms" for the report.
    pub fn postgres_settings(&self) -> String {
        format!(
            "synchronous_commit={}, wal_writer_delay={}, fsync=off",
            self.synchronous_commit, self.wal_writer_delay
        )
    }
}

/// One `walcast serve` process.
pub struct Node {
    child: Child,
    pub port: u16,
    pub log_path: PathBuf,
}

/// A running Postgres + `walcast serve` (one, or a cluster of nodes on one Redis), ready
/// for clients.
pub struct Harness {
    pub cluster: PgCluster,
    pub db: TestDb,
    /// Node 0 first; more than one only in cluster mode.
    pub nodes: Vec<Node>,
    /// The redis-server this harness started (cluster mode without `--redis-url`).
    pub redis: Option<RedisServer>,
    /// Node 0's port and log (the single server of a one-node run).
    pub port: u16,
    pub token: String,
    pub log_path: PathBuf,
}

impl Harness {
    /// Start Postgres, create the schema, start the server and wait until `/readyz` is 200.
    pub async fn start(args: &HarnessArgs) -> Result<Harness> {
        let walcast = walcast_binary(args.walcast.as_deref())?;
        let cluster = PgCluster::start(ClusterOptions {
            settings: vec![
                ("synchronous_commit".into(), args.synchronous_commit.clone()),
                ("wal_writer_delay".into(), args.wal_writer_delay.clone()),
                ("max_wal_size".into(), "4GB".into()),
                ("wal_sender_timeout".into(), "60s".into()),
            ],
            ..Default::default()
        })?;
        let db = cluster.fresh_database().await?;
        let client = db.connect().await?;
        client
            .batch_execute(
                "CREATE TABLE public.bench (id int8 PRIMARY KEY, n int8 NOT NULL, body text NOT NULL);
                 DO $$ BEGIN
                   IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
                     CREATE ROLE anon NOLOGIN;
                   END IF;
                 END $$;
                 GRANT USAGE ON SCHEMA public TO anon;
                 GRANT SELECT ON public.bench TO anon;
                 CREATE PUBLICATION walcast FOR TABLE public.bench;",
            )
            .await
            .context("creating the bench schema")?;
        if let Some(cpus) = &args.pg_cpus {
            pin_postgres(&cluster, cpus)?;
        }

        let n = args.nodes.max(1);
        let (redis, redis_url) = match (&args.redis_url, n > 1) {
            (_, false) => (None, None),
            (Some(url), true) => (None, Some(url.clone())),
            (None, true) => {
                let r = RedisServer::start()?;
                let url = r.url();
                (Some(r), Some(url))
            }
        };
        let mut harness = Harness {
            cluster,
            db,
            nodes: Vec::with_capacity(n),
            redis,
            port: 0,
            token: mint_token("anon", 3600)?,
            log_path: PathBuf::new(),
        };
        for i in 0..n {
            let node = start_node(args, &walcast, harness.db.url(), i, redis_url.as_deref())?;
            harness.nodes.push(node);
            if i == 0 {
                harness.port = harness.nodes[0].port;
                harness.log_path = harness.nodes[0].log_path.clone();
                // Node 0 takes the streaming lease before any other node exists.
                harness.wait_ready(0, Duration::from_secs(60)).await?;
            }
        }
        for i in 1..n {
            harness.wait_ready(i, Duration::from_secs(60)).await?;
        }
        Ok(harness)
    }

    /// The server's pid (the same as the child's: `taskset` execs); node 0's in a cluster.
    pub fn server_pid(&self) -> u32 {
        self.nodes[0].child.id()
    }

    /// Every node's pid, node 0 first.
    pub fn server_pids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.child.id()).collect()
    }

    /// Every node's `127.0.0.1:PORT`, node 0 first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes
            .iter()
            .map(|n| SocketAddr::from(([127, 0, 0, 1], n.port)))
            .collect()
    }

    /// The pid of the redis-server this harness started, if any.
    pub fn redis_pid(&self) -> Option<u32> {
        self.redis.as_ref().and_then(RedisServer::pid)
    }

    /// `(total_net_input_bytes, total_net_output_bytes)` of the redis-server this harness
    /// started (from `INFO stats`), for the network side of the cost.
    pub fn redis_net_bytes(&self) -> Option<(u64, u64)> {
        redis_net_bytes(self.redis.as_ref()?.port())
    }

    /// Processes whose CPU is the server's: `node<i>` for each node, and `redis` when this
    /// harness started it.
    pub fn server_procs(&self) -> Vec<(String, u32)> {
        let mut procs: Vec<(String, u32)> = self
            .server_pids()
            .into_iter()
            .enumerate()
            .map(|(i, p)| (format!("node{i}"), p))
            .collect();
        if let Some(p) = self.redis_pid() {
            procs.push(("redis".into(), p));
        }
        procs
    }

    /// Postmaster pid, for CPU accounting.
    pub fn postmaster_pid(&self) -> Result<u32> {
        postmaster_pid(&self.cluster)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 40)
    }

    /// Fails when a server process has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for (i, node) in self.nodes.iter_mut().enumerate() {
            if let Some(status) = node.child.try_wait()? {
                bail!(
                    "the server (node {i}) exited ({status}); log {}:\n{}",
                    node.log_path.display(),
                    log_tail(&node.log_path, 40)
                );
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self, node: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let addr = self.addrs()[node];
        loop {
            self.check_alive()?;
            let probe = tokio::task::spawn_blocking(move || http_status(addr, "/readyz")).await?;
            if let Ok(200) = probe {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {node} was not ready within {timeout:?} (last /readyz: {probe:?}); log:\n{}",
                    log_tail(&self.nodes[node].log_path, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

/// Spawn node `i` (`--redis-url`/`--node-id` in cluster mode); its log is
/// `$TMPDIR/walcast-bench-<pid>.log` for node 0, `…-node<i>.log` for the others.
fn start_node(
    args: &HarnessArgs,
    walcast: &Path,
    db_url: &str,
    i: usize,
    redis_url: Option<&str>,
) -> Result<Node> {
    let port = free_port()?;
    let suffix = if i == 0 {
        String::new()
    } else {
        format!("-node{i}")
    };
    let log_path =
        std::env::temp_dir().join(format!("walcast-bench-{}{suffix}.log", std::process::id()));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = match &args.server_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.arg("-c").arg(cpus).arg(walcast);
            c
        }
        None => Command::new(walcast),
    };
    cmd.args(["serve", "--database-url", db_url])
        .args(["--jwt-secret", JWT_SECRET])
        .args(["--port", &port.to_string()])
        .args([
            "--bind",
            "127.0.0.1",
            "--publication",
            "walcast",
            "--slot",
            "bench",
        ]);
    if let Some(url) = redis_url {
        cmd.args(["--redis-url", url])
            .args(["--node-id", &format!("bench-{i}")]);
    }
    cmd.args(&args.server_arg)
        .env("RUST_LOG", &args.server_log)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", walcast.display()))?;
    Ok(Node {
        child,
        port,
        log_path,
    })
}

/// `walcast` next to the running binary unless given.
pub fn walcast_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()?
            .parent()
            .context("this binary has no parent directory")?
            .join("walcast"),
    };
    if !path.exists() {
        bail!(
            "{} not found: build it with cargo build --release -p walcast-server",
            path.display()
        );
    }
    Ok(path)
}

/// An HS256 token with `role` and `exp = now + ttl`.
pub fn mint_token(role: &str, ttl_secs: u64) -> Result<String> {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + ttl_secs;
    let claims = serde_json::json!({ "role": role, "exp": exp });
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

/// Status code of `GET path` over a fresh HTTP/1.1 connection.
pub fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut head[n..])?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = std::str::from_utf8(&head[..n]).context("status line is not UTF-8")?;
    let code = line
        .split_whitespace()
        .nth(1)
        .context("no status code")?
        .parse()?;
    Ok(code)
}

/// Body of `GET path` (HTTP/1.1, `Connection: close`, no chunked decoding needed for
/// the plain-text `/metrics`; a chunked body keeps its chunk-size lines, which never start
/// with a metric name).
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body.to_string())
}

/// Sum of the samples of metric `name` (every label set) on each of `addrs`, for the
/// window readings of the cost (e.g. `walcast_bytes_out_total`); 0 where it is absent.
pub fn metric_sum(addrs: &[SocketAddr], name: &str) -> f64 {
    addrs
        .iter()
        .flat_map(|a| metric_lines(*a, &[name]))
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// `/metrics` lines of the server whose name starts with one of `prefixes`.
pub fn metric_lines(addr: SocketAddr, prefixes: &[&str]) -> Vec<String> {
    http_get(addr, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
        .map(str::to_owned)
        .collect()
}

/// `(total_net_input_bytes, total_net_output_bytes)` from `INFO stats` of the Redis on
/// 127.0.0.1:`port` (an inline command; the reply is one bulk string).
pub fn redis_net_bytes(port: u16) -> Option<(u64, u64)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"INFO stats\r\n").ok()?;
    let mut reply = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        reply.extend_from_slice(&buf[..n]);
        // "$<len>\r\n<len bytes>\r\n"
        let text = String::from_utf8_lossy(&reply);
        let (head, body) = text.split_once("\r\n")?;
        let len: usize = head.strip_prefix('$')?.parse().ok()?;
        if body.len() >= len {
            break;
        }
    }
    let text = String::from_utf8_lossy(&reply);
    let field = |key: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    Some((
        field("total_net_input_bytes:")?,
        field("total_net_output_bytes:")?,
    ))
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Pin this process (all its threads) to `cpus`. Call before building a runtime.
pub fn pin_self(cpus: &str) -> Result<()> {
    taskset_pid(std::process::id(), cpus)
}

fn taskset_pid(pid: u32, cpus: &str) -> Result<()> {
    let out = Command::new("taskset")
        .args(["-a", "-p", "-c", cpus])
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .output()
        .context("running taskset")?;
    if !out.status.success() {
        bail!(
            "taskset -a -p -c {cpus} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn postmaster_pid(cluster: &PgCluster) -> Result<u32> {
    let root = cluster
        .log_path()
        .parent()
        .context("cluster log has no parent")?
        .to_path_buf();
    let pidfile = std::fs::read_to_string(root.join("data").join("postmaster.pid"))?;
    Ok(pidfile
        .lines()
        .next()
        .context("empty postmaster.pid")?
        .trim()
        .parse()?)
}

/// Backends forked later inherit the postmaster's affinity; the ones already running are
/// pinned one by one.
fn pin_postgres(cluster: &PgCluster, cpus: &str) -> Result<()> {
    let pm = postmaster_pid(cluster)?;
    taskset_pid(pm, cpus)?;
    for child in children_of(pm) {
        let _ = taskset_pid(child, cpus);
    }
    Ok(())
}

/// Direct children of `pid`, from `/proc/*/stat`.
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if stat_fields(child).and_then(|f| f.get(1).and_then(|p| p.parse::<u32>().ok()))
            == Some(pid)
        {
            out.push(child);
        }
    }
    out
}

/// Fields of `/proc/<pid>/stat` after the command name: index 0 is the state (field 3),
/// index 1 the ppid, index 11/12 utime/stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// utime + stime of `pid` in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// utime + stime of `pid` and all its current children.
pub fn tree_cpu_ticks(pid: u32) -> u64 {
    cpu_ticks(pid).unwrap_or(0)
        + children_of(pid)
            .into_iter()
            .filter_map(cpu_ticks)
            .sum::<u64>()
}

/// Clock ticks per second (`getconf CLK_TCK`, 100 when unknown).
pub fn clk_tck() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// The first three fields of /proc/loadavg (other work on the box shows here).
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// VmRSS of `pid` in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// `Slab:` from /proc/meminfo in KiB (kernel memory, includes socket structures).
pub fn slab_kib() -> Result<u64> {
    status_kib("/proc/meminfo", "Slab:")
}

fn status_kib(path: &str, key: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("no {key} in {path}"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .with_context(|| format!("bad {key} line"))?
        .parse()?)
}

/// CPU use of several processes over a window, as % of one core.
pub struct CpuWindow {
    start: Instant,
    ticks: Vec<(String, u32, bool, u64)>,
}

impl CpuWindow {
    /// Start measuring; `tree` includes the current children of the pid.
    pub fn start(procs: &[(&str, u32, bool)]) -> CpuWindow {
        CpuWindow {
            start: Instant::now(),
            ticks: procs
                .iter()
                .map(|(name, pid, tree)| {
                    let t = if *tree {
                        tree_cpu_ticks(*pid)
                    } else {
                        cpu_ticks(*pid).unwrap_or(0)
                    };
                    (name.to_string(), *pid, *tree, t)
                })
                .collect(),
        }
    }

    /// `(wall seconds, [(name, CPU seconds)])` since `start`.
    pub fn finish_secs(&self) -> (f64, Vec<(String, f64)>) {
        let secs = self.start.elapsed().as_secs_f64();
        let hz = clk_tck() as f64;
        let used = self
            .ticks
            .iter()
            .map(|(name, pid, tree, before)| {
                let now = if *tree {
                    tree_cpu_ticks(*pid)
                } else {
                    cpu_ticks(*pid).unwrap_or(0)
                };
                (name.clone(), now.saturating_sub(*before) as f64 / hz)
            })
            .collect();
        (secs, used)
    }

    /// `(name, % of one core)` since `start`.
    pub fn finish(&self) -> Vec<(String, f64)> {
        let secs = self.start.elapsed().as_secs_f64();
        let hz = clk_tck() as f64;
        self.ticks
            .iter()
            .map(|(name, pid, tree, before)| {
                let now = if *tree {
                    tree_cpu_ticks(*pid)
                } else {
                    cpu_ticks(*pid).unwrap_or(0)
                };
                let pct = now.saturating_sub(*before) as f64 / hz / secs * 100.0;
                (name.clone(), pct)
            })
            .collect()
    }
}

/// `a=12.3% b=45.6%`.
pub fn format_cpu(cpu: &[(String, f64)]) -> String {
    cpu.iter()
        .map(|(n, p)| format!("{n} {p:.0}%"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command line of this process, shell-quoted where needed.
pub fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
