//! Join options that tie a channel to the replication stream, against the real `walcast
//! serve` and a real Postgres: `config.postgres_changes_options.wait` (the join reply means
//! the bindings are live, or the join is refused in Supabase's words) and
//! `config.broadcast.replication_ready` (a `system` message once the stream is up, or the
//! channel closed when it is not in time).
//!
//! The stream is made "not ready" the way it happens in production: a second server started
//! on the slot the first one streams from gets `replication slot … is active` and never
//! streams, while it keeps serving sockets.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{token_with, Client, Options, Server};
use walcast_testkit::PgCluster;

const WAIT: Duration = Duration::from_secs(15);

fn changes(token: &str, bindings: Value, extra: Value) -> Value {
    let mut config = json!({
        "broadcast": {"self": false, "ack": false},
        "presence": {"enabled": false, "key": ""},
        "private": false,
        "postgres_changes": bindings,
    });
    if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    json!({"config": config, "access_token": token})
}

/// The next `system` push on `topic`.
async fn system(c: &mut Client, topic: &str) -> Value {
    let f = c
        .until(WAIT, |f| f[2] == topic && f[3] == "system")
        .await
        .unwrap_or_else(|| panic!("a system message on {topic}"));
    f[4].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_and_replication_ready_follow_the_stream() {
    let db = PgCluster::shared()
        .fresh_database()
        .await
        .expect("a fresh test database");
    let sql = db.connect().await.expect("connect");
    let reader = format!("{}_reader", db.name());
    support::exec_each(
        &sql,
        &[
            "CREATE TABLE todos (id int PRIMARY KEY, title text)",
            "CREATE TABLE hidden (id int PRIMARY KEY)",
            &format!("CREATE ROLE {reader} NOLOGIN"),
            &format!("GRANT SELECT ON todos, hidden TO {reader}"),
            // `hidden` is left out of the publication the server streams.
            "CREATE PUBLICATION walcast FOR TABLE todos",
        ],
    )
    .await;
    let slot = format!("{}_jo", db.name());
    let live = Server::start_with(
        db.url(),
        &slot,
        Options::default().args(&["--temporary-slot"]),
    )
    .await;
    let t = token_with(json!({"role": reader, "sub": "u1"}));
    let todos = json!([{"event": "*", "schema": "public", "table": "todos"}]);

    // --- the stream is up ------------------------------------------------------------
    let mut c = live.connect(&t).await;
    let r = c
        .join_with(
            "1",
            "realtime:w",
            changes(
                &t,
                todos.clone(),
                json!({"postgres_changes_options": {"wait": true}}),
            ),
        )
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    let s = system(&mut c, "realtime:w").await;
    assert_eq!(
        s,
        json!({"extension": "postgres_changes", "status": "ok", "message": "Subscribed to PostgreSQL", "channel": "w"})
    );
    // The reply meant it: a row committed right after it arrives.
    sql.batch_execute("INSERT INTO todos VALUES (1, 'first')")
        .await
        .expect("insert");
    let row = c
        .until(WAIT, |f| f[2] == "realtime:w" && f[3] == "postgres_changes")
        .await
        .expect("the row");
    assert_eq!(row[4]["data"]["record"]["title"], "first");

    // An entry that cannot be subscribed refuses a waiting join (and only a waiting one).
    let hidden = json!([{"event": "*", "schema": "public", "table": "hidden"}]);
    let r = c
        .join_with(
            "2",
            "realtime:h",
            changes(
                &t,
                hidden.clone(),
                json!({"postgres_changes_options": {"wait": true}}),
            ),
        )
        .await;
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(
        r["response"]["reason"],
        "RealtimeDisabledForConfiguration: Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: hidden, filters: [], select: ]"
    );
    let r = c
        .join_with("3", "realtime:h2", changes(&t, hidden, json!({})))
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(system(&mut c, "realtime:h2").await["status"], "error");

    // replication_ready: said right after the reply.
    let r = c
        .join_with(
            "4",
            "realtime:rr",
            changes(
                &t,
                json!([]),
                json!({"broadcast": {"replication_ready": true}}),
            ),
        )
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        system(&mut c, "realtime:rr").await,
        json!({"extension": "system", "status": "ok", "message": "Replication connection established", "channel": "rr"})
    );

    // --- a server that cannot stream (its slot is held by `live`) -----------------------
    let stuck = Server::start_serving(
        db.url(),
        &slot,
        Options::default().args(&[
            "--postgres-changes-wait-max-ms",
            "1500",
            "--replication-ready-timeout-ms",
            "1000",
        ]),
    )
    .await;
    let (code, body) = stuck.get("/readyz").await.expect("readyz");
    assert_ne!(code, 200, "the second server must not stream: {body}");
    let mut d = stuck.connect(&t).await;

    // wait: refused after the client's timeout…
    let started = Instant::now();
    let r = d
        .join_with(
            "1",
            "realtime:a",
            changes(
                &t,
                todos.clone(),
                json!({"postgres_changes_options": {"wait": true, "timeout": 300}}),
            ),
        )
        .await;
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(
        r["response"]["reason"],
        "PostgresChangesSubscribeTimeout: Timed out after 300ms waiting for the postgres_changes subscription"
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
    // …or the server's cap when the client asks for more.
    let started = Instant::now();
    let r = d
        .join_with(
            "2",
            "realtime:b",
            changes(
                &t,
                todos.clone(),
                json!({"postgres_changes_options": {"wait": true, "timeout": 60000}}),
            ),
        )
        .await;
    assert_eq!(
        r["response"]["reason"],
        "PostgresChangesSubscribeTimeout: Timed out after 1500ms waiting for the postgres_changes subscription"
    );
    assert!(started.elapsed() >= Duration::from_millis(1500));
    // Without wait the join succeeds and says the stream is down.
    let r = d
        .join_with("3", "realtime:c", changes(&t, todos.clone(), json!({})))
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    let s = system(&mut d, "realtime:c").await;
    assert_eq!(s["extension"], "postgres_changes");
    assert_eq!(s["status"], "error");

    // replication_ready: the channel is closed when the stream is not up in time.
    let r = d
        .join_with(
            "4",
            "realtime:rr",
            changes(
                &t,
                json!([]),
                json!({"broadcast": {"replication_ready": true}}),
            ),
        )
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        system(&mut d, "realtime:rr").await,
        json!({"extension": "system", "status": "error", "message": "Replication connection was not established in time", "channel": "rr"})
    );
    let close = d
        .until(WAIT, |f| f[2] == "realtime:rr" && f[3] == "phx_close")
        .await
        .expect("phx_close");
    assert_eq!(close[0], "4");
    // The socket itself goes on.
    d.heartbeat("hb", WAIT).await;
}
