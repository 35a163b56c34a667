//! Broadcast routing and presence fan-out: topic → joined channels.
//!
//! ```text
//!  socket task (client push) ─┐                       ┌─▶ member outbox (vsn 1) ◀─ text frame  ┐ encoded once
//!  HTTP /api/broadcast ───────┼─▶ Topics::publish ────┼─▶ member outbox (vsn 2) ◀─ kind 4 / text │ per (vsn, form),
//!  pump (realtime.send) ──────┘    (read lock)        └─▶ …                                      ┘ bytes shared
//!
//!  socket task: join / track / untrack / leave ─▶ Topics (write lock) ─▶ PresenceState
//!                                                     └─▶ presence_diff to every member (encoded once per vsn)
//! ```
//!
//! Invariants:
//! - Publishing never blocks: frames go to each member's [`Outbox`] with a non-blocking
//!   push; a full outbox is that socket's problem (the server disconnects it).
//! - Each broadcast is serialized at most once per (protocol version, frame form) and every
//!   receiver gets a clone of the same bytes (a refcount bump).
//! - Public and private channels of the same name are different topics ([`TopicKey`]).
//! - Presence changes and their fan-out happen under one write lock, so every member sees
//!   the diffs of a topic in the same order, and a joiner's `presence_state` (queued under
//!   that lock) is exactly the state the following diffs apply to.
//! - The sender is excluded from its own broadcast unless it asked for `self`.
//! - Binary-payload broadcasts are never sent to vsn 1.0.0 members, and no binary frame
//!   other than kind 4 is produced.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use bytes::Bytes;
use walcast_protocol::{
    encode_push, encode_user_broadcast_binary, outbound, BinaryBroadcast, PayloadEncoding, Vsn,
};

use crate::hub::{OutFrame, Outbox};
use crate::position::Position;
use crate::presence::{Diff, MemberId, PresenceState, RefGen};

/// A topic: the channel name without `realtime:`, public or private.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicKey {
    pub private: bool,
    pub name: Arc<str>,
}

impl TopicKey {
    pub fn new(name: &str, private: bool) -> TopicKey {
        TopicKey {
            private,
            name: Arc::from(name),
        }
    }

    /// From a wire topic (`realtime:<name>`); `None` for other topics.
    pub fn from_topic(topic: &str, private: bool) -> Option<TopicKey> {
        topic
            .strip_prefix("realtime:")
            .map(|name| TopicKey::new(name, private))
    }
}

/// A joined channel, as the broadcast side needs it.
#[derive(Clone)]
pub struct Member {
    pub outbox: Arc<dyn Outbox>,
    pub vsn: Vsn,
    /// Receives broadcasts (false for a private channel without broadcast read).
    pub broadcast: bool,
    /// Receives presence diffs (false for a private channel without presence read).
    pub presence: bool,
    /// Ids of the stored messages replayed to this channel at its join: a live copy of one
    /// of them is not delivered again (at most the replay limit, so a scan is enough).
    pub replayed: Option<Arc<[Box<str>]>>,
}

impl Member {
    fn already_replayed(&self, id: Option<&str>) -> bool {
        match (id, &self.replayed) {
            (Some(id), Some(ids)) => ids.iter().any(|r| &**r == id),
            _ => false,
        }
    }
}

/// What is broadcast.
#[derive(Debug, Clone)]
pub enum Body {
    /// A broadcast map relayed as sent (client text pushes, the REST batch endpoint): every
    /// member gets a text `broadcast` frame with this exact payload.
    Map(String),
    /// A user event and payload (client binary pushes, the REST single endpoint, the
    /// database): vsn 2.0.0 members get a kind 4 frame, vsn 1.0.0 members the converted
    /// text (JSON payloads only).
    User(UserBroadcast),
}

/// A user event with its payload, as kind 4 frames carry it.
#[derive(Debug, Clone)]
pub struct UserBroadcast {
    pub event: String,
    pub encoding: PayloadEncoding,
    /// Metadata object text (`{"id":…}` for database broadcasts), if any.
    pub meta: Option<String>,
    pub payload: Bytes,
}

impl From<BinaryBroadcast> for UserBroadcast {
    /// A client's kind 3 push. Its metadata (client hints such as `persist`) is not relayed:
    /// subscribers get the frame with empty metadata, as the reference server sends it.
    fn from(b: BinaryBroadcast) -> UserBroadcast {
        UserBroadcast {
            event: b.event,
            encoding: b.encoding,
            meta: None,
            payload: b.payload,
        }
    }
}

