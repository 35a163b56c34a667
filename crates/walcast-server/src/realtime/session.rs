//! A socket's session, sans I/O: its channels, joins, token changes, limits and replies.
//!
//! ```text
//!            driver (socket.rs)                         Session (this module, never awaits)
//!   ws frame ──decode──▶ on_frame(now, frame) ──▶ replies/pushes ──▶ outbox (non-blocking)
//!                                             └─▶ Work {op, Join | Reauth | Write}  (take_work)
//!   work finished ─────▶ on_done(now, op, Outcome) ──▶ commit: hub + topics, reply, queued frames
//!   timer ─────────────▶ on_tick(now)          ──▶ idle close, token expiry, delayed error replies
//!   next_deadline() ◀── the driver arms one timer with it
//! ```
//!
//! A topic is *busy* while an operation for it is in flight (a join being checked, a new
//! token being authorized, a first write being authorized) or while its join error waits out
//! the error backoff. Frames for a busy topic queue behind the operation and are handled, in
//! order, once it is done; frames for other topics and heartbeats are handled at once. The
//! session itself never waits: database work is described as [`Work`] and run by the driver.
//!
//! Readiness options: a join with `config.postgres_changes_options.wait` (and entries) keeps
//! its topic busy after its check until the replication stream is up, so its reply means the
//! bindings are live; at the applied timeout (the client's, capped by
//! `--postgres-changes-wait-max-ms`) it is refused with `PostgresChangesSubscribeTimeout`,
//! and an entry that failed its check refuses it with `RealtimeDisabledForConfiguration`. A
//! channel joined with `config.broadcast.replication_ready` gets a `system` message once the
//! stream is up, or is closed at `--replication-ready-timeout-ms`. Both look at the stream on
//! each tick (at most [`STREAM_POLL`] apart while one is pending).
//!
//! Invariants:
//! - Each `ref` is answered at most once, and per topic replies and pushes keep the order the
//!   client sent the frames in (a busy topic's frames wait for its operation).
//! - A join reply for a channel with postgres_changes is queued under the hub lock, after its
//!   bindings are in the index, and under the topic's lock before any broadcast or presence
//!   push for it: everything that follows the reply was meant for the joined channel.
//! - What a channel receives always follows the permissions of its current token: a new token
//!   re-authorizes everything (postgres_changes identity, broadcast and presence read, write
//!   caches), and a token that lost a read permission closes the channel.
//! - Limits hold per socket, per client and server-wide without one client spending another's
//!   share ([`crate::realtime::limiter`]); sizes (topics, bindings, presence) are bounded
//!   before anything is stored.
//! - Client-supplied strings reach logs only as escaped (`Debug`) fields.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use walcast_core::broadcast::{Body, JoinOptions, Member, PresenceFull, TopicKey};
use walcast_core::hub::{ChannelTarget, Framing, Identity, OutFrame, Outbox};
use walcast_protocol::outbound::{self, SystemExtension, SystemStatus};
use walcast_protocol::{
    encode_push, join_reply_ok, BroadcastPush, FrameAction, FrameError, Inbound, InboundFrame,
    JoinPayload, PostgresBinding, PresencePush, ReplayConfig, Vsn,
};

use crate::authz::private::{identity_of, ChannelPerms, Extension};
use crate::metrics;
use crate::realtime::changes::{id_for, Checked};
use crate::realtime::channel::{Channel, ChannelRealtime, Channels};
use crate::realtime::limiter::{RateWindow, Refused};
use crate::realtime::outbox::SocketOutbox;
use crate::realtime::resume::{who_of, ChannelSpec, Claim, Meta, Park, SessionKey};
use crate::realtime::stored::{
    persist_unauthorized, Persist, StoreRefused, StoredMessage, PERSIST_FAILED, PERSIST_INVALID,
    PERSIST_PUBLIC, PERSIST_VSN1, REPLAY_PUBLIC,
};
use crate::state::AppState;
use bytes::Bytes;
use walcast_core::Position;
use walcast_protocol::PayloadEncoding;

/// The longest wire topic (`realtime:<name>`), as in Supabase (a kind 4 frame stores its
/// length in one byte).
pub const MAX_TOPIC_BYTES: usize = 255;
/// Most `postgres_changes` entries one join may carry.
pub const MAX_BINDINGS_PER_CHANNEL: usize = 100;
/// Most frames queued behind one busy topic; past it the client is flooding a channel whose
/// join it has not even seen answered, and the socket is closed.
const MAX_QUEUED_PER_TOPIC: usize = 256;

const SECOND: Duration = Duration::from_secs(1);

/// The current time, in both clocks the session needs: monotonic for timers and windows,
/// unix seconds for token expiry.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub at: Instant,
    pub unix: i64,
}

impl Now {
    pub fn system() -> Now {
        Now {
            at: Instant::now(),
            unix: crate::state::now_unix(),
        }
    }
}

/// Why the socket must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The client went away (or its close was received): nothing more to send.
    ClientGone,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

/// Database work the driver runs for the session; its [`Outcome`] comes back through
/// [`Session::on_done`] with the same `op`.
#[derive(Debug)]
pub struct Work {
    pub op: u64,
    pub kind: WorkKind,
}

#[derive(Debug)]
pub enum WorkKind {
    /// Authorize a join (or a new token on a joined channel): privileged roles, private
    /// channel reads, postgres_changes bindings.
    Authorize(AuthorizeRequest),
    /// May the channel's identity write `ext` on its private topic? With `presence_read`,
    /// also evaluate presence read (presence enabled by a first track).
    Write {
        identity: Arc<Identity>,
        name: Arc<str>,
        ext: Extension,
        presence_read: bool,
    },
    /// Store a persisted send in `realtime.messages` as the channel's identity.
    Store {
        identity: Arc<Identity>,
        name: Arc<str>,
        event: String,
        encoding: PayloadEncoding,
        payload: Bytes,
        ttl_secs: Option<i64>,
    },
}

/// What a join or a token change needs checked.
#[derive(Debug, Clone)]
pub struct AuthorizeRequest {
    pub identity: Arc<Identity>,
    /// Topic name without `realtime:`.
    pub name: Arc<str>,
    pub private: bool,
    /// Evaluate presence read too (private channels with presence enabled).
    pub presence: bool,
    /// postgres_changes entries to check under the identity (empty: none).
    pub entries: Vec<PostgresBinding>,
    /// `config.broadcast.replay` of a private channel's join: read the stored messages to
    /// replay after the reply (a new token replays nothing).
    pub replay: Option<ReplayConfig>,
    /// Cluster mode: the join's session and full topic, so that a session another node
    /// owned is taken over before the join commits (`cluster::sessions`).
    pub session: Option<(SessionKey, Arc<str>)>,
}

