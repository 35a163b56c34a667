//! Operating a cluster (issue #13): `walcast check --redis-url` reports Redis, the live nodes,
//! the streamer and the change stream; a follower's `/readyz` and its postgres_changes
//! channels tell the truth when no node streams the slot, as a single node does when its
//! stream is lost, and not for a Redis blip; a streamer cut from Postgres hands the slot to
//! a node that can reach it. Real redis-server, real Postgres, the nodes' database
//! connections through fault proxies that cut and refuse them.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use support::server::{token, Client, Options, Server};
use walcast_testkit::{FaultProxy, RedisServer};

const WAIT: Duration = Duration::from_secs(30);
const STREAM_DOWN: &str = "Replication stream is down: changes will be delivered once it is back";

fn check(db_url: &str, slot: &str, redis: &str) -> support::Finished {
    let child = support::walcast()
        .args(["check", "--database-url", db_url, "--slot", slot])
        .args(["--redis-url", redis])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_output(child, Duration::from_secs(60))
}

/// A node with `--failover-timeout-secs 2`: the lease lives 1.5 s, the `streaming` mark 4 s
/// after the streamer last streamed.
async fn node(db_url: &str, slot: &str, redis: &str, id: &str) -> Server {
    support::cluster::node(db_url, slot, redis, id, &[]).await
}

