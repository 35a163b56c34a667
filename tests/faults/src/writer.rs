//! The writer: one connection straight to Postgres (never through the proxy, so network
//! faults between walcast and Postgres do not slow it), committing one transaction per tick
//! at a fixed rate. Transaction `id` inserts row `id` into `public.events` (no RLS) and into
//! `public.secured` (RLS, owner alice for even ids, bob for odd ones), so ids increase in
//! commit order. Every `rollback_every`-th id is inserted and rolled back on purpose.
//!
//! What it records per id:
//! - `Committed`: the COMMIT was acknowledged (with the acknowledgement time);
//! - `RolledBack`: certainly not committed (rolled back on purpose, or the statement got an
//!   ERROR, which aborts its implicit transaction);
//! - `Maybe`: the outcome is unknown: the connection died, timed out or sent a FATAL while
//!   the commit was in flight. Checks accept such a row either way.
//!
//! An id is never reused: after a failure the writer reconnects (backing off 100 ms) and
//! carries on with the next one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::types::Type;

use crate::clock::now_ms;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed { ack_ms: i64 },
    RolledBack,
    Maybe,
}

/// One transaction attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub id: i64,
    pub sent_ms: i64,
    pub outcome: Outcome,
    /// `to_jsonb` of the `events` row as inserted (the table's shape at that commit), when
    /// the writer was asked to keep it.
    pub shape: Option<serde_json::Value>,
}

/// Who may see row `id` of `public.secured`.
pub fn owner(id: i64) -> &'static str {
    if id % 2 == 0 {
        "alice"
    } else {
        "bob"
    }
}

#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Direct URL of the database.
    pub url: String,
    /// Transactions per second.
    pub rate: u64,
    /// Every n-th id is rolled back on purpose (0: never).
    pub rollback_every: i64,
    /// Keep each committed row's shape (`to_jsonb(events.*)`).
    pub keep_shape: bool,
}

const INSERT: &str = "WITH e AS (INSERT INTO public.events (id, owner, body) VALUES ($1, $2, $3) \
                        RETURNING to_jsonb(events.*) AS j), \
                      s AS (INSERT INTO public.secured (id, owner, body) VALUES ($1, $2, $3) RETURNING 1) \
                      SELECT j::text FROM e";

/// The running writer; stop it with [`Writer::stop`].
#[derive(Debug)]
pub struct Writer {
    log: Arc<Mutex<Vec<Attempt>>>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Writer {
    pub fn start(cfg: WriterConfig) -> Writer {
        let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(cfg, Arc::clone(&log), stop_rx));
        Writer {
            log,
            stop,
            task: Some(task),
        }
    }

    /// Every attempt so far, in id order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.log.lock().unwrap().clone()
    }

    /// The highest committed id so far.
    pub fn last_committed(&self) -> Option<i64> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .rev()
            .find(|a| matches!(a.outcome, Outcome::Committed { .. }))
            .map(|a| a.id)
    }

    /// Committed transactions so far.
    pub fn committed(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|a| matches!(a.outcome, Outcome::Committed { .. }))
            .count()
    }

    /// Stop after the transaction in flight; every attempt.
    pub async fn stop(&mut self) -> Vec<Attempt> {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        self.attempts()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn run(cfg: WriterConfig, log: Arc<Mutex<Vec<Attempt>>>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / cfg.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut conn: Option<(tokio_postgres::Client, tokio_postgres::Statement)> = None;
    let mut next_id: i64 = 1;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => {}
        }
        if conn.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            conn = connect(&cfg.url).await;
            if conn.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let (client, insert) = conn.as_mut().expect("connected above");
        let id = next_id;
        next_id += 1;
        let sent_ms = now_ms();
        let rollback = cfg.rollback_every > 0 && id % cfg.rollback_every == 0;
        let body = format!("row {id}");
        let (outcome, shape, drop_conn) = if rollback {
            // Never committed, whatever happens on the way.
            let r = tokio::time::timeout(Duration::from_secs(10), async {
                let tx = client.transaction().await?;
                tx.query(&*insert, &[&id, &owner(id), &body]).await?;
                tx.rollback().await
            })
            .await;
            (Outcome::RolledBack, None, !matches!(r, Ok(Ok(()))))
        } else {
            match tokio::time::timeout(
                Duration::from_secs(10),
                client.query_one(&*insert, &[&id, &owner(id), &body]),
            )
            .await
            {
                Ok(Ok(row)) => {
                    let shape = if cfg.keep_shape {
                        row.try_get::<_, String>(0)
                            .ok()
                            .and_then(|j| serde_json::from_str(&j).ok())
                    } else {
                        None
                    };
                    (Outcome::Committed { ack_ms: now_ms() }, shape, false)
                }
                Ok(Err(e)) => {
                    // An ERROR aborts the implicit transaction; a FATAL or a lost connection
                    // may have come after the commit.
                    let definite = e.as_db_error().is_some_and(|d| {
                        d.severity() == "ERROR" && !d.code().code().starts_with("57P")
                    });
                    let outcome = if definite {
                        Outcome::RolledBack
                    } else {
                        Outcome::Maybe
                    };
                    (outcome, None, client.is_closed() || !definite)
                }
                Err(_) => (Outcome::Maybe, None, true),
            }
        };
        log.lock().unwrap().push(Attempt {
            id,
            sent_ms,
            outcome,
            shape,
        });
        if drop_conn {
            conn = None;
        }
    }
}

async fn connect(url: &str) -> Option<(tokio_postgres::Client, tokio_postgres::Statement)> {
    let fut = async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let stmt = client
            .prepare_typed(INSERT, &[Type::INT8, Type::TEXT, Type::TEXT])
            .await?;
        Ok::<_, tokio_postgres::Error>((client, stmt))
    };
    match tokio::time::timeout(Duration::from_secs(3), fut).await {
        Ok(Ok(c)) => Some(c),
        _ => None,
    }
}
