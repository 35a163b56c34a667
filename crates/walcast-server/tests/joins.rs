//! Joins that scale (issue #11 item 2), against the real `walcast serve` binary and a real
//! throwaway Postgres: the catalog cache joins read through (single-flight, bounded in age,
//! invalidated by the pump at a table's Relation message) and the batched private-channel
//! read checks (many joins per round trip, each with its own role, claims and savepoint).
//!
//! What is proved, and how each test would fail without the feature it guards:
//! - a REVOKE / an added column is seen by the next join once the table's next change went
//!   through the stream (the Relation message came first), well inside CATALOG_TTL: without
//!   the pump's invalidation the cached answer would still be in force;
//! - without any change, the catalog is read again after CATALOG_TTL;
//! - a policy change on realtime.messages applies to the very next private join (read
//!   checks are never cached);
//! - many concurrent joins get their own correct answers and share a handful of catalog
//!   queries (the server's lookup counters);
//! - concurrent private joins with mixed allowed/denied tokens and two roles each get their
//!   own answer, in fewer round trips than checks;
//! - a policy function that sets a setting (even session-wide) cannot grant the next check
//!   in the same batch.
//!
//! Each test has its own database, roles prefixed with its name, and its own server on a
//! temporary slot: they run in parallel.

mod support;
use support::{database, name};

use std::time::Duration;

use serde_json::{json, Value};
use support::server::{token_with, Client, Frame, Options, Server};
use walcast_testkit::TestDb;

/// How long any single expected frame may take (generous: shared 2-core machines).
const WAIT: Duration = Duration::from_secs(15);
/// The server's CATALOG_TTL (db::catalog_cache).
const CATALOG_TTL: Duration = Duration::from_secs(10);

/// A server on a temporary slot of its own, join limits out of the way (the tests make many
/// joins at once from one address).
async fn serve(db: &TestDb, tag: &str) -> Server {
    Server::start_with(
        db.url(),
        &name(db, tag),
        Options::default().args(&[
            "--temporary-slot",
            "--max-joins-per-second=100000",
            "--max-joins-per-second-per-client=100000",
        ]),
    )
    .await
}

async fn exec(sql: &tokio_postgres::Client, statements: &[String]) {
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    support::exec_each(sql, &refs).await;
}

fn tok(role: &str, sub: &str) -> String {
    token_with(json!({"role": role, "sub": sub}))
}

fn payload(token: &str, private: bool, bindings: Value) -> Value {
    json!({"config": {
            "broadcast": {"self": false, "ack": false},
            "presence": {"enabled": false, "key": ""},
            "private": private,
            "postgres_changes": bindings},
        "access_token": token})
}

fn insert_on(table: &str) -> Value {
    json!([{"event": "INSERT", "schema": "public", "table": table}])
}

async fn send_join(c: &mut Client, topic: &str, payload: Value) {
    c.send(json!(["1", "1", topic, "phx_join", payload])).await;
}

/// The join reply's payload on `topic`.
async fn join_reply(c: &mut Client, topic: &str) -> Value {
    let mut frames = c
        .collect_until(WAIT, &format!("the reply to joining {topic}"), |f| {
            f.json()
                .is_some_and(|v| v[2] == topic && v[1] == "1" && v[3] == "phx_reply")
        })
        .await;
    let reply = frames.pop().and_then(|f| f.json().map(|v| v[4].clone()));
    c.skipped.extend(frames);
    reply.unwrap_or(Value::Null)
}

/// The first postgres_changes `system` message on `topic`: ("ok" | "error", message).
async fn changes_status(c: &mut Client, topic: &str) -> (String, String) {
    let is_status = |f: &Frame| {
        f.json().is_some_and(|v| {
            v[2] == topic && v[3] == "system" && v[4]["extension"] == "postgres_changes"
        })
    };
    if let Some(i) = c.skipped.iter().position(is_status) {
        let f = c.skipped.remove(i);
        let v = f.json().map(|v| v[4].clone()).unwrap_or(Value::Null);
        return (
            v["status"].as_str().unwrap_or("").into(),
            v["message"].as_str().unwrap_or("").into(),
        );
    }
    let mut frames = c
        .collect_until(WAIT, "the postgres_changes status", is_status)
        .await;
    let v = frames
        .pop()
        .and_then(|f| f.json().map(|v| v[4].clone()))
        .unwrap_or(Value::Null);
    c.skipped.extend(frames);
    (
        v["status"].as_str().unwrap_or("").into(),
        v["message"].as_str().unwrap_or("").into(),
    )
}