impl Body {
    /// Size of the user payload, for the payload-size limit.
    pub fn payload_len(&self) -> usize {
        match self {
            Body::Map(m) => m.len(),
            Body::User(u) => u.payload.len(),
        }
    }
}

/// How a [`Topics::join`] is made.
#[derive(Debug, Clone, Copy, Default)]
pub struct JoinOptions<'a> {
    /// Queue the presence state, stamped with this join_ref, before any diff.
    pub presence_state: Option<Option<&'a str>>,
    /// Refuse the join when the topic already has this many members.
    pub max_members: Option<usize>,
}

/// A join refused because the topic is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the channel already has {max} members")]
pub struct MemberLimit {
    pub max: usize,
}

/// A track refused because the topic's presence state is at its size limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the channel's presence state is full")]
pub struct PresenceFull;

/// What one publish or presence fan-out did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FanoutStats {
    /// Frames queued.
    pub delivered: u64,
    /// Frames refused by full or closed outboxes.
    pub dropped: u64,
    /// Members skipped because their protocol cannot carry the payload (binary to vsn 1), or
    /// because the message was replayed to them at their join.
    pub skipped: u64,
    /// Distinct frames serialized.
    pub encoded: u64,
}

/// Member ids at or above this stand for presence entries of other cluster nodes (merged by
/// [`Topics::merge_node`]); the server's own subscriber ids never get this high.
pub const REMOTE_MEMBER_BIT: MemberId = 1 << 63;

/// Told about changes other nodes of a cluster need to hear of. Called under the topic lock
/// (so calls come in the order the changes happened): implementations only enqueue.
pub trait TopicObserver: Send + Sync {
    /// The topic got its first local member.
    fn opened(&self, key: &TopicKey);
    /// The topic's last local member left.
    fn closed(&self, key: &TopicKey);
    /// This node's own presence entries of the topic changed.
    fn presence_changed(&self, key: &TopicKey);
}

struct Topic {
    /// `realtime:<name>`, as frames carry it.
    wire: Arc<str>,
    members: Vec<(MemberId, Member)>,
    /// member id → index in `members` (swap-remove keeps both O(1)).
    index: HashMap<MemberId, usize>,
    presence: PresenceState,
    /// (node, that node's member id) → our member id for its presence entry.
    remote: HashMap<(Arc<str>, MemberId), MemberId>,
}

impl Topic {
    fn remove_member(&mut self, id: MemberId) -> bool {
        let Some(i) = self.index.remove(&id) else {
            return false;
        };
        self.members.swap_remove(i);
        if let Some((moved, _)) = self.members.get(i) {
            self.index.insert(*moved, i);
        }
        true
    }
}

/// Frames of one message, built on first use.
struct FrameCache<'a> {
    wire: &'a str,
    v1: Option<Option<OutFrame>>,
    v2: Option<Option<OutFrame>>,
    encoded: u64,
}

impl<'a> FrameCache<'a> {
    fn new(wire: &'a str) -> FrameCache<'a> {
        FrameCache {
            wire,
            v1: None,
            v2: None,
            encoded: 0,
        }
    }

    fn get(
        &mut self,
        vsn: Vsn,
        build: impl FnOnce(&str, Vsn) -> Option<OutFrame>,
    ) -> Option<OutFrame> {
        let slot = match vsn {
            Vsn::V1 => &mut self.v1,
            Vsn::V2 => &mut self.v2,
        };
        if slot.is_none() {
            let f = build(self.wire, vsn);
            if f.is_some() {
                self.encoded += 1;
            }
            *slot = Some(f);
        }
        slot.clone().flatten()
    }
}

/// The frame a member of protocol `vsn` gets for `body`, or `None` when it gets nothing.
pub fn broadcast_frame(wire_topic: &str, vsn: Vsn, body: &Body) -> Option<OutFrame> {
    let text = |payload: &str| {
        OutFrame::text(encode_push(
            vsn,
            None,
            None,
            wire_topic,
            outbound::event::BROADCAST,
            payload,
        ))
    };
    match body {
        Body::Map(map) => Some(text(map)),
        Body::User(u) => {
            let json = match u.encoding {
                PayloadEncoding::Json => std::str::from_utf8(&u.payload).ok(),
                PayloadEncoding::Binary => None,
            };
            match vsn {
                Vsn::V2 => match encode_user_broadcast_binary(
                    wire_topic,
                    &u.event,
                    u.meta.as_deref(),
                    u.encoding,
                    &u.payload,
                ) {
                    Ok(b) => Some(OutFrame::Binary(b)),
                    // Names too long for a kind 4 header: JSON still fits a text frame.
                    Err(_) => {
                        json.map(|p| text(&outbound::broadcast(&u.event, p, u.meta.as_deref())))
                    }
                },
                Vsn::V1 => json.map(|p| {
                    text(&outbound::broadcast_v1_from_binary(
                        &u.event,
                        p,
                        u.meta.as_deref(),
                    ))
                }),
            }
        }
    }
}

/// Every topic with joined channels, their presence, and the fan-out to them.
pub struct Topics {
    topics: RwLock<HashMap<TopicKey, Topic>>,
    refs: Mutex<RefGen>,
    observer: OnceLock<Arc<dyn TopicObserver>>,
    next_remote: AtomicU64,
}

impl Topics {
    /// `salt` makes presence refs differ across restarts (pass something like start time).
    pub fn new(salt: u64) -> Topics {
        Topics {
            topics: RwLock::new(HashMap::new()),
            refs: Mutex::new(RefGen::new(salt)),
            observer: OnceLock::new(),
            next_remote: AtomicU64::new(REMOTE_MEMBER_BIT),
        }
    }

