//! Outbound frames and payloads, written as text from pre-serialized pieces.
//!
//! The server serializes each change or broadcast once and shares the bytes across every
//! socket that receives it, so these writers never parse: they splice the caller's JSON
//! pieces (`*_json` arguments, which must be valid JSON) between escaped strings. The
//! per-socket cost is one allocation and a copy.
//!
//! ```text
//! encode_push(V1, ..)  {"topic":T,"event":E,"payload":P,"ref":R}     (no join_ref: the V1
//!                                                                     server serializer never sends it)
//! encode_push(V2, ..)  [J,R,T,E,P]
//! ```
//!
//! Payload builders return the `payload` piece for [`encode_push`]; pick the event from
//! [`event`].

use serde_json::value::RawValue;

use crate::escape::{escaped_len_hint, write_opt_str, write_str};
use crate::lenient::RawObject;
use crate::Vsn;

pub use crate::binary::encode_user_broadcast_binary;

/// Event names the server sends.
pub mod event {
    /// Reply to a client push.
    pub const PHX_REPLY: &str = "phx_reply";
    /// The channel is closed for good (no rejoin).
    pub const PHX_CLOSE: &str = "phx_close";
    /// The channel crashed (client rejoins).
    pub const PHX_ERROR: &str = "phx_error";
    /// Status messages (`{extension,status,message,channel}`).
    pub const SYSTEM: &str = "system";
    /// A row change.
    pub const POSTGRES_CHANGES: &str = "postgres_changes";
    /// A user broadcast.
    pub const BROADCAST: &str = "broadcast";
    /// Full presence state after a join.
    pub const PRESENCE_STATE: &str = "presence_state";
    /// Presence joins and leaves.
    pub const PRESENCE_DIFF: &str = "presence_diff";
}

/// `{"status":"ok","response":{}}`: heartbeat, leave, presence and broadcast-ack replies.
pub const REPLY_OK_EMPTY: &str = r#"{"status":"ok","response":{}}"#;
/// `{}`: the `phx_close` payload.
pub const PHX_CLOSE_PAYLOAD: &str = "{}";
/// The `phx_error` payload current Phoenix sends (clients ignore it).
pub const PHX_ERROR_PAYLOAD: &str = r#"{"reason":"channel_crash"}"#;

