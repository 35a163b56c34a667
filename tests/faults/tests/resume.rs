//! Session resume with the official client (issue #12, part 1): a supabase-js socket opened
//! with `params: { session_id }` loses nothing across a dropped connection, a `kill -9` of
//! walcast and a rolling (SIGTERM) restart; another user presenting the same id resumes
//! nothing; an expired window and an overflowing buffer are told, not silent.
//!
//! ```text
//!  writer ─direct─▶ Postgres ◀── walcast serve (fixed port, restarted in place)
//!                                   ▲
//!            supabase-js ─(front proxy, cut in the TCP scenario)─┘
//! ```
//!
//! What every resumed subscriber is held to, from the first row it received to the writer's
//! last commit: every committed row it may see arrives; first arrivals are in commit order;
//! a row arrives twice only if it first arrived after the client last sent a frame before the
//! connection died (the documented repeat rule; after a `kill -9` also within the second the
//! server's session record may lag). A subscriber without a session, beside it, shows the gap
//! that resume closes.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use walcast_faults::clock::now_ms;
use walcast_faults::server::{free_port, ServerConfig, Walcast};
use walcast_faults::subscriber::{Line, SubSpec, Subscriber};
use walcast_faults::token::token;
use walcast_faults::writer::{owner, Outcome, Writer, WriterConfig};
use walcast_testkit::{ClusterOptions, FaultProxy, PgCluster, TestDb};

/// One scenario's world: a cluster, walcast on a fixed port, a writer.
struct World {
    name: String,
    dir: PathBuf,
    _cluster: PgCluster,
    _db: TestDb,
    secret: String,
    cfg: ServerConfig,
    server: Walcast,
    writer: Writer,
}