    /// Watch topics open and close and local presence change (cluster mode). Set once;
    /// `false` when an observer was already set.
    pub fn set_observer(&self, observer: Arc<dyn TopicObserver>) -> bool {
        self.observer.set(observer).is_ok()
    }

    fn notify(&self, f: impl FnOnce(&dyn TopicObserver)) {
        if let Some(o) = self.observer.get() {
            f(o.as_ref());
        }
    }

    /// Add a channel to a topic, under the lock that orders the topic's broadcasts and diffs:
    /// first `before` runs (queue the join reply there, so it precedes everything the channel
    /// receives), then the presence state is queued when `presence_state` is `Some(join_ref)`,
    /// then the channel becomes a member. Joining again with the same id replaces the member.
    ///
    /// With `max_members`, a join that would make the topic exceed that many channels is
    /// refused (and `before` does not run).
    pub fn join<R>(
        &self,
        key: &TopicKey,
        id: MemberId,
        member: Member,
        opts: JoinOptions<'_>,
        before: impl FnOnce() -> R,
    ) -> Result<R, MemberLimit> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        if let (Some(max), Some(topic)) = (opts.max_members, topics.get(key)) {
            if !topic.index.contains_key(&id) && topic.members.len() >= max {
                return Err(MemberLimit { max });
            }
        }
        let topic = topics.entry(key.clone()).or_insert_with(|| Topic {
            wire: Arc::from(format!("realtime:{}", key.name)),
            members: Vec::new(),
            index: HashMap::new(),
            presence: PresenceState::default(),
            remote: HashMap::new(),
        });
        let out = before();
        if let Some(join_ref) = opts.presence_state {
            let payload = topic.presence.state_payload();
            member.outbox.push(OutFrame::text(encode_push(
                member.vsn,
                join_ref,
                None,
                &topic.wire,
                outbound::event::PRESENCE_STATE,
                &payload,
            )));
        }
        topic.remove_member(id);
        topic.index.insert(id, topic.members.len());
        topic.members.push((id, member));
        if topic.members.len() == 1 {
            self.notify(|o| o.opened(key));
        }
        Ok(out)
    }

    /// Change what a member receives (its permissions were evaluated again). Returns false
    /// when it is not a member.
    pub fn set_access(
        &self,
        key: &TopicKey,
        id: MemberId,
        broadcast: bool,
        presence: bool,
    ) -> bool {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get_mut(key) else {
            return false;
        };
        let Some(&i) = topic.index.get(&id) else {
            return false;
        };
        let m = &mut topic.members[i].1;
        m.broadcast = broadcast;
        m.presence = presence;
        true
    }

    /// Remove a channel: its presence leaves (diff to the remaining members), then it is
    /// gone from the topic. Idempotent.
    pub fn leave(&self, key: &TopicKey, id: MemberId) -> FanoutStats {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get_mut(key) else {
            return FanoutStats::default();
        };
        let was_member = topic.remove_member(id);
        let stats = match topic.presence.untrack(id) {
            Some(diff) => {
                self.notify(|o| o.presence_changed(key));
                fan_out_diff(topic, &diff)
            }
            None => FanoutStats::default(),
        };
        // Local presence belongs to members, so what is left without members is other
        // nodes' entries, which nobody here watches any more.
        if topic.members.is_empty() {
            topics.remove(key);
            if was_member {
                self.notify(|o| o.closed(key));
            }
        }
        stats
    }

