//! Fan-out of row changes to joined channels.
//!
//! ```text
//!  pump (one task, commit order) ──Change──▶ Hub::route_owned ─▶ Routed (channels, identities)
//!        SubscriptionIndex::matches ── only bindings of this table + wildcard lists
//!  pump authorizes the identities (a batch of changes at a time) ─▶ Access per identity
//!  Hub::deliver_routed(change, routed, decide)
//!        per match: frame = cache[(vsn, topic, ids, select, visibility)]
//!                   ← data JSON rendered once per (select, visible columns)
//!        outbox.push(frame.clone())   ← a refcount bump; never blocks
//!  Hub::fail(subscriber, message): bindings removed + `system` error, for one channel only
//! ```
//!
//! Invariants:
//! - Dispatch never blocks: a full outbox drops the frame and the outbox itself decides what
//!   happens to its socket (the server disconnects a client that cannot keep up), so one slow
//!   client never slows the others or the WAL reader.
//! - Each change is serialized once per distinct column selection, and each frame once per
//!   (protocol version, topic, binding ids, selection); sockets share the bytes.
//! - Per subscriber, frames are pushed in dispatch order, which is commit order.
//! - An identity gets only what its [`Access`] grants: nothing on `Deny`, and never a column
//!   outside its [`Visibility`]. A channel that left between routing and delivery gets nothing
//!   from that routing; one that re-subscribed under another identity (a new token) gets what
//!   was routed before the switch, as judged for the identity it was routed under.
//! - [`Hub::subscribe`] runs its callback under the same lock that dispatch takes, so a join
//!   reply queued there precedes every change delivered to the new channel, and every change
//!   dispatched after it is matched against the new bindings.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use walcast_protocol::{encode_push, outbound, Vsn};

use crate::change::{Change, ChangeKind};
use crate::payload::render_data_visible;
use crate::position::Position;
use crate::subscription::{Binding, Match, SubscriberId, SubscriptionIndex};

/// A frame ready for the wire; cloning shares the bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutFrame {
    /// A text frame (always valid UTF-8).
    Text(Bytes),
    /// A binary frame.
    Binary(Bytes),
}

impl OutFrame {
    /// A text frame from an owned string.
    pub fn text(s: String) -> OutFrame {
        OutFrame::Text(Bytes::from(s))
    }

    pub fn len(&self) -> usize {
        match self {
            OutFrame::Text(b) | OutFrame::Binary(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where a channel's frames go: the socket's bounded send queue.
pub trait Outbox: Send + Sync + 'static {
    /// Queue a frame without waiting. Returns false when it was not queued (queue full or
    /// socket gone); the outbox is responsible for dealing with its own overflow.
    fn push(&self, frame: OutFrame) -> bool;

    /// Queue a frame that carries the change (or database broadcast) at `at`, committed by
    /// transaction `xid`. Outboxes that remember what they delivered (resumable sessions,
    /// change feeds aligned with a snapshot) keep them; the others just queue the frame.
    fn push_at(&self, at: Position, xid: u32, frame: OutFrame) -> bool {
        let _ = (at, xid);
        self.push(frame)
    }

    /// Queue a notice about the change stream itself (lost, back, a binding stopped, a
    /// resync needed): part of what a resumed session replays, unlike client broadcasts.
    fn push_notice(&self, frame: OutFrame) -> bool {
        self.push(frame)
    }
}

/// How a channel's deliveries are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Framing {
    /// A Phoenix `postgres_changes` push in this serializer version (WebSocket channels).
    Phoenix(Vsn),
    /// The `data` object alone (server-sent events, long-poll); `system` notices are the
    /// bare system payload.
    Data,
}

/// Who a channel acts as: the role and claims of its token. Authorization decisions are
/// made per identity (channels with the same role and claims share them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Postgres role (the token's `role` claim).
    pub role: Arc<str>,
    /// The whole claims object as JSON (`request.jwt.claims`).
    pub claims: Arc<str>,
}

/// A joined channel, as the hub needs to know it.
#[derive(Clone)]
pub struct ChannelTarget {
    pub outbox: Arc<dyn Outbox>,
    pub framing: Framing,
    /// Full topic, `realtime:<name>`.
    pub topic: Arc<str>,
    pub identity: Arc<Identity>,
    /// Deliver only changes after this position (a resumed session's last delivery). `None`
    /// on a first subscription: after every change routed so far, so a stream read again
    /// after a reconnection never hands a new channel what committed before its join.
    pub after: Option<Position>,
}

impl ChannelTarget {
    /// A `system` push (extension `postgres_changes`) for this channel, in its framing.
    fn system_frame(&self, status: outbound::SystemStatus, message: &str) -> OutFrame {
        let payload = outbound::system(
            outbound::SystemExtension::PostgresChanges,
            status,
            message,
            &self.topic,
        );
        match self.framing {
            Framing::Phoenix(vsn) => OutFrame::text(encode_push(
                vsn,
                None,
                None,
                &self.topic,
                "system",
                &payload,
            )),
            Framing::Data => OutFrame::text(payload),
        }
    }
}

/// Limits applied while rendering change payloads.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// A change whose `data` exceeds this many bytes is sent with only its short fields and
    /// `errors: ["Error 413: Payload Too Large"]` (Supabase's `poll_max_record_bytes`).
    pub max_record_bytes: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_record_bytes: 1_048_576,
        }
    }
}

/// What one dispatch did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DispatchStats {
    /// Frames queued to sockets.
    pub delivered: u64,
    /// Frames refused by full or closed outboxes.
    pub dropped: u64,
    /// Distinct payload renderings (cache misses).
    pub encoded: u64,
}

/// A registered channel and the last position delivered to it (or its floor).
struct Registered {
    target: ChannelTarget,
    /// Only the pump writes it (under the read lock, in commit order per subscriber); a
    /// mutex because the lock is shared.
    cursor: Mutex<Position>,
}

#[derive(Default)]
struct Inner {
    index: SubscriptionIndex,
    channels: HashMap<SubscriberId, Registered>,
    /// One shared `Arc` per distinct identity, so routing groups channels by pointer instead
    /// of comparing claims strings (with 1,000 channels in 100 claims groups, comparing
    /// contents per route was the pump's main cost). Entries nobody else holds are purged
    /// when the set outgrows the channels.
    identities: std::collections::HashSet<Arc<Identity>>,
    /// Value gates by relation id (see [`Hub::gate`]).
    gates: HashMap<u32, Gate>,
    /// The channels of each interned identity (by pointer), for the gates.
    by_identity: HashMap<usize, Vec<SubscriberId>>,
    /// Bumped by every change to the index, the channels or the gates: the gates' cached
    /// lists of ungated subscribers are good only for the generation they were made in.
    generation: u64,
    /// Identities that got their first channel since [`Hub::take_arrivals`] (only while
    /// someone watches, see [`Hub::watch_arrivals`]).
    arrivals: Vec<Arc<Identity>>,
    watching: bool,
}