/// Connect, join `topic` with one INSERT binding on `table`, return the client and the
/// binding's status.
async fn join_changes(
    server: &Server,
    role: &str,
    sub: &str,
    topic: &str,
    bindings: Value,
) -> (Client, (String, String)) {
    let t = tok(role, sub);
    let mut c = server.connect(&t).await;
    send_join(&mut c, topic, payload(&t, false, bindings)).await;
    let reply = join_reply(&mut c, topic).await;
    assert_eq!(reply["status"], "ok", "joining {topic} as {role}: {reply}");
    let status = changes_status(&mut c, topic).await;
    (c, status)
}

/// Wait until `c` (joined to `topic` on `table`) receives the row with this id.
async fn row_arrives(c: &mut Client, topic: &str, table: &str, id: i64) -> Value {
    let mut frames = c
        .collect_until(WAIT, &format!("{table} row {id}"), |f| {
            f.json().is_some_and(|v| {
                v[2] == topic
                    && v[3] == "postgres_changes"
                    && v[4]["data"]["table"] == table
                    && v[4]["data"]["record"]["id"] == id
            })
        })
        .await;
    let row = frames
        .pop()
        .and_then(|f| f.json().map(|v| v[4]["data"]["record"].clone()))
        .unwrap_or(Value::Null);
    c.skipped.extend(frames);
    row
}

/// `name{labels…} value` lines of /metrics whose labels include all of `labels`.
async fn metric(server: &Server, name: &str, labels: &[&str]) -> f64 {
    let (status, text) = server.get("/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200);
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|x| l.contains(x)))
        .filter(|l| l[name.len()..].starts_with(['{', ' ']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Tables `t` (watched by the joins under test) and an observer role that may read it.
async fn tables_and_observer(db: &TestDb, sql: &tokio_postgres::Client) -> String {
    let observer = name(db, "observer");
    exec(
        sql,
        &[
            "CREATE TABLE t (id int8 PRIMARY KEY, body text)".into(),
            format!("CREATE ROLE {observer} NOLOGIN"),
            format!("GRANT SELECT ON t TO {observer}"),
        ],
    )
    .await;
    observer
}

// ----------------------------------------------------------------------------------------
// Cache invalidation

/// A REVOKE is seen by the next join as soon as the table's next change has gone through
/// the stream (its Relation message forgets the cached privilege), long before CATALOG_TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_is_seen_by_the_next_join_after_the_tables_relation_message() {
    let (db, sql) = database().await;
    let server = serve(&db, "jrevoke").await;
    let observer = tables_and_observer(&db, &sql).await;
    let r = name(&db, "reader");
    exec(
        &sql,
        &[
            format!("CREATE ROLE {r} NOLOGIN"),
            format!("GRANT SELECT ON t TO {r}"),
        ],
    )
    .await;
    let (mut watch, status) =
        join_changes(&server, &observer, "o", "realtime:o", insert_on("t")).await;
    assert_eq!(status.0, "ok", "{status:?}");
    // The first join caches the role's privilege on t.
    let started = std::time::Instant::now();
    let (_first, status) = join_changes(&server, &r, "a", "realtime:a", insert_on("t")).await;
    assert_eq!(status.0, "ok", "allowed before the revoke: {status:?}");

    sql.batch_execute(&format!(
        "REVOKE SELECT ON t FROM {r}; INSERT INTO t VALUES (1, 'x')"
    ))
    .await
    .expect("revoke, then a change on t");
    row_arrives(&mut watch, "realtime:o", "t", 1).await;
    let (_second, status) = join_changes(&server, &r, "b", "realtime:b", insert_on("t")).await;
    assert!(
        started.elapsed() < CATALOG_TTL,
        "the test took longer than CATALOG_TTL: it proves nothing about invalidation"
    );
    assert_eq!(
        status.0, "error",
        "a join after REVOKE + change was allowed: {status:?}"
    );
    assert!(
        status.1.contains("permission denied for table t"),
        "{status:?}"
    );
}

/// ALTER TABLE … ADD COLUMN: once the table's next change went through, a join may select
/// the new column (the cached description, without it, was forgotten).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_column_is_seen_by_the_next_join_after_the_tables_relation_message() {
    let (db, sql) = database().await;
    let server = serve(&db, "jcolumn").await;
    let observer = tables_and_observer(&db, &sql).await;
    let (mut watch, status) =
        join_changes(&server, &observer, "o", "realtime:o", insert_on("t")).await;
    assert_eq!(status.0, "ok", "{status:?}");
    let started = std::time::Instant::now();
    let select =
        |col: &str| json!([{"event": "INSERT", "schema": "public", "table": "t", "select": [col]}]);
    let (_first, status) =
        join_changes(&server, &observer, "a", "realtime:a", select("body")).await;
    assert_eq!(status.0, "ok", "{status:?}");

    sql.batch_execute("ALTER TABLE t ADD COLUMN extra text; INSERT INTO t VALUES (1, 'x', 'y')")
        .await
        .expect("add a column, then a change on t");
    let row = row_arrives(&mut watch, "realtime:o", "t", 1).await;
    assert_eq!(row["extra"], "y", "{row}");
    let (mut second, status) =
        join_changes(&server, &observer, "b", "realtime:b", select("extra")).await;
    assert!(
        started.elapsed() < CATALOG_TTL,
        "the test took longer than CATALOG_TTL: it proves nothing about invalidation"
    );
    assert_eq!(
        status.0, "ok",
        "the new column was not known to the join: {status:?}"
    );
    sql.batch_execute("INSERT INTO t VALUES (2, 'x2', 'y2')")
        .await
        .expect("insert");
    let row = row_arrives(&mut second, "realtime:b", "t", 2).await;
    assert_eq!(row, json!({"id": 2, "extra": "y2"}), "select = key + extra");
}

