//! Broadcast and presence between nodes over Redis pub/sub: one channel per topic, which a
//! node subscribes to only while the topic has local members.
//!
//! ```text
//!  client push / POST /api/broadcast ─▶ own Topics::publish (local members)
//!                                   └─▶ Relay::broadcast ─ encode once ─▶ publisher task
//!                                         ─▶ PUBLISH walcast:<slot>:bus:<p|b>:<name> ──┐
//!  Topics observer: opened / closed / presence_changed ─▶ bus task                     │
//!      opened: SUBSCRIBE + own presence + sync request; closed: own (empty) presence,   │
//!      UNSUBSCRIBE; presence_changed: own presence state of the topic                  │
//!  bus task ◀── message on a subscribed channel ◀───────────────────────────────────────┘
//!      origin = this node → ignored (echo); B → Topics::publish; P → Topics::merge_node;
//!      S → publish own presence state of the topic
//! ```
//!
//! Envelope (binary, built once per message whatever the number of receiving nodes): a
//! version byte, a kind byte (`B` broadcast, `P` presence state, `S` sync request), the
//! origin node id, then the kind's fields (length-prefixed strings and bytes).
//!
//! Invariants:
//! - A message crosses Redis once per node subscribed to its topic; nodes without members
//!   of the topic never receive it.
//! - Database broadcasts (`realtime.messages` rows) are never relayed here: every node gets
//!   them from the change stream. Only client pushes and HTTP broadcasts are relayed.
//! - A node ignores its own messages: its local members already got them, with `self`
//!   and the sender exclusion applied locally.
//! - While Redis is down, relayed broadcasts are dropped (counted), never queued: live
//!   broadcasts are ephemeral. Re-subscription and a presence re-sync follow the reconnect.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use walcast_core::broadcast::{Body, TopicKey, TopicObserver, Topics, UserBroadcast};
use walcast_core::presence::MemberId;
use walcast_protocol::PayloadEncoding;

use super::link::Link;
use super::Cluster;

const VERSION: u8 = 1;
/// Relayed broadcasts waiting for Redis; beyond this they are dropped.
const OUTBOX: usize = 8192;

/// What crosses Redis between nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Envelope {
    /// A broadcast to the topic (with the stored message id for persisted sends).
    Broadcast {
        origin: String,
        stored_id: Option<String>,
        body: BodyWire,
    },
    /// The origin's whole presence state of the topic: (its member id, key, meta).
    Presence {
        origin: String,
        entries: Vec<(MemberId, String, String)>,
    },
    /// Someone wants everybody's presence state of the topic.
    Sync { origin: String },
}

/// [`Body`] in a form that compares (tests) and encodes.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyWire {
    Map(String),
    User {
        event: String,
        binary: bool,
        meta: Option<String>,
        payload: Bytes,
    },
}

impl From<&Body> for BodyWire {
    fn from(b: &Body) -> BodyWire {
        match b {
            Body::Map(m) => BodyWire::Map(m.clone()),
            Body::User(u) => BodyWire::User {
                event: u.event.clone(),
                binary: u.encoding == PayloadEncoding::Binary,
                meta: u.meta.clone(),
                payload: u.payload.clone(),
            },
        }
    }
}