/// Arrivals kept at most between two [`Hub::take_arrivals`]; past it they are not
/// collected (their values are then derived with their first row, as without watching).
const ARRIVALS_MAX: usize = 100_000;

/// A value gate's key: a column of the change (by index) and the text it must carry.
pub type GateKey = (usize, Arc<str>);

/// Identities of one relation whose rows are routed by value: a change reaches such an
/// identity's channels only when the row carries one of its keys.
#[derive(Default)]
struct Gate {
    /// Identity pointer → the identity (held, so its address is never reused while gated)
    /// and its keys `(column, text)`. No key: the identity sees no row of the relation.
    identities: HashMap<usize, (Arc<Identity>, Vec<GateKey>)>,
    /// Column → text → identity pointers with that key.
    by_value: HashMap<usize, HashMap<Arc<str>, Vec<usize>>>,
    /// Channels whose identity is gated: skipped by the scan of the table's bindings.
    skip: std::collections::HashSet<SubscriberId, SpreadU64>,
    /// The subscribers of the relation's table whose identity is not gated, as of an
    /// [`Inner::generation`]: a gated row is routed to them and to the candidates its keys
    /// name, without walking the gated ones (with every user gated, a row costs its
    /// candidates only). Made on first use after any change.
    ungated: Mutex<Option<Ungated>>,
}

/// See [`Gate::ungated`].
struct Ungated {
    generation: u64,
    schema: String,
    table: String,
    subscribers: Vec<SubscriberId>,
}

impl Gate {
    fn remove_identity(&mut self, ptr: usize) {
        let Some((_, keys)) = self.identities.remove(&ptr) else {
            return;
        };
        for (column, text) in keys {
            if let Some(values) = self.by_value.get_mut(&column) {
                if let Some(list) = values.get_mut(&text) {
                    list.retain(|p| *p != ptr);
                    if list.is_empty() {
                        values.remove(&text);
                    }
                }
                if values.is_empty() {
                    self.by_value.remove(&column);
                }
            }
        }
    }
}

/// A hasher for `u64` ids: one multiplication (Fibonacci hashing), so the per-binding skip
/// test of a gated scan costs a few nanoseconds.
#[derive(Default, Clone, Copy)]
struct SpreadU64;

impl std::hash::BuildHasher for SpreadU64 {
    type Hasher = SpreadHasher;
    fn build_hasher(&self) -> SpreadHasher {
        SpreadHasher(0)
    }
}

struct SpreadHasher(u64);

impl std::hash::Hasher for SpreadHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl Inner {
    /// `id` no longer has `identity`'s channel (it left or changed token).
    fn detach(&mut self, id: SubscriberId, identity: &Arc<Identity>) {
        let ptr = Arc::as_ptr(identity) as usize;
        let mut last = false;
        if let Some(list) = self.by_identity.get_mut(&ptr) {
            list.retain(|s| *s != id);
            last = list.is_empty();
        }
        for gate in self.gates.values_mut() {
            gate.skip.remove(&id);
            if last {
                gate.remove_identity(ptr);
            }
        }
        if last {
            self.by_identity.remove(&ptr);
        }
    }

    /// `id` now has `identity`'s (interned) channel.
    fn attach(&mut self, id: SubscriberId, identity: &Arc<Identity>) {
        let ptr = Arc::as_ptr(identity) as usize;
        let channels = self.by_identity.entry(ptr).or_default();
        if channels.is_empty() && self.watching && self.arrivals.len() < ARRIVALS_MAX {
            self.arrivals.push(identity.clone());
        }
        channels.push(id);
        for gate in self.gates.values_mut() {
            if gate.identities.contains_key(&ptr) {
                gate.skip.insert(id);
            }
        }
    }

    fn intern(&mut self, identity: Arc<Identity>) -> Arc<Identity> {
        if let Some(shared) = self.identities.get(&*identity) {
            return shared.clone();
        }
        if self.identities.len() >= 2 * self.channels.len() + 64 {
            self.identities.retain(|i| Arc::strong_count(i) > 1);
        }
        self.identities.insert(identity.clone());
        identity
    }
}

/// What [`Hub::watch_arrivals`] calls when an identity arrives.
type ArrivalHook = Box<dyn Fn() + Send + Sync>;

/// Registry of postgres_changes subscribers and the fan-out of changes to them.
pub struct Hub {
    config: HubConfig,
    inner: RwLock<Inner>,
    /// Called (under the hub lock, so it must not block) when an identity arrives while
    /// arrivals are watched.
    on_arrival: Mutex<Option<ArrivalHook>>,
    /// Set when an arrival was collected: [`Hub::take_arrivals`] takes no lock without one.
    arrived: std::sync::atomic::AtomicBool,
    /// The highest position routed (or known to be committed) so far: a new channel's floor.
    /// Raised under the read lock while routing, read under the write lock by `subscribe`.
    routed_through: Mutex<Position>,
}

/// Scratch buffers reused across dispatches (owned by the single dispatching task).
#[derive(Default)]
pub struct DispatchScratch {
    matches: Vec<Match>,
    /// Identity pointer → index in the `Routed` being built.
    identity_index: HashMap<usize, u32>,
    data: HashMap<RenderKey, Arc<str>>,
    frames: HashMap<(Framing, Arc<str>, Vec<u32>, RenderKey), OutFrame>,
    /// Bindings that read a column their identity may no longer read (subscriber, binding
    /// id, column): stopped once the dispatch is done.
    revoked: Vec<(SubscriberId, u32, String)>,
}

/// What one identity may see of one change: nothing, or the change trimmed to its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Deny,
    Allow(Visibility),
}

impl Access {
    /// Every column, old record included.
    pub const ALL: Access = Access::Allow(Visibility::ALL);
}

/// The part of a change an authorized identity receives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Visibility {
    /// Columns the role may SELECT, one flag per column of the change's table; `None` = all.
    pub columns: Option<Arc<[bool]>>,
    /// False when the old row image must shrink to its key columns (the identity may see the
    /// new row but not the old one, e.g. a row that moved into its tenant).
    pub old_record: bool,
}

impl Visibility {
    pub const ALL: Visibility = Visibility {
        columns: None,
        old_record: true,
    };
}

/// Rendering variant of a change's `data`: the binding selection and the visibility.
type RenderKey = (Option<Vec<String>>, Visibility);

/// The channels one change goes to, before authorization. Owned, so a pump can route a
/// batch of changes, authorize the batch, then deliver each in order.
#[derive(Default, Clone)]
pub struct Routed {
    /// Each route with the index of its identity in `identities`.
    routes: Vec<(Match, ChannelTarget, u32)>,
    /// Distinct identities among the routes, in first-seen order. Distinct by pointer: the
    /// hub interns identities, so channels with equal role and claims share one `Arc` and
    /// one entry here (an identity that escaped interning only costs a separate group).
    identities: Vec<Arc<Identity>>,
    /// Per identity (indexed like `identities`; missing = false): it was reached through
    /// the relation's value gate, so it is gated there already.
    via_gate: Vec<bool>,
}

