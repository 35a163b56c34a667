//! Worker processes: the benchmark binary re-executed with `--worker` to hold a share of the
//! client sockets (one process may open at most 20,000 files). The parent talks to each over
//! its stdin and reads its report lines from its stdout.

use std::process::Stdio;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};

/// A running worker and its pipes.
pub struct Worker {
    pub child: tokio::process::Child,
    pub stdin: tokio::process::ChildStdin,
    pub lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Worker {
    /// Start this binary as `<exe> --worker <args>`; killed when dropped.
    pub fn spawn<I, S>(args: I) -> Result<Worker>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--worker")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        Ok(Worker {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }
}

/// Worker `w` of `n`'s share of `total` items: `(first, count)`; the shares cover
/// `0..total` exactly and differ in size by at most one.
pub fn share(total: usize, w: usize, n: usize) -> (usize, usize) {
    let first = w * total / n;
    (first, (w + 1) * total / n - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for (total, n) in [(19_000, 2), (10_001, 3), (5, 7)] {
            let mut next = 0;
            for w in 0..n {
                let (first, count) = share(total, w, n);
                assert_eq!(first, next);
                next += count;
            }
            assert_eq!(next, total);
        }
    }
}
