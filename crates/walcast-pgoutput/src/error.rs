//! The one error type of the decoder.
//!
//! Every variant means the same thing to the caller: the bytes do not form a valid message of
//! the negotiated protocol, so the stream position is no longer trustworthy. The replication
//! layer gives up on the connection and reconnects from its last acknowledged LSN; nothing is
//! retried in place. The variants exist to make the log line precise, not to drive different
//! recovery paths.

/// Why a frame or pgoutput message could not be decoded.
///
/// `what`/`context` name the field or message being read, so a log line points straight at
/// the offending part of the wire format.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended before `what` was complete.
    #[error("truncated input while reading {what}")]
    Truncated { what: &'static str },
    /// A tag byte that is not defined at this level of the protocol.
    #[error("unknown {context} tag {tag:#04x} ({})", printable(*tag))]
    UnknownTag { context: &'static str, tag: u8 },
    /// A declared count or length that can never be valid (negative, for instance).
    #[error("invalid length {len} for {what}")]
    InvalidLength { what: &'static str, len: i64 },
    /// A string field is not UTF-8 (the session is pinned to `client_encoding=UTF8`).
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    /// A NUL-terminated string ran to the end of the input without its terminator.
    #[error("{what} is missing its NUL terminator")]
    MissingNul { what: &'static str },
    /// Bytes left over after a complete message; each frame carries exactly one message.
    #[error("{extra} trailing byte(s) after {what}")]
    TrailingBytes { what: &'static str, extra: usize },
    /// A well-formed message that is not allowed here (for example a Stream Stop outside a
    /// stream).
    #[error("invalid {what}")]
    Invalid { what: &'static str },
}

fn printable(tag: u8) -> char {
    if tag.is_ascii_graphic() {
        char::from(tag)
    } else {
        '?'
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_field() {
        let e = DecodeError::UnknownTag {
            context: "pgoutput message",
            tag: b'Z',
        };
        assert_eq!(e.to_string(), "unknown pgoutput message tag 0x5a (Z)");
        let e = DecodeError::UnknownTag {
            context: "tuple cell",
            tag: 0,
        };
        assert_eq!(e.to_string(), "unknown tuple cell tag 0x00 (?)");
        let e = DecodeError::TrailingBytes {
            what: "begin",
            extra: 3,
        };
        assert_eq!(e.to_string(), "3 trailing byte(s) after begin");
    }
}