impl Routed {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Distinct identities among the routed channels, in first-seen order. Authorization
    /// decides per entry; [`Hub::deliver_routed`] asks by index into this slice.
    pub fn identities(&self) -> &[Arc<Identity>] {
        &self.identities
    }

    /// Whether the identity at `index` was routed through its relation's value gate (it is
    /// gated there already, with keys the row carries).
    pub fn via_gate(&self, index: usize) -> bool {
        self.via_gate.get(index).copied().unwrap_or(false)
    }

    /// Move the routes of the identity at `index` out into their own `Routed` (where that
    /// identity is index 0). The identity stays listed here with no routes left, so the
    /// other indexes keep their meaning.
    pub fn take_identity(&mut self, index: usize) -> Routed {
        let Some(identity) = self.identities.get(index).cloned() else {
            return Routed::default();
        };
        let mut taken = Routed {
            routes: Vec::new(),
            identities: vec![identity],
            via_gate: Vec::new(),
        };
        let mut kept = Vec::with_capacity(self.routes.len());
        for (m, target, k) in self.routes.drain(..) {
            if k as usize == index {
                taken.routes.push((m, target, 0));
            } else {
                kept.push((m, target, k));
            }
        }
        self.routes = kept;
        taken
    }

    /// Move out, in one pass, the routes of every identity whose index is set in `take`:
    /// one `Routed` per such identity (where it is index 0), `None` for the others. What is
    /// left here keeps its indexes.
    pub fn split_off(&mut self, take: &[bool]) -> Vec<Option<Routed>> {
        let mut parts: Vec<Option<Routed>> = self
            .identities
            .iter()
            .enumerate()
            .map(|(k, identity)| {
                take.get(k).copied().unwrap_or(false).then(|| Routed {
                    routes: Vec::new(),
                    identities: vec![identity.clone()],
                    via_gate: Vec::new(),
                })
            })
            .collect();
        let mut kept = Vec::with_capacity(self.routes.len());
        for (m, target, k) in self.routes.drain(..) {
            match parts.get_mut(k as usize).and_then(Option::as_mut) {
                Some(part) => part.routes.push((m, target, 0)),
                None => kept.push((m, target, k)),
            }
        }
        self.routes = kept;
        parts
    }

    /// Number of channels routed.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// The subscribers routed under each identity, indexed like [`Routed::identities`], in
    /// one pass over the routes (asking [`Routed::subscribers_of`] for every identity would
    /// cost identities × routes).
    pub fn subscribers_by_identity(&self) -> Vec<Vec<SubscriberId>> {
        let mut out: Vec<Vec<SubscriberId>> = vec![Vec::new(); self.identities.len()];
        for (m, _, k) in &self.routes {
            if let Some(list) = out.get_mut(*k as usize) {
                list.push(m.subscriber);
            }
        }
        out
    }

    /// Subscribers routed under the identity at `index` of [`Routed::identities`].
    pub fn subscribers_of(&self, index: usize) -> Vec<SubscriberId> {
        self.routes
            .iter()
            .filter(|(_, _, k)| *k as usize == index)
            .map(|(m, _, _)| m.subscriber)
            .collect()
    }
}

impl Hub {
    pub fn new(config: HubConfig) -> Hub {
        Hub {
            config,
            inner: RwLock::new(Inner::default()),
            on_arrival: Mutex::new(None),
            arrived: std::sync::atomic::AtomicBool::new(false),
            routed_through: Mutex::new(Position::ZERO),
        }
    }

    /// The rendering limits (change feeds render replayed changes with them).
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    /// Everything at or below `p` committed before now (a WAL position read from the server):
    /// channels subscribed from now on start after it.
    pub fn advance(&self, p: Position) {
        let mut at = self
            .routed_through
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *at = (*at).max(p);
    }

    /// The floor a channel subscribed now would get.
    pub fn routed_through(&self) -> Position {
        *self
            .routed_through
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The last position delivered to a channel (or the floor it started from).
    pub fn cursor(&self, id: SubscriberId) -> Option<Position> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let r = inner.channels.get(&id)?;
        let at = *r.cursor.lock().unwrap_or_else(|e| e.into_inner());
        Some(at)
    }

    /// Register a channel's bindings. `while_locked` runs before any later dispatch can see
    /// (or miss) the channel: queue the join reply there.
    pub fn subscribe<R>(
        &self,
        id: SubscriberId,
        target: ChannelTarget,
        bindings: Vec<Binding>,
        while_locked: impl FnOnce() -> R,
    ) -> R {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner.index.remove_subscriber(id);
        for b in bindings {
            inner.index.insert(id, b);
        }
        let mut target = target;
        target.identity = inner.intern(target.identity);
        if let Some(old) = inner.channels.get(&id).map(|r| r.target.identity.clone()) {
            inner.detach(id, &old);
        }
        let identity = target.identity.clone();
        let arrived = inner.arrivals.len();
        inner.attach(id, &identity);
        if inner.arrivals.len() > arrived {
            self.arrived
                .store(true, std::sync::atomic::Ordering::Release);
            if let Some(wake) = &*self.on_arrival.lock().unwrap_or_else(|e| e.into_inner()) {
                wake();
            }
        }
        // A channel subscribing again (a new token) keeps its place in the stream.
        let cursor = match inner.channels.get(&id) {
            Some(r) => *r.cursor.lock().unwrap_or_else(|e| e.into_inner()),
            None => target.after.unwrap_or_else(|| self.routed_through()),
        };
        inner.channels.insert(
            id,
            Registered {
                target,
                cursor: Mutex::new(cursor),
            },
        );
        while_locked()
    }

