//! Stored broadcasts and their replay at join (`config.broadcast.replay: {since, limit}`).
//!
//! ```text
//!  join (private, broadcast read) with replay ─▶ validate {since, limit} ─▶ SELECT the newest
//!    `limit` private broadcast rows of the topic inserted since `since` (and not expired)
//!  ─▶ join reply, then each row oldest first as a broadcast with meta {replayed: true, id},
//!     then live messages; a live copy of a replayed id is not delivered to that channel
//! ```
//!
//! Invariants:
//! - Only private channels whose token may read broadcasts replay (checked before the query);
//!   the error texts are Supabase's.
//! - At most [`MAX_REPLAY`] rows per join, so the replayed-id set a channel keeps is small.
//! - Values are bound parameters; nothing from the client is pasted into SQL.
//! - A persisted send (client `persist`, `httpSend` `persist`) is stored AS its sender, so the
//!   INSERT policies decide, and delivered live only once its row is committed (with
//!   meta `{"id"}`); its row is marked `skip_broadcast`, so the WAL copy is not delivered again.

use bytes::Bytes;
use walcast_core::broadcast::{Body, UserBroadcast};
use walcast_protocol::{PayloadEncoding, ReplayConfig};

use crate::db::sql::SqlPool;
use crate::realtime::broadcast::id_meta;

/// Most messages one join replays (Supabase's hard limit); larger limits are clamped.
pub const MAX_REPLAY: i64 = 25;
/// The limit when the join gives none (Supabase's default).
pub const DEFAULT_REPLAY: i64 = 25;

/// Join errors, word for word as Supabase sends them.
pub const REPLAY_PUBLIC: &str = "UnableToReplayMessages: Replay is not allowed for public channels";
pub const REPLAY_INVALID: &str = "UnableToReplayMessages: Replay params are not valid";
pub const REPLAY_FAILED: &str = "UnableToReplayMessages: Realtime was unable to replay messages";

/// The range of unix milliseconds Supabase accepts for `since` (years -9999 to 9999).
const SINCE_RANGE: std::ops::RangeInclusive<i64> = -377_705_116_800_000..=253_402_300_799_999;

/// A validated replay request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replay {
    pub since_ms: i64,
    pub limit: i64,
}

impl Replay {
    /// `since` is required and must be a representable time; `limit` defaults to
    /// [`DEFAULT_REPLAY`] and is clamped to 1..=[`MAX_REPLAY`]. `None`: not valid.
    pub fn from_config(c: &ReplayConfig) -> Option<Replay> {
        if c.invalid {
            return None;
        }
        let since_ms = c.since.filter(|s| SINCE_RANGE.contains(s))?;
        let limit = c.limit.unwrap_or(DEFAULT_REPLAY).clamp(1, MAX_REPLAY);
        Some(Replay { since_ms, limit })
    }
}

/// One stored message read for a replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: String,
    pub event: String,
    pub encoding: PayloadEncoding,
    pub payload: Bytes,
}

impl StoredMessage {
    /// The broadcast a replay sends: the stored event and payload, meta
    /// `{"replayed":true,"id":…}`.
    pub fn replay_body(&self) -> Body {
        Body::User(UserBroadcast {
            event: self.event.clone(),
            encoding: self.encoding,
            meta: Some(id_meta(&self.id, true)),
            payload: self.payload.clone(),
        })
    }
}

const REPLAY_SQL: &str = "\
SELECT id::pg_catalog.text, event, payload::pg_catalog.text, binary_payload
FROM realtime.messages
WHERE topic = $1 AND private AND extension = 'broadcast' AND event IS NOT NULL
  AND (payload IS NOT NULL OR binary_payload IS NOT NULL)
  AND inserted_at >= pg_catalog.to_timestamp($2::pg_catalog.int8 / 1000.0)
  AND inserted_at < pg_catalog.now() + interval '1 minute'
  AND (expires_at IS NULL OR expires_at > pg_catalog.now())
ORDER BY inserted_at DESC, id DESC
LIMIT $3::pg_catalog.int8";

/// The newest `replay.limit` stored broadcasts of the private topic `sub_topic` since
/// `replay.since_ms`, oldest first. Run as walcast's own user: the caller checked that the
/// channel's token may read the topic.
pub async fn replay(
    sql: &SqlPool,
    sub_topic: &str,
    replay: Replay,
) -> anyhow::Result<Vec<StoredMessage>> {
    let client = sql.get().await?;
    let rows = client
        .query(REPLAY_SQL, &[&sub_topic, &replay.since_ms, &replay.limit])
        .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows.iter().rev() {
        let id: String = row.try_get(0)?;
        let event: String = row.try_get(1)?;
        let json: Option<String> = row.try_get(2)?;
        let binary: Option<Vec<u8>> = row.try_get(3)?;
        let (encoding, payload) = match (json, binary) {
            (Some(j), _) => (PayloadEncoding::Json, Bytes::from(j)),
            (None, Some(b)) => (PayloadEncoding::Binary, Bytes::from(b)),
            (None, None) => continue,
        };
        out.push(StoredMessage {
            id,
            event,
            encoding,
            payload,
        });
    }
    Ok(out)
}

