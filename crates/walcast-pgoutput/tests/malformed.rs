//! Malformed input: every failure is a precise `DecodeError`, never a panic, and a failed
//! decode leaves the stream state alone.

mod common;

use bytes::Bytes;
use common::Wire;
use walcast_pgoutput::*;

const XID: u32 = 42;

fn stream_start() -> Bytes {
    Wire::new().byte(b'S').uint32(XID).byte(1).bytes()
}

fn decoder(in_stream: bool) -> Decoder {
    let mut d = Decoder::new();
    if in_stream {
        d.decode(&stream_start()).expect("stream start decodes");
    }
    d
}

fn decode(bytes: &[u8], in_stream: bool) -> Result<LogicalMessage, DecodeError> {
    decoder(in_stream).decode(&Bytes::copy_from_slice(bytes))
}

fn tuple(w: Wire) -> Wire {
    w.int16(4)
        .byte(b't')
        .int32(3)
        .raw(b"abc")
        .byte(b'n')
        .byte(b'u')
        .byte(b'b')
        .int32(2)
        .raw(&[9, 9])
}

/// One valid hand-written layout of every message, with the stream state it needs, and the
/// prefix lengths that are themselves valid messages (only v2 Stream Abort, a prefix of v4).
fn corpus() -> Vec<(&'static str, Bytes, bool, Vec<usize>)> {
    let x = |w: Wire, s: bool| if s { w.uint32(XID) } else { w };
    let mut out = vec![
        (
            "begin",
            Wire::new().byte(b'B').uint64(1).int64(2).uint32(3).bytes(),
            false,
            vec![],
        ),
        (
            "commit",
            Wire::new()
                .byte(b'C')
                .byte(0)
                .uint64(1)
                .uint64(2)
                .int64(3)
                .bytes(),
            false,
            vec![],
        ),
        (
            "origin",
            Wire::new().byte(b'O').uint64(1).string("origin").bytes(),
            false,
            vec![],
        ),
        (
            "stream_start",
            Wire::new().byte(b'S').uint32(7).byte(0).bytes(),
            false,
            vec![],
        ),
        ("stream_stop", Wire::new().byte(b'E').bytes(), true, vec![]),
        (
            "stream_commit",
            Wire::new()
                .byte(b'c')
                .uint32(7)
                .byte(0)
                .uint64(1)
                .uint64(2)
                .int64(3)
                .bytes(),
            false,
            vec![],
        ),
        (
            "stream_abort_v4",
            Wire::new()
                .byte(b'A')
                .uint32(7)
                .uint32(8)
                .uint64(1)
                .int64(2)
                .bytes(),
            false,
            vec![1 + 4 + 4],
        ),
        (
            "begin_prepare",
            Wire::new()
                .byte(b'b')
                .uint64(1)
                .uint64(2)
                .int64(3)
                .uint32(4)
                .string("g")
                .bytes(),
            false,
            vec![],
        ),
        (
            "commit_prepared",
            Wire::new()
                .byte(b'K')
                .byte(0)
                .uint64(1)
                .uint64(2)
                .int64(3)
                .uint32(4)
                .string("g")
                .bytes(),
            false,
            vec![],
        ),
        (
            "rollback_prepared",
            Wire::new()
                .byte(b'r')
                .byte(0)
                .uint64(1)
                .uint64(2)
                .int64(3)
                .int64(4)
                .uint32(5)
                .string("g")
                .bytes(),
            false,
            vec![],
        ),
    ];
    for (t, name) in [(b'P', "prepare"), (b'p', "stream_prepare")] {
        out.push((
            name,
            Wire::new()
                .byte(t)
                .byte(0)
                .uint64(1)
                .uint64(2)
                .int64(3)
                .uint32(4)
                .string("gid")
                .bytes(),
            false,
            vec![],
        ));
    }
    for s in [false, true] {
        out.push((
            "relation",
            x(Wire::new().byte(b'R'), s)
                .uint32(1)
                .string("ns")
                .string("rel")
                .byte(b'i')
                .int16(2)
                .byte(1)
                .string("a")
                .uint32(23)
                .int32(-1)
                .byte(0)
                .string("b")
                .uint32(25)
                .int32(-1)
                .bytes(),
            s,
            vec![],
        ));
        out.push((
            "type",
            x(Wire::new().byte(b'Y'), s)
                .uint32(1)
                .string("ns")
                .string("t")
                .bytes(),
            s,
            vec![],
        ));
        out.push((
            "insert",
            tuple(x(Wire::new().byte(b'I'), s).uint32(1).byte(b'N')).bytes(),
            s,
            vec![],
        ));
        out.push((
            "update_plain",
            tuple(x(Wire::new().byte(b'U'), s).uint32(1).byte(b'N')).bytes(),
            s,
            vec![],
        ));
        out.push((
            "update_key",
            tuple(tuple(x(Wire::new().byte(b'U'), s).uint32(1).byte(b'K')).byte(b'N')).bytes(),
            s,
            vec![],
        ));
        out.push((
            "update_old",
            tuple(tuple(x(Wire::new().byte(b'U'), s).uint32(1).byte(b'O')).byte(b'N')).bytes(),
            s,
            vec![],
        ));
        out.push((
            "delete",
            tuple(x(Wire::new().byte(b'D'), s).uint32(1).byte(b'K')).bytes(),
            s,
            vec![],
        ));
        out.push((
            "truncate",
            x(Wire::new().byte(b'T'), s)
                .int32(2)
                .byte(3)
                .uint32(1)
                .uint32(2)
                .bytes(),
            s,
            vec![],
        ));
        out.push((
            "message",
            x(Wire::new().byte(b'M'), s)
                .byte(1)
                .uint64(5)
                .string("pfx")
                .int32(3)
                .raw(b"xyz")
                .bytes(),
            s,
            vec![],
        ));
    }
    out
}

