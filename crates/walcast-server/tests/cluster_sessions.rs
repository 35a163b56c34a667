//! Cluster mode, session resume on any node: a client subscribed with a `session_id` on
//! node A rejoins on node B and receives every change committed after what it surely saw on
//! A, once and in commit order, replayed from the cluster's change stream. Two `walcast
//! serve` nodes on one real redis-server and one real Postgres: A killed with SIGKILL (B takes
//! the session from its record), A alive after a disconnect (A hands it over and no longer
//! resumes it), and a change stream trimmed past the session's position (resync, no gap).

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cluster::{nodes, role};
use support::server::{token, Client, Server};
use walcast_testkit::RedisServer;

const TABLE_SQL: &str = "CREATE TABLE c (id int PRIMARY KEY, v text); GRANT SELECT ON c TO anon;";
const TOPIC: &str = "realtime:sessions";

/// Connect to `s` under `session` and join [`TOPIC`]; returns the client and the frames that
/// followed the reply up to the channel's `system` postgres_changes message.
async fn join_session(s: &Server, session: &str) -> (Client, Vec<Value>) {
    let t = token("anon", 3600);
    let url = format!("{}&session_id={session}", s.ws_url(&t, "2.0.0"));
    let mut c = Client::open(&url).await.expect("websocket connect");
    let reply = c
        .join(
            "1",
            TOPIC,
            json!([{"event": "INSERT", "schema": "public", "table": "c"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    let mut system = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = c.next(left).await.expect("the channel's system message");
        if f[3] == "system" {
            system.push(f.clone());
            if f[4]["message"]
                .as_str()
                .is_some_and(|m| m.contains("Subscribed to PostgreSQL"))
            {
                break;
            }
            continue;
        }
        if f[3] == "postgres_changes" {
            // Replayed rows come after the system messages, never before.
            panic!("a change before the channel's system messages: {f}");
        }
    }
    (c, system)
}

/// The ids of the INSERTs `c` receives, until `last` arrives (or 20 s pass).
async fn ids_through(c: &mut Client, last: i32) -> Vec<i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while !got.contains(&(last as i64)) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(f) = c.until(left, |f| f[3] == "postgres_changes").await else {
            break;
        };
        if let Some(id) = f[4]["data"]["record"]["id"].as_i64() {
            got.push(id);
        }
    }
    got
}

async fn insert(sql: &tokio_postgres::Client, ids: std::ops::RangeInclusive<i32>) {
    for id in ids {
        sql.execute("INSERT INTO c VALUES ($1, 'x')", &[&id])
            .await
            .unwrap();
    }
}

/// The client on `c` saw rows 1..=5 and said so (a heartbeat), and node A recorded it.
async fn see_first_five(c: &mut Client, sql: &tokio_postgres::Client, session: &str) {
    insert(sql, 1..=5).await;
    assert_eq!(ids_through(c, 5).await, vec![1, 2, 3, 4, 5]);
    c.heartbeat("hb", Duration::from_secs(5)).await;
    wait_recorded(sql, session).await;
}

/// Wait for the session's record to be written after now (the node writes it within a
/// second of a change, e.g. a new `acked` after a heartbeat).
async fn wait_recorded(sql: &tokio_postgres::Client, session: &str) {
    let after: std::time::SystemTime = sql.query_one("SELECT now()", &[]).await.unwrap().get(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = sql
            .query_opt(
                "SELECT updated_at FROM realtime.walcast_sessions WHERE session_id = $1",
                &[&session],
            )
            .await
            .unwrap();
        if row.is_some_and(|r| r.get::<_, std::time::SystemTime>(0) > after) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the session's record was not updated"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn kill(s: &Server) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &s.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn no_resync(system: &[Value]) {
    for f in system {
        let m = f[4]["message"].as_str().unwrap_or_default();
        assert!(!m.contains("ResyncRequired"), "unexpected resync: {f}");
    }
}

async fn setup(slot: &str) -> (walcast_testkit::TestDb, tokio_postgres::Client, RedisServer) {
    let (db, sql) = support::database().await;
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute(TABLE_SQL).await.unwrap();
    let _ = slot;
    let redis = RedisServer::start().unwrap();
    (db, sql, redis)
}

/// Node A (a follower) is killed; the client rejoins on B (the streamer), which takes the
/// session from A's record and replays what was committed after row 5 from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_after_kill_9() {
    resume_after_kill("follower", "sesskill").await;
}

/// The same with the streamer killed: B takes the slot over while (or after) the session is
/// taken over; rows committed in between come from the replay or live, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_after_kill_9_of_the_streamer() {
    resume_after_kill("streamer", "sesskills").await;
}

