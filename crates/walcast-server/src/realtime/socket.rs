//! One WebSocket connection: many channels multiplexed over it.
//!
//! ```text
//!            hub (pump task) ──push──┐          (never blocks: a full queue marks overflow)
//!   socket's own replies ───push──▶ SocketOutbox (crate::realtime::outbox) ─┐
//!                                                                  ▼
//!   client ◀── ws.feed(frame)… ws.flush()  ◀── socket task: select! { shutdown, queued frames
//!   client ──▶ decode_text / decode_binary ──▶ inbound handling      or overflow, inbound
//!              (its replies are written before the task waits again)  frames, deadline }
//! ```
//!
//! Invariants:
//! - One task per connection; it alone writes the socket. Everything bound for the client,
//!   replies included, goes through the bounded queue, so the order a client sees is the
//!   order frames were queued (a join reply is queued under the hub lock, before any change
//!   for that channel).
//! - Queued frames are written in batches with one flush (coalesced writes).
//! - A client that lets its queue fill up is disconnected (close 4008) instead of buffering
//!   without bound or slowing the fan-out.
//! - One deadline per socket covers the idle timeout and every channel's token expiry (no
//!   timer per channel). Its timer is re-armed only when it fires or a join brings it
//!   forward, not on every inbound frame.
//! - Channel pushes carry the channel's current join_ref or null, never a stale one.
//! - Every joined channel is a member of its broadcast topic; every way a channel ends
//!   (leave, replacement, server close, socket end including the idle timeout) removes it
//!   there too, which turns its presence into a leave diff for the others.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use tokio::time::Instant;
use walcast_core::broadcast::{Body, Member, TopicKey};
use walcast_core::hub::{ChannelTarget, Identity, OutFrame, Outbox};
use walcast_protocol::outbound::{self, SystemExtension, SystemStatus};
use walcast_protocol::{
    decode_binary_bytes, decode_text, encode_push, join_reply_ok, FrameAction, FrameError, Inbound,
    InboundFrame, JoinPayload, PostgresBinding, Vsn,
};
use walcast_protocol::{BroadcastPush, PresencePush};

use crate::authz::private::{self, identity_of, ChannelPerms};
use crate::authz::rls::AuthzError;
use crate::metrics;
use crate::realtime::broadcast::{can_write_as, CallWindow, Extension};
use crate::realtime::changes::{build_bindings, id_for, Checked};
use crate::realtime::outbox::{self, OutboxReader, SocketOutbox};
use crate::state::{now_unix, AppState};

/// WebSocket close code for a client that cannot keep up (private-use range).
pub const CLOSE_SLOW_CLIENT: u16 = 4008;
/// Longest a socket waits for its close frame to be written before it just drops.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Most frames written between two flushes.
const MAX_BATCH: usize = 512;

/// What the upgrade handler established before the socket starts.
pub struct Connection {
    pub vsn: Vsn,
    /// The connection token (`apikey`), the default channel token.
    pub token: Arc<str>,
}

/// One joined channel. Kept lean: an idle socket is mostly this and its task.
struct Channel {
    id: u64,
    /// Full topic, `realtime:<name>` (shared with the hub's view of the channel).
    topic: Arc<str>,
    join_ref: Option<String>,
    /// The token the channel acts with (shared with the connection's when it is the same).
    token: Arc<str>,
    /// The token's expiry, unix seconds.
    exp: i64,
    /// The token's role and claims, as every check runs them (shared with the hub). The
    /// verified claims map itself is not kept.
    identity: Arc<Identity>,
    /// The postgres_changes entries as joined (kept to re-scope on `access_token`).
    entries: Vec<PostgresBinding>,
    registered: bool,
    /// Broadcast and presence state of this channel.
    realtime: ChannelRealtime,
    /// Private channels: what the token may read (and, once checked, write).
    perms: Option<ChannelPerms>,
    /// (unix second, inbound broadcast/presence pushes in it), for the events/s limit.
    events: (i64, u32),
}

