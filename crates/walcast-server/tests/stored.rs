//! Stored broadcasts and replay (issue #14 item 1), against the real `walcast serve` binary
//! and a real throwaway Postgres: persisted sends over REST and WebSocket stored as their
//! sender, SQL and direct-INSERT broadcasts, `realtime.send_binary`, replay at join (order,
//! limit, since, meta, Supabase's errors) and the deletion of expired rows.
//!
//! Each test has its own database (roles prefixed with its name), temporary slot and port.

mod support;
use support::{database, name};

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{token_with, Client, Frame, Options, Server};
use walcast_testkit::TestDb;

const WAIT: Duration = Duration::from_secs(15);

async fn serve(db: &TestDb, tag: &str, extra: &[&str]) -> Server {
    let opts = Options::default().args(&["--temporary-slot"]).args(extra);
    Server::start_with(db.url(), &name(db, tag), opts).await
}

async fn exec(sql: &tokio_postgres::Client, statements: &[String]) {
    let refs: Vec<&str> = statements.iter().map(String::as_str).collect();
    support::exec_each(sql, &refs).await;
}

fn tok(role: &str, sub: &str) -> String {
    token_with(json!({"role": role, "sub": sub}))
}

fn join_payload(token: &str, private: bool, broadcast: Value) -> Value {
    json!({"config": {"broadcast": broadcast, "presence": {"enabled": false},
                      "private": private, "postgres_changes": []},
           "access_token": token})
}

/// Roles of a test (made once the server created realtime.messages): `member` reads and
/// writes topic `room`, `reader` only reads it.
struct Roles {
    member: String,
    reader: String,
}

async fn roles(db: &TestDb, sql: &tokio_postgres::Client) -> Roles {
    let (member, reader) = (name(db, "member"), name(db, "reader"));
    exec(
        sql,
        &[
            format!("CREATE ROLE {member} NOLOGIN"),
            format!("CREATE ROLE {reader} NOLOGIN"),
            format!("CREATE POLICY m_read ON realtime.messages FOR SELECT TO {member}, {reader} USING (topic = 'room' AND extension = 'broadcast')"),
            format!("CREATE POLICY m_write ON realtime.messages FOR INSERT TO {member} WITH CHECK (topic = 'room' AND extension = 'broadcast')"),
        ],
    )
    .await;
    Roles { member, reader }
}

/// Join `realtime:room` privately; panics unless the join is accepted.
async fn join_room(server: &Server, token: &str, broadcast: Value) -> Client {
    let mut c = server.connect(token).await;
    let reply = c
        .join_with("1", "realtime:room", join_payload(token, true, broadcast))
        .await;
    assert_eq!(reply["status"], "ok", "join refused: {reply}");
    c
}

/// The next kind 4 broadcast on `realtime:room`: (event, metadata JSON, encoding, payload).
async fn next_broadcast(c: &mut Client, what: &str) -> (String, Value, u8, Vec<u8>) {
    let mut skipped = std::mem::take(&mut c.skipped);
    let pos = skipped.iter().position(|f| f.user_broadcast().is_some());
    let frame = match pos {
        Some(i) => {
            let rest = skipped.split_off(i + 1);
            c.skipped = rest;
            skipped.pop().expect("the frame found")
        }
        None => c
            .collect_until(WAIT, what, |f| f.user_broadcast().is_some())
            .await
            .pop()
            .expect("collect_until returns the match"),
    };
    let Frame::Binary(raw) = &frame else {
        unreachable!("user_broadcast is only Some for binary frames")
    };
    let encoding = raw[4];
    let (topic, event, meta, payload) = frame.user_broadcast().expect("a kind 4 frame");
    assert_eq!(topic, "realtime:room");
    let meta = if meta.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&meta).expect("metadata is JSON")
    };
    (event, meta, encoding, payload)
}

fn json_of(payload: &[u8]) -> Value {
    serde_json::from_slice(payload).expect("a JSON payload")
}

