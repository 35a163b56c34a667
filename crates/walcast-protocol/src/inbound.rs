//! Inbound frames: envelope decoding for both serializers and event dispatch.
//!
//! ```text
//! vsn 1.0.0  {"topic":T,"event":E,"payload":P,"ref":R[,"join_ref":J]}   ref required (may be null)
//! vsn 2.0.0  [J,R,T,E,P]                                                  exactly five elements
//!            binary kind 3 → broadcast push (see crate::binary)
//! ```
//!
//! The envelope is parsed once, with the payload left as a raw slice of the frame; only
//! the events the server acts on get their payload parsed further. Unknown events are
//! passed through as [`Inbound::Other`] so the server decides (the reference server
//! ignores them).

use bytes::Bytes;
use std::fmt;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::broadcast::{self, BroadcastPush};
use crate::error::{FrameError, FrameRefs};
use crate::join::{self, JoinPayload};
use crate::presence::{self, PresencePush};
use crate::{binary, lenient, Vsn, MAX_FRAME_LEN};

/// One decoded client frame.
#[derive(Debug, Clone)]
pub struct InboundFrame {
    /// `join_ref`; `None` when absent, null, or (binary) empty.
    pub join_ref: Option<String>,
    /// `ref`; `None` when null or (binary) empty.
    pub msg_ref: Option<String>,
    /// Topic, e.g. `realtime:room1` or `phoenix`.
    pub topic: String,
    /// Phoenix event, e.g. `phx_join`; `broadcast` for binary pushes.
    pub event: String,
    /// The typed payload.
    pub payload: Inbound,
}

/// Typed inbound messages.
#[derive(Debug, Clone)]
pub enum Inbound {
    /// `heartbeat` on topic `phoenix`; answer `phx_reply` ok `{}` with the same ref.
    Heartbeat,
    /// `phx_join`.
    Join(JoinPayload),
    /// `phx_leave`.
    Leave,
    /// `access_token` push. `None` when null, absent, not a string or an `sb_…` key:
    /// all cases the reference server ignores.
    AccessToken {
        /// The new channel token.
        access_token: Option<String>,
    },
    /// `broadcast` push (text or binary kind 3).
    Broadcast(BroadcastPush),
    /// `presence` push.
    Presence(PresencePush),
    /// Any other event, payload parsed as a JSON value.
    Other {
        /// The event name (same as [`InboundFrame::event`]).
        event: String,
        /// The payload.
        payload: serde_json::Value,
    },
}

fn check_len(len: usize, max: usize) -> Result<(), FrameError> {
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(())
}

/// Decodes a text frame of at most [`MAX_FRAME_LEN`] bytes.
pub fn decode_text(vsn: Vsn, text: &str) -> Result<InboundFrame, FrameError> {
    decode_text_within(vsn, text, MAX_FRAME_LEN)
}

/// Decodes a text frame of at most `max_len` bytes (the server's configured frame limit).
pub fn decode_text_within(
    vsn: Vsn,
    text: &str,
    max_len: usize,
) -> Result<InboundFrame, FrameError> {
    check_len(text.len(), max_len)?;
    let env = match vsn {
        Vsn::V1 => envelope_v1(text)?,
        Vsn::V2 => envelope_v2(text)?,
    };
    dispatch(env)
}

/// Decodes a binary frame, copying the user payload out of `bytes`.
pub fn decode_binary(vsn: Vsn, bytes: &[u8]) -> Result<InboundFrame, FrameError> {
    decode_binary_with(vsn, bytes, MAX_FRAME_LEN, |start| {
        Bytes::copy_from_slice(&bytes[start..])
    })
}

/// Decodes a binary frame held in [`Bytes`]; the user payload shares its buffer (no copy).
pub fn decode_binary_bytes(vsn: Vsn, bytes: &Bytes) -> Result<InboundFrame, FrameError> {
    decode_binary_bytes_within(vsn, bytes, MAX_FRAME_LEN)
}

/// [`decode_binary_bytes`] with the server's configured frame limit.
pub fn decode_binary_bytes_within(
    vsn: Vsn,
    bytes: &Bytes,
    max_len: usize,
) -> Result<InboundFrame, FrameError> {
    decode_binary_with(vsn, bytes, max_len, |start| bytes.slice(start..))
}

fn decode_binary_with(
    vsn: Vsn,
    buf: &[u8],
    max_len: usize,
    payload: impl FnOnce(usize) -> Bytes,
) -> Result<InboundFrame, FrameError> {
    if !vsn.supports_binary() {
        return Err(FrameError::BinaryOnV1);
    }
    check_len(buf.len(), max_len)?;
    let kind3 = binary::decode(buf)?;
    let start = kind3.payload_start;
    let (refs, push) = kind3.into_broadcast(payload(start));
    Ok(InboundFrame {
        join_ref: refs.join_ref,
        msg_ref: refs.msg_ref,
        topic: refs.topic,
        event: refs.event,
        payload: Inbound::Broadcast(BroadcastPush::Binary(push)),
    })
}

struct Envelope<'a> {
    refs: FrameRefs,
    payload: &'a RawValue,
}

