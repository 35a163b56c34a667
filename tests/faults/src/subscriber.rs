//! A subscriber: `node tests/faults/node/subscriber.mjs` (the official client) as a child
//! process. Its stdout lines (see the script's header for the protocol) are parsed into
//! [`Line`]s as they come; commands go to its stdin.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};

use crate::paths::repo_root;

/// What one subscriber process joins.
#[derive(Debug, Clone)]
pub struct SubSpec {
    pub name: String,
    pub token: String,
    /// postgres_changes: (topic, tables, print row shapes).
    pub changes: Option<(String, Vec<String>, bool)>,
    /// broadcast + presence: (topic, presence key).
    pub room: Option<(String, String)>,
    /// Resume the socket's channels under this session (the `session_id` socket parameter).
    pub session_id: Option<String>,
}

/// One parsed line.
#[derive(Debug, Clone)]
pub enum Line {
    Socket {
        event: String,
        code: Option<i64>,
        t: i64,
    },
    Status {
        ch: String,
        status: String,
        err: Option<String>,
        t: i64,
    },
    Change {
        table: String,
        id: i64,
        shape: Option<Value>,
        t: i64,
    },
    System {
        ch: String,
        status: String,
        message: String,
        t: i64,
    },
    Broadcast {
        event: String,
        n: Option<i64>,
        t: i64,
    },
    Presence {
        event: String,
        keys: Vec<String>,
        t: i64,
    },
    /// The client sent a frame (what a resumed session's repeat rule counts from).
    Sent {
        t: i64,
    },
    Other(Value),
}

