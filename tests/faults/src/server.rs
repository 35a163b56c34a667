//! The real `walcast serve` binary as a child process: started with its logs in a file,
//! waited for on `/readyz`, watched for exit, measured through `/proc/<pid>/status`.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

use crate::paths::target_dir;

/// `target/debug/walcast` (or `FAULTS_WALCAST_BIN`). Never built from a test: `scripts/test`
/// builds it before `cargo test`.
pub fn walcast_binary() -> Result<PathBuf> {
    let path = match std::env::var_os("FAULTS_WALCAST_BIN") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("debug").join("walcast"),
    };
    if !path.exists() {
        bail!(
            "{} not found: the fault suite runs the real server binary; build it first with \
             `cargo build --locked -p walcast-server --bin walcast` (scripts/test does), or point \
             FAULTS_WALCAST_BIN at one",
            path.display()
        );
    }
    Ok(path)
}

/// How to start one server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Usually the proxy's URL, so the network between walcast and Postgres can be faulted.
    pub database_url: String,
    pub jwt_secret: String,
    pub slot: String,
    /// Flags beyond the fault suite's defaults.
    pub extra_args: Vec<String>,
    /// Where the log goes.
    pub log: PathBuf,
    /// Listen here (a restart on the port its clients reconnect to); a free port when None.
    pub port: Option<u16>,
}

/// `/proc/<pid>/status` memory figures, in kB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rss {
    pub rss_kb: u64,
    pub hwm_kb: u64,
}

/// A running `walcast serve`; killed when dropped.
#[derive(Debug)]
pub struct Walcast {
    child: Child,
    pub port: u16,
    pub pid: u32,
    pub log: PathBuf,
    exit: Option<ExitStatus>,
}

impl Walcast {
    /// Start the server (does not wait for it to be ready).
    pub fn spawn(cfg: &ServerConfig) -> Result<Walcast> {
        let bin = walcast_binary()?;
        let port = match cfg.port {
            Some(p) => p,
            None => free_port()?,
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&cfg.log)
            .with_context(|| format!("creating {}", cfg.log.display()))?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--database-url")
            .arg(&cfg.database_url)
            .arg("--jwt-secret")
            .arg(&cfg.jwt_secret)
            .arg("--slot")
            .arg(&cfg.slot)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1"])
            .args(["--channel-error-backoff-ms", "0"])
            .args(["--connect-error-backoff-ms", "0"])
            .args(&cfg.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("FAULTS_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = cmd.spawn().context("spawning walcast")?;
        let pid = child.id().context("walcast has no pid")?;
        Ok(Walcast {
            child,
            port,
            pid,
            log: cfg.log.clone(),
            exit: None,
        })
    }

    /// Start and wait until `/readyz` answers 200.
    pub async fn start(cfg: &ServerConfig, timeout: Duration) -> Result<Walcast> {
        let mut w = Walcast::spawn(cfg)?;
        w.wait_ready(timeout).await?;
        Ok(w)
    }

    /// Wait for `/readyz` 200; fails early when the process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(status) = self.exited() {
                bail!(
                    "walcast exited ({status}) before /readyz answered 200; log tail:\n{}",
                    self.log_tail(30)
                );
            }
            match crate::http::get(self.port, "/readyz", Duration::from_secs(2)).await {
                Ok((200, _)) => return Ok(()),
                Ok((code, body)) => last = format!("{code} {}", body.trim()),
                Err(e) => last = format!("{e:#}"),
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "walcast not ready after {timeout:?} (last /readyz: {last}); log tail:\n{}",
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The exit status once the process has exited (remembered).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Memory figures while the process lives.
    pub fn rss(&self) -> Option<Rss> {
        read_rss(self.pid)
    }

    /// SIGTERM, then wait up to `grace` for the exit (SIGKILL after that).
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            match tokio::time::timeout(grace, self.child.wait()).await {
                Ok(Ok(s)) => self.exit = Some(s),
                _ => {
                    let _ = self.child.kill().await;
                    self.exit = self.child.try_wait().ok().flatten();
                }
            }
        }
        self.exit
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        tail(&self.log, n)
    }
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    strip_ansi(&lines[lines.len().saturating_sub(n)..].join("\n"))
}

/// The text without terminal colour sequences (`ESC [ ... m`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn read_rss(pid: u32) -> Option<Rss> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some(Rss {
        rss_kb: field("VmRSS:")?,
        hwm_kb: field("VmHWM:")?,
    })
}

/// A free TCP port on 127.0.0.1 (bind :0, read, close).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(l.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn colour_sequences_are_removed() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m sql"),
            "2026  WARN sql"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }
}
