//! Golden tests: hand-written wire layouts, field by field from the protocol spec, decoded
//! and checked field by field. None of these bytes come from the crate's encoder.

mod common;

use bytes::{Bytes, BytesMut};
use common::Wire;
use walcast_pgoutput::*;

const XID: u32 = 0x0000_02F1; // 753
const SUBXID: u32 = 0x0000_02F5;
const TS: i64 = 784_111_777_123_456; // 2024-11-05 ~ µs since 2000-01-01

fn decode_one(bytes: &Bytes) -> LogicalMessage {
    let mut d = Decoder::new();
    let m = d.decode(bytes).expect("golden message decodes");
    assert!(!d.in_stream());
    m
}

/// A decoder that has just seen `Stream Start(XID, first)`.
fn streaming_decoder() -> Decoder {
    let mut d = Decoder::new();
    let start = Wire::new().byte(b'S').uint32(XID).byte(1).bytes();
    assert_eq!(
        d.decode(&start),
        Ok(LogicalMessage::StreamStart(StreamStart {
            xid: XID,
            first_segment: true
        }))
    );
    assert!(d.in_stream());
    assert_eq!(d.stream_xid(), Some(XID));
    d
}

fn text(s: &str) -> Cell {
    Cell::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// True if `part` points into `whole` (zero-copy slicing).
fn is_slice_of(part: &Bytes, whole: &Bytes) -> bool {
    let w = whole.as_ptr() as usize;
    let p = part.as_ptr() as usize;
    p >= w && p + part.len() <= w + whole.len()
}

// ───────────────────────────── replication framing ─────────────────────────────

#[test]
fn xlogdata_frame() {
    let frame = Wire::new()
        .byte(b'w')
        .uint64(0x0000_0001_0000_0010) // wal start 1/10
        .uint64(0x0000_0001_0000_0F00) // wal end 1/F00
        .int64(TS)
        .raw(b"E") // a Stream Stop message as payload
        .bytes();
    let ReplicationFrame::XLogData(x) = ReplicationFrame::parse(frame.clone()).expect("parses")
    else {
        panic!("expected XLogData");
    };
    assert_eq!(x.wal_start, Lsn(0x1_0000_0010));
    assert_eq!(x.wal_start.to_string(), "1/10");
    assert_eq!(x.wal_end, Lsn(0x1_0000_0F00));
    assert_eq!(x.send_time, TS);
    assert_eq!(&x.data[..], b"E");
    assert!(
        is_slice_of(&x.data, &frame),
        "data must be a slice of the frame"
    );
}

#[test]
fn xlogdata_with_empty_payload_is_a_valid_frame() {
    let frame = Wire::new().byte(b'w').uint64(1).uint64(2).int64(3).bytes();
    let ReplicationFrame::XLogData(x) = ReplicationFrame::parse(frame).expect("parses") else {
        panic!("expected XLogData");
    };
    assert!(x.data.is_empty());
    // ... but an empty payload is not a pgoutput message.
    assert_eq!(
        Decoder::new().decode(&x.data),
        Err(DecodeError::Truncated {
            what: "message tag"
        })
    );
}

#[test]
fn keepalive_frame_literal_bytes() {
    #[rustfmt::skip]
    let frame: &[u8] = &[
        b'k',
        0x00, 0x00, 0x00, 0x00, 0x01, 0x6B, 0x37, 0x48, // wal end 0/16B3748
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xE8, // send time 1000 µs
        0x01,                                           // reply requested
    ];
    assert_eq!(
        ReplicationFrame::parse(Bytes::from_static(frame)),
        Ok(ReplicationFrame::Keepalive(PrimaryKeepalive {
            wal_end: "0/16B3748".parse().expect("valid lsn"),
            send_time: 1000,
            reply_requested: true,
        }))
    );
}

#[test]
fn keepalive_reply_flag_follows_postgres() {
    for (byte, expected) in [(0u8, false), (1, true), (2, true), (0xFF, true)] {
        let frame = Wire::new()
            .byte(b'k')
            .uint64(7)
            .int64(-1)
            .byte(byte)
            .bytes();
        assert_eq!(
            ReplicationFrame::parse(frame),
            Ok(ReplicationFrame::Keepalive(PrimaryKeepalive {
                wal_end: Lsn(7),
                send_time: -1,
                reply_requested: expected,
            }))
        );
    }
}

#[test]
fn standby_status_update_literal_bytes() {
    #[rustfmt::skip]
    let expected: &[u8] = &[
        b'r',
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x30, // write 1/30
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x20, // flush 1/20
        0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x10, // apply 1/10
        0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFE, // client time -2
        0x00,                                           // no reply requested
    ];
    let update = StandbyStatusUpdate {
        write: "1/30".parse().expect("lsn"),
        flush: "1/20".parse().expect("lsn"),
        apply: "1/10".parse().expect("lsn"),
        client_time: -2,
        reply_requested: false,
    };
    let mut out = BytesMut::from(&b"prefix"[..]);
    update.encode(&mut out);
    assert_eq!(&out[..6], b"prefix", "encode appends");
    assert_eq!(&out[6..], expected);
    assert_eq!(expected.len(), StandbyStatusUpdate::ENCODED_LEN);
    assert_eq!(StandbyStatusUpdate::parse(expected), Ok(update));

    let mut ping = expected.to_vec();
    if let Some(last) = ping.last_mut() {
        *last = 1;
    }
    let parsed = StandbyStatusUpdate::parse(&ping).expect("parses");
    assert!(parsed.reply_requested);
}

#[test]
fn standby_status_tag_is_not_a_server_frame() {
    // 'r' is frontend → backend only; at the frame level it is not Rollback Prepared either.
    let mut out = BytesMut::new();
    StandbyStatusUpdate::default().encode(&mut out);
    assert_eq!(
        ReplicationFrame::parse(out.freeze()),
        Err(DecodeError::UnknownTag {
            context: "replication frame",
            tag: b'r'
        })
    );
    assert_eq!(
        StandbyStatusUpdate::parse(b"k"),
        Err(DecodeError::UnknownTag {
            context: "standby status update",
            tag: b'k'
        })
    );
}

// ───────────────────────────── protocol v1 ─────────────────────────────

#[test]
fn v1_begin_literal_bytes() {
    #[rustfmt::skip]
    let bytes = Bytes::from_static(&[
        b'B',
        0x00, 0x00, 0x00, 0x00, 0x01, 0x6B, 0x37, 0x48, // final lsn 0/16B3748
        0x00, 0x02, 0xC9, 0x2F, 0x65, 0x1B, 0x0C, 0x80, // commit time
        0x00, 0x00, 0x02, 0xF1,                         // xid 753
    ]);
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0x16B_3748),
            commit_time: 0x0002_C92F_651B_0C80,
            xid: 753,
        })
    );
}

