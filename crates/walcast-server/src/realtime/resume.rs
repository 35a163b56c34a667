//! Session resume: a channel of a socket opened with `session_id` outlives its socket for a
//! window, buffering what it matches, and a rejoin under the same session takes it over with
//! nothing lost.
//!
//! ```text
//!  hub / topics ──push_at(pos)──▶ Resumable (the channel's outbox, one per session channel)
//!                                  │ Live(socket): forward to the socket's queue, and keep in
//!                                  │   `tail` what was sent since the client's last frame
//!                                  │ Parked (socket gone, no phx_leave): keep in `tail`
//!  client frame (any) ─ ack ──────▶│   tail cleared: the client was alive after those
//!  rejoin, same session + who + topic + bindings ─ attach ─▶ reply, tail replayed, Live
//!  window over / buffer over its bound ─▶ dropped; the rejoin gets `ResyncRequired`
//! ```
//!
//! Invariants:
//! - A resumed channel receives, after its join reply, every positioned delivery (changes,
//!   database broadcasts) and change-stream notice its bindings matched since the client's
//!   last frame on the old socket, in commit order, then live ones: no gap. What came before
//!   that frame is never repeated; what came after it may be (the server cannot know whether
//!   it arrived).
//! - One hub subscriber (and topic member) per session channel, kept across sockets, so the
//!   hub's per-channel cursor carries over and nothing routed while parked is lost or doubled.
//! - A session belongs to one identity ([`who_of`]): the same id presented by another
//!   identity is another session and never sees this one's buffer.
//! - Memory is bounded: per session by `--resume-buffer-bytes`, server-wide by
//!   [`SessionLimits::total_bytes`] and [`SessionLimits::max_parked`]; past a bound the
//!   session is marked lost (its rejoin is told to resync) rather than growing.
//! - Client broadcasts and presence are not resumable: a parked channel drops them, and its
//!   presence leaves when it parks.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use walcast_core::hub::{Identity, OutFrame, Outbox};
use walcast_core::subscription::SubscriberId;
use walcast_core::Position;
use walcast_protocol::Vsn;

use crate::metrics;
use crate::realtime::outbox::SocketOutbox;

/// Shortest and longest `session_id`.
pub const SESSION_ID_LEN: std::ops::RangeInclusive<usize> = 8..=128;
/// Expired sessions are remembered this many windows, to tell a late rejoin to resync.
const REMEMBER_WINDOWS: u32 = 10;

/// Whether `id` is an acceptable `session_id`: 8 to 128 URL-safe characters.
pub fn valid_session_id(id: &str) -> bool {
    SESSION_ID_LEN.contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

/// Who a session belongs to: the token's role and `sub`, or (without a `sub`) its role and
/// claims minus the fields a refreshed token changes.
pub fn who_of(identity: &Identity) -> Arc<str> {
    let claims: Option<serde_json::Map<String, serde_json::Value>> =
        serde_json::from_str(&identity.claims).ok();
    let Some(mut claims) = claims else {
        return Arc::from(format!(
            "{}\u{1f}raw\u{1f}{}",
            identity.role, identity.claims
        ));
    };
    if let Some(sub) = claims.get("sub").and_then(|s| s.as_str()) {
        return Arc::from(format!("{}\u{1f}sub\u{1f}{sub}", identity.role));
    }
    for volatile in ["exp", "iat", "nbf", "jti"] {
        claims.remove(volatile);
    }
    // serde_json's map is ordered by key: the rendering is canonical.
    let rest = serde_json::Value::Object(claims).to_string();
    Arc::from(format!("{}\u{1f}claims\u{1f}{rest}", identity.role))
}

/// A session: the client's id and who presented it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub id: Arc<str>,
    pub who: Arc<str>,
}

/// What a rejoin must repeat to resume a channel: the same frames (serializer), the same
/// kind of topic and the same postgres_changes entries (in any order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelSpec {
    pub vsn: Vsn,
    pub private: bool,
    /// The raw JSON of each postgres_changes entry, sorted.
    pub entries: Vec<String>,
}