/// A channel's broadcast and presence settings and caches.
struct ChannelRealtime {
    key: TopicKey,
    self_broadcast: bool,
    ack: bool,
    /// `config.presence.key`; without one, a fresh UUID made on the channel's first track
    /// (the key is only ever seen once tracked, so making it then changes nothing).
    presence_key: Option<String>,
    presence_calls: CallWindow,
    /// Private channels: write permission, evaluated on first use, kept until `access_token`.
    can_broadcast: Option<bool>,
    can_track: Option<bool>,
}

impl ChannelRealtime {
    fn new(name: &str, join: &JoinPayload) -> ChannelRealtime {
        let key = &join.config.presence.key;
        ChannelRealtime {
            key: TopicKey::new(name, join.config.private),
            self_broadcast: join.config.broadcast.self_broadcast,
            ack: join.config.broadcast.ack,
            presence_key: (!key.is_empty()).then(|| key.clone()),
            presence_calls: CallWindow::default(),
            can_broadcast: None,
            can_track: None,
        }
    }
}

struct Socket {
    state: Arc<AppState>,
    vsn: Vsn,
    conn: Connection,
    outbox: Arc<SocketOutbox>,
    channels: Channels,
    last_inbound: Instant,
}

/// A socket's channels, by topic: a vector grown one slot at a time. A socket holds one or a
/// few channels (at most `--max-channels-per-client`), so a linear search costs no more than
/// hashing, while a hash map keeps four buckets of a whole channel each for a single one.
#[derive(Default)]
struct Channels(Vec<Channel>);

impl Channels {
    fn position(&self, topic: &str) -> Option<usize> {
        self.0.iter().position(|c| &*c.topic == topic)
    }

    fn get(&self, topic: &str) -> Option<&Channel> {
        self.0.iter().find(|c| &*c.topic == topic)
    }

    fn get_mut(&mut self, topic: &str) -> Option<&mut Channel> {
        self.0.iter_mut().find(|c| &*c.topic == topic)
    }