async fn resume_after_kill(killed_role: &str, name: &str) {
    let (db, sql, redis) = setup(name).await;
    let slot = support::name(&db, name);
    let servers = nodes(db.url(), &slot, &redis, 2).await;
    let mut a = None;
    for (i, s) in servers.iter().enumerate() {
        if role(s).await.as_deref() == Some(killed_role) {
            a = Some(i);
        }
    }
    let a = a.unwrap_or_else(|| panic!("a {killed_role}"));
    let b = 1 - a;
    let session = format!("{name}-0123456789");
    let (mut on_a, system) = join_session(&servers[a], &session).await;
    no_resync(&system);
    see_first_five(&mut on_a, &sql, &session).await;

    kill(&servers[a]);
    drop(on_a);
    // Committed while the client has no connection.
    insert(&sql, 6..=15).await;

    let (mut on_b, system) = join_session(&servers[b], &session).await;
    no_resync(&system);
    // Live after the rejoin, then a last one: everything in between is visible.
    insert(&sql, 16..=20).await;
    let got = ids_through(&mut on_b, 20).await;
    assert_eq!(
        got,
        (6..=20).collect::<Vec<i64>>(),
        "every row after the acked one, once, in commit order\n{}",
        servers[b].log()
    );
    let (_, metrics) = servers[b].get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walcast_cluster_sessions_taken_over_total{from=\"records\"} 1"),
        "{metrics}"
    );
}

/// The client drops its connection to A (alive, the streamer here) and rejoins on B: A hands
/// the session over and B replays; then it drops B and rejoins A, which takes it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnected_session_is_handed_over_by_its_node() {
    let (db, sql, redis) = setup("handover").await;
    let slot = support::name(&db, "sesshand");
    let servers = nodes(db.url(), &slot, &redis, 2).await;
    let mut a = None;
    for (i, s) in servers.iter().enumerate() {
        if role(s).await.as_deref() == Some("streamer") {
            a = Some(i);
        }
    }
    let a = a.expect("a streamer");
    let b = 1 - a;
    let session = "sess-hand-0123456789";
    let (mut on_a, system) = join_session(&servers[a], session).await;
    no_resync(&system);
    see_first_five(&mut on_a, &sql, session).await;

    drop(on_a);
    // Parked on A, which keeps buffering.
    insert(&sql, 6..=15).await;

    let (mut on_b, system) = join_session(&servers[b], session).await;
    no_resync(&system);
    insert(&sql, 16..=20).await;
    let got = ids_through(&mut on_b, 20).await;
    assert_eq!(
        got,
        (6..=20).collect::<Vec<i64>>(),
        "every row after the acked one, once, in commit order\nB:\n{}\nA:\n{}",
        servers[b].log(),
        servers[a].log()
    );
    let (_, metrics) = servers[b].get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walcast_cluster_sessions_taken_over_total{from=\"alive\"} 1"),
        "{metrics}"
    );

    // The session follows its client back: B hands it over to A in turn, and only what
    // was committed after the client's last frame on B arrives, once.
    on_b.heartbeat("hb", Duration::from_secs(5)).await;
    wait_recorded(&sql, session).await;
    drop(on_b);
    insert(&sql, 21..=23).await;
    let (mut on_a_again, system) = join_session(&servers[a], session).await;
    no_resync(&system);
    insert(&sql, 24..=25).await;
    assert_eq!(
        ids_through(&mut on_a_again, 25).await,
        (21..=25).collect::<Vec<i64>>()
    );
    let (_, metrics) = servers[a].get("/metrics").await.unwrap();
    assert!(
        metrics.contains("walcast_cluster_sessions_taken_over_total{from=\"alive\"} 1"),
        "{metrics}"
    );
}

/// What the session missed is no longer in the change stream (trimmed): the rejoin on B is
/// told to resync, then gets live changes; never a silent gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_changes_were_trimmed_is_told_to_resync() {
    let (db, sql, redis) = setup("trim").await;
    let slot = support::name(&db, "sesstrim");
    let servers = nodes(db.url(), &slot, &redis, 2).await;
    let mut a = None;
    for (i, s) in servers.iter().enumerate() {
        if role(s).await.as_deref() == Some("follower") {
            a = Some(i);
        }
    }
    let a = a.expect("a follower");
    let b = 1 - a;
    let session = "sess-trim-0123456789";
    let (mut on_a, _) = join_session(&servers[a], session).await;
    see_first_five(&mut on_a, &sql, session).await;
    kill(&servers[a]);
    drop(on_a);
    insert(&sql, 6..=14).await;
    let before: i64 = sql
        .query_one("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint", &[])
        .await
        .unwrap()
        .get(0);
    insert(&sql, 15..=15).await;
    // Wait until row 15's transaction is in the stream (published past `before`), then trim
    // all but the newest entry, as MAXLEN would after 100,000 newer transactions.
    let rc = redis::Client::open(redis.url()).unwrap();
    let mut rconn = rc.get_multiplexed_async_connection().await.unwrap();
    let key = format!("walcast:{slot}:changes");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let published: Option<String> = redis::cmd("GET")
            .arg(format!("walcast:{slot}:published"))
            .query_async(&mut rconn)
            .await
            .unwrap();
        let published = published
            .and_then(|p| u64::from_str_radix(&p, 16).ok())
            .unwrap_or(0);
        if published > before as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "row 15 was not published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _: i64 = redis::cmd("XTRIM")
        .arg(&key)
        .arg("MAXLEN")
        .arg(1)
        .query_async(&mut rconn)
        .await
        .unwrap();

    let (mut on_b, system) = join_session(&servers[b], session).await;
    assert!(
        system.iter().any(|f| f[4]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ResyncRequired") && m.contains("change stream"))),
        "{system:?}"
    );
    insert(&sql, 16..=17).await;
    assert_eq!(ids_through(&mut on_b, 17).await, vec![16, 17]);
}