impl ChannelSpec {
    pub fn new(vsn: Vsn, private: bool, entries: &[walcast_protocol::PostgresBinding]) -> Self {
        let mut entries: Vec<String> = entries.iter().map(|e| e.raw.get().to_owned()).collect();
        entries.sort();
        ChannelSpec {
            vsn,
            private,
            entries,
        }
    }
}

/// Bounds of the resume machinery.
#[derive(Debug, Clone)]
pub struct SessionLimits {
    /// How long a channel outlives its socket (`--resume-window-secs`).
    pub window: Duration,
    /// Bytes one session may buffer (`--resume-buffer-bytes`).
    pub session_bytes: usize,
    /// Bytes all sessions together may buffer.
    pub total_bytes: usize,
    /// Most channels parked at once, server-wide.
    pub max_parked: usize,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            window: Duration::from_secs(120),
            session_bytes: 1 << 20,
            total_bytes: 256 << 20,
            max_parked: 10_000,
        }
    }
}

/// Why a rejoin cannot resume what its session had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lost {
    /// The window ran out before the client came back.
    Expired,
    /// More was buffered than the session may hold.
    Overflow,
    /// The rejoin asked for other bindings (or another serializer, or privacy).
    Changed,
    /// The server could not keep the session (restarted without its record, too many parked).
    Dropped,
    /// The token the parked channel was authorized with expired: nothing after that is
    /// delivered on its authority.
    TokenExpired,
    /// Cluster mode: the session was resumed on another node, which took it over.
    Moved,
    /// Cluster mode: what the session missed is no longer in the cluster's change stream
    /// (trimmed, or Redis lost it).
    Trimmed,
}

impl Lost {
    /// The `system` message the rejoined channel gets.
    pub fn message(self) -> &'static str {
        match self {
            Lost::Expired => "ResyncRequired: this session was away longer than the resume window, so changes committed meanwhile were not kept; refetch your data",
            Lost::Overflow => "ResyncRequired: more changes matched while this session was away than its resume buffer holds; refetch your data",
            Lost::Changed => "ResyncRequired: the channel was rejoined with different postgres_changes bindings, so what the old ones buffered was dropped; refetch your data",
            Lost::Dropped => "ResyncRequired: the server could not keep this session while it was away; refetch your data",
            Lost::TokenExpired => "ResyncRequired: the token this session was authorized with expired while it was away, so nothing more was kept for it; refetch your data",
            Lost::Moved => "ResyncRequired: this session was resumed on another walcast node, which took it over; refetch your data",
            Lost::Trimmed => "ResyncRequired: the changes this session missed are no longer in the cluster's change stream; refetch your data",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Lost::Expired => "expired",
            Lost::Overflow => "overflow",
            Lost::Changed => "changed",
            Lost::Dropped => "dropped",
            Lost::TokenExpired => "token_expired",
            Lost::Moved => "moved",
            Lost::Trimmed => "trimmed",
        }
    }
}

enum Mode {
    /// Attached to a socket (identified by its generation).
    Live {
        outbox: Arc<SocketOutbox>,
        socket: u64,
    },
    Parked {
        since: Instant,
    },
    /// Left, expired or taken out: pushes are dropped.
    Closed,
}

struct State {
    mode: Mode,
    /// Deliveries since the client's last frame (live) or since then and while parked, each
    /// with its position (`Position::ZERO` for a change-stream notice).
    tail: VecDeque<(Position, OutFrame)>,
    tail_bytes: usize,
    /// Last position pushed: a position is never pushed twice.
    last: Position,
    /// Last position pushed before the client's last frame: what it has surely seen.
    acked: Position,
    lost: Option<Lost>,
}