    /// Track or update `id`'s presence under `presence_key`. `Ok(None)` when nothing changed;
    /// refused when the topic's presence state would grow past `max_state_bytes`.
    pub fn track(
        &self,
        key: &TopicKey,
        id: MemberId,
        presence_key: &str,
        payload: &str,
        max_state_bytes: usize,
    ) -> Result<Option<FanoutStats>, PresenceFull> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get_mut(key) else {
            return Ok(None);
        };
        // Only joined channels may track (a leave must be able to clean up).
        if !topic.index.contains_key(&id) {
            return Ok(None);
        }
        if topic.presence.bytes_after_track(id, payload) > max_state_bytes {
            return Err(PresenceFull);
        }
        let diff = {
            let mut refs = self.refs.lock().unwrap_or_else(|p| p.into_inner());
            topic.presence.track(id, presence_key, payload, &mut refs)
        };
        if diff.is_some() {
            self.notify(|o| o.presence_changed(key));
        }
        Ok(diff.map(|d| fan_out_diff(topic, &d)))
    }

    /// Remove `id`'s presence. `None` when it was not tracked.
    pub fn untrack(&self, key: &TopicKey, id: MemberId) -> Option<FanoutStats> {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let topic = topics.get_mut(key)?;
        let diff = topic.presence.untrack(id)?;
        self.notify(|o| o.presence_changed(key));
        Some(fan_out_diff(topic, &diff))
    }

    /// Send `body` to every member of `key` that receives broadcasts, except `exclude`.
    pub fn publish(&self, key: &TopicKey, body: &Body, exclude: Option<MemberId>) -> FanoutStats {
        self.publish_inner(key, body, exclude, None, None)
    }

    /// [`Topics::publish`] for a message that is also stored under `id` (a persisted send):
    /// members that already got it replayed are skipped.
    pub fn publish_stored(
        &self,
        key: &TopicKey,
        body: &Body,
        id: &str,
        exclude: Option<MemberId>,
    ) -> FanoutStats {
        self.publish_inner(key, body, exclude, None, Some(id))
    }

    /// Send a database broadcast (a committed `realtime.messages` row at `at`): as
    /// [`Topics::publish`], with the position handed to each outbox, so resumable sessions
    /// can replay it. Members that got the row `id` replayed at their join are skipped.
    pub fn publish_at(
        &self,
        key: &TopicKey,
        body: &Body,
        id: Option<&str>,
        at: Position,
        xid: u32,
    ) -> FanoutStats {
        self.publish_inner(key, body, None, Some((at, xid)), id)
    }

    fn publish_inner(
        &self,
        key: &TopicKey,
        body: &Body,
        exclude: Option<MemberId>,
        at: Option<(Position, u32)>,
        message_id: Option<&str>,
    ) -> FanoutStats {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get(key) else {
            return FanoutStats::default();
        };
        let mut stats = FanoutStats::default();
        let mut cache = FrameCache::new(&topic.wire);
        for (id, m) in &topic.members {
            if !m.broadcast || Some(*id) == exclude {
                continue;
            }
            if m.already_replayed(message_id) {
                stats.skipped += 1;
                continue;
            }
            match cache.get(m.vsn, |wire, vsn| broadcast_frame(wire, vsn, body)) {
                Some(frame) => {
                    let queued = match at {
                        Some((at, xid)) => m.outbox.push_at(at, xid, frame),
                        None => m.outbox.push(frame),
                    };
                    if queued {
                        stats.delivered += 1;
                    } else {
                        stats.dropped += 1;
                    }
                }
                None => stats.skipped += 1,
            }
        }
        stats.encoded = cache.encoded;
        stats
    }

    /// Topics with local members (cluster mode: what to subscribe to after a reconnect).
    pub fn local_topics(&self) -> Vec<TopicKey> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .iter()
            .filter(|(_, t)| !t.members.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// This node's own presence entries of a topic: (member id, key, meta).
    pub fn local_presence(&self, key: &TopicKey) -> Vec<(MemberId, String, String)> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .get(key)
            .map_or_else(Vec::new, |t| t.presence.entries(|m| m < REMOTE_MEMBER_BIT))
    }

    /// Replace what `node` has tracked on a topic with `entries` ((its member id, key,
    /// meta) — its whole state for the topic), fanning out one diff of what changed. A
    /// topic without local members is ignored (nobody here would see it).
    pub fn merge_node(
        &self,
        key: &TopicKey,
        node: &str,
        entries: &[(MemberId, String, String)],
    ) -> FanoutStats {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let Some(topic) = topics.get_mut(key) else {
            return FanoutStats::default();
        };
        if topic.members.is_empty() {
            return FanoutStats::default();
        }
        let node: Arc<str> = Arc::from(node);
        let mut diff = Diff::default();
        let keep: HashSet<MemberId> = entries.iter().map(|(id, _, _)| *id).collect();
        let gone: Vec<(Arc<str>, MemberId)> = topic
            .remote
            .keys()
            .filter(|(n, id)| *n == node && !keep.contains(id))
            .cloned()
            .collect();
        for k in gone {
            if let Some(ours) = topic.remote.remove(&k) {
                if let Some(d) = topic.presence.untrack(ours) {
                    diff.leaves.extend(d.leaves);
                }
            }
        }
        for (id, pkey, meta) in entries {
            let ours = *topic
                .remote
                .entry((node.clone(), *id))
                .or_insert_with(|| self.next_remote.fetch_add(1, Ordering::Relaxed));
            if let Some(d) = topic.presence.put_meta(ours, pkey, meta) {
                diff.joins.extend(d.joins);
                diff.leaves.extend(d.leaves);
            }
        }
        fan_out_diff(topic, &diff)
    }

    /// Drop every presence entry of `node` (it went silent), with leaves to local members.
    /// Returns how many entries were dropped.
    pub fn drop_node(&self, node: &str) -> usize {
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        for topic in topics.values_mut() {
            let gone: Vec<(Arc<str>, MemberId)> = topic
                .remote
                .keys()
                .filter(|(n, _)| &**n == node)
                .cloned()
                .collect();
            if gone.is_empty() {
                continue;
            }
            let mut diff = Diff::default();
            for k in gone {
                if let Some(ours) = topic.remote.remove(&k) {
                    if let Some(d) = topic.presence.untrack(ours) {
                        dropped += 1;
                        diff.leaves.extend(d.leaves);
                    }
                }
            }
            fan_out_diff(topic, &diff);
        }
        dropped
    }

    /// Nodes whose presence entries this node holds.
    pub fn remote_nodes(&self) -> HashSet<Arc<str>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .values()
            .flat_map(|t| t.remote.keys().map(|(n, _)| n.clone()))
            .collect()
    }

    /// Members of a topic (tests, metrics).
    pub fn member_count(&self, key: &TopicKey) -> usize {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics.get(key).map_or(0, |t| t.members.len())
    }

    /// The `presence_state` payload of a topic (tests, tools).
    pub fn presence_state(&self, key: &TopicKey) -> String {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .get(key)
            .map_or_else(|| "{}".to_owned(), |t| t.presence.state_payload())
    }
}

