//! Properties: arbitrary bytes never panic, and `decode(encode(m)) == m` for every message
//! and frame the encoder can write.

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use walcast_pgoutput::encode::{self, EncodeError};
use walcast_pgoutput::*;

// ─────────────────────────── never panics ───────────────────────────

/// Tags worth steering towards, so random bodies reach deep into each parser.
const MESSAGE_TAGS: &[u8] = b"BCORYIUDTMSEcAbPKrpNnutw";

fn stream_start() -> Bytes {
    Bytes::from_static(&[b'S', 0, 0, 0, 1, 1])
}

fn decode_both_ways(bytes: &Bytes) {
    let _ = Decoder::new().decode(bytes);
    let mut d = Decoder::new();
    if d.decode(&stream_start()).is_ok() {
        let before = d.clone();
        if d.decode(bytes).is_err() {
            assert_eq!(
                d, before,
                "a failed decode must not change the stream state"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..256)) {
        let bytes = Bytes::from(data);
        let _ = ReplicationFrame::parse(bytes.clone());
        let _ = StandbyStatusUpdate::parse(&bytes);
        decode_both_ways(&bytes);
    }

    #[test]
    fn tagged_bytes_never_panic(
        tag in proptest::sample::select(MESSAGE_TAGS),
        body in vec(any::<u8>(), 0..128),
    ) {
        let mut data = vec![tag];
        data.extend_from_slice(&body);
        let bytes = Bytes::from(data);
        decode_both_ways(&bytes);
        if let Ok(ReplicationFrame::XLogData(x)) = ReplicationFrame::parse(bytes.clone()) {
            decode_both_ways(&x.data);
        }
    }

    /// Valid messages with random byte flips and cuts: mostly-valid input is where length
    /// checks are actually exercised.
    #[test]
    fn mutated_valid_messages_never_panic(
        (m, in_stream) in message_in_state(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut data = encode::message_to_bytes(&m).expect("encodable").to_vec();
        if !data.is_empty() {
            for (i, b) in flips {
                let i = i.index(data.len());
                data[i] = b;
            }
            data.truncate(cut.index(data.len() + 1));
        }
        let bytes = Bytes::from(data);
        if in_stream { decode_both_ways(&bytes) } else { let _ = Decoder::new().decode(&bytes); }
    }
}

// ─────────────────────────── generators ───────────────────────────

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

/// NUL-free strings (all the wire can carry), including multi-byte characters.
fn name() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

/// Non-empty namespaces, since the wire's "" means pg_catalog.
fn namespace() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("pg_catalog".to_owned()),
        Just("public".to_owned()),
        "\\PC{1,12}"
    ]
}

fn payload() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn cell() -> impl Strategy<Value = Cell> {
    prop_oneof![
        Just(Cell::Null),
        Just(Cell::UnchangedToast),
        payload().prop_map(Cell::Text),
        payload().prop_map(Cell::Binary),
    ]
}

fn tuple() -> impl Strategy<Value = TupleData> {
    vec(cell(), 0..6).prop_map(TupleData)
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

fn replica_identity() -> impl Strategy<Value = ReplicaIdentity> {
    prop_oneof![
        Just(ReplicaIdentity::Default),
        Just(ReplicaIdentity::Nothing),
        Just(ReplicaIdentity::Full),
        Just(ReplicaIdentity::Index),
    ]
}

fn column() -> impl Strategy<Value = RelationColumn> {
    (any::<bool>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(is_key, name, type_oid, type_modifier)| RelationColumn {
            is_key,
            name,
            type_oid,
            type_modifier,
        },
    )
}

fn prepare() -> impl Strategy<Value = Prepare> {
    (
        any::<u8>(),
        lsn(),
        lsn(),
        any::<i64>(),
        any::<u32>(),
        name(),
    )
        .prop_map(
            |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
                flags,
                prepare_lsn,
                end_lsn,
                prepare_time,
                xid,
                gid,
            },
        )
}