/// Without any change on the table (no Relation message), a REVOKE still reaches joins
/// that start CATALOG_TTL after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_change_a_revoke_reaches_joins_after_the_ttl() {
    let (db, sql) = database().await;
    let server = serve(&db, "jttl").await;
    tables_and_observer(&db, &sql).await;
    let r = name(&db, "reader");
    exec(
        &sql,
        &[
            format!("CREATE ROLE {r} NOLOGIN"),
            format!("GRANT SELECT ON t TO {r}"),
        ],
    )
    .await;
    let (_first, status) = join_changes(&server, &r, "a", "realtime:a", insert_on("t")).await;
    assert_eq!(status.0, "ok", "{status:?}");
    sql.batch_execute(&format!("REVOKE SELECT ON t FROM {r}"))
        .await
        .expect("revoke");
    tokio::time::sleep(CATALOG_TTL + Duration::from_millis(500)).await;
    let (_second, status) = join_changes(&server, &r, "b", "realtime:b", insert_on("t")).await;
    assert_eq!(
        status.0, "error",
        "a join CATALOG_TTL after the REVOKE was allowed: {status:?}"
    );
    assert!(
        status.1.contains("permission denied for table t"),
        "{status:?}"
    );
}

// ----------------------------------------------------------------------------------------
// Single flight

