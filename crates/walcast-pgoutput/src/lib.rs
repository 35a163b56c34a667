//! Sans-IO decoder for the Postgres logical replication stream and the `pgoutput` plugin.
//!
//! It owns the bytes between the socket and the change model: replication framing, pgoutput
//! messages (protocol versions 1 to 4), tuple cells and the relation cache. It performs no
//! I/O, keeps no clocks and never blocks; the replication crate feeds it CopyData payloads.
//!
//! ```text
//! CopyData 'd' payload ──ReplicationFrame::parse──┬─ 'k' PrimaryKeepalive ─▶ maybe reply 'r'
//!                                                 │                          (StandbyStatusUpdate)
//!                                                 └─ 'w' XLogData { wal_start, wal_end, data }
//!                                                                          │ exactly one message
//!                                             Decoder::decode(&data) ◀─────┘
//!          B C O Y T M (v1) · S E c A (v2) · A+lsn/time (v4) · b P K r p (v3)
//!          R Relation ──▶ RelationCache (replace by OID)
//!          I U D ──▶ 'N' / 'K' / 'O' TupleData: Int16 ncols, per cell
//!                    'n' Null · 'u' UnchangedToast · 't' Text(Bytes) · 'b' Binary(Bytes)
//! ```
//!
//! Invariants:
//!
//! * **Never panics on input.** Every read is bounds-checked, every declared count or length
//!   is validated against the bytes actually left before anything is allocated from it, and
//!   all failures are a [`DecodeError`]. Proptest and a cargo-fuzz target (`fuzz/`) hold
//!   this.
//! * **The xid prefix exists only inside a stream.** [`Decoder`] tracks Stream Start/Stop and
//!   reads the Int32 xid prefix of R/Y/I/U/D/T/M iff inside one; outside, `xid` is `None`.
//! * **Zero copy for payloads.** Cells and logical message contents are slices of the
//!   XLogData `Bytes`, which is itself a slice of the CopyData frame.
//! * **One message per XLogData.** Trailing bytes are an error, never silently skipped.
//!
//! [`encode`] writes everything back (the exact inverse), for synthesizing streams in tests.
//!
//! ```
//! use bytes::Bytes;
//! use walcast_pgoutput::{encode, Begin, Decoder, LogicalMessage, Lsn, ReplicationFrame};
//!
//! let begin = LogicalMessage::Begin(Begin { final_lsn: Lsn(0x16B3748), commit_time: 0, xid: 7 });
//! let frame: Bytes = encode::xlog_data(Lsn(1), Lsn(2), 0, &begin)?;
//!
//! let mut decoder = Decoder::new(); // one per replication connection
//! match ReplicationFrame::parse(frame)? {
//!     ReplicationFrame::XLogData(x) => assert_eq!(decoder.decode(&x.data)?, begin),
//!     ReplicationFrame::Keepalive(_) => unreachable!(),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

// The modules are public so their docs (layouts, tag disambiguation, invariants) render;
// everything is also re-exported at the root, which is the path to use.
pub mod encode;
pub mod error;
pub mod framing;
pub mod lsn;
pub mod message;
mod reader;
pub mod relation_cache;

pub use error::DecodeError;
pub use framing::{PrimaryKeepalive, ReplicationFrame, StandbyStatusUpdate, XLogData};
pub use lsn::{pg_to_unix_micros, unix_to_pg_micros, Lsn, LsnParseError, PG_EPOCH_OFFSET_MICROS};
pub use message::{
    Begin, BeginPrepare, Cell, Commit, CommitPrepared, Decoder, Delete, Insert,
    LogicalDecodingMessage, LogicalMessage, OldTuple, Origin, Prepare, Relation, RelationColumn,
    ReplicaIdentity, RollbackPrepared, StreamAbort, StreamCommit, StreamStart, Truncate, TupleData,
    TypeMessage, Update,
};
pub use relation_cache::RelationCache;