#[test]
fn v1_commit() {
    let bytes = Wire::new()
        .byte(b'C')
        .byte(0) // flags
        .uint64(0x16B_3748) // commit lsn
        .uint64(0x16B_3778) // end lsn
        .int64(TS)
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x16B_3748),
            end_lsn: Lsn(0x16B_3778),
            commit_time: TS,
        })
    );
}

#[test]
fn v1_origin() {
    let bytes = Wire::new()
        .byte(b'O')
        .uint64(0xABCD_0000_0001)
        .string("pg_16395")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(0xABCD_0000_0001),
            name: "pg_16395".into(),
        })
    );
}

fn relation_body(w: Wire) -> Wire {
    w.uint32(16_384) // relation oid
        .string("public")
        .string("todos")
        .byte(b'd') // replica identity default
        .int16(3) // ncols
        .byte(1) // flags: key
        .string("id")
        .uint32(20) // int8
        .int32(-1)
        .byte(0)
        .string("title")
        .uint32(1043) // varchar
        .int32(104) // varchar(100): typmod = 100 + 4
        .byte(0)
        .string("späť") // non-ASCII UTF-8 name
        .uint32(16_500)
        .int32(-1)
}

fn expected_relation(xid: Option<u32>) -> Relation {
    Relation {
        xid,
        id: 16_384,
        namespace: "public".into(),
        name: "todos".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            RelationColumn {
                is_key: true,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            },
            RelationColumn {
                is_key: false,
                name: "title".into(),
                type_oid: 1043,
                type_modifier: 104,
            },
            RelationColumn {
                is_key: false,
                name: "späť".into(),
                type_oid: 16_500,
                type_modifier: -1,
            },
        ],
    }
}