/// One session channel's outbox, kept across sockets.
pub struct Resumable {
    /// Hub subscriber and topic member id, for the channel's whole life.
    pub id: SubscriberId,
    pub key: SessionKey,
    pub topic: Arc<str>,
    pub spec: ChannelSpec,
    state: Mutex<State>,
    /// Who its deliveries are authorized as, and whether it receives broadcasts: what a
    /// restarted server needs to restore it.
    meta: Mutex<Meta>,
    session_bytes: Arc<AtomicUsize>,
    shared: Arc<Shared>,
}

/// See [`Resumable::meta`].
#[derive(Clone)]
pub struct Meta {
    pub identity: Arc<Identity>,
    pub broadcast: bool,
}

/// Server-wide bounds and gauges shared by every resumable channel.
struct Shared {
    limits: SessionLimits,
    bytes: AtomicUsize,
    parked: AtomicUsize,
    /// Woken when a new channel took its place in the stream (the store records it at once).
    started: tokio::sync::Notify,
}

impl Resumable {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn meta(&self) -> Meta {
        self.meta.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_meta(&self, meta: Meta) {
        *self.meta.lock().unwrap_or_else(|p| p.into_inner()) = meta;
    }

    /// The channel starts after `floor` (its join's place in the stream).
    pub fn start_at(&self, floor: Position) {
        let mut s = self.lock();
        s.last = floor;
        s.acked = floor;
        drop(s);
        self.shared.started.notify_one();
    }

    /// The last position the client has surely seen (persisted for restarts).
    pub fn acked(&self) -> Position {
        self.lock().acked
    }

    /// The last position pushed.
    pub fn last(&self) -> Position {
        self.lock().last
    }

    /// Whether the channel is parked, and since when.
    pub fn parked_since(&self) -> Option<Instant> {
        match self.lock().mode {
            Mode::Parked { since } => Some(since),
            _ => None,
        }
    }

    pub fn lost(&self) -> Option<Lost> {
        self.lock().lost
    }

    /// The client sent a frame on `socket`: it has seen what was pushed before it arrived,
    /// and everything at or below `delivered` (every change there was pushed already, to
    /// this channel if it matched).
    pub fn ack(&self, socket: u64, delivered: Position) {
        let mut s = self.lock();
        if matches!(s.mode, Mode::Live { socket: owner, .. } if owner == socket) {
            s.acked = s.last.max(delivered);
            s.last = s.acked;
            self.clear_tail(&mut s);
        }
    }

    fn clear_tail(&self, s: &mut State) {
        if s.tail_bytes > 0 {
            self.session_bytes.fetch_sub(s.tail_bytes, Ordering::AcqRel);
            self.shared.bytes.fetch_sub(s.tail_bytes, Ordering::AcqRel);
            metrics::resume_buffered_bytes(-(s.tail_bytes as f64));
        }
        s.tail = VecDeque::new();
        s.tail_bytes = 0;
    }

    /// Whether `socket` owns the channel now.
    pub fn owned_by(&self, socket: u64) -> bool {
        matches!(self.lock().mode, Mode::Live { socket: owner, .. } if owner == socket)
    }

    /// The socket owning the channel went away without leaving: park it. False when another
    /// socket has taken it over since (or it is closed).
    fn park(&self, socket: u64, now: Instant) -> bool {
        let mut s = self.lock();
        match s.mode {
            Mode::Live { socket: owner, .. } if owner == socket => {
                s.mode = Mode::Parked { since: now };
                true
            }
            _ => false,
        }
    }

    /// Attach to a new socket: `before` queues the join reply, then the buffered frames follow
    /// (they may exceed the socket's queue bound: they are already in memory), then live
    /// ones. Returns how many frames were replayed.
    pub fn attach(&self, outbox: Arc<SocketOutbox>, socket: u64, before: impl FnOnce()) -> usize {
        let mut s = self.lock();
        if matches!(s.mode, Mode::Parked { .. }) {
            self.shared.parked.fetch_sub(1, Ordering::AcqRel);
            metrics::sessions_parked_now(-1.0);
        }
        before();
        let replayed = s.tail.len();
        outbox.push_unbounded(s.tail.iter().map(|(_, f)| f.clone()));
        s.mode = Mode::Live { outbox, socket };
        replayed
    }