impl From<BodyWire> for Body {
    fn from(b: BodyWire) -> Body {
        match b {
            BodyWire::Map(m) => Body::Map(m),
            BodyWire::User {
                event,
                binary,
                meta,
                payload,
            } => Body::User(UserBroadcast {
                event,
                encoding: if binary {
                    PayloadEncoding::Binary
                } else {
                    PayloadEncoding::Json
                },
                meta,
                payload,
            }),
        }
    }
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            out.push(1);
            put_bytes(out, s.as_bytes());
        }
        None => out.push(0),
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u64(&mut self) -> Option<u64> {
        let (b, rest) = self.0.split_at_checked(8)?;
        self.0 = rest;
        Some(u64::from_be_bytes(b.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_at_checked(4)?;
        let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
        let (b, rest) = rest.split_at_checked(len)?;
        self.0 = rest;
        Some(b)
    }
    fn string(&mut self) -> Option<String> {
        std::str::from_utf8(self.bytes()?).ok().map(str::to_owned)
    }
    fn opt(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
}

impl Envelope {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.push(VERSION);
        match self {
            Envelope::Broadcast {
                origin,
                stored_id,
                body,
            } => {
                out.push(b'B');
                put_bytes(&mut out, origin.as_bytes());
                put_opt(&mut out, stored_id.as_deref());
                match body {
                    BodyWire::Map(m) => {
                        out.push(b'M');
                        put_bytes(&mut out, m.as_bytes());
                    }
                    BodyWire::User {
                        event,
                        binary,
                        meta,
                        payload,
                    } => {
                        out.push(if *binary { b'b' } else { b'j' });
                        put_bytes(&mut out, event.as_bytes());
                        put_opt(&mut out, meta.as_deref());
                        put_bytes(&mut out, payload);
                    }
                }
            }
            Envelope::Presence { origin, entries } => {
                out.push(b'P');
                put_bytes(&mut out, origin.as_bytes());
                out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
                for (id, key, meta) in entries {
                    out.extend_from_slice(&id.to_be_bytes());
                    put_bytes(&mut out, key.as_bytes());
                    put_bytes(&mut out, meta.as_bytes());
                }
            }
            Envelope::Sync { origin } => {
                out.push(b'S');
                put_bytes(&mut out, origin.as_bytes());
            }
        }
        out
    }

    /// `None` for anything malformed or of another version (ignored, never trusted).
    pub fn decode(b: &[u8]) -> Option<Envelope> {
        let mut r = Reader(b);
        if r.u8()? != VERSION {
            return None;
        }
        let kind = r.u8()?;
        let origin = r.string()?;
        let env = match kind {
            b'B' => {
                let stored_id = r.opt()?;
                let body = match r.u8()? {
                    b'M' => BodyWire::Map(r.string()?),
                    k @ (b'b' | b'j') => BodyWire::User {
                        event: r.string()?,
                        meta: r.opt()?,
                        payload: Bytes::copy_from_slice(r.bytes()?),
                        binary: k == b'b',
                    },
                    _ => return None,
                };
                Envelope::Broadcast {
                    origin,
                    stored_id,
                    body,
                }
            }
            b'P' => {
                let (n, rest) = r.0.split_at_checked(4)?;
                r.0 = rest;
                let n = u32::from_be_bytes(n.try_into().ok()?) as usize;
                // Each entry takes at least 16 bytes: a count past that is a lie.
                if n > r.0.len() / 16 {
                    return None;
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push((r.u64()?, r.string()?, r.string()?));
                }
                Envelope::Presence { origin, entries }
            }
            b'S' => Envelope::Sync { origin },
            _ => return None,
        };
        r.0.is_empty().then_some(env)
    }
}

/// The pub/sub channel of a topic.
pub fn channel(cluster: &Cluster, key: &TopicKey) -> String {
    let kind = if key.private { "p" } else { "b" };
    cluster.key(&format!("bus:{kind}:{}", key.name))
}

/// The topic of a pub/sub channel.
pub fn topic_of(cluster: &Cluster, channel: &str) -> Option<TopicKey> {
    let rest = channel.strip_prefix(&cluster.key("bus:"))?;
    let (kind, name) = rest.split_once(':')?;
    match kind {
        "p" => Some(TopicKey::new(name, true)),
        "b" => Some(TopicKey::new(name, false)),
        _ => None,
    }
}

/// Hands broadcasts to the other nodes. Cheap to call from request paths: it never waits
/// for Redis.
pub struct Relay {
    cluster: Arc<Cluster>,
    link: Link,
    out: mpsc::Sender<(String, Vec<u8>)>,
}

impl Relay {
    /// Relay a client or HTTP broadcast (never a database one) to the other nodes.
    pub fn broadcast(&self, key: &TopicKey, body: &Body, stored_id: Option<&str>) {
        if !self.link.is_up() {
            crate::metrics::cluster_message("broadcast", "dropped");
            return;
        }
        let env = Envelope::Broadcast {
            origin: self.cluster.node_id().to_owned(),
            stored_id: stored_id.map(str::to_owned),
            body: body.into(),
        };
        match self
            .out
            .try_send((channel(&self.cluster, key), env.encode()))
        {
            Ok(()) => {}
            Err(_) => crate::metrics::cluster_message("broadcast", "dropped"),
        }
    }
}

enum Event {
    Opened(TopicKey),
    Closed(TopicKey),
    Presence(TopicKey),
}

struct Observer(mpsc::UnboundedSender<Event>);

impl TopicObserver for Observer {
    fn opened(&self, key: &TopicKey) {
        let _ = self.0.send(Event::Opened(key.clone()));
    }
    fn closed(&self, key: &TopicKey) {
        let _ = self.0.send(Event::Closed(key.clone()));
    }
    fn presence_changed(&self, key: &TopicKey) {
        let _ = self.0.send(Event::Presence(key.clone()));
    }
}

/// Start the publisher and the bus task, and watch `topics`.
pub fn start(cluster: Arc<Cluster>, link: Link, topics: Arc<Topics>) -> Arc<Relay> {
    let (out_tx, out_rx) = mpsc::channel(OUTBOX);
    tokio::spawn(publisher(link.clone(), out_rx));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    if !topics.set_observer(Arc::new(Observer(ev_tx))) {
        tracing::error!("cluster bus: topics already observed; cross-node relay is off");
    }
    tokio::spawn(bus(cluster.clone(), link.clone(), topics, ev_rx));
    Arc::new(Relay {
        cluster,
        link,
        out: out_tx,
    })
}

/// Publishes relayed broadcasts in order, pipelining whatever queued up meanwhile.
async fn publisher(link: Link, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let n = batch.len() as u64;
        let Some(mut conn) = link.conn() else {
            crate::metrics::cluster_messages("broadcast", "dropped", n);
            batch.clear();
            continue;
        };
        let mut pipe = redis::pipe();
        for (chan, payload) in batch.drain(..) {
            pipe.publish(chan, payload).ignore();
        }
        match pipe.query_async::<()>(&mut conn).await {
            Ok(()) => crate::metrics::cluster_messages("broadcast", "out", n),
            Err(e) => {
                tracing::debug!(error = ?e.to_string(), "cluster: relaying broadcasts failed");
                crate::metrics::cluster_messages("broadcast", "dropped", n);
            }
        }
    }
}