#[test]
fn v1_relation() {
    let bytes = relation_body(Wire::new().byte(b'R')).bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Relation(expected_relation(None))
    );
}

#[test]
fn v1_relation_pg_catalog_namespace_and_identities() {
    for (wire, identity) in [
        (b'd', ReplicaIdentity::Default),
        (b'n', ReplicaIdentity::Nothing),
        (b'f', ReplicaIdentity::Full),
        (b'i', ReplicaIdentity::Index),
    ] {
        let bytes = Wire::new()
            .byte(b'R')
            .uint32(1259)
            .string("") // pg_catalog is sent as an empty namespace
            .string("pg_class")
            .byte(wire)
            .int16(0)
            .bytes();
        assert_eq!(
            decode_one(&bytes),
            LogicalMessage::Relation(Relation {
                xid: None,
                id: 1259,
                namespace: "pg_catalog".into(),
                name: "pg_class".into(),
                replica_identity: identity,
                columns: vec![],
            })
        );
    }
}

#[test]
fn v1_relation_ignores_unknown_column_flag_bits() {
    let bytes = Wire::new()
        .byte(b'R')
        .uint32(1)
        .string("s")
        .string("t")
        .byte(b'f')
        .int16(2)
        .byte(0b1000_0001)
        .string("a")
        .uint32(23)
        .int32(-1)
        .byte(0b1000_0000)
        .string("b")
        .uint32(23)
        .int32(-1)
        .bytes();
    let LogicalMessage::Relation(r) = decode_one(&bytes) else {
        panic!("expected Relation");
    };
    assert!(r.columns[0].is_key);
    assert!(!r.columns[1].is_key);
}

#[test]
fn v1_type() {
    let bytes = Wire::new()
        .byte(b'Y')
        .uint32(16_500)
        .string("public")
        .string("mood")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Type(TypeMessage {
            xid: None,
            id: 16_500,
            namespace: "public".into(),
            name: "mood".into(),
        })
    );
}

/// TupleData with one cell of each kind: 'n', 'u', 't' "42", 'b' [0,1,2], 't' "".
fn tuple_all_kinds(w: Wire) -> Wire {
    w.int16(5)
        .byte(b'n')
        .byte(b'u')
        .byte(b't')
        .int32(2)
        .raw(b"42")
        .byte(b'b')
        .int32(3)
        .raw(&[0, 1, 2])
        .byte(b't')
        .int32(0)
}

fn all_kinds() -> TupleData {
    TupleData(vec![
        Cell::Null,
        Cell::UnchangedToast,
        text("42"),
        Cell::Binary(Bytes::from_static(&[0, 1, 2])),
        text(""),
    ])
}

#[test]
fn v1_insert_with_every_cell_kind() {
    let bytes = tuple_all_kinds(Wire::new().byte(b'I').uint32(16_384).byte(b'N')).bytes();
    let m = decode_one(&bytes);
    assert_eq!(
        m,
        LogicalMessage::Insert(Insert {
            xid: None,
            relation_id: 16_384,
            new: all_kinds(),
        })
    );
    let LogicalMessage::Insert(ins) = m else {
        unreachable!()
    };
    for cell in &ins.new.0 {
        if let Cell::Text(b) | Cell::Binary(b) = cell {
            assert!(
                b.is_empty() || is_slice_of(b, &bytes),
                "cells are zero-copy"
            );
        }
    }
}

#[test]
fn v1_update_without_old_tuple() {
    let bytes = Wire::new()
        .byte(b'U')
        .uint32(16_384)
        .byte(b'N')
        .int16(2)
        .byte(b't')
        .int32(1)
        .raw(b"7")
        .byte(b'u')
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 16_384,
            old: None,
            new: TupleData(vec![text("7"), Cell::UnchangedToast]),
        })
    );
}