    /// Forget a channel (leave, close, socket gone). Idempotent.
    pub fn unsubscribe(&self, id: SubscriberId) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner.index.remove_subscriber(id);
        if let Some(r) = inner.channels.remove(&id) {
            inner.detach(id, &r.target.identity);
        }
    }

    /// Stop a channel's postgres_changes because its authorization failed: its bindings are
    /// removed and it gets a `system` error (extension `postgres_changes`) with `message`.
    /// The channel itself stays joined (broadcast, presence); a new `access_token` or a
    /// rejoin registers its bindings again. Returns false when it was not subscribed.
    pub fn fail(&self, id: SubscriberId, message: &str) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner.index.remove_subscriber(id);
        let Some(r) = inner.channels.remove(&id) else {
            return false;
        };
        inner.detach(id, &r.target.identity);
        let target = r.target;
        target
            .outbox
            .push_notice(target.system_frame(outbound::SystemStatus::Error, message));
        true
    }

    /// Tell every channel with bindings something about the change stream (it was lost, it
    /// is back): a `system` push with extension `postgres_changes`. Returns how many.
    pub fn notify_all(&self, status: outbound::SystemStatus, message: &str) -> usize {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        let mut frames: HashMap<(Framing, Arc<str>), OutFrame> = HashMap::new();
        for r in inner.channels.values() {
            let target = &r.target;
            let frame = frames
                .entry((target.framing, target.topic.clone()))
                .or_insert_with(|| target.system_frame(status, message));
            target.outbox.push_notice(frame.clone());
        }
        inner.channels.len()
    }

    /// Number of channels with bindings.
    pub fn channel_count(&self) -> usize {
        self.inner.read().map(|i| i.channels.len()).unwrap_or(0)
    }

    /// Find the channels a change goes to (before authorization).
    pub fn route_owned(&self, change: &Change, scratch: &mut DispatchScratch) -> Routed {
        self.route(change, scratch, false)
    }

    /// [`Hub::route_owned`], narrowed by the relation's value gate ([`Hub::gate`]): a gated
    /// identity's channels are routed only when the row carries one of its keys. The row is
    /// the new row (INSERT, UPDATE) or the old row (DELETE); when it lacks a gated column's
    /// value (no old row, an unchanged TOAST value, NULL) the gate is not used for this
    /// change and every channel is routed, as without a gate.
    pub fn route_gated(&self, change: &Change, scratch: &mut DispatchScratch) -> Routed {
        self.route(change, scratch, true)
    }

    fn route(&self, change: &Change, scratch: &mut DispatchScratch, gated: bool) -> Routed {
        let mut routed = Routed::default();
        if change.kind == ChangeKind::Truncate {
            return routed;
        }
        let at = change.position();
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        self.advance(at);
        let gate = gated
            .then(|| inner.gates.get(&change.table.relation_id))
            .flatten()
            .filter(|g| !g.identities.is_empty());
        let row = match change.kind {
            ChangeKind::Delete => change.old_record.as_deref(),
            _ => change.record.as_deref(),
        };
        // Every gated column's text in the row, or no gating for this change.
        let keys: Option<Vec<(usize, &str)>> = gate.and_then(|g| {
            g.by_value
                .keys()
                .map(|&c| Some((c, row?.get(c)?.text()?)))
                .collect()
        });
        let mut gated_route = None;
        match (gate, keys) {
            (Some(g), Some(keys)) => {
                // The candidates: channels of the identities whose keys the row carries.
                let mut candidates: Vec<SubscriberId> = Vec::new();
                for (column, text) in keys {
                    let Some(ptrs) = g.by_value.get(&column).and_then(|v| v.get(text)) else {
                        continue;
                    };
                    for ptr in ptrs {
                        if let Some(subs) = inner.by_identity.get(ptr) {
                            candidates.extend_from_slice(subs);
                        }
                    }
                }
                candidates.sort_unstable();
                candidates.dedup();
                // Gated channels are exactly the skip set, and the ungated list excludes
                // it: the two lists are disjoint, each one distinct.
                candidates.retain(|s| g.skip.contains(s));
                let (schema, table) = (change.schema(), change.table_name());
                let mut ungated = g.ungated.lock().unwrap_or_else(|e| e.into_inner());
                let fresh = ungated.as_ref().is_some_and(|u| {
                    u.generation == inner.generation && u.schema == schema && u.table == table
                });
                if !fresh {
                    let mut subscribers = inner.index.subscribers_of_table(schema, table);
                    subscribers.retain(|s| !g.skip.contains(s));
                    *ungated = Some(Ungated {
                        generation: inner.generation,
                        schema: schema.to_owned(),
                        table: table.to_owned(),
                        subscribers,
                    });
                }
                let ungated_list = ungated.as_ref().map_or(&[][..], |u| &u.subscribers[..]);
                scratch.matches.clear();
                inner.index.matches_of_distinct(
                    change,
                    ungated_list.iter().chain(&candidates).copied(),
                    &mut scratch.matches,
                );
                gated_route = Some(g);
            }
            _ => inner.index.matches(change, &mut scratch.matches),
        }
        scratch.identity_index.clear();
        for m in scratch.matches.drain(..) {
            let Some(Registered { target, cursor }) = inner.channels.get(&m.subscriber) else {
                continue;
            };
            // Not even routed when it cannot be delivered (a stream read again after a
            // reconnection, a resumed channel's replay): no authorization work for it.
            if at <= *cursor.lock().unwrap_or_else(|e| e.into_inner()) {
                continue;
            }
            let ptr = Arc::as_ptr(&target.identity) as usize;
            let k = *scratch.identity_index.entry(ptr).or_insert_with(|| {
                routed.identities.push(target.identity.clone());
                routed
                    .via_gate
                    .push(gated_route.is_some_and(|g| g.identities.contains_key(&ptr)));
                (routed.identities.len() - 1) as u32
            });
            routed.routes.push((m, target.clone(), k));
        }
        routed
    }

    /// Queue the change to the routed channels, each trimmed to what `decide` grants its
    /// identity. Channels that left since routing get nothing.
    pub fn deliver_routed(
        &self,
        change: &Change,
        routed: Routed,
        scratch: &mut DispatchScratch,
        decide: impl Fn(usize) -> Access,
    ) -> DispatchStats {
        let mut stats = DispatchStats::default();
        scratch.data.clear();
        scratch.frames.clear();
        let at = change.position();
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        for (m, target, k) in routed.routes {
            // A channel that left since routing gets nothing. One that changed identity (a
            // new token) still gets what was routed before: it was judged for the token the
            // channel held when those changes committed.
            let Some(registered) = inner.channels.get(&m.subscriber) else {
                continue;
            };
            let Access::Allow(vis) = decide(k as usize) else {
                continue;
            };
            // At or below the cursor: delivered already (a stream read again after a
            // reconnection), or committed before the channel's floor.
            {
                let mut cursor = registered.cursor.lock().unwrap_or_else(|e| e.into_inner());
                if at <= *cursor {
                    continue;
                }
                *cursor = at;
            }
            let mut m = m;
            if let Some(mask) = &vis.columns {
                // The column mask narrowed since the binding was checked (a REVOKE): a filter
                // or selection on a column the identity cannot read would reveal it through
                // what matches, so such a binding is stopped and delivers nothing; the
                // channel's other bindings go on.
                let hidden = Self::hidden_columns_read(&inner.index, &m, change, mask);
                if !hidden.is_empty() {
                    for (id, col) in hidden {
                        m.binding_ids.retain(|b| *b != id);
                        scratch.revoked.push((m.subscriber, id, col));
                    }
                    if m.binding_ids.is_empty() {
                        continue;
                    }
                    m.select = Self::selection_of(&inner.index, &m, change);
                }
            }
            let key = (
                target.framing,
                target.topic.clone(),
                m.binding_ids,
                (m.select, vis),
            );
            let frame = match scratch.frames.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let data = match scratch.data.get(&key.3) {
                        Some(d) => d.clone(),
                        None => {
                            let d: Arc<str> = render_data_visible(
                                change,
                                key.3 .0.as_deref(),
                                &key.3 .1,
                                &self.config,
                            )
                            .into();
                            scratch.data.insert(key.3.clone(), d.clone());
                            d
                        }
                    };
                    let frame = match key.0 {
                        Framing::Phoenix(vsn) => {
                            let payload = outbound::postgres_changes(&key.2, &data);
                            OutFrame::text(encode_push(
                                vsn,
                                None,
                                None,
                                &key.1,
                                "postgres_changes",
                                &payload,
                            ))
                        }
                        Framing::Data => OutFrame::Text(Bytes::copy_from_slice(data.as_bytes())),
                    };
                    stats.encoded += 1;
                    scratch.frames.insert(key, frame.clone());
                    frame
                }
            };
            if target.outbox.push_at(at, change.xid, frame) {
                stats.delivered += 1;
            } else {
                stats.dropped += 1;
            }
        }
        drop(inner);
        for (subscriber, binding, column) in std::mem::take(&mut scratch.revoked) {
            self.stop_binding(
                subscriber,
                binding,
                &format!(
                    "permission denied for column {column}: this channel's token may no longer read it, so the binding that reads it was stopped"
                ),
            );
        }
        stats
    }

    /// `m`'s bindings that read a column `mask` hides, each with the first such column.
    fn hidden_columns_read(
        index: &SubscriptionIndex,
        m: &Match,
        change: &Change,
        mask: &[bool],
    ) -> Vec<(u32, String)> {
        let table = &change.table;
        let visible = |name: &str| {
            table
                .columns
                .iter()
                .position(|c| &*c.name == name)
                .is_some_and(|i| mask.get(i).copied().unwrap_or(false))
        };
        let mut out: Vec<(u32, String)> = Vec::new();
        for b in index.bindings_of(m.subscriber, &m.binding_ids, &table.schema, &table.name) {
            if let Some(c) = b.columns_read().find(|c| !visible(c)) {
                if !out.iter().any(|(id, _)| *id == b.id) {
                    out.push((b.id, c.to_owned()));
                }
            }
        }
        out
    }

    /// The column selection of `m`'s (remaining) bindings: all columns when any of them
    /// selects all, else their union in ascending binding id order.
    fn selection_of(index: &SubscriptionIndex, m: &Match, change: &Change) -> Option<Vec<String>> {
        let table = &change.table;
        let mut bindings: Vec<&Binding> = index
            .bindings_of(m.subscriber, &m.binding_ids, &table.schema, &table.name)
            .collect();
        bindings.sort_by_key(|b| b.id);
        let mut out: Vec<String> = Vec::new();
        for b in bindings {
            let sel = b.select.as_ref()?;
            for c in sel {
                if !out.contains(c) {
                    out.push(c.clone());
                }
            }
        }
        Some(out)
    }

    /// Stop one binding of a channel (its identity lost access to a column it reads): it is
    /// removed and the channel gets a `postgres_changes` system error. The channel's other
    /// bindings stay live.
    pub fn stop_binding(&self, id: SubscriberId, binding: u32, message: &str) -> bool {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        if inner.index.remove_binding(id, binding) == 0 {
            return false;
        }
        let Some(r) = inner.channels.get(&id) else {
            return false;
        };
        r.target.outbox.push_notice(
            r.target
                .system_frame(outbound::SystemStatus::Error, message),
        );
        true
    }

    /// Gate `identities` on relation `relid` (for [`Hub::route_gated`]): each one's channels
    /// get a change of the relation only when the row's text in one of its key columns
    /// equals that key. The caller guarantees that for every such change the identity's
    /// access would be `Deny` otherwise; it removes the gate ([`Hub::ungate`]) whenever that
    /// may stop holding (the table or its policies changed). Key columns index the change's
    /// columns as the relation is streamed now. Gating an identity again replaces its keys.
    pub fn gate(&self, relid: u32, identities: Vec<(Arc<Identity>, Vec<GateKey>)>) {
        if identities.is_empty() {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let inner = &mut *inner;
        inner.generation += 1;
        let gate = inner.gates.entry(relid).or_default();
        for (identity, keys) in identities {
            let ptr = Arc::as_ptr(&identity) as usize;
            // Only identities with channels (and so interned): a pointer never reused while
            // listed, and its channels known.
            let Some(subs) = inner.by_identity.get(&ptr) else {
                continue;
            };
            gate.remove_identity(ptr);
            for (column, text) in &keys {
                gate.by_value
                    .entry(*column)
                    .or_default()
                    .entry(text.clone())
                    .or_default()
                    .push(ptr);
            }
            gate.skip.extend(subs.iter().copied());
            gate.identities.insert(ptr, (identity, keys));
        }
    }

    /// Route every change of `relid` to every identity again (its policies may have changed).
    pub fn ungate(&self, relid: u32) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner.gates.remove(&relid);
    }

    /// [`Hub::ungate`] for every relation.
    pub fn ungate_all(&self) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner.gates.clear();
    }

    /// Collect identities as they get their first channel ([`Hub::take_arrivals`]), and call
    /// `wake` (under the hub lock: it must not block) when one does. For the pump, which
    /// derives a newcomer's claims values before its first row. A later call replaces
    /// `wake` (a pump started again).
    pub fn watch_arrivals(&self, wake: impl Fn() + Send + Sync + 'static) {
        *self.on_arrival.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(wake));
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.watching = true;
    }

    /// The identities that got their first channel since the last call (while watched).
    pub fn take_arrivals(&self) -> Vec<Arc<Identity>> {
        if !self
            .arrived
            .swap(false, std::sync::atomic::Ordering::Acquire)
        {
            return Vec::new();
        }
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut inner.arrivals)
    }

    /// Every (interned) identity that has a channel now.
    pub fn identities_with_channels(&self) -> Vec<Arc<Identity>> {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner
            .identities
            .iter()
            .filter(|i| {
                inner
                    .by_identity
                    .get(&(Arc::as_ptr(i) as usize))
                    .is_some_and(|subs| !subs.is_empty())
            })
            .cloned()
            .collect()
    }

    /// How many identities are gated on `relid`.
    pub fn gated(&self, relid: u32) -> usize {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        inner.gates.get(&relid).map_or(0, |g| g.identities.len())
    }

    /// Route and deliver to every matching channel, without authorization (tests, tools).
    pub fn dispatch(&self, change: &Change, scratch: &mut DispatchScratch) -> DispatchStats {
        let routed = self.route_owned(change, scratch);
        self.deliver_routed(change, routed, scratch, |_| Access::ALL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Value;
    use crate::change::{Column, Table};
    use crate::payload::render_data;
    use crate::subscription::EventFilter;
    use std::sync::Mutex;
    use walcast_pgoutput::{Lsn, ReplicaIdentity};

    #[derive(Default)]
    struct Sink {
        frames: Mutex<Vec<OutFrame>>,
        full: bool,
    }

    impl Outbox for Sink {
        fn push(&self, frame: OutFrame) -> bool {
            if self.full {
                return false;
            }
            self.frames.lock().unwrap().push(frame);
            true
        }
    }

    fn table(key: bool) -> Arc<Table> {
        Arc::new(Table {
            relation_id: 1,
            schema: "public".into(),
            name: "todos".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                Column {
                    name: "id".into(),
                    type_name: "int8".into(),
                    type_oid: 20,
                    is_key: key,
                },
                Column {
                    name: "title".into(),
                    type_name: "text".into(),
                    type_oid: 25,
                    is_key: false,
                },
            ]
            .into(),
        })
    }

    fn present(text: &str, json: &str) -> Value {
        Value::Present {
            text: text.into(),
            json: json.into(),
        }
    }

    /// Each test change commits after the previous one (the hub skips what it delivered).
    fn insert(table: Arc<Table>, title: &str) -> Change {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Change {
            table,
            kind: ChangeKind::Insert,
            commit_lsn: Lsn(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
            index_in_txn: 0,
            xid: 0,
            commit_time_us: 1_763_511_760_877_123,
            record: Some(vec![
                present("46", "46"),
                present(title, &format!("\"{title}\"")),
            ]),
            old_record: None,
        }
    }

    fn binding(id: u32) -> Binding {
        Binding {
            id,
            event: EventFilter::All,
            schema: "public".into(),
            table: "todos".into(),
            filter: None,
            select: None,
        }
    }

    fn target(sink: &Arc<Sink>, vsn: Vsn, topic: &str) -> ChannelTarget {
        ChannelTarget {
            outbox: sink.clone(),
            framing: Framing::Phoenix(vsn),
            after: None,
            topic: topic.into(),
            identity: Arc::new(Identity {
                role: "anon".into(),
                claims: "{}".into(),
            }),
        }
    }

    #[test]
    fn renders_supabase_shape_and_shares_frames() {
        let hub = Hub::new(HubConfig::default());
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        let c = Arc::new(Sink::default());
        hub.subscribe(
            1,
            target(&a, Vsn::V2, "realtime:room"),
            vec![binding(7)],
            || (),
        );
        hub.subscribe(
            2,
            target(&b, Vsn::V2, "realtime:room"),
            vec![binding(7)],
            || (),
        );
        hub.subscribe(
            3,
            target(&c, Vsn::V1, "realtime:room"),
            vec![binding(7), binding(9)],
            || (),
        );
        let mut scratch = DispatchScratch::default();
        let stats = hub.dispatch(&insert(table(true), "hi"), &mut scratch);
        assert_eq!(stats.delivered, 3);
        // Two distinct frames: V2 ids [7] (shared by a and b) and V1 ids [7, 9].
        assert_eq!(stats.encoded, 2);
        let fa = a.frames.lock().unwrap()[0].clone();
        let fb = b.frames.lock().unwrap()[0].clone();
        assert_eq!(fa, fb);
        let OutFrame::Text(bytes) = fa else { panic!() };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v[0], serde_json::Value::Null);
        assert_eq!(v[2], "realtime:room");
        assert_eq!(v[3], "postgres_changes");
        assert_eq!(
            v[4],
            serde_json::json!({"ids": [7], "data": {
                "schema": "public", "table": "todos", "type": "INSERT",
                "commit_timestamp": "2025-11-19T00:22:40.877Z",
                "columns": [{"name": "id", "type": "int8"}, {"name": "title", "type": "text"}],
                "record": {"id": 46, "title": "hi"}, "errors": null}})
        );
        let OutFrame::Text(bytes) = c.frames.lock().unwrap()[0].clone() else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["payload"]["ids"], serde_json::json!([7, 9]));
        assert_eq!(v["ref"], serde_json::Value::Null);
    }

    #[test]
    fn select_trims_columns_and_oversized_records_say_413() {
        let t = table(true);
        let change = insert(t.clone(), &"x".repeat(100));
        let select = vec!["id".to_string()];
        let data = render_data(&change, Some(&select), &HubConfig::default());
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            v["columns"],
            serde_json::json!([{"name": "id", "type": "int8"}])
        );
        assert_eq!(v["record"], serde_json::json!({"id": 46}));
        let data = render_data(
            &change,
            None,
            &HubConfig {
                max_record_bytes: 100,
            },
        );
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(v["record"], serde_json::json!({"id": 46}));
        assert_eq!(
            v["errors"],
            serde_json::json!(["Error 413: Payload Too Large"])
        );
    }

    #[test]
    fn no_primary_key_gets_the_400_error() {
        let data = render_data(&insert(table(false), "x"), None, &HubConfig::default());
        let v: serde_json::Value = serde_json::from_str(&data).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"schema": "public", "table": "todos", "type": "INSERT",
                "errors": ["Error 400: Bad Request, no primary key"]})
        );
    }

    #[test]
    fn full_outbox_counts_drops_and_unsubscribe_stops_delivery() {
        let hub = Hub::new(HubConfig::default());
        let full = Arc::new(Sink {
            full: true,
            ..Default::default()
        });
        let ok = Arc::new(Sink::default());
        hub.subscribe(
            1,
            target(&full, Vsn::V2, "realtime:a"),
            vec![binding(1)],
            || (),
        );
        hub.subscribe(
            2,
            target(&ok, Vsn::V2, "realtime:b"),
            vec![binding(1)],
            || (),
        );
        let mut scratch = DispatchScratch::default();
        let stats = hub.dispatch(&insert(table(true), "x"), &mut scratch);
        assert_eq!((stats.delivered, stats.dropped), (1, 1));
        hub.unsubscribe(2);
        let stats = hub.dispatch(&insert(table(true), "y"), &mut scratch);
        assert_eq!((stats.delivered, stats.dropped), (0, 1));
        assert_eq!(ok.frames.lock().unwrap().len(), 1);
    }

    #[test]
    fn route_reports_identities_and_deliver_applies_the_decision() {
        let hub = Hub::new(HubConfig::default());
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        let mut tb = target(&b, Vsn::V2, "realtime:b");
        tb.identity = Arc::new(Identity {
            role: "authenticated".into(),
            claims: "{}".into(),
        });
        hub.subscribe(
            1,
            target(&a, Vsn::V2, "realtime:a"),
            vec![binding(1)],
            || (),
        );
        hub.subscribe(2, tb, vec![binding(1)], || ());
        let mut scratch = DispatchScratch::default();
        let change = insert(table(true), "x");
        let routed = hub.route_owned(&change, &mut scratch);
        let ids = routed.identities().to_vec();
        let roles: Vec<&str> = ids.iter().map(|i| &*i.role).collect();
        assert_eq!(roles, ["anon", "authenticated"]);
        let stats = hub.deliver_routed(&change, routed, &mut scratch, |i| {
            if &*ids[i].role == "authenticated" {
                Access::ALL
            } else {
                Access::Deny
            }
        });
        assert_eq!(stats.delivered, 1);
        assert!(a.frames.lock().unwrap().is_empty());
        assert_eq!(b.frames.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_value_gate_routes_a_row_only_to_the_identities_whose_value_it_carries() {
        let hub = Hub::new(HubConfig::default());
        let sinks: Vec<Arc<Sink>> = (0..3).map(|_| Arc::new(Sink::default())).collect();
        for (k, sink) in sinks.iter().enumerate() {
            let mut t = target(sink, Vsn::V2, &format!("realtime:{k}"));
            t.identity = Arc::new(Identity {
                role: "authenticated".into(),
                claims: format!("{{\"sub\":\"u{k}\"}}").into(),
            });
            hub.subscribe(k as u64 + 1, t, vec![binding(1)], || ());
        }
        let mut scratch = DispatchScratch::default();
        let routed = hub.route_gated(&insert(table(true), "u1"), &mut scratch);
        let ids = routed.identities().to_vec();
        assert_eq!(ids.len(), 3, "no gate yet: everyone");
        // u0 and u1 gated on column 1 (title) with their own value; u2 stays ungated.
        hub.gate(
            1,
            vec![
                (ids[0].clone(), vec![(1, "u0".into())]),
                (ids[1].clone(), vec![(1, "u1".into())]),
            ],
        );
        assert_eq!(hub.gated(1), 2);
        let claims = |r: &Routed| -> Vec<String> {
            let mut c: Vec<String> = r
                .identities()
                .iter()
                .map(|i| i.claims.to_string())
                .collect();
            c.sort();
            c
        };
        let r = hub.route_gated(&insert(table(true), "u1"), &mut scratch);
        assert_eq!(claims(&r), [r#"{"sub":"u1"}"#, r#"{"sub":"u2"}"#]);
        // u1 came through the gate (gated already), u2 through the ungated list.
        for (k, identity) in r.identities().iter().enumerate() {
            assert_eq!(r.via_gate(k), &*identity.claims == r#"{"sub":"u1"}"#);
        }
        let r = hub.route_gated(&insert(table(true), "nobody"), &mut scratch);
        assert_eq!(claims(&r), [r#"{"sub":"u2"}"#]);
        // Without the gate (route_owned) and for a row without the column's value: everyone.
        assert_eq!(
            hub.route_owned(&insert(table(true), "x"), &mut scratch)
                .identities()
                .len(),
            3
        );
        let mut null_row = insert(table(true), "u1");
        null_row.record.as_mut().unwrap()[1] = Value::Null;
        assert_eq!(
            hub.route_gated(&null_row, &mut scratch).identities().len(),
            3
        );
        // A channel joining with a gated identity is gated too; one leaving drops its identity.
        let mut t = target(&sinks[0], Vsn::V2, "realtime:again");
        t.identity = Arc::new(Identity {
            role: "authenticated".into(),
            claims: r#"{"sub":"u0"}"#.into(),
        });
        hub.subscribe(9, t, vec![binding(1)], || ());
        let r = hub.route_gated(&insert(table(true), "u0"), &mut scratch);
        assert_eq!(r.len(), 3, "u2's channel and both of u0's");
        // A new ungated channel is routed too (the ungated list follows every change).
        let mut t = target(&sinks[2], Vsn::V2, "realtime:late");
        t.identity = Arc::new(Identity {
            role: "authenticated".into(),
            claims: r#"{"sub":"u7"}"#.into(),
        });
        hub.subscribe(10, t, vec![binding(1)], || ());
        let r = hub.route_gated(&insert(table(true), "u0"), &mut scratch);
        assert_eq!(r.len(), 4, "u2's, u7's and both of u0's");
        hub.unsubscribe(10);
        hub.unsubscribe(2);
        assert_eq!(hub.gated(1), 1);
        hub.ungate(1);
        assert_eq!(
            hub.route_gated(&insert(table(true), "q"), &mut scratch)
                .len(),
            3
        );
    }

    #[test]
    fn arrivals_are_collected_once_per_identity_while_watched() {
        let hub = Hub::new(HubConfig::default());
        let sink = Arc::new(Sink::default());
        let join = |id: u64, sub: &str| {
            let mut t = target(&sink, Vsn::V2, &format!("realtime:{id}"));
            t.identity = Arc::new(Identity {
                role: "authenticated".into(),
                claims: format!("{{\"sub\":\"{sub}\"}}").into(),
            });
            hub.subscribe(id, t, vec![binding(1)], || ());
        };
        join(1, "a");
        assert!(
            hub.take_arrivals().is_empty(),
            "not collected unless watched"
        );
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let w = woken.clone();
        hub.watch_arrivals(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        });
        join(2, "b");
        join(3, "b");
        join(4, "a");
        let arrived: Vec<String> = hub
            .take_arrivals()
            .iter()
            .map(|i| i.claims.to_string())
            .collect();
        assert_eq!(arrived, [r#"{"sub":"b"}"#], "b's first channel only");
        assert_eq!(woken.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(hub.take_arrivals().is_empty());
        assert_eq!(hub.identities_with_channels().len(), 2);
    }

    fn routed_pair(hub: &Hub) -> (Arc<Sink>, Arc<Sink>) {
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        hub.subscribe(
            1,
            target(&a, Vsn::V2, "realtime:a"),
            vec![binding(1)],
            || (),
        );
        hub.subscribe(
            2,
            target(&b, Vsn::V2, "realtime:b"),
            vec![binding(1)],
            || (),
        );
        (a, b)
    }

    fn data_of(frame: &OutFrame) -> serde_json::Value {
        let OutFrame::Text(bytes) = frame else {
            panic!("text frame expected")
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        v[4]["data"].clone()
    }

    #[test]
    fn visibility_trims_columns_and_old_record() {
        let t = table(true);
        let mut change = insert(t, "secret");
        change.kind = ChangeKind::Update;
        change.old_record = Some(vec![present("46", "46"), present("old", "\"old\"")]);
        let only_id = Visibility {
            columns: Some(Arc::from(vec![true, false])),
            old_record: true,
        };
        let v: serde_json::Value = serde_json::from_str(&render_data_visible(
            &change,
            None,
            &only_id,
            &HubConfig::default(),
        ))
        .unwrap();
        assert_eq!(
            v["columns"],
            serde_json::json!([{"name": "id", "type": "int8"}])
        );
        assert_eq!(v["record"], serde_json::json!({"id": 46}));
        assert_eq!(v["old_record"], serde_json::json!({"id": 46}));
        let new_only = Visibility {
            columns: None,
            old_record: false,
        };
        let v: serde_json::Value = serde_json::from_str(&render_data_visible(
            &change,
            None,
            &new_only,
            &HubConfig::default(),
        ))
        .unwrap();
        assert_eq!(
            v["record"],
            serde_json::json!({"id": 46, "title": "secret"})
        );
        assert_eq!(v["old_record"], serde_json::json!({"id": 46}));
        let no_key = Visibility {
            columns: Some(Arc::from(vec![false, true])),
            old_record: true,
        };
        let v: serde_json::Value = serde_json::from_str(&render_data_visible(
            &change,
            None,
            &no_key,
            &HubConfig::default(),
        ))
        .unwrap();
        assert_eq!(v["errors"], serde_json::json!(["Error 401: Unauthorized"]));
        assert!(v.get("record").is_none());
    }

    #[test]
    fn deliver_routed_renders_per_visibility_and_denies_per_identity() {
        let hub = Hub::new(HubConfig::default());
        let (a, b) = routed_pair(&hub);
        let mut scratch = DispatchScratch::default();
        let change = insert(table(true), "x");
        let routed = hub.route_owned(&change, &mut scratch);
        // Equal role and claims in separate Arcs: interned into one identity.
        assert_eq!(routed.identities().len(), 1);
        assert_eq!(routed.subscribers_of(0), vec![1, 2]);
        let mask = Visibility {
            columns: Some(Arc::from(vec![true, false])),
            old_record: true,
        };
        let stats = hub.deliver_routed(&change, routed, &mut scratch, |_| {
            Access::Allow(mask.clone())
        });
        assert_eq!((stats.delivered, stats.encoded), (2, 2));
        assert_eq!(
            data_of(&a.frames.lock().unwrap()[0])["record"],
            serde_json::json!({"id": 46})
        );
        let routed = hub.route_owned(&change, &mut scratch);
        let stats = hub.deliver_routed(&change, routed, &mut scratch, |_| Access::Deny);
        assert_eq!(stats.delivered, 0);
        assert_eq!(b.frames.lock().unwrap().len(), 1);
    }

    #[test]
    fn routes_go_stale_when_a_channel_leaves_but_not_when_its_token_changes() {
        let hub = Hub::new(HubConfig::default());
        let (a, b) = routed_pair(&hub);
        let mut scratch = DispatchScratch::default();
        let change = insert(table(true), "x");
        let routed = hub.route_owned(&change, &mut scratch);
        hub.unsubscribe(1);
        // Channel 2 re-subscribes with a new token: what was routed before the switch still
        // reaches it (the pump keeps it in order with what follows).
        let mut tb = target(&b, Vsn::V2, "realtime:b");
        tb.identity = Arc::new(Identity {
            role: "anon".into(),
            claims: "{\"sub\":\"other\"}".into(),
        });
        hub.subscribe(2, tb, vec![binding(1)], || ());
        let stats = hub.deliver_routed(&change, routed, &mut scratch, |_| Access::ALL);
        assert_eq!(stats.delivered, 1);
        assert!(a.frames.lock().unwrap().is_empty());
        assert_eq!(b.frames.lock().unwrap().len(), 1);
    }

    #[test]
    fn an_identity_can_be_taken_out_of_a_routing() {
        let hub = Hub::new(HubConfig::default());
        let a = Arc::new(Sink::default());
        let b = Arc::new(Sink::default());
        let mut tb = target(&b, Vsn::V2, "realtime:b");
        tb.identity = Arc::new(Identity {
            role: "authenticated".into(),
            claims: "{}".into(),
        });
        hub.subscribe(
            1,
            target(&a, Vsn::V2, "realtime:a"),
            vec![binding(1)],
            || (),
        );
        hub.subscribe(2, tb, vec![binding(1)], || ());
        let mut scratch = DispatchScratch::default();
        let change = insert(table(true), "x");
        let mut routed = hub.route_owned(&change, &mut scratch);
        let taken = routed.take_identity(1);
        assert_eq!((routed.len(), taken.len()), (1, 1));
        assert_eq!(&*taken.identities()[0].role, "authenticated");
        assert_eq!(routed.identities().len(), 2, "indexes keep their meaning");
        let stats = hub.deliver_routed(&change, routed, &mut scratch, |_| Access::ALL);
        assert_eq!(stats.delivered, 1);
        assert_eq!(a.frames.lock().unwrap().len(), 1);
        let stats = hub.deliver_routed(&change, taken, &mut scratch, |k| {
            assert_eq!(k, 0);
            Access::ALL
        });
        assert_eq!(stats.delivered, 1);
        assert_eq!(b.frames.lock().unwrap().len(), 1);
        assert!(Routed::default().take_identity(3).is_empty());
        // The same in one pass over several identities (for the next change: this one was
        // delivered, so it is not routed again).
        let change = insert(table(true), "y");
        let mut routed = hub.route_owned(&change, &mut scratch);
        let parts = routed.split_off(&[false, true]);
        assert!(parts[0].is_none());
        assert_eq!(parts[1].as_ref().map(Routed::len), Some(1));
        assert_eq!(routed.len(), 1);
    }

    #[test]
    fn each_channel_gets_each_position_once_and_nothing_before_its_floor() {
        let hub = Hub::new(HubConfig::default());
        let early = Arc::new(Sink::default());
        hub.subscribe(
            1,
            target(&early, Vsn::V2, "realtime:a"),
            vec![binding(1)],
            || (),
        );
        let mut scratch = DispatchScratch::default();
        let first = insert(table(true), "first");
        let second = insert(table(true), "second");
        assert_eq!(hub.dispatch(&first, &mut scratch).delivered, 1);
        // A channel joined now starts after what was routed: a stream read again after a
        // reconnection does not hand it `first`.
        let late = Arc::new(Sink::default());
        hub.subscribe(
            2,
            target(&late, Vsn::V2, "realtime:b"),
            vec![binding(1)],
            || (),
        );
        // A resumed channel starts where it left off.
        let resumed = Arc::new(Sink::default());
        let mut t = target(&resumed, Vsn::V2, "realtime:c");
        t.after = Some(Position::just_before(first.commit_lsn));
        hub.subscribe(3, t, vec![binding(1)], || ());
        assert_eq!(
            hub.dispatch(&first, &mut scratch).delivered,
            1,
            "only the resumed one"
        );
        assert_eq!(hub.dispatch(&second, &mut scratch).delivered, 3);
        assert_eq!(
            hub.dispatch(&second, &mut scratch).delivered,
            0,
            "never twice"
        );
        let count = |s: &Arc<Sink>| s.frames.lock().unwrap().len();
        assert_eq!((count(&early), count(&late), count(&resumed)), (2, 1, 2));
        // A new token (subscribing again under the same id) keeps the channel's place.
        hub.subscribe(
            2,
            target(&late, Vsn::V2, "realtime:b"),
            vec![binding(1)],
            || (),
        );
        assert_eq!(hub.cursor(2), Some(second.position()));
        assert_eq!(hub.dispatch(&second, &mut scratch).delivered, 0);
        assert_eq!(hub.routed_through(), second.position());
    }

    #[test]
    fn fail_stops_one_channel_with_a_system_error() {
        let hub = Hub::new(HubConfig::default());
        let (a, b) = routed_pair(&hub);
        assert!(hub.fail(1, "policy failed"));
        assert!(!hub.fail(1, "again"));
        let mut scratch = DispatchScratch::default();
        let stats = hub.dispatch(&insert(table(true), "x"), &mut scratch);
        assert_eq!(stats.delivered, 1);
        let frames = a.frames.lock().unwrap();
        assert_eq!(frames.len(), 1);
        let OutFrame::Text(bytes) = &frames[0] else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(bytes).unwrap();
        assert_eq!(v[3], "system");
        assert_eq!(v[4]["status"], "error");
        assert_eq!(v[4]["extension"], "postgres_changes");
        assert_eq!(v[4]["message"], "policy failed");
        assert_eq!(b.frames.lock().unwrap().len(), 1);
    }
}