/// `realtime.send` by the test's superuser: a broadcast every member gets, used as a fence
/// (whatever was committed before it and is delivered at all arrives before it).
async fn fence(sql: &tokio_postgres::Client, n: i64) {
    sql.execute(
        "SELECT realtime.send(jsonb_build_object('fence', $1::int8), 'fence', 'room', true)",
        &[&n],
    )
    .await
    .expect("the fence broadcast");
}

async fn rest_single(server: &Server, token: &str, query: &str, body: &[u8], binary: bool) -> u16 {
    let auth = format!("Bearer {token}");
    let ctype = if binary {
        "application/octet-stream"
    } else {
        "application/json"
    };
    server
        .request(
            "POST",
            &format!("/api/broadcast/room/events/ev?{query}"),
            &[("Authorization", &auth), ("Content-Type", ctype)],
            body,
        )
        .await
        .expect("the server answers")
        .status
}

/// A kind 3 (user broadcast push) frame as the official client builds it.
fn kind3(
    join_ref: &str,
    msg_ref: &str,
    topic: &str,
    event: &str,
    meta: &str,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![
        3,
        join_ref.len() as u8,
        msg_ref.len() as u8,
        topic.len() as u8,
        event.len() as u8,
        meta.len() as u8,
        1, // JSON
    ];
    for part in [join_ref, msg_ref, topic, event, meta] {
        f.extend_from_slice(part.as_bytes());
    }
    f.extend_from_slice(payload);
    f
}

async fn send_binary(c: &mut Client, frame: Vec<u8>) {
    use futures_util::SinkExt;
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(
        frame.into(),
    ))
    .await
    .expect("send a binary frame");
}