#[test]
fn v1_update_with_old_key() {
    // 'K' here is the old-key marker, not Commit Prepared: it follows the relation id.
    let bytes = Wire::new()
        .byte(b'U')
        .uint32(16_384)
        .byte(b'K')
        .int16(2)
        .byte(b't')
        .int32(1)
        .raw(b"7")
        .byte(b'n')
        .byte(b'N')
        .int16(2)
        .byte(b't')
        .int32(1)
        .raw(b"8")
        .byte(b't')
        .int32(3)
        .raw(b"abc")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 16_384,
            old: Some(OldTuple::Key(TupleData(vec![text("7"), Cell::Null]))),
            new: TupleData(vec![text("8"), text("abc")]),
        })
    );
}

#[test]
fn v1_update_with_full_old_row() {
    let bytes = Wire::new()
        .byte(b'U')
        .uint32(16_384)
        .byte(b'O')
        .int16(1)
        .byte(b't')
        .int32(5)
        .raw(b"old v")
        .byte(b'N')
        .int16(1)
        .byte(b't')
        .int32(5)
        .raw(b"new v")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 16_384,
            old: Some(OldTuple::Full(TupleData(vec![text("old v")]))),
            new: TupleData(vec![text("new v")]),
        })
    );
}

#[test]
fn v1_delete_key_and_full() {
    for (marker, wrap) in [
        (b'K', OldTuple::Key as fn(TupleData) -> OldTuple),
        (b'O', OldTuple::Full as fn(TupleData) -> OldTuple),
    ] {
        let bytes = Wire::new()
            .byte(b'D')
            .uint32(16_384)
            .byte(marker)
            .int16(2)
            .byte(b't')
            .int32(2)
            .raw(b"42")
            .byte(b'n')
            .bytes();
        assert_eq!(
            decode_one(&bytes),
            LogicalMessage::Delete(Delete {
                xid: None,
                relation_id: 16_384,
                old: wrap(TupleData(vec![text("42"), Cell::Null])),
            })
        );
    }
}

#[test]
fn v1_truncate_options() {
    for (options, cascade, restart_identity) in [
        (0u8, false, false),
        (1, true, false),
        (2, false, true),
        (3, true, true),
        (0b1111_0000, false, false), // unknown bits ignored
    ] {
        let bytes = Wire::new()
            .byte(b'T')
            .int32(3) // nrels
            .byte(options)
            .uint32(16_384)
            .uint32(16_390)
            .uint32(u32::MAX)
            .bytes();
        assert_eq!(
            decode_one(&bytes),
            LogicalMessage::Truncate(Truncate {
                xid: None,
                cascade,
                restart_identity,
                relation_ids: vec![16_384, 16_390, u32::MAX],
            })
        );
    }
}

#[test]
fn v1_logical_decoding_message() {
    for (flags, transactional) in [(1u8, true), (0, false)] {
        let bytes = Wire::new()
            .byte(b'M')
            .byte(flags)
            .uint64(0x16B_4000)
            .string("walcast.hb")
            .int32(6)
            .raw(b"\x00bin\xffz") // content is bytes, NULs and non-UTF-8 allowed
            .bytes();
        let m = decode_one(&bytes);
        assert_eq!(
            m,
            LogicalMessage::Message(LogicalDecodingMessage {
                xid: None,
                transactional,
                lsn: Lsn(0x16B_4000),
                prefix: "walcast.hb".into(),
                content: Bytes::from_static(b"\x00bin\xffz"),
            })
        );
        let LogicalMessage::Message(msg) = m else {
            unreachable!()
        };
        assert!(is_slice_of(&msg.content, &bytes));
    }
}

// ───────────────────────────── protocol v2: streaming ─────────────────────────────

#[test]
fn v2_stream_start_and_stop() {
    let mut d = Decoder::new();
    let start = Wire::new().byte(b'S').uint32(XID).byte(0).bytes();
    assert_eq!(
        d.decode(&start),
        Ok(LogicalMessage::StreamStart(StreamStart {
            xid: XID,
            first_segment: false
        }))
    );
    assert!(d.in_stream());
    assert_eq!(
        d.decode(&Wire::new().byte(b'E').bytes()),
        Ok(LogicalMessage::StreamStop)
    );
    assert!(!d.in_stream());
    assert_eq!(d.stream_xid(), None);
}

