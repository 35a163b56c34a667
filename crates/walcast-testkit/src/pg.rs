//! Throwaway Postgres clusters for tests.
//!
//! ```text
//!  test binary ──(first use)──▶ initdb (as `postgres` when we are root) ──▶ pg_ctl start
//!       │                                                         │
//!       └── pid watched by a detached watchdog ───────────────────┘
//!             when the test process is gone: SIGQUIT the postmaster, rm -rf the dir
//! ```
//!
//! Invariants:
//! - Every cluster lives in its own temporary directory on a free port; nothing depends on a
//!   system-wide cluster, so test binaries can run in parallel.
//! - The shared cluster (one per test binary) is never dropped (it is a static), so a
//!   watchdog process removes it once the test process exits, whatever the way it exits.
//!   Dedicated clusters are also removed on `Drop`.
//! - `wal_level=logical` always; tests that need other settings start a dedicated cluster.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Options for a dedicated cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Extra `postgresql.conf` settings, applied after the defaults (so they override them).
    pub settings: Vec<(String, String)>,
    /// `pg_hba.conf` lines replacing the default trust-everything-local lines.
    pub hba: Vec<String>,
    /// Generate a self-signed certificate for `localhost`/127.0.0.1 and turn `ssl` on.
    pub ssl: bool,
}

/// A running throwaway Postgres cluster.
#[derive(Debug)]
pub struct PgCluster {
    root: PathBuf,
    port: u16,
    bin_dir: PathBuf,
    ssl_cert: Option<PathBuf>,
    watchdog: Option<std::process::Child>,
    owned: bool,
}

static SHARED: OnceLock<PgCluster> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// The cluster shared by every test of this test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        SHARED.get_or_init(|| {
            let mut c = PgCluster::start(ClusterOptions::default())
                .expect("could not start the shared test Postgres cluster");
            // A static is never dropped: the watchdog cleans up after the process exits.
            c.owned = false;
            c
        })
    }

    /// Start a dedicated cluster; it is stopped and removed when dropped.
    pub fn start(opts: ClusterOptions) -> Result<PgCluster> {
        let bin_dir = find_bin_dir()?;
        let root = tempfile::Builder::new()
            .prefix("walcast-pg-")
            .tempdir()
            .context("creating a temp dir for the test cluster")?
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
        run(&mut initdb).context("initdb failed")?;

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
            .context("openssl could not make a test certificate")?;
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
            "\n# walcast-testkit\nlisten_addresses = '127.0.0.1'\nwal_level = logical\n\
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
                        owned: true,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        let log = std::fs::read_to_string(root.join("postgres.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&root);
        Err(last_err.unwrap_or_else(|| anyhow!("pg_ctl start failed")))
            .with_context(|| format!("starting the test cluster; server log:\n{log}"))
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Directory holding the server binaries (`pg_recvlogical`, `pgbench`, ...).
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
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

    /// Create a new, empty database with a unique name.
    pub async fn fresh_database(&self) -> Result<TestDb> {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("walcast_test_{}_{n}", std::process::id());
        let admin = connect(&self.url("postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(TestDb {
            url: self.url(&name),
            name,
            port: self.port,
        })
    }

    /// Stop the cluster now (immediate shutdown), keeping its directory.
    pub fn stop(&self) {
        kill_postmaster(&self.root.join("data"));
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        kill_postmaster(&self.root.join("data"));
        if let Some(mut w) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    name: String,
    url: String,
    port: u16,
}

impl TestDb {
    /// Database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// URL for another user of this database.
    pub fn url_as(&self, user: &str, password: Option<&str>) -> String {
        match password {
            Some(p) => format!(
                "postgres://{user}:{p}@127.0.0.1:{}/{}",
                self.port, self.name
            ),
            None => format!("postgres://{user}@127.0.0.1:{}/{}", self.port, self.name),
        }
    }

    /// Port of the cluster.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh SQL connection as `postgres` (its connection task is spawned on the current runtime).
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

/// Connect with tokio-postgres (no TLS) and spawn the connection task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "test connection ended");
        }
    });
    Ok(client)
}

fn find_bin_dir() -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("WALCAST_PG_BIN") {
        return Ok(PathBuf::from(dir));
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
        return Ok(bin);
    }
    // Fall back to whatever `initdb` is on PATH.
    let out = Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .context("looking for initdb")?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("no Postgres server binaries found: install PostgreSQL (initdb, pg_ctl) or set WALCAST_PG_BIN");
    }
    let resolved = std::fs::canonicalize(&path)?;
    Ok(resolved
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/usr/bin")))
}

pub(crate) fn running_as_root() -> bool {
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
