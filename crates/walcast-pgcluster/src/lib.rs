//! Throwaway Postgres clusters from the local server binaries, for tests (through
//! `walcast-testkit`) and for `walcast demo`.
//!
//! ```text
//!  process ──PgCluster::start──▶ initdb (as `postgres` when we are root) ──▶ pg_ctl start
//!     │                                                               │
//!     └── pid watched by a detached watchdog ─────────────────────────┘
//!           when the process is gone: SIGQUIT the postmaster, rm -rf the dir
//! ```
//!
//! Invariants:
//! - Every cluster lives in its own temporary directory on a free port; nothing depends on a
//!   system-wide cluster, so several can run side by side.
//! - A cluster is stopped and its directory removed on `Drop`; if the process dies without
//!   dropping it (a static, a kill -9), the watchdog does the same once the process is gone.
//! - `wal_level=logical` by default; `ClusterOptions::settings` override it.
//!
//! std only (no async runtime): callers bring their own client.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Options for a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings, applied after the defaults (so they override them).
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines replacing the default trust-everything-local lines.
    pub hba: Vec<String>,
    /// Generate a self-signed certificate for `localhost`/127.0.0.1 and turn `ssl` on.
    pub ssl: bool,
}

/// How `pg_ctl` stops a cluster (its `-m` option).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// `-m smart`: wait for every session to end.
    Smart,
    /// `-m fast`: terminate sessions, checkpoint, exit.
    Fast,
    /// `-m immediate`: quit at once; the next start runs crash recovery.
    Immediate,
}

impl StopMode {
    fn as_arg(self) -> &'static str {
        match self {
            StopMode::Smart => "smart",
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running throwaway Postgres cluster, stopped and removed when dropped.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    ssl_cert: Option<PathBuf>,
    watchdog: Option<std::process::Child>,
}

impl PgCluster {
    /// Start a cluster from the binaries [`find_bin_dir`] finds: initdb, configure,
    /// pg_ctl start on a free port of 127.0.0.1.
    pub fn start(opts: ClusterOptions) -> Result<PgCluster> {
        let bin_dir = find_bin_dir().ok_or_else(|| {
            anyhow!("no Postgres server binaries found: install PostgreSQL (initdb, pg_ctl) or set WALCAST_PG_BIN")
        })?;
        PgCluster::start_with_bin_dir(bin_dir, opts)
    }

