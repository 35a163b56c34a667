//! Client presence pushes (`track` / `untrack`).
//!
//! `type` is optional (the Python client omits it) and `event` is case-insensitive. A
//! `track` whose payload is not an object is refused with the reference server's reply
//! reason, so the server can answer without knowing the rule.

use serde_json::value::RawValue;

use crate::lenient::{self, RawObject};

/// Reply reason for a `track` without an object payload (same text as the reference server).
pub const TRACK_PAYLOAD_NOT_A_MAP: &str = "Presence track payload must be a map";

/// A `presence` push from a client.
#[derive(Debug, Clone)]
pub enum PresencePush {
    /// Track (or update) this channel's presence with `payload` (a JSON object, as sent).
    Track {
        /// The tracked state; the server merges `phx_ref` into it to form the meta.
        payload: Box<RawValue>,
    },
    /// Remove this channel's presence.
    Untrack,
}

/// Reads a presence payload; `Err` is the reason for the error reply.
pub(crate) fn parse(payload: &RawValue) -> Result<PresencePush, String> {
    let Some(obj) = RawObject::parse(payload) else {
        return Err(format!(
            "presence payload must be an object, got {}",
            lenient::kind(payload)
        ));
    };
    let event = obj
        .get_non_null("event")
        .and_then(|raw| lenient::string(raw).ok())
        .unwrap_or_default();
    if event.eq_ignore_ascii_case("track") {
        match obj.get("payload") {
            Some(p) if lenient::is_object(p) => Ok(PresencePush::Track {
                payload: p.to_owned(),
            }),
            _ => Err(TRACK_PAYLOAD_NOT_A_MAP.to_owned()),
        }
    } else if event.eq_ignore_ascii_case("untrack") {
        Ok(PresencePush::Untrack)
    } else {
        Err("presence event must be track or untrack".to_owned())
    }
}