#[test]
fn v2_relation_and_type_inside_stream_carry_xid() {
    let mut d = streaming_decoder();
    let rel = relation_body(Wire::new().byte(b'R').uint32(SUBXID)).bytes();
    assert_eq!(
        d.decode(&rel),
        Ok(LogicalMessage::Relation(expected_relation(Some(SUBXID))))
    );
    let typ = Wire::new()
        .byte(b'Y')
        .uint32(XID)
        .uint32(16_500)
        .string("")
        .string("mood")
        .bytes();
    assert_eq!(
        d.decode(&typ),
        Ok(LogicalMessage::Type(TypeMessage {
            xid: Some(XID),
            id: 16_500,
            namespace: "pg_catalog".into(),
            name: "mood".into(),
        }))
    );
    assert_eq!(
        d.stream_xid(),
        Some(XID),
        "prefix xids do not move the stream xid"
    );
}

#[test]
fn v2_dml_inside_stream_carries_xid() {
    let mut d = streaming_decoder();
    let ins = tuple_all_kinds(Wire::new().byte(b'I').uint32(XID).uint32(16_384).byte(b'N')).bytes();
    assert_eq!(
        d.decode(&ins),
        Ok(LogicalMessage::Insert(Insert {
            xid: Some(XID),
            relation_id: 16_384,
            new: all_kinds(),
        }))
    );
    let upd = Wire::new()
        .byte(b'U')
        .uint32(SUBXID)
        .uint32(16_384)
        .byte(b'K')
        .int16(1)
        .byte(b't')
        .int32(1)
        .raw(b"1")
        .byte(b'N')
        .int16(1)
        .byte(b't')
        .int32(1)
        .raw(b"2")
        .bytes();
    assert_eq!(
        d.decode(&upd),
        Ok(LogicalMessage::Update(Update {
            xid: Some(SUBXID),
            relation_id: 16_384,
            old: Some(OldTuple::Key(TupleData(vec![text("1")]))),
            new: TupleData(vec![text("2")]),
        }))
    );
    let del = Wire::new()
        .byte(b'D')
        .uint32(XID)
        .uint32(16_384)
        .byte(b'O')
        .int16(1)
        .byte(b'n')
        .bytes();
    assert_eq!(
        d.decode(&del),
        Ok(LogicalMessage::Delete(Delete {
            xid: Some(XID),
            relation_id: 16_384,
            old: OldTuple::Full(TupleData(vec![Cell::Null])),
        }))
    );
    let trunc = Wire::new()
        .byte(b'T')
        .uint32(XID)
        .int32(1)
        .byte(1)
        .uint32(16_384)
        .bytes();
    assert_eq!(
        d.decode(&trunc),
        Ok(LogicalMessage::Truncate(Truncate {
            xid: Some(XID),
            cascade: true,
            restart_identity: false,
            relation_ids: vec![16_384],
        }))
    );
    let msg = Wire::new()
        .byte(b'M')
        .uint32(XID)
        .byte(1)
        .uint64(99)
        .string("p")
        .int32(2)
        .raw(b"hi")
        .bytes();
    assert_eq!(
        d.decode(&msg),
        Ok(LogicalMessage::Message(LogicalDecodingMessage {
            xid: Some(XID),
            transactional: true,
            lsn: Lsn(99),
            prefix: "p".into(),
            content: Bytes::from_static(b"hi"),
        }))
    );
    // Origin never has the prefix, even inside a stream.
    let origin = Wire::new().byte(b'O').uint64(5).string("node_a").bytes();
    assert_eq!(
        d.decode(&origin),
        Ok(LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(5),
            name: "node_a".into(),
        }))
    );
    assert_eq!(
        d.decode(&Wire::new().byte(b'E').bytes()),
        Ok(LogicalMessage::StreamStop)
    );
}

