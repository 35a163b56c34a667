//! Broadcast and presence, the server side: limits, the private-channel write check, and
//! broadcasts from SQL (`realtime.send`, rows of `realtime.messages`).
//!
//! ```text
//!  client push ──socket──────┐  size limit, write check (private), presence call window
//!  POST /api/broadcast ──────┼─ http/broadcast_api.rs: auth, validation, rates, write check
//!  realtime.send() in SQL    │
//!    INSERT INTO realtime.messages as the caller (its INSERT policies decide)
//!    ── WAL, decoded only if the transaction commits ──▶ pump ──▶ deliver_message_row ─┘
//!                                                                 ▼
//!                                                 walcast_core::broadcast::Topics (fan-out)
//! ```
//!
//! Invariants:
//! - A private topic is only written to after [`can_write`] said yes for the caller's
//!   identity, on every path: WebSocket, HTTP, and SQL, where the row's very existence proves
//!   its author passed the INSERT policies of `realtime.messages` (walcast's own probe rows
//!   are always rolled back, so they never reach the WAL). Logical messages
//!   (`pg_logical_emit_message`) are never delivered: anyone can emit them.
//! - Database broadcasts follow commit order; nothing is delivered for a rolled-back
//!   transaction.

use std::time::Duration;

use bytes::Bytes;
use walcast_core::broadcast::{Body, FanoutStats, TopicKey, Topics, UserBroadcast};
use walcast_core::change::{Change, ChangeKind, Value};
use walcast_core::hub::Identity;
use walcast_protocol::PayloadEncoding;

use crate::auth::Claims;
use crate::state::AppState;

/// Limits of the broadcast and presence paths (Supabase's defaults).
#[derive(Debug, Clone)]
pub struct BroadcastLimits {
    /// Largest broadcast or track payload, in bytes (`max_payload_size_in_kb`, 3000 KB).
    pub max_payload_bytes: usize,
    /// Presence calls (track/untrack) one channel may make per window (5).
    pub presence_max_calls: u32,
    /// The presence call window (30 s).
    pub presence_window: Duration,
    /// Largest payload one channel may track.
    pub max_presence_payload_bytes: usize,
    /// Largest presence state of one topic.
    pub max_presence_state_bytes: usize,
}

impl Default for BroadcastLimits {
    fn default() -> Self {
        BroadcastLimits {
            max_payload_bytes: 3000 * 1024,
            presence_max_calls: 5,
            presence_window: Duration::from_secs(30),
            max_presence_payload_bytes: 64 * 1024,
            max_presence_state_bytes: 4 * 1024 * 1024,
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
            tracing::warn!(error = ?e.to_string(), topic = ?sub_topic, extension = extension.as_str(),
                "private write check failed; refusing");
            false
        }
    }
}

/// The schema and table whose inserted rows are database broadcasts.
pub const MESSAGES_TABLE: (&str, &str) = ("realtime", "messages");

/// Whether `change` is a committed `realtime.messages` row to broadcast.
pub fn is_message_row(change: &Change) -> bool {
    change.kind == ChangeKind::Insert
        && &*change.table.schema == MESSAGES_TABLE.0
        && &*change.table.name == MESSAGES_TABLE.1
}

/// Deliver one inserted `realtime.messages` row with `extension = 'broadcast'` to its topic:
/// kind 4 with metadata `{"id":…}` to vsn 2.0.0 members, text with `meta` to vsn 1.0.0. A
/// `binary_payload` row (`realtime.send_binary`) goes as a binary kind 4 frame to vsn 2.0.0
/// members only. Rows of other extensions, without a topic, event or payload, or marked
/// `skip_broadcast` (a persisted send walcast already delivered live) deliver nothing, and
/// channels that got the row replayed at their join are skipped.
pub fn deliver_message_row(topics: &Topics, change: &Change) -> Option<FanoutStats> {
    let record = change.record.as_deref()?;
    let column = |name: &str| -> Option<&Value> {
        let i = change.table.columns.iter().position(|c| &*c.name == name)?;
        record.get(i)
    };
    let text = |name: &str| column(name).and_then(Value::text);
    if text("extension") != Some("broadcast") {
        return None;
    }
    if text("skip_broadcast") == Some("t") {
        return None;
    }
    let payload = match (text("payload"), text("binary_payload")) {
        (Some(json), _) => Some((
            PayloadEncoding::Json,
            Bytes::copy_from_slice(json.as_bytes()),
        )),
        (None, Some(hex)) => decode_bytea(hex).map(|b| (PayloadEncoding::Binary, Bytes::from(b))),
        (None, None) => None,
    };
    let (Some(topic), Some(event), Some(id), Some((encoding, payload))) =
        (text("topic"), text("event"), text("id"), payload)
    else {
        tracing::debug!("ignoring a realtime.messages row without topic, event, id or payload");
        return None;
    };
    // `private` defaults to true in the table; a NULL is as private as it gets.
    let private = text("private").is_none_or(|p| p != "f");
    let body = Body::User(UserBroadcast {
        event: event.to_owned(),
        encoding,
        meta: Some(id_meta(id, false)),
        payload,
    });
    let stats = topics.publish_at(
        &TopicKey::new(topic, private),
        &body,
        Some(id),
        change.position(),
        change.xid,
    );
    crate::metrics::broadcast("database", stats.delivered);
    Some(stats)
}