    fn contains(&self, topic: &str) -> bool {
        self.position(topic).is_some()
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Channel> {
        self.0.iter()
    }

    fn remove(&mut self, topic: &str) -> Option<Channel> {
        let i = self.position(topic)?;
        Some(self.0.swap_remove(i))
    }

    /// Add a channel, replacing one on the same topic.
    fn insert(&mut self, channel: Channel) {
        if let Some(i) = self.position(&channel.topic) {
            self.0[i] = channel;
            return;
        }
        if self.0.len() == self.0.capacity() {
            self.0.reserve_exact(1);
        }
        self.0.push(channel);
    }

    fn take_all(&mut self) -> Vec<Channel> {
        std::mem::take(&mut self.0)
    }
}

/// Why the loop ended.
enum Exit {
    ClientGone,
    Close(u16, &'static str),
}

/// Run a connection to completion.
pub async fn run(
    mut ws: WebSocket,
    state: Arc<AppState>,
    conn: Connection,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    metrics::socket_opened();
    let _guard = state.socket_guard();
    let (outbox, reader) = outbox::bounded(state.limits.socket_send_queue.max(16));
    let mut socket = Socket {
        vsn: conn.vsn,
        state,
        conn,
        outbox,
        channels: Channels::default(),
        last_inbound: Instant::now(),
    };
    // One timer for the socket's lifetime, re-armed only when it fires or a join brings the
    // deadline forward. Inbound messages only push the idle deadline later, so they leave it
    // alone: when it fires early, `on_deadline` finds nothing due and it is re-armed.
    let mut armed = socket.next_deadline();
    let sleep = tokio::time::sleep_until(armed);
    tokio::pin!(sleep);
    let exit = loop {
        tokio::select! {
            biased;
            _ = shutdown.changed() => {
                break Exit::Close(1012, "service restart");
            }
            _ = reader.ready() => {
                if let Some(exit) = write_queued(&mut ws, &reader).await {
                    break exit;
                }
            }
            msg = ws.recv() => {
                match msg {
                    Some(Ok(msg)) => {
                        socket.last_inbound = Instant::now();
                        // Boxed: a join awaits catalog queries, and an unboxed future that size
                        // would sit in every idle connection's task.
                        if let Some(exit) = Box::pin(socket.on_message(msg)).await {
                            break exit;
                        }
                        // Write the reply (e.g. to a heartbeat) now rather than on another
                        // turn of the loop.
                        if let Some(exit) = write_queued(&mut ws, &reader).await {
                            break exit;
                        }
                        let deadline = socket.next_deadline();
                        if deadline < armed {
                            armed = deadline;
                            sleep.as_mut().reset(armed);
                        }
                    }
                    Some(Err(e)) => {
                        if is_too_big(e) {
                            break Exit::Close(1009, "message too big");
                        }
                        break Exit::ClientGone;
                    }
                    None => break Exit::ClientGone,
                }
            }
            _ = &mut sleep => {
                if let Some(exit) = socket.on_deadline() {
                    break exit;
                }
                armed = socket.next_deadline();
                sleep.as_mut().reset(armed);
            }
        }
    };
    socket.leave_all();
    if let Exit::Close(code, reason) = exit {
        // Flush what is already queued (e.g. a final system message), then close.
        let close = async {
            while let Some(frame) = reader.pop() {
                if ws.feed(to_message(frame)).await.is_err() {
                    return;
                }
            }
            let _ = ws
                .send(Message::Close(Some(CloseFrame {
                    code,
                    reason: Utf8Bytes::from_static(reason),
                })))
                .await;
        };
        let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, close).await;
    }
    metrics::socket_closed();
}

/// Write what is queued, or say why the connection must end: the client is gone, or its
/// queue overflowed (it cannot keep up).
async fn write_queued(ws: &mut WebSocket, reader: &OutboxReader) -> Option<Exit> {
    if reader.overflowed() {
        metrics::slow_client_disconnect();
        tracing::info!("closing a slow client: send queue full");
        return Some(Exit::Close(
            CLOSE_SLOW_CLIENT,
            "slow client: send queue full",
        ));
    }
    let first = reader.pop()?;
    match write_batch(ws, first, reader).await {
        Ok(()) => None,
        Err(_) => Some(Exit::ClientGone),
    }
}

/// A frame or message over `--max-frame-bytes`: answered with 1009 rather than a silent drop.
fn is_too_big(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

fn to_message(frame: OutFrame) -> Message {
    match frame {
        OutFrame::Text(b) => match Utf8Bytes::try_from(b) {
            Ok(t) => Message::Text(t),
            // Frames are built from Rust strings; this cannot happen, but never panic.
            Err(_) => Message::Text(Utf8Bytes::from_static("")),
        },
        OutFrame::Binary(b) => Message::Binary(b),
    }
}

/// Write `first` and whatever else is queued (up to a batch), then flush once.
async fn write_batch(
    ws: &mut WebSocket,
    first: OutFrame,
    reader: &OutboxReader,
) -> Result<(), axum::Error> {
    let (mut text, mut binary, mut bytes) = (0u64, 0u64, 0u64);
    let mut next = Some(first);
    let mut n = 0;
    while let Some(frame) = next.take() {
        bytes += frame.len() as u64;
        match &frame {
            OutFrame::Text(_) => text += 1,
            OutFrame::Binary(_) => binary += 1,
        }
        ws.feed(to_message(frame)).await?;
        n += 1;
        if n < MAX_BATCH {
            next = reader.pop();
        }
    }
    ws.flush().await?;
    metrics::frames_out(text, binary, bytes);
    Ok(())
}

impl Socket {
    fn send(&self, frame: String) {
        self.outbox.push(OutFrame::text(frame));
    }

    fn reply(&self, frame: &InboundFrame, payload: &str) {
        self.send(encode_push(
            self.vsn,
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &frame.topic,
            "phx_reply",
            payload,
        ));
    }

    /// A push for a topic this socket has not joined (join_ref null, as Phoenix does).
    fn unmatched(&self, frame: &InboundFrame) {
        self.send(encode_push(
            self.vsn,
            None,
            frame.msg_ref.as_deref(),
            &frame.topic,
            "phx_reply",
            &outbound::reply_error_reason("unmatched topic"),
        ));
    }

    fn system(
        &self,
        topic: &str,
        join_ref: Option<&str>,
        ext: SystemExtension,
        status: SystemStatus,
        msg: &str,
    ) {
        self.send(self.system_frame(topic, join_ref, ext, status, msg));
    }

    /// A `system` push for a channel, as a frame ready to queue.
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
            "system",
            &outbound::system(ext, status, msg, topic),
        )
    }