impl World {
    async fn start(name: &str, server_args: &[&str]) -> Result<World> {
        let dir = walcast_faults::paths::target_dir()
            .join("faults")
            .join(format!("resume-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let cluster = PgCluster::start(ClusterOptions::default())?;
        let db = cluster.fresh_database().await?;
        db.connect()
            .await?
            .batch_execute(walcast_faults::schema::SETUP)
            .await
            .context("schema")?;
        let secret = format!("resume-secret-{}-{}", std::process::id(), now_ms());
        let cfg = ServerConfig {
            database_url: db.url().to_string(),
            jwt_secret: secret.clone(),
            slot: format!("resume_{}", name.replace('-', "_")),
            extra_args: server_args.iter().map(|s| s.to_string()).collect(),
            log: dir.join("walcast.log"),
            // Clients reconnect to the same address after a restart.
            port: Some(free_port()?),
        };
        let server = Walcast::start(&cfg, Duration::from_secs(60)).await?;
        let writer = Writer::start(WriterConfig {
            url: db.url().to_string(),
            rate: 200,
            rollback_every: 20,
            keep_shape: false,
        });
        Ok(World {
            name: name.to_string(),
            dir,
            _cluster: cluster,
            _db: db,
            secret,
            cfg,
            server,
            writer,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    /// A subscriber on `table` under topic `topic`, as user `user`.
    async fn subscribe(
        &self,
        url: &str,
        label: &str,
        user: &str,
        topic: &str,
        table: &str,
        session_id: Option<&str>,
    ) -> Result<Subscriber> {
        let spec = SubSpec {
            name: label.to_string(),
            token: token(&self.secret, "authenticated", user)?,
            changes: Some((topic.to_string(), vec![table.to_string()], false)),
            room: None,
            session_id: session_id.map(str::to_string),
        };
        let sub = Subscriber::spawn(url, spec, &self.dir)?;
        sub.wait_joined(Duration::from_secs(30)).await?;
        Ok(sub)
    }

    async fn restart(&mut self) -> Result<()> {
        self.server = Walcast::start(&self.cfg, Duration::from_secs(60)).await?;
        Ok(())
    }

    /// Stop writing; the committed ids, in commit order, with their acknowledgement times.
    async fn stop_writing(&mut self) -> Vec<(i64, i64)> {
        self.writer
            .stop()
            .await
            .iter()
            .filter_map(|a| match a.outcome {
                Outcome::Committed { ack_ms } => Some((a.id, ack_ms)),
                _ => None,
            })
            .collect()
    }

    fn log_tail(&self) -> String {
        self.server.log_tail(40)
    }
}

/// A session id unique to this run.
fn session_id(label: &str) -> String {
    format!("{label}-{}-{}", std::process::id(), now_ms())
}

/// What one subscriber received, judged against the commits.
#[derive(Debug, Default)]
struct Verdict {
    expected: usize,
    missing: Vec<i64>,
    out_of_order: Vec<i64>,
    repeats: usize,
    /// Repeats the rule does not allow: (id, first arrival, last frame sent before the drop).
    bad_repeats: Vec<(i64, i64, i64)>,
    reconnects: usize,
    /// Rows committed while the client had no socket.
    committed_while_away: usize,
}

impl Verdict {
    fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if !self.missing.is_empty() {
            f.push(format!(
                "{} of {} rows missing (first: {:?})",
                self.missing.len(),
                self.expected,
                &self.missing[..self.missing.len().min(10)]
            ));
        }
        if !self.out_of_order.is_empty() {
            f.push(format!("out of commit order: {:?}", self.out_of_order));
        }
        if !self.bad_repeats.is_empty() {
            f.push(format!(
                "{} repeats outside the rule (id, first arrival, last frame before the drop): {:?}",
                self.bad_repeats.len(),
                &self.bad_repeats[..self.bad_repeats.len().min(10)]
            ));
        }
        f
    }
}

/// Judge `lines` (of a subscriber on `table`) against `committed`, for rows `may_see`, from
/// the first row received through the last commit. `slack_ms` widens the repeat window
/// backwards (a crash: the session record may lag by a second).
fn judge(
    lines: &[Line],
    table: &str,
    committed: &[(i64, i64)],
    may_see: impl Fn(i64) -> bool,
    slack_ms: i64,
) -> Verdict {
    let mut v = Verdict::default();
    let arrivals: Vec<(i64, i64)> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Change {
                table: t,
                id,
                t: at,
                ..
            } if t == table => Some((*id, *at)),
            _ => None,
        })
        .collect();
    let sent: Vec<i64> = lines
        .iter()
        .filter_map(|l| match l {
            Line::Sent { t } => Some(*t),
            _ => None,
        })
        .collect();
    // (close, next open) of every drop.
    let mut drops: Vec<(i64, i64)> = Vec::new();
    let mut closed_at = None;
    for l in lines {
        if let Line::Socket { event, t, .. } = l {
            match (event.as_str(), closed_at) {
                ("close", None) => closed_at = Some(*t),
                ("open", Some(c)) => {
                    drops.push((c, *t));
                    closed_at = None;
                }
                _ => {}
            }
        }
    }
    v.reconnects = drops.len();
    v.committed_while_away = committed
        .iter()
        .filter(|(id, ack)| may_see(*id) && drops.iter().any(|(c, o)| c <= ack && ack < o))
        .count();
    let Some(&(start, _)) = arrivals.first() else {
        v.missing = committed
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| may_see(*id))
            .collect();
        v.expected = v.missing.len();
        return v;
    };
    let mut first: BTreeMap<i64, i64> = BTreeMap::new();
    let mut count: HashMap<i64, usize> = HashMap::new();
    let mut highest = i64::MIN;
    for &(id, at) in &arrivals {
        let n = count.entry(id).or_default();
        *n += 1;
        if *n == 1 {
            first.insert(id, at);
            if id < highest {
                v.out_of_order.push(id);
            }
            highest = highest.max(id);
            continue;
        }
        v.repeats += 1;
        let t1 = first[&id];
        // The drop that followed its first arrival, and the client's last frame before it.
        let Some(&(close, _)) = drops.iter().find(|(c, _)| *c >= t1) else {
            v.bad_repeats.push((id, t1, -1));
            continue;
        };
        let spoke = sent
            .iter()
            .copied()
            .filter(|s| *s <= close)
            .max()
            .unwrap_or(0);
        if t1 < spoke.min(close - slack_ms) {
            v.bad_repeats.push((id, t1, spoke));
        }
    }
    for &(id, _) in committed {
        if id >= start && may_see(id) {
            v.expected += 1;
            if !first.contains_key(&id) {
                v.missing.push(id);
            }
        }
    }
    v
}

/// Wait until `sub` has received `last` (or anything after it) on `table`.
async fn wait_for(sub: &Subscriber, table: &str, last: i64) -> bool {
    sub.wait_until(Duration::from_secs(30), |lines| {
        lines
            .iter()
            .any(|l| matches!(l, Line::Change { table: t, id, .. } if t == table && *id >= last))
    })
    .await
}

fn resyncs(sub: &Subscriber) -> Vec<String> {
    sub.system("changes")
        .into_iter()
        .filter(|(status, m, _)| status == "error" && m.starts_with("ResyncRequired"))
        .map(|(_, m, _)| m)
        .collect()
}

fn report(world: &World, label: &str, v: &Verdict) {
    eprintln!(
        "RESUME {} {label}: expected {} missing {} repeats {} (outside the rule {}) reconnects {} committed while away {}",
        world.name,
        v.expected,
        v.missing.len(),
        v.repeats,
        v.bad_repeats.len(),
        v.reconnects,
        v.committed_while_away
    );
}

/// Shared body of the three "nothing lost" scenarios: `fault` breaks the connection (and
/// gives it back), then everything committed must arrive.
async fn nothing_lost(
    name: &str,
    through_proxy: bool,
    slack_ms: i64,
    fault: impl AsyncFnOnce(&mut World, Option<&FaultProxy>) -> Result<()>,
) {
    let mut world = World::start(name, &[]).await.expect("setup");
    let front = through_proxy.then(|| {
        FaultProxy::start(([127, 0, 0, 1], world.server.port).into()).expect("front proxy")
    });
    let url = match &front {
        Some(p) => format!("http://127.0.0.1:{}", p.port()),
        None => world.url(),
    };
    let sid = session_id(name);
    let resumed = world
        .subscribe(&url, "resumed", "carol", "feed", "events", Some(&sid))
        .await
        .expect("resumed subscriber");
    let plain = world
        .subscribe(&url, "plain", "dave", "feed", "events", None)
        .await
        .expect("plain subscriber");
    tokio::time::sleep(Duration::from_secs(2)).await;
    fault(&mut world, front.as_ref()).await.expect("fault");
    // Writes go on after the client is back, then stop.
    resumed
        .wait_until(Duration::from_secs(30), |lines| {
            lines
                .iter()
                .filter(|l| matches!(l, Line::Socket { event, .. } if event == "open"))
                .count()
                >= 2
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let committed = world.stop_writing().await;
    let last = committed.last().map(|c| c.0).expect("the writer committed");
    let arrived = wait_for(&resumed, "events", last).await;
    wait_for(&plain, "events", last).await;
    let v = resumed.with_lines(|l| judge(l, "events", &committed, |_| true, slack_ms));
    let control = plain.with_lines(|l| judge(l, "events", &committed, |_| true, slack_ms));
    report(&world, "resumed", &v);
    report(&world, "plain (no session)", &control);
    let mut failures = v.failures();
    if !arrived {
        failures.push(format!("row {last} never arrived"));
    }
    if v.reconnects == 0 {
        failures.push("the fault did not drop the client's socket".into());
    }
    if v.committed_while_away == 0 {
        failures.push("nothing was committed while the client was away: no gap to close".into());
    }
    let r = resyncs(&resumed);
    if !r.is_empty() {
        failures.push(format!("told to resync: {r:?}"));
    }
    // The control: without a session the same fault loses rows, so the test can tell.
    if control.missing.is_empty() {
        failures.push(format!(
            "the subscriber without a session missed nothing ({control:?}): the fault left no gap"
        ));
    }
    assert!(
        failures.is_empty(),
        "{name}: {failures:#?}\nwalcast log tail:\n{}",
        world.log_tail()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_dropped_connection() {
    nothing_lost("dropped-tcp", true, 0, async |_world, front| {
        let front = front.context("front proxy")?;
        front.refuse(true);
        front.cut();
        tokio::time::sleep(Duration::from_secs(3)).await;
        front.refuse(false);
        Ok(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_kill_9_and_restart() {
    // The session record may lag the last acknowledgement by up to a second.
    nothing_lost("kill-9", false, 2_000, async |world, _| {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &world.server.pid.to_string()])
            .status();
        tokio::time::sleep(Duration::from_secs(2)).await;
        world.restart().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_across_a_rolling_restart() {
    nothing_lost("sigterm", false, 0, async |world, _| {
        let exit = world.server.terminate(Duration::from_secs(15)).await;
        anyhow::ensure!(
            exit.is_some_and(|s| s.success()),
            "walcast did not exit cleanly: {exit:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        world.restart().await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_id_reused_by_another_user_resumes_nothing() {
    let mut world = World::start("reused", &[]).await.expect("setup");
    let url = world.url();
    let sid = session_id("reused");
    // alice sees the even rows of `secured`, bob the odd ones.
    let alice = world
        .subscribe(&url, "alice", "alice", "shared", "secured", Some(&sid))
        .await
        .expect("alice");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // alice's socket dies: her channel parks and buffers her rows.
    let alice_before = alice.max_id("secured");
    drop(alice);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bob = world
        .subscribe(&url, "bob", "bob", "shared", "secured", Some(&sid))
        .await
        .expect("bob");
    tokio::time::sleep(Duration::from_secs(1)).await;
    // alice comes back within the window: her parked channel is still hers.
    let alice_again = world
        .subscribe(
            &url,
            "alice-again",
            "alice",
            "shared",
            "secured",
            Some(&sid),
        )
        .await
        .expect("alice again");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = world.stop_writing().await;
    let last = committed.last().map(|c| c.0).expect("the writer committed");
    let last_even = if last % 2 == 0 { last } else { last - 1 };
    let last_odd = if last % 2 == 1 { last } else { last - 1 };
    wait_for(&alice_again, "secured", last_even).await;
    wait_for(&bob, "secured", last_odd).await;

    let mut failures = Vec::new();
    let bob_lines = bob.lines();
    let bob_open = bob_lines
        .iter()
        .find_map(|l| match l {
            Line::Socket { event, t, .. } if event == "open" => Some(*t),
            _ => None,
        })
        .unwrap_or(0);
    let acked: HashMap<i64, i64> = committed.iter().copied().collect();
    for l in &bob_lines {
        if let Line::Change { id, .. } = l {
            if owner(*id) != "bob" {
                failures.push(format!("bob received alice's row {id}"));
            }
            if acked.get(id).is_some_and(|ack| *ack < bob_open - 200) {
                failures.push(format!(
                    "bob received row {id}, committed before he connected (a replay of someone's session)"
                ));
            }
        }
    }
    // alice's second socket continues her first one: it starts at most at the row after
    // the last one her first socket got (a repeat of a few is allowed), and misses nothing.
    let v =
        alice_again.with_lines(|l| judge(l, "secured", &committed, |id| owner(id) == "alice", 0));
    report(&world, "alice (rejoined)", &v);
    let resumed_from = alice_again.with_lines(|l| {
        l.iter().find_map(|l| match l {
            Line::Change { id, .. } => Some(*id),
            _ => None,
        })
    });
    match (alice_before, resumed_from) {
        (Some(before), Some(from)) if from <= before + 2 => {}
        other => failures.push(format!(
            "alice's rejoin did not continue where her first socket stopped (last before, first after): {other:?}"
        )),
    }
    failures.extend(v.failures());
    if !resyncs(&bob).is_empty() || !resyncs(&alice_again).is_empty() {
        failures.push("a resync was announced".into());
    }
    assert!(
        failures.is_empty(),
        "{failures:#?}\nwalcast log tail:\n{}",
        world.log_tail()
    );
}

/// A parked session that cannot be resumed (`why` names the reason in the message): its
/// rejoin is told to resync, then gets live rows.
async fn told_to_resync(name: &str, args: &[&str], away: Duration, why: &str) {
    let mut world = World::start(name, args).await.expect("setup");
    let url = world.url();
    let sid = session_id(name);
    let first = world
        .subscribe(&url, "first", "carol", "feed", "events", Some(&sid))
        .await
        .expect("subscriber");
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(first);
    tokio::time::sleep(away).await;
    let back = world
        .subscribe(&url, "back", "carol", "feed", "events", Some(&sid))
        .await
        .expect("subscriber again");
    let told = back
        .wait_until(Duration::from_secs(10), |lines| {
            lines.iter().any(|l| matches!(l, Line::System { message, .. } if message.starts_with("ResyncRequired")))
        })
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let committed = world.stop_writing().await;
    let last = committed.last().map(|c| c.0).expect("the writer committed");
    let live = wait_for(&back, "events", last).await;
    let r = resyncs(&back);
    eprintln!("RESUME {name}: system messages {r:?}");
    assert!(
        told && r.len() == 1 && r[0].contains(why),
        "{name}: expected one ResyncRequired naming {why:?}, got {r:?} (system lines: {:?})\nwalcast log tail:\n{}",
        back.system("changes"),
        world.log_tail()
    );
    assert!(live, "{name}: live rows stopped after the resync message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_window_is_told_to_resync() {
    told_to_resync(
        "expired",
        &["--resume-window-secs", "2"],
        Duration::from_secs(5),
        "resume window",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_buffer_is_told_to_resync() {
    told_to_resync(
        "overflow",
        &["--resume-buffer-bytes", "16384"],
        Duration::from_secs(3),
        "resume buffer",
    )
    .await;
}