/// Sixty sockets join at once, half under a role that may read t and half under one that
/// may not: each gets its own answer, and the server queried the table and each role's
/// privilege a handful of times, not sixty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_share_catalog_queries_and_get_their_own_answers() {
    let (db, sql) = database().await;
    let server = serve(&db, "jflight").await;
    tables_and_observer(&db, &sql).await;
    let (yes, no) = (name(&db, "yes"), name(&db, "no"));
    exec(
        &sql,
        &[
            format!("CREATE ROLE {yes} NOLOGIN"),
            format!("CREATE ROLE {no} NOLOGIN"),
            format!("GRANT SELECT ON t TO {yes}"),
        ],
    )
    .await;
    const N: usize = 60;
    let mut clients = Vec::new();
    for i in 0..N {
        let role = if i % 2 == 0 { &yes } else { &no };
        let t = tok(role, &format!("user{i}"));
        clients.push((server.connect(&t).await, t));
    }
    let misses_before = metric(
        &server,
        "walcast_catalog_cache_lookups_total",
        &["outcome=\"miss\"", "kind=\"table_access\""],
    )
    .await;
    // Every join is on the wire before any answer is read.
    for (i, (c, t)) in clients.iter_mut().enumerate() {
        send_join(
            c,
            &format!("realtime:c{i}"),
            payload(t, false, insert_on("t")),
        )
        .await;
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let topic = format!("realtime:c{i}");
        let reply = join_reply(c, &topic).await;
        assert_eq!(reply["status"], "ok", "{topic}: {reply}");
        let status = changes_status(c, &topic).await;
        if i % 2 == 0 {
            assert_eq!(status.0, "ok", "{topic} (may read t): {status:?}");
        } else {
            assert_eq!(status.0, "error", "{topic} (may not read t): {status:?}");
            assert!(
                status.1.contains("permission denied for table t"),
                "{status:?}"
            );
        }
    }
    let lookups = |kind: &'static str, outcome: &'static str| {
        let server = &server;
        async move {
            metric(
                server,
                "walcast_catalog_cache_lookups_total",
                &[
                    &format!("kind=\"{kind}\""),
                    &format!("outcome=\"{outcome}\""),
                ],
            )
            .await
        }
    };
    let access_misses = lookups("table_access", "miss").await - misses_before;
    let access_hits = lookups("table_access", "hit").await;
    let table_misses = lookups("table", "miss").await;
    assert_eq!(
        access_misses + access_hits,
        N as f64,
        "every join looked up its role's privilege once"
    );
    // Two roles: two queries; a little slack in case an entry ages out on a slow machine.
    assert!(
        access_misses <= 4.0,
        "{access_misses} privilege queries for {N} concurrent joins under 2 roles"
    );
    assert!(
        table_misses <= 2.0,
        "{table_misses} table queries for {N} concurrent joins of one table"
    );
}

// ----------------------------------------------------------------------------------------
// Private channels

/// The realtime.messages policy of these tests: `member` reads `room-<its sub>`.
async fn room_policy(db: &TestDb, sql: &tokio_postgres::Client) -> (String, String) {
    let (member, other) = (name(db, "member"), name(db, "other"));
    exec(
        sql,
        &[
            format!("CREATE ROLE {member} NOLOGIN"),
            format!("CREATE ROLE {other} NOLOGIN"),
            format!(
                "CREATE POLICY own_room ON realtime.messages FOR SELECT TO {member} \
                 USING (realtime.topic() = 'room-' || \
                        (pg_catalog.current_setting('request.jwt.claims', true)::jsonb ->> 'sub'))"
            ),
        ],
    )
    .await;
    (member, other)
}

async fn private_join(server: &Server, role: &str, sub: &str, room: &str) -> Value {
    let t = tok(role, sub);
    let mut c = server.connect(&t).await;
    let topic = format!("realtime:{room}");
    send_join(&mut c, &topic, payload(&t, true, json!([]))).await;
    join_reply(&mut c, &topic).await
}

fn unauthorized(room: &str) -> Value {
    json!({"status": "error", "response": {"reason": format!(
        "Unauthorized: You do not have permissions to read from this Channel topic: {room}")}})
}

/// A policy change on realtime.messages applies to the very next private join: read checks
/// are never cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_applies_to_the_next_private_join() {
    let (db, sql) = database().await;
    let server = serve(&db, "jpolicy").await;
    let (member, _) = room_policy(&db, &sql).await;
    let reply = private_join(&server, &member, "u1", "room-u1").await;
    assert_eq!(reply["status"], "ok", "{reply}");
    sql.batch_execute("DROP POLICY own_room ON realtime.messages")
        .await
        .expect("drop policy");
    let reply = private_join(&server, &member, "u1", "room-u1").await;
    assert_eq!(reply, unauthorized("room-u1"), "allowed after DROP POLICY");
    sql.batch_execute(&format!(
        "CREATE POLICY any_room ON realtime.messages FOR SELECT TO {member} USING (true)"
    ))
    .await
    .expect("create policy");
    let reply = private_join(&server, &member, "u1", "room-u2").await;
    assert_eq!(
        reply["status"], "ok",
        "refused after CREATE POLICY: {reply}"
    );
}