    /// Put `frames` (what the channel missed, in commit order, replayed from the cluster's
    /// change stream) before what it buffered since. A buffered delivery whose position is
    /// among them was routed live while the replay was read: the replay's copy stands.
    /// Within the session's bounds, like any buffering.
    pub fn prepend_replay(&self, frames: Vec<(Position, OutFrame)>) {
        let limits = &self.shared.limits;
        let mut s = self.lock();
        if s.lost.is_some() || matches!(s.mode, Mode::Closed) {
            return;
        }
        let replayed: std::collections::HashSet<Position> =
            frames.iter().map(|(at, _)| *at).collect();
        let later: Vec<(Position, OutFrame)> = s
            .tail
            .drain(..)
            .filter(|(at, _)| !replayed.contains(at))
            .collect();
        let kept = s.tail_bytes;
        self.clear_tail_bytes(&mut s, kept);
        if let Some(newest) = frames.iter().map(|(at, _)| *at).max() {
            s.last = s.last.max(newest);
        }
        for (at, frame) in frames.into_iter().chain(later) {
            self.keep(&mut s, at, &frame, limits);
        }
    }

    /// What the channel missed cannot be replayed: its rejoin is told to resync.
    pub fn set_lost(&self, why: Lost) {
        let mut s = self.lock();
        s.lost = Some(why);
        self.clear_tail(&mut s);
    }

    fn clear_tail_bytes(&self, s: &mut State, bytes: usize) {
        if bytes > 0 {
            self.session_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.shared.bytes.fetch_sub(bytes, Ordering::AcqRel);
            metrics::resume_buffered_bytes(-(bytes as f64));
        }
        s.tail_bytes = 0;
    }

    fn close(&self) {
        let mut s = self.lock();
        if matches!(s.mode, Mode::Parked { .. }) {
            self.shared.parked.fetch_sub(1, Ordering::AcqRel);
            metrics::sessions_parked_now(-1.0);
        }
        s.mode = Mode::Closed;
        self.clear_tail(&mut s);
    }

    /// Keep a frame for replay, within the session's and the server's bounds.
    fn keep(&self, s: &mut State, at: Position, frame: &OutFrame, limits: &SessionLimits) {
        if s.lost.is_some() {
            return;
        }
        let len = frame.len();
        let session = self.session_bytes.fetch_add(len, Ordering::AcqRel) + len;
        let total = self.shared.bytes.fetch_add(len, Ordering::AcqRel) + len;
        s.tail.push_back((at, frame.clone()));
        s.tail_bytes += len;
        metrics::resume_buffered_bytes(len as f64);
        if session > limits.session_bytes || total > limits.total_bytes {
            tracing::info!(topic = ?self.topic, session_bytes = session, total_bytes = total,
                "a session's resume buffer is full: it will have to resync");
            s.lost = Some(Lost::Overflow);
            self.clear_tail(s);
        }
    }

    fn push_inner(&self, frame: OutFrame, at: Option<Position>, replayable: bool) -> bool {
        let limits = &self.shared.limits;
        let mut s = self.lock();
        if let Some(at) = at {
            if at <= s.last {
                return true;
            }
            s.last = at;
        }
        match &s.mode {
            Mode::Live { outbox, .. } => {
                let outbox = outbox.clone();
                if replayable {
                    self.keep(&mut s, at.unwrap_or(Position::ZERO), &frame, limits);
                }
                // Forwarded under the lock: frames reach the socket in push order, and an
                // attach never interleaves with a push.
                outbox.push(frame);
                true
            }
            Mode::Parked { .. } => {
                if replayable {
                    self.keep(&mut s, at.unwrap_or(Position::ZERO), &frame, limits);
                }
                true
            }
            Mode::Closed => false,
        }
    }
}

impl Outbox for Resumable {
    /// Client broadcasts and presence: forwarded while live, dropped while parked.
    fn push(&self, frame: OutFrame) -> bool {
        self.push_inner(frame, None, false)
    }