#[test]
fn corpus_is_valid() {
    for (name, bytes, in_stream, _) in corpus() {
        let m = decode(&bytes, in_stream)
            .unwrap_or_else(|e| panic!("{name} (in_stream={in_stream}) must decode: {e}"));
        assert!(name.starts_with(m.kind()), "{name} decoded as {}", m.kind());
    }
}

#[test]
fn every_truncation_point_is_an_error() {
    let mut checked = 0;
    for (name, bytes, in_stream, valid_prefixes) in corpus() {
        for len in 0..bytes.len() {
            if valid_prefixes.contains(&len) {
                continue;
            }
            let res = decode(&bytes[..len], in_stream);
            assert!(
                res.is_err(),
                "{name} (in_stream={in_stream}) prefix {len}/{} decoded: {res:?}",
                bytes.len()
            );
            checked += 1;
        }
    }
    assert!(checked > 500, "only {checked} prefixes checked");
}

#[test]
fn truncated_fixed_fields_name_the_field() {
    let begin = Wire::new().byte(b'B').uint64(1).int64(2).uint32(3).bytes();
    assert_eq!(
        decode(&begin[..1], false),
        Err(DecodeError::Truncated {
            what: "begin final lsn"
        })
    );
    assert_eq!(
        decode(&begin[..20], false),
        Err(DecodeError::Truncated { what: "begin xid" })
    );
}

#[test]
fn every_frame_truncation_point_is_an_error() {
    let keepalive = Wire::new().byte(b'k').uint64(1).int64(2).byte(1).bytes();
    for len in 0..keepalive.len() {
        assert!(ReplicationFrame::parse(keepalive.slice(..len)).is_err());
    }
    let xlog = Wire::new()
        .byte(b'w')
        .uint64(1)
        .uint64(2)
        .int64(3)
        .raw(b"B")
        .bytes();
    // Any prefix of at least the 25-byte header is a valid frame (payload is opaque here).
    for len in 0..25 {
        assert!(ReplicationFrame::parse(xlog.slice(..len)).is_err());
    }
    let mut status = bytes::BytesMut::new();
    StandbyStatusUpdate::default().encode(&mut status);
    for len in 0..status.len() {
        assert!(StandbyStatusUpdate::parse(&status[..len]).is_err());
    }
}

#[test]
fn empty_input() {
    assert_eq!(
        decode(b"", false),
        Err(DecodeError::Truncated {
            what: "message tag"
        })
    );
    assert_eq!(
        decode(b"", true),
        Err(DecodeError::Truncated {
            what: "message tag"
        })
    );
    assert_eq!(
        ReplicationFrame::parse(Bytes::new()),
        Err(DecodeError::Truncated {
            what: "replication frame tag"
        })
    );
    assert_eq!(
        StandbyStatusUpdate::parse(&[]),
        Err(DecodeError::Truncated {
            what: "standby status tag"
        })
    );
}

fn insert_with_text_len(len: i32, payload: &[u8]) -> Bytes {
    Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(1)
        .byte(b't')
        .int32(len)
        .raw(payload)
        .bytes()
}

