//! The session without a socket or a database: frames in, frames and work out, outcomes fed
//! back by hand, the clock passed in.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use walcast_core::broadcast::TopicKey;
use walcast_core::hub::{Hub, HubConfig, OutFrame};
use walcast_protocol::{decode_text, Vsn};

use super::*;
use crate::auth::JwtVerifier;
use crate::authz::private::ChannelPerms;
use crate::authz::roles::TokenRoles;
use crate::db::sql::SqlPool;
use crate::realtime::broadcast::BroadcastLimits;
use crate::realtime::outbox::{self, OutboxReader};
use crate::state::{AppState, Limits};

const SECRET: &str = "session-test-secret-session-test-secret";

fn limits() -> Limits {
    Limits {
        max_channels_per_client: 3,
        socket_send_queue: 1024,
        socket_send_queue_bytes: 1 << 20,
        write_timeout: Duration::from_secs(30),
        max_frame_bytes: 1 << 20,
        idle_timeout: Duration::from_secs(60),
        channel_error_backoff: Duration::ZERO,
        connect_error_backoff: Duration::ZERO,
        broadcast: BroadcastLimits::default(),
        max_connections: 100,
        max_joins_per_second: 1000,
        max_joins_per_second_per_client: 5,
        max_joins_per_second_per_socket: 5,
        max_http_broadcasts_per_second: 1000,
        max_http_broadcasts_per_second_per_client: 100,
        max_members_per_channel: 0,
        max_events_per_second: 100,
        allowed_origins: None,
        resume: crate::realtime::resume::SessionLimits::default(),
        private_only: false,
        presence_enabled: false,
        rls_deletes: Default::default(),
        postgres_changes_wait_max: Duration::from_secs(20),
        replication_ready_timeout: Duration::from_secs(60),
    }
}

fn app(limits: Limits) -> Arc<AppState> {
    // The pools connect lazily: nothing here ever reaches a database.
    let cfg =
        walcast_replication::ReplicationConfig::from_url("postgres://nobody@127.0.0.1:1/none")
            .expect("url");
    Arc::new(AppState::new(
        JwtVerifier::new(Some(SECRET), None).expect("secret"),
        Arc::new(Hub::new(HubConfig::default())),
        Arc::new(SqlPool::new(cfg, 1)),
        "walcast".into(),
        limits,
        Arc::new(RwLock::new(Default::default())),
        Arc::new(AtomicBool::new(true)),
        TokenRoles::default(),
    ))
}

fn token(claims: Value) -> String {
    let mut c = claims;
    if c.get("exp").is_none() {
        c["exp"] = json!(crate::state::now_unix() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("token")
}

fn anon() -> String {
    token(json!({"role": "anon", "sub": "u1"}))
}

struct T {
    session: Session,
    reader: OutboxReader,
    now: Now,
}

impl T {
    fn new(state: Arc<AppState>) -> T {
        T::with_client(state, "sub:u1")
    }

    fn with_client(state: Arc<AppState>, client: &str) -> T {
        T::socket(state, client, None)
    }

    fn socket(state: Arc<AppState>, client: &str, session_id: Option<&str>) -> T {
        let now = Now::system();
        let (outbox, reader) = outbox::bounded(1024, 1 << 20);
        let session = Session::new(
            state,
            Vsn::V2,
            Arc::from(anon()),
            Arc::from(client),
            outbox,
            session_id.map(Arc::from),
            now,
        );
        T {
            session,
            reader,
            now,
        }
    }

    fn send(&mut self, frame: Value) {
        let f = decode_text(Vsn::V2, &frame.to_string()).expect("test frames decode");
        self.session.on_frame(self.now, f);
    }

    fn join(&mut self, jr: &str, topic: &str, config: Value) {
        self.send(json!([jr, jr, topic, "phx_join", {"config": config}]));
    }

    fn out(&mut self) -> Vec<Value> {
        let mut v = Vec::new();
        while let Some(f) = self.reader.pop() {
            let OutFrame::Text(b) = f else { continue };
            v.push(serde_json::from_slice(&b).expect("frames are json"));
        }
        v
    }

    fn work(&mut self) -> Vec<Work> {
        self.session.take_work()
    }

    fn done(&mut self, op: u64, outcome: Outcome) {
        self.session.on_done(self.now, op, outcome);
    }

    fn ok(&mut self, op: u64) {
        self.done(op, Outcome::Authorize(Ok(Authorized::default())));
    }

    fn later(&mut self, d: Duration) {
        self.now = Now {
            at: self.now.at + d,
            unix: self.now.unix + d.as_secs() as i64,
        };
    }
}

fn events(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| {
            format!(
                "{}:{}",
                f[2].as_str().unwrap_or(""),
                f[3].as_str().unwrap_or("")
            )
        })
        .collect()
}

fn reply_status(f: &Value) -> &str {
    f[4]["status"].as_str().unwrap_or("")
}

#[test]
fn a_join_is_answered_after_its_check_and_heartbeats_are_not_held() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:room", json!({}));
    let work = t.work();
    assert_eq!(work.len(), 1);
    assert!(matches!(&work[0].kind, WorkKind::Authorize(r) if &*r.name == "room" && !r.private));
    assert!(t.out().is_empty(), "no reply before the check");
    // The check is pending: a heartbeat is answered at once.
    t.send(json!([null, "2", "phoenix", "heartbeat", {}]));
    let out = t.out();
    assert_eq!(events(&out), ["phoenix:phx_reply"]);
    assert_eq!(out[0][1], "2");
    t.ok(work[0].op);
    let out = t.out();
    assert_eq!(events(&out), ["realtime:room:phx_reply"]);
    assert_eq!(reply_status(&out[0]), "ok");
    assert_eq!(out[0][0], "1");
    assert_eq!(t.session.channel_count(), 1);
}