async fn publish(link: &Link, chan: String, env: &Envelope, kind: &'static str) {
    let Some(mut conn) = link.conn() else {
        crate::metrics::cluster_message(kind, "dropped");
        return;
    };
    let r = redis::cmd("PUBLISH")
        .arg(chan)
        .arg(env.encode())
        .query_async::<i64>(&mut conn)
        .await;
    match r {
        Ok(_) => crate::metrics::cluster_message(kind, "out"),
        Err(e) => {
            tracing::debug!(error = ?e.to_string(), kind, "cluster: publish failed");
            crate::metrics::cluster_message(kind, "dropped");
        }
    }
}

async fn publish_presence(cluster: &Cluster, link: &Link, topics: &Topics, key: &TopicKey) {
    let env = super::presence::own_state(cluster, topics, key);
    publish(link, channel(cluster, key), &env, "presence").await;
}

async fn bus(
    cluster: Arc<Cluster>,
    link: Link,
    topics: Arc<Topics>,
    mut events: mpsc::UnboundedReceiver<Event>,
) {
    let mut up = link.watch_up();
    let mut backoff = Duration::from_millis(200);
    loop {
        // Wait for Redis; what happens meanwhile is covered by the full re-sync below.
        while !*up.borrow_and_update() {
            tokio::select! {
                r = up.changed() => if r.is_err() { return },
                e = events.recv() => if e.is_none() { return },
            }
        }
        while events.try_recv().is_ok() {}
        let pubsub =
            match tokio::time::timeout(Duration::from_secs(4), link.client().get_async_pubsub())
                .await
            {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::debug!(error = ?e.to_string(), "cluster bus: cannot connect");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
        backoff = Duration::from_millis(200);
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<TopicKey> = HashSet::new();
        let mut ok = true;
        for key in topics.local_topics() {
            if sink.subscribe(channel(&cluster, &key)).await.is_err() {
                ok = false;
                break;
            }
            subscribed.insert(key);
        }
        if !ok {
            continue;
        }
        tracing::info!(
            topics = subscribed.len(),
            "cluster bus: subscribed; re-syncing presence"
        );
        for key in &subscribed {
            publish_presence(&cluster, &link, &topics, key).await;
            let sync = Envelope::Sync {
                origin: cluster.node_id().to_owned(),
            };
            publish(&link, channel(&cluster, key), &sync, "sync").await;
        }
        let mut check = tokio::time::interval(Duration::from_secs(1));
        'conn: loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    // Coalesce: one presence publish per topic per batch.
                    let mut batch = vec![ev];
                    while let Ok(e) = events.try_recv() {
                        batch.push(e);
                    }
                    let mut dirty: Vec<TopicKey> = Vec::new();
                    for ev in batch {
                        match ev {
                            Event::Opened(key) => {
                                if sink.subscribe(channel(&cluster, &key)).await.is_err() {
                                    break 'conn;
                                }
                                subscribed.insert(key.clone());
                                let sync = Envelope::Sync { origin: cluster.node_id().to_owned() };
                                publish(&link, channel(&cluster, &key), &sync, "sync").await;
                            }
                            Event::Closed(key) => {
                                // Tell the others our entries are gone before going deaf.
                                publish_presence(&cluster, &link, &topics, &key).await;
                                dirty.retain(|k| *k != key);
                                if topics.member_count(&key) == 0 {
                                    if sink.unsubscribe(channel(&cluster, &key)).await.is_err() {
                                        break 'conn;
                                    }
                                    subscribed.remove(&key);
                                }
                            }
                            Event::Presence(key) => {
                                if !dirty.contains(&key) {
                                    dirty.push(key);
                                }
                            }
                        }
                    }
                    for key in dirty {
                        publish_presence(&cluster, &link, &topics, &key).await;
                    }
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { break 'conn };
                    let Some(key) = topic_of(&cluster, msg.get_channel_name()) else { continue };
                    let Some(env) = Envelope::decode(msg.get_payload_bytes()) else {
                        crate::metrics::cluster_message("invalid", "in");
                        continue;
                    };
                    handle(&cluster, &link, &topics, &key, env).await;
                }
                _ = check.tick() => {
                    if !link.is_up() || tokio::time::timeout(Duration::from_secs(2), sink.ping::<redis::Value>()).await.map_or(true, |r| r.is_err()) {
                        break 'conn;
                    }
                }
            }
        }
        tracing::warn!("cluster bus: lost the pub/sub connection; reconnecting");
    }
}

