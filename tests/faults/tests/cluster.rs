//! Cluster mode (issue #13): three `walcast serve` nodes on one slot and one real
//! redis-server; `kill -9` of the node that streams the slot while ~500 commits/s go in.
//! Official-client subscribers on the other two nodes must receive every committed change
//! exactly once, in commit order; the failover time is measured and printed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use walcast_faults::http;
use walcast_faults::knobs::knob;
use walcast_faults::server::{ServerConfig, Walcast};
use walcast_faults::subscriber::{SubSpec, Subscriber};
use walcast_faults::token::token;
use walcast_faults::writer::{Outcome, Writer, WriterConfig};
use walcast_testkit::{ClusterOptions, PgCluster, RedisServer};

async fn role(port: u16) -> Option<String> {
    let (status, body) = http::get(port, "/readyz", Duration::from_secs(2))
        .await
        .ok()?;
    (status == 200).then_some(())?;
    body.lines()
        .find_map(|l| l.strip_prefix("role: "))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_streamer_killed() {
    let name = "cluster-streamer-killed";
    if let Err(e) = run(name).await {
        println!("FAULTS {name} FAIL | {e:#}");
        panic!("{name}: {e:#}");
    }
}

async fn run(name: &str) -> Result<()> {
    let dir = walcast_faults::paths::target_dir()
        .join("faults")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![("wal_sender_timeout".into(), "60s".into())],
        ..Default::default()
    })?;
    let db = cluster.fresh_database().await?;
    let admin = db.connect().await?;
    admin
        .batch_execute(walcast_faults::schema::SETUP)
        .await
        .context("schema")?;
    let redis = RedisServer::start()?;
    let secret = format!("faults-cluster-{}", std::process::id());
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Walcast::spawn(&ServerConfig {
            database_url: db.url().to_string(),
            jwt_secret: secret.clone(),
            slot: "faults_cluster".into(),
            extra_args: vec![
                "--redis-url".into(),
                redis.url(),
                "--node-id".into(),
                format!("node{i}"),
                "--failover-timeout-secs".into(),
                "5".into(),
            ],
            log: dir.join(format!("walcast-{i}.log")),
            port: None,
        })?);
    }
    for n in nodes.iter_mut() {
        n.wait_ready(Duration::from_secs(60)).await?;
    }
    let mut streamer = None;
    for (i, n) in nodes.iter().enumerate() {
        if role(n.port).await.as_deref() == Some("streamer") {
            streamer = Some(i);
        }
    }
    let streamer = streamer.context("no node says it is the streamer")?;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != streamer).collect();
    let mut subs = Vec::new();
    for &i in &survivors {
        let who = format!("sub-node{i}");
        let spec = SubSpec {
            name: who.clone(),
            token: token(&secret, "authenticated", &who)?,
            changes: Some((format!("changes-{who}"), vec!["events".into()], false)),
            room: None,
            session_id: None,
        };
        subs.push(Subscriber::spawn(
            &format!("http://127.0.0.1:{}", nodes[i].port),
            spec,
            &dir,
        )?);
    }
    for s in &subs {
        s.wait_joined(Duration::from_secs(30)).await?;
    }
    let rate = knob("FAULTS_RATE", 500);
    let mut writer = Writer::start(WriterConfig {
        url: db.url().to_string(),
        rate,
        rollback_every: 20,
        keep_shape: false,
    });
    let load = Duration::from_secs(knob("FAULTS_CLUSTER_LOAD_SECS", 12));
    let started = Instant::now();
    tokio::time::sleep(load / 3).await;
    let pid = nodes[streamer].pid;
    let killed = Instant::now();
    std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    let mut took_over = None;
    while took_over.is_none() && killed.elapsed() < Duration::from_secs(30) {
        for &i in &survivors {
            if role(nodes[i].port).await.as_deref() == Some("streamer") {
                took_over = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took_over = took_over.context("no surviving node took the slot over")?;
    tokio::time::sleep(load.saturating_sub(started.elapsed())).await;
    let attempts = writer.stop().await;
    let committed: Vec<i64> = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Committed { .. }))
        .map(|a| a.id)
        .collect();
    let maybe = attempts
        .iter()
        .filter(|a| matches!(a.outcome, Outcome::Maybe))
        .count();
    anyhow::ensure!(maybe == 0, "{maybe} commits with unknown outcome");
    let last = *committed.last().context("nothing committed")?;
    let mut failures = Vec::new();
    let mut worst_gap = Duration::ZERO;
    for (k, s) in subs.iter().enumerate() {
        s.wait_until(Duration::from_secs(60), |lines| {
            lines.iter().any(|l| {
                matches!(l, walcast_faults::subscriber::Line::Change { table, id, .. } if table == "events" && *id == last)
            })
        })
        .await;
        // Anything after the last id would be a duplicate.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let got = s.changes("events");
        let ids: Vec<i64> = got.iter().map(|(id, _)| *id).collect();
        if ids != committed {
            let missing: Vec<_> = committed
                .iter()
                .filter(|c| !ids.contains(c))
                .take(10)
                .collect();
            let mut seen = std::collections::HashSet::new();
            let dups: Vec<_> = ids.iter().filter(|i| !seen.insert(**i)).take(10).collect();
            failures.push(format!(
                "node {}: {} changes for {} commits; missing e.g. {missing:?}; duplicated e.g. {dups:?}; in order: {}",
                survivors[k],
                ids.len(),
                committed.len(),
                ids.windows(2).all(|w| w[0] < w[1])
            ));
        }
        // The longest pause between two consecutive deliveries: the failover as a subscriber
        // sees it.
        for w in got.windows(2) {
            worst_gap = worst_gap.max(Duration::from_millis((w[1].1 - w[0].1).max(0) as u64));
        }
    }
    let summary = format!(
        "{} commits at {rate}/s over {:?}, streamer node{streamer} killed at {:?}; a survivor streamed after {took_over:?}; longest pause between deliveries {worst_gap:?}",
        committed.len(),
        load,
        killed.duration_since(started)
    );
    if failures.is_empty() {
        println!("FAULTS {name} PASS | {summary}");
        Ok(())
    } else {
        anyhow::bail!("{summary}; {}", failures.join("; "))
    }
}