fn syntax_or_shape(vsn: Vsn, e: serde_json::Error) -> FrameError {
    match e.classify() {
        serde_json::error::Category::Data => FrameError::Shape {
            vsn: vsn.as_str(),
            detail: e.to_string(),
        },
        _ => FrameError::Json(e.to_string()),
    }
}

/// Deserializes a field that must be present but may be null: missing → outer `None`.
fn present<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

#[derive(Deserialize)]
struct V1Wire<'a> {
    topic: String,
    event: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(rename = "ref", default, deserialize_with = "present")]
    msg_ref: Option<Option<String>>,
    #[serde(default)]
    join_ref: Option<String>,
}

fn envelope_v1(text: &str) -> Result<Envelope<'_>, FrameError> {
    // serde's derived struct visitor would also accept a JSON array; vsn 1.0.0 is objects only.
    if !text.trim_start().starts_with('{') {
        // Still let the parser speak first for non-JSON input, so syntax errors say so.
        serde_json::from_str::<&RawValue>(text).map_err(|e| syntax_or_shape(Vsn::V1, e))?;
        return Err(FrameError::Shape {
            vsn: Vsn::V1.as_str(),
            detail: "expected a JSON object".to_owned(),
        });
    }
    let w: V1Wire<'_> = serde_json::from_str(text).map_err(|e| syntax_or_shape(Vsn::V1, e))?;
    let Some(msg_ref) = w.msg_ref else {
        return Err(FrameError::Shape {
            vsn: Vsn::V1.as_str(),
            detail: "missing field `ref`".to_owned(),
        });
    };
    Ok(Envelope {
        refs: FrameRefs {
            join_ref: w.join_ref,
            msg_ref,
            topic: w.topic,
            event: w.event,
        },
        payload: w.payload,
    })
}

/// The vsn 2.0.0 array, read element by element so that a wrong element count is reported
/// as a shape error (serde's tuple impl leaves extra elements to the parser, which calls
/// them a syntax error).
struct V2Wire<'a> {
    join_ref: Option<String>,
    msg_ref: Option<String>,
    topic: String,
    event: String,
    payload: &'a RawValue,
}

impl<'de> Deserialize<'de> for V2Wire<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ArrayVisitor;
        impl<'de> Visitor<'de> for ArrayVisitor {
            type Value = V2Wire<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array [join_ref, ref, topic, event, payload]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let short = |n| de::Error::invalid_length(n, &"5 elements");
                let join_ref = seq.next_element()?.ok_or_else(|| short(0))?;
                let msg_ref = seq.next_element()?.ok_or_else(|| short(1))?;
                let topic = seq.next_element()?.ok_or_else(|| short(2))?;
                let event = seq.next_element()?.ok_or_else(|| short(3))?;
                let payload = seq.next_element()?.ok_or_else(|| short(4))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::invalid_length(6, &"5 elements"));
                }
                Ok(V2Wire {
                    join_ref,
                    msg_ref,
                    topic,
                    event,
                    payload,
                })
            }
        }
        d.deserialize_seq(ArrayVisitor)
    }
}

fn envelope_v2(text: &str) -> Result<Envelope<'_>, FrameError> {
    let w: V2Wire<'_> = serde_json::from_str(text).map_err(|e| syntax_or_shape(Vsn::V2, e))?;
    Ok(Envelope {
        refs: FrameRefs {
            join_ref: w.join_ref,
            msg_ref: w.msg_ref,
            topic: w.topic,
            event: w.event,
        },
        payload: w.payload,
    })
}

fn dispatch(env: Envelope<'_>) -> Result<InboundFrame, FrameError> {
    let Envelope { refs, payload: raw } = env;
    let refuse = |refs: FrameRefs, reason: String| FrameError::Payload {
        refs: Box::new(refs),
        reason,
    };
    let payload = match refs.event.as_str() {
        "heartbeat" if refs.topic == "phoenix" => Inbound::Heartbeat,
        "phx_join" => Inbound::Join(join::parse(raw)),
        "phx_leave" => Inbound::Leave,
        "access_token" => Inbound::AccessToken {
            access_token: access_token(raw),
        },
        "broadcast" => match broadcast::parse_text(raw) {
            Ok(b) => Inbound::Broadcast(BroadcastPush::Json(b)),
            Err(reason) => return Err(refuse(refs, reason)),
        },
        "presence" => match presence::parse(raw) {
            Ok(p) => Inbound::Presence(p),
            Err(reason) => return Err(refuse(refs, reason)),
        },
        _ => match serde_json::from_str(raw.get()) {
            Ok(value) => Inbound::Other {
                event: refs.event.clone(),
                payload: value,
            },
            // Cannot happen for text the envelope parser accepted; kept total anyway.
            Err(e) => return Err(refuse(refs, e.to_string())),
        },
    };
    Ok(InboundFrame {
        join_ref: refs.join_ref,
        msg_ref: refs.msg_ref,
        topic: refs.topic,
        event: refs.event,
        payload,
    })
}

fn access_token(raw: &RawValue) -> Option<String> {
    let obj = lenient::RawObject::parse(raw)?;
    let token = lenient::string(obj.get_non_null("access_token")?).ok()?;
    (!token.starts_with("sb_")).then_some(token)
}