    /// Change-stream notices are part of what a resumed channel replays.
    fn push_notice(&self, frame: OutFrame) -> bool {
        self.push_inner(frame, None, true)
    }

    fn push_at(&self, at: Position, _xid: u32, frame: OutFrame) -> bool {
        self.push_inner(frame, Some(at), true)
    }
}

/// What a rejoin under a session gets.
pub enum Claim {
    /// Take this channel over.
    Resume(Arc<Resumable>),
    /// Start afresh. `lost` says why nothing could be resumed when something should have
    /// been; `discard` is an earlier channel of the session to unsubscribe.
    Fresh {
        lost: Option<Lost>,
        discard: Option<Arc<Resumable>>,
    },
}

#[derive(Default)]
struct Session {
    channels: Vec<Arc<Resumable>>,
    bytes: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<SessionKey, Session>,
    /// Channels whose window ran out (or that were dropped), remembered until the instant.
    lost: HashMap<(SessionKey, Arc<str>), (Lost, Instant)>,
    /// The last run's records were lost (Postgres recovered from a crash and emptied its
    /// unlogged table): until this instant, a session channel nobody knows may be one of
    /// them, so its join is told to resync rather than silently start after a gap.
    records_lost_until: Option<Instant>,
}

/// Every session with channels, live or parked.
pub struct Sessions {
    registry: Mutex<Registry>,
    shared: Arc<Shared>,
}

impl Sessions {
    pub fn new(limits: SessionLimits) -> Sessions {
        Sessions {
            registry: Mutex::default(),
            shared: Arc::new(Shared {
                limits,
                bytes: AtomicUsize::new(0),
                parked: AtomicUsize::new(0),
                started: tokio::sync::Notify::new(),
            }),
        }
    }

    /// Completes after a new channel took its place in the stream since the last call.
    pub async fn registered(&self) {
        self.shared.started.notified().await
    }

    pub fn limits(&self) -> &SessionLimits {
        &self.shared.limits
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The records of the last run are gone: for one window, unknown session channels
    /// may have been among them.
    pub fn records_lost(&self, now: Instant) {
        self.lock().records_lost_until = Some(now + self.shared.limits.window);
    }

    /// A join under `key` for `topic` with `spec`.
    pub fn claim(&self, key: &SessionKey, topic: &str, spec: &ChannelSpec) -> Claim {
        let mut reg = self.lock();
        let unknown = reg
            .records_lost_until
            .is_some_and(|until| Instant::now() < until)
            .then_some(Lost::Dropped);
        let remembered = reg
            .lost
            .remove(&(key.clone(), Arc::from(topic)))
            .map(|(why, _)| why)
            .or(unknown);
        let Some(session) = reg.sessions.get_mut(key) else {
            return Claim::Fresh {
                lost: remembered,
                discard: None,
            };
        };
        let Some(i) = session.channels.iter().position(|r| &*r.topic == topic) else {
            return Claim::Fresh {
                lost: remembered,
                discard: None,
            };
        };
        let r = session.channels[i].clone();
        let why = r
            .lost()
            .or_else(|| (r.spec != *spec).then_some(Lost::Changed));
        match why {
            None => Claim::Resume(r),
            Some(why) => {
                session.channels.swap_remove(i);
                if session.channels.is_empty() {
                    reg.sessions.remove(key);
                }
                r.close();
                Claim::Fresh {
                    lost: Some(why),
                    discard: Some(r),
                }
            }
        }
    }

    /// Whether this node has channels of `key` (live, parked or lost).
    pub fn has(&self, key: &SessionKey) -> bool {
        self.lock().sessions.contains_key(key)
    }

    /// Cluster mode: another node took the session over. Its channels here are closed and
    /// returned (the caller unsubscribes them); a rejoin here is told it moved.
    pub fn hand_over(&self, key: &SessionKey, now: Instant) -> Vec<Arc<Resumable>> {
        let mut reg = self.lock();
        let channels = reg
            .sessions
            .get(key)
            .map(|s| s.channels.clone())
            .unwrap_or_default();
        for r in &channels {
            self.remember(&mut reg, r, Lost::Moved, now);
        }
        channels
    }

    /// Remember that a rejoin of `key` on `topic` must resync (a take-over failed).
    pub fn note_lost(&self, key: &SessionKey, topic: Arc<str>, why: Lost, now: Instant) {
        let until = now + self.shared.limits.window * REMEMBER_WINDOWS;
        self.lock().lost.insert((key.clone(), topic), (why, until));
    }

    /// A fresh channel of `key` (its outbox for the hub and the topic).
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        &self,
        key: SessionKey,
        id: SubscriberId,
        topic: Arc<str>,
        spec: ChannelSpec,
        meta: Meta,
        outbox: Arc<SocketOutbox>,
        socket: u64,
    ) -> Arc<Resumable> {
        let mut reg = self.lock();
        let session = reg.sessions.entry(key.clone()).or_default();
        let r = Arc::new(Resumable {
            id,
            key,
            topic,
            spec,
            state: Mutex::new(State {
                mode: Mode::Live { outbox, socket },
                tail: VecDeque::new(),
                tail_bytes: 0,
                last: Position::ZERO,
                acked: Position::ZERO,
                lost: None,
            }),
            meta: Mutex::new(meta),
            session_bytes: session.bytes.clone(),
            shared: self.shared.clone(),
        });
        session.channels.retain(|c| c.topic != r.topic);
        session.channels.push(r.clone());
        r
    }

