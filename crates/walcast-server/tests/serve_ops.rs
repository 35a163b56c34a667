//! Operations behaviour of `walcast serve`: metrics after a scripted workload, limits with
//! their exact messages, graceful shutdown.

mod support;

use std::time::Duration;

use serde_json::json;
use support::server::{token, Server};
use walcast_testkit::PgCluster;

/// The value of a sample line `name{labels} value` in Prometheus text, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_the_right_amounts() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    // Roles are cluster-wide and tests share the cluster: create it once, tolerate "exists".
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute("CREATE TABLE m (id int PRIMARY KEY, v text); GRANT SELECT ON m TO anon;")
        .await
        .unwrap();
    let server = Server::start(db.url(), "metrics", &[]).await;
    let t = token("anon", 3600);
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = server.connect(&t).await;
        let reply = c
            .join(
                "1",
                &format!("realtime:m{i}"),
                json!([{"event": "*", "schema": "public", "table": "m"}]),
                &t,
            )
            .await;
        assert_eq!(reply["status"], "ok");
        c.until(Duration::from_secs(10), |f| f[3] == "system")
            .await
            .unwrap();
        clients.push(c);
    }
    // One refused join (expired channel token).
    let mut bad = server.connect(&t).await;
    let reply = bad
        .join("1", "realtime:bad", json!([]), &token("anon", -10))
        .await;
    assert_eq!(reply["status"], "error");
    for i in 0..5 {
        sql.execute("INSERT INTO m VALUES ($1, 'x')", &[&i])
            .await
            .unwrap();
    }
    for c in clients.iter_mut() {
        for _ in 0..5 {
            c.until(Duration::from_secs(10), |f| f[3] == "postgres_changes")
                .await
                .unwrap();
        }
    }
    // Counters are updated before frames leave; give the scrape a moment to see the last ones.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, text) = server.get("/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "walcast_sockets_connected"), 4.0, "{text}");
    assert_eq!(
        sample(&text, "walcast_channels_joined{kind=\"postgres_changes\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(sample(&text, "walcast_joins_total"), 3.0, "{text}");
    assert_eq!(
        sample(&text, "walcast_join_errors_total{reason=\"expired\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "walcast_changes_decoded_total{kind=\"INSERT\"}"),
        5.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, "walcast_changes_delivered_total"),
        15.0,
        "{text}"
    );
    assert!(
        sample(&text, "walcast_frames_in_total{kind=\"text\"}") >= 4.0,
        "{text}"
    );
    assert!(sample(&text, "walcast_bytes_out_total") > 0.0, "{text}");
    // Leaving moves the gauges back.
    drop(clients);
    drop(bad);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, text) = server.get("/metrics").await.unwrap();
        if sample(&text, "walcast_sockets_connected") == 0.0
            && sample(&text, "walcast_channels_joined{kind=\"postgres_changes\"}") == 0.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauges did not go back to 0:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_500_sockets_exits_0_within_5s() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let mut server = Server::start(db.url(), "sigterm", &[]).await;
    let t = token("anon", 3600);
    let mut clients = Vec::with_capacity(500);
    for i in 0..500 {
        let mut c = server.connect(&t).await;
        if i % 10 == 0 {
            let reply = c
                .join("1", &format!("realtime:room{i}"), json!([]), &t)
                .await;
            assert_eq!(reply["status"], "ok");
        }
        clients.push(c);
    }
    let (status, took) = server.terminate(Duration::from_secs(5));
    let status =
        status.unwrap_or_else(|| panic!("still running after {took:?}:\n{}", server.log()));
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        server.log()
    );
    // Every socket was told why: 1012 service restart.
    let mut codes = std::collections::HashMap::new();
    for c in clients.iter_mut().take(50) {
        *codes
            .entry(c.close_code(Duration::from_secs(2)).await)
            .or_insert(0) += 1;
    }
    assert_eq!(codes.get(&Some(1012)), Some(&50), "{codes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_trigger_with_their_messages() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let server = Server::start(
        db.url(),
        "limits",
        &[
            "--max-events-per-second",
            "3",
            "--max-channels-per-client",
            "2",
            "--max-frame-bytes",
            "10000",
            "--handshake-timeout-secs",
            "1",
            "--idle-timeout-secs",
            "2",
        ],
    )
    .await;
    let t = token("anon", 3600);
    // Channels per socket.
    let mut c = server.connect(&t).await;
    for i in 0..2 {
        let r = c
            .join(&i.to_string(), &format!("realtime:c{i}"), json!([]), &t)
            .await;
        assert_eq!(r["status"], "ok");
    }
    let r = c.join("9", "realtime:c9", json!([]), &t).await;
    assert_eq!(
        r,
        json!({"status": "error", "response": {"reason": "ChannelRateLimitReached: Too many channels"}})
    );
    // Events per second: the fourth broadcast within a second closes the channel.
    for i in 0..6 {
        c.send(json!(["0", format!("b{i}"), "realtime:c0", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]))
            .await;
    }
    let sys = c
        .until(Duration::from_secs(5), |f| {
            f[3] == "system" && f[2] == "realtime:c0"
        })
        .await
        .expect("system message");
    assert_eq!(sys[4]["message"], "Too many messages per second");
    assert_eq!(sys[4]["status"], "error");
    let close = c
        .until(Duration::from_secs(5), |f| f[3] == "phx_close")
        .await
        .unwrap();
    assert_eq!(close, json!(["0", "0", "realtime:c0", "phx_close", {}]));
    // Empty topic name.
    let r = c.join("8", "realtime:", json!([]), &t).await;
    assert_eq!(
        r["response"]["reason"],
        "TopicNameRequired: You must provide a topic name"
    );
    // Frame size: a frame over the limit ends the socket (the WebSocket layer refuses to read
    // it; a 1009 close frame is attempted, but the stream may already be unusable).
    let mut big = server.connect(&t).await;
    big.send(json!([null, "1", "realtime:x", "broadcast", {"payload": "y".repeat(20_000)}]))
        .await;
    let code = big.close_code(Duration::from_secs(5)).await;
    assert!(matches!(code, None | Some(1009)), "{code:?}");
    assert!(
        big.next(Duration::from_secs(2)).await.is_none(),
        "socket must be closed"
    );
    // Handshake timeout: a client trickling its request headers is cut off.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut slow = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
            .await
            .unwrap();
        slow.write_all(b"GET /socket/websocket HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let started = std::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(8), slow.read(&mut buf))
            .await
            .expect("the server must close a stalled handshake")
            .unwrap_or(0);
        let _ = n;
        assert!(started.elapsed() < Duration::from_secs(8));
    }
    // Idle timeout: a socket that sends nothing is closed.
    let mut idle = server.connect(&t).await;
    assert_eq!(idle.close_code(Duration::from_secs(10)).await, Some(1000));
}