/// The reply to `msg_ref` (frames before it stay in `skipped`).
async fn reply_to(c: &mut Client, msg_ref: &str) -> Value {
    let mut frames = c
        .collect_until(WAIT, &format!("the reply to {msg_ref}"), |f| {
            f.json()
                .is_some_and(|v| v[1] == msg_ref && v[3] == "phx_reply")
        })
        .await;
    let reply = frames.pop().and_then(|f| f.json().cloned()).expect("json");
    c.skipped.extend(frames);
    reply[4].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_rest_send_is_stored_as_the_sender_and_delivered_once_with_its_id() {
    let (db, sql) = database().await;
    let server = serve(&db, "rest", &[]).await;
    let r = roles(&db, &sql).await;
    let (member_t, reader_t) = (tok(&r.member, "m"), tok(&r.reader, "r"));
    let mut watcher = join_room(&server, &reader_t, json!({})).await;

    // persist[ttl]: stored with an expiry, delivered with the row's id.
    let status = rest_single(
        &server,
        &member_t,
        "private=true&persist[ttl]=60",
        br#"{"n":1}"#,
        false,
    )
    .await;
    assert_eq!(status, 202);
    let (event, meta, encoding, payload) = next_broadcast(&mut watcher, "the persisted send").await;
    assert_eq!(
        (event.as_str(), encoding, json_of(&payload)),
        ("ev", 1, json!({"n": 1}))
    );
    let id = meta["id"].as_str().expect("meta.id").to_owned();
    let row = sql
        .query_one(
            "SELECT topic, event, payload::text, private, skip_broadcast, \
                    extract(epoch from expires_at - inserted_at)::int8 \
             FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("the stored row");
    assert_eq!(row.get::<_, String>(0), "room");
    assert_eq!(row.get::<_, String>(1), "ev");
    assert_eq!(json_of(row.get::<_, String>(2).as_bytes()), json!({"n": 1}));
    assert!(row.get::<_, bool>(3), "stored private");
    assert!(row.get::<_, bool>(4), "marked as delivered live");
    let ttl = row.get::<_, i64>(5);
    assert!(
        (59..=61).contains(&ttl),
        "expires 60 s after insertion: {ttl}"
    );

    // persist=true: no expiry of its own (the retention applies). Then a fence: the WAL copies
    // of both rows were not delivered a second time.
    let status = rest_single(
        &server,
        &member_t,
        "private=true&persist=true",
        br#"{"n":2}"#,
        false,
    )
    .await;
    assert_eq!(status, 202);
    let (_, meta2, _, payload) = next_broadcast(&mut watcher, "the second persisted send").await;
    assert_eq!(json_of(&payload), json!({"n": 2}));
    let id2 = meta2["id"].as_str().expect("meta.id").to_owned();
    let expires: Option<std::time::SystemTime> = sql
        .query_one(
            "SELECT expires_at FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id2],
        )
        .await
        .expect("the second row")
        .get(0);
    assert_eq!(expires, None);
    fence(&sql, 1).await;
    let (event, _, _, payload) = next_broadcast(&mut watcher, "the fence").await;
    assert_eq!(
        (event.as_str(), &json_of(&payload)["fence"]),
        ("fence", &json!(1)),
        "a persisted send was delivered again from the WAL"
    );

    // The reader may not write: refused (403), nothing stored; persist on a public channel: 422.
    let before: i64 = sql
        .query_one("SELECT count(*) FROM realtime.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        rest_single(
            &server,
            &reader_t,
            "private=true&persist=true",
            b"{}",
            false
        )
        .await,
        403
    );
    assert_eq!(
        rest_single(&server, &member_t, "persist=true", b"{}", false).await,
        422
    );
    assert_eq!(
        rest_single(
            &server,
            &member_t,
            "private=true&persist[ttl]=soon",
            b"{}",
            false
        )
        .await,
        422
    );
    let after: i64 = sql
        .query_one("SELECT count(*) FROM realtime.messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(before, after, "refused sends store nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_sends_and_direct_inserts_by_authorized_roles_are_broadcast_and_stored() {
    let (db, sql) = database().await;
    let server = serve(&db, "sql", &[]).await;
    let r = roles(&db, &sql).await;
    let reader_t = tok(&r.reader, "r");
    let mut watcher = join_room(&server, &reader_t, json!({})).await;

    // realtime.send(..., private => true) by the member: stored and delivered.
    sql.batch_execute(&format!(
        "SET ROLE {m}; SELECT realtime.send('{{\"k\":\"send\"}}'::jsonb, 'ev', 'room', private => true); RESET ROLE",
        m = r.member
    ))
    .await
    .expect("realtime.send");
    let (_, meta, _, payload) = next_broadcast(&mut watcher, "the SQL send").await;
    assert_eq!(json_of(&payload)["k"], "send");
    let id = meta["id"].as_str().expect("meta.id").to_owned();
    let stored: bool = sql
        .query_one(
            "SELECT private FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("the row of realtime.send")
        .get(0);
    assert!(stored);

    // A direct INSERT by the member is broadcast like a send; the reader's is refused by the
    // policies and never reaches anyone (the fence that follows arrives first).
    sql.batch_execute(&format!(
        "SET ROLE {m}; INSERT INTO realtime.messages (id, topic, extension, event, payload, private) \
         VALUES (gen_random_uuid(), 'room', 'broadcast', 'direct', '{{\"k\":\"insert\"}}', true); RESET ROLE",
        m = r.member
    ))
    .await
    .expect("the member's direct insert");
    let (event, meta, _, payload) = next_broadcast(&mut watcher, "the direct insert").await;
    assert_eq!(
        (event.as_str(), json_of(&payload)),
        ("direct", json!({"k": "insert"}))
    );
    assert!(meta["id"].is_string());
    let refused = sql
        .batch_execute(&format!(
            "SET ROLE {rd}; INSERT INTO realtime.messages (id, topic, extension, event, payload, private) \
             VALUES (gen_random_uuid(), 'room', 'broadcast', 'forged', '{{}}', true)",
            rd = r.reader
        ))
        .await
        .expect_err("the reader has no INSERT policy");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{refused}"
    );
    sql.batch_execute("ROLLBACK; RESET ROLE")
        .await
        .expect("reset");
    fence(&sql, 7).await;
    let (event, ..) = next_broadcast(&mut watcher, "the fence").await;
    assert_eq!(event, "fence", "a refused insert was broadcast");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_binary_is_a_binary_kind_4_frame_for_vsn_2_and_nothing_for_vsn_1() {
    let (db, sql) = database().await;
    let server = serve(&db, "bin", &[]).await;
    let r = roles(&db, &sql).await;
    let reader_t = tok(&r.reader, "r");
    let mut v2 = join_room(&server, &reader_t, json!({})).await;
    let mut v1 = Client::open(&server.ws_url(&reader_t, "1.0.0"))
        .await
        .expect("a vsn 1.0.0 socket");
    v1.send(
        json!({"topic": "realtime:room", "event": "phx_join", "ref": "1", "join_ref": "1",
                   "payload": join_payload(&reader_t, true, json!({}))}),
    )
    .await;
    let reply = v1
        .until(WAIT, |f| f["event"] == "phx_reply")
        .await
        .expect("the vsn 1 join reply");
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");

    sql.batch_execute(&format!(
        "SET ROLE {m}; SELECT realtime.send_binary('\\x0102ff'::bytea, 'bin', 'room', true); RESET ROLE",
        m = r.member
    ))
    .await
    .expect("realtime.send_binary");
    let (event, meta, encoding, payload) = next_broadcast(&mut v2, "the binary broadcast").await;
    assert_eq!(
        (event.as_str(), encoding, payload),
        ("bin", 0, vec![1, 2, 255])
    );
    let id = meta["id"].as_str().expect("meta.id").to_owned();
    let stored: Vec<u8> = sql
        .query_one(
            "SELECT binary_payload FROM realtime.messages WHERE id = $1::text::uuid",
            &[&id],
        )
        .await
        .expect("the stored binary row")
        .get(0);
    assert_eq!(stored, vec![1, 2, 255]);
    // vsn 1.0.0 cannot carry it: the fence is the first broadcast it sees.
    fence(&sql, 3).await;
    let first = v1
        .until(WAIT, |f| f["event"] == "broadcast")
        .await
        .expect("the fence on vsn 1");
    assert_eq!(first["payload"]["payload"]["fence"], 3, "{first}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_sends_the_newest_stored_messages_since_oldest_first_before_live_ones() {
    let (db, sql) = database().await;
    let server = serve(&db, "replay", &[]).await;
    let r = roles(&db, &sql).await;
    let reader_t = tok(&r.reader, "r");
    // Six stored rows 60..10 s old, one for another topic, one public, one expired.
    let now_ms: i64 = sql
        .query_one("SELECT (extract(epoch from now()) * 1000)::int8", &[])
        .await
        .expect("now")
        .get(0);
    for (i, age) in [60, 50, 40, 30, 20, 10].iter().enumerate() {
        sql.execute(
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, private, inserted_at) \
             VALUES (gen_random_uuid(), 'room', 'broadcast', 'old', jsonb_build_object('n', $1::int8), true, \
                     now() - make_interval(secs => $2::float8))",
            &[&(i as i64), &(*age as f64)],
        )
        .await
        .expect("a stored row");
    }
    exec(
        &sql,
        &[
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, private, inserted_at) \
             VALUES (gen_random_uuid(), 'other', 'broadcast', 'old', '{\"n\":100}', true, now() - interval '15 s')".into(),
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, private, inserted_at) \
             VALUES (gen_random_uuid(), 'room', 'broadcast', 'old', '{\"n\":101}', false, now() - interval '15 s')".into(),
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, private, inserted_at, expires_at) \
             VALUES (gen_random_uuid(), 'room', 'broadcast', 'old', '{\"n\":102}', true, now() - interval '15 s', now() - interval '1 s')".into(),
        ],
    )
    .await;

    // Since 45 s ago, at most 3: rows 3, 4, 5 (40 s old is row 2, left out by the limit).
    let since = now_ms - 45_000;
    let mut c = server.connect(&reader_t).await;
    c.send(json!([
        "1",
        "1",
        "realtime:room",
        "phx_join",
        join_payload(
            &reader_t,
            true,
            json!({"replay": {"since": since, "limit": 3}})
        )
    ]))
    .await;
    let first = c
        .collect_until(WAIT, "the join reply", |f| f.json().is_some())
        .await;
    assert_eq!(first.len(), 1, "the join reply comes first: {first:?}");
    assert_eq!(first[0].json().expect("json")[4]["status"], "ok");
    let mut ids = Vec::new();
    for want in [3, 4, 5] {
        let (event, meta, _, payload) = next_broadcast(&mut c, "a replayed message").await;
        assert_eq!(
            (event.as_str(), json_of(&payload)),
            ("old", json!({"n": want}))
        );
        assert_eq!(meta["replayed"], true, "{meta}");
        ids.push(meta["id"].as_str().expect("meta.id").to_owned());
    }
    // Then live messages.
    fence(&sql, 9).await;
    let (event, meta, ..) = next_broadcast(&mut c, "the live fence").await;
    assert_eq!(event, "fence", "nothing else is replayed");
    assert!(
        meta.get("replayed").is_none(),
        "a live message is not marked: {meta}"
    );
    let stored_ids: Vec<String> = sql
        .query(
            "SELECT id::text FROM realtime.messages WHERE topic = 'room' AND private \
             AND payload->>'n' IN ('3','4','5') ORDER BY inserted_at",
            &[],
        )
        .await
        .expect("ids")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, stored_ids, "meta.id is the row's id");

    // Without a limit: Supabase's default of 25, all six here (the expired one is not).
    let mut c2 = server.connect(&reader_t).await;
    let reply = c2
        .join_with(
            "1",
            "realtime:room",
            join_payload(&reader_t, true, json!({"replay": {"since": 0}})),
        )
        .await;
    assert_eq!(reply["status"], "ok");
    for want in 0..6 {
        let (_, meta, _, payload) = next_broadcast(&mut c2, "a replayed message").await;
        assert_eq!(json_of(&payload), json!({"n": want}));
        assert_eq!(meta["replayed"], true);
    }
    fence(&sql, 10).await;
    let (event, ..) = next_broadcast(&mut c2, "the live fence").await;
    assert_eq!(event, "fence");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_is_refused_in_supabases_words() {
    let (db, sql) = database().await;
    let server = serve(&db, "errors", &[]).await;
    let r = roles(&db, &sql).await;
    let presence_only = name(&db, "ponly");
    exec(
        &sql,
        &[
            format!("CREATE ROLE {presence_only} NOLOGIN"),
            format!("CREATE POLICY p_read ON realtime.messages FOR SELECT TO {presence_only} USING (topic = 'room' AND extension = 'presence')"),
        ],
    )
    .await;
    let reader_t = tok(&r.reader, "r");
    let cases = [
        (
            reader_t.clone(),
            false,
            json!({"replay": {"since": 0}}),
            "UnableToReplayMessages: Replay is not allowed for public channels".to_owned(),
        ),
        (
            reader_t.clone(),
            true,
            json!({"replay": {"since": "yesterday"}}),
            "UnableToReplayMessages: Replay params are not valid".to_owned(),
        ),
        (
            reader_t.clone(),
            true,
            json!({"replay": {"limit": 3}}),
            "UnableToReplayMessages: Replay params are not valid".to_owned(),
        ),
        (
            tok(&presence_only, "p"),
            true,
            json!({"replay": {"since": 0}}),
            "Unauthorized: You do not have permissions to read from this Channel topic: room"
                .to_owned(),
        ),
    ];
    for (token, private, broadcast, want) in cases {
        let mut c = server.connect(&token).await;
        let mut payload = join_payload(&token, private, broadcast.clone());
        payload["config"]["presence"]["enabled"] = json!(true);
        let reply = c.join_with("1", "realtime:room", payload).await;
        assert_eq!(reply["status"], "error", "{broadcast}: {reply}");
        assert_eq!(reply["response"]["reason"], want.as_str(), "{broadcast}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persisted_websocket_sends_are_stored_or_answered_with_the_reason() {
    let (db, sql) = database().await;
    let server = serve(&db, "ws", &[]).await;
    let r = roles(&db, &sql).await;
    let (member_t, reader_t) = (tok(&r.member, "m"), tok(&r.reader, "r"));
    let mut watcher = join_room(&server, &reader_t, json!({})).await;
    let mut sender = join_room(&server, &member_t, json!({"ack": true})).await;

    let frame = kind3(
        "1",
        "2",
        "realtime:room",
        "ws",
        r#"{"persist":{"ttl":120}}"#,
        br#"{"w":1}"#,
    );
    send_binary(&mut sender, frame).await;
    assert_eq!(reply_to(&mut sender, "2").await["status"], "ok");
    let (event, meta, _, payload) = next_broadcast(&mut watcher, "the persisted push").await;
    assert_eq!((event.as_str(), json_of(&payload)), ("ws", json!({"w": 1})));
    let id = meta["id"].as_str().expect("meta.id").to_owned();
    let (payload, skip): (Value, bool) = {
        let row = sql
            .query_one(
                "SELECT payload::text, skip_broadcast FROM realtime.messages WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("the stored row");
        (json_of(row.get::<_, String>(0).as_bytes()), row.get(1))
    };
    assert_eq!((payload, skip), (json!({"w": 1}), true));
    fence(&sql, 1).await;
    let (event, ..) = next_broadcast(&mut watcher, "the fence").await;
    assert_eq!(
        event, "fence",
        "the WAL copy of a persisted push was delivered again"
    );

    // A reader may not write: the send is answered with the reason, nothing is stored.
    let mut reader = join_room(&server, &reader_t, json!({"ack": true})).await;
    let frame = kind3(
        "1",
        "3",
        "realtime:room",
        "ws",
        r#"{"persist":true}"#,
        b"{}",
    );
    send_binary(&mut reader, frame).await;
    let reply = reply_to(&mut reader, "3").await;
    assert_eq!(reply["status"], "error");
    assert_eq!(
        reply["response"]["error"],
        "Unauthorized: You do not have permissions to write to this Channel topic: room"
    );
    // On a public channel, and over vsn 1.0.0: the client's own reasons.
    let mut public = server.connect(&member_t).await;
    let reply = public
        .join_with(
            "1",
            "realtime:pub",
            join_payload(&member_t, false, json!({"ack": true})),
        )
        .await;
    assert_eq!(reply["status"], "ok");
    send_binary(
        &mut public,
        kind3("1", "4", "realtime:pub", "ws", r#"{"persist":true}"#, b"{}"),
    )
    .await;
    assert_eq!(
        reply_to(&mut public, "4").await["response"]["error"],
        "Realtime send() cannot store a message on a public channel."
    );
    let mut v1 = Client::open(&server.ws_url(&member_t, "1.0.0"))
        .await
        .expect("a vsn 1.0.0 socket");
    v1.send(
        json!({"topic": "realtime:room", "event": "phx_join", "ref": "1", "join_ref": "1",
                   "payload": join_payload(&member_t, true, json!({"ack": true}))}),
    )
    .await;
    let reply = v1
        .until(WAIT, |f| f["ref"] == "1")
        .await
        .expect("join reply");
    assert_eq!(reply["payload"]["status"], "ok", "{reply}");
    v1.send(json!({"topic": "realtime:room", "event": "broadcast", "ref": "2", "join_ref": "1",
                   "payload": {"type": "broadcast", "event": "ws", "payload": {}, "persist": true}}))
        .await;
    let reply = v1
        .until(WAIT, |f| f["ref"] == "2")
        .await
        .expect("push reply");
    assert_eq!(
        reply["payload"]["response"]["error"],
        "Realtime send() cannot store a message with protocol 1.0.0. Use httpSend() or connect with vsn 2.0.0."
    );
    let stored: i64 = sql
        .query_one(
            "SELECT count(*) FROM realtime.messages WHERE event = 'ws'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(stored, 1, "only the allowed push was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_rows_are_deleted_on_schedule() {
    let (db, sql) = database().await;
    let _server = serve(
        &db,
        "expiry",
        &[
            "--messages-retention-secs",
            "3600",
            "--messages-sweep-secs",
            "1",
        ],
    )
    .await;
    exec(
        &sql,
        &[
            // Past its own expiry; older than the retention; fresh with a future expiry; fresh.
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, expires_at) \
             VALUES ('00000000-0000-4000-8000-000000000001', 'room', 'broadcast', 'e', '{}', now() - interval '1 s')".into(),
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, inserted_at, expires_at) \
             VALUES ('00000000-0000-4000-8000-000000000002', 'room', 'broadcast', 'e', '{}', now() - interval '2 h', now() + interval '1 day')".into(),
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, expires_at) \
             VALUES ('00000000-0000-4000-8000-000000000003', 'room', 'broadcast', 'e', '{}', now() + interval '1 h')".into(),
            "INSERT INTO realtime.messages (id, topic, extension, event, payload) \
             VALUES ('00000000-0000-4000-8000-000000000004', 'room', 'broadcast', 'e', '{}')".into(),
        ],
    )
    .await;
    let deadline = Instant::now() + WAIT;
    let left = loop {
        let ids: Vec<String> = sql
            .query("SELECT id::text FROM realtime.messages ORDER BY id", &[])
            .await
            .expect("ids")
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.len() == 2 || Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        left,
        [
            "00000000-0000-4000-8000-000000000003",
            "00000000-0000-4000-8000-000000000004"
        ],
        "rows past their expiry or the retention are deleted, the others kept"
    );
}

/// A live copy of a replayed row is dropped for the channel that got it replayed. To get a
/// row replayed *and* delivered live to the same channel, its WAL copy must arrive after the
/// join: a large transaction committed just before it keeps the pump busy meanwhile. A second
/// channel that joins (without replay) after the first one's reply proves the timing: if the
/// live copy reached it, it was published after both joined. Without that proof the attempt
/// is repeated with a larger transaction (and the test fails if it never happens).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_rows_live_copy_is_not_delivered_again() {
    let (db, sql) = database().await;
    let server = serve(&db, "dedup", &[]).await;
    let r = roles(&db, &sql).await;
    let reader_t = tok(&r.reader, "r");
    exec(&sql, &["CREATE TABLE public.bulk (n int8)".into()]).await;
    for (attempt, rows) in [200_000i64, 600_000, 1_500_000].into_iter().enumerate() {
        let marker = format!("late-{attempt}");
        // The big transaction, then R (replayable: inserted a second ago, committed now).
        sql.execute(
            "INSERT INTO public.bulk SELECT g FROM generate_series(1, $1::int8) g",
            &[&rows],
        )
        .await
        .expect("the big transaction");
        sql.execute(
            "INSERT INTO realtime.messages (id, topic, extension, event, payload, private, inserted_at) \
             VALUES (gen_random_uuid(), 'room', 'broadcast', 'r', jsonb_build_object('m', $1::text), true, now() - interval '1 s')",
            &[&marker],
        )
        .await
        .expect("R");
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis() as i64
            - 30_000;
        let mut replayer = join_room(
            &server,
            &reader_t,
            json!({"replay": {"since": since, "limit": 1}}),
        )
        .await;
        let mut witness = join_room(&server, &reader_t, json!({})).await;
        fence(&sql, attempt as i64).await;
        let (_, meta, _, payload) = next_broadcast(&mut replayer, "the replayed row").await;
        assert_eq!(json_of(&payload)["m"], marker.as_str());
        assert_eq!(meta["replayed"], true);
        // The witness: R live (then the fence), or the fence alone (timing missed).
        let (event, _, _, payload) = next_broadcast(&mut witness, "R or the fence").await;
        let timing_held = event == "r" && json_of(&payload)["m"] == marker.as_str();
        let (event, ..) = next_broadcast(&mut replayer, "the fence").await;
        if timing_held {
            assert_eq!(
                event, "fence",
                "the live copy of a replayed row was delivered again"
            );
            return;
        }
        assert_eq!(event, "fence");
        sql.execute("TRUNCATE public.bulk", &[])
            .await
            .expect("truncate");
    }
    panic!("R's WAL copy never arrived after the joins: the dedup was not exercised");
}