/// Messages that carry the xid prefix, with `xid` as given (Some inside a stream).
fn prefixed_message(xid: Option<u32>) -> impl Strategy<Value = LogicalMessage> {
    prop_oneof![
        (
            any::<u32>(),
            namespace(),
            name(),
            replica_identity(),
            vec(column(), 0..5)
        )
            .prop_map(move |(id, namespace, name, replica_identity, columns)| {
                LogicalMessage::Relation(Relation {
                    xid,
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), namespace(), name()).prop_map(move |(id, namespace, name)| {
            LogicalMessage::Type(TypeMessage {
                xid,
                id,
                namespace,
                name,
            })
        }),
        (any::<u32>(), tuple()).prop_map(move |(relation_id, new)| {
            LogicalMessage::Insert(Insert {
                xid,
                relation_id,
                new,
            })
        }),
        (any::<u32>(), proptest::option::of(old_tuple()), tuple()).prop_map(
            move |(relation_id, old, new)| {
                LogicalMessage::Update(Update {
                    xid,
                    relation_id,
                    old,
                    new,
                })
            }
        ),
        (any::<u32>(), old_tuple()).prop_map(move |(relation_id, old)| {
            LogicalMessage::Delete(Delete {
                xid,
                relation_id,
                old,
            })
        }),
        (any::<bool>(), any::<bool>(), vec(any::<u32>(), 0..6)).prop_map(
            move |(cascade, restart_identity, relation_ids)| {
                LogicalMessage::Truncate(Truncate {
                    xid,
                    cascade,
                    restart_identity,
                    relation_ids,
                })
            }
        ),
        (any::<bool>(), lsn(), name(), payload()).prop_map(
            move |(transactional, lsn, prefix, content)| {
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            }
        ),
    ]
}

/// Messages that are only valid outside a stream.
fn control_message() -> impl Strategy<Value = LogicalMessage> {
    prop_oneof![
        (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, commit_time, xid)| {
            LogicalMessage::Begin(Begin {
                final_lsn,
                commit_time,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, commit_time)| {
                LogicalMessage::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            }
        ),
        (any::<u32>(), any::<bool>()).prop_map(|(xid, first_segment)| {
            LogicalMessage::StreamStart(StreamStart { xid, first_segment })
        }),
        (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(xid, flags, commit_lsn, end_lsn, commit_time)| {
                LogicalMessage::StreamCommit(StreamCommit {
                    xid,
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            }
        ),
        (
            any::<u32>(),
            any::<u32>(),
            proptest::option::of((lsn(), any::<i64>()))
        )
            .prop_map(|(xid, subxid, v4)| {
                LogicalMessage::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn: v4.map(|(l, _)| l),
                    abort_time: v4.map(|(_, t)| t),
                })
            }),
        (lsn(), lsn(), any::<i64>(), any::<u32>(), name()).prop_map(
            |(prepare_lsn, end_lsn, prepare_time, xid, gid)| {
                LogicalMessage::BeginPrepare(BeginPrepare {
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                })
            }
        ),
        prepare().prop_map(LogicalMessage::Prepare),
        prepare().prop_map(LogicalMessage::StreamPrepare),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<u32>(),
            name()
        )
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time, xid, gid)| {
                LogicalMessage::CommitPrepared(CommitPrepared {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                    xid,
                    gid,
                })
            }),
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<i64>(),
            any::<u32>(),
            name()
        )
            .prop_map(
                |(
                    flags,
                    prepare_end_lsn,
                    rollback_end_lsn,
                    prepare_time,
                    rollback_time,
                    xid,
                    gid,
                )| {
                    LogicalMessage::RollbackPrepared(RollbackPrepared {
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_time,
                        rollback_time,
                        xid,
                        gid,
                    })
                }
            ),
    ]
}

fn origin() -> impl Strategy<Value = LogicalMessage> {
    (lsn(), name())
        .prop_map(|(commit_lsn, name)| LogicalMessage::Origin(Origin { commit_lsn, name }))
}

/// A message plus the stream state it must be decoded in.
fn message_in_state() -> impl Strategy<Value = (LogicalMessage, bool)> {
    prop_oneof![
        prefixed_message(None).prop_map(|m| (m, false)),
        any::<u32>()
            .prop_flat_map(|xid| prefixed_message(Some(xid)))
            .prop_map(|m| (m, true)),
        control_message().prop_map(|m| (m, false)),
        origin().prop_map(|m| (m, false)),
        origin().prop_map(|m| (m, true)),
        Just((LogicalMessage::StreamStop, true)),
    ]
}

fn decoder_in(in_stream: bool) -> Decoder {
    let mut d = Decoder::new();
    if in_stream {
        d.decode(&stream_start()).expect("stream start");
    }
    d
}