/// Upgrade with an Origin header; returns the HTTP status of a refused upgrade (None: accepted).
async fn upgrade_status(server: &Server, token: &str, origin: Option<&str>) -> Option<u16> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.ws_url(token, "2.0.0").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => None,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default()
                .to_string();
            assert!(body.starts_with("{\"error\":"), "{body}");
            Some(resp.status().as_u16())
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_join_and_origin_limits() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let server = Server::start(
        db.url(),
        "conn_limits",
        &[
            "--max-connections",
            "3",
            "--max-joins-per-second-per-client",
            "2",
            "--allowed-origins",
            "https://app.example.com, http://localhost:3000/",
        ],
    )
    .await;
    let t = token("anon", 3600);
    // Origins: exact matches pass, others (and `null`) get 403; no Origin header passes.
    assert_eq!(
        upgrade_status(&server, &t, Some("https://evil.example.com")).await,
        Some(403)
    );
    assert_eq!(upgrade_status(&server, &t, Some("null")).await, Some(403));
    assert_eq!(
        upgrade_status(&server, &t, Some("http://localhost:3000")).await,
        None
    );
    let mut a = server.connect(&t).await;
    // Joins per second (this client's share): five quick joins cannot all fit in windows of
    // two, and a socket over its share is disconnected.
    let mut refused = None;
    for i in 0..5 {
        a.send(json!([i.to_string(), i.to_string(), format!("realtime:j{i}"), "phx_join", {"config": {}}]))
            .await;
        let reply = a
            .until(Duration::from_secs(5), |f| f[3] == "phx_reply")
            .await;
        match reply {
            Some(r) if r[4]["status"] == "error" => {
                refused = Some(r[4]["response"]["reason"].clone());
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        refused,
        Some(json!(
            "ClientJoinRateLimitReached: Too many joins per second"
        ))
    );
    assert_eq!(a.close_code(Duration::from_secs(5)).await, Some(1008));
    // Connections: three held, the fourth refused with 429.
    let _held = [
        server.connect(&t).await,
        server.connect(&t).await,
        server.connect(&t).await,
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(upgrade_status(&server, &t, None).await, Some(429));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_token_guards_the_metrics_page() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let server = Server::start(db.url(), "metrics_token", &["--metrics-token", "s3cret"]).await;
    assert_eq!(server.get("/metrics").await.unwrap().0, 401);
    let (status, _) = server
        .get_with("/metrics", "Authorization: Bearer wrong\r\n")
        .await
        .unwrap();
    assert_eq!(status, 401);
    let (status, body) = server
        .get_with("/metrics", "Authorization: Bearer s3cret\r\n")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("walcast_replication_streaming 1"), "{body}");
    // Health and readiness stay open for probes.
    assert_eq!(server.get("/healthz").await.unwrap().0, 200);
    assert_eq!(server.get("/readyz").await.unwrap().0, 200);
}

/// One thread of the server: its name, nice value and CPU time in clock ticks.
struct ThreadStat {
    name: String,
    nice: i64,
    ticks: u64,
}

/// Every thread of process `pid`, from `/proc/<pid>/task/*/stat`.
fn threads(pid: u32) -> Vec<ThreadStat> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        // `tid (comm) state ppid …`: comm may hold spaces, so split after its ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = stat[open + 1..close].to_string();
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // Fields 14 and 15 (utime, stime) and 19 (nice), counted from 1 with the pid and
        // comm being 1 and 2: indices 11, 12 and 16 here.
        let field = |i: usize| rest.get(i).and_then(|v| v.parse::<i64>().ok()).unwrap_or(0);
        out.push(ThreadStat {
            name,
            nice: field(16),
            ticks: (field(11) + field(12)) as u64,
        });
    }
    out
}

