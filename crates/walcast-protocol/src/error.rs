//! Frame errors, grouped by what the server does next.
//!
//! | action            | errors                                                        |
//! |-------------------|---------------------------------------------------------------|
//! | close the socket  | [`FrameError::TooLarge`], [`FrameError::UnsupportedBinaryKind`], [`FrameError::BinaryOnV1`] |
//! | reply `error`     | [`FrameError::Payload`] (the envelope parsed, so refs are known) |
//! | ignore the frame  | everything else: no usable ref to reply to, or an encode-side problem |
//!
//! Closing is reserved for frames that show the peer speaks another protocol (a binary
//! kind no Supabase client sends, binary on a JSON-only socket) or that exceed the frame
//! limit; a single malformed text frame is not worth dropping every channel of a socket.

use thiserror::Error;

/// What the server should do after a frame fails to decode (or encode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameAction {
    /// End the WebSocket: the peer is not speaking this protocol, or the frame is too big.
    Close,
    /// Send `phx_reply` with status `error` to the refs in [`FrameError::reply_to`].
    Reply,
    /// Drop the frame (log it); nothing addressable came with it.
    Ignore,
}

/// The addressing parts of a frame whose envelope decoded but whose payload did not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameRefs {
    /// `join_ref` as sent (absent/null/empty → `None`).
    pub join_ref: Option<String>,
    /// `ref` as sent.
    pub msg_ref: Option<String>,
    /// Channel topic, e.g. `realtime:room1`.
    pub topic: String,
    /// Phoenix event, e.g. `presence`.
    pub event: String,
}

/// A frame that could not be decoded, or a frame that cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The text is not JSON (syntax error or premature end).
    #[error("frame is not valid JSON: {0}")]
    Json(String),
    /// JSON, but not a Phoenix envelope of this serializer version.
    #[error("frame is not a vsn {vsn} envelope: {detail}")]
    Shape {
        /// `1.0.0` or `2.0.0`.
        vsn: &'static str,
        /// What was wrong, from the JSON parser or the envelope check.
        detail: String,
    },
    /// The envelope is fine but the payload of a known event is not usable.
    /// `reason` is meant for the client: it is what goes into the error reply.
    #[error("invalid {} payload on {}: {reason}", .refs.event, .refs.topic)]
    Payload {
        /// Where to send the error reply.
        refs: Box<FrameRefs>,
        /// Human-readable reason, sent as `{"reason": ...}`.
        reason: String,
    },
    /// A binary frame ends before a field it announces.
    #[error("binary frame truncated in {field}: needs {needed} bytes, {available} left")]
    Truncated {
        /// The header field or section being read.
        field: &'static str,
        /// Bytes the field needs.
        needed: usize,
        /// Bytes that were left in the frame.
        available: usize,
    },
    /// A string section of a binary frame is not UTF-8.
    #[error("binary frame field {field} is not valid UTF-8")]
    InvalidUtf8 {
        /// Which section.
        field: &'static str,
    },
    /// The payload-encoding byte of a binary frame is neither 0 (binary) nor 1 (JSON).
    #[error("unknown binary payload encoding {0}")]
    InvalidEncoding(u8),
    /// The frame is larger than [`crate::MAX_FRAME_LEN`].
    #[error("frame of {len} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// Size of the frame.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A binary frame of a kind clients never send (only kind 3 is inbound).
    #[error("unsupported binary frame kind {0}")]
    UnsupportedBinaryKind(u8),
    /// A binary frame on a vsn 1.0.0 socket, which has no binary format.
    #[error("binary frames are not part of vsn 1.0.0")]
    BinaryOnV1,
    /// Encoding: a string does not fit the one-byte length of a binary frame.
    #[error("{field} is {len} bytes; binary frames allow at most 255")]
    FieldTooLong {
        /// Which section.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
    },
}

impl FrameError {
    /// What the server does next.
    pub fn action(&self) -> FrameAction {
        match self {
            FrameError::TooLarge { .. }
            | FrameError::UnsupportedBinaryKind(_)
            | FrameError::BinaryOnV1 => FrameAction::Close,
            FrameError::Payload { .. } => FrameAction::Reply,
            FrameError::Json(_)
            | FrameError::Shape { .. }
            | FrameError::Truncated { .. }
            | FrameError::InvalidUtf8 { .. }
            | FrameError::InvalidEncoding(_)
            | FrameError::FieldTooLong { .. } => FrameAction::Ignore,
        }
    }

    /// True when the socket must be closed.
    pub fn is_fatal(&self) -> bool {
        self.action() == FrameAction::Close
    }

    /// The refs to answer with an error reply, when the frame was addressable.
    pub fn reply_to(&self) -> Option<&FrameRefs> {
        match self {
            FrameError::Payload { refs, .. } => Some(refs),
            _ => None,
        }
    }

    /// The reason to put in the error reply, when one should be sent.
    pub fn reply_reason(&self) -> Option<&str> {
        match self {
            FrameError::Payload { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        assert!(FrameError::TooLarge { len: 6, max: 5 }.is_fatal());
        assert!(FrameError::UnsupportedBinaryKind(0).is_fatal());
        assert!(FrameError::BinaryOnV1.is_fatal());
        assert!(!FrameError::Json("x".into()).is_fatal());
        assert_eq!(FrameError::InvalidEncoding(7).action(), FrameAction::Ignore);
        let e = FrameError::Payload {
            refs: Box::new(FrameRefs {
                join_ref: Some("1".into()),
                msg_ref: Some("2".into()),
                topic: "realtime:a".into(),
                event: "presence".into(),
            }),
            reason: "nope".into(),
        };
        assert_eq!(e.action(), FrameAction::Reply);
        assert_eq!(e.reply_to().unwrap().msg_ref.as_deref(), Some("2"));
        assert_eq!(e.reply_reason(), Some("nope"));
        assert_eq!(
            e.to_string(),
            "invalid presence payload on realtime:a: nope"
        );
    }
}