/// Writes one text frame.
///
/// vsn 1.0.0 drops `join_ref` (the reference V1 serializer never emits it) and writes
/// `"ref":null` for pushes; vsn 2.0.0 writes the five-element array.
pub fn encode_push(
    vsn: Vsn,
    join_ref: Option<&str>,
    msg_ref: Option<&str>,
    topic: &str,
    event: &str,
    payload_json: &str,
) -> String {
    let hint = |s: Option<&str>| s.map_or(4, escaped_len_hint);
    let cap = 40
        + hint(join_ref)
        + hint(msg_ref)
        + escaped_len_hint(topic)
        + escaped_len_hint(event)
        + payload_json.len();
    let mut out = String::with_capacity(cap);
    match vsn {
        Vsn::V1 => {
            out.push_str(r#"{"topic":"#);
            write_str(&mut out, topic);
            out.push_str(r#","event":"#);
            write_str(&mut out, event);
            out.push_str(r#","payload":"#);
            out.push_str(payload_json);
            out.push_str(r#","ref":"#);
            write_opt_str(&mut out, msg_ref);
            out.push('}');
        }
        Vsn::V2 => {
            out.push('[');
            write_opt_str(&mut out, join_ref);
            out.push(',');
            write_opt_str(&mut out, msg_ref);
            out.push(',');
            write_str(&mut out, topic);
            out.push(',');
            write_str(&mut out, event);
            out.push(',');
            out.push_str(payload_json);
            out.push(']');
        }
    }
    out
}

/// `{"status":"ok","response":<response_json>}`.
pub fn reply_ok(response_json: &str) -> String {
    let mut out = String::with_capacity(32 + response_json.len());
    out.push_str(r#"{"status":"ok","response":"#);
    out.push_str(response_json);
    out.push('}');
    out
}

/// `{"status":"error","response":{"reason":"<code>: <message>"}}`, the join error shape
/// clients display (`InvalidJWTToken: Token has expired 300 seconds ago`).
pub fn reply_error(code: &str, message: &str) -> String {
    reply_error_reason(&format!("{code}: {message}"))
}

/// `{"status":"error","response":{"reason":<reason>}}` with a bare reason, for the
/// replies that have no code (`unmatched topic`, `Unknown Error on Channel`, presence).
pub fn reply_error_reason(reason: &str) -> String {
    let mut out = String::with_capacity(48 + escaped_len_hint(reason));
    out.push_str(r#"{"status":"error","response":{"reason":"#);
    write_str(&mut out, reason);
    out.push_str("}}");
    out
}

/// `{"status":"error","response":<response_json>}` for non-standard error responses, e.g.
/// the broadcast ack's `"payload_size_exceeded"`.
pub fn reply_error_response(response_json: &str) -> String {
    let mut out = String::with_capacity(32 + response_json.len());
    out.push_str(r#"{"status":"error","response":"#);
    out.push_str(response_json);
    out.push('}');
    out
}

/// The successful join reply payload:
/// `{"status":"ok","response":{"postgres_changes":[...]}}`.
///
/// Each binding is the client's original object echoed verbatim (same members, same
/// order, same value text) with an integer `"id"` appended, or, when the object already
/// has an `id` member, with that member's value replaced in place. Entries are never
/// reordered, dropped or merged: clients match reply entry `i` against binding `i`. A
/// non-object (which the join parser never produces) is echoed unchanged.
pub fn join_reply_ok(postgres_changes: &[(u32, &RawValue)]) -> String {
    let body: usize = postgres_changes
        .iter()
        .map(|(_, r)| r.get().len() + 16)
        .sum();
    let mut out = String::with_capacity(64 + body);
    out.push_str(r#"{"status":"ok","response":{"postgres_changes":["#);
    for (i, (id, raw)) in postgres_changes.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_binding_with_id(&mut out, raw, *id);
    }
    out.push_str("]}}");
    out
}

fn write_binding_with_id(out: &mut String, raw: &RawValue, id: u32) {
    let text = raw.get().trim();
    let Some(obj) = RawObject::parse(raw) else {
        out.push_str(text);
        return;
    };
    let members = obj.members();
    if members.iter().any(|(k, _)| k == "id") {
        // Rebuilt member by member; keys are re-escaped from their decoded form, which is
        // the same key to every JSON parser.
        out.push('{');
        for (i, (k, v)) in members.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            write_str(out, k);
            out.push(':');
            if k == "id" {
                out.push_str(&id.to_string());
            } else {
                out.push_str(v.get());
            }
        }
        out.push('}');
        return;
    }
    // Append before the closing brace, keeping the original text untouched.
    let Some(inner) = text.strip_suffix('}') else {
        out.push_str(text);
        return;
    };
    out.push_str(inner);
    if !members.is_empty() {
        out.push(',');
    }
    out.push_str(r#""id":"#);
    out.push_str(&id.to_string());
    out.push('}');
}

/// The `extension` of a `system` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemExtension {
    /// `postgres_changes`: subscription status.
    PostgresChanges,
    /// `system`: channel-level status (shutdown reasons, replication ready).
    System,
}

/// The `status` of a `system` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemStatus {
    /// `ok`.
    Ok,
    /// `error`.
    Error,
}

/// `{"extension":X,"status":S,"message":M,"channel":C}` where `C` is `topic` without its
/// `realtime:` prefix (clients show the channel name, not the topic).
pub fn system(
    extension: SystemExtension,
    status: SystemStatus,
    message: &str,
    topic: &str,
) -> String {
    let channel = topic.strip_prefix("realtime:").unwrap_or(topic);
    let mut out = String::with_capacity(
        64 + escaped_len_hint(message) + escaped_len_hint(channel) + "postgres_changes".len(),
    );
    out.push_str(r#"{"extension":"#);
    out.push_str(match extension {
        SystemExtension::PostgresChanges => r#""postgres_changes""#,
        SystemExtension::System => r#""system""#,
    });
    out.push_str(r#","status":"#);
    out.push_str(match status {
        SystemStatus::Ok => r#""ok""#,
        SystemStatus::Error => r#""error""#,
    });
    out.push_str(r#","message":"#);
    write_str(&mut out, message);
    out.push_str(r#","channel":"#);
    write_str(&mut out, channel);
    out.push('}');
    out
}

/// `{"ids":[...],"data":<data_json>}`: one change for one channel, `ids` being that
/// channel's matching binding ids.
pub fn postgres_changes(ids: &[u32], data_json: &str) -> String {
    let mut out = String::with_capacity(24 + ids.len() * 11 + data_json.len());
    out.push_str(r#"{"ids":["#);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&id.to_string());
    }
    out.push_str(r#"],"data":"#);
    out.push_str(data_json);
    out.push('}');
    out
}

/// `{"type":"broadcast","event":E,"payload":P[,"meta":M]}`: text broadcast built by the
/// server (REST, database), for both vsns.
pub fn broadcast(event: &str, payload_json: &str, meta_json: Option<&str>) -> String {
    let mut out = String::with_capacity(
        48 + escaped_len_hint(event) + payload_json.len() + meta_json.map_or(0, str::len),
    );
    out.push_str(r#"{"type":"broadcast","event":"#);
    write_str(&mut out, event);
    out.push_str(r#","payload":"#);
    out.push_str(payload_json);
    push_meta(&mut out, meta_json);
    out.push('}');
    out
}

/// `{"event":E,"payload":P,"type":"broadcast"[,"meta":M]}`: what a vsn 1.0.0 subscriber
/// gets for a broadcast that arrived binary with a JSON payload (member order as the
/// reference server writes it).
pub fn broadcast_v1_from_binary(
    event: &str,
    payload_json: &str,
    meta_json: Option<&str>,
) -> String {
    let mut out = String::with_capacity(
        48 + escaped_len_hint(event) + payload_json.len() + meta_json.map_or(0, str::len),
    );
    out.push_str(r#"{"event":"#);
    write_str(&mut out, event);
    out.push_str(r#","payload":"#);
    out.push_str(payload_json);
    out.push_str(r#","type":"broadcast""#);
    push_meta(&mut out, meta_json);
    out.push('}');
    out
}

fn push_meta(out: &mut String, meta_json: Option<&str>) {
    if let Some(meta) = meta_json.filter(|m| !m.is_empty()) {
        out.push_str(r#","meta":"#);
        out.push_str(meta);
    }
}

/// `{key:{"metas":[meta,...]},...}`: the `presence_state` payload. Each meta is a JSON
/// object that already contains its `phx_ref`.
pub fn presence_state<'a, E, M>(entries: E) -> String
where
    E: IntoIterator<Item = (&'a str, M)>,
    M: IntoIterator<Item = &'a str>,
{
    let mut out = String::with_capacity(64);
    write_presence_map(&mut out, entries);
    out
}

/// `{"joins":{...},"leaves":{...}}`: the `presence_diff` payload (same entry shape as
/// [`presence_state`]). An update is a join of the new meta plus a leave of the old one.
pub fn presence_diff<'a, J, L, MJ, ML>(joins: J, leaves: L) -> String
where
    J: IntoIterator<Item = (&'a str, MJ)>,
    MJ: IntoIterator<Item = &'a str>,
    L: IntoIterator<Item = (&'a str, ML)>,
    ML: IntoIterator<Item = &'a str>,
{
    let mut out = String::with_capacity(128);
    out.push_str(r#"{"joins":"#);
    write_presence_map(&mut out, joins);
    out.push_str(r#","leaves":"#);
    write_presence_map(&mut out, leaves);
    out.push('}');
    out
}

fn write_presence_map<'a, E, M>(out: &mut String, entries: E)
where
    E: IntoIterator<Item = (&'a str, M)>,
    M: IntoIterator<Item = &'a str>,
{
    out.push('{');
    for (i, (key, metas)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_str(out, key);
        out.push_str(r#":{"metas":["#);
        for (j, meta) in metas.into_iter().enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(meta);
        }
        out.push_str("]}");
    }
    out.push('}');
}
