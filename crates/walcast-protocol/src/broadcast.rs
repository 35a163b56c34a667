//! Client broadcast pushes, text or binary.
//!
//! A text push carries the whole broadcast map (`{"type":"broadcast","event":E,
//! "payload":P, ...}`); the reference server relays that map as sent, extra keys
//! included, so it is kept as one raw JSON value and never rebuilt.
//!
//! A binary push (vsn 2.0.0 kind 3) carries the user event, optional metadata and the
//! user payload as bytes with an encoding flag. It stays binary here because subscribers
//! on vsn 2.0.0 get it back as a binary kind 4 frame, and only vsn 1.0.0 subscribers need
//! the text conversion ([`BinaryBroadcast::v1_text_payload`]).

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::lenient::{self, RawObject};
use crate::outbound;

/// The payload-encoding byte of binary broadcast frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadEncoding {
    /// `0`: opaque bytes (an `ArrayBuffer` on the JS side).
    Binary,
    /// `1`: UTF-8 JSON text.
    Json,
}

impl PayloadEncoding {
    /// The wire byte.
    pub fn as_byte(self) -> u8 {
        match self {
            PayloadEncoding::Binary => 0,
            PayloadEncoding::Json => 1,
        }
    }

    /// Parses the wire byte.
    pub fn from_byte(b: u8) -> Option<PayloadEncoding> {
        match b {
            0 => Some(PayloadEncoding::Binary),
            1 => Some(PayloadEncoding::Json),
            _ => None,
        }
    }
}

/// A `broadcast` push from a client.
#[derive(Debug, Clone)]
pub enum BroadcastPush {
    /// Text frame form.
    Json(JsonBroadcast),
    /// Binary kind 3 form (vsn 2.0.0 only).
    Binary(BinaryBroadcast),
}

impl BroadcastPush {
    /// The user event (`payload.event`), used by clients for routing.
    pub fn event(&self) -> Option<&str> {
        match self {
            BroadcastPush::Json(j) => j.event.as_deref(),
            BroadcastPush::Binary(b) => Some(&b.event),
        }
    }
}

/// A text broadcast push.
#[derive(Debug, Clone)]
pub struct JsonBroadcast {
    /// `event` when it is a string (relaying does not depend on it).
    pub event: Option<String>,
    /// The whole payload object as sent: relay this as the payload of event `broadcast`.
    pub payload: Box<RawValue>,
}

/// A binary (kind 3) broadcast push.
#[derive(Debug, Clone)]
pub struct BinaryBroadcast {
    /// The user event.
    pub event: String,
    /// How [`BinaryBroadcast::payload`] is encoded.
    pub encoding: PayloadEncoding,
    /// The metadata object, when the frame had one.
    pub meta: Option<Box<RawValue>>,
    /// The user payload. With [`PayloadEncoding::Json`] it was checked to be UTF-8 JSON.
    pub payload: Bytes,
}

impl BinaryBroadcast {
    /// The payload as JSON text, for [`PayloadEncoding::Json`] frames.
    pub fn json_payload(&self) -> Option<&str> {
        match self.encoding {
            PayloadEncoding::Json => std::str::from_utf8(&self.payload).ok(),
            PayloadEncoding::Binary => None,
        }
    }

    /// The text payload a vsn 1.0.0 subscriber receives for this push, or `None` when
    /// the payload is binary (such broadcasts are not delivered to vsn 1.0.0 sockets).
    pub fn v1_text_payload(&self) -> Option<String> {
        let payload = self.json_payload()?;
        Some(outbound::broadcast_v1_from_binary(
            &self.event,
            payload,
            self.meta.as_deref().map(RawValue::get),
        ))
    }

    /// The `{"type":"broadcast","event":E,"payload":P}` map this push stands for, as
    /// text, for JSON payloads (what the reference server treats it as).
    pub fn as_json_push_payload(&self) -> Option<String> {
        let payload = self.json_payload()?;
        Some(outbound::broadcast(&self.event, payload, None))
    }
}

/// Reads a text broadcast payload; `Err` is the reason for the error reply.
pub(crate) fn parse_text(payload: &RawValue) -> Result<JsonBroadcast, String> {
    let Some(obj) = RawObject::parse(payload) else {
        return Err(format!(
            "broadcast payload must be an object, got {}",
            lenient::kind(payload)
        ));
    };
    let event = obj
        .get_non_null("event")
        .and_then(|raw| lenient::string(raw).ok());
    Ok(JsonBroadcast {
        event,
        payload: payload.to_owned(),
    })
}