#[test]
fn frames_for_a_pending_topic_wait_for_its_join_and_keep_their_order() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:a", json!({}));
    t.send(json!(["1", "3", "realtime:a", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]));
    t.send(json!(["1", "4", "realtime:a", "phx_leave", {}]));
    // Another topic is not held back by it.
    t.join("5", "realtime:b", json!({}));
    let work = t.work();
    assert_eq!(work.len(), 2);
    t.ok(work[1].op);
    assert_eq!(events(&t.out()), ["realtime:b:phx_reply"]);
    t.ok(work[0].op);
    let out = t.out();
    // Join reply, then the leave's reply and close; the broadcast (no ack) has no reply.
    assert_eq!(
        events(&out),
        [
            "realtime:a:phx_reply",
            "realtime:a:phx_reply",
            "realtime:a:phx_close"
        ]
    );
    assert_eq!(out[0][1], "1");
    assert_eq!(out[1][1], "4");
    assert_eq!(t.session.channel_count(), 1);
}

#[test]
fn a_second_join_closes_the_first_channel_with_its_own_join_ref() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:room", json!({}));
    let op = t.work()[0].op;
    t.ok(op);
    t.out();
    t.join("7", "realtime:room", json!({}));
    let out = t.out();
    assert_eq!(events(&out), ["realtime:room:phx_close"]);
    assert_eq!(
        (out[0][0].as_str(), out[0][1].as_str()),
        (Some("1"), Some("1"))
    );
    let op = t.work()[0].op;
    t.ok(op);
    let out = t.out();
    assert_eq!(out[0][0], "7");
    assert_eq!(t.session.channel_count(), 1);
}

#[test]
fn refused_joins_get_their_reason() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:", json!({}));
    let expired = token(json!({"role": "anon", "exp": crate::state::now_unix() - 30}));
    t.send(json!(["2", "2", "realtime:x", "phx_join", {"config": {}, "access_token": expired}]));
    let long = format!("realtime:{}", "x".repeat(300));
    t.join("3", &long, json!({}));
    let many: Vec<Value> = (0..101)
        .map(|i| json!({"event": "*", "schema": "public", "table": format!("t{i}")}))
        .collect();
    t.join("4", "realtime:many", json!({"postgres_changes": many}));
    let reasons: Vec<String> = t
        .out()
        .iter()
        .map(|f| f[4]["response"]["reason"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        reasons[0],
        "TopicNameRequired: You must provide a topic name"
    );
    assert!(
        reasons[1].starts_with("InvalidJWTToken: Token has expired"),
        "{}",
        reasons[1]
    );
    assert_eq!(
        reasons[2],
        "TopicNameTooLong: Topic name must be at most 255 bytes"
    );
    assert_eq!(
        reasons[3],
        "TooManyBindings: A channel may have at most 100 postgres_changes bindings"
    );
    assert!(t.work().is_empty());
    // A refusal from the check itself.
    t.join("5", "realtime:private", json!({"private": true}));
    let op = t.work()[0].op;
    t.done(
        op,
        Outcome::Authorize(Err(Refusal::new("unauthorized", "Unauthorized: nope"))),
    );
    assert_eq!(t.out()[0][4]["response"]["reason"], "Unauthorized: nope");
    assert_eq!(t.session.channel_count(), 0);
}

#[test]
fn join_errors_wait_out_the_backoff_and_hold_their_topic() {
    let mut l = limits();
    l.channel_error_backoff = Duration::from_millis(500);
    let mut t = T::new(app(l));
    t.join("1", "realtime:", json!({}));
    t.send(json!(["1", "2", "realtime:", "phx_leave", {}]));
    assert!(t.out().is_empty(), "held for the backoff");
    let deadline = t.session.next_deadline(t.now);
    assert!(deadline <= t.now.at + Duration::from_millis(500));
    t.later(Duration::from_millis(500));
    t.session.on_tick(t.now);
    let out = t.out();
    assert_eq!(reply_status(&out[0]), "error");
    assert_eq!(out[0][1], "1");
    assert_eq!(out[1][1], "2", "the leave waited behind the join's reply");
}

#[test]
fn the_channel_limit_counts_pending_joins() {
    let mut t = T::new(app(limits()));
    for i in 0..4 {
        t.join(&i.to_string(), &format!("realtime:c{i}"), json!({}));
    }
    assert_eq!(t.work().len(), 3);
    let out = t.out();
    assert_eq!(
        out[0][4]["response"]["reason"],
        "ChannelRateLimitReached: Too many channels"
    );
}

#[test]
fn a_socket_over_its_join_rate_is_closed_and_others_are_not_charged() {
    let state = app(limits());
    let mut greedy = T::with_client(state.clone(), "ip:10.0.0.9");
    for i in 0..5 {
        greedy.join(&i.to_string(), &format!("realtime:g{i}"), json!({}));
        greedy.send(json!([
            i.to_string(),
            "l",
            format!("realtime:g{i}"),
            "phx_leave",
            {}
        ]));
    }
    assert_eq!(greedy.session.exit(), None);
    greedy.join("9", "realtime:g9", json!({}));
    let out = greedy.out();
    assert_eq!(
        out.last().unwrap()[4]["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    assert_eq!(
        greedy.session.exit(),
        Some(Exit::Close(1008, "too many joins per second"))
    );
    // Another client's join is unaffected.
    let mut other = T::with_client(state, "sub:alice");
    other.join("1", "realtime:room", json!({}));
    assert_eq!(other.work().len(), 1);
    assert_eq!(other.session.exit(), None);
}

#[test]
fn the_server_wide_join_ceiling_refuses_without_closing() {
    let mut l = limits();
    l.max_joins_per_second = 2;
    let state = app(l);
    let mut a = T::with_client(state.clone(), "sub:a");
    let mut b = T::with_client(state, "sub:b");
    a.join("1", "realtime:x", json!({}));
    a.join("2", "realtime:y", json!({}));
    b.join("1", "realtime:x", json!({}));
    let out = b.out();
    assert_eq!(
        out[0][4]["response"]["reason"],
        "ClientJoinRateLimitReached: Too many joins per second"
    );
    assert_eq!(b.session.exit(), None);
}

#[test]
fn an_expired_token_closes_its_channel() {
    let mut t = T::new(app(limits()));
    let short = token(json!({"role": "anon", "exp": crate::state::now_unix() + 5}));
    t.send(json!(["1", "1", "realtime:room", "phx_join", {"config": {}, "access_token": short}]));
    let op = t.work()[0].op;
    t.ok(op);
    t.out();
    assert!(t.session.next_deadline(t.now) <= t.now.at + Duration::from_secs(5));
    t.later(Duration::from_secs(7));
    // The socket is not idle (a heartbeat), but the token ran out.
    t.send(json!([null, "h", "phoenix", "heartbeat", {}]));
    t.session.on_tick(t.now);
    let out = t.out();
    assert_eq!(
        events(&out),
        [
            "phoenix:phx_reply",
            "realtime:room:system",
            "realtime:room:phx_close"
        ]
    );
    assert_eq!(out[1][4]["message"], "Token has expired 2 seconds ago");
    assert_eq!(t.session.channel_count(), 0);
}

#[test]
fn an_idle_socket_is_closed() {
    let mut t = T::new(app(limits()));
    t.later(Duration::from_secs(61));
    t.session.on_tick(t.now);
    assert_eq!(t.session.exit(), Some(Exit::Close(1000, "idle timeout")));
}

fn private_join(t: &mut T, perms: ChannelPerms) {
    t.join(
        "1",
        "realtime:room",
        json!({"private": true, "presence": {"enabled": true}}),
    );
    let op = t.work()[0].op;
    t.done(
        op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(perms),
            changes: Default::default(),
            replayed: Vec::new(),
        })),
    );
}

