//! Cluster mode over a real redis-server: three `walcast serve` nodes on one database and
//! slot. Broadcasts and presence cross nodes, a killed node's presences leave the others,
//! and a Redis outage keeps each node serving its own sockets until Redis is back, when
//! cross-node traffic resumes and presence is re-synced.
//!
//! The nodes compete for the slot (the single streamer is another part), so nothing here
//! waits on every node's /readyz or uses postgres_changes.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::server::{token, Client, Options, Server};
use walcast_testkit::{PgCluster, RedisServer};

const WAIT: Duration = Duration::from_secs(20);
const TOPIC: &str = "realtime:room";
/// Short, so that silent nodes are noticed quickly.
const NODE_TIMEOUT_SECS: &str = "2";

async fn node(db_url: &str, redis: &str, id: &str) -> Server {
    Server::start_serving(
        db_url,
        "cluster",
        Options::default().args(&[
            "--redis-url",
            redis,
            "--node-id",
            id,
            "--presence-node-timeout-secs",
            NODE_TIMEOUT_SECS,
        ]),
    )
    .await
}

/// The cluster line of a node's /readyz body (whatever its status).
async fn cluster_line(s: &Server) -> String {
    let (_, body) = s.get("/readyz").await.unwrap_or((0, String::new()));
    body.lines()
        .find(|l| l.starts_with("cluster:"))
        .unwrap_or("")
        .to_owned()
}