#[test]
fn negative_cell_lengths() {
    for len in [-1, -5, i32::MIN] {
        assert_eq!(
            decode(&insert_with_text_len(len, b"abc"), false),
            Err(DecodeError::InvalidLength {
                what: "text cell length",
                len: i64::from(len)
            })
        );
    }
    let binary = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(1)
        .byte(b'b')
        .int32(-5)
        .bytes();
    assert_eq!(
        decode(&binary, false),
        Err(DecodeError::InvalidLength {
            what: "binary cell length",
            len: -5
        })
    );
}

#[test]
fn huge_cell_lengths() {
    // Declared longer than what is left: rejected before any allocation or slicing.
    for len in [i32::MAX, 4, 1_000_000] {
        assert_eq!(
            decode(&insert_with_text_len(len, b"abc"), false),
            Err(DecodeError::Truncated {
                what: "text cell length"
            })
        );
    }
}

#[test]
fn column_counts_larger_than_the_data() {
    // ncols = 3 but only 2 cells.
    let short = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(3)
        .byte(b'n')
        .byte(b'n')
        .bytes();
    assert_eq!(
        decode(&short, false),
        Err(DecodeError::Truncated { what: "tuple data" })
    );
    // ncols = i16::MAX with almost nothing behind it.
    let huge = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(i16::MAX)
        .byte(b'n')
        .bytes();
    assert_eq!(
        decode(&huge, false),
        Err(DecodeError::Truncated { what: "tuple data" })
    );
    // Enough bytes for the kind bytes, but the cells are longer: still an error.
    let cells_longer = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(3)
        .byte(b't')
        .int32(0)
        .bytes();
    assert!(decode(&cells_longer, false).is_err());
    let negative = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(-1)
        .bytes();
    assert_eq!(
        decode(&negative, false),
        Err(DecodeError::InvalidLength {
            what: "tuple column count",
            len: -1
        })
    );
}

#[test]
fn relation_column_counts() {
    let rel = |ncols: i16| {
        Wire::new()
            .byte(b'R')
            .uint32(1)
            .string("s")
            .string("t")
            .byte(b'd')
            .int16(ncols)
            .byte(0)
            .string("a")
            .uint32(23)
            .int32(-1)
            .bytes()
    };
    assert!(decode(&rel(1), false).is_ok());
    for n in [2, i16::MAX] {
        assert_eq!(
            decode(&rel(n), false),
            Err(DecodeError::Truncated {
                what: "relation columns"
            })
        );
    }
    assert_eq!(
        decode(&rel(-3), false),
        Err(DecodeError::InvalidLength {
            what: "relation column count",
            len: -3
        })
    );
}

#[test]
fn truncate_relation_counts() {
    let t = |n: i32| Wire::new().byte(b'T').int32(n).byte(0).uint32(1).bytes();
    assert!(decode(&t(1), false).is_ok());
    for n in [2, i32::MAX] {
        assert_eq!(
            decode(&t(n), false),
            Err(DecodeError::Truncated {
                what: "truncate relation ids"
            })
        );
    }
    assert_eq!(
        decode(&t(-1), false),
        Err(DecodeError::InvalidLength {
            what: "truncate relation count",
            len: -1
        })
    );
    assert_eq!(
        decode(&t(0), false),
        Err(DecodeError::TrailingBytes {
            what: "truncate",
            extra: 4
        })
    );
}

#[test]
fn message_content_lengths() {
    let m = |len: i32| {
        Wire::new()
            .byte(b'M')
            .byte(0)
            .uint64(1)
            .string("p")
            .int32(len)
            .raw(b"ab")
            .bytes()
    };
    assert!(decode(&m(2), false).is_ok());
    assert_eq!(
        decode(&m(-5), false),
        Err(DecodeError::InvalidLength {
            what: "message content",
            len: -5
        })
    );
    assert_eq!(
        decode(&m(i32::MAX), false),
        Err(DecodeError::Truncated {
            what: "message content"
        })
    );
    assert_eq!(
        decode(&m(1), false),
        Err(DecodeError::TrailingBytes {
            what: "message",
            extra: 1
        })
    );
}

#[test]
fn unknown_message_tags() {
    for tag in [0u8, b'Z', b'w', b'k', b'N', b'n', b'a', 0xFF] {
        for in_stream in [false, true] {
            assert_eq!(
                decode(&[tag, 0, 0, 0, 0], in_stream),
                Err(DecodeError::UnknownTag {
                    context: "pgoutput message",
                    tag
                }),
                "tag {tag:#x}"
            );
        }
    }
}