/// Polls /readyz until `pred(status, body)`; returns the body.
async fn until_readyz(s: &Server, what: &str, pred: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = s.get("/readyz").await.unwrap_or((0, String::new()));
        if pred(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never {what}; last {status} {body:?}; log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn system(c: &mut Client, status: &str) -> serde_json::Value {
    c.until(WAIT, |f| f[3] == "system" && f[4]["status"] == status)
        .await
        .unwrap_or_else(|| panic!("no system {status} message"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_the_cluster_and_followers_say_when_no_node_streams() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute("CREATE TABLE c (id int PRIMARY KEY); GRANT SELECT ON c TO anon;")
        .await
        .unwrap();
    let redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "ops");
    let pg = SocketAddr::from(([127, 0, 0, 1], db.port()));
    let (proxy_s, proxy_f) = (
        FaultProxy::start(pg).unwrap(),
        FaultProxy::start(pg).unwrap(),
    );
    let streamer_url = proxy_s.url_for(db.url()).unwrap();
    let follower_url = proxy_f.url_for(db.url()).unwrap();

    // The first node takes the lease; the second follows.
    let s = node(&streamer_url, &slot, &redis.url(), "s").await;
    until_readyz(&s, "said streamer", |st, b| {
        st == 200 && b.contains("role: streamer")
    })
    .await;
    let f = node(&follower_url, &slot, &redis.url(), "f").await;
    until_readyz(&f, "said follower", |st, b| {
        st == 200 && b.contains("role: follower") && b.contains("nodes=2 redis=ok")
    })
    .await;
    sql.execute("INSERT INTO c VALUES (1)", &[]).await.unwrap();

    let t = token("anon", 3600);
    let mut c = f.connect(&t).await;
    let reply = c
        .join(
            "1",
            "realtime:ops",
            json!([{"event": "INSERT", "schema": "public", "table": "c"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    system(&mut c, "ok").await;

    // A healthy cluster, as check sees it.
    let out = check(db.url(), &slot, &redis.url());
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let o = &out.stdout;
    let redis_addr = format!("127.0.0.1:{}", redis.port());
    assert!(
        o.contains(&format!("ok    redis at {redis_addr} answers (round trip ")),
        "{o}"
    );
    assert!(
        o.contains(&format!(
            "ok    cluster \"{slot}\": 2 live node(s): f (seen "
        )),
        "{o}"
    );
    assert!(o.contains(", s (seen "), "{o}");
    assert!(
        o.contains("ok    streamer: s holds the lease since "),
        "{o}"
    );
    assert!(o.contains(") and streams the slot"), "{o}");
    assert!(
        o.contains("ok    change stream: 1 entries, the last one (commit end "),
        "{o}"
    );

    // Both nodes lose the database (cut, and reconnections refused): nobody can stream
    // (the lease may pass between them). The follower says so, like a lost stream.
    for p in [&proxy_s, &proxy_f] {
        p.refuse(true);
        p.cut();
    }
    let body = until_readyz(&f, "said the stream is lost", |st, b| {
        st == 503 && b.contains("not ready: replication stream lost: ")
    })
    .await;
    assert!(body.contains("cluster: node=f nodes=2 redis=ok"), "{body}");
    let down = system(&mut c, "error").await;
    assert_eq!(down[4]["message"], STREAM_DOWN, "{down}");
    assert_eq!(down[4]["extension"], "postgres_changes", "{down}");

    let out = check(db.url(), &slot, &redis.url());
    assert!(
        out.status.success(),
        "warnings only: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout.contains("warn  streamer: ")
            && out.stdout.contains("postgres_changes are not flowing"),
        "{}",
        out.stdout
    );

    // The database is back: a node streams again, the follower's node is ready again, its
    // channel is told so and gets what is committed from then on.
    for p in [&proxy_s, &proxy_f] {
        p.refuse(false);
    }
    until_readyz(&f, "was ready again", |st, _| st == 200).await;
    system(&mut c, "ok").await;
    sql.execute("INSERT INTO c VALUES (2)", &[]).await.unwrap();
    let change = c
        .until(WAIT, |f| f[3] == "postgres_changes")
        .await
        .unwrap_or_else(|| panic!("no change on the follower; log:\n{}", f.log()));
    assert_eq!(change[4]["data"]["record"]["id"], 2, "{change}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_an_empty_cluster_and_unreachable_redis() {
    let (db, _sql) = support::database().await;
    let mut redis = RedisServer::start().unwrap();
    let out = check(db.url(), "walcast", &redis.url());
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains("ok    cluster \"walcast\": no live node (none heartbeated within 15.0 s)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("ok    streamer: none (no node is running)"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains("ok    change stream: 0 entries\n"),
        "{}",
        out.stdout
    );

    let url = redis.url();
    redis.stop();
    let out = check(db.url(), "walcast", &url);
    assert!(!out.status.success(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains(&format!(
            "error redis at 127.0.0.1:{} is unreachable: ",
            redis.port()
        )),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("fix: start Redis, or point --redis-url / REDIS_URL at the Redis"),
        "{}",
        out.stdout
    );
    // The database checks still ran.
    assert!(
        out.stdout.contains("ok    wal_level is logical"),
        "{}",
        out.stdout
    );
}

/// A Redis outage shorter than the failover timeout is not reported as a lost stream: the
/// follower stays ready while Redis is down, its channel gets no `system` error, and a change
/// committed after Redis is back (empty) reaches it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_blip_does_not_drain_followers() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute("CREATE TABLE c (id int PRIMARY KEY); GRANT SELECT ON c TO anon;")
        .await
        .unwrap();
    let mut redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "blip");
    // A long failover timeout: the blip below is far shorter.
    let start = |id: &'static str| {
        let opts = Options::default().args(&[
            "--redis-url",
            &redis.url(),
            "--node-id",
            id,
            "--failover-timeout-secs",
            "10",
        ]);
        Server::start_serving(db.url(), &slot, opts)
    };
    let s = start("s").await;
    until_readyz(&s, "said streamer", |st, b| {
        st == 200 && b.contains("role: streamer")
    })
    .await;
    let f = start("f").await;
    until_readyz(&f, "said follower", |st, b| {
        st == 200 && b.contains("role: follower") && b.contains("nodes=2 redis=ok")
    })
    .await;
    let t = token("anon", 3600);
    let mut c = f.connect(&t).await;
    let reply = c
        .join(
            "1",
            "realtime:blip",
            json!([{"event": "INSERT", "schema": "public", "table": "c"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    system(&mut c, "ok").await;

    redis.stop();
    // Redis is down, as the node's own link says, and the follower is still ready.
    let body = until_readyz(&f, "saw Redis down", |_, b| b.contains("redis=down")).await;
    let (status, now) = f.get("/readyz").await.unwrap();
    assert_eq!(
        status, 200,
        "ready while Redis blips: {now} (first: {body})"
    );
    redis.restart().unwrap();
    until_readyz(&f, "saw Redis back", |st, b| {
        st == 200 && b.contains("redis=ok")
    })
    .await;

    sql.execute("INSERT INTO c VALUES (1)", &[]).await.unwrap();
    let frames = c
        .collect_until(WAIT, "the change after the blip", |fr| {
            fr.json().is_some_and(|v| v[3] == "postgres_changes")
        })
        .await;
    let system: Vec<_> = frames
        .iter()
        .filter_map(|fr| fr.json())
        .filter(|v| v[3] == "system")
        .collect();
    assert!(
        system.is_empty(),
        "no system message for a blip: {system:?}"
    );
    let change = frames.last().and_then(|fr| fr.json()).unwrap();
    assert_eq!(change[4]["data"]["record"]["id"], 1, "{change}");
}

/// A streamer cut from Postgres (but not from Redis) lets the lease go once it has not
/// streamed for the failover timeout; the node that can reach the database takes the slot
/// and its subscriber gets what was committed meanwhile, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamer_cut_from_postgres_hands_the_slot_over() {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute("CREATE TABLE c (id int PRIMARY KEY); GRANT SELECT ON c TO anon;")
        .await
        .unwrap();
    let redis = RedisServer::start().unwrap();
    let slot = support::name(&db, "pgcut");
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], db.port()))).unwrap();
    let s = node(&proxy.url_for(db.url()).unwrap(), &slot, &redis.url(), "s").await;
    until_readyz(&s, "said streamer", |st, b| {
        st == 200 && b.contains("role: streamer")
    })
    .await;
    let f = node(db.url(), &slot, &redis.url(), "f").await;
    until_readyz(&f, "said follower", |st, b| {
        st == 200 && b.contains("role: follower")
    })
    .await;
    let t = token("anon", 3600);
    let mut c = f.connect(&t).await;
    let reply = c
        .join(
            "1",
            "realtime:pgcut",
            json!([{"event": "INSERT", "schema": "public", "table": "c"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    system(&mut c, "ok").await;
    sql.execute("INSERT INTO c VALUES (1)", &[]).await.unwrap();

    proxy.refuse(true);
    proxy.cut();
    for id in 2..=4i32 {
        sql.execute("INSERT INTO c VALUES ($1)", &[&id])
            .await
            .unwrap();
    }
    until_readyz(&f, "took over the slot", |st, b| {
        st == 200 && b.contains("role: streamer")
    })
    .await;
    sql.execute("INSERT INTO c VALUES (5)", &[]).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 5 {
        let Some(frame) = c.until(WAIT, |v| v[3] == "postgres_changes").await else {
            break;
        };
        got.push(frame[4]["data"]["record"]["id"].as_i64().unwrap_or(-1));
    }
    assert_eq!(got, vec![1, 2, 3, 4, 5], "log of f:\n{}", f.log());
    // A duplicate would come right after: the next change is the fence.
    sql.execute("INSERT INTO c VALUES (6)", &[]).await.unwrap();
    let next = c.until(WAIT, |v| v[3] == "postgres_changes").await.unwrap();
    assert_eq!(next[4]["data"]["record"]["id"], 6, "{next}");
    assert!(s.log().contains("letting another node try"), "{}", s.log());
}