/// The answer to [`WorkKind::Authorize`].
#[derive(Debug, Default)]
pub struct Authorized {
    /// Private channels: the read permissions.
    pub perms: Option<ChannelPerms>,
    /// The bindings that passed and an error text for each entry that did not.
    pub changes: Checked,
    /// Stored messages to send right after the join reply, oldest first.
    pub replayed: Vec<StoredMessage>,
}

/// A refused join or token: the metric label and the client-facing message (a join error's
/// `reason`, or a `system` message when a joined channel is closed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub label: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(label: &'static str, message: impl Into<String>) -> Refusal {
        Refusal {
            label,
            message: message.into(),
        }
    }
}

#[derive(Debug)]
pub enum Outcome {
    Authorize(Result<Authorized, Refusal>),
    /// Write allowed, and presence read when it was asked for.
    Write {
        allowed: bool,
        presence_read: Option<bool>,
    },
    /// The stored row's id, or why it was not stored.
    Stored(Result<String, StoreRefused>),
}

/// A topic with an operation in flight, and the frames that arrived for it meanwhile.
struct Busy {
    topic: Arc<str>,
    op: u64,
    state: BusyState,
    queued: VecDeque<InboundFrame>,
}

enum BusyState {
    /// A join being authorized.
    Joining(Box<PendingJoin>),
    /// A join error reply held until `at` (damps rejoin storms).
    Refusing { at: Instant, reply: String },
    /// A new token being authorized for a joined channel.
    Reauthorizing {
        token: Arc<str>,
        exp: i64,
        identity: Arc<Identity>,
    },
    /// A first broadcast or track on a private channel, waiting for its write check.
    Writing(Extension),
    /// A persisted broadcast being stored; delivered live once its row is committed.
    Storing(Box<PendingStore>),
    /// An authorized join with `postgres_changes_options.wait`, its reply held until the
    /// replication stream is live (or `deadline` passes: `PostgresChangesSubscribeTimeout`).
    Waiting(Box<HeldJoin>),
}

/// A persisted send waiting for its row.
struct PendingStore {
    frame: InboundFrame,
    body: Body,
    exclude: Option<u64>,
    ack: bool,
}

/// A join held for its postgres_changes bindings to go live.
struct HeldJoin {
    pending: PendingJoin,
    auth: Authorized,
    deadline: Instant,
    /// The applied timeout (the client's, capped by the server's), as the error names it.
    timeout_ms: u64,
}

/// The `wait` timeout a client gets when it names none (as realtime-js and Supabase do).
pub const DEFAULT_CHANGES_WAIT_MS: u64 = 15_000;
/// How often a held join or a pending `replication_ready` looks at the stream again.
const STREAM_POLL: Duration = Duration::from_millis(100);
/// The `system` message of `config.broadcast.replication_ready` (Supabase's words).
pub const REPLICATION_READY: &str = "Replication connection established";
/// The channel's closing message when the stream is not up within the timeout.
pub const REPLICATION_NOT_READY: &str = "Replication connection was not established in time";

struct PendingJoin {
    join_ref: Option<String>,
    msg_ref: Option<String>,
    join: JoinPayload,
    token: Arc<str>,
    exp: i64,
    identity: Arc<Identity>,
}

/// A socket's session id, and the socket among all sockets (which one owns a session
/// channel).
struct ResumeId {
    id: Arc<str>,
    socket: u64,
}

/// One WebSocket's channels and everything it asked for.
pub struct Session {
    state: Arc<AppState>,
    vsn: Vsn,
    /// The connection token (`apikey`), the default channel token.
    conn_token: Arc<str>,
    /// Who the client is for per-client limits: its token's `sub`, else its address.
    client: Arc<str>,
    outbox: Arc<SocketOutbox>,
    /// The socket's `session_id` (session resume), if it gave one. Boxed: most sockets
    /// have none, and an idle socket's task should stay small.
    resume: Option<Box<ResumeId>>,
    channels: Channels,
    busy: Vec<Busy>,
    work: Vec<Work>,
    next_op: u64,
    joins: RateWindow,
    last_inbound: Instant,
    exit: Option<Exit>,
}

impl Session {
    pub fn new(
        state: Arc<AppState>,
        vsn: Vsn,
        conn_token: Arc<str>,
        client: Arc<str>,
        outbox: Arc<SocketOutbox>,
        resume: Option<Arc<str>>,
        now: Now,
    ) -> Session {
        let resume = resume.map(|id| {
            Box::new(ResumeId {
                id,
                socket: state.next_subscriber_id(),
            })
        });
        Session {
            state,
            vsn,
            conn_token,
            client,
            outbox,
            resume,
            channels: Channels::default(),
            busy: Vec::new(),
            work: Vec::new(),
            next_op: 0,
            joins: RateWindow::new(now.at),
            last_inbound: now.at,
            exit: None,
        }
    }

    /// This socket's number in the session registry (0 without a session: it owns no
    /// session channel).
    fn socket(&self) -> u64 {
        self.resume.as_ref().map_or(0, |r| r.socket)
    }

    /// Set once the socket must end; the driver closes it.
    pub fn exit(&self) -> Option<Exit> {
        self.exit
    }

