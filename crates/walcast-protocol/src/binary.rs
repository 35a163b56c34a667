//! The vsn 2.0.0 binary frame layouts (user broadcasts only).
//!
//! ```text
//! kind 3, USER_BROADCAST_PUSH, client → server
//! +---+----------+---------+-----------+-----------+----------+----------+
//! | 3 | join_ref | ref_len | topic_len | event_len | meta_len | encoding |   7 header bytes
//! +---+----------+---------+-----------+-----------+----------+----------+
//! | join_ref | ref | topic | event | meta (JSON object or empty) | payload (rest) |
//!
//! kind 4, USER_BROADCAST, server → client
//! +---+-----------+-----------+----------+----------+
//! | 4 | topic_len | event_len | meta_len | encoding |                         5 header bytes
//! +---+-----------+-----------+----------+----------+
//! | topic | event | meta (JSON object or empty) | payload (rest) |
//! ```
//!
//! Lengths are single bytes, strings UTF-8, encoding `0` binary / `1` JSON. Every length
//! is checked against what is left before slicing, so a hostile header can neither panic
//! the decoder nor make it allocate more than the frame it already holds.

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::broadcast::{BinaryBroadcast, PayloadEncoding};
use crate::error::{FrameError, FrameRefs};

/// Kind byte of a client broadcast push.
pub const KIND_USER_BROADCAST_PUSH: u8 = 3;
/// Kind byte of a server broadcast.
pub const KIND_USER_BROADCAST: u8 = 4;

const KIND3_HEADER_LEN: usize = 7;

/// A decoded kind 3 frame, payload still a range so the caller picks copy or share.
pub(crate) struct Kind3 {
    pub(crate) refs: FrameRefs,
    pub(crate) event: String,
    pub(crate) encoding: PayloadEncoding,
    pub(crate) meta: Option<Box<RawValue>>,
    pub(crate) payload_start: usize,
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], FrameError> {
        let available = self.buf.len().saturating_sub(self.pos);
        if n > available {
            return Err(FrameError::Truncated {
                field,
                needed: n,
                available,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn text(&mut self, n: u8, field: &'static str) -> Result<&'a str, FrameError> {
        let bytes = self.take(usize::from(n), field)?;
        std::str::from_utf8(bytes).map_err(|_| FrameError::InvalidUtf8 { field })
    }
}

/// Decodes a binary frame of any kind; only kind 3 is accepted.
pub(crate) fn decode(buf: &[u8]) -> Result<Kind3, FrameError> {
    let Some(&kind) = buf.first() else {
        return Err(FrameError::Truncated {
            field: "kind",
            needed: 1,
            available: 0,
        });
    };
    if kind != KIND_USER_BROADCAST_PUSH {
        return Err(FrameError::UnsupportedBinaryKind(kind));
    }
    let mut r = Reader { buf, pos: 0 };
    let header = r.take(KIND3_HEADER_LEN, "header")?;
    let &[_, join_ref_len, ref_len, topic_len, event_len, meta_len, encoding] = header else {
        // `take` hands back exactly the bytes asked for; kept as an error, not a panic.
        return Err(FrameError::Truncated {
            field: "header",
            needed: KIND3_HEADER_LEN,
            available: header.len(),
        });
    };
    let join_ref = r.text(join_ref_len, "join_ref")?;
    let msg_ref = r.text(ref_len, "ref")?;
    let topic = r.text(topic_len, "topic")?;
    let event = r.text(event_len, "event")?;
    let meta = r.take(usize::from(meta_len), "meta")?;
    let encoding =
        PayloadEncoding::from_byte(encoding).ok_or(FrameError::InvalidEncoding(encoding))?;

    // The header is sound, so from here on problems are answerable with an error reply.
    // A zero-length ref is how clients encode "no ref".
    let refs = FrameRefs {
        join_ref: (!join_ref.is_empty()).then(|| join_ref.to_owned()),
        msg_ref: (!msg_ref.is_empty()).then(|| msg_ref.to_owned()),
        topic: topic.to_owned(),
        event: "broadcast".to_owned(),
    };
    let refuse = |refs: FrameRefs, reason: &str| FrameError::Payload {
        refs: Box::new(refs),
        reason: reason.to_owned(),
    };
    let meta = if meta.is_empty() {
        None
    } else {
        match std::str::from_utf8(meta)
            .ok()
            .and_then(|m| serde_json::from_str::<Box<RawValue>>(m).ok())
        {
            Some(m) if m.get().starts_with('{') => Some(m),
            _ => return Err(refuse(refs, "broadcast metadata must be a JSON object")),
        }
    };
    let payload_start = r.pos;
    if encoding == PayloadEncoding::Json {
        // Validated once here so that every later text conversion can splice it as is.
        let ok = std::str::from_utf8(&buf[payload_start..])
            .ok()
            .is_some_and(|p| serde_json::from_str::<&RawValue>(p).is_ok());
        if !ok {
            return Err(refuse(refs, "broadcast payload is not valid JSON"));
        }
    }
    Ok(Kind3 {
        refs,
        event: event.to_owned(),
        encoding,
        meta,
        payload_start,
    })
}

impl Kind3 {
    pub(crate) fn into_broadcast(self, payload: Bytes) -> (FrameRefs, BinaryBroadcast) {
        (
            self.refs,
            BinaryBroadcast {
                event: self.event,
                encoding: self.encoding,
                meta: self.meta,
                payload,
            },
        )
    }
}

fn len_u8(field: &'static str, len: usize) -> Result<u8, FrameError> {
    u8::try_from(len).map_err(|_| FrameError::FieldTooLong { field, len })
}

/// Encodes a kind 4 USER_BROADCAST frame (server → vsn 2.0.0 client).
///
/// `meta_json`, when given and non-empty, must be a JSON object. Fails only when the topic,
/// event or metadata is longer than 255 bytes; the server then falls back to a text frame
/// or drops the delivery.
pub fn encode_user_broadcast_binary(
    topic: &str,
    event: &str,
    meta_json: Option<&str>,
    encoding: PayloadEncoding,
    payload: &[u8],
) -> Result<Bytes, FrameError> {
    let meta = meta_json.unwrap_or("");
    let header = [
        KIND_USER_BROADCAST,
        len_u8("topic", topic.len())?,
        len_u8("event", event.len())?,
        len_u8("meta", meta.len())?,
        encoding.as_byte(),
    ];
    let mut out =
        Vec::with_capacity(header.len() + topic.len() + event.len() + meta.len() + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(meta.as_bytes());
    out.extend_from_slice(payload);
    Ok(Bytes::from(out))
}