async fn handle(cluster: &Cluster, link: &Link, topics: &Topics, key: &TopicKey, env: Envelope) {
    match env {
        Envelope::Broadcast { origin, .. } | Envelope::Presence { origin, .. }
            if origin == cluster.node_id() => {}
        Envelope::Sync { origin } if origin == cluster.node_id() => {}
        Envelope::Broadcast {
            stored_id, body, ..
        } => {
            crate::metrics::cluster_message("broadcast", "in");
            let body = Body::from(body);
            let stats = match stored_id.as_deref() {
                Some(id) => topics.publish_stored(key, &body, id, None),
                None => topics.publish(key, &body, None),
            };
            crate::metrics::broadcast("cluster", stats.delivered);
        }
        Envelope::Presence { origin, entries } => {
            crate::metrics::cluster_message("presence", "in");
            topics.merge_node(key, &origin, &entries);
        }
        Envelope::Sync { .. } => {
            crate::metrics::cluster_message("sync", "in");
            publish_presence(cluster, link, topics, key).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_garbage_is_refused() {
        let envs = [
            Envelope::Broadcast {
                origin: "a".into(),
                stored_id: Some("id-1".into()),
                body: BodyWire::Map(r#"{"event":"e","payload":{}}"#.into()),
            },
            Envelope::Broadcast {
                origin: "a".into(),
                stored_id: None,
                body: BodyWire::User {
                    event: "ev".into(),
                    binary: true,
                    meta: None,
                    payload: Bytes::from_static(&[0, 1, 2, 255]),
                },
            },
            Envelope::Presence {
                origin: "node-b".into(),
                entries: vec![(7, "alice".into(), r#"{"phx_ref":"F1"}"#.into())],
            },
            Envelope::Sync { origin: "c".into() },
        ];
        for env in envs {
            let b = env.encode();
            assert_eq!(Envelope::decode(&b), Some(env.clone()));
            for cut in 0..b.len() {
                assert_eq!(Envelope::decode(&b[..cut]), None, "prefix {cut} of {env:?}");
            }
        }
        // A presence count larger than the bytes could hold is refused before allocating.
        let mut lie = vec![VERSION, b'P', 0, 0, 0, 1, b'x'];
        lie.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Envelope::decode(&lie), None);
    }

    #[test]
    fn channels_map_back_to_their_topic() {
        let args = crate::cli::ClusterArgs {
            redis_url: Some("redis://127.0.0.1:1".into()),
            node_id: Some("n".into()),
            failover_timeout_secs: 5,
            presence_node_timeout_secs: 15,
        };
        let c = Cluster::from_args(&args, "s").unwrap().unwrap();
        for key in [TopicKey::new("room:1", true), TopicKey::new("a:b:c", false)] {
            let ch = channel(&c, &key);
            assert_eq!(topic_of(&c, &ch), Some(key));
        }
        assert_eq!(topic_of(&c, "walcast:other:bus:p:x"), None);
    }
}
