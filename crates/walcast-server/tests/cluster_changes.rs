//! Cluster mode, postgres_changes: three `walcast serve` nodes on one real redis-server and
//! one slot. One node streams the slot and publishes; a change reaches subscribers on every
//! node; killing the streamer (SIGKILL) under load loses and duplicates nothing for the
//! subscribers of the other two, in commit order; Redis stopped (and restarted empty) while
//! transactions commit loses and duplicates nothing on any node either.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::cluster::{nodes, role};
use support::server::{token, Client, Server};
use walcast_testkit::RedisServer;

const TABLE_SQL: &str = "CREATE TABLE c (id int PRIMARY KEY, v text); GRANT SELECT ON c TO anon;";

async fn subscribe(s: &Server, topic: &str) -> Client {
    let t = token("anon", 3600);
    let mut c = s.connect(&t).await;
    let reply = c
        .join(
            "1",
            topic,
            json!([{"event": "INSERT", "schema": "public", "table": "c"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    c.until(Duration::from_secs(10), |f| {
        f[3] == "system" && f[4]["status"] == "ok"
    })
    .await
    .expect("the channel's system ok");
    c
}

/// The ids of the INSERTs `c` receives until it has `want` of them (or `limit` passes).
async fn ids(c: &mut Client, want: usize, limit: Duration) -> Vec<i64> {
    timed_ids(c, want, limit)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect()
}

/// [`ids`] with the moment each arrived.
async fn timed_ids(c: &mut Client, want: usize, limit: Duration) -> Vec<(i64, Instant)> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    while got.len() < want {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = c.until(left, |f| f[3] == "postgres_changes").await else {
            break;
        };
        if let Some(id) = f[4]["data"]["record"]["id"].as_i64() {
            got.push((id, Instant::now()));
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_reaches_subscribers_on_every_node() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute(TABLE_SQL).await.unwrap();
    let redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "cluster");
    let servers = nodes(db.url(), &slot, &redis, 3).await;
    let mut roles = Vec::new();
    for s in &servers {
        roles.push(role(s).await.unwrap_or_default());
    }
    assert_eq!(
        roles.iter().filter(|r| *r == "streamer").count(),
        1,
        "exactly one streamer: {roles:?}"
    );
    assert_eq!(
        roles.iter().filter(|r| *r == "follower").count(),
        2,
        "{roles:?}"
    );
    let mut clients = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        clients.push(subscribe(s, &format!("realtime:c{i}")).await);
    }
    for id in 1..=3i32 {
        sql.execute("INSERT INTO c VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let got = ids(c, 3, Duration::from_secs(15)).await;
        assert_eq!(
            got,
            vec![1, 2, 3],
            "node {i} ({}):\n{}",
            roles[i],
            servers[i].log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_streamer_loses_and_duplicates_nothing_elsewhere() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute(TABLE_SQL).await.unwrap();
    let redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "failover");
    let mut servers = nodes(db.url(), &slot, &redis, 3).await;
    let mut streamer = None;
    for (i, s) in servers.iter().enumerate() {
        if role(s).await.as_deref() == Some("streamer") {
            streamer = Some(i);
        }
    }
    let streamer = streamer.expect("a streamer");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != streamer).collect();
    let mut clients = Vec::new();
    for &i in &survivors {
        clients.push(subscribe(&servers[i], &format!("realtime:f{i}")).await);
    }

    // ~200 commits/s, one row each, from a writer of its own, for 4 s.
    const N: i32 = 800;
    let writer_db = db.connect().await.unwrap();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        let mut committed = Vec::with_capacity(N as usize);
        for id in 1..=N {
            tick.tick().await;
            writer_db
                .execute("INSERT INTO c VALUES ($1, 'x')", &[&id])
                .await
                .unwrap();
            committed.push(Instant::now());
        }
        committed
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pid = servers[streamer].pid();
    let killed_at = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Failover: until a survivor says it streams.
    let mut failover = None;
    while killed_at.elapsed() < Duration::from_secs(20) {
        for &i in &survivors {
            if role(&servers[i]).await.as_deref() == Some("streamer") {
                failover = Some(killed_at.elapsed());
            }
        }
        if failover.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failover = failover.unwrap_or_else(|| {
        panic!(
            "no survivor took over:\n{}\n{}",
            servers[survivors[0]].log(),
            servers[survivors[1]].log()
        )
    });
    println!("failover: a surviving node streamed the slot {failover:?} after SIGKILL of the streamer (--failover-timeout-secs 2)");
    let committed = writer.await.unwrap();
    let want: Vec<i64> = (1..=N as i64).collect();
    for (k, c) in clients.iter_mut().enumerate() {
        let timed = timed_ids(c, N as usize, Duration::from_secs(30)).await;
        // The longest a change committed after the kill waited for this node's subscriber.
        let worst = timed
            .iter()
            .filter_map(|(id, at)| {
                let done = committed.get(usize::try_from(*id - 1).ok()?)?;
                (*done >= killed_at).then(|| at.saturating_duration_since(*done))
            })
            .max();
        println!(
            "failover: node {}'s subscriber waited at most {worst:?} for a change committed after the kill",
            survivors[k]
        );
        let got: Vec<i64> = timed.into_iter().map(|(id, _)| id).collect();
        // A short extra wait: a duplicate would arrive after the last id.
        let extra = ids(c, 1, Duration::from_millis(500)).await;
        let i = survivors[k];
        assert_eq!(
            got.len(),
            want.len(),
            "node {i}: {} of {N} changes; missing e.g. {:?}\n{}",
            got.len(),
            want.iter()
                .filter(|x| !got.contains(x))
                .take(10)
                .collect::<Vec<_>>(),
            servers[i].log()
        );
        assert_eq!(got, want, "node {i}: every change once, in commit order");
        assert!(extra.is_empty(), "node {i}: duplicates {extra:?}");
    }
    if std::env::var_os("CLUSTER_DEBUG").is_some() {
        for &i in &survivors {
            println!("--- node {i}\n{}", servers[i].log());
        }
    }
    // The former streamer is gone for good; the survivors keep one streamer.
    servers.remove(streamer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_and_restarted_loses_and_duplicates_nothing() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute(TABLE_SQL).await.unwrap();
    let mut redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "redisdown");
    let servers = nodes(db.url(), &slot, &redis, 3).await;
    let mut clients = Vec::new();
    for (i, s) in servers.iter().enumerate() {
        clients.push(subscribe(s, &format!("realtime:r{i}")).await);
    }
    let insert = |from: i32, to: i32| {
        let sql = &sql;
        async move {
            for id in from..=to {
                sql.execute("INSERT INTO c VALUES ($1, 'x')", &[&id])
                    .await
                    .unwrap();
            }
        }
    };
    insert(1, 5).await;
    for c in clients.iter_mut() {
        assert_eq!(
            ids(c, 5, Duration::from_secs(15)).await,
            vec![1, 2, 3, 4, 5]
        );
    }
    // Redis goes away (and comes back empty): the streamer stops before its lease could
    // expire; what commits meanwhile waits in the slot.
    redis.stop();
    insert(6, 10).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.restart().unwrap();
    insert(11, 15).await;
    let want: Vec<i64> = (6..=15).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        let got = ids(c, 10, Duration::from_secs(30)).await;
        let extra = ids(c, 1, Duration::from_millis(500)).await;
        assert_eq!(got, want, "node {i}:\n{}", servers[i].log());
        assert!(extra.is_empty(), "node {i}: duplicates {extra:?}");
    }
}