    /// A channel restored after a restart: parked from `now`, starting after its `acked`.
    pub fn restore(&self, c: RestoredChannel, now: Instant) -> Arc<Resumable> {
        let mut reg = self.lock();
        let session = reg.sessions.entry(c.key.clone()).or_default();
        let r = Arc::new(Resumable {
            id: c.id,
            key: c.key,
            topic: c.topic,
            spec: c.spec,
            state: Mutex::new(State {
                mode: Mode::Parked { since: now },
                tail: VecDeque::new(),
                tail_bytes: 0,
                last: c.acked,
                acked: c.acked,
                lost: c.lost,
            }),
            meta: Mutex::new(c.meta),
            session_bytes: session.bytes.clone(),
            shared: self.shared.clone(),
        });
        self.shared.parked.fetch_add(1, Ordering::AcqRel);
        metrics::sessions_parked_now(1.0);
        session.channels.retain(|ch| ch.topic != r.topic);
        session.channels.push(r.clone());
        r
    }

    /// The client left the channel (or it was closed or replaced): gone for good.
    pub fn forget(&self, r: &Arc<Resumable>) {
        let mut reg = self.lock();
        if let Some(session) = reg.sessions.get_mut(&r.key) {
            session.channels.retain(|c| !Arc::ptr_eq(c, r));
            if session.channels.is_empty() {
                reg.sessions.remove(&r.key);
            }
        }
        r.close();
    }

    /// The socket ended without leaving `r`: park it for the window. False when it is not
    /// this socket's any more (taken over) or cannot be parked (then forget it).
    pub fn park(&self, r: &Arc<Resumable>, socket: u64, now: Instant) -> Park {
        if !r.owned_by(socket) {
            return Park::NotMine;
        }
        if self.shared.parked.load(Ordering::Acquire) >= self.shared.limits.max_parked {
            tracing::info!(topic = ?r.topic, "too many parked channels: dropping one instead of parking it");
            let mut reg = self.lock();
            self.remember(&mut reg, r, Lost::Dropped, now);
            return Park::Refused;
        }
        if r.park(socket, now) {
            self.shared.parked.fetch_add(1, Ordering::AcqRel);
            metrics::session_parked();
            metrics::sessions_parked_now(1.0);
            Park::Parked
        } else {
            Park::NotMine
        }
    }