/// The metadata object of a stored message: `{"id":…}`, or `{"replayed":true,"id":…}` when
/// it is sent by a join's replay.
pub fn id_meta(id: &str, replayed: bool) -> String {
    let mut meta = String::with_capacity(id.len() + 26);
    meta.push_str(if replayed {
        "{\"replayed\":true,\"id\":"
    } else {
        "{\"id\":"
    });
    walcast_core::write_json_string(id, &mut meta);
    meta.push('}');
    meta
}

/// A `bytea` column in Postgres' text output (`\x` and hex digits); `None` for anything else
/// (the legacy escape format is not produced with the default `bytea_output`).
pub fn decode_bytea(text: &str) -> Option<Vec<u8>> {
    let hex = text.strip_prefix("\\x")?.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    hex.chunks_exact(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Arc;
    use walcast_core::broadcast::{JoinOptions, Member};
    use walcast_core::change::{Column, Table};
    use walcast_core::hub::{OutFrame, Outbox};
    use walcast_pgoutput::{Lsn, ReplicaIdentity};
    use walcast_protocol::Vsn;

    #[derive(Default)]
    struct Sink(std::sync::Mutex<Vec<OutFrame>>);

    impl Outbox for Sink {
        fn push(&self, frame: OutFrame) -> bool {
            self.0.lock().unwrap().push(frame);
            true
        }
    }

    fn row(table: &str, values: &[(&str, Option<&str>)]) -> Change {
        let columns = values
            .iter()
            .map(|(n, _)| Column {
                name: (*n).into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: *n == "id",
            })
            .collect::<Vec<_>>();
        Change {
            table: Arc::new(Table {
                relation_id: 1,
                schema: "realtime".into(),
                name: table.into(),
                replica_identity: ReplicaIdentity::Default,
                columns: columns.into(),
            }),
            kind: ChangeKind::Insert,
            commit_lsn: Lsn(1),
            index_in_txn: 0,
            xid: 0,
            commit_time_us: 0,
            record: Some(
                values
                    .iter()
                    .map(|(_, v)| match v {
                        Some(t) => Value::Present {
                            text: (*t).into(),
                            json: "null".into(),
                        },
                        None => Value::Null,
                    })
                    .collect(),
            ),
            old_record: None,
        }
    }

    #[test]
    fn message_rows_reach_their_topic_and_nothing_else_does() {
        let topics = Topics::new(0);
        let sink = Arc::new(Sink::default());
        let member = Member {
            outbox: sink.clone(),
            vsn: Vsn::V1,
            broadcast: true,
            presence: true,
            replayed: None,
        };
        topics
            .join(
                &TopicKey::new("room", true),
                1,
                member,
                JoinOptions::default(),
                || (),
            )
            .unwrap();
        let good = [
            ("id", Some("6f1c2c2e-0000-4000-8000-000000000001")),
            ("topic", Some("room")),
            ("extension", Some("broadcast")),
            ("event", Some("ev")),
            ("payload", Some(r#"{"a":1}"#)),
            ("private", Some("t")),
        ];
        let change = row("messages", &good);
        assert!(is_message_row(&change));
        assert_eq!(
            deliver_message_row(&topics, &change).map(|s| s.delivered),
            Some(1)
        );
        let text = match &sink.0.lock().unwrap()[0] {
            OutFrame::Text(b) => String::from_utf8(b.to_vec()).unwrap(),
            OutFrame::Binary(_) => panic!("vsn 1 gets text"),
        };
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["payload"]["payload"], serde_json::json!({"a": 1}));
        assert_eq!(
            v["payload"]["meta"]["id"],
            "6f1c2c2e-0000-4000-8000-000000000001"
        );
        // Presence rows, public rows to a private topic and other tables deliver nothing.
        let mut presence = good;
        presence[2].1 = Some("presence");
        assert!(deliver_message_row(&topics, &row("messages", &presence)).is_none());
        let mut public = good;
        public[5].1 = Some("f");
        assert_eq!(
            deliver_message_row(&topics, &row("messages", &public)).map(|s| s.delivered),
            Some(0)
        );
        assert!(!is_message_row(&row("other", &good)));
        let mut no_event = good;
        no_event[3].1 = None;
        assert!(deliver_message_row(&topics, &row("messages", &no_event)).is_none());
        assert_eq!(sink.0.lock().unwrap().len(), 1);
    }
}
