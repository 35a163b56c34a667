//! Helpers shared by the server's integration tests: run the real `walcast` binary.
#![allow(dead_code)]

pub mod cluster;
pub mod server;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A fresh database in the shared test cluster, and a connection to it.
pub async fn database() -> (walcast_testkit::TestDb, tokio_postgres::Client) {
    let db = walcast_testkit::PgCluster::shared()
        .fresh_database()
        .await
        .expect("a fresh test database");
    let sql = db.connect().await.expect("connect to the test database");
    (db, sql)
}

/// A slot or object name unique to this database (parallel tests never share one).
pub fn name(db: &walcast_testkit::TestDb, suffix: &str) -> String {
    format!("{}_{suffix}", db.name())
}

/// Run each statement on its own (a multi-statement simple query is one implicit transaction).
pub async fn exec_each(sql: &tokio_postgres::Client, statements: &[&str]) {
    for s in statements {
        sql.batch_execute(s)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
}

use serde_json::Value;

/// The binary under test: this build's, or `WALCAST_TEST_BIN` (to see a regression test fail
/// against an older build, say).
pub fn walcast_bin() -> std::path::PathBuf {
    std::env::var_os("WALCAST_TEST_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_walcast").into())
}

pub fn walcast() -> Command {
    let mut c = Command::new(walcast_bin());
    c.env(
        "RUST_LOG",
        std::env::var("WALCAST_TEST_LOG")
            .unwrap_or_else(|_| "info,walcast_replication=debug".into()),
    );
    c
}

/// Output of a finished command.
pub struct Finished {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad json line {l:?}: {e}")))
            .collect()
    }
}

/// `walcast tail --exit-when-caught-up` against `url`, waiting at most 60 s.
pub fn tail_caught_up(url: &str, slot: &str, extra: &[&str]) -> Finished {
    let child = walcast()
        .args([
            "tail",
            "--exit-when-caught-up",
            "--database-url",
            url,
            "--slot",
            slot,
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn walcast");
    wait_output(child, Duration::from_secs(60))
}

pub fn wait_output(child: Child, limit: Duration) -> Finished {
    // Read the pipes while waiting (a child writing more than a pipe buffer would block),
    // and kill it from a watchdog thread if it overstays.
    let pid = child.id().to_string();
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let killer = std::thread::spawn(move || {
        if done_rx.recv_timeout(limit).is_err() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    });
    let out = child.wait_with_output().expect("wait");
    let _ = done_tx.send(());
    let _ = killer.join();
    let f = Finished {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if !f.status.success() {
        eprintln!("walcast stderr:\n{}", f.stderr);
    }
    f
}

/// A long-running `walcast tail` whose stdout lines are collected by a thread.
pub struct Tail {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Tail {
    pub fn spawn(url: &str, slot: &str, extra: &[&str]) -> Tail {
        let mut child = walcast()
            .args(["tail", "--database-url", url, "--slot", slot])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn walcast");
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr_buf = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let sink = stderr_buf.clone();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Tail {
            child,
            lines: rx,
            stderr: stderr_buf,
        }
    }

    /// The next `n` JSON lines; panics with the log if they do not arrive in `limit`.
    pub fn take(&mut self, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(serde_json::from_str(&l).expect("json line")),
                Err(_) => panic!(
                    "got {} of {n} lines; walcast stderr:\n{}",
                    out.len(),
                    self.stderr()
                ),
            }
        }
        out
    }

    /// Lines that arrive within `quiet` (used to check that nothing more comes).
    pub fn drain(&mut self, quiet: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(quiet) {
            out.push(serde_json::from_str(&l).expect("json line"));
        }
        out
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// SIGTERM-free stop: SIGINT lets tail confirm what it printed and exit.
    pub fn interrupt(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-INT", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                return s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("tail did not exit on SIGINT; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident set size of a process, in KiB (VmHWM).
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