    fn remember(&self, reg: &mut Registry, r: &Arc<Resumable>, why: Lost, now: Instant) {
        if let Some(session) = reg.sessions.get_mut(&r.key) {
            session.channels.retain(|c| !Arc::ptr_eq(c, r));
            if session.channels.is_empty() {
                reg.sessions.remove(&r.key);
            }
        }
        r.close();
        let until = now + self.shared.limits.window * REMEMBER_WINDOWS;
        reg.lost
            .insert((r.key.clone(), r.topic.clone()), (why, until));
    }

    /// Channels parked longer than the window, or parked and lost: closed and returned (the
    /// caller unsubscribes them). Old memories of lost channels are forgotten.
    /// `unix_now` (seconds) judges token expiry.
    pub fn sweep(&self, now: Instant, unix_now: i64) -> Vec<Arc<Resumable>> {
        let mut reg = self.lock();
        let mut out = Vec::new();
        for session in reg.sessions.values() {
            for r in &session.channels {
                let Some(since) = r.parked_since() else {
                    continue;
                };
                if now.saturating_duration_since(since) >= self.shared.limits.window {
                    out.push((r.clone(), Lost::Expired));
                } else if token_expired(&r.meta().identity, unix_now) {
                    // Nobody may receive rows on the authority of an expired token.
                    out.push((r.clone(), Lost::TokenExpired));
                } else if let Some(why) = r.lost() {
                    out.push((r.clone(), why));
                }
            }
        }
        for (r, why) in &out {
            if matches!(why, Lost::Expired | Lost::TokenExpired) {
                metrics::session_expired();
            }
            self.remember(&mut reg, r, *why, now);
        }
        reg.lost.retain(|_, (_, until)| *until > now);
        out.into_iter().map(|(r, _)| r).collect()
    }

    /// Every channel (for persistence and the confirmation ceiling).
    pub fn channels(&self) -> Vec<Arc<Resumable>> {
        let reg = self.lock();
        reg.sessions
            .values()
            .flat_map(|s| s.channels.iter().cloned())
            .collect()
    }

    /// Channels parked now.
    pub fn parked(&self) -> usize {
        self.shared.parked.load(Ordering::Acquire)
    }

    /// Bytes buffered for replay, server-wide.
    pub fn buffered_bytes(&self) -> usize {
        self.shared.bytes.load(Ordering::Acquire)
    }
}

/// Has the token behind `identity` expired (its `exp` claim is in the past)?
fn token_expired(identity: &Identity, unix_now: i64) -> bool {
    #[derive(serde::Deserialize)]
    struct Exp {
        exp: Option<serde_json::Number>,
    }
    serde_json::from_str::<Exp>(&identity.claims)
        .ok()
        .and_then(|c| c.exp)
        .and_then(|e| e.as_f64())
        .is_some_and(|exp| exp <= unix_now as f64)
}

/// A session channel read back after a restart.
pub struct RestoredChannel {
    pub key: SessionKey,
    pub id: SubscriberId,
    pub topic: Arc<str>,
    pub spec: ChannelSpec,
    /// The last position its client surely saw.
    pub acked: Position,
    /// Set when what it missed cannot be replayed (the slot moved past `acked`).
    pub lost: Option<Lost>,
    pub meta: Meta,
}

/// What [`Sessions::park`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Park {
    Parked,
    /// Another socket owns the channel now: leave it alone.
    NotMine,
    /// Too many channels are parked: this one was dropped (unsubscribe it).
    Refused,
}

/// Drop parked channels past their window (or over their bound) from the hub and their
/// topics. Run every second by `serve`.
pub fn expire(state: &crate::state::AppState, now: Instant) -> usize {
    let gone = state.sessions.sweep(now, crate::state::now_unix());
    for r in &gone {
        state.hub.unsubscribe(r.id);
        if let Some(key) = walcast_core::broadcast::TopicKey::from_topic(&r.topic, r.spec.private) {
            state.topics.leave(&key, r.id);
        }
    }
    if !gone.is_empty() {
        tracing::debug!(channels = gone.len(), "parked session channels dropped");
    }
    gone.len()
}