fn fan_out_diff(topic: &Topic, diff: &Diff) -> FanoutStats {
    let mut stats = FanoutStats::default();
    if diff.is_empty() {
        return stats;
    }
    let payload = diff.payload();
    let mut cache = FrameCache::new(&topic.wire);
    for (_, m) in &topic.members {
        if !m.presence {
            continue;
        }
        let frame = cache.get(m.vsn, |wire, vsn| {
            Some(OutFrame::text(encode_push(
                vsn,
                None,
                None,
                wire,
                outbound::event::PRESENCE_DIFF,
                &payload,
            )))
        });
        if let Some(frame) = frame {
            if m.outbox.push(frame) {
                stats.delivered += 1;
            } else {
                stats.dropped += 1;
            }
        }
    }
    stats.encoded = cache.encoded;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[derive(Default)]
    struct Sink(Mutex<Vec<OutFrame>>);

    impl Outbox for Sink {
        fn push(&self, frame: OutFrame) -> bool {
            self.0.lock().unwrap().push(frame);
            true
        }
    }

    impl Sink {
        fn take(&self) -> Vec<OutFrame> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    fn member(sink: &Arc<Sink>, vsn: Vsn) -> Member {
        Member {
            outbox: sink.clone(),
            vsn,
            broadcast: true,
            presence: true,
            replayed: None,
        }
    }

    fn text(f: &OutFrame) -> Value {
        match f {
            OutFrame::Text(b) => serde_json::from_slice(b).unwrap(),
            OutFrame::Binary(_) => panic!("expected text, got binary"),
        }
    }

    fn vsn2() -> Vsn {
        Vsn::from_query(Some("2.0.0")).unwrap()
    }

    fn vsn1() -> Vsn {
        Vsn::from_query(Some("1.0.0")).unwrap()
    }

    #[test]
    fn map_broadcast_excludes_sender_and_shares_bytes() {
        let t = Topics::new(0);
        let key = TopicKey::new("room", false);
        let (a, b, c) = (
            Arc::new(Sink::default()),
            Arc::new(Sink::default()),
            Arc::new(Sink::default()),
        );
        t.join(&key, 1, member(&a, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        t.join(&key, 2, member(&b, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        t.join(&key, 3, member(&c, vsn1()), JoinOptions::default(), || ())
            .unwrap();
        let map = r#"{"type":"broadcast","event":"e","payload":{"x":1},"extra":true}"#;
        let st = t.publish(&key, &Body::Map(map.into()), Some(1));
        assert_eq!((st.delivered, st.encoded), (2, 2));
        assert!(a.take().is_empty());
        let fb = b.take();
        assert_eq!(
            text(&fb[0]),
            json!([null, null, "realtime:room", "broadcast", {"type":"broadcast","event":"e","payload":{"x":1},"extra":true}])
        );
        assert_eq!(
            text(&c.take()[0]),
            json!({"topic":"realtime:room","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"x":1},"extra":true},"ref":null})
        );
        // Self: the sender is included.
        let st = t.publish(&key, &Body::Map(map.into()), None);
        assert_eq!(st.delivered, 3);
        assert_eq!(a.take().len(), 1);
    }

    #[test]
    fn frames_are_encoded_once_per_vsn() {
        let t = Topics::new(0);
        let key = TopicKey::new("big", false);
        let sinks: Vec<Arc<Sink>> = (0..100).map(|_| Arc::new(Sink::default())).collect();
        for (i, s) in sinks.iter().enumerate() {
            t.join(
                &key,
                i as u64,
                member(s, vsn2()),
                JoinOptions::default(),
                || (),
            )
            .unwrap();
        }
        let body = Body::User(UserBroadcast {
            event: "e".into(),
            encoding: PayloadEncoding::Json,
            meta: None,
            payload: Bytes::from_static(b"{}"),
        });
        let st = t.publish(&key, &body, None);
        assert_eq!((st.delivered, st.encoded), (100, 1));
        let first = sinks[0].take().remove(0);
        let OutFrame::Binary(first) = first else {
            panic!("kind 4 expected")
        };
        for s in &sinks[1..] {
            let OutFrame::Binary(b) = s.take().remove(0) else {
                panic!("kind 4 expected")
            };
            // Same allocation, not just equal bytes.
            assert_eq!(b.as_ptr(), first.as_ptr());
        }
    }

    #[test]
    fn a_replayed_message_is_not_delivered_live_again() {
        let t = Topics::new(0);
        let key = TopicKey::new("stored", true);
        let (replayed, fresh) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        let mut m = member(&replayed, vsn2());
        m.replayed = Some(Arc::from(vec![Box::<str>::from("id-1")]));
        t.join(&key, 1, m, JoinOptions::default(), || ()).unwrap();
        t.join(
            &key,
            2,
            member(&fresh, vsn2()),
            JoinOptions::default(),
            || (),
        )
        .unwrap();
        let body = Body::User(UserBroadcast {
            event: "e".into(),
            encoding: PayloadEncoding::Json,
            meta: Some(r#"{"id":"id-1"}"#.into()),
            payload: Bytes::from_static(b"{}"),
        });
        let st = t.publish_at(&key, &body, Some("id-1"), Position::default(), 0);
        assert_eq!((st.delivered, st.skipped), (1, 1));
        assert!(replayed.take().is_empty());
        assert_eq!(fresh.take().len(), 1);
        // Another id reaches both; so does a live copy of a persisted send.
        let st = t.publish_stored(&key, &body, "id-2", None);
        assert_eq!((st.delivered, st.skipped), (2, 0));
        let st = t.publish_stored(&key, &body, "id-1", None);
        assert_eq!((st.delivered, st.skipped), (1, 1));
    }

    #[test]
    fn user_broadcast_forms() {
        let t = Topics::new(0);
        let key = TopicKey::new("r", false);
        let (v2, v1) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        t.join(&key, 1, member(&v2, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        t.join(&key, 2, member(&v1, vsn1()), JoinOptions::default(), || ())
            .unwrap();
        let json_body = Body::User(UserBroadcast {
            event: "ev".into(),
            encoding: PayloadEncoding::Json,
            meta: Some(r#"{"id":"u1"}"#.into()),
            payload: Bytes::from_static(br#"{"a":1}"#),
        });
        t.publish(&key, &json_body, None);
        let OutFrame::Binary(b) = v2.take().remove(0) else {
            panic!("binary expected")
        };
        let mut want = vec![4u8, 10, 2, 11, 1];
        want.extend_from_slice(b"realtime:rev{\"id\":\"u1\"}{\"a\":1}");
        assert_eq!(&b[..], &want[..]);
        assert_eq!(
            text(&v1.take()[0])["payload"],
            json!({"event":"ev","payload":{"a":1},"type":"broadcast","meta":{"id":"u1"}})
        );
        let bin = Body::User(UserBroadcast {
            event: "ev".into(),
            encoding: PayloadEncoding::Binary,
            meta: None,
            payload: Bytes::from_static(&[0, 1, 2]),
        });
        let st = t.publish(&key, &bin, None);
        assert_eq!((st.delivered, st.skipped), (1, 1));
        assert!(v1.take().is_empty());
        assert_eq!(v2.take().len(), 1);
    }

    #[test]
    fn private_and_public_are_different_topics() {
        let t = Topics::new(0);
        let public = TopicKey::new("x", false);
        let private = TopicKey::new("x", true);
        let (a, b) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        t.join(
            &public,
            1,
            member(&a, vsn2()),
            JoinOptions::default(),
            || (),
        )
        .unwrap();
        t.join(
            &private,
            2,
            member(&b, vsn2()),
            JoinOptions::default(),
            || (),
        )
        .unwrap();
        t.publish(&private, &Body::Map("{}".into()), None);
        assert!(a.take().is_empty());
        assert_eq!(b.take().len(), 1);
    }

    #[test]
    fn presence_state_then_diffs_and_leave() {
        let t = Topics::new(0);
        let key = TopicKey::new("p", false);
        let (a, b) = (Arc::new(Sink::default()), Arc::new(Sink::default()));
        t.join(
            &key,
            1,
            member(&a, vsn2()),
            JoinOptions {
                presence_state: Some(Some("1")),
                max_members: None,
            },
            || (),
        )
        .unwrap();
        assert_eq!(
            text(&a.take()[0]),
            json!(["1", null, "realtime:p", "presence_state", {}])
        );
        t.track(&key, 1, "alice", r#"{"s":1}"#, usize::MAX)
            .unwrap()
            .unwrap();
        let d = text(&a.take()[0]);
        assert_eq!(d[3], "presence_diff");
        assert_eq!(d[0], Value::Null);
        // Joiner gets the state including alice, then later diffs.
        t.join(
            &key,
            2,
            member(&b, vsn1()),
            JoinOptions {
                presence_state: Some(None),
                max_members: None,
            },
            || (),
        )
        .unwrap();
        let s = text(&b.take()[0]);
        assert_eq!(s["event"], "presence_state");
        assert_eq!(s["payload"]["alice"]["metas"][0]["s"], 1);
        // Leaving removes presence and tells the others.
        t.leave(&key, 1);
        let d = text(&b.take()[0]);
        assert_eq!(d["event"], "presence_diff");
        assert_eq!(d["payload"]["leaves"]["alice"]["metas"][0]["s"], 1);
        assert!(a.take().is_empty());
        assert_eq!(t.presence_state(&key), "{}");
        t.leave(&key, 2);
        assert_eq!(t.member_count(&key), 0);
    }

    #[test]
    fn members_without_read_get_nothing() {
        let t = Topics::new(0);
        let key = TopicKey::new("q", true);
        let a = Arc::new(Sink::default());
        let mut m = member(&a, vsn2());
        m.broadcast = false;
        m.presence = false;
        t.join(&key, 1, m, JoinOptions::default(), || ()).unwrap();
        let b = Arc::new(Sink::default());
        t.join(&key, 2, member(&b, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        t.publish(&key, &Body::Map("{}".into()), None);
        t.track(&key, 2, "k", "{}", usize::MAX).unwrap().unwrap();
        assert!(a.take().is_empty());
        assert_eq!(b.take().len(), 2);
        // Not joined: cannot track.
        assert_eq!(t.track(&key, 9, "k", "{}", usize::MAX), Ok(None));
    }

    #[test]
    fn member_cap_refuses_newcomers_only() {
        let t = Topics::new(0);
        let key = TopicKey::new("room", false);
        let sinks: Vec<Arc<Sink>> = (0..3).map(|_| Arc::new(Sink::default())).collect();
        let cap = |max| JoinOptions {
            presence_state: None,
            max_members: Some(max),
        };
        for (i, s) in sinks.iter().take(2).enumerate() {
            t.join(&key, i as u64, member(s, vsn2()), cap(2), || ())
                .unwrap();
        }
        let mut ran = false;
        assert_eq!(
            t.join(&key, 7, member(&sinks[2], vsn2()), cap(2), || ran = true),
            Err(MemberLimit { max: 2 })
        );
        assert!(!ran, "a refused join runs nothing under the lock");
        // A member joining again (same id) is not a newcomer.
        t.join(&key, 1, member(&sinks[1], vsn2()), cap(2), || ())
            .unwrap();
        assert_eq!(t.member_count(&key), 2);
        t.leave(&key, 0);
        t.join(&key, 7, member(&sinks[2], vsn2()), cap(2), || ())
            .unwrap();
    }

    #[test]
    fn presence_state_size_is_bounded_and_access_can_change() {
        let t = Topics::new(0);
        let key = TopicKey::new("room", true);
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        t.join(&key, 1, member(&a, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        t.join(&key, 2, member(&b, vsn2()), JoinOptions::default(), || ())
            .unwrap();
        let big = format!(r#"{{"x":"{}"}}"#, "y".repeat(500));
        assert_eq!(t.track(&key, 1, "k", &big, 400), Err(PresenceFull));
        assert!(t.track(&key, 1, "k", &big, 1000).unwrap().is_some());
        assert_eq!(t.track(&key, 2, "k2", &big, 1000), Err(PresenceFull));
        b.take();
        // Member 2 loses presence read: the next diff skips it.
        assert!(t.set_access(&key, 2, true, false));
        t.untrack(&key, 1).unwrap();
        assert!(b.take().is_empty());
        assert!(!t.set_access(&key, 9, true, true));
    }

    #[test]
    fn swap_remove_keeps_index() {
        let t = Topics::new(0);
        let key = TopicKey::new("s", false);
        let sinks: Vec<Arc<Sink>> = (0..5).map(|_| Arc::new(Sink::default())).collect();
        for (i, s) in sinks.iter().enumerate() {
            t.join(
                &key,
                i as u64,
                member(s, vsn2()),
                JoinOptions::default(),
                || (),
            )
            .unwrap();
        }
        t.leave(&key, 0);
        t.leave(&key, 2);
        t.leave(&key, 2);
        assert_eq!(t.member_count(&key), 3);
        t.publish(&key, &Body::Map("{}".into()), Some(4));
        let got: Vec<usize> = sinks.iter().map(|s| s.take().len()).collect();
        assert_eq!(got, vec![0, 1, 0, 1, 0]);
    }

    #[test]
    fn other_nodes_presence_merges_replaces_and_expires() {
        let t = Topics::new(0);
        let key = TopicKey::new("room", false);
        let sink = Arc::new(Sink::default());
        t.join(
            &key,
            1,
            member(&sink, Vsn::V1),
            JoinOptions::default(),
            || (),
        )
        .unwrap();
        let meta = |r: &str| format!(r#"{{"on":"b","phx_ref":"{r}"}}"#);
        let entries = vec![(9, "bob".to_owned(), meta("R1"))];
        assert_eq!(t.merge_node(&key, "node-b", &entries).delivered, 1);
        let diff = text(&sink.take()[0]);
        assert_eq!(diff["payload"]["joins"]["bob"]["metas"][0]["phx_ref"], "R1");
        // The same state again: nothing to tell.
        assert_eq!(t.merge_node(&key, "node-b", &entries).delivered, 0);
        let state: Value = serde_json::from_str(&t.presence_state(&key)).unwrap();
        assert_eq!(state["bob"]["metas"][0]["phx_ref"], "R1");
        // Local entries are what this node publishes; remote ones are not.
        assert!(t.local_presence(&key).is_empty());
        // A new state replaces the node's entries (old ref leaves, new joins).
        t.merge_node(&key, "node-b", &[(10, "carl".to_owned(), meta("R2"))]);
        let diff = text(&sink.take()[0]);
        assert_eq!(
            diff["payload"]["leaves"]["bob"]["metas"][0]["phx_ref"],
            "R1"
        );
        assert_eq!(
            diff["payload"]["joins"]["carl"]["metas"][0]["phx_ref"],
            "R2"
        );
        assert!(t.remote_nodes().contains("node-b"));
        // The node goes silent: its entries leave.
        assert_eq!(t.drop_node("node-b"), 1);
        let diff = text(&sink.take()[0]);
        assert_eq!(
            diff["payload"]["leaves"]["carl"]["metas"][0]["phx_ref"],
            "R2"
        );
        assert_eq!(t.presence_state(&key), "{}");
        assert!(t.remote_nodes().is_empty());
        // Topics without local members ignore other nodes' state.
        let other = TopicKey::new("empty", false);
        assert_eq!(t.merge_node(&other, "node-b", &entries).delivered, 0);
        assert_eq!(t.presence_state(&other), "{}");
    }
}
