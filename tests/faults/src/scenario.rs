//! One scenario's world and its steps.
//!
//! ```text
//!  writer ──direct──▶ Postgres (own cluster) ◀──FaultProxy── walcast serve ◀──ws── node subscribers
//!                         ▲                        │ /readyz polled every 50 ms
//!  fault (pg_ctl, SQL) ───┘        fault (pause/cut/refuse)
//! ```
//!
//! Every scenario owns its cluster, proxy, server, ports and directory
//! (`target/faults/<scenario>/`: server log, subscriber lines and stderr), so scenarios can run
//! side by side; by default they take turns (`FAULTS_CONCURRENCY`, 1) to keep the CPU use of a
//! small machine reasonable and latency figures honest.
//!
//! Standard audience (each its own Node process, the official client, one socket):
//! - `carol`: postgres_changes on `events` and `secured` (owns no row: sees every `events`
//!   row and no `secured` row) + the `room` channel (broadcast, presence);
//! - `alice`, `bob`: postgres_changes on `secured` (even ids are alice's, odd ones bob's);
//!   alice is also in `room`;
//! - `watcher`: `room` only; it sends the broadcast probes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::json;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use walcast_testkit::{ClusterOptions, FaultProxy, PgCluster, TestDb};

use crate::check::{self, Expect};
use crate::clock::now_ms;
use crate::knobs::{knob, knob_secs, let_run};
use crate::readyz::Readyz;
use crate::report::{self, Report};
use crate::server::{ServerConfig, Walcast};
use crate::subscriber::{Line, SubSpec, Subscriber};
use crate::token::token;
use crate::writer::{Writer, WriterConfig};

/// The `room` channel's topic.
pub const ROOM: &str = "room";

/// What a scenario is and how it is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub name: String,
    /// What is injected, for the report.
    pub fault: String,
    pub cluster_settings: Vec<(String, String)>,
    /// Extra `walcast serve` flags.
    pub server_args: Vec<String>,
    /// Keep row shapes (DDL scenario).
    pub keep_shape: bool,
    /// Route secured's policy through `faults_can_see` (policy fault scenarios).
    pub policy_function: bool,
    /// Extra subscribers on `secured` only that own no row (e.g. `mallory`).
    pub extra_secured: Vec<String>,
}

impl Options {
    pub fn new(name: &str, fault: &str) -> Options {
        Options {
            name: name.to_string(),
            fault: fault.to_string(),
            cluster_settings: Vec::new(),
            server_args: Vec::new(),
            keep_shape: false,
            policy_function: false,
            extra_secured: Vec::new(),
        }
    }
}

/// Who receives what.
#[derive(Debug, Clone)]
pub struct Audience {
    pub name: String,
    pub tables: Vec<&'static str>,
    pub room: bool,
}

impl Audience {
    /// May `name` see row `id` of `table`?
    pub fn may_see(&self, table: &str, id: i64) -> bool {
        match table {
            "events" => true,
            "secured" => crate::writer::owner(id) == self.name,
            _ => false,
        }
    }
}

fn standard_audience(extra_secured: &[String]) -> Vec<Audience> {
    let mut v = vec![
        Audience {
            name: "carol".into(),
            tables: vec!["events", "secured"],
            room: true,
        },
        Audience {
            name: "alice".into(),
            tables: vec!["secured"],
            room: true,
        },
        Audience {
            name: "bob".into(),
            tables: vec!["secured"],
            room: false,
        },
        Audience {
            name: "watcher".into(),
            tables: vec![],
            room: true,
        },
    ];
    for n in extra_secured {
        v.push(Audience {
            name: n.clone(),
            tables: vec!["secured"],
            room: false,
        });
    }
    v
}

static TURNS: OnceLock<Arc<Semaphore>> = OnceLock::new();

/// Marks on the scenario's timeline (ms since the epoch).
#[derive(Debug, Clone, Default)]
pub struct Marks {
    pub fault_start: Option<i64>,
    pub fault_end: Option<i64>,
    /// The last id every subscriber had received before the fault.
    pub synced_before_fault: Option<i64>,
    pub recovery_ms: Option<i64>,
    pub rss_before_fault_kb: Option<u64>,
    /// `walcast_replication_streaming` when the checks start.
    pub streaming_metric_end: Option<f64>,
}