#[test]
fn v2_same_insert_bytes_decode_differently_by_stream_state() {
    // Outside a stream the first four bytes are the relation id; inside they are the xid.
    let body = Wire::new()
        .byte(b'I')
        .uint32(16_384)
        .byte(b'N')
        .int16(0)
        .bytes();
    assert_eq!(
        Decoder::new().decode(&body),
        Ok(LogicalMessage::Insert(Insert {
            xid: None,
            relation_id: 16_384,
            new: TupleData(vec![]),
        }))
    );
    let mut d = streaming_decoder();
    // Inside, the relation id would start at the 'N': this layout no longer parses.
    assert!(d.decode(&body).is_err());
    assert!(
        d.in_stream(),
        "a failed decode does not change the stream state"
    );
}

#[test]
fn v2_stream_commit() {
    let bytes = Wire::new()
        .byte(b'c')
        .uint32(XID)
        .byte(0)
        .uint64(0x2_0000_0100)
        .uint64(0x2_0000_0180)
        .int64(TS)
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: XID,
            flags: 0,
            commit_lsn: Lsn(0x2_0000_0100),
            end_lsn: Lsn(0x2_0000_0180),
            commit_time: TS,
        })
    );
}

#[test]
fn v2_stream_abort_without_parallel_fields() {
    let bytes = Wire::new().byte(b'A').uint32(XID).uint32(SUBXID).bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: XID,
            subxid: SUBXID,
            abort_lsn: None,
            abort_time: None,
        })
    );
}

// ───────────────────────────── protocol v3: two-phase ─────────────────────────────

#[test]
fn v3_begin_prepare() {
    // 'b' as a message tag is Begin Prepare; as a cell kind it is binary.
    let bytes = Wire::new()
        .byte(b'b')
        .uint64(0x3_0000_0010)
        .uint64(0x3_0000_0090)
        .int64(TS)
        .uint32(XID)
        .string("gid-1")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::BeginPrepare(BeginPrepare {
            prepare_lsn: Lsn(0x3_0000_0010),
            end_lsn: Lsn(0x3_0000_0090),
            prepare_time: TS,
            xid: XID,
            gid: "gid-1".into(),
        })
    );
}

fn prepare_layout(tag: u8) -> Bytes {
    Wire::new()
        .byte(tag)
        .byte(0)
        .uint64(0x3_0000_0010)
        .uint64(0x3_0000_0090)
        .int64(TS)
        .uint32(XID)
        .string("gid-ü")
        .bytes()
}

fn expected_prepare() -> Prepare {
    Prepare {
        flags: 0,
        prepare_lsn: Lsn(0x3_0000_0010),
        end_lsn: Lsn(0x3_0000_0090),
        prepare_time: TS,
        xid: XID,
        gid: "gid-ü".into(),
    }
}

#[test]
fn v3_prepare_and_stream_prepare() {
    assert_eq!(
        decode_one(&prepare_layout(b'P')),
        LogicalMessage::Prepare(expected_prepare())
    );
    assert_eq!(
        decode_one(&prepare_layout(b'p')),
        LogicalMessage::StreamPrepare(expected_prepare())
    );
}

#[test]
fn v3_commit_prepared() {
    // 'K' as the first byte of a message is Commit Prepared, not an old-key marker.
    let bytes = Wire::new()
        .byte(b'K')
        .byte(0)
        .uint64(0x3_0000_0100)
        .uint64(0x3_0000_0180)
        .int64(TS)
        .uint32(XID)
        .string("gid-1")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::CommitPrepared(CommitPrepared {
            flags: 0,
            commit_lsn: Lsn(0x3_0000_0100),
            end_lsn: Lsn(0x3_0000_0180),
            commit_time: TS,
            xid: XID,
            gid: "gid-1".into(),
        })
    );
}

#[test]
fn v3_rollback_prepared() {
    // 'r' inside an XLogData payload is Rollback Prepared, not a standby status update.
    let bytes = Wire::new()
        .byte(b'r')
        .byte(0)
        .uint64(0x3_0000_0090)
        .uint64(0x3_0000_0200)
        .int64(TS)
        .int64(TS + 5_000_000)
        .uint32(XID)
        .string("gid-1")
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: 0,
            prepare_end_lsn: Lsn(0x3_0000_0090),
            rollback_end_lsn: Lsn(0x3_0000_0200),
            prepare_time: TS,
            rollback_time: TS + 5_000_000,
            xid: XID,
            gid: "gid-1".into(),
        })
    );
}