#[test]
fn unknown_frame_tags() {
    for tag in [0u8, b'd', b'r', b'h', b'W', 0xFF] {
        assert_eq!(
            ReplicationFrame::parse(Bytes::copy_from_slice(&[tag; 30])),
            Err(DecodeError::UnknownTag {
                context: "replication frame",
                tag
            })
        );
    }
}

#[test]
fn unknown_tuple_cell_kind() {
    for kind in [b'x', b'N', b'T', 0u8] {
        let bytes = Wire::new()
            .byte(b'I')
            .uint32(1)
            .byte(b'N')
            .int16(1)
            .byte(kind)
            .int32(0)
            .bytes();
        assert_eq!(
            decode(&bytes, false),
            Err(DecodeError::UnknownTag {
                context: "tuple cell",
                tag: kind
            })
        );
    }
}

#[test]
fn unknown_tuple_markers() {
    let empty_tuple = |w: Wire| w.int16(0);
    // Insert only takes 'N' ('K' is Commit Prepared only as a message tag).
    let ins = empty_tuple(Wire::new().byte(b'I').uint32(1).byte(b'K')).bytes();
    assert_eq!(
        decode(&ins, false),
        Err(DecodeError::UnknownTag {
            context: "insert tuple marker",
            tag: b'K'
        })
    );
    let upd = empty_tuple(Wire::new().byte(b'U').uint32(1).byte(b'X')).bytes();
    assert_eq!(
        decode(&upd, false),
        Err(DecodeError::UnknownTag {
            context: "update tuple marker",
            tag: b'X'
        })
    );
    // Old key followed by something other than 'N'.
    let upd =
        empty_tuple(empty_tuple(Wire::new().byte(b'U').uint32(1).byte(b'K')).byte(b'K')).bytes();
    assert_eq!(
        decode(&upd, false),
        Err(DecodeError::UnknownTag {
            context: "update tuple marker",
            tag: b'K'
        })
    );
    let del = empty_tuple(Wire::new().byte(b'D').uint32(1).byte(b'N')).bytes();
    assert_eq!(
        decode(&del, false),
        Err(DecodeError::UnknownTag {
            context: "delete tuple marker",
            tag: b'N'
        })
    );
}

#[test]
fn unknown_replica_identity() {
    let bytes = Wire::new()
        .byte(b'R')
        .uint32(1)
        .string("s")
        .string("t")
        .byte(b'x')
        .int16(0)
        .bytes();
    assert_eq!(
        decode(&bytes, false),
        Err(DecodeError::UnknownTag {
            context: "replica identity",
            tag: b'x'
        })
    );
}

#[test]
fn missing_nul_in_strings() {
    let origin = Wire::new()
        .byte(b'O')
        .uint64(1)
        .raw(b"no terminator")
        .bytes();
    assert_eq!(
        decode(&origin, false),
        Err(DecodeError::MissingNul {
            what: "origin name"
        })
    );
    let rel = Wire::new()
        .byte(b'R')
        .uint32(1)
        .string("s")
        .raw(b"rel")
        .bytes();
    assert_eq!(
        decode(&rel, false),
        Err(DecodeError::MissingNul {
            what: "relation name"
        })
    );
    let gid = Wire::new()
        .byte(b'b')
        .uint64(1)
        .uint64(2)
        .int64(3)
        .uint32(4)
        .raw(b"gid")
        .bytes();
    assert_eq!(
        decode(&gid, false),
        Err(DecodeError::MissingNul {
            what: "begin prepare gid"
        })
    );
    let prefix = Wire::new().byte(b'M').byte(0).uint64(1).raw(b"p").bytes();
    assert_eq!(
        decode(&prefix, false),
        Err(DecodeError::MissingNul {
            what: "message prefix"
        })
    );
}

#[test]
fn invalid_utf8_names() {
    let rel = |ns: &[u8], name: &[u8], col: &[u8]| {
        Wire::new()
            .byte(b'R')
            .uint32(1)
            .raw(ns)
            .byte(0)
            .raw(name)
            .byte(0)
            .byte(b'd')
            .int16(1)
            .byte(0)
            .raw(col)
            .byte(0)
            .uint32(23)
            .int32(-1)
            .bytes()
    };
    assert_eq!(
        decode(&rel(b"\xff", b"t", b"c"), false),
        Err(DecodeError::InvalidUtf8 {
            what: "relation namespace"
        })
    );
    assert_eq!(
        decode(&rel(b"s", b"t\xc3", b"c"), false),
        Err(DecodeError::InvalidUtf8 {
            what: "relation name"
        })
    );
    assert_eq!(
        decode(&rel(b"s", b"t", b"\xed\xa0\x80"), false), // a UTF-16 surrogate
        Err(DecodeError::InvalidUtf8 {
            what: "relation column name"
        })
    );
    let typ = Wire::new()
        .byte(b'Y')
        .uint32(1)
        .string("s")
        .raw(b"\xfe")
        .byte(0)
        .bytes();
    assert_eq!(
        decode(&typ, false),
        Err(DecodeError::InvalidUtf8 { what: "type name" })
    );
}