/// A running scenario. Fields are public so a test can reach every piece.
pub struct Scenario {
    pub opts: Options,
    pub dir: PathBuf,
    pub cluster: PgCluster,
    pub db: TestDb,
    pub admin: tokio_postgres::Client,
    pub proxy: FaultProxy,
    pub secret: String,
    pub slot: String,
    pub server: Walcast,
    pub readyz: Readyz,
    pub writer: Writer,
    pub audience: Vec<Audience>,
    pub subs: Vec<Subscriber>,
    pub marks: Marks,
    /// Assertion failures so far (all reported at the end, not just the first).
    pub failures: Vec<String>,
    /// Probe results and other facts for the report.
    pub notes: Vec<String>,
    next_probe: i64,
    /// Extra committed ids outside the writer's (the bulk transaction), per table.
    pub extra_committed: Vec<(String, std::ops::RangeInclusive<i64>)>,
    _turn: OwnedSemaphorePermit,
}

impl Scenario {
    /// Cluster, schema, proxy, server (ready), readyz watch, subscribers (joined), writer.
    /// A setup failure is written to the report before the panic.
    pub async fn start(opts: Options) -> Scenario {
        let turns = TURNS
            .get_or_init(|| Arc::new(Semaphore::new(knob("FAULTS_CONCURRENCY", 1).max(1) as usize)))
            .clone();
        let turn = turns.acquire_owned().await.expect("semaphore closed");
        match Scenario::setup(opts.clone(), turn).await {
            Ok(s) => s,
            Err(e) => {
                let msg = format!("setup failed: {e:#}");
                report::write(&Report::setup_failure(&opts, &msg));
                panic!("{}: {msg}", opts.name);
            }
        }
    }