#[test]
fn private_only_refuses_public_channels_in_supabases_words() {
    let mut l = limits();
    l.private_only = true;
    let state = app(l);
    let mut t = T::new(state);
    t.join("1", "realtime:lobby", json!({}));
    assert!(t.work().is_empty(), "refused before any check");
    let out = t.out();
    assert_eq!(out[0][3], "phx_reply");
    assert_eq!(out[0][4]["status"], "error");
    assert_eq!(
        out[0][4]["response"]["reason"],
        "PrivateOnly: This project only allows private channels"
    );
    // A private join goes on to its check.
    t.join("2", "realtime:vault", json!({"private": true}));
    assert_eq!(t.work().len(), 1);
}

#[test]
fn presence_enabled_server_wide_syncs_presence_without_the_client_asking() {
    let mut l = limits();
    l.presence_enabled = true;
    let state = app(l);
    let mut t = T::new(state);
    t.join("1", "realtime:room", json!({}));
    let work = t.work();
    t.ok(work[0].op);
    assert_eq!(
        events(&t.out()),
        ["realtime:room:phx_reply", "realtime:room:presence_state"]
    );
}

#[test]
fn a_new_token_reauthorizes_and_a_lost_read_closes_the_channel() {
    let state = app(limits());
    let mut t = T::new(state.clone());
    private_join(
        &mut t,
        ChannelPerms {
            broadcast_read: true,
            presence_read: Some(true),
            ..Default::default()
        },
    );
    let out = t.out();
    assert_eq!(
        events(&out),
        ["realtime:room:phx_reply", "realtime:room:presence_state"]
    );
    // A refreshed token for the same user keeps everything it may still read.
    let refreshed = token(json!({"role": "anon", "sub": "u1", "iat": 1}));
    t.send(json!(["1", "2", "realtime:room", "access_token", {"access_token": refreshed}]));
    let work = t.work();
    let WorkKind::Authorize(req) = &work[0].kind else {
        panic!("authorize expected")
    };
    assert!(
        req.private && req.presence,
        "presence read is evaluated again"
    );
    t.done(
        work[0].op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(ChannelPerms {
                broadcast_read: true,
                presence_read: Some(true),
                ..Default::default()
            }),
            changes: Default::default(),
            replayed: Vec::new(),
        })),
    );
    assert!(t.out().is_empty(), "no reply to access_token");
    assert_eq!(t.session.channel_count(), 1);
    // Another user's token without presence read: the channel closes.
    let other = token(json!({"role": "anon", "sub": "u2"}));
    t.send(json!(["1", "3", "realtime:room", "access_token", {"access_token": other}]));
    let op = t.work()[0].op;
    t.done(
        op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(ChannelPerms {
                broadcast_read: true,
                presence_read: Some(false),
                ..Default::default()
            }),
            changes: Default::default(),
            replayed: Vec::new(),
        })),
    );
    let out = t.out();
    assert_eq!(
        events(&out),
        ["realtime:room:system", "realtime:room:phx_close"]
    );
    assert_eq!(
        out[0][4]["message"],
        "You no longer have permission to read from this Channel topic: room"
    );
    assert_eq!(state.topics.member_count(&TopicKey::new("room", true)), 0);
}

#[test]
fn a_member_without_presence_read_gets_no_presence() {
    let state = app(limits());
    let mut reader = T::with_client(state.clone(), "sub:r");
    private_join(
        &mut reader,
        ChannelPerms {
            broadcast_read: true,
            presence_read: Some(false),
            ..Default::default()
        },
    );
    assert_eq!(
        events(&reader.out()),
        ["realtime:room:phx_reply"],
        "no presence_state"
    );
    let mut tracker = T::with_client(state, "sub:t");
    private_join(
        &mut tracker,
        ChannelPerms {
            broadcast_read: true,
            presence_read: Some(true),
            broadcast_write: Some(true),
            presence_write: Some(true),
        },
    );
    tracker.send(json!(["1", "5", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"secret": 1}}]));
    tracker.send(json!(["1", "6", "realtime:room", "broadcast", {"type": "broadcast", "event": "fence", "payload": {}}]));
    assert_eq!(
        events(&reader.out()),
        ["realtime:room:broadcast"],
        "the fence, no diff"
    );
}