/// Persisting sends refused before they reach the database: the texts the official client
/// itself uses for these cases, so a `send()` with `ack` resolves with the same reason
/// whichever side noticed.
pub const PERSIST_PUBLIC: &str = "Realtime send() cannot store a message on a public channel.";
pub const PERSIST_VSN1: &str = "Realtime send() cannot store a message with protocol 1.0.0. Use httpSend() or connect with vsn 2.0.0.";
/// The stored row could not be written (database unavailable, a policy raised, ...).
pub const PERSIST_FAILED: &str = "UnableToPersistMessage: Realtime was unable to store the message";
/// A `persist` that is neither `true` nor `{ttl: <positive integer>}`.
pub const PERSIST_INVALID: &str =
    "UnableToPersistMessage: persist must be true or {ttl: <positive integer seconds>}";

/// The reason a persisting send without write permission gets.
pub fn persist_unauthorized(sub_topic: &str) -> String {
    format!("Unauthorized: You do not have permissions to write to this Channel topic: {sub_topic}")
}

/// What a send asked for with its `persist` hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Not stored (absent, `null` or `false`).
    No,
    /// Stored; with a ttl in seconds, or until the retention.
    Yes(Option<i64>),
    /// A `persist` value walcast cannot honour.
    Invalid,
}

impl Persist {
    /// From the `persist` member of a JSON object (a kind 3 push's metadata, or a text
    /// push's payload map).
    pub fn of_object(object: &str) -> Persist {
        #[derive(serde::Deserialize)]
        struct Hint<'a> {
            #[serde(borrow)]
            persist: Option<&'a serde_json::value::RawValue>,
        }
        // Cheap test first: almost no broadcast carries the hint.
        if !object.contains("\"persist\"") {
            return Persist::No;
        }
        let Ok(hint) = serde_json::from_str::<Hint<'_>>(object) else {
            return Persist::No;
        };
        let Some(raw) = hint.persist else {
            return Persist::No;
        };
        match serde_json::from_str::<serde_json::Value>(raw.get()) {
            Ok(serde_json::Value::Bool(true)) => Persist::Yes(None),
            Ok(serde_json::Value::Bool(false) | serde_json::Value::Null) => Persist::No,
            Ok(serde_json::Value::Object(o)) => match o.get("ttl") {
                None | Some(serde_json::Value::Null) => Persist::Yes(None),
                Some(t) => t
                    .as_i64()
                    .filter(|t| *t > 0)
                    .map_or(Persist::Invalid, |t| Persist::Yes(Some(t))),
            },
            _ => Persist::Invalid,
        }
    }
}

/// Why a persisted send was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRefused {
    /// The INSERT policies refused the row.
    Denied,
    /// The row could not be written.
    Failed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(since: Option<i64>, limit: Option<i64>, invalid: bool) -> ReplayConfig {
        ReplayConfig {
            since,
            limit,
            invalid,
        }
    }

    #[test]
    fn replay_parameters_follow_supabase_bounds() {
        assert_eq!(
            Replay::from_config(&cfg(Some(5), None, false)),
            Some(Replay {
                since_ms: 5,
                limit: 25
            })
        );
        let clamp = |l| Replay::from_config(&cfg(Some(0), Some(l), false)).map(|r| r.limit);
        assert_eq!(clamp(100), Some(25));
        assert_eq!(clamp(0), Some(1));
        assert_eq!(clamp(-3), Some(1));
        assert_eq!(clamp(7), Some(7));
        // since is required, must be a time, and the parameters must be integers.
        assert_eq!(Replay::from_config(&cfg(None, Some(3), false)), None);
        assert_eq!(Replay::from_config(&cfg(Some(i64::MAX), None, false)), None);
        assert_eq!(Replay::from_config(&cfg(Some(1), Some(1), true)), None);
    }

    #[test]
    fn persist_hints() {
        assert_eq!(
            Persist::of_object(r#"{"persist":true}"#),
            Persist::Yes(None)
        );
        assert_eq!(
            Persist::of_object(r#"{"persist":{"ttl":30}}"#),
            Persist::Yes(Some(30))
        );
        assert_eq!(Persist::of_object(r#"{"persist":false}"#), Persist::No);
        assert_eq!(Persist::of_object(r#"{"type":"broadcast"}"#), Persist::No);
        assert_eq!(
            Persist::of_object(r#"{"persist":{"ttl":0}}"#),
            Persist::Invalid
        );
        assert_eq!(Persist::of_object(r#"{"persist":"yes"}"#), Persist::Invalid);
        // A nested "persist" inside the user payload is not the hint.
        assert_eq!(
            Persist::of_object(r#"{"payload":{"persist":true}}"#),
            Persist::No
        );
    }
}