#[test]
fn trailing_bytes() {
    let begin = Wire::new()
        .byte(b'B')
        .uint64(1)
        .int64(2)
        .uint32(3)
        .byte(0)
        .bytes();
    assert_eq!(
        decode(&begin, false),
        Err(DecodeError::TrailingBytes {
            what: "begin",
            extra: 1
        })
    );
    assert_eq!(
        decode(b"EE", true),
        Err(DecodeError::TrailingBytes {
            what: "stream_stop",
            extra: 1
        })
    );
    let insert = Wire::new()
        .byte(b'I')
        .uint32(1)
        .byte(b'N')
        .int16(0)
        .raw(b"junk")
        .bytes();
    assert_eq!(
        decode(&insert, false),
        Err(DecodeError::TrailingBytes {
            what: "insert",
            extra: 4
        })
    );
    // Stream Abort: 0 or 16 extra bytes are v2/v4; 17 is trailing, 4 is a truncated v4.
    let abort = |extra: usize| {
        Wire::new()
            .byte(b'A')
            .uint32(1)
            .uint32(2)
            .raw(&vec![0u8; extra])
            .bytes()
    };
    assert_eq!(
        decode(&abort(17), false),
        Err(DecodeError::TrailingBytes {
            what: "stream_abort",
            extra: 1
        })
    );
    assert_eq!(
        decode(&abort(4), false),
        Err(DecodeError::Truncated {
            what: "stream abort lsn"
        })
    );
    assert_eq!(
        decode(&abort(12), false),
        Err(DecodeError::Truncated {
            what: "stream abort time"
        })
    );
    let keepalive = Wire::new()
        .byte(b'k')
        .uint64(1)
        .int64(2)
        .byte(0)
        .byte(0)
        .bytes();
    assert_eq!(
        ReplicationFrame::parse(keepalive),
        Err(DecodeError::TrailingBytes {
            what: "keepalive",
            extra: 1
        })
    );
    let mut status = bytes::BytesMut::new();
    StandbyStatusUpdate::default().encode(&mut status);
    status.extend_from_slice(b"x");
    assert_eq!(
        StandbyStatusUpdate::parse(&status),
        Err(DecodeError::TrailingBytes {
            what: "standby status update",
            extra: 1
        })
    );
}

#[test]
fn stream_state_violations_are_rejected_without_changing_state() {
    let mut d = Decoder::new();
    assert_eq!(
        d.decode(&Bytes::from_static(b"E")),
        Err(DecodeError::Invalid {
            what: "stream stop outside a stream"
        })
    );
    assert!(!d.in_stream());

    let mut d = decoder(true);
    assert_eq!(
        d.decode(&stream_start()),
        Err(DecodeError::Invalid {
            what: "stream start inside a stream"
        })
    );
    let begin = Wire::new().byte(b'B').uint64(1).int64(2).uint32(3).bytes();
    let commit = Wire::new()
        .byte(b'C')
        .byte(0)
        .uint64(1)
        .uint64(2)
        .int64(3)
        .bytes();
    let stream_commit = Wire::new()
        .byte(b'c')
        .uint32(XID)
        .byte(0)
        .uint64(1)
        .uint64(2)
        .int64(3)
        .bytes();
    for msg in [begin, commit, stream_commit] {
        assert_eq!(
            d.decode(&msg),
            Err(DecodeError::Invalid {
                what: "transaction control message inside a stream"
            })
        );
    }
    assert_eq!(d.stream_xid(), Some(XID), "errors leave the state alone");
    // A malformed Stream Start outside a stream does not open one either.
    let mut d = Decoder::new();
    assert!(d.decode(&Bytes::from_static(b"S\0\0")).is_err());
    assert!(!d.in_stream());
    // reset() forgets an open stream (reconnect).
    let mut d = decoder(true);
    d.reset();
    assert!(!d.in_stream());
}
