//! `/readyz` watched all along: a task polls it every 50 ms and keeps each change of answer
//! (status and body), so a test can say what readiness said before, during and after a fault.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::now_ms;

/// One answer, kept when it differs from the previous one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub t_ms: i64,
    /// 0 when there was no answer at all (process gone, listener closed).
    pub code: u16,
    pub body: String,
}

impl Transition {
    /// `200 ready`, `503 not ready: …`, `no answer`.
    pub fn label(&self) -> String {
        if self.code == 0 {
            "no answer".into()
        } else {
            format!("{} {}", self.code, self.body)
        }
    }
}

/// The poller; stops when dropped.
#[derive(Debug)]
pub struct Readyz {
    seen: Arc<Mutex<Vec<Transition>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Readyz {
    pub fn watch(port: u16) -> Readyz {
        let seen: Arc<Mutex<Vec<Transition>>> = Arc::default();
        let keep = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            loop {
                let (code, body) =
                    match crate::http::get(port, "/readyz", Duration::from_millis(500)).await {
                        Ok((code, body)) => (code, body.trim().to_string()),
                        Err(_) => (0, String::new()),
                    };
                {
                    let mut seen = keep.lock().unwrap();
                    let changed = seen
                        .last()
                        .is_none_or(|last| last.code != code || last.body != body);
                    if changed {
                        seen.push(Transition {
                            t_ms: now_ms(),
                            code,
                            body,
                        });
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Readyz { seen, task }
    }

    pub fn transitions(&self) -> Vec<Transition> {
        self.seen.lock().unwrap().clone()
    }

    pub fn current(&self) -> Option<Transition> {
        self.seen.lock().unwrap().last().cloned()
    }

    /// Wait until the latest answer satisfies `pred`; false at the deadline.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&Transition) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.current().as_ref().is_some_and(&pred) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Readyz {
    fn drop(&mut self) {
        self.task.abort();
    }
}