    /// Work to run, in the order it was asked for.
    pub fn take_work(&mut self) -> Vec<Work> {
        std::mem::take(&mut self.work)
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// The earliest moment [`Session::on_tick`] has something to do.
    pub fn next_deadline(&self, now: Now) -> Instant {
        let mut deadline = self.last_inbound + self.state.limits.idle_timeout;
        for ch in self.channels.iter() {
            let left = ch.exp.saturating_sub(now.unix).max(0) as u64;
            deadline = deadline.min(now.at + Duration::from_secs(left));
        }
        for b in &self.busy {
            match &b.state {
                BusyState::Refusing { at, .. } => deadline = deadline.min(*at),
                BusyState::Waiting(h) => {
                    deadline = deadline.min(h.deadline.min(now.at + STREAM_POLL))
                }
                _ => {}
            }
        }
        for ch in self.channels.iter() {
            if let Some(at) = ch.replication_ready {
                deadline = deadline.min(at.min(now.at + STREAM_POLL));
            }
        }
        deadline
    }

    /// Something other than a frame arrived (a ping, a pong): the client is alive.
    pub fn touch(&mut self, now: Now) {
        self.last_inbound = now.at;
    }

    // -----------------------------------------------------------------------------------
    // Output

    fn send(&self, frame: String) {
        self.outbox.push(OutFrame::text(frame));
    }

    fn reply_to(
        &self,
        join_ref: Option<&str>,
        msg_ref: Option<&str>,
        topic: &str,
        payload: &str,
    ) -> String {
        encode_push(
            self.vsn,
            join_ref,
            msg_ref,
            topic,
            outbound::event::PHX_REPLY,
            payload,
        )
    }

    fn reply(&self, frame: &InboundFrame, payload: &str) {
        self.send(self.reply_to(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            payload,
        ));
    }

    /// A push for a topic this socket has not joined (join_ref null, as Phoenix does).
    fn unmatched(&self, frame: &InboundFrame) {
        self.send(self.reply_to(
            None,
            frame.msg_ref.as_deref(),
            &frame.topic,
            &outbound::reply_error_reason("unmatched topic"),
        ));
    }

    fn system_frame(
        &self,
        topic: &str,
        join_ref: Option<&str>,
        ext: SystemExtension,
        status: SystemStatus,
        msg: &str,
    ) -> String {
        encode_push(
            self.vsn,
            join_ref,
            None,
            topic,
            outbound::event::SYSTEM,
            &outbound::system(ext, status, msg, topic),
        )
    }

    /// `phx_close` with the channel's own join_ref as both refs (never a stale one).
    fn send_close(&self, topic: &str, join_ref: Option<&str>) {
        self.send(encode_push(
            self.vsn,
            join_ref,
            join_ref,
            topic,
            outbound::event::PHX_CLOSE,
            outbound::PHX_CLOSE_PAYLOAD,
        ));
    }

    // -----------------------------------------------------------------------------------
    // Channel lifecycle

    /// Server-side channel stop: `system` error, then `phx_close`.
    fn close_channel(&mut self, topic: &str, message: &str) {
        if let Some(ch) = self.channels.remove(topic) {
            tracing::info!(topic = ?topic, reason = ?message, "closing a channel");
            self.forget(&ch);
            let jr = ch.join_ref.as_deref();
            self.send(self.system_frame(
                topic,
                jr,
                SystemExtension::System,
                SystemStatus::Error,
                message,
            ));
            self.send_close(topic, jr);
        }
    }

    /// Remove a channel the client left or replaced, confirming with `phx_close`.
    fn end_channel(&mut self, topic: &str) {
        if let Some(ch) = self.channels.remove(topic) {
            self.forget(&ch);
            self.send_close(topic, ch.join_ref.as_deref());
        }
    }

    /// Drop a channel from every registry (hub, broadcast/presence topics, its session,
    /// gauges). A session channel another socket took over is left alone.
    fn forget(&self, ch: &Channel) {
        metrics::channel_left(ch.kind());
        if let Some(r) = &ch.resumable {
            if !r.owned_by(self.socket()) {
                return;
            }
            self.state.sessions.forget(r);
        }
        self.state.hub.unsubscribe(ch.id);
        self.state.topics.leave(&ch.realtime.key, ch.id);
    }

    /// The socket ends: every channel leaves (presence diffs for the others), except session
    /// channels, which park for the resume window (their presence leaves).
    pub fn leave_all(&mut self, now: Now) {
        for ch in self.channels.take_all() {
            let Some(r) = &ch.resumable else {
                self.forget(&ch);
                continue;
            };
            match self.state.sessions.park(r, self.socket(), now.at) {
                Park::Parked => {
                    metrics::channel_left(ch.kind());
                    self.state.topics.untrack(&ch.realtime.key, ch.id);
                }
                Park::NotMine => metrics::channel_left(ch.kind()),
                Park::Refused => {
                    metrics::channel_left(ch.kind());
                    self.state.hub.unsubscribe(ch.id);
                    self.state.topics.leave(&ch.realtime.key, ch.id);
                }
            }
        }
        self.busy.clear();
    }

    /// The client sent a frame: its session channels have delivered what preceded it.
    fn ack(&self) {
        if self.resume.is_none() {
            return;
        }
        let delivered = Position::just_before(self.state.health.delivered_through());
        for ch in self.channels.iter() {
            if let Some(r) = &ch.resumable {
                r.ack(self.socket(), delivered);
            }
        }
    }

    /// Where a channel's deliveries go: its session buffer, or the socket's queue.
    fn sink(&self, ch: &Channel) -> Arc<dyn Outbox> {
        match &ch.resumable {
            Some(r) => r.clone(),
            None => self.outbox.clone(),
        }
    }

    fn target(&self, ch: &Channel) -> ChannelTarget {
        ChannelTarget {
            outbox: self.sink(ch),
            framing: Framing::Phoenix(self.vsn),
            after: ch.resumable.as_ref().map(|r| r.last()),
            topic: ch.topic.clone(),
            identity: ch.identity.clone(),
        }
    }

    // -----------------------------------------------------------------------------------
    // Busy topics

    fn busy_index(&self, topic: &str) -> Option<usize> {
        self.busy.iter().position(|b| &*b.topic == topic)
    }

    fn start(
        &mut self,
        topic: Arc<str>,
        state: BusyState,
        kind: Option<WorkKind>,
        queued: VecDeque<InboundFrame>,
    ) {
        self.next_op += 1;
        let op = self.next_op;
        if let Some(kind) = kind {
            self.work.push(Work { op, kind });
        }
        self.busy.push(Busy {
            topic,
            op,
            state,
            queued,
        });
    }

    /// Handle the frames that waited for a topic's operation, in order. If one of them makes
    /// the topic busy again, the rest queue behind that.
    fn drain(&mut self, now: Now, queued: VecDeque<InboundFrame>) {
        for frame in queued {
            if self.exit.is_some() {
                return;
            }
            match self.busy_index(&frame.topic) {
                Some(i) => self.busy[i].queued.push_back(frame),
                None => self.dispatch(now, frame),
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Inbound

    /// A frame the protocol layer could not decode.
    pub fn on_bad_frame(&mut self, now: Now, e: FrameError) {
        self.last_inbound = now.at;
        self.ack();
        match e.action() {
            FrameAction::Close => {
                tracing::debug!(error = ?e.to_string(), "closing: unacceptable frame");
                self.exit = Some(Exit::Close(1007, "unacceptable frame"));
            }
            FrameAction::Reply => {
                if let (Some(refs), Some(reason)) = (e.reply_to(), e.reply_reason()) {
                    self.send(self.reply_to(
                        refs.join_ref.as_deref(),
                        refs.msg_ref.as_deref(),
                        &refs.topic,
                        &outbound::reply_error_reason(reason),
                    ));
                }
            }
            FrameAction::Ignore => {
                tracing::debug!(error = ?e.to_string(), "ignoring a malformed frame");
            }
        }
    }

    /// A decoded frame from the client.
    pub fn on_frame(&mut self, now: Now, frame: InboundFrame) {
        tracing::trace!(topic = ?frame.topic, event = ?frame.event, "frame");
        self.last_inbound = now.at;
        self.ack();
        if self.exit.is_some() {
            return;
        }
        if let Inbound::Heartbeat = frame.payload {
            self.reply(&frame, outbound::REPLY_OK_EMPTY);
            return;
        }
        match self.busy_index(&frame.topic) {
            Some(i) => {
                if self.busy[i].queued.len() >= MAX_QUEUED_PER_TOPIC {
                    tracing::debug!(topic = ?frame.topic, "closing: too many frames for a busy channel");
                    self.exit = Some(Exit::Close(1008, "too many messages for a pending channel"));
                    return;
                }
                self.busy[i].queued.push_back(frame);
            }
            None => self.dispatch(now, frame),
        }
    }

    fn dispatch(&mut self, now: Now, mut frame: InboundFrame) {
        match std::mem::replace(&mut frame.payload, Inbound::Leave) {
            Inbound::Heartbeat => self.reply(&frame, outbound::REPLY_OK_EMPTY),
            Inbound::Join(join) => self.on_join(now, frame, join),
            Inbound::Leave => {
                self.reply(&frame, outbound::REPLY_OK_EMPTY);
                self.end_channel(&frame.topic);
            }
            Inbound::AccessToken { access_token } => {
                if let Some(token) = access_token {
                    self.on_access_token(now, &frame.topic, token);
                }
            }
            payload @ (Inbound::Broadcast(_) | Inbound::Presence(_) | Inbound::Other { .. }) => {
                if !self.channels.contains(&frame.topic) {
                    self.unmatched(&frame);
                    return;
                }
                frame.payload = payload;
                self.on_channel_push(now, frame);
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Joins

    /// Refuse a join: the error reply is held for the error backoff (the topic stays busy, so
    /// later frames for it wait), or sent at once without one.
    fn refuse_join(
        &mut self,
        now: Now,
        frame: &InboundFrame,
        refusal: Refusal,
        queued: VecDeque<InboundFrame>,
    ) {
        metrics::join_error(refusal.label);
        tracing::debug!(topic = ?frame.topic, reason = refusal.label, "join refused");
        let reply = self.reply_to(
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            &outbound::reply_error_reason(&refusal.message),
        );
        let backoff = self.state.limits.channel_error_backoff;
        if backoff.is_zero() {
            self.send(reply);
            self.drain(now, queued);
        } else {
            let at = now.at + backoff;
            self.start(
                Arc::from(frame.topic.as_str()),
                BusyState::Refusing { at, reply },
                None,
                queued,
            );
        }
    }

    fn on_join(&mut self, now: Now, frame: InboundFrame, mut join: JoinPayload) {
        let topic = frame.topic.clone();
        let Some(name) = topic.strip_prefix("realtime:") else {
            self.unmatched(&frame);
            return;
        };
        // Rate: this socket, then this client, then the server. A socket or client over its
        // own share is disconnected (as Supabase does); the server-wide ceiling only refuses.
        let per_socket = self.state.limits.max_joins_per_second_per_socket;
        let over_socket = !self.joins.try_take(now.at, SECOND, 1, per_socket);
        let shared = if over_socket {
            Err(Refused::Client)
        } else {
            self.state
                .join_limits
                .check(&self.client, now.at, 1)
                .and_then(|()| {
                    // Cluster mode: the client's share counts its joins on every node.
                    if self.state.cluster_join_share(&self.client, 1) {
                        Ok(())
                    } else {
                        Err(Refused::Client)
                    }
                })
        };
        if let Err(refused) = shared {
            metrics::join_error("join_rate");
            self.reply(
                &frame,
                &outbound::reply_error_reason(
                    "ClientJoinRateLimitReached: Too many joins per second",
                ),
            );
            if refused == Refused::Client {
                tracing::info!(client = ?self.client, "closing a socket over its join rate");
                self.exit = Some(Exit::Close(1008, "too many joins per second"));
            }
            return;
        }
        // A second join on the same topic replaces the channel: close the old one first.
        self.end_channel(&topic);
        let refuse = |label: &'static str, message: &str| Some(Refusal::new(label, message));
        let refusal = if self.state.shutting_down.load(Ordering::Acquire) {
            refuse(
                "restarting",
                "RealtimeRestarting: Realtime is restarting, please standby",
            )
        } else if name.is_empty() {
            refuse("topic", "TopicNameRequired: You must provide a topic name")
        } else if topic.len() > MAX_TOPIC_BYTES {
            refuse(
                "topic",
                "TopicNameTooLong: Topic name must be at most 255 bytes",
            )
        } else if self.channels.len() + self.joining() >= self.state.limits.max_channels_per_client
        {
            refuse(
                "too_many_channels",
                "ChannelRateLimitReached: Too many channels",
            )
        } else if join.config.postgres_changes.len() > MAX_BINDINGS_PER_CHANNEL {
            refuse(
                "too_many_bindings",
                "TooManyBindings: A channel may have at most 100 postgres_changes bindings",
            )
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.refuse_join(now, &frame, r, VecDeque::new());
        }
        let token = match join.access_token.as_deref() {
            Some(t) if t != &*self.conn_token => Arc::from(t),
            // The connection's own token (given again, or implied): shared, not copied.
            _ => self.conn_token.clone(),
        };
        // Verified again even when it is the connection's token: it may have expired since.
        let claims = match self.state.jwt.verify(&token, now.unix) {
            Ok(c) => c,
            Err(e) => {
                let r = Refusal::new(e.label(), e.join_reason());
                return self.refuse_join(now, &frame, r, VecDeque::new());
            }
        };
        if self.state.limits.private_only && !join.config.private {
            let r = Refusal::new(
                "private_only",
                "PrivateOnly: This project only allows private channels",
            );
            return self.refuse_join(now, &frame, r, VecDeque::new());
        }
        if join.config.broadcast.replay.is_some() && !join.config.private {
            let r = Refusal::new("replay", REPLAY_PUBLIC);
            return self.refuse_join(now, &frame, r, VecDeque::new());
        }
        // The server may turn presence on for every channel (as a Supabase project can).
        join.config.presence.enabled |= self.state.limits.presence_enabled;
        let identity = Arc::new(identity_of(&claims));
        let request = AuthorizeRequest {
            identity: identity.clone(),
            name: Arc::from(name),
            private: join.config.private,
            presence: join.config.presence.enabled,
            entries: join.config.postgres_changes.clone(),
            replay: join.config.broadcast.replay,
            session: self.resume.as_ref().map(|sid| {
                (
                    SessionKey {
                        id: sid.id.clone(),
                        who: who_of(&identity),
                    },
                    Arc::from(topic.as_str()),
                )
            }),
        };
        let pending = PendingJoin {
            join_ref: frame.join_ref,
            msg_ref: frame.msg_ref,
            join,
            token,
            exp: claims.exp,
            identity,
        };
        self.start(
            Arc::from(topic.as_str()),
            BusyState::Joining(Box::new(pending)),
            Some(WorkKind::Authorize(request)),
            VecDeque::new(),
        );
    }

    /// Joins in flight (they count against the channel limit).
    fn joining(&self) -> usize {
        self.busy
            .iter()
            .filter(|b| matches!(b.state, BusyState::Joining(_) | BusyState::Waiting(_)))
            .count()
    }

    /// A finished operation.
    pub fn on_done(&mut self, now: Now, op: u64, outcome: Outcome) {
        let Some(i) = self.busy.iter().position(|b| b.op == op) else {
            tracing::debug!(op, "finished work nobody waits for");
            return; // the socket moved on (left, replaced); nothing waits for it
        };
        let busy = self.busy.swap_remove(i);
        match (busy.state, outcome) {
            (BusyState::Joining(p), Outcome::Authorize(result)) => {
                self.finish_join(now, busy.topic, *p, result, busy.queued)
            }
            (
                BusyState::Reauthorizing {
                    token,
                    exp,
                    identity,
                },
                Outcome::Authorize(result),
            ) => {
                self.finish_reauth(&busy.topic, token, exp, identity, result);
                self.drain(now, busy.queued);
            }
            (BusyState::Storing(p), Outcome::Stored(result)) => {
                self.finish_store(&busy.topic, *p, result);
                self.drain(now, busy.queued);
            }
            (
                BusyState::Writing(ext),
                Outcome::Write {
                    allowed,
                    presence_read,
                },
            ) => {
                self.finish_write(&busy.topic, ext, allowed, presence_read);
                self.drain(now, busy.queued);
            }
            (state, _) => {
                // Not the outcome this operation asked for: a bug, never a grant.
                tracing::error!(topic = ?busy.topic, "mismatched outcome for a pending operation");
                if let BusyState::Joining(p) = state {
                    let frame = join_frame(&busy.topic, &p);
                    self.refuse_join(
                        now,
                        &frame,
                        Refusal::new("internal", "Unknown Error on Channel"),
                        busy.queued,
                    );
                } else {
                    self.drain(now, busy.queued);
                }
            }
        }
    }

    fn finish_join(
        &mut self,
        now: Now,
        topic: Arc<str>,
        p: PendingJoin,
        result: Result<Authorized, Refusal>,
        queued: VecDeque<InboundFrame>,
    ) {
        let frame = join_frame(&topic, &p);
        let auth = match result {
            Ok(a) => a,
            Err(r) => return self.refuse_join(now, &frame, r, queued),
        };
        if self.state.shutting_down.load(Ordering::Acquire) {
            let r = Refusal::new(
                "restarting",
                "RealtimeRestarting: Realtime is restarting, please standby",
            );
            return self.refuse_join(now, &frame, r, queued);
        }
        // `postgres_changes_options.wait`: the reply says the bindings are live, so every
        // entry must have passed, and the stream must be up (else the reply is held).
        let options = p.join.config.postgres_changes_options;
        if options.wait && !p.join.config.postgres_changes.is_empty() {
            if let Some(first) = auth.changes.errors.first() {
                let r = Refusal::new(
                    "changes_refused",
                    format!("RealtimeDisabledForConfiguration: {first}"),
                );
                return self.refuse_join(now, &frame, r, queued);
            }
            if !self.state.is_streaming() {
                let timeout_ms = options
                    .timeout_ms
                    .unwrap_or(DEFAULT_CHANGES_WAIT_MS)
                    .min(self.state.limits.postgres_changes_wait_max.as_millis() as u64);
                tracing::debug!(topic = ?topic, timeout_ms, "join held until the replication stream is up");
                let held = HeldJoin {
                    pending: p,
                    auth,
                    deadline: now.at + Duration::from_millis(timeout_ms),
                    timeout_ms,
                };
                return self.start(topic, BusyState::Waiting(Box::new(held)), None, queued);
            }
        }
        self.commit_join(now, topic, p, auth, queued);
    }

    /// Register an authorized join everywhere and send its reply and what follows it.
    fn commit_join(
        &mut self,
        now: Now,
        topic: Arc<str>,
        p: PendingJoin,
        auth: Authorized,
        queued: VecDeque<InboundFrame>,
    ) {
        let frame = join_frame(&topic, &p);
        let name = topic.strip_prefix("realtime:").unwrap_or(&topic).to_owned();
        let entries = p.join.config.postgres_changes.clone();
        // Under a session: take over the channel it kept, or start one it can keep.
        let (id, resumable, resumed, lost) = match &self.resume {
            None => (self.state.next_subscriber_id(), None, false, None),
            Some(sid) => {
                let key = SessionKey {
                    id: sid.id.clone(),
                    who: who_of(&p.identity),
                };
                let spec = ChannelSpec::new(self.vsn, p.join.config.private, &entries);
                match self.state.sessions.claim(&key, &topic, &spec) {
                    Claim::Resume(r) => (r.id, Some(r), true, None),
                    Claim::Fresh { lost, discard } => {
                        if let Some(d) = discard {
                            self.state.hub.unsubscribe(d.id);
                            if let Some(k) = TopicKey::from_topic(&d.topic, d.spec.private) {
                                self.state.topics.leave(&k, d.id);
                            }
                        }
                        let id = self.state.next_subscriber_id();
                        let meta = Meta {
                            identity: p.identity.clone(),
                            broadcast: false,
                        };
                        let r = self.state.sessions.register(
                            key,
                            id,
                            topic.clone(),
                            spec,
                            meta,
                            self.outbox.clone(),
                            self.socket(),
                        );
                        (id, Some(r), false, lost)
                    }
                }
            }
        };
        let reply_ids: Vec<(u32, &serde_json::value::RawValue)> =
            entries.iter().map(|e| (id_for(e), &*e.raw)).collect();
        let reply = self.reply_to(
            p.join_ref.as_deref(),
            p.msg_ref.as_deref(),
            &topic,
            &join_reply_ok(&reply_ids),
        );
        let mut channel = Channel {
            id,
            topic: topic.clone(),
            join_ref: p.join_ref.clone(),
            token: p.token,
            exp: p.exp,
            identity: p.identity,
            entries,
            registered: false,
            realtime: ChannelRealtime::new(&name, &p.join, now.at),
            perms: auth.perms,
            events: RateWindow::new(now.at),
            resumable,
            replication_ready: None,
        };
        // `config.broadcast.replication_ready`: said at once when the stream is up, else
        // once it is (or the channel closes at the deadline; see `on_tick`).
        let ready_now = p.join.config.broadcast.replication_ready && self.state.is_streaming();
        if p.join.config.broadcast.replication_ready && !ready_now {
            channel.replication_ready = Some(now.at + self.state.limits.replication_ready_timeout);
        }
        let jr = channel.join_ref.as_deref();
        // What follows the reply on the wire, in order.
        let mut after = Vec::new();
        let mut replay_frames = Vec::new();
        if ready_now {
            after.push(self.system_frame(
                &topic,
                jr,
                SystemExtension::System,
                SystemStatus::Ok,
                REPLICATION_READY,
            ));
        }
        if let Some(lost) = lost {
            metrics::session_resync(lost.label());
            after.push(self.system_frame(
                &topic,
                jr,
                SystemExtension::PostgresChanges,
                SystemStatus::Error,
                lost.message(),
            ));
        }
        for message in &auth.changes.errors {
            after.push(self.system_frame(
                &topic,
                jr,
                SystemExtension::PostgresChanges,
                SystemStatus::Error,
                message,
            ));
        }
        let bindings = auth.changes.bindings;
        // Stored messages replayed right after the reply (and the system messages), before
        // anything live: they are queued under the topic lock with the reply.
        for m in &auth.replayed {
            if let Some(f) =
                walcast_core::broadcast::broadcast_frame(&topic, self.vsn, &m.replay_body())
            {
                replay_frames.push(f);
            }
        }
        if !bindings.is_empty() {
            after.push(if self.state.is_streaming() {
                self.system_frame(
                    &topic,
                    jr,
                    SystemExtension::PostgresChanges,
                    SystemStatus::Ok,
                    "Subscribed to PostgreSQL",
                )
            } else {
                self.system_frame(
                    &topic,
                    jr,
                    SystemExtension::PostgresChanges,
                    SystemStatus::Error,
                    crate::realtime::changes::STREAM_DOWN,
                )
            });
        }
        // After "Subscribed": the channel is live, these say what it will still miss.
        for message in &auth.changes.notices {
            after.push(self.system_frame(
                &topic,
                jr,
                SystemExtension::PostgresChanges,
                SystemStatus::Ok,
                message,
            ));
        }
        let (broadcast, presence) = channel.receives();
        if let Some(r) = &channel.resumable {
            r.set_meta(Meta {
                identity: channel.identity.clone(),
                broadcast,
            });
        }
        let member = Member {
            outbox: self.sink(&channel),
            vsn: self.vsn,
            broadcast,
            presence,
            replayed: (!auth.replayed.is_empty()).then(|| {
                auth.replayed
                    .iter()
                    .map(|m| Box::from(m.id.as_str()))
                    .collect()
            }),
        };
        if !auth.replayed.is_empty() {
            metrics::replayed(auth.replayed.len());
        }
        let presence_state = (channel.realtime.presence_enabled && presence).then_some(jr);
        let max = self.state.limits.max_members_per_channel;
        let opts = JoinOptions {
            presence_state,
            max_members: (max > 0).then_some(max),
        };
        let registered = !bindings.is_empty();
        let target = registered.then(|| self.target(&channel));
        let hub = &self.state.hub;
        let outbox = &self.outbox;
        let resumable = channel.resumable.as_ref();
        let socket = self.socket();
        let joined = self
            .state
            .topics
            .join(&channel.realtime.key, id, member, opts, || {
                let queue = move || {
                    let reply_and_after = || {
                        outbox.push(OutFrame::text(reply));
                        for f in after {
                            outbox.push(OutFrame::text(f));
                        }
                        for f in replay_frames {
                            outbox.push(f);
                        }
                    };
                    match resumable {
                        // The reply, then what the session kept, then live deliveries.
                        Some(r) if resumed => {
                            let replayed = r.attach(outbox.clone(), socket, reply_and_after);
                            metrics::session_resumed(replayed);
                        }
                        // A new session channel starts where the hub's cursor does.
                        Some(r) => {
                            reply_and_after();
                            r.start_at(hub.routed_through());
                        }
                        None => reply_and_after(),
                    }
                };
                match target {
                    // Under the hub lock too: the reply precedes every change for the channel.
                    Some(target) => hub.subscribe(id, target, bindings, queue),
                    None => queue(),
                }
            });
        if joined.is_err() {
            let r = Refusal::new(
                "member_limit",
                "ChannelMemberLimitReached: Too many members in this channel",
            );
            return self.refuse_join(now, &frame, r, queued);
        }
        channel.registered = registered;
        metrics::channel_joined(channel.kind());
        self.channels.insert(channel);
        self.drain(now, queued);
    }

    // -----------------------------------------------------------------------------------
    // Tokens

    fn on_access_token(&mut self, now: Now, topic: &str, token: String) {
        let Some(ch) = self.channels.get(topic) else {
            return;
        };
        if *ch.token == *token {
            return;
        }
        let claims = match self.state.jwt.verify(&token, now.unix) {
            Ok(c) => c,
            Err(e) => {
                metrics::channel_closed("token");
                self.close_channel(topic, &e.system_message());
                return;
            }
        };
        let identity = Arc::new(identity_of(&claims));
        tracing::debug!(topic = ?topic, role = ?identity.role, "new token for a channel");
        let request = AuthorizeRequest {
            identity: identity.clone(),
            name: Arc::from(ch.name()),
            private: ch.realtime.key.private,
            // Presence read is evaluated again wherever it was evaluated before.
            presence: ch.perms.is_some_and(|p| p.presence_read.is_some()),
            entries: if ch.registered {
                ch.entries.clone()
            } else {
                Vec::new()
            },
            replay: None,
            session: None,
        };
        let state = BusyState::Reauthorizing {
            token: Arc::from(token),
            exp: claims.exp,
            identity,
        };
        self.start(
            ch.topic.clone(),
            state,
            Some(WorkKind::Authorize(request)),
            VecDeque::new(),
        );
    }

    fn finish_reauth(
        &mut self,
        topic: &str,
        token: Arc<str>,
        exp: i64,
        identity: Arc<Identity>,
        result: Result<Authorized, Refusal>,
    ) {
        if !self.channels.contains(topic) {
            return;
        }
        tracing::debug!(topic = ?topic, ok = result.is_ok(), bindings = result.as_ref().map(|a| a.changes.bindings.len()).unwrap_or(0), errors = result.as_ref().map(|a| a.changes.errors.len()).unwrap_or(0), "token re-authorized");
        let auth = match result {
            Ok(a) => a,
            Err(r) => {
                metrics::channel_closed("token");
                self.close_channel(topic, &r.message);
                return;
            }
        };
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        if let (Some(old), Some(new)) = (ch.perms, auth.perms) {
            let revoked = (old.broadcast_read && !new.broadcast_read)
                || (old.presence_read == Some(true) && new.presence_read != Some(true));
            if revoked {
                let message = format!(
                    "You no longer have permission to read from this Channel topic: {}",
                    ch.name()
                );
                metrics::channel_closed("revoked");
                self.close_channel(topic, &message);
                return;
            }
        }
        if let Some(message) = auth.changes.errors.first() {
            // The new identity may not see what the old one could: stop the channel.
            let message = message.clone();
            metrics::channel_closed("revoked");
            self.close_channel(topic, &message);
            return;
        }
        ch.token = token;
        ch.exp = exp;
        ch.identity = identity;
        // Write permissions are evaluated again, under the new token, on next use.
        ch.perms = auth.perms;
        let (broadcast, presence) = ch.receives();
        let (key, id, registered) = (ch.realtime.key.clone(), ch.id, ch.registered);
        self.state.topics.set_access(&key, id, broadcast, presence);
        if registered {
            if let Some(ch) = self.channels.get(topic) {
                let target = self.target(ch);
                self.state
                    .hub
                    .subscribe(id, target, auth.changes.bindings, || ());
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Broadcast and presence

    fn on_channel_push(&mut self, now: Now, mut frame: InboundFrame) {
        // A first write on a private channel waits for its check; the push is handled (and
        // counted) once the answer is known.
        if let Some(ext) = self.unchecked_write(&frame) {
            let Some(ch) = self.channels.get(&frame.topic) else {
                return;
            };
            let presence_read =
                ext == Extension::Presence && ch.perms.is_some_and(|p| p.presence_read.is_none());
            let kind = WorkKind::Write {
                identity: ch.identity.clone(),
                name: Arc::from(ch.name()),
                ext,
                presence_read,
            };
            let topic = ch.topic.clone();
            self.start(
                topic,
                BusyState::Writing(ext),
                Some(kind),
                VecDeque::from([frame]),
            );
            return;
        }
        let max = self.state.limits.max_events_per_second;
        let Some(ch) = self.channels.get_mut(&frame.topic) else {
            return;
        };
        if !ch.events.try_take(now.at, SECOND, 1, max) {
            metrics::channel_closed("events_rate");
            self.close_channel(&frame.topic, "Too many messages per second");
            return;
        }
        match std::mem::replace(&mut frame.payload, Inbound::Leave) {
            Inbound::Broadcast(push) => self.on_broadcast(&frame, push),
            Inbound::Presence(push) => self.on_presence(now, &frame, push),
            _ => {}
        }
    }

    /// The write this push needs checked first, if its answer is not known yet.
    fn unchecked_write(&self, frame: &InboundFrame) -> Option<Extension> {
        let ch = self.channels.get(&frame.topic)?;
        let perms = ch.perms.as_ref()?;
        match &frame.payload {
            Inbound::Broadcast(_) if perms.broadcast_write.is_none() => Some(Extension::Broadcast),
            Inbound::Presence(PresencePush::Track { .. }) if perms.presence_write.is_none() => {
                Some(Extension::Presence)
            }
            _ => None,
        }
    }

    fn finish_write(
        &mut self,
        topic: &str,
        ext: Extension,
        allowed: bool,
        presence_read: Option<bool>,
    ) {
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        let Some(perms) = ch.perms.as_mut() else {
            return;
        };
        match ext {
            Extension::Broadcast => perms.broadcast_write = Some(allowed),
            Extension::Presence => perms.presence_write = Some(allowed),
        }
        if let Some(read) = presence_read {
            perms.presence_read = Some(read);
            let (broadcast, presence) = ch.receives();
            let (key, id) = (ch.realtime.key.clone(), ch.id);
            self.state.topics.set_access(&key, id, broadcast, presence);
        }
    }

    fn on_broadcast(&mut self, frame: &InboundFrame, push: BroadcastPush) {
        let Some(ch) = self.channels.get(&frame.topic) else {
            return;
        };
        let persist = match &push {
            BroadcastPush::Json(j) => Persist::of_object(j.payload.get()),
            BroadcastPush::Binary(b) => b
                .meta
                .as_deref()
                .map_or(Persist::No, |m| Persist::of_object(m.get())),
        };
        let ack = ch.realtime.ack;
        if ch.perms.is_some_and(|p| p.broadcast_write != Some(true)) {
            // Dropped without a reply, even with ack (the reference server does the same);
            // a persisting send with ack is told why, so the client's send() can say it.
            metrics::delivery_dropped("unauthorized");
            if ack && persist != Persist::No {
                let reason = persist_unauthorized(ch.name());
                self.reply_persist_error(frame, &reason);
            }
            return;
        }
        let refused = match persist {
            Persist::No => None,
            Persist::Invalid => Some(PERSIST_INVALID),
            Persist::Yes(_) if !ch.realtime.key.private => Some(PERSIST_PUBLIC),
            Persist::Yes(_) if self.vsn == Vsn::V1 => Some(PERSIST_VSN1),
            Persist::Yes(_) => None,
        };
        if let Some(reason) = refused {
            if ack {
                self.reply_persist_error(frame, reason);
            }
            return;
        }
        // What a stored row holds: the user event and payload (a text push's inner payload).
        let stored = match (&push, persist) {
            (_, Persist::No | Persist::Invalid) => None,
            (BroadcastPush::Binary(b), Persist::Yes(ttl)) => {
                Some((b.event.clone(), b.encoding, b.payload.clone(), ttl))
            }
            (BroadcastPush::Json(j), Persist::Yes(ttl)) => {
                inner_payload(j.payload.get()).map(|p| {
                    (
                        j.event.clone().unwrap_or_default(),
                        PayloadEncoding::Json,
                        Bytes::from(p),
                        ttl,
                    )
                })
            }
        };
        let body = match push {
            BroadcastPush::Json(j) => Body::Map(String::from(Box::<str>::from(j.payload))),
            BroadcastPush::Binary(b) => Body::User(b.into()),
        };
        if body.payload_len() > self.state.limits.broadcast.max_payload_bytes {
            if ack {
                self.reply(
                    frame,
                    &outbound::reply_error_response(r#""payload_size_exceeded""#),
                );
            }
            return;
        }
        let exclude = (!ch.realtime.self_broadcast).then_some(ch.id);
        if let Some((event, encoding, payload, ttl_secs)) = stored {
            // Delivered once stored (so the live copy carries the row's id); the topic's
            // later frames wait, keeping their order.
            let kind = WorkKind::Store {
                identity: ch.identity.clone(),
                name: Arc::from(ch.name()),
                event,
                encoding,
                payload,
                ttl_secs,
            };
            let topic = ch.topic.clone();
            let pending = PendingStore {
                frame: InboundFrame {
                    join_ref: frame.join_ref.clone(),
                    msg_ref: frame.msg_ref.clone(),
                    topic: frame.topic.clone(),
                    event: frame.event.clone(),
                    payload: Inbound::Leave,
                },
                body,
                exclude,
                ack,
            };
            self.start(
                topic,
                BusyState::Storing(Box::new(pending)),
                Some(kind),
                VecDeque::new(),
            );
            return;
        }
        let stats = self.state.topics.publish(&ch.realtime.key, &body, exclude);
        self.state.relay_broadcast(&ch.realtime.key, &body, None);
        metrics::broadcast("client", stats.delivered);
        if stats.dropped > 0 {
            metrics::delivery_dropped_n("slow_client", stats.dropped);
        }
        if ack {
            self.reply(frame, outbound::REPLY_OK_EMPTY);
        }
    }

    /// `{"status":"error","response":{"error":<reason>}}`: the client's send() resolves with
    /// `response.error` for persisting sends.
    fn reply_persist_error(&self, frame: &InboundFrame, reason: &str) {
        let mut response = String::with_capacity(reason.len() + 12);
        response.push_str("{\"error\":");
        walcast_core::write_json_string(reason, &mut response);
        response.push('}');
        self.reply(frame, &outbound::reply_error_response(&response));
    }

    fn finish_store(&mut self, topic: &str, p: PendingStore, result: Result<String, StoreRefused>) {
        let Some(ch) = self.channels.get(topic) else {
            return;
        };
        let id = match result {
            Ok(id) => id,
            Err(refused) => {
                let (label, reason) = match refused {
                    StoreRefused::Denied => ("denied", persist_unauthorized(ch.name())),
                    StoreRefused::Failed => ("failed", PERSIST_FAILED.to_owned()),
                };
                metrics::broadcast_stored("client", label);
                if p.ack {
                    self.reply_persist_error(&p.frame, &reason);
                }
                return;
            }
        };
        metrics::broadcast_stored("client", "stored");
        let body = match p.body {
            Body::User(mut u) => {
                u.meta = Some(crate::realtime::broadcast::id_meta(&id, false));
                Body::User(u)
            }
            map => map,
        };
        let stats = self
            .state
            .topics
            .publish_stored(&ch.realtime.key, &body, &id, p.exclude);
        // Stored rows are marked skip_broadcast, so the change stream will not carry this
        // one: the other nodes get it here.
        self.state
            .relay_broadcast(&ch.realtime.key, &body, Some(&id));
        metrics::broadcast("client", stats.delivered);
        if stats.dropped > 0 {
            metrics::delivery_dropped_n("slow_client", stats.dropped);
        }
        if p.ack {
            self.reply(&p.frame, outbound::REPLY_OK_EMPTY);
        }
    }

    fn on_presence(&mut self, now: Now, frame: &InboundFrame, push: PresencePush) {
        let limits = self.state.limits.broadcast.clone();
        let Some(ch) = self.channels.get_mut(&frame.topic) else {
            return;
        };
        if !ch.realtime.presence_calls.try_take(
            now.at,
            limits.presence_window,
            1,
            limits.presence_max_calls,
        ) {
            metrics::channel_closed("presence_rate");
            self.close_channel(&frame.topic, "Client presence rate limit exceeded");
            return;
        }
        match push {
            PresencePush::Track { payload } => {
                let payload = payload.get();
                if payload.len()
                    > limits
                        .max_presence_payload_bytes
                        .min(limits.max_payload_bytes)
                {
                    metrics::channel_closed("presence_size");
                    self.close_channel(&frame.topic, "Track message size exceeded");
                    return;
                }
                if ch.perms.is_some_and(|p| p.presence_write != Some(true)) {
                    self.reply(frame, &outbound::reply_error_response("{}"));
                    return;
                }
                let key = ch
                    .realtime
                    .presence_key
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                let tracked = self.state.topics.track(
                    &ch.realtime.key,
                    ch.id,
                    key,
                    payload,
                    limits.max_presence_state_bytes,
                );
                if let Err(PresenceFull) = tracked {
                    self.reply(
                        frame,
                        &outbound::reply_error_reason(
                            "PresenceStateTooLarge: This channel's presence state is full",
                        ),
                    );
                    return;
                }
                metrics::presence_event("track");
            }
            PresencePush::Untrack => {
                self.state.topics.untrack(&ch.realtime.key, ch.id);
                metrics::presence_event("untrack");
            }
        }
        self.reply(frame, outbound::REPLY_OK_EMPTY);
    }

    // -----------------------------------------------------------------------------------
    // Time

    /// Deadlines: the idle timeout, token expiry, held join error replies.
    pub fn on_tick(&mut self, now: Now) {
        if now.at.saturating_duration_since(self.last_inbound) >= self.state.limits.idle_timeout {
            tracing::debug!("closing an idle socket");
            self.exit = Some(Exit::Close(1000, "idle timeout"));
            return;
        }
        let expired: Vec<(Arc<str>, i64)> = self
            .channels
            .iter()
            .filter(|c| c.exp <= now.unix)
            .map(|c| (c.topic.clone(), c.exp))
            .collect();
        for (topic, exp) in expired {
            metrics::channel_closed("token_expired");
            let msg = format!("Token has expired {} seconds ago", now.unix - exp);
            self.close_channel(&topic, &msg);
        }
        while let Some(i) = self
            .busy
            .iter()
            .position(|b| matches!(b.state, BusyState::Refusing { at, .. } if at <= now.at))
        {
            let busy = self.busy.swap_remove(i);
            if let BusyState::Refusing { reply, .. } = busy.state {
                self.send(reply);
            }
            self.drain(now, busy.queued);
        }
        // Held joins: released once the stream is up, refused at their deadline.
        let streaming = self.state.is_streaming();
        while let Some(i) = self.busy.iter().position(
            |b| matches!(&b.state, BusyState::Waiting(h) if streaming || h.deadline <= now.at),
        ) {
            let busy = self.busy.swap_remove(i);
            let BusyState::Waiting(held) = busy.state else {
                continue;
            };
            let HeldJoin {
                pending,
                auth,
                timeout_ms,
                ..
            } = *held;
            if streaming {
                self.commit_join(now, busy.topic, pending, auth, busy.queued);
            } else {
                let frame = join_frame(&busy.topic, &pending);
                let r = Refusal::new(
                    "changes_wait_timeout",
                    format!("PostgresChangesSubscribeTimeout: Timed out after {timeout_ms}ms waiting for the postgres_changes subscription"),
                );
                self.refuse_join(now, &frame, r, busy.queued);
            }
            if self.exit.is_some() {
                return;
            }
        }
        // `replication_ready` channels: told once the stream is up, closed at the deadline.
        let pending: Vec<(Arc<str>, Instant)> = self
            .channels
            .iter()
            .filter_map(|c| c.replication_ready.map(|at| (c.topic.clone(), at)))
            .collect();
        for (topic, at) in pending {
            if streaming {
                let Some(ch) = self.channels.get_mut(&topic) else {
                    continue;
                };
                ch.replication_ready = None;
                let jr = ch.join_ref.clone();
                self.send(self.system_frame(
                    &topic,
                    jr.as_deref(),
                    SystemExtension::System,
                    SystemStatus::Ok,
                    REPLICATION_READY,
                ));
            } else if at <= now.at {
                metrics::channel_closed("replication_not_ready");
                self.close_channel(&topic, REPLICATION_NOT_READY);
            }
        }
    }
}

/// The `payload` member of a text broadcast push (`{"type","event","payload",...}`), as
/// JSON text; `{}` when it has none.
fn inner_payload(map: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Push<'a> {
        #[serde(borrow)]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let push: Push<'_> = serde_json::from_str(map).ok()?;
    Some(
        push.payload
            .map_or_else(|| "{}".to_owned(), |p| p.get().to_owned()),
    )
}

/// A join frame's refs and topic again (for a reply to a join that was pending).
fn join_frame(topic: &str, p: &PendingJoin) -> InboundFrame {
    InboundFrame {
        join_ref: p.join_ref.clone(),
        msg_ref: p.msg_ref.clone(),
        topic: topic.to_owned(),
        event: "phx_join".to_owned(),
        payload: Inbound::Leave,
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // However the socket ended, its channels leave every registry (or park).
        self.leave_all(Now::system());
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