    /// Start a cluster from the binaries in `bin_dir` (which must hold `initdb` and `pg_ctl`).
    pub fn start_with_bin_dir(bin_dir: PathBuf, opts: ClusterOptions) -> Result<PgCluster> {
        if !bin_dir.join("initdb").exists() || !bin_dir.join("pg_ctl").exists() {
            bail!("{} holds no initdb and pg_ctl", bin_dir.display());
        }
        let root = tempfile::Builder::new()
            .prefix("walcast-pg-")
            .tempdir()
            .context("creating a temp dir for the cluster")?
            .keep();
        let as_root = running_as_root();
        if as_root {
            // initdb refuses root; the cluster is owned by `postgres`.
            run(Command::new("chown").arg("postgres:postgres").arg(&root))?;
        }
        let data = root.join("data");
        let mut initdb = pg_command(&bin_dir, "initdb", as_root);
        initdb.arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "-N",
        ]);
        if let Err(e) = run(&mut initdb) {
            let _ = std::fs::remove_dir_all(&root);
            return Err(e.context("initdb failed"));
        }
        let mut ssl_cert = None;
        if opts.ssl {
            let cert = data.join("server.crt");
            let key = data.join("server.key");
            run(Command::new("openssl")
                .args(["req", "-new", "-x509", "-days", "30", "-nodes"])
                .args(["-subj", "/CN=localhost"])
                .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert))
            .context("openssl could not make a certificate")?;
            if as_root {
                run(Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&cert)
                    .arg(&key))?;
            }
            run(Command::new("chmod").arg("600").arg(&key))?;
            // A copy readable by the test process, outside the data dir.
            let public = root.join("root.crt");
            std::fs::copy(&cert, &public)?;
            ssl_cert = Some(public);
        }

        let mut conf = String::from(
            "\n# walcast-pgcluster\nlisten_addresses = '127.0.0.1'\nwal_level = logical\n\
             max_replication_slots = 64\nmax_wal_senders = 64\nmax_connections = 300\n\
             fsync = off\nfull_page_writes = off\nlogging_collector = off\n\
             log_min_messages = warning\nshared_buffers = 64MB\n",
        );
        conf.push_str(&format!("unix_socket_directories = '{}'\n", root.display()));
        if opts.ssl {
            conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        }
        for (k, v) in &opts.settings {
            conf.push_str(&format!("{k} = '{}'\n", v.replace('\'', "''")));
        }
        append(&data.join("postgresql.conf"), &conf)?;
        let hba = if opts.hba.is_empty() {
            vec![
                "local all all trust".to_string(),
                "host all all 127.0.0.1/32 trust".to_string(),
                "host all all ::1/128 trust".to_string(),
            ]
        } else {
            opts.hba.clone()
        };
        std::fs::write(data.join("pg_hba.conf"), hba.join("\n") + "\n")?;

        // The port is chosen by binding :0; another process may grab it before the postmaster
        // does, so retry a few times.
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            let mut ctl = pg_command(&bin_dir, "pg_ctl", as_root);
            ctl.arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(root.join("postgres.log"))
                .args(["-w", "-t", "60", "-o"])
                .arg(format!("-p {port}"))
                .arg("start");
            match run(&mut ctl) {
                Ok(()) => {
                    let watchdog = spawn_watchdog(&root, &data)?;
                    return Ok(PgCluster {
                        root,
                        port,
                        bin_dir,
                        ssl_cert,
                        watchdog: Some(watchdog),
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        let log = std::fs::read_to_string(root.join("postgres.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&root);
        Err(last_err.unwrap_or_else(|| anyhow!("pg_ctl start failed")))
            .with_context(|| format!("starting the cluster; server log:\n{log}"))
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the server binaries (`psql`, `pg_recvlogical`, `pgbench`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// The cluster's own directory (data, log, socket); gone once the cluster is dropped.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Path of the server certificate (also usable as `sslrootcert`), when `ssl` was asked for.
    pub fn ssl_cert_path(&self) -> Option<&Path> {
        self.ssl_cert.as_deref()
    }

    /// Path of the server log.
    pub fn log_path(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Connection URL for `db` as the superuser `postgres`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Stop the cluster now (immediate shutdown), keeping its directory.
    pub fn stop(&self) {
        kill_postmaster(&self.root.join("data"));
    }

    /// `pg_ctl stop -m MODE` and wait for it: `Fast` disconnects every session and checkpoints,
    /// `Immediate` quits without one (the next start runs crash recovery). The directory is
    /// kept; [`PgCluster::pg_start`] brings the cluster back on the same port.
    pub fn pg_stop(&self, mode: StopMode) -> Result<()> {
        let mut ctl = pg_command(&self.bin_dir, "pg_ctl", running_as_root());
        ctl.arg("-D").arg(self.root.join("data")).args([
            "-w",
            "-t",
            "60",
            "-m",
            mode.as_arg(),
            "stop",
        ]);
        run(&mut ctl).context("pg_ctl stop failed")
    }

    /// `pg_ctl start` on the cluster's port after [`PgCluster::pg_stop`]; returns once it
    /// accepts connections (after crash recovery, if any).
    pub fn pg_start(&self) -> Result<()> {
        let mut ctl = pg_command(&self.bin_dir, "pg_ctl", running_as_root());
        ctl.arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-o"])
            .arg(format!("-p {}", self.port))
            .arg("start");
        run(&mut ctl).context("pg_ctl start failed")
    }

    /// `pg_ctl restart -m MODE`: stop, then start on the same port; returns once the
    /// cluster accepts connections again.
    pub fn pg_restart(&self, mode: StopMode) -> Result<()> {
        let mut ctl = pg_command(&self.bin_dir, "pg_ctl", running_as_root());
        ctl.arg("-D")
            .arg(self.root.join("data"))
            .arg("-l")
            .arg(self.log_path())
            .args(["-w", "-t", "60", "-m", mode.as_arg(), "-o"])
            .arg(format!("-p {}", self.port))
            .arg("restart");
        run(&mut ctl).context("pg_ctl restart failed")
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        kill_postmaster(&self.root.join("data"));
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The Postgres server binaries to use: `WALCAST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<major>/bin`, else the directory of `initdb` on `PATH`.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("WALCAST_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    // Fall back to whatever `initdb` is on PATH.
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        return None;
    }
    let resolved = std::fs::canonicalize(&path).ok()?;
    resolved.parent().map(Path::to_path_buf)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn pg_command(bin_dir: &Path, tool: &str, as_root: bool) -> Command {
    let exe = bin_dir.join(tool);
    if as_root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(exe);
        c
    } else {
        Command::new(exe)
    }
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn kill_postmaster(data: &Path) {
    if let Ok(pidfile) = std::fs::read_to_string(data.join("postmaster.pid")) {
        if let Some(pid) = pidfile.lines().next().map(str::trim) {
            // SIGQUIT = immediate shutdown; the cluster is thrown away anyway.
            let _ = Command::new("kill").args(["-QUIT", pid]).status();
            for _ in 0..100 {
                let alive = Command::new("kill")
                    .args(["-0", pid])
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false);
                if !alive {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// A detached shell that waits for this process to exit, then removes the cluster.
fn spawn_watchdog(root: &Path, data: &Path) -> Result<std::process::Child> {
    let script = format!(
        "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
         p=$(head -1 '{data}/postmaster.pid' 2>/dev/null); \
         [ -n \"$p\" ] && kill -QUIT \"$p\" 2>/dev/null; \
         for i in $(seq 1 100); do [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null || break; sleep 0.1; done; \
         rm -rf '{root}'",
        pid = std::process::id(),
        data = data.display(),
        root = root.display()
    );
    Command::new("setsid")
        .args(["sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawning the cluster watchdog")
}