impl Line {
    fn parse(v: Value) -> Line {
        let t = v["t"].as_i64().unwrap_or(0);
        let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
        match v["k"].as_str() {
            Some("socket") => Line::Socket {
                event: s("event"),
                code: v["code"].as_i64(),
                t,
            },
            Some("status") => Line::Status {
                ch: s("ch"),
                status: s("status"),
                err: v["err"].as_str().map(str::to_string),
                t,
            },
            Some("change") => match v["id"].as_i64() {
                Some(id) => Line::Change {
                    table: s("table"),
                    id,
                    shape: v.get("shape").cloned(),
                    t,
                },
                None => Line::Other(v),
            },
            Some("system") => Line::System {
                ch: s("ch"),
                status: s("status"),
                message: s("message"),
                t,
            },
            Some("broadcast") => Line::Broadcast {
                event: s("event"),
                n: v["n"].as_i64(),
                t,
            },
            Some("out") => Line::Sent { t },
            Some("presence") => Line::Presence {
                event: s("event"),
                keys: v["keys"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|k| k.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
                t,
            },
            _ => Line::Other(v),
        }
    }
}

/// A running subscriber; killed when dropped.
#[derive(Debug)]
pub struct Subscriber {
    pub spec: SubSpec,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<Mutex<Vec<Line>>>,
    pub stderr_log: PathBuf,
}

/// The Node script and the client's node_modules, checked before anything starts.
pub fn node_script() -> Result<PathBuf> {
    let root = repo_root();
    let modules = root.join("tests/e2e/node/node_modules/@supabase/supabase-js");
    if !modules.exists() {
        bail!(
            "{} is missing: the fault suite's subscribers use the pinned official client of \
             tests/e2e/node; install it with `bash scripts/node-deps` (scripts/setup does)",
            modules.display()
        );
    }
    Ok(root.join("tests/faults/node/subscriber.mjs"))
}

impl Subscriber {
    /// Start `node subscriber.mjs` against `http_url`.
    pub fn spawn(http_url: &str, spec: SubSpec, dir: &Path) -> Result<Subscriber> {
        let script = node_script()?;
        let mut cfg = json!({ "url": http_url, "token": spec.token, "name": spec.name });
        if let Some((topic, tables, shape)) = &spec.changes {
            cfg["changes"] = json!({ "topic": topic, "tables": tables, "shape": shape });
        }
        if let Some((topic, key)) = &spec.room {
            cfg["room"] = json!({ "topic": topic, "presenceKey": key });
        }
        if let Some(id) = &spec.session_id {
            cfg["sessionId"] = json!(id);
        }
        let stderr_log = dir.join(format!("sub-{}.stderr", spec.name));
        let stderr = std::fs::File::create(&stderr_log)?;
        let mut child = Command::new("node")
            .arg(&script)
            .env("FAULTS_SUB", cfg.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("spawning node (Node 20+ is needed for the fault suite)")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stdin = child.stdin.take();
        let lines: Arc<Mutex<Vec<Line>>> = Arc::default();
        let keep = Arc::clone(&lines);
        let raw_log = dir.join(format!("sub-{}.jsonl", spec.name));
        tokio::spawn(async move {
            let mut raw = tokio::fs::File::create(&raw_log).await.ok();
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if let Some(f) = raw.as_mut() {
                    let _ = f.write_all(line.as_bytes()).await;
                    let _ = f.write_all(b"\n").await;
                }
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    keep.lock().unwrap().push(Line::parse(v));
                }
            }
            if let Some(f) = raw.as_mut() {
                let _ = f.flush().await;
            }
        });
        Ok(Subscriber {
            spec,
            child,
            stdin,
            lines,
            stderr_log,
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<Line> {
        self.lines.lock().unwrap().clone()
    }

    /// Run `f` over the lines without copying them.
    pub fn with_lines<T>(&self, f: impl FnOnce(&[Line]) -> T) -> T {
        f(&self.lines.lock().unwrap())
    }

    /// Wait until `pred(lines)`; false at the deadline.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&[Line]) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.with_lines(&pred) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until every channel it asked for reported SUBSCRIBED (and, with a room, its own
    /// presence is in the synced state).
    pub async fn wait_joined(&self, timeout: Duration) -> Result<()> {
        let want_changes = self.spec.changes.is_some();
        let room_key = self.spec.room.as_ref().map(|(_, k)| k.clone());
        let ok = self
            .wait_until(timeout, |lines| {
                let sub = |c: &str| {
                    lines.iter().any(|l| {
                        matches!(l, Line::Status { ch, status, .. } if ch == c && status == "SUBSCRIBED")
                    })
                };
                (!want_changes || sub("changes"))
                    && room_key.as_ref().is_none_or(|k| {
                        sub("room")
                            && lines.iter().any(|l| {
                                matches!(l, Line::Presence { event, keys, .. } if event == "sync" && keys.contains(k))
                            })
                    })
            })
            .await;
        if !ok {
            bail!(
                "subscriber {} did not join within {timeout:?}; its lines: {:?}; stderr: {}",
                self.name(),
                self.lines().iter().take(20).collect::<Vec<_>>(),
                crate::server::tail(&self.stderr_log, 20)
            );
        }
        Ok(())
    }

    /// Send one command line.
    pub async fn command(&mut self, cmd: Value) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(format!("{cmd}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Ask it to leave cleanly, then make sure it is gone.
    pub async fn exit(mut self) {
        let _ = self.command(json!({ "cmd": "exit" })).await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }

    /// Has the process exited (crashed)?
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    // ---- summaries

    /// (id, receive time) of every change on `table`, in arrival order.
    pub fn changes(&self, table: &str) -> Vec<(i64, i64)> {
        self.with_lines(|lines| {
            lines
                .iter()
                .filter_map(|l| match l {
                    Line::Change {
                        table: tb, id, t, ..
                    } if tb == table => Some((*id, *t)),
                    _ => None,
                })
                .collect()
        })
    }

    /// Highest id received on `table`.
    pub fn max_id(&self, table: &str) -> Option<i64> {
        self.with_lines(|lines| {
            lines
                .iter()
                .filter_map(|l| match l {
                    Line::Change { table: tb, id, .. } if tb == table => Some(*id),
                    _ => None,
                })
                .max()
        })
    }

    /// System messages of channel `ch`: (status, message, t).
    pub fn system(&self, ch: &str) -> Vec<(String, String, i64)> {
        self.with_lines(|lines| {
            lines
                .iter()
                .filter_map(|l| match l {
                    Line::System {
                        ch: c,
                        status,
                        message,
                        t,
                    } if c == ch => Some((status.clone(), message.clone(), *t)),
                    _ => None,
                })
                .collect()
        })
    }

    /// Socket closes and errors seen (the client reconnects by itself after them), counted
    /// by kind: `close 1012 x1`, `error x30`.
    pub fn socket_drops(&self) -> Vec<String> {
        self.with_lines(|lines| {
            let kinds = lines.iter().filter_map(|l| match l {
                Line::Socket { event, code, .. } if event != "open" => Some(format!(
                    "{event}{}",
                    code.map(|c| format!(" {c}")).unwrap_or_default()
                )),
                _ => None,
            });
            count_kinds(kinds)
        })
    }

    /// Channel statuses other than SUBSCRIBED (CHANNEL_ERROR, TIMED_OUT, CLOSED), counted by
    /// kind.
    pub fn bad_statuses(&self) -> Vec<String> {
        self.with_lines(|lines| {
            let kinds = lines.iter().filter_map(|l| match l {
                Line::Status {
                    ch, status, err, ..
                } if status != "SUBSCRIBED" => Some(format!(
                    "{ch}: {status}{}",
                    err.as_ref().map(|e| format!(" ({e})")).unwrap_or_default()
                )),
                _ => None,
            });
            count_kinds(kinds)
        })
    }
}

/// `["a", "a", "b"]` → `["a x2", "b x1"]`, in first-seen order.
fn count_kinds(items: impl Iterator<Item = String>) -> Vec<String> {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for item in items {
        match counts.iter_mut().find(|(k, _)| *k == item) {
            Some((_, n)) => *n += 1,
            None => counts.push((item, 1)),
        }
    }
    counts
        .into_iter()
        .map(|(k, n)| format!("{k} x{n}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{count_kinds, Line};
    use serde_json::json;

    #[test]
    fn kinds_are_counted_in_first_seen_order() {
        let items = ["close 1006", "error", "close 1006"].map(String::from);
        assert_eq!(
            count_kinds(items.into_iter()),
            vec!["close 1006 x2".to_string(), "error x1".to_string()]
        );
    }

    #[test]
    fn lines_parse_by_kind() {
        let change =
            Line::parse(json!({"k":"change","table":"events","type":"INSERT","id":7,"t":5}));
        assert!(matches!(change, Line::Change { ref table, id: 7, t: 5, .. } if table == "events"));
        // A change without a numeric id is kept, not mistaken for one.
        let odd = Line::parse(json!({"k":"change","table":"events","id":"7"}));
        assert!(matches!(odd, Line::Other(_)));
        let sys =
            Line::parse(json!({"k":"system","ch":"changes","status":"error","message":"m","t":1}));
        assert!(matches!(sys, Line::System { ref status, .. } if status == "error"));
    }
}
