//! Throwaway `redis-server` processes for cluster tests: one per test, on a free port, in a
//! temp dir of its own, keeping nothing on disk. Stoppable and restartable on the same port,
//! so tests can take Redis away from a running cluster and bring it back.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A `redis-server` owned by the test; killed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Start a server on a free port of 127.0.0.1 and wait until it answers.
    pub fn start() -> Result<RedisServer> {
        let port = free_port().context("no free port for redis-server")?;
        let dir = std::env::temp_dir().join(format!("walcast-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut server = RedisServer {
            port,
            dir,
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The redis-server's pid while it runs (benchmarks read its CPU time in `/proc`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is running (started and not stopped).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kill the server (SIGKILL): clients see their connections reset and every key gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start it again on the same port (empty: nothing is persisted), after [`Self::stop`].
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let child = Command::new(redis_server_binary())
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--loglevel",
                "warning",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start redis-server (scripts/setup installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ping(self.port).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "redis-server on port {} did not answer PING within 10 s",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `redis-server` on PATH, or Debian's location.
fn redis_server_binary() -> String {
    std::env::var("WALCAST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".to_string())
}

fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One inline `PING`, answered `+PONG`.
fn ping(port: u16) -> io::Result<()> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    s.write_all(b"PING\r\n")?;
    let mut buf = [0u8; 16];
    let n = s.read(&mut buf)?;
    if buf[..n].starts_with(b"+PONG") {
        Ok(())
    } else {
        Err(io::Error::other("unexpected PING reply"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_stops_and_restarts_on_the_same_port() {
        let mut redis = RedisServer::start().expect("redis-server starts");
        let port = redis.port();
        assert!(ping(port).is_ok());
        let pid = redis.pid().expect("a running server has a pid");
        assert!(std::path::Path::new(&format!("/proc/{pid}/stat")).exists());
        redis.stop();
        assert!(!redis.is_running());
        assert_eq!(redis.pid(), None);
        assert!(ping(port).is_err(), "a stopped server does not answer");
        redis.restart().expect("restarts");
        assert_eq!(redis.port(), port);
        assert!(ping(port).is_ok());
    }
}