// ─────────────────────────── round trips ───────────────────────────

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn messages_round_trip((m, in_stream) in message_in_state()) {
        let bytes = encode::message_to_bytes(&m).expect("generated messages are encodable");
        let mut d = decoder_in(in_stream);
        prop_assert_eq!(d.decode(&bytes), Ok(m.clone()));
        // Stream Start/Stop move the state, everything else leaves it.
        let expect_in_stream = match m {
            LogicalMessage::StreamStart(_) => true,
            LogicalMessage::StreamStop => false,
            _ => in_stream,
        };
        prop_assert_eq!(d.in_stream(), expect_in_stream);
        // Appending keeps what was already in the buffer.
        let mut out = BytesMut::from(&b"xy"[..]);
        encode::message(&m, &mut out).expect("encodable");
        prop_assert_eq!(&out[..2], b"xy");
        prop_assert_eq!(&out[2..], &bytes[..]);
    }

    #[test]
    fn frames_round_trip(
        wal_start in lsn(),
        wal_end in lsn(),
        send_time in any::<i64>(),
        reply_requested in any::<bool>(),
        (m, in_stream) in message_in_state(),
    ) {
        let frame = encode::xlog_data(wal_start, wal_end, send_time, &m).expect("encodable");
        let ReplicationFrame::XLogData(x) = ReplicationFrame::parse(frame.clone()).expect("frame")
        else {
            return Err(TestCaseError::fail("expected XLogData"));
        };
        prop_assert_eq!(x.wal_start, wal_start);
        prop_assert_eq!(x.wal_end, wal_end);
        prop_assert_eq!(x.send_time, send_time);
        prop_assert_eq!(decoder_in(in_stream).decode(&x.data), Ok(m));
        let again = ReplicationFrame::XLogData(x);
        prop_assert_eq!(encode::frame_to_bytes(&again), frame);

        let k = ReplicationFrame::Keepalive(PrimaryKeepalive { wal_end, send_time, reply_requested });
        prop_assert_eq!(ReplicationFrame::parse(encode::frame_to_bytes(&k)), Ok(k));
    }

    #[test]
    fn standby_status_round_trips(
        write in lsn(), flush in lsn(), apply in lsn(),
        client_time in any::<i64>(), reply_requested in any::<bool>(),
    ) {
        let u = StandbyStatusUpdate { write, flush, apply, client_time, reply_requested };
        let mut out = BytesMut::new();
        u.encode(&mut out);
        prop_assert_eq!(out.len(), StandbyStatusUpdate::ENCODED_LEN);
        prop_assert_eq!(StandbyStatusUpdate::parse(&out), Ok(u));
    }

    /// The other direction for bytes: anything that decodes re-encodes to something that
    /// decodes to the same message (the wire form itself may differ: unknown flag bits).
    #[test]
    fn decoded_messages_re_encode(data in vec(any::<u8>(), 0..96), tag in proptest::sample::select(MESSAGE_TAGS), in_stream in any::<bool>()) {
        let mut raw = vec![tag];
        raw.extend_from_slice(&data);
        let bytes = Bytes::from(raw);
        let mut d = decoder_in(in_stream);
        let before = d.clone();
        if let Ok(m) = d.decode(&bytes) {
            let again = encode::message_to_bytes(&m).expect("decoded messages are encodable");
            let mut d2 = before;
            prop_assert_eq!(d2.decode(&again), Ok(m));
        }
    }
}

// ─────────────────────────── encoder edge cases ───────────────────────────

#[test]
fn encoder_rejects_what_the_wire_cannot_carry_and_leaves_out_untouched() {
    let nul_name = LogicalMessage::Origin(Origin {
        commit_lsn: Lsn(1),
        name: "a\0b".into(),
    });
    let mut out = BytesMut::from(&b"keep"[..]);
    assert_eq!(
        encode::message(&nul_name, &mut out),
        Err(EncodeError::InteriorNul {
            what: "origin name"
        })
    );
    assert_eq!(&out[..], b"keep");

    let too_wide = LogicalMessage::Insert(Insert {
        xid: None,
        relation_id: 1,
        new: TupleData(vec![Cell::Null; usize::from(u16::MAX)]),
    });
    assert_eq!(
        encode::message(&too_wide, &mut out),
        Err(EncodeError::TooLong {
            what: "tuple columns",
            len: usize::from(u16::MAX)
        })
    );
    assert_eq!(&out[..], b"keep");
}

#[test]
fn encoder_writes_pg_catalog_as_empty_namespace() {
    let m = LogicalMessage::Type(TypeMessage {
        xid: None,
        id: 7,
        namespace: "pg_catalog".into(),
        name: "t".into(),
    });
    let bytes = encode::message_to_bytes(&m).expect("encodable");
    assert_eq!(&bytes[..], b"Y\0\0\0\x07\0t\0");
}