#[cfg(test)]
mod cluster_replay_tests {
    use super::*;
    use crate::realtime::outbox::bounded;
    use walcast_replication::Lsn;

    fn frame(s: &str) -> OutFrame {
        OutFrame::text(s.to_string())
    }

    fn at(lsn: u64) -> Position {
        Position::new(Lsn(lsn), 0)
    }

    /// A channel taken over from another node: the replay from the change stream goes
    /// before what was buffered while it was read, what both hold comes once, and nothing
    /// older than the replay is taken afterwards.
    #[test]
    fn a_replay_goes_before_the_buffer_and_nothing_repeats() {
        let sessions = Sessions::new(SessionLimits::default());
        let (first, _first_reader) = bounded(100, usize::MAX);
        let key = SessionKey {
            id: Arc::from("sess-01234567"),
            who: Arc::from("anon"),
        };
        let meta = Meta {
            identity: Arc::new(Identity {
                role: Arc::from("anon"),
                claims: Arc::from("{}"),
            }),
            broadcast: false,
        };
        let spec = ChannelSpec {
            vsn: Vsn::V2,
            private: false,
            entries: Vec::new(),
        };
        let r = sessions.register(key, 1, Arc::from("realtime:t"), spec, meta, first, 1);
        r.start_at(at(10));
        assert_eq!(sessions.park(&r, 1, Instant::now()), Park::Parked);
        // Routed live while the replay was read: 30 is in the replay too, 40 is not.
        assert!(r.push_at(at(30), 0, frame("live 30")));
        assert!(r.push_at(at(40), 0, frame("live 40")));
        r.prepend_replay(vec![
            (at(20), frame("replay 20")),
            (at(30), frame("replay 30")),
        ]);
        // Older than what was replayed: never taken again. Newer: taken.
        assert!(r.push_at(at(25), 0, frame("late 25")));
        assert!(r.push_at(at(50), 0, frame("live 50")));
        let (second, reader) = bounded(100, usize::MAX);
        assert_eq!(r.attach(second, 2, || ()), 4);
        let mut got = Vec::new();
        while let Some(OutFrame::Text(b) | OutFrame::Binary(b)) = reader.pop() {
            got.push(String::from_utf8_lossy(&b).into_owned());
        }
        assert_eq!(got, ["replay 20", "replay 30", "live 40", "live 50"]);
        assert_eq!(sessions.parked(), 0);
    }

    /// A lost channel (the stream was trimmed past it) takes no replay and is told to
    /// resync at its rejoin.
    #[test]
    fn a_lost_channel_takes_no_replay() {
        let sessions = Sessions::new(SessionLimits::default());
        let (first, _reader) = bounded(100, usize::MAX);
        let key = SessionKey {
            id: Arc::from("sess-01234567"),
            who: Arc::from("anon"),
        };
        let meta = Meta {
            identity: Arc::new(Identity {
                role: Arc::from("anon"),
                claims: Arc::from("{}"),
            }),
            broadcast: false,
        };
        let spec = ChannelSpec {
            vsn: Vsn::V2,
            private: false,
            entries: Vec::new(),
        };
        let r = sessions.register(
            key.clone(),
            1,
            Arc::from("realtime:t"),
            spec.clone(),
            meta,
            first,
            1,
        );
        r.start_at(at(10));
        r.set_lost(Lost::Trimmed);
        r.prepend_replay(vec![(at(20), frame("replay 20"))]);
        assert_eq!(sessions.buffered_bytes(), 0);
        match sessions.claim(&key, "realtime:t", &spec) {
            Claim::Fresh { lost, .. } => assert_eq!(lost, Some(Lost::Trimmed)),
            Claim::Resume(_) => panic!("a lost channel was resumed"),
        }
    }
}