    /// The earliest of the idle timeout and every channel's token expiry.
    fn next_deadline(&self) -> Instant {
        let mut deadline = self.last_inbound + self.state.limits.idle_timeout;
        let now_unix = now_unix();
        let now = Instant::now();
        for ch in self.channels.iter() {
            let left = ch.exp.saturating_sub(now_unix).max(0) as u64;
            deadline = deadline.min(now + Duration::from_secs(left));
        }
        deadline
    }

    fn on_deadline(&mut self) -> Option<Exit> {
        if self.last_inbound.elapsed() >= self.state.limits.idle_timeout {
            tracing::debug!("closing an idle socket");
            return Some(Exit::Close(1000, "idle timeout"));
        }
        let now = now_unix();
        let expired: Vec<Arc<str>> = self
            .channels
            .iter()
            .filter(|c| c.exp <= now)
            .map(|c| c.topic.clone())
            .collect();
        for topic in expired {
            if let Some(ch) = self.channels.get(&topic) {
                let msg = format!("Token has expired {} seconds ago", now - ch.exp);
                self.close_channel(&topic, &msg);
            }
        }
        None
    }

    /// Server-side channel stop: `system` error, then `phx_close`.
    fn close_channel(&mut self, topic: &str, message: &str) {
        if let Some(ch) = self.channels.remove(topic) {
            self.forget(&ch);
            let jr = ch.join_ref.as_deref();
            self.system(
                topic,
                jr,
                SystemExtension::System,
                SystemStatus::Error,
                message,
            );
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

    /// `phx_close` with the channel's own join_ref as both refs (never a stale one).
    fn send_close(&self, topic: &str, join_ref: Option<&str>) {
        self.send(encode_push(
            self.vsn,
            join_ref,
            join_ref,
            topic,
            "phx_close",
            outbound::PHX_CLOSE_PAYLOAD,
        ));
    }

    /// Drop a channel from every registry (hub, broadcast/presence topics, gauges).
    fn forget(&self, ch: &Channel) {
        self.state.hub.unsubscribe(ch.id);
        self.state.topics.leave(&ch.realtime.key, ch.id);
        metrics::channel_left(kind_of(ch));
    }

    fn leave_all(&mut self) {
        let channels = self.channels.take_all();
        for ch in &channels {
            self.forget(ch);
        }
    }

    async fn on_message(&mut self, msg: Message) -> Option<Exit> {
        let decoded = match msg {
            Message::Text(t) => {
                metrics::frame_in(metrics::FrameKind::Text, t.len());
                decode_text(self.vsn, t.as_str())
            }
            Message::Binary(b) => {
                metrics::frame_in(metrics::FrameKind::Binary, b.len());
                decode_binary_bytes(self.vsn, &b)
            }
            Message::Close(_) => return Some(Exit::ClientGone),
            // Pings are answered by the WebSocket layer itself.
            Message::Ping(_) | Message::Pong(_) => return None,
        };
        match decoded {
            Ok(frame) => self.on_frame(frame).await,
            Err(e) => self.on_bad_frame(e),
        }
    }

    fn on_bad_frame(&mut self, e: FrameError) -> Option<Exit> {
        match e.action() {
            FrameAction::Close => {
                tracing::debug!(error = %e, "closing: unacceptable frame");
                Some(Exit::Close(1007, "unacceptable frame"))
            }
            FrameAction::Reply => {
                if let (Some(refs), Some(reason)) = (e.reply_to(), e.reply_reason()) {
                    self.send(encode_push(
                        self.vsn,
                        refs.join_ref.as_deref(),
                        refs.msg_ref.as_deref(),
                        &refs.topic,
                        "phx_reply",
                        &outbound::reply_error_reason(reason),
                    ));
                }
                None
            }
            FrameAction::Ignore => {
                tracing::debug!(error = %e, "ignoring a malformed frame");
                None
            }
        }
    }

    async fn on_frame(&mut self, frame: InboundFrame) -> Option<Exit> {
        match &frame.payload {
            Inbound::Heartbeat => {
                self.reply(&frame, outbound::REPLY_OK_EMPTY);
            }
            Inbound::Join(_) => {
                let InboundFrame {
                    payload: Inbound::Join(join),
                    ..
                } = &frame
                else {
                    return None;
                };
                let join = join.clone();
                if !self.state.allow_join() {
                    self.join_error(
                        &frame,
                        "join_rate",
                        "ClientJoinRateLimitReached: Too many joins per second".into(),
                    )
                    .await;
                    // As Supabase does: a socket over the join rate is disconnected.
                    return Some(Exit::Close(1008, "too many joins per second"));
                }
                self.on_join(&frame, join).await;
            }
            Inbound::Leave => {
                self.reply(&frame, outbound::REPLY_OK_EMPTY);
                self.end_channel(&frame.topic);
            }
            Inbound::AccessToken { access_token } => {
                if let Some(token) = access_token.clone() {
                    self.on_access_token(&frame.topic, token).await;
                }
            }
            Inbound::Broadcast(_) | Inbound::Presence(_) | Inbound::Other { .. } => {
                if !self.channels.contains(&frame.topic) {
                    self.unmatched(&frame);
                } else {
                    self.on_channel_push(frame).await;
                }
            }
        }
        None
    }

    async fn join_error(&self, frame: &InboundFrame, reason: &'static str, message: String) {
        metrics::join_error(reason);
        tracing::debug!(topic = %frame.topic, %message, "join refused");
        // Damp rejoin storms, but stay well inside the client's 10 s join timeout.
        tokio::time::sleep(self.state.limits.channel_error_backoff).await;
        self.reply(frame, &outbound::reply_error_reason(&message));
    }

    async fn on_join(&mut self, frame: &InboundFrame, join: JoinPayload) {
        let topic = frame.topic.clone();
        let Some(name) = topic.strip_prefix("realtime:") else {
            self.unmatched(frame);
            return;
        };
        // A second join on the same topic replaces the channel: close the old one first.
        self.end_channel(&topic);
        if self.state.shutting_down.load(Ordering::Acquire) {
            return self
                .join_error(
                    frame,
                    "restarting",
                    "RealtimeRestarting: Realtime is restarting, please standby".into(),
                )
                .await;
        }
        if name.is_empty() {
            return self
                .join_error(
                    frame,
                    "topic",
                    "TopicNameRequired: You must provide a topic name".into(),
                )
                .await;
        }
        if self.channels.len() >= self.state.limits.max_channels_per_client {
            return self
                .join_error(
                    frame,
                    "too_many_channels",
                    "ChannelRateLimitReached: Too many channels".into(),
                )
                .await;
        }
        let token = match join.access_token.as_deref() {
            Some(t) if t != &*self.conn.token => Arc::from(t),
            // The connection's own token (given again, or implied): shared, not copied.
            _ => self.conn.token.clone(),
        };
        // Verified again even when it is the connection's token: it may have expired since.
        let claims = match self.state.jwt.verify(&token, now_unix()) {
            Ok(c) => c,
            Err(e) => return self.join_error(frame, e.label(), e.join_reason()).await,
        };
        let (exp, identity) = (claims.exp, Arc::new(identity_of(&claims)));
        drop(claims);
        // Private channels: the realtime.messages SELECT policies must let the token read
        // broadcast or presence (see crate::authz::private); the result is kept until access_token.
        let perms = if join.config.private {
            match self
                .private_perms(&identity, name, join.config.presence.enabled)
                .await
            {
                Ok(p) => Some(p),
                Err((reason, message)) => return self.join_error(frame, reason, message).await,
            }
        } else {
            None
        };
        let entries = join.config.postgres_changes.clone();
        let id = self.state.next_subscriber_id();
        let reply_ids: Vec<(u32, &serde_json::value::RawValue)> =
            entries.iter().map(|e| (id_for(e), &*e.raw)).collect();
        let reply = join_reply_ok(&reply_ids);
        let reply_frame = encode_push(
            self.vsn,
            frame.join_ref.as_deref(),
            frame.msg_ref.as_deref(),
            &topic,
            "phx_reply",
            &reply,
        );
        let mut channel = Channel {
            id,
            topic: Arc::from(topic.as_str()),
            join_ref: frame.join_ref.clone(),
            token,
            exp,
            identity,
            entries,
            registered: false,
            realtime: ChannelRealtime::new(name, &join),
            perms,
            events: (0, 0),
        };
        if channel.entries.is_empty() {
            self.send(reply_frame);
        } else {
            let checked = self.register(&channel).await;
            let jr = channel.join_ref.as_deref();
            let mut queued = vec![reply_frame];
            for message in &checked.errors {
                queued.push(self.system_frame(
                    &topic,
                    jr,
                    SystemExtension::PostgresChanges,
                    SystemStatus::Error,
                    message,
                ));
            }
            if checked.bindings.is_empty() {
                for f in queued {
                    self.send(f);
                }
            } else {
                queued.push(self.system_frame(
                    &topic,
                    jr,
                    SystemExtension::PostgresChanges,
                    SystemStatus::Ok,
                    "Subscribed to PostgreSQL",
                ));
                let target = self.target(&channel);
                let outbox = self.outbox.clone();
                // Queued under the hub lock: the reply precedes every change for the channel.
                self.state
                    .hub
                    .subscribe(id, target, checked.bindings, move || {
                        for f in queued {
                            outbox.push(OutFrame::text(f));
                        }
                    });
                channel.registered = true;
            }
        }
        // After the reply is queued: presence_state (when asked for) follows it, and every
        // broadcast or diff published from here on reaches the channel.
        let presence_state = join
            .config
            .presence
            .enabled
            .then_some(channel.join_ref.as_deref());
        self.state.topics.join(
            &channel.realtime.key,
            channel.id,
            Member {
                outbox: self.outbox.clone(),
                vsn: self.vsn,
                // Private channels: only what the read policies allow.
                broadcast: channel.perms.is_none_or(|p| p.broadcast_read),
                presence: channel.perms.is_none_or(|p| p.presence_read),
            },
            presence_state,
        );
        metrics::channel_joined(kind_of(&channel));
        self.channels.insert(channel);
    }

    /// Read permissions of a private channel, or the join error (metric reason, message).
    async fn private_perms(
        &self,
        identity: &Identity,
        name: &str,
        presence: bool,
    ) -> Result<ChannelPerms, (&'static str, String)> {
        match private::read_perms(&self.state, identity, name, presence).await {
            Ok(p) if p.may_join() => Ok(p),
            Ok(_) => Err(("unauthorized", private::unauthorized_read(name))),
            Err(AuthzError::Failed { code, message }) => {
                tracing::debug!(%code, %message, topic = %name, "private channel read check failed");
                Err(("unauthorized", private::unauthorized_read(name)))
            }
            Err(AuthzError::Unavailable(e)) => {
                tracing::warn!(error = %e, topic = %name, "private channel check unavailable");
                Err((
                    "unavailable",
                    "Realtime was unable to connect to the project database".to_string(),
                ))
            }
        }
    }

    fn target(&self, channel: &Channel) -> ChannelTarget {
        ChannelTarget {
            outbox: self.outbox.clone(),
            vsn: self.vsn,
            topic: channel.topic.clone(),
            identity: channel.identity.clone(),
        }
    }

    /// Validate a channel's postgres_changes entries under its role.
    async fn register(&self, channel: &Channel) -> Checked {
        let topic = &*channel.topic;
        // Bindings are only live once the replication stream runs; wait for it (bounded) so
        // a successful reply never promises changes the stream cannot deliver.
        if !self.state.wait_streaming(Duration::from_secs(5)).await {
            tracing::warn!(%topic, "join while replication is not running");
            return Checked {
                bindings: Vec::new(),
                errors: vec!["Realtime was unable to connect to the project database".into()],
            };
        }
        build_bindings(&self.state, &channel.identity.role, &channel.entries).await
    }

    async fn on_access_token(&mut self, topic: &str, token: String) {
        let Some(ch) = self.channels.get(topic) else {
            return;
        };
        if *ch.token == *token {
            return;
        }
        let claims = match self.state.jwt.verify(&token, now_unix()) {
            Ok(c) => c,
            Err(e) => {
                self.close_channel(topic, &e.system_message());
                return;
            }
        };
        let Some(ch) = self.channels.get_mut(topic) else {
            return;
        };
        ch.token = Arc::from(token);
        // Write permissions are evaluated again under the new token.
        ch.realtime.can_broadcast = None;
        ch.realtime.can_track = None;
        let identity = identity_of(&claims);
        // The claims JSON is serialized from the verified map, so equal maps give equal text.
        let role_or_claims_changed = *ch.identity != identity;
        ch.exp = claims.exp;
        if role_or_claims_changed {
            ch.identity = Arc::new(identity);
        }
        if ch.perms.is_some() && role_or_claims_changed {
            // Read permissions are evaluated again too; losing them ends the channel.
            let presence = ch.perms.is_some_and(|p| p.presence_read);
            let (identity, name) = (ch.identity.clone(), ch.realtime.key.name.clone());
            match self.private_perms(&identity, &name, presence).await {
                Ok(p) => {
                    if let Some(ch) = self.channels.get_mut(topic) {
                        ch.perms = Some(p);
                    }
                }
                Err((_, message)) => {
                    self.close_channel(topic, &message);
                    return;
                }
            }
        }
        let Some(ch) = self.channels.get(topic) else {
            return;
        };
        if !(ch.registered && role_or_claims_changed) {
            return;
        }
        // Re-scope: the bindings are checked again under the new role and claims.
        let checked = self.register(ch).await;
        match checked.errors.first() {
            None => {
                let target = self.target(ch);
                self.state
                    .hub
                    .subscribe(ch.id, target, checked.bindings, || ());
            }
            // The new identity may not see what the old one could: stop the channel.
            Some(message) => {
                let message = message.clone();
                self.close_channel(topic, &message);
            }
        }
    }
}

impl Socket {
    /// A broadcast or presence push on a joined channel.
    async fn on_channel_push(&mut self, mut frame: InboundFrame) {
        let max = self.state.limits.max_events_per_second;
        if let Some(ch) = self.channels.get_mut(&frame.topic) {
            let now = now_unix();
            if ch.events.0 != now {
                ch.events = (now, 0);
            }
            ch.events.1 = ch.events.1.saturating_add(1);
            if ch.events.1 > max {
                metrics::channel_closed("events_rate");
                self.close_channel(&frame.topic, "Too many messages per second");
                return;
            }
        }
        match std::mem::replace(&mut frame.payload, Inbound::Leave) {
            Inbound::Broadcast(push) => self.on_broadcast(&frame, push).await,
            Inbound::Presence(push) => self.on_presence(&frame, push).await,
            _ => {}
        }
    }

    /// Private channels: may this channel write `ext` messages? Evaluated once, cached.
    async fn may_write(&mut self, topic: &str, ext: Extension) -> bool {
        let Some(ch) = self.channels.get(topic) else {
            return false;
        };
        if !ch.realtime.key.private {
            return true;
        }
        let cached = match ext {
            Extension::Broadcast => ch.realtime.can_broadcast,
            Extension::Presence => ch.realtime.can_track,
        };
        if let Some(allowed) = cached {
            return allowed;
        }
        let allowed = can_write_as(&self.state, &ch.identity, &ch.realtime.key.name, ext).await;
        if let Some(ch) = self.channels.get_mut(topic) {
            match ext {
                Extension::Broadcast => ch.realtime.can_broadcast = Some(allowed),
                Extension::Presence => ch.realtime.can_track = Some(allowed),
            }
        }
        allowed
    }

    async fn on_broadcast(&mut self, frame: &InboundFrame, push: BroadcastPush) {
        if !self.may_write(&frame.topic, Extension::Broadcast).await {
            // Dropped without a reply, even with ack (the reference server does the same).
            metrics::delivery_dropped("unauthorized");
            return;
        }
        let Some(ch) = self.channels.get(&frame.topic) else {
            return;
        };
        let body = match push {
            BroadcastPush::Json(j) => Body::Map(String::from(Box::<str>::from(j.payload))),
            BroadcastPush::Binary(b) => Body::User(b.into()),
        };
        if body.payload_len() > self.state.limits.broadcast.max_payload_bytes {
            if ch.realtime.ack {
                self.reply(
                    frame,
                    &outbound::reply_error_response(r#""payload_size_exceeded""#),
                );
            }
            return;
        }
        let exclude = (!ch.realtime.self_broadcast).then_some(ch.id);
        let ack = ch.realtime.ack;
        let stats = self.state.topics.publish(&ch.realtime.key, &body, exclude);
        metrics::broadcast("client", stats.delivered);
        if stats.dropped > 0 {
            metrics::delivery_dropped_n("slow_client", stats.dropped);
        }
        if ack {
            self.reply(frame, outbound::REPLY_OK_EMPTY);
        }
    }

    async fn on_presence(&mut self, frame: &InboundFrame, push: PresencePush) {
        let limits = self.state.limits.broadcast.clone();
        let Some(ch) = self.channels.get_mut(&frame.topic) else {
            return;
        };
        if !ch
            .realtime
            .presence_calls
            .hit(limits.presence_max_calls, limits.presence_window)
        {
            self.close_channel(&frame.topic, "Client presence rate limit exceeded");
            return;
        }
        match push {
            PresencePush::Track { payload } => {
                if payload.get().len() > limits.max_payload_bytes {
                    self.close_channel(&frame.topic, "Track message size exceeded");
                    return;
                }
                if !self.may_write(&frame.topic, Extension::Presence).await {
                    self.reply(frame, &outbound::reply_error_response("{}"));
                    return;
                }
                let Some(ch) = self.channels.get_mut(&frame.topic) else {
                    return;
                };
                let key = ch
                    .realtime
                    .presence_key
                    .get_or_insert_with(|| uuid::Uuid::new_v4().to_string());
                self.state
                    .topics
                    .track(&ch.realtime.key, ch.id, key, payload.get());
                metrics::presence_event("track");
            }
            PresencePush::Untrack => {
                self.state.topics.untrack(&ch.realtime.key, ch.id);
                metrics::presence_event("untrack");
            }
        }
        self.reply(frame, outbound::REPLY_OK_EMPTY);
    }
}

fn kind_of(ch: &Channel) -> &'static str {
    if ch.registered {
        "postgres_changes"
    } else {
        "plain"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, B, C, D, Fut, F>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection's memory is mostly its task: keep the future small (a join, which
    /// awaits catalog queries, is boxed while it runs instead of being inlined).
    #[test]
    fn connection_task_stays_small() {
        let size = output_size(run);
        assert!(size < 2048, "socket task future is {size} bytes");
        eprintln!("socket task future: {size} bytes");
    }

    /// What one joined channel costs an idle socket besides its heap strings: the channel
    /// itself (held in a vector grown one slot at a time, so one channel is one slot).
    #[test]
    fn a_channel_stays_small() {
        let size = std::mem::size_of::<Channel>();
        eprintln!("channel: {size} bytes");
        assert!(size <= 256, "Channel is {size} bytes");
    }

    fn channel(topic: &str) -> Channel {
        Channel {
            id: 1,
            topic: Arc::from(topic),
            join_ref: None,
            token: Arc::from("t"),
            exp: 0,
            identity: Arc::new(Identity {
                role: Arc::from("anon"),
                claims: Arc::from("{}"),
            }),
            entries: Vec::new(),
            registered: false,
            realtime: ChannelRealtime::new("x", &JoinPayload::default()),
            perms: None,
            events: (0, 0),
        }
    }

    #[test]
    fn channels_grow_one_slot_at_a_time_and_replace_by_topic() {
        let mut chs = Channels::default();
        chs.insert(channel("realtime:a"));
        assert_eq!(chs.0.capacity(), 1);
        chs.insert(channel("realtime:b"));
        assert_eq!(chs.0.capacity(), 2);
        let mut again = channel("realtime:a");
        again.id = 7;
        chs.insert(again);
        assert_eq!(chs.len(), 2);
        assert_eq!(chs.get("realtime:a").map(|c| c.id), Some(7));
        assert!(chs.remove("realtime:a").is_some());
        assert!(!chs.contains("realtime:a"));
        assert!(chs.get_mut("realtime:b").is_some());
        // No presence key is made before the channel tracks.
        assert!(chs
            .get("realtime:b")
            .unwrap()
            .realtime
            .presence_key
            .is_none());
    }
}