// ───────────────────────────── protocol v4: parallel streaming ─────────────────────────────

#[test]
fn v4_stream_abort_with_lsn_and_time() {
    let bytes = Wire::new()
        .byte(b'A')
        .uint32(XID)
        .uint32(XID) // whole transaction
        .uint64(0x4_0000_0042)
        .int64(TS)
        .bytes();
    assert_eq!(
        decode_one(&bytes),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: XID,
            subxid: XID,
            abort_lsn: Some(Lsn(0x4_0000_0042)),
            abort_time: Some(TS),
        })
    );
}

// ───────────────────────────── a whole stream ─────────────────────────────

#[test]
fn interleaved_stream_then_plain_transaction_through_frames() {
    // Stream chunk for XID, then an ordinary transaction, then the stream's commit: the
    // decoder must drop the prefix as soon as Stream Stop is seen.
    let payloads = [
        Wire::new().byte(b'S').uint32(XID).byte(1).bytes(),
        Wire::new()
            .byte(b'I')
            .uint32(XID)
            .uint32(1)
            .byte(b'N')
            .int16(1)
            .byte(b'n')
            .bytes(),
        Wire::new().byte(b'E').bytes(),
        Wire::new()
            .byte(b'B')
            .uint64(10)
            .int64(TS)
            .uint32(900)
            .bytes(),
        Wire::new()
            .byte(b'I')
            .uint32(2)
            .byte(b'N')
            .int16(1)
            .byte(b'u')
            .bytes(),
        Wire::new()
            .byte(b'C')
            .byte(0)
            .uint64(10)
            .uint64(20)
            .int64(TS)
            .bytes(),
        Wire::new()
            .byte(b'c')
            .uint32(XID)
            .byte(0)
            .uint64(30)
            .uint64(40)
            .int64(TS)
            .bytes(),
    ];
    let mut d = Decoder::new();
    let mut kinds = Vec::new();
    let mut xids = Vec::new();
    for (i, p) in payloads.iter().enumerate() {
        let frame = Wire::new()
            .byte(b'w')
            .uint64(i as u64)
            .uint64(100)
            .int64(TS)
            .raw(p)
            .bytes();
        let ReplicationFrame::XLogData(x) = ReplicationFrame::parse(frame).expect("frame") else {
            panic!("expected XLogData");
        };
        assert_eq!(x.wal_start, Lsn(i as u64));
        let m = d.decode(&x.data).expect("message");
        if let LogicalMessage::Insert(ins) = &m {
            xids.push((ins.relation_id, ins.xid));
        }
        kinds.push(m.kind());
    }
    assert_eq!(
        kinds,
        [
            "stream_start",
            "insert",
            "stream_stop",
            "begin",
            "insert",
            "commit",
            "stream_commit"
        ]
    );
    assert_eq!(xids, [(1, Some(XID)), (2, None)]);
}

#[test]
fn relation_cache_replaces_on_ddl() {
    let mut cache = RelationCache::new();
    let v1 = relation_body(Wire::new().byte(b'R')).bytes();
    let v2 = Wire::new()
        .byte(b'R')
        .uint32(16_384)
        .string("public")
        .string("todos_renamed")
        .byte(b'f')
        .int16(1)
        .byte(1)
        .string("id")
        .uint32(20)
        .int32(-1)
        .bytes();
    let mut d = Decoder::new();
    for bytes in [v1, v2] {
        let LogicalMessage::Relation(r) = d.decode(&bytes).expect("relation") else {
            panic!("expected Relation");
        };
        cache.apply(r);
    }
    let r = cache.get(16_384).expect("cached");
    assert_eq!(r.name, "todos_renamed");
    assert_eq!(r.replica_identity, ReplicaIdentity::Full);
    assert_eq!(r.columns.len(), 1);
    assert_eq!(cache.len(), 1);
}
