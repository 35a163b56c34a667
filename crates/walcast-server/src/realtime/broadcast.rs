//! Broadcast and presence, the server side: limits, the private-channel write check, and
//! broadcasts emitted from SQL (`realtime.send`).
//!
//! ```text
//!  client push ──socket.rs──┐  size limit, write check (private), presence call window
//!  POST /api/broadcast ─────┼─ broadcast_api.rs: auth, validation, rate window, write check
//!  realtime.send() in SQL   │
//!    pg_logical_emit_message(true, 'realtime.broadcast', {topic,event,payload,private,id})
//!    ── WAL, decoded only if the transaction commits ──▶ pump ──▶ deliver_db_message ─┘
//!                                                                 ▼
//!                                                 walcast_core::broadcast::Topics (fan-out)
//! ```
//!
//! Invariants:
//! - A private topic is only written to after [`can_write`] said yes for the caller's
//!   identity, on every path (WebSocket, HTTP); SQL senders are trusted (they already ran
//!   SQL on the database).
//! - Database broadcasts are transactional logical messages: nothing is stored, nothing is
//!   delivered for a rolled-back transaction, and delivery follows commit order.
//! - Rate windows are plain counters checked on the request path: no timers.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use walcast_core::broadcast::{Body, FanoutStats, TopicKey, Topics, UserBroadcast};
use walcast_core::hub::Identity;
use walcast_protocol::PayloadEncoding;

use crate::auth::Claims;
use crate::state::AppState;

/// Prefix of the logical messages `realtime.send` emits (`sql/realtime_send.sql`).
pub const DB_BROADCAST_PREFIX: &str = "realtime.broadcast";

/// Limits of the broadcast and presence paths (Supabase's defaults).
#[derive(Debug, Clone)]
pub struct BroadcastLimits {
    /// Largest broadcast or track payload, in bytes (`max_payload_size_in_kb`, 3000 KB).
    pub max_payload_bytes: usize,
    /// Presence calls (track/untrack) one channel may make per window (5).
    pub presence_max_calls: u32,
    /// The presence call window (30 s).
    pub presence_window: Duration,
    /// Messages per second accepted by the REST endpoints, all callers together.
    pub rest_messages_per_second: u32,
}

impl Default for BroadcastLimits {
    fn default() -> Self {
        BroadcastLimits {
            max_payload_bytes: 3000 * 1024,
            presence_max_calls: 5,
            presence_window: Duration::from_secs(30),
            rest_messages_per_second: 1000,
        }
    }
}

pub use crate::authz::private::Extension;

/// May `claims` write `extension` messages to the private topic `sub_topic`? The INSERT
/// policies of `realtime.messages` decide ([`crate::authz::private::can_write`]); a check that
/// fails is a no (default deny).
pub async fn can_write(
    state: &AppState,
    claims: &Claims,
    sub_topic: &str,
    extension: Extension,
) -> bool {
    let identity = crate::authz::private::identity_of(claims);
    can_write_as(state, &identity, sub_topic, extension).await
}

/// [`can_write`] for an identity already derived from verified claims (a joined channel
/// keeps its identity, not the claims).
pub async fn can_write_as(
    state: &AppState,
    identity: &Identity,
    sub_topic: &str,
    extension: Extension,
) -> bool {
    match crate::authz::private::can_write(state, identity, sub_topic, extension).await {
        Ok(allowed) => allowed,
        Err(e) => {
            tracing::warn!(error = %e, topic = %sub_topic, extension = extension.as_str(),
                "private write check failed; refusing");
            false
        }
    }
}

/// A fixed-window counter: at most `limit` units per `window`. Checked and updated on the
/// request path, so it needs no timer.
#[derive(Debug)]
pub struct RateWindow {
    window: Duration,
    state: Mutex<(Instant, u64)>,
}

impl RateWindow {
    pub fn new(window: Duration) -> RateWindow {
        RateWindow {
            window,
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Take `n` units if they fit under `limit` in the current window.
    pub fn try_take(&self, n: u64, limit: u64) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.0.elapsed() >= self.window {
            *st = (Instant::now(), 0);
        }
        if st.1 + n > limit {
            return false;
        }
        st.1 += n;
        true
    }
}

/// Per-channel presence call counter (one per channel, no timer: the window restarts on
/// the first call after it ran out).
#[derive(Debug, Clone)]
pub struct CallWindow {
    start: Instant,
    calls: u32,
}

impl Default for CallWindow {
    fn default() -> Self {
        CallWindow {
            start: Instant::now(),
            calls: 0,
        }
    }
}

impl CallWindow {
    /// Count one call; false when it goes over `max` in `window`.
    pub fn hit(&mut self, max: u32, window: Duration) -> bool {
        if self.start.elapsed() >= window {
            self.start = Instant::now();
            self.calls = 0;
        }
        self.calls += 1;
        self.calls <= max
    }
}

#[derive(Deserialize)]
struct DbMessage<'a> {
    #[serde(borrow)]
    topic: &'a str,
    #[serde(borrow)]
    event: &'a str,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    private: bool,
    #[serde(borrow)]
    id: &'a str,
}

/// Deliver one `realtime.send` message (the logical message content) to its topic:
/// kind 4 with metadata `{"id":…}` to vsn 2.0.0 members, text with `meta` to vsn 1.0.0.
pub fn deliver_db_message(topics: &Topics, content: &[u8]) -> Option<FanoutStats> {
    let msg: DbMessage<'_> = match serde_json::from_slice(content) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring a malformed realtime.broadcast message");
            return None;
        }
    };
    let mut meta = String::with_capacity(msg.id.len() + 10);
    meta.push_str("{\"id\":");
    walcast_core::write_json_string(msg.id, &mut meta);
    meta.push('}');
    let body = Body::User(UserBroadcast {
        event: msg.event.to_owned(),
        encoding: PayloadEncoding::Json,
        meta: Some(meta),
        payload: Bytes::copy_from_slice(msg.payload.get().as_bytes()),
    });
    let stats = topics.publish(&TopicKey::new(msg.topic, msg.private), &body, None);
    crate::metrics::broadcast("database", stats.delivered);
    Some(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_window_counts_and_resets() {
        let mut w = CallWindow::default();
        for _ in 0..5 {
            assert!(w.hit(5, Duration::from_secs(30)));
        }
        assert!(!w.hit(5, Duration::from_secs(30)));
        assert!(w.hit(5, Duration::ZERO));
    }

    #[test]
    fn rate_window() {
        let r = RateWindow::new(Duration::from_secs(3600));
        assert!(r.try_take(3, 5));
        assert!(!r.try_take(3, 5));
        assert!(r.try_take(2, 5));
        assert!(!r.try_take(1, 5));
    }

    #[test]
    fn db_message_malformed_is_ignored() {
        let t = Topics::new(0);
        assert!(deliver_db_message(&t, b"not json").is_none());
        let ok = deliver_db_message(
            &t,
            br#"{"topic":"t","event":"e","payload":{"a":1},"private":false,"id":"x"}"#,
        )
        .unwrap();
        assert_eq!(ok.delivered, 0);
    }
}