/// Eighty private joins at once under two roles, each token allowed or denied by its own
/// claims: every join gets its own answer, and the checks shared round trips.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_private_checks_answer_each_join_for_its_own_token() {
    let (db, sql) = database().await;
    let server = serve(&db, "jbatch").await;
    let (member, other) = room_policy(&db, &sql).await;
    const N: usize = 80;
    // i % 4: 0, 1 → member in its own room (allowed); 2 → member in the next user's room
    // (denied); 3 → the other role in its own room (denied: the policy is for member).
    let plan = |i: usize| -> (&str, String, String, bool) {
        let sub = format!("u{i}");
        match i % 4 {
            0 | 1 => (member.as_str(), sub.clone(), format!("room-{sub}"), true),
            2 => (member.as_str(), sub, format!("room-u{}", i + 1), false),
            _ => (other.as_str(), sub.clone(), format!("room-{sub}"), false),
        }
    };
    let mut clients = Vec::new();
    for i in 0..N {
        let (role, sub, _, _) = plan(i);
        let t = tok(role, &sub);
        clients.push((server.connect(&t).await, t));
    }
    let batches_before = metric(&server, "walcast_private_read_batches_total", &[]).await;
    let checks_before = metric(&server, "walcast_private_read_checks_total", &[]).await;
    for (i, (c, t)) in clients.iter_mut().enumerate() {
        let room = plan(i).2;
        send_join(c, &format!("realtime:{room}"), payload(t, true, json!([]))).await;
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let (role, sub, room, allowed) = plan(i);
        let reply = join_reply(c, &format!("realtime:{room}")).await;
        if allowed {
            assert_eq!(reply["status"], "ok", "{role}/{sub} in {room}: {reply}");
        } else {
            assert_eq!(reply, unauthorized(&room), "{role}/{sub} in {room}");
        }
    }
    let batches = metric(&server, "walcast_private_read_batches_total", &[]).await - batches_before;
    let checks = metric(&server, "walcast_private_read_checks_total", &[]).await - checks_before;
    assert_eq!(checks, N as f64, "one read check per join");
    assert!(
        batches < checks,
        "{checks} concurrent read checks took {batches} round trips: nothing was batched"
    );
}

/// A policy function that sets a setting (session-wide, not just locally) while one check is
/// judged cannot grant the next check of the same batch: each check's savepoint undoes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_function_cannot_leak_settings_into_the_next_check() {
    let (db, sql) = database().await;
    let server = serve(&db, "jleak").await;
    let member = name(&db, "member");
    exec(
        &sql,
        &[
            format!("CREATE ROLE {member} NOLOGIN"),
            // Grants the 'evil' topic, and on the way marks the session as granted.
            "CREATE FUNCTION public.leaky() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
             BEGIN
               PERFORM pg_catalog.set_config('walcast_test.granted', 'yes', false);
               PERFORM pg_catalog.set_config('request.jwt.claims', '{\"sub\":\"victim\"}', false);
               RETURN realtime.topic() = 'evil';
             END $$"
                .into(),
            format!("GRANT EXECUTE ON FUNCTION public.leaky() TO {member}"),
            format!(
                "CREATE POLICY leaky ON realtime.messages FOR SELECT TO {member} \
                 USING (coalesce(pg_catalog.current_setting('walcast_test.granted', true), '') = 'yes' \
                        OR (pg_catalog.current_setting('request.jwt.claims', true)::jsonb ->> 'sub') = 'victim' \
                        OR public.leaky())"
            ),
        ],
    )
    .await;
    const N: usize = 60;
    let mut clients = Vec::new();
    for i in 0..N {
        let t = tok(&member, &format!("u{i}"));
        clients.push((server.connect(&t).await, t));
    }
    let room = |i: usize| if i % 2 == 0 { "evil" } else { "innocent" };
    for (i, (c, t)) in clients.iter_mut().enumerate() {
        send_join(
            c,
            &format!("realtime:{}", room(i)),
            payload(t, true, json!([])),
        )
        .await;
    }
    for (i, (c, _)) in clients.iter_mut().enumerate() {
        let reply = join_reply(c, &format!("realtime:{}", room(i))).await;
        if i % 2 == 0 {
            assert_eq!(reply["status"], "ok", "evil {i}: {reply}");
        } else {
            assert_eq!(
                reply,
                unauthorized("innocent"),
                "socket {i}: a setting left by another check's policy function granted this one"
            );
        }
    }
}