async fn wait_line(s: &Server, want: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let line = cluster_line(s).await;
        if line.contains(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never said {want:?}; last: {line:?}; log:\n{}",
            s.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client that joined `TOPIC` with presence key `key`, and the presence it has seen.
struct Member {
    c: Client,
    /// key → number of metas, as presence_state and presence_diff built it.
    seen: BTreeMap<String, usize>,
}

impl Member {
    async fn join(s: &Server, key: &str) -> Member {
        let t = token("anon", 3600);
        let mut c = s.connect(&t).await;
        let reply = c
            .join_with(
                "1",
                TOPIC,
                json!({"config": {
                        "broadcast": {"self": false, "ack": false},
                        "presence": {"enabled": true, "key": key},
                        "private": false,
                        "postgres_changes": []},
                    "access_token": t}),
            )
            .await;
        assert_eq!(reply["status"], "ok", "join on node: {reply}");
        let mut m = Member {
            c,
            seen: BTreeMap::new(),
        };
        for f in std::mem::take(&mut m.c.skipped) {
            if let Some(v) = f.json() {
                m.apply(v);
            }
        }
        m
    }

    fn apply(&mut self, v: &Value) {
        if v[2] != TOPIC {
            return;
        }
        let count = |metas: &Value| metas["metas"].as_array().map_or(0, Vec::len);
        match v[3].as_str() {
            Some("presence_state") => {
                self.seen.clear();
                if let Some(o) = v[4].as_object() {
                    for (k, m) in o {
                        self.seen.insert(k.clone(), count(m));
                    }
                }
            }
            Some("presence_diff") => {
                if let Some(o) = v[4]["joins"].as_object() {
                    for (k, m) in o {
                        *self.seen.entry(k.clone()).or_default() += count(m);
                    }
                }
                if let Some(o) = v[4]["leaves"].as_object() {
                    for (k, m) in o {
                        let n = self.seen.entry(k.clone()).or_default();
                        *n = n.saturating_sub(count(m));
                        if *n == 0 {
                            self.seen.remove(k);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    async fn track(&mut self, payload: Value) {
        self.c
            .send(json!(["1", "t", TOPIC, "presence",
                {"type": "presence", "event": "track", "payload": payload}]))
            .await;
    }

    async fn broadcast(&mut self, event: &str, n: u64) {
        self.c
            .send(json!(["1", "b", TOPIC, "broadcast",
                {"type": "broadcast", "event": event, "payload": {"n": n}}]))
            .await;
    }

    /// Read frames until the presence keys seen are exactly `keys`.
    async fn until_presence(&mut self, keys: &[&str], what: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now: Vec<&str> = self.seen.keys().map(String::as_str).collect();
            if now == keys {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{what}: presence never became {keys:?}; it is {now:?}"
            );
            if let Some(v) = self.c.next(left.min(Duration::from_millis(500))).await {
                self.apply(&v);
            }
        }
    }

    /// Read frames until a broadcast of `event` arrives; returns its payload.
    async fn until_broadcast(&mut self, event: &str, limit: Duration) -> Option<Value> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let v = self.c.next(left).await?;
            self.apply(&v);
            if v[2] == TOPIC && v[3] == "broadcast" && v[4]["event"] == event {
                return Some(v[4]["payload"].clone());
            }
        }
    }

    /// Nothing of `event` arrives within `quiet`.
    async fn no_broadcast(&mut self, event: &str, quiet: Duration) {
        if let Some(p) = self.until_broadcast(event, quiet).await {
            panic!("unexpected broadcast {event}: {p}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_and_presence_cross_nodes_and_survive_node_and_redis_loss() {
    let mut redis = RedisServer::start().expect("redis-server");
    let db = PgCluster::shared().fresh_database().await.unwrap();
    let sql = db.connect().await.unwrap();
    let _ = sql.batch_execute("CREATE ROLE anon NOLOGIN").await;
    let url = redis.url();
    let a = node(db.url(), &url, "node-a").await;
    let b = node(db.url(), &url, "node-b").await;
    let mut c = node(db.url(), &url, "node-c").await;
    for s in [&a, &b, &c] {
        wait_line(s, "nodes=3 redis=ok").await;
    }
    assert!(cluster_line(&a).await.contains("node=node-a"));

    // Presence: each node's member sees all three, whichever node tracked it.
    let mut ma = Member::join(&a, "alice").await;
    let mut mb = Member::join(&b, "bob").await;
    let mut mc = Member::join(&c, "carol").await;
    ma.track(json!({"on": "a"})).await;
    mb.track(json!({"on": "b"})).await;
    mc.track(json!({"on": "c"})).await;
    for (m, name) in [(&mut ma, "a"), (&mut mb, "b"), (&mut mc, "c")] {
        m.until_presence(&["alice", "bob", "carol"], name).await;
    }
    // A member joining later gets the others' presence (state, then the sync's diffs).
    let mut late = Member::join(&b, "dave").await;
    late.until_presence(&["alice", "bob", "carol"], "late joiner on b")
        .await;

    // Client broadcasts reach members on the other nodes, and not the sender (self: false).
    ma.broadcast("from-a", 1).await;
    for (m, name) in [(&mut mb, "b"), (&mut mc, "c"), (&mut late, "late")] {
        let p = m.until_broadcast("from-a", WAIT).await;
        assert_eq!(p, Some(json!({"n": 1})), "member on {name}");
    }
    // Exactly once: no echo comes back through Redis to a node that already delivered.
    mb.no_broadcast("from-a", Duration::from_millis(500)).await;
    ma.no_broadcast("from-a", Duration::from_millis(300)).await;
    // The REST API of one node reaches the members of the others.
    let resp = b
        .rest_broadcast(
            &token("anon", 3600),
            &json!({"messages": [{"topic": "room", "event": "from-http", "payload": {"n": 2}}]}),
        )
        .await;
    assert_eq!(resp.status, 202, "{resp:?}");
    for (m, name) in [(&mut ma, "a"), (&mut mc, "c"), (&mut mb, "b")] {
        let p = m.until_broadcast("from-http", WAIT).await;
        assert_eq!(p, Some(json!({"n": 2})), "member on {name}");
    }

    // kill -9 of node c: its presence leaves everywhere else once it is silent.
    c.child.kill().expect("kill node c");
    let _ = c.child.wait();
    ma.until_presence(&["alice", "bob"], "a after c died").await;
    mb.until_presence(&["alice", "bob"], "b after c died").await;
    wait_line(&a, "nodes=2 redis=ok").await;
    drop(mc);

    // Redis down: each node keeps serving its own sockets and says so on /readyz.
    redis.stop();
    wait_line(&a, "redis=down").await;
    let (status, body) = a.get("/readyz").await.unwrap();
    assert!(
        body.contains("serving local sockets only"),
        "{status} {body}"
    );
    let mut ma2 = Member::join(&a, "erin").await;
    ma2.track(json!({"on": "a"})).await;
    ma.broadcast("local", 3).await;
    assert_eq!(
        ma2.until_broadcast("local", WAIT).await,
        Some(json!({"n": 3})),
        "local broadcast while Redis is down"
    );
    // Nothing vouches for b any more: its presence leaves a (and a's leaves b).
    ma.until_presence(&["alice", "erin"], "a without Redis")
        .await;
    mb.until_presence(&["bob"], "b without Redis").await;

    // Redis back: cross-node broadcasts resume and presence is re-synced.
    redis.restart().expect("redis-server restarts on its port");
    for s in [&a, &b] {
        wait_line(s, "nodes=2 redis=ok").await;
    }
    ma.until_presence(&["alice", "bob", "erin"], "a after Redis is back")
        .await;
    mb.until_presence(&["alice", "bob", "erin"], "b after Redis is back")
        .await;
    // The bus may re-subscribe a moment after the link is up: send until one arrives.
    let mut got = None;
    for n in 0..40 {
        mb.broadcast("after", n).await;
        if let Some(p) = ma
            .until_broadcast("after", Duration::from_millis(500))
            .await
        {
            got = Some(p);
            break;
        }
    }
    assert!(
        got.is_some(),
        "no broadcast crossed from b to a after Redis came back"
    );
}