    async fn setup(opts: Options, turn: OwnedSemaphorePermit) -> Result<Scenario> {
        let dir = crate::paths::target_dir().join("faults").join(&opts.name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut settings = vec![
            ("wal_sender_timeout".to_string(), "60s".to_string()),
            ("max_wal_size".to_string(), "1GB".to_string()),
        ];
        settings.extend(opts.cluster_settings.iter().cloned());
        let cluster = PgCluster::start(ClusterOptions {
            settings,
            ..Default::default()
        })?;
        let db = cluster.fresh_database().await?;
        let admin = db.connect().await?;
        admin
            .batch_execute(crate::schema::SETUP)
            .await
            .context("schema")?;
        if opts.policy_function {
            admin
                .batch_execute(crate::schema::POLICY_THROUGH_FUNCTION)
                .await
                .context("policy function")?;
        }
        let proxy = FaultProxy::start(([127, 0, 0, 1], cluster.port()).into())?;
        let secret = format!("faults-secret-{}-{}", std::process::id(), now_ms());
        let slot = format!("faults_{}", opts.name.replace('-', "_"));
        let server = Walcast::start(
            &ServerConfig {
                database_url: proxy.url_for(db.url())?,
                jwt_secret: secret.clone(),
                slot: slot.clone(),
                extra_args: opts.server_args.clone(),
                log: dir.join("walcast.log"),
                port: None,
            },
            Duration::from_secs(60),
        )
        .await?;
        let readyz = Readyz::watch(server.port);
        let audience = standard_audience(&opts.extra_secured);
        let http = format!("http://127.0.0.1:{}", server.port);
        let mut subs = Vec::new();
        for a in &audience {
            let spec = SubSpec {
                name: a.name.clone(),
                token: token(&secret, "authenticated", &a.name)?,
                changes: (!a.tables.is_empty()).then(|| {
                    (
                        format!("changes-{}", a.name),
                        a.tables.iter().map(|t| t.to_string()).collect(),
                        opts.keep_shape,
                    )
                }),
                room: a.room.then(|| (ROOM.to_string(), a.name.clone())),
                session_id: None,
            };
            subs.push(Subscriber::spawn(&http, spec, &dir)?);
        }
        for s in &subs {
            s.wait_joined(Duration::from_secs(30)).await?;
        }
        let writer = Writer::start(WriterConfig {
            url: db.url().to_string(),
            rate: knob("FAULTS_RATE", 300),
            rollback_every: 20,
            keep_shape: opts.keep_shape,
        });
        Ok(Scenario {
            opts,
            dir,
            cluster,
            db,
            admin,
            proxy,
            secret,
            slot,
            server,
            readyz,
            writer,
            audience,
            subs,
            marks: Marks::default(),
            failures: Vec::new(),
            notes: Vec::new(),
            next_probe: 0,
            extra_committed: Vec::new(),
            _turn: turn,
        })
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    pub fn sub(&self, name: &str) -> &Subscriber {
        self.subs
            .iter()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no subscriber {name}"))
    }

    fn sub_mut(&mut self, name: &str) -> &mut Subscriber {
        self.subs
            .iter_mut()
            .find(|s| s.name() == name)
            .unwrap_or_else(|| panic!("no subscriber {name}"))
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("[{}] FAILURE: {msg}", self.opts.name);
        self.failures.push(msg);
    }

    pub fn note(&mut self, msg: impl Into<String>) {
        let msg = msg.into();
        eprintln!("[{}] {msg}", self.opts.name);
        self.notes.push(msg);
    }

    /// The normal run-up: let load run, wait until everyone has every row so far, probe
    /// broadcast and presence, remember RSS.
    pub async fn before_fault(&mut self) {
        let_run(knob_secs("FAULTS_LOAD_SECS", 2)).await;
        match self.sync("before the fault", Duration::from_secs(20)).await {
            Some(id) => self.marks.synced_before_fault = Some(id),
            None => self.marks.synced_before_fault = None,
        }
        self.probe_broadcast("before the fault", true).await;
        self.probe_presence("before the fault", true).await;
        self.marks.rss_before_fault_kb = self.server.rss().map(|r| r.rss_kb);
    }

    /// Wait until every subscriber has received every row it may see up to the writer's last
    /// committed id now; that id, or None (and a failure) at the deadline.
    pub async fn sync(&mut self, when: &str, timeout: Duration) -> Option<i64> {
        if self.server_gone(when) {
            return None;
        }
        let Some(last) = self.writer.last_committed() else {
            self.fail(format!("{when}: the writer has committed nothing"));
            return None;
        };
        let attempts: HashMap<i64, crate::writer::Outcome> = self
            .writer
            .attempts()
            .into_iter()
            .map(|a| (a.id, a.outcome))
            .collect();
        let mut lagging = Vec::new();
        for a in self.audience.clone() {
            for table in &a.tables {
                // The last committed row this subscriber may see.
                let want = (1..=last).rev().find(|id| {
                    a.may_see(table, *id)
                        && matches!(
                            attempts.get(id),
                            Some(crate::writer::Outcome::Committed { .. })
                        )
                });
                let Some(want) = want else { continue };
                let sub = self.sub(&a.name);
                let table = table.to_string();
                // Only the writer's ids count (1..=last): rows a scenario adds itself (the
                // large transaction's, numbered from 1,000,000,000) are delivered in commit
                // order too, and may arrive before writer rows committed after them.
                let ok = sub
                    .wait_until(timeout, |lines| {
                        lines.iter().any(|l| {
                            matches!(l, Line::Change { table: t, id, .. }
                                if *t == table && *id >= want && *id <= last)
                        })
                    })
                    .await;
                if !ok {
                    lagging.push(format!(
                        "{} on {table} (wanted id {want}, has {:?})",
                        a.name,
                        sub.max_id(&table)
                    ));
                }
            }
        }
        if lagging.is_empty() {
            Some(last)
        } else {
            self.fail(format!(
                "{when}: not every subscriber received the rows committed up to id {last} within {timeout:?}: {}",
                lagging.join(", ")
            ));
            None
        }
    }

    /// A broadcast from `watcher` must reach carol and alice.
    pub async fn probe_broadcast(&mut self, when: &str, required: bool) -> bool {
        if self.server_gone(when) {
            return false;
        }
        self.next_probe += 1;
        let n = self.next_probe;
        let sent = self
            .sub_mut("watcher")
            .command(json!({ "cmd": "broadcast", "event": "probe", "n": n }))
            .await;
        let mut ok = sent.is_ok();
        for name in ["carol", "alice"] {
            ok &= self
                .sub(name)
                .wait_until(Duration::from_secs(5), |lines| {
                    lines.iter().any(|l| {
                        matches!(l, Line::Broadcast { event, n: Some(m), .. } if event == "probe" && *m == n)
                    })
                })
                .await;
        }
        let msg = format!(
            "broadcast {when}: {}",
            if ok {
                "delivered"
            } else {
                "NOT delivered within 5 s"
            }
        );
        if ok || !required {
            self.note(msg);
        } else {
            self.fail(msg);
        }
        ok
    }

    /// A new client joining `room` must show up as a presence join at carol, alice and the
    /// watcher, and as a leave once it is gone.
    pub async fn probe_presence(&mut self, when: &str, required: bool) -> bool {
        if self.server_gone(when) {
            return false;
        }
        self.next_probe += 1;
        let key = format!("visitor-{}", self.next_probe);
        let ok = match self.presence_round(&key).await {
            Ok(()) => true,
            Err(e) => {
                let msg = format!("presence {when}: {e:#}");
                if required {
                    self.fail(msg);
                } else {
                    self.note(msg);
                }
                return false;
            }
        };
        self.note(format!("presence {when}: join and leave seen"));
        ok
    }

    async fn presence_round(&mut self, key: &str) -> Result<()> {
        let spec = SubSpec {
            name: key.to_string(),
            token: token(&self.secret, "authenticated", key)?,
            changes: None,
            room: Some((ROOM.to_string(), key.to_string())),
            session_id: None,
        };
        let visitor = Subscriber::spawn(&self.http_url(), spec, &self.dir)?;
        let joined = visitor.wait_joined(Duration::from_secs(10)).await;
        if let Err(e) = joined {
            visitor.exit().await;
            return Err(e);
        }
        let seen = |event: &'static str| {
            let key = key.to_string();
            move |lines: &[Line]| {
                lines.iter().any(|l| {
                    matches!(l, Line::Presence { event: e, keys, .. } if e == event && keys.contains(&key))
                })
            }
        };
        for name in ["carol", "alice", "watcher"] {
            if !self
                .sub(name)
                .wait_until(Duration::from_secs(5), seen("join"))
                .await
            {
                visitor.exit().await;
                anyhow::bail!("{name} did not see {key} join within 5 s");
            }
        }
        visitor.exit().await;
        for name in ["carol", "alice", "watcher"] {
            if !self
                .sub(name)
                .wait_until(Duration::from_secs(10), seen("leave"))
                .await
            {
                anyhow::bail!("{name} did not see {key} leave within 10 s");
            }
        }
        Ok(())
    }

    /// True (and a failure noted, once) when the server process has exited: waiting for it
    /// to deliver would only burn the deadline.
    pub fn server_gone(&mut self, when: &str) -> bool {
        let Some(status) = self.server.exited() else {
            return false;
        };
        if !self
            .failures
            .iter()
            .any(|f| f.starts_with("walcast exited"))
        {
            let tail = self.server.log_tail(3);
            self.fail(format!(
                "walcast exited ({status}) {when}; log tail: {tail}"
            ));
        }
        true
    }

    /// Drop the scenario's slot while walcast uses it: terminate the walsender holding it,
    /// then `pg_drop_replication_slot`, again until the drop wins the race against walcast's
    /// reconnection. Whether it was dropped.
    pub async fn drop_slot(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let mut last_err = String::new();
        while tokio::time::Instant::now() < deadline {
            let _ = self
                .admin
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE slot_name = $1 AND active_pid IS NOT NULL",
                    &[&self.slot],
                )
                .await;
            match self
                .admin
                .execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
            {
                Ok(_) => return true,
                Err(e) => {
                    last_err = e
                        .as_db_error()
                        .map(|d| d.message().to_string())
                        .unwrap_or_else(|| e.to_string())
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.fail(format!("could not drop the slot within 20 s: {last_err}"));
        false
    }

    /// Names and `wal_status` of every replication slot of the cluster.
    pub async fn slots(&self) -> Vec<(String, Option<String>)> {
        match self
            .admin
            .query(
                "SELECT slot_name::text, wal_status FROM pg_replication_slots ORDER BY 1",
                &[],
            )
            .await
        {
            Ok(rows) => rows.iter().map(|r| (r.get(0), r.get(1))).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// `/metrics` sample `name` (summed over labels).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (code, page) = crate::http::get(self.server.port, "/metrics", Duration::from_secs(2))
            .await
            .ok()?;
        if code != 200 {
            return None;
        }
        crate::http::metric(&page, name)
    }

    /// Send a command to subscriber `name`.
    pub async fn command(&mut self, name: &str, cmd: serde_json::Value) -> Result<()> {
        self.sub_mut(name).command(cmd).await
    }

    pub fn fault_begin(&mut self, what: &str) {
        self.marks.fault_start = Some(now_ms());
        self.note(format!("fault: {what}"));
    }

    pub fn fault_end(&mut self) {
        self.marks.fault_end = Some(now_ms());
        self.note("fault over".to_string());
    }

    /// After the fault: wait for `/readyz` 200 and for carol's first change received after the
    /// fault ended (the recovery time).
    pub async fn recover(&mut self, timeout: Duration) {
        if self.server_gone("after the fault") {
            return;
        }
        let end = self.marks.fault_end.unwrap_or_else(now_ms);
        if !self.readyz.wait_for(timeout, |t| t.code == 200).await {
            self.fail(format!(
                "/readyz not 200 within {timeout:?} after the fault (now: {})",
                self.readyz.current().map(|t| t.label()).unwrap_or_default()
            ));
        }
        let got = self
            .sub("carol")
            .wait_until(timeout, |lines| {
                lines
                    .iter()
                    .any(|l| matches!(l, Line::Change { t, .. } if *t >= end))
            })
            .await;
        if got {
            let first = self.sub("carol").with_lines(|lines| {
                lines.iter().find_map(|l| match l {
                    Line::Change { t, .. } if *t >= end => Some(*t),
                    _ => None,
                })
            });
            self.marks.recovery_ms = first.map(|t| t - end);
        } else {
            self.fail(format!(
                "no change delivered to carol within {timeout:?} after the fault ended"
            ));
        }
    }

    /// Let load run after recovery and probe broadcast once more.
    pub async fn after_fault(&mut self) {
        let_run(knob_secs("FAULTS_LOAD_SECS", 2)).await;
        self.probe_broadcast("after recovery", true).await;
    }

    /// Stop the writer, wait for the last rows, check everything, write the report line, and
    /// panic with every failure.
    pub async fn finish(mut self, expect: Expect) {
        let attempts = self.writer.stop().await;
        if expect.complete.wants_tail() {
            self.sync("at the end", Duration::from_secs(expect.final_wait_secs))
                .await;
        }
        self.marks.streaming_metric_end = self.metric("walcast_replication_streaming").await;
        let results = check::run(&mut self, &attempts, &expect);
        if self.opts.keep_shape {
            let (checked, bad) = check::shapes(&self, "carol", &attempts);
            if bad.is_empty() {
                self.note(format!("row shapes: {checked} rows checked, all right"));
            } else {
                self.fail(format!(
                    "row shapes: {} of {checked} rows delivered with the wrong shape (first: {})",
                    bad.len(),
                    bad[..bad.len().min(3)].join("; ")
                ));
            }
        }
        let report = Report::build(&self, &attempts, &expect, &results);
        report::write(&report);
        report::announce(&report);
        if !self.failures.is_empty() {
            panic!(
                "{} failed ({} problem(s)); logs in {}:\n  - {}",
                self.opts.name,
                self.failures.len(),
                self.dir.display(),
                self.failures.join("\n  - ")
            );
        }
    }
}