fn intake_ticks(pid: u32) -> u64 {
    threads(pid)
        .iter()
        .filter(|t| t.name == "walcast-intake")
        .map(|t| t.ticks)
        .sum()
}

/// New sockets start on the intake threads, which run `--intake-nice` steps below the rest of
/// the server; once a socket's first join is live it is served by the serving runtime, so a
/// reconnect storm on the intake threads cannot hold it back. Checked by the threads' nice
/// values and by where a joined socket's heartbeats spend their CPU time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joined_sockets_leave_the_lowered_intake_threads() {
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    sql.batch_execute(
        "CREATE TABLE intake_t (id int PRIMARY KEY); GRANT SELECT ON intake_t TO anon;",
    )
    .await
    .unwrap();
    let server = Server::start(
        db.url(),
        "intake",
        &["--intake-threads=1", "--intake-nice=12"],
    )
    .await;
    let all = threads(server.pid());
    let base = all
        .iter()
        .find(|t| t.name == "walcast")
        .map(|t| t.nice)
        .expect("the server's main thread");
    let intake: Vec<&ThreadStat> = all.iter().filter(|t| t.name == "walcast-intake").collect();
    assert!(!intake.is_empty(), "no intake thread");
    assert!(
        intake.iter().all(|t| t.nice == (base + 12).min(19)),
        "the intake threads are lowered"
    );
    assert!(
        all.iter()
            .filter(|t| t.name.starts_with("tokio-runtime"))
            .all(|t| t.nice == base),
        "serving threads keep the process's priority"
    );

    let t = token("anon", 3600);
    let mut c = server.connect(&t).await;
    let reply = c
        .join(
            "1",
            "realtime:intake",
            json!([{"event": "INSERT", "schema": "public", "table": "intake_t"}]),
            &t,
        )
        .await;
    assert_eq!(reply["status"], "ok", "{reply}");
    c.until(Duration::from_secs(10), |f| f[3] == "system")
        .await
        .unwrap();
    // The joined socket's work from here on: thousands of heartbeats. Served on the
    // serving runtime, they cost the intake thread nothing (a clock tick of slack for
    // wake-ups); left on the intake thread they would cost it tens of ticks.
    let before = intake_ticks(server.pid());
    for i in 0..3000 {
        c.heartbeat(&format!("hb{i}"), Duration::from_secs(10))
            .await;
    }
    let spent = intake_ticks(server.pid()) - before;
    assert!(
        spent <= 1,
        "the intake thread spent {spent} ticks on an established socket's heartbeats"
    );
    // And the socket is fully served there: a change arrives.
    sql.execute("INSERT INTO intake_t VALUES (1)", &[])
        .await
        .unwrap();
    let change = c
        .until(Duration::from_secs(10), |f| f[3] == "postgres_changes")
        .await
        .unwrap();
    assert_eq!(change[4]["data"]["record"]["id"], 1, "{change}");
}