#[test]
fn a_first_write_on_a_private_channel_waits_for_its_check() {
    let state = app(limits());
    let mut t = T::new(state);
    private_join(
        &mut t,
        ChannelPerms {
            broadcast_read: true,
            presence_read: Some(true),
            ..Default::default()
        },
    );
    t.out();
    t.send(json!(["1", "5", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"a": 1}}]));
    let work = t.work();
    assert!(matches!(
        &work[0].kind,
        WorkKind::Write {
            ext: Extension::Presence,
            presence_read: false,
            ..
        }
    ));
    t.send(
        json!(["1", "6", "realtime:room", "presence", {"type": "presence", "event": "untrack"}]),
    );
    assert!(t.out().is_empty(), "held behind the check");
    t.done(
        work[0].op,
        Outcome::Write {
            allowed: false,
            presence_read: None,
        },
    );
    let out = t.out();
    assert_eq!(out[0][1], "5");
    assert_eq!(reply_status(&out[0]), "error");
    assert_eq!(out[1][1], "6");
    assert_eq!(reply_status(&out[1]), "ok");
    // The answer is cached: no second check.
    t.send(json!(["1", "7", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": {"a": 1}}]));
    assert!(t.work().is_empty());
}

#[test]
fn the_member_cap_refuses_newcomers() {
    let mut l = limits();
    l.max_members_per_channel = 1;
    let state = app(l);
    let mut a = T::with_client(state.clone(), "sub:a");
    let mut b = T::with_client(state, "sub:b");
    a.join("1", "realtime:room", json!({}));
    let op = a.work()[0].op;
    a.ok(op);
    b.join("1", "realtime:room", json!({}));
    let op = b.work()[0].op;
    b.ok(op);
    assert_eq!(
        b.out()[0][4]["response"]["reason"],
        "ChannelMemberLimitReached: Too many members in this channel"
    );
    assert_eq!(reply_status(&a.out()[0]), "ok");
}

#[test]
fn presence_sizes_are_bounded() {
    let mut l = limits();
    l.broadcast.max_presence_payload_bytes = 100;
    l.broadcast.max_presence_state_bytes = 200;
    let state = app(l);
    let mut a = T::with_client(state.clone(), "sub:a");
    let mut b = T::with_client(state, "sub:b");
    for t in [&mut a, &mut b] {
        t.join("1", "realtime:room", json!({}));
        let op = t.work()[0].op;
        t.ok(op);
        t.out();
    }
    let payload = json!({"x": "y".repeat(60)});
    a.send(json!(["1", "2", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": payload}]));
    assert_eq!(reply_status(a.out().last().unwrap()), "ok");
    b.send(json!(["1", "2", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": payload}]));
    let out = b.out();
    let last = out.last().unwrap();
    assert_eq!(
        last[4]["response"]["reason"],
        "PresenceStateTooLarge: This channel's presence state is full"
    );
    let big = json!({"x": "y".repeat(200)});
    b.send(json!(["1", "3", "realtime:room", "presence", {"type": "presence", "event": "track", "payload": big}]));
    let out = b.out();
    assert_eq!(
        events(&out),
        ["realtime:room:system", "realtime:room:phx_close"]
    );
    assert_eq!(out[0][4]["message"], "Track message size exceeded");
}

#[test]
fn frames_flooding_a_pending_topic_close_the_socket() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:room", json!({}));
    for i in 0..300 {
        t.send(json!(["1", i.to_string(), "realtime:room", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]));
    }
    assert_eq!(
        t.session.exit(),
        Some(Exit::Close(1008, "too many messages for a pending channel"))
    );
}

#[test]
fn leaving_everything_frees_the_topics() {
    let state = app(limits());
    let mut t = T::new(state.clone());
    t.join("1", "realtime:room", json!({"presence": {"enabled": true}}));
    let op = t.work()[0].op;
    t.ok(op);
    let key = TopicKey::new("room", false);
    assert_eq!(state.topics.member_count(&key), 1);
    drop(t);
    assert_eq!(state.topics.member_count(&key), 0);
    // A join still pending when the socket ends leaves nothing behind either.
    let mut t = T::new(state.clone());
    t.join("1", "realtime:room", json!({}));
    let op = t.work()[0].op;
    t.session.leave_all(Now::system());
    t.ok(op);
    assert_eq!(state.topics.member_count(&key), 0);
    let _ = Instant::now();
}

// ---------------------------------------------------------------------------------------
// Session resume

mod resume {
    use super::*;
    use crate::realtime::changes::Checked;
    use walcast_core::change::{Change, ChangeKind, Column, Table, Value as Cell};
    use walcast_core::hub::DispatchScratch;
    use walcast_core::subscription::{Binding, EventFilter};
    use walcast_pgoutput::{Lsn, ReplicaIdentity};

    const ENTRY: &str = r#"{"event":"*","schema":"public","table":"todos"}"#;

    fn todos() -> Arc<Table> {
        Arc::new(Table {
            relation_id: 1,
            schema: "public".into(),
            name: "todos".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "id".into(),
                type_name: "int8".into(),
                type_oid: 20,
                is_key: true,
            }]
            .into(),
        })
    }

    /// Row `id`, committed at LSN `id` (each test row commits after the previous one).
    fn row(id: u64) -> Change {
        Change {
            table: todos(),
            kind: ChangeKind::Insert,
            commit_lsn: Lsn(1_000 + id),
            index_in_txn: 0,
            xid: id as u32,
            commit_time_us: 1_763_511_760_000_000,
            record: Some(vec![Cell::Present {
                text: id.to_string().into(),
                json: id.to_string().into(),
            }]),
            old_record: None,
        }
    }

    fn commit(state: &AppState, id: u64) {
        state
            .hub
            .dispatch(&row(id), &mut DispatchScratch::default());
    }

    fn socket(state: &Arc<AppState>, sid: &str, token: String) -> T {
        let mut t = T::socket(state.clone(), "sub:u1", Some(sid));
        t.session.conn_token = Arc::from(token);
        t
    }

    /// Join `realtime:room` with one postgres_changes entry and let its check pass.
    fn join(t: &mut T, jr: &str) {
        let entry: Value = serde_json::from_str(ENTRY).expect("entry");
        t.join(jr, "realtime:room", json!({"postgres_changes": [entry]}));
        let work = t.work();
        assert_eq!(work.len(), 1, "one check for the join");
        let bindings = vec![Binding {
            id: 1,
            event: EventFilter::All,
            schema: "public".into(),
            table: "todos".into(),
            filter: None,
            select: None,
        }];
        t.done(
            work[0].op,
            Outcome::Authorize(Ok(Authorized {
                perms: None,
                changes: Checked {
                    bindings,
                    ..Checked::default()
                },
                replayed: Vec::new(),
            })),
        );
    }

    fn heartbeat(t: &mut T) {
        t.send(json!([null, "hb", "phoenix", "heartbeat", {}]));
    }

    /// The ids of the rows delivered, and the system messages, in order.
    fn seen(frames: &[Value]) -> Vec<String> {
        frames
            .iter()
            .filter_map(|f| match f[3].as_str() {
                Some("postgres_changes") => Some(format!("row {}", f[4]["data"]["record"]["id"])),
                Some("system") => Some(format!(
                    "system {}",
                    f[4]["message"]
                        .as_str()
                        .unwrap_or("")
                        .split(':')
                        .next()
                        .unwrap_or("")
                )),
                Some("phx_reply") if f[2] == "realtime:room" => Some("reply".into()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_rejoin_gets_what_came_since_the_last_frame_and_while_away_then_live() {
        let state = app(limits());
        let mut a = socket(&state, "session-0001", anon());
        join(&mut a, "1");
        commit(&state, 1);
        heartbeat(&mut a);
        commit(&state, 2);
        assert_eq!(
            seen(&a.out()),
            ["reply", "system Subscribed to PostgreSQL", "row 1", "row 2"]
        );
        // The socket dies without leaving; rows commit meanwhile.
        drop(a);
        assert_eq!(state.sessions.parked(), 1);
        commit(&state, 3);
        commit(&state, 4);
        let mut b = socket(&state, "session-0001", anon());
        join(&mut b, "7");
        commit(&state, 5);
        // Row 2 came after the last heartbeat: it may repeat. Row 1 may not.
        assert_eq!(
            seen(&b.out()),
            [
                "reply",
                "system Subscribed to PostgreSQL",
                "row 2",
                "row 3",
                "row 4",
                "row 5"
            ]
        );
        assert_eq!(state.sessions.parked(), 0);
        assert_eq!(
            state.hub.channel_count(),
            1,
            "one subscriber for the session channel"
        );
    }

    #[test]
    fn another_identity_with_the_same_id_starts_afresh_and_leaves_the_owner_its_buffer() {
        let state = app(limits());
        let mut a = socket(&state, "shared-id-1", anon());
        join(&mut a, "1");
        heartbeat(&mut a);
        a.out();
        drop(a);
        commit(&state, 1);
        let other = token(json!({"role": "anon", "sub": "u2"}));
        let mut m = socket(&state, "shared-id-1", other);
        join(&mut m, "1");
        commit(&state, 2);
        assert_eq!(
            seen(&m.out()),
            ["reply", "system Subscribed to PostgreSQL", "row 2"],
            "nothing of u1's buffer, and no resync notice: it is a new session"
        );
        let mut b = socket(&state, "shared-id-1", anon());
        join(&mut b, "1");
        assert_eq!(
            seen(&b.out()),
            ["reply", "system Subscribed to PostgreSQL", "row 1", "row 2"]
        );
    }

    #[test]
    fn a_rejoin_after_the_window_or_an_overflow_is_told_to_resync() {
        let mut l = limits();
        l.resume.session_bytes = 2_000;
        let state = app(l);
        // Overflow: more matched while away than the session may buffer.
        let mut a = socket(&state, "session-over", anon());
        join(&mut a, "1");
        heartbeat(&mut a);
        a.out();
        drop(a);
        for id in 1..=40 {
            commit(&state, id);
        }
        let mut b = socket(&state, "session-over", anon());
        join(&mut b, "1");
        commit(&state, 41);
        assert_eq!(
            seen(&b.out()),
            [
                "reply",
                "system ResyncRequired",
                "system Subscribed to PostgreSQL",
                "row 41"
            ]
        );
        // Expiry: the sweep drops it at the end of the window; the rejoin is told so.
        heartbeat(&mut b);
        b.out();
        drop(b);
        let later = Instant::now() + state.limits.resume.window + Duration::from_secs(1);
        let expired = state.sessions.sweep(later, crate::state::now_unix());
        assert_eq!(expired.len(), 1);
        let mut c = socket(&state, "session-over", anon());
        join(&mut c, "1");
        let out = c.out();
        assert_eq!(
            seen(&out),
            [
                "reply",
                "system ResyncRequired",
                "system Subscribed to PostgreSQL"
            ]
        );
        assert!(out[1][4]["message"]
            .as_str()
            .is_some_and(|m| m.contains("resume window")));
    }

    #[test]
    fn a_parked_channel_whose_token_expires_keeps_nothing_more() {
        let state = app(limits());
        let exp = crate::state::now_unix() + 60;
        let mut a = socket(
            &state,
            "session-exp",
            token(json!({"role": "anon", "sub": "u1", "exp": exp})),
        );
        join(&mut a, "1");
        heartbeat(&mut a);
        a.out();
        drop(a);
        commit(&state, 1);
        // Within the window, but past the token's exp: dropped, and the rejoin is told why.
        assert!(state.sessions.sweep(Instant::now(), exp - 1).is_empty());
        let gone = state.sessions.sweep(Instant::now(), exp);
        assert_eq!(gone.len(), 1);
        let mut b = socket(&state, "session-exp", anon());
        join(&mut b, "1");
        let out = b.out();
        assert_eq!(
            seen(&out),
            [
                "reply",
                "system ResyncRequired",
                "system Subscribed to PostgreSQL"
            ],
            "row 1 was buffered on an expired token's authority: never replayed"
        );
        assert!(out[1][4]["message"]
            .as_str()
            .is_some_and(|m| m.contains("token")));
    }

    #[test]
    fn a_rejoin_with_other_bindings_resyncs() {
        let state = app(limits());
        let mut a = socket(&state, "session-bind", anon());
        join(&mut a, "1");
        drop(a);
        commit(&state, 1);
        let mut b = socket(&state, "session-bind", anon());
        b.join("1", "realtime:room", json!({}));
        let work = b.work();
        b.ok(work[0].op);
        assert_eq!(seen(&b.out()), ["reply", "system ResyncRequired"]);
        assert_eq!(state.hub.channel_count(), 0, "the old subscriber is gone");
    }

    #[test]
    fn a_rejoin_takes_over_a_channel_whose_old_socket_is_not_closed_yet() {
        let state = app(limits());
        let mut a = socket(&state, "session-take", anon());
        join(&mut a, "1");
        heartbeat(&mut a);
        a.out();
        commit(&state, 1);
        // The client gave up on `a` (say, a cut network) and reconnected.
        let mut b = socket(&state, "session-take", anon());
        join(&mut b, "1");
        commit(&state, 2);
        assert_eq!(
            seen(&b.out()),
            ["reply", "system Subscribed to PostgreSQL", "row 1", "row 2"]
        );
        assert_eq!(
            seen(&a.out()),
            ["row 1"],
            "the old socket got row 1 before the takeover"
        );
        // The old socket's end neither parks nor removes what `b` owns now.
        drop(a);
        assert_eq!(state.sessions.parked(), 0);
        commit(&state, 3);
        assert_eq!(seen(&b.out()), ["row 3"]);
        // Leaving is for good: nothing is kept.
        b.send(json!(["1", "9", "realtime:room", "phx_leave", {}]));
        drop(b);
        assert_eq!(state.sessions.parked(), 0);
        assert_eq!(state.hub.channel_count(), 0);
    }
}

// -------------------------------------------------------------------------------------------
// Stored broadcasts: replay at join, persisted sends

#[test]
fn replay_on_a_public_channel_is_refused_in_supabases_words() {
    let mut t = T::new(app(limits()));
    t.join(
        "1",
        "realtime:room",
        json!({"broadcast": {"replay": {"since": 0}}}),
    );
    assert!(t.work().is_empty(), "refused before any database work");
    let out = t.out();
    assert_eq!(reply_status(&out[0]), "error");
    assert_eq!(
        out[0][4]["response"]["reason"],
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );
}

#[test]
fn replayed_messages_follow_the_join_reply_and_their_live_copies_are_dropped() {
    let state = app(limits());
    let mut t = T::new(state.clone());
    t.join(
        "1",
        "realtime:room",
        json!({"private": true, "broadcast": {"replay": {"since": 1000, "limit": 2}}}),
    );
    let work = t.work();
    let WorkKind::Authorize(req) = &work[0].kind else {
        panic!("an authorize work item")
    };
    assert_eq!(
        req.replay.map(|r| (r.since, r.limit)),
        Some((Some(1000), Some(2)))
    );
    let stored = |id: &str, payload: &'static str| StoredMessage {
        id: id.into(),
        event: "ev".into(),
        encoding: PayloadEncoding::Json,
        payload: Bytes::from_static(payload.as_bytes()),
    };
    t.done(
        work[0].op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(ChannelPerms {
                broadcast_read: true,
                ..Default::default()
            }),
            changes: Default::default(),
            replayed: vec![stored("m1", r#"{"n":1}"#), stored("m2", r#"{"n":2}"#)],
        })),
    );
    let mut frames = Vec::new();
    while let Some(f) = t.reader.pop() {
        frames.push(f);
    }
    assert_eq!(frames.len(), 3, "reply, then the two replayed messages");
    let OutFrame::Text(reply) = &frames[0] else {
        panic!("the join reply comes first")
    };
    let reply: Value = serde_json::from_slice(reply).expect("json");
    assert_eq!(reply_status(&reply), "ok");
    for (f, (id, n)) in frames[1..].iter().zip([("m1", 1), ("m2", 2)]) {
        let OutFrame::Binary(b) = f else {
            panic!("kind 4 to a vsn 2.0.0 socket")
        };
        assert_eq!(b[0], 4);
        let text = String::from_utf8_lossy(b);
        let meta = format!(r#"{{"replayed":true,"id":"{id}"}}"#);
        assert!(text.contains(&meta), "{text}");
        assert!(text.ends_with(&format!(r#"{{"n":{n}}}"#)), "{text}");
    }
    // The WAL copy of a replayed row is not delivered again; another row is.
    let key = TopicKey::new("room", true);
    let body = stored("m1", "{}").replay_body();
    let st = state
        .topics
        .publish_at(&key, &body, Some("m1"), Default::default(), 0);
    assert_eq!((st.delivered, st.skipped), (0, 1));
    let st = state
        .topics
        .publish_at(&key, &body, Some("m3"), Default::default(), 0);
    assert_eq!(st.delivered, 1);
}

#[test]
fn persisting_sends_that_cannot_be_stored_are_answered_with_the_reason() {
    let mut t = T::new(app(limits()));
    t.join("1", "realtime:pub", json!({"broadcast": {"ack": true}}));
    let op = t.work()[0].op;
    t.ok(op);
    t.out();
    t.send(json!(["1", "2", "realtime:pub", "broadcast",
        {"type": "broadcast", "event": "e", "payload": {}, "persist": true}]));
    let out = t.out();
    assert_eq!(reply_status(&out[0]), "error");
    assert_eq!(
        out[0][4]["response"]["error"],
        "Realtime send() cannot store a message on a public channel."
    );
    // A private channel whose token may not write.
    t.join(
        "3",
        "realtime:room",
        json!({"private": true, "broadcast": {"ack": true}}),
    );
    let op = t.work()[0].op;
    t.done(
        op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(ChannelPerms {
                broadcast_read: true,
                broadcast_write: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })),
    );
    t.out();
    t.send(json!(["3", "4", "realtime:room", "broadcast",
        {"type": "broadcast", "event": "e", "payload": {}, "persist": {"ttl": 60}}]));
    let out = t.out();
    assert_eq!(
        out[0][4]["response"]["error"],
        "Unauthorized: You do not have permissions to write to this Channel topic: room"
    );
}

#[test]
fn a_persisted_send_is_stored_as_its_sender_before_it_is_delivered() {
    let state = app(limits());
    let mut t = T::new(state);
    t.join(
        "1",
        "realtime:room",
        json!({"private": true, "broadcast": {"ack": true, "self": true}}),
    );
    let op = t.work()[0].op;
    t.done(
        op,
        Outcome::Authorize(Ok(Authorized {
            perms: Some(ChannelPerms {
                broadcast_read: true,
                broadcast_write: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        })),
    );
    t.out();
    t.send(json!(["1", "2", "realtime:room", "broadcast",
        {"type": "broadcast", "event": "e", "payload": {"a": 1}, "persist": {"ttl": 30}}]));
    assert!(t.out().is_empty(), "nothing before the row is stored");
    let work = t.work();
    let WorkKind::Store {
        name,
        event,
        payload,
        ttl_secs,
        ..
    } = &work[0].kind
    else {
        panic!("a store work item")
    };
    assert_eq!(
        (&**name, event.as_str(), &payload[..], *ttl_secs),
        ("room", "e", &br#"{"a":1}"#[..], Some(30))
    );
    // A frame for the topic meanwhile waits behind the store.
    t.send(json!(["1", "3", "realtime:room", "broadcast",
        {"type": "broadcast", "event": "after", "payload": {}}]));
    assert!(t.out().is_empty());
    t.done(work[0].op, Outcome::Stored(Ok("id-1".into())));
    let out = t.out();
    let seen: Vec<String> = out
        .iter()
        .map(|f| match f[3].as_str() {
            Some("broadcast") => format!("broadcast:{}", f[4]["event"]),
            Some(e) => format!("{e}:{}", f[1]),
            None => String::new(),
        })
        .collect();
    assert_eq!(
        seen,
        [
            "broadcast:\"e\"",
            "phx_reply:\"2\"",
            "broadcast:\"after\"",
            "phx_reply:\"3\""
        ]
    );
    // A row the policies refused is neither delivered nor acknowledged as sent.
    t.send(json!(["1", "4", "realtime:room", "broadcast",
        {"type": "broadcast", "event": "e", "payload": {}, "persist": true}]));
    let op = t.work()[0].op;
    t.done(op, Outcome::Stored(Err(StoreRefused::Denied)));
    let out = t.out();
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0][4]["response"]["error"],
        "Unauthorized: You do not have permissions to write to this Channel topic: room"
    );
}

// ---------------------------------------------------------------------------------------
// postgres_changes_options.wait and broadcast.replication_ready

mod readiness {
    use super::*;
    use crate::realtime::changes::Checked;
    use std::sync::atomic::Ordering as AtomicOrdering;
    use walcast_core::subscription::{Binding, EventFilter};

    const ENTRY: &str = r#"{"event":"*","schema":"public","table":"todos"}"#;

    fn checked(errors: Vec<String>) -> Outcome {
        let bindings = if errors.is_empty() {
            vec![Binding {
                id: 1,
                event: EventFilter::All,
                schema: "public".into(),
                table: "todos".into(),
                filter: None,
                select: None,
            }]
        } else {
            Vec::new()
        };
        Outcome::Authorize(Ok(Authorized {
            perms: None,
            changes: Checked {
                bindings,
                errors,
                ..Checked::default()
            },
            ..Default::default()
        }))
    }

    /// Join `realtime:room` with one entry and `extra` merged into the config; the check
    /// answers `outcome`.
    fn join(t: &mut T, extra: Value, outcome: Outcome) {
        let mut config =
            json!({"postgres_changes": [serde_json::from_str::<Value>(ENTRY).expect("entry")]});
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        t.join("1", "realtime:room", config);
        let work = t.work();
        assert_eq!(work.len(), 1);
        t.done(work[0].op, outcome);
    }

    fn messages(frames: &[Value]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f[3].as_str() {
                Some("system") => format!(
                    "system {} {} {}",
                    f[4]["extension"].as_str().unwrap_or(""),
                    f[4]["status"].as_str().unwrap_or(""),
                    f[4]["message"].as_str().unwrap_or("")
                ),
                Some("phx_reply") => format!("reply {}", reply_status(f)),
                other => other.unwrap_or("").to_string(),
            })
            .collect()
    }

    #[test]
    fn wait_replies_at_once_when_the_stream_is_up() {
        let mut t = T::new(app(limits()));
        join(
            &mut t,
            json!({"postgres_changes_options": {"wait": true}}),
            checked(vec![]),
        );
        assert_eq!(
            messages(&t.out()),
            [
                "reply ok",
                "system postgres_changes ok Subscribed to PostgreSQL"
            ]
        );
    }

    #[test]
    fn wait_holds_the_reply_until_the_stream_is_up() {
        let state = app(limits());
        state.streaming.store(false, AtomicOrdering::Release);
        let mut t = T::new(state.clone());
        join(
            &mut t,
            json!({"postgres_changes_options": {"wait": true}}),
            checked(vec![]),
        );
        assert!(t.out().is_empty(), "the reply is held");
        // Frames for the topic wait behind the held join; others do not.
        t.send(json!(["1", "b", "realtime:room", "broadcast", {"type": "broadcast", "event": "e", "payload": {}}]));
        t.send(json!([null, "h", "phoenix", "heartbeat", {}]));
        assert_eq!(events(&t.out()), ["phoenix:phx_reply"]);
        assert!(t.session.next_deadline(t.now) <= t.now.at + Duration::from_millis(100));
        t.later(Duration::from_secs(2));
        t.session.on_tick(t.now);
        assert!(t.out().is_empty(), "still held while the stream is down");
        state.streaming.store(true, AtomicOrdering::Release);
        t.later(Duration::from_millis(100));
        t.session.on_tick(t.now);
        let out = t.out();
        assert_eq!(
            messages(&out),
            [
                "reply ok",
                "system postgres_changes ok Subscribed to PostgreSQL",
            ]
        );
        assert_eq!(out[0][1], "1", "the join's own ref");
        assert_eq!(t.session.channel_count(), 1);
    }

    #[test]
    fn wait_refuses_the_join_at_the_timeout_capped_by_the_server() {
        for (asked, applied) in [
            (Some(300u64), 300u64),
            (None, 15_000),
            (Some(90_000), 20_000),
        ] {
            let state = app(limits());
            state.streaming.store(false, AtomicOrdering::Release);
            let mut t = T::new(state);
            let options = match asked {
                Some(ms) => json!({"wait": true, "timeout": ms}),
                None => json!({"wait": true}),
            };
            join(
                &mut t,
                json!({"postgres_changes_options": options}),
                checked(vec![]),
            );
            t.later(Duration::from_millis(applied - 1));
            t.session.on_tick(t.now);
            assert!(t.out().is_empty(), "held until {applied} ms");
            t.later(Duration::from_millis(1));
            t.session.on_tick(t.now);
            let out = t.out();
            assert_eq!(events(&out), ["realtime:room:phx_reply"]);
            assert_eq!(reply_status(&out[0]), "error");
            assert_eq!(
                out[0][4]["response"]["reason"],
                format!("PostgresChangesSubscribeTimeout: Timed out after {applied}ms waiting for the postgres_changes subscription")
            );
            assert_eq!(t.session.channel_count(), 0);
        }
    }

    #[test]
    fn wait_refuses_a_join_whose_entry_failed_its_check() {
        let state = app(limits());
        state.streaming.store(false, AtomicOrdering::Release);
        let mut t = T::new(state);
        let error = "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: [event: *, schema: public, table: todos, filters: [], select: ]";
        join(
            &mut t,
            json!({"postgres_changes_options": {"wait": true}}),
            checked(vec![error.to_string()]),
        );
        let out = t.out();
        assert_eq!(reply_status(&out[0]), "error");
        assert_eq!(
            out[0][4]["response"]["reason"],
            format!("RealtimeDisabledForConfiguration: {error}")
        );
        // Without wait, the join succeeds and the error is a system message.
        let mut t = T::new(app(limits()));
        join(&mut t, json!({}), checked(vec![error.to_string()]));
        assert_eq!(
            messages(&t.out()),
            [
                "reply ok".to_string(),
                format!("system postgres_changes error {error}")
            ]
        );
    }

    #[test]
    fn wait_without_postgres_changes_changes_nothing() {
        let state = app(limits());
        state.streaming.store(false, AtomicOrdering::Release);
        let mut t = T::new(state);
        t.join(
            "1",
            "realtime:room",
            json!({"postgres_changes_options": {"wait": true}}),
        );
        let op = t.work()[0].op;
        t.ok(op);
        assert_eq!(messages(&t.out()), ["reply ok"]);
    }

    #[test]
    fn replication_ready_is_announced_after_the_reply() {
        let mut t = T::new(app(limits()));
        t.join(
            "1",
            "realtime:room",
            json!({"broadcast": {"replication_ready": true}}),
        );
        let op = t.work()[0].op;
        t.ok(op);
        let out = t.out();
        assert_eq!(
            messages(&out),
            [
                "reply ok",
                "system system ok Replication connection established"
            ]
        );
        assert_eq!(out[1][4]["channel"], "room");
        assert_eq!(out[1][0], "1", "pushed with the channel's join_ref");
        // Before the postgres_changes status when both apply.
        let mut t = T::new(app(limits()));
        join(
            &mut t,
            json!({"broadcast": {"replication_ready": true}}),
            checked(vec![]),
        );
        assert_eq!(
            messages(&t.out()),
            [
                "reply ok",
                "system system ok Replication connection established",
                "system postgres_changes ok Subscribed to PostgreSQL"
            ]
        );
    }

    #[test]
    fn replication_ready_waits_for_the_stream_then_says_so() {
        let state = app(limits());
        state.streaming.store(false, AtomicOrdering::Release);
        let mut t = T::new(state.clone());
        t.join(
            "1",
            "realtime:room",
            json!({"broadcast": {"replication_ready": true}}),
        );
        let op = t.work()[0].op;
        t.ok(op);
        assert_eq!(messages(&t.out()), ["reply ok"]);
        assert!(t.session.next_deadline(t.now) <= t.now.at + Duration::from_millis(100));
        t.later(Duration::from_secs(30));
        t.session.on_tick(t.now);
        assert!(t.out().is_empty());
        state.streaming.store(true, AtomicOrdering::Release);
        t.session.on_tick(t.now);
        assert_eq!(
            messages(&t.out()),
            ["system system ok Replication connection established"]
        );
        // Said once.
        t.later(Duration::from_secs(60));
        t.send(json!([null, "h", "phoenix", "heartbeat", {}]));
        t.session.on_tick(t.now);
        assert_eq!(events(&t.out()), ["phoenix:phx_reply"]);
        assert_eq!(t.session.channel_count(), 1);
    }

    #[test]
    fn replication_ready_closes_the_channel_at_the_timeout() {
        let mut l = limits();
        l.replication_ready_timeout = Duration::from_secs(5);
        let state = app(l);
        state.streaming.store(false, AtomicOrdering::Release);
        let mut t = T::new(state);
        t.join(
            "1",
            "realtime:room",
            json!({"broadcast": {"replication_ready": true}}),
        );
        let op = t.work()[0].op;
        t.ok(op);
        t.out();
        t.later(Duration::from_millis(4_900));
        t.session.on_tick(t.now);
        assert!(t.out().is_empty());
        t.later(Duration::from_millis(100));
        t.session.on_tick(t.now);
        let out = t.out();
        assert_eq!(
            messages(&out),
            [
                "system system error Replication connection was not established in time",
                "phx_close"
            ]
        );
        assert_eq!(t.session.channel_count(), 0);
    }
}
