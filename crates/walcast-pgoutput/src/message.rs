//! pgoutput messages: the `data` of one XLogData, protocol versions 1 to 4.
//!
//! ```text
//! tag  message            version  [xid] prefix inside a stream
//! 'B'  Begin              1        -
//! 'C'  Commit             1        -
//! 'O'  Origin             1        no (never carries one)
//! 'R'  Relation           1        yes
//! 'Y'  Type               1        yes
//! 'I'  Insert             1        yes   ─┐
//! 'U'  Update             1        yes    ├─ TupleData: Int16 ncols, cells 'n' 'u' 't' 'b'
//! 'D'  Delete             1        yes   ─┘
//! 'T'  Truncate           1        yes
//! 'M'  Message            1        yes
//! 'S'  Stream Start       2        -
//! 'E'  Stream Stop        2        -
//! 'c'  Stream Commit      2        -
//! 'A'  Stream Abort       2 (+4)   -     v4 appends abort LSN + abort time
//! 'b'  Begin Prepare      3        -
//! 'P'  Prepare            3        -
//! 'K'  Commit Prepared    3        -
//! 'r'  Rollback Prepared  3        -
//! 'p'  Stream Prepare     3        -
//! ```
//!
//! # Tags that mean different things at different levels
//!
//! The wire reuses bytes across nesting levels, so every tag is interpreted only by the
//! parser of the level it appears at, never by looking at a byte in isolation:
//!
//! * `'K'` is Commit Prepared as the *first byte of a pgoutput message*, and the old-key
//!   marker only *after the relation id of an Update or Delete*. The tuple-marker parser
//!   has its own match, so it can never see a Commit Prepared.
//! * `'r'` is Rollback Prepared here, and the standby status update only at the
//!   replication-frame level ([`crate::framing`]), which is a different function fed a
//!   different buffer (CopyData payload vs XLogData `data`).
//! * `'b'` is Begin Prepare as a message tag, and a binary cell only as a *cell kind inside
//!   TupleData*.
//! * `'O'` is Origin as a message tag, and the old-full-row marker inside Update/Delete.
//!
//! # The xid prefix
//!
//! Between Stream Start and Stream Stop (v2+), Relation, Type, Insert, Update, Delete,
//! Truncate and Message carry an Int32 xid before their body, and nothing on the wire says
//! so: the only way to know is to track the stream state, which is why [`Decoder`] is
//! stateful. The decoder reads the prefix iff it is inside a stream, and fills the `xid`
//! fields iff it did; outside a stream they are always `None`.
//!
//! Because a misjudged state would silently shift every field by four bytes, the decoder is
//! strict about the state machine: Stream Start inside a stream, Stream Stop outside one, and
//! transaction-control messages (Begin, Commit, Stream Commit/Abort/Prepare, two-phase)
//! inside a stream are [`DecodeError::Invalid`]. Postgres never sends those; if it appears
//! to, we have lost sync and must reconnect. Origin is allowed inside a stream (pgoutput
//! sends it right after Stream Start) and has no xid prefix. The state only changes when a
//! message decodes successfully. Call [`Decoder::reset`] (or make a new one) on reconnect.
//!
//! # Strictness
//!
//! An XLogData carries exactly one message, so any byte left after the message is an error
//! ([`DecodeError::TrailingBytes`]). Unknown bits in flag bytes (relation column flags,
//! truncate options, message flags) are ignored, since they cannot shift the layout.

use bytes::Bytes;

use crate::error::DecodeError;
use crate::lsn::Lsn;
use crate::reader::Reader;

/// Tag bytes, shared with the encoder so both sides agree by construction.
pub(crate) mod tag {
    pub const BEGIN: u8 = b'B';
    pub const COMMIT: u8 = b'C';
    pub const ORIGIN: u8 = b'O';
    pub const RELATION: u8 = b'R';
    pub const TYPE: u8 = b'Y';
    pub const INSERT: u8 = b'I';
    pub const UPDATE: u8 = b'U';
    pub const DELETE: u8 = b'D';
    pub const TRUNCATE: u8 = b'T';
    pub const MESSAGE: u8 = b'M';
    pub const STREAM_START: u8 = b'S';
    pub const STREAM_STOP: u8 = b'E';
    pub const STREAM_COMMIT: u8 = b'c';
    pub const STREAM_ABORT: u8 = b'A';
    pub const BEGIN_PREPARE: u8 = b'b';
    pub const PREPARE: u8 = b'P';
    pub const COMMIT_PREPARED: u8 = b'K';
    pub const ROLLBACK_PREPARED: u8 = b'r';
    pub const STREAM_PREPARE: u8 = b'p';

    // Tuple markers (after the relation id of Insert/Update/Delete).
    pub const TUPLE_NEW: u8 = b'N';
    pub const TUPLE_KEY: u8 = b'K';
    pub const TUPLE_OLD: u8 = b'O';

    // Cell kinds (inside TupleData).
    pub const CELL_NULL: u8 = b'n';
    pub const CELL_UNCHANGED_TOAST: u8 = b'u';
    pub const CELL_TEXT: u8 = b't';
    pub const CELL_BINARY: u8 = b'b';
}

/// Bit 1 of a Relation column's flags: the column is part of the replica identity key.
pub(crate) const COLUMN_FLAG_KEY: u8 = 1;
/// Truncate option bits.
pub(crate) const TRUNCATE_CASCADE: u8 = 1;
pub(crate) const TRUNCATE_RESTART_IDENTITY: u8 = 2;
/// Message flag bit: transactional.
pub(crate) const MESSAGE_TRANSACTIONAL: u8 = 1;

/// What Postgres writes for a namespace of `pg_catalog` (an empty string).
pub(crate) const PG_CATALOG: &str = "pg_catalog";

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogicalMessage {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeMessage),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    Message(LogicalDecodingMessage),
    StreamStart(StreamStart),
    StreamStop,
    StreamCommit(StreamCommit),
    StreamAbort(StreamAbort),
    BeginPrepare(BeginPrepare),
    Prepare(Prepare),
    CommitPrepared(CommitPrepared),
    RollbackPrepared(RollbackPrepared),
    StreamPrepare(Prepare),
}

impl LogicalMessage {
    /// A short lower-case name, fit for log fields and metric labels (a small fixed set).
    pub fn kind(&self) -> &'static str {
        match self {
            LogicalMessage::Begin(_) => "begin",
            LogicalMessage::Commit(_) => "commit",
            LogicalMessage::Origin(_) => "origin",
            LogicalMessage::Relation(_) => "relation",
            LogicalMessage::Type(_) => "type",
            LogicalMessage::Insert(_) => "insert",
            LogicalMessage::Update(_) => "update",
            LogicalMessage::Delete(_) => "delete",
            LogicalMessage::Truncate(_) => "truncate",
            LogicalMessage::Message(_) => "message",
            LogicalMessage::StreamStart(_) => "stream_start",
            LogicalMessage::StreamStop => "stream_stop",
            LogicalMessage::StreamCommit(_) => "stream_commit",
            LogicalMessage::StreamAbort(_) => "stream_abort",
            LogicalMessage::BeginPrepare(_) => "begin_prepare",
            LogicalMessage::Prepare(_) => "prepare",
            LogicalMessage::CommitPrepared(_) => "commit_prepared",
            LogicalMessage::RollbackPrepared(_) => "rollback_prepared",
            LogicalMessage::StreamPrepare(_) => "stream_prepare",
        }
    }
}

/// Start of a (non-streamed) transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// LSN of the commit record.
    pub final_lsn: Lsn,
    pub commit_time: i64,
    pub xid: u32,
}

/// End of a transaction. `end_lsn` is the position to acknowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// The transaction was replayed from another node (replication origin).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub commit_lsn: Lsn,
    pub name: String,
}

/// `pg_class.relreplident`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReplicaIdentity {
    /// `d`: the primary key.
    Default,
    /// `n`: no old row at all.
    Nothing,
    /// `f`: the whole old row.
    Full,
    /// `i`: the columns of a chosen unique index.
    Index,
}

impl ReplicaIdentity {
    pub(crate) fn from_wire(b: u8) -> Result<Self, DecodeError> {
        match b {
            b'd' => Ok(ReplicaIdentity::Default),
            b'n' => Ok(ReplicaIdentity::Nothing),
            b'f' => Ok(ReplicaIdentity::Full),
            b'i' => Ok(ReplicaIdentity::Index),
            tag => Err(DecodeError::UnknownTag {
                context: "replica identity",
                tag,
            }),
        }
    }

    pub(crate) fn to_wire(self) -> u8 {
        match self {
            ReplicaIdentity::Default => b'd',
            ReplicaIdentity::Nothing => b'n',
            ReplicaIdentity::Full => b'f',
            ReplicaIdentity::Index => b'i',
        }
    }
}

/// A table's shape as of this point in the stream; later tuples of `id` follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Present iff sent inside a stream.
    pub xid: Option<u32>,
    /// The relation OID.
    pub id: u32,
    /// Decoded from the wire's empty string to `"pg_catalog"`.
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<RelationColumn>,
}

/// One published column, in tuple order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity key.
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    /// `atttypmod`; -1 when the type has none.
    pub type_modifier: i32,
}

/// A non-built-in type used by a following Relation (OID and name only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    pub xid: Option<u32>,
    pub id: u32,
    /// Decoded from the wire's empty string to `"pg_catalog"`, as for [`Relation`].
    pub namespace: String,
    pub name: String,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// `'n'`. In a key-only old tuple this also means "not part of the key, not sent".
    Null,
    /// `'u'`: a TOASTed value that did not change and was not written to WAL. Never a NULL.
    UnchangedToast,
    /// `'t'`: the type's text output, a zero-copy slice of the message.
    Text(Bytes),
    /// `'b'`: the type's binary send format (only with `binary 'true'`), zero-copy.
    Binary(Bytes),
}

/// The cells of one row, in the order of the Relation's columns.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TupleData(pub Vec<Cell>);

/// The old row image of an Update or Delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `'K'`: replica identity key columns; other columns are `Cell::Null` placeholders.
    Key(TupleData),
    /// `'O'`: the whole old row (REPLICA IDENTITY FULL).
    Full(TupleData),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub xid: Option<u32>,
    pub relation_id: u32,
    /// Absent unless a key column changed (DEFAULT/INDEX) or the identity is FULL.
    pub old: Option<OldTuple>,
    pub new: TupleData,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub xid: Option<u32>,
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    pub xid: Option<u32>,
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// `pg_logical_emit_message` output (needs `messages 'true'`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalDecodingMessage {
    pub xid: Option<u32>,
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    /// Zero-copy slice of the message.
    pub content: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamStart {
    pub xid: u32,
    pub first_segment: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamCommit {
    pub xid: u32,
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
}

/// `subxid == xid` means the whole streamed transaction aborted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamAbort {
    pub xid: u32,
    pub subxid: u32,
    /// v4 (`streaming 'parallel'`) only; present together with `abort_time`.
    pub abort_lsn: Option<Lsn>,
    pub abort_time: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// Prepare, and (with the same layout) Stream Prepare.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    pub flags: u8,
    pub prepare_lsn: Lsn,
    pub end_lsn: Lsn,
    pub prepare_time: i64,
    pub xid: u32,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    pub flags: u8,
    pub commit_lsn: Lsn,
    pub end_lsn: Lsn,
    pub commit_time: i64,
    pub xid: u32,
    pub gid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    pub flags: u8,
    pub prepare_end_lsn: Lsn,
    pub rollback_end_lsn: Lsn,
    pub prepare_time: i64,
    pub rollback_time: i64,
    pub xid: u32,
    pub gid: String,
}

/// Decodes pgoutput messages one XLogData payload at a time, tracking the stream state
/// that decides whether the xid prefix is present (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoder {
    /// The xid from the Stream Start we are inside of, if any.
    stream_xid: Option<u32>,
}

impl Decoder {
    pub fn new() -> Self {
        Decoder::default()
    }

    /// True between a Stream Start and its Stream Stop.
    pub fn in_stream(&self) -> bool {
        self.stream_xid.is_some()
    }

    /// The top-level xid of the open stream chunk. The per-message xid prefix may name a
    /// subtransaction instead, so this is the one to group buffered changes by.
    pub fn stream_xid(&self) -> Option<u32> {
        self.stream_xid
    }

    /// Forgets the stream state; use on reconnect, since the server restarts from a clean
    /// transaction boundary.
    pub fn reset(&mut self) {
        self.stream_xid = None;
    }

    /// Decodes one message. On error the stream state is left unchanged.
    pub fn decode(&mut self, data: &Bytes) -> Result<LogicalMessage, DecodeError> {
        let mut r = Reader::new(data);
        let t = r.u8("message tag")?;
        self.check_state(t)?;
        let in_stream = self.in_stream();
        let mut p = Parser {
            src: data,
            r,
            in_stream,
        };
        let msg = p.message(t)?;
        p.r.finish(msg.kind())?;
        match &msg {
            LogicalMessage::StreamStart(s) => self.stream_xid = Some(s.xid),
            LogicalMessage::StreamStop => self.stream_xid = None,
            _ => {}
        }
        Ok(msg)
    }

    fn check_state(&self, t: u8) -> Result<(), DecodeError> {
        use tag::*;
        let known = matches!(
            t,
            BEGIN
                | COMMIT
                | ORIGIN
                | RELATION
                | TYPE
                | INSERT
                | UPDATE
                | DELETE
                | TRUNCATE
                | MESSAGE
                | STREAM_START
                | STREAM_STOP
                | STREAM_COMMIT
                | STREAM_ABORT
                | BEGIN_PREPARE
                | PREPARE
                | COMMIT_PREPARED
                | ROLLBACK_PREPARED
                | STREAM_PREPARE
        );
        if !known {
            return Err(DecodeError::UnknownTag {
                context: "pgoutput message",
                tag: t,
            });
        }
        let allowed_in_stream = matches!(
            t,
            ORIGIN | RELATION | TYPE | INSERT | UPDATE | DELETE | TRUNCATE | MESSAGE | STREAM_STOP
        );
        match (self.in_stream(), t) {
            (true, STREAM_START) => Err(DecodeError::Invalid {
                what: "stream start inside a stream",
            }),
            (true, _) if !allowed_in_stream => Err(DecodeError::Invalid {
                what: "transaction control message inside a stream",
            }),
            (false, STREAM_STOP) => Err(DecodeError::Invalid {
                what: "stream stop outside a stream",
            }),
            _ => Ok(()),
        }
    }
}

/// One message's worth of parsing: the reader plus what is needed to slice cells out of
/// the owning buffer and to know whether the xid prefix is there.
struct Parser<'a> {
    src: &'a Bytes,
    r: Reader<'a>,
    in_stream: bool,
}

impl Parser<'_> {
    fn message(&mut self, t: u8) -> Result<LogicalMessage, DecodeError> {
        Ok(match t {
            tag::BEGIN => LogicalMessage::Begin(Begin {
                final_lsn: self.r.lsn("begin final lsn")?,
                commit_time: self.r.i64("begin commit time")?,
                xid: self.r.u32("begin xid")?,
            }),
            tag::COMMIT => LogicalMessage::Commit(Commit {
                flags: self.r.u8("commit flags")?,
                commit_lsn: self.r.lsn("commit lsn")?,
                end_lsn: self.r.lsn("commit end lsn")?,
                commit_time: self.r.i64("commit time")?,
            }),
            tag::ORIGIN => LogicalMessage::Origin(Origin {
                commit_lsn: self.r.lsn("origin commit lsn")?,
                name: self.r.cstr("origin name")?,
            }),
            tag::RELATION => LogicalMessage::Relation(self.relation()?),
            tag::TYPE => LogicalMessage::Type(TypeMessage {
                xid: self.xid("type xid")?,
                id: self.r.u32("type oid")?,
                namespace: self.namespace("type namespace")?,
                name: self.r.cstr("type name")?,
            }),
            tag::INSERT => {
                let xid = self.xid("insert xid")?;
                let relation_id = self.r.u32("insert relation id")?;
                match self.r.u8("insert tuple marker")? {
                    tag::TUPLE_NEW => {}
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            context: "insert tuple marker",
                            tag,
                        })
                    }
                }
                LogicalMessage::Insert(Insert {
                    xid,
                    relation_id,
                    new: self.tuple()?,
                })
            }
            tag::UPDATE => {
                let xid = self.xid("update xid")?;
                let relation_id = self.r.u32("update relation id")?;
                let (old, marker) = match self.r.u8("update tuple marker")? {
                    tag::TUPLE_KEY => {
                        let old = OldTuple::Key(self.tuple()?);
                        (Some(old), self.r.u8("update new tuple marker")?)
                    }
                    tag::TUPLE_OLD => {
                        let old = OldTuple::Full(self.tuple()?);
                        (Some(old), self.r.u8("update new tuple marker")?)
                    }
                    other => (None, other),
                };
                if marker != tag::TUPLE_NEW {
                    return Err(DecodeError::UnknownTag {
                        context: "update tuple marker",
                        tag: marker,
                    });
                }
                LogicalMessage::Update(Update {
                    xid,
                    relation_id,
                    old,
                    new: self.tuple()?,
                })
            }
            tag::DELETE => {
                let xid = self.xid("delete xid")?;
                let relation_id = self.r.u32("delete relation id")?;
                let old = match self.r.u8("delete tuple marker")? {
                    tag::TUPLE_KEY => OldTuple::Key(self.tuple()?),
                    tag::TUPLE_OLD => OldTuple::Full(self.tuple()?),
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            context: "delete tuple marker",
                            tag,
                        })
                    }
                };
                LogicalMessage::Delete(Delete {
                    xid,
                    relation_id,
                    old,
                })
            }
            tag::TRUNCATE => LogicalMessage::Truncate(self.truncate()?),
            tag::MESSAGE => {
                let xid = self.xid("message xid")?;
                let flags = self.r.u8("message flags")?;
                let lsn = self.r.lsn("message lsn")?;
                let prefix = self.r.cstr("message prefix")?;
                let len = self.r.length_i32("message content")?;
                let range = self.r.span(len, "message content")?;
                LogicalMessage::Message(LogicalDecodingMessage {
                    xid,
                    transactional: flags & MESSAGE_TRANSACTIONAL != 0,
                    lsn,
                    prefix,
                    content: self.src.slice(range),
                })
            }
            tag::STREAM_START => LogicalMessage::StreamStart(StreamStart {
                xid: self.r.u32("stream start xid")?,
                // Postgres itself only treats exactly 1 as "first segment".
                first_segment: self.r.u8("stream start first segment")? == 1,
            }),
            tag::STREAM_STOP => LogicalMessage::StreamStop,
            tag::STREAM_COMMIT => LogicalMessage::StreamCommit(StreamCommit {
                xid: self.r.u32("stream commit xid")?,
                flags: self.r.u8("stream commit flags")?,
                commit_lsn: self.r.lsn("stream commit lsn")?,
                end_lsn: self.r.lsn("stream commit end lsn")?,
                commit_time: self.r.i64("stream commit time")?,
            }),
            tag::STREAM_ABORT => {
                let xid = self.r.u32("stream abort xid")?;
                let subxid = self.r.u32("stream abort subxid")?;
                // v4 appends both fields or neither; anything in between is a truncation.
                let (abort_lsn, abort_time) = if self.r.remaining() == 0 {
                    (None, None)
                } else {
                    (
                        Some(self.r.lsn("stream abort lsn")?),
                        Some(self.r.i64("stream abort time")?),
                    )
                };
                LogicalMessage::StreamAbort(StreamAbort {
                    xid,
                    subxid,
                    abort_lsn,
                    abort_time,
                })
            }
            tag::BEGIN_PREPARE => LogicalMessage::BeginPrepare(BeginPrepare {
                prepare_lsn: self.r.lsn("begin prepare lsn")?,
                end_lsn: self.r.lsn("begin prepare end lsn")?,
                prepare_time: self.r.i64("begin prepare time")?,
                xid: self.r.u32("begin prepare xid")?,
                gid: self.r.cstr("begin prepare gid")?,
            }),
            tag::PREPARE => LogicalMessage::Prepare(self.prepare()?),
            tag::STREAM_PREPARE => LogicalMessage::StreamPrepare(self.prepare()?),
            tag::COMMIT_PREPARED => LogicalMessage::CommitPrepared(CommitPrepared {
                flags: self.r.u8("commit prepared flags")?,
                commit_lsn: self.r.lsn("commit prepared lsn")?,
                end_lsn: self.r.lsn("commit prepared end lsn")?,
                commit_time: self.r.i64("commit prepared time")?,
                xid: self.r.u32("commit prepared xid")?,
                gid: self.r.cstr("commit prepared gid")?,
            }),
            tag::ROLLBACK_PREPARED => LogicalMessage::RollbackPrepared(RollbackPrepared {
                flags: self.r.u8("rollback prepared flags")?,
                prepare_end_lsn: self.r.lsn("rollback prepared prepare end lsn")?,
                rollback_end_lsn: self.r.lsn("rollback prepared end lsn")?,
                prepare_time: self.r.i64("rollback prepared prepare time")?,
                rollback_time: self.r.i64("rollback prepared time")?,
                xid: self.r.u32("rollback prepared xid")?,
                gid: self.r.cstr("rollback prepared gid")?,
            }),
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "pgoutput message",
                    tag,
                })
            }
        })
    }

    fn xid(&mut self, what: &'static str) -> Result<Option<u32>, DecodeError> {
        if self.in_stream {
            self.r.u32(what).map(Some)
        } else {
            Ok(None)
        }
    }

    fn namespace(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let ns = self.r.cstr(what)?;
        Ok(if ns.is_empty() {
            PG_CATALOG.to_owned()
        } else {
            ns
        })
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let xid = self.xid("relation xid")?;
        let id = self.r.u32("relation oid")?;
        let namespace = self.namespace("relation namespace")?;
        let name = self.r.cstr("relation name")?;
        let replica_identity = ReplicaIdentity::from_wire(self.r.u8("relation replica identity")?)?;
        let ncols = self.r.i16("relation column count")?;
        let ncols = usize::try_from(ncols).map_err(|_| DecodeError::InvalidLength {
            what: "relation column count",
            len: i64::from(ncols),
        })?;
        // Smallest column: flags + empty name's NUL + type oid + typmod.
        const MIN_COLUMN: usize = 1 + 1 + 4 + 4;
        if ncols.saturating_mul(MIN_COLUMN) > self.r.remaining() {
            return Err(DecodeError::Truncated {
                what: "relation columns",
            });
        }
        let mut columns = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            let flags = self.r.u8("relation column flags")?;
            columns.push(RelationColumn {
                is_key: flags & COLUMN_FLAG_KEY != 0,
                name: self.r.cstr("relation column name")?,
                type_oid: self.r.u32("relation column type oid")?,
                type_modifier: self.r.i32("relation column type modifier")?,
            });
        }
        Ok(Relation {
            xid,
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    fn truncate(&mut self) -> Result<Truncate, DecodeError> {
        let xid = self.xid("truncate xid")?;
        let nrels = self.r.i32("truncate relation count")?;
        let options = self.r.u8("truncate options")?;
        let nrels = usize::try_from(nrels).map_err(|_| DecodeError::InvalidLength {
            what: "truncate relation count",
            len: i64::from(nrels),
        })?;
        if nrels.saturating_mul(4) > self.r.remaining() {
            return Err(DecodeError::Truncated {
                what: "truncate relation ids",
            });
        }
        let mut relation_ids = Vec::with_capacity(nrels);
        for _ in 0..nrels {
            relation_ids.push(self.r.u32("truncate relation id")?);
        }
        Ok(Truncate {
            xid,
            cascade: options & TRUNCATE_CASCADE != 0,
            restart_identity: options & TRUNCATE_RESTART_IDENTITY != 0,
            relation_ids,
        })
    }

    fn prepare(&mut self) -> Result<Prepare, DecodeError> {
        Ok(Prepare {
            flags: self.r.u8("prepare flags")?,
            prepare_lsn: self.r.lsn("prepare lsn")?,
            end_lsn: self.r.lsn("prepare end lsn")?,
            prepare_time: self.r.i64("prepare time")?,
            xid: self.r.u32("prepare xid")?,
            gid: self.r.cstr("prepare gid")?,
        })
    }

    fn tuple(&mut self) -> Result<TupleData, DecodeError> {
        let ncols = self.r.i16("tuple column count")?;
        let ncols = usize::try_from(ncols).map_err(|_| DecodeError::InvalidLength {
            what: "tuple column count",
            len: i64::from(ncols),
        })?;
        // Every cell is at least its kind byte.
        if ncols > self.r.remaining() {
            return Err(DecodeError::Truncated { what: "tuple data" });
        }
        let mut cells = Vec::with_capacity(ncols);
        for _ in 0..ncols {
            let cell = match self.r.u8("tuple cell kind")? {
                tag::CELL_NULL => Cell::Null,
                tag::CELL_UNCHANGED_TOAST => Cell::UnchangedToast,
                tag::CELL_TEXT => {
                    let len = self.r.length_i32("text cell length")?;
                    Cell::Text(self.src.slice(self.r.span(len, "text cell")?))
                }
                tag::CELL_BINARY => {
                    let len = self.r.length_i32("binary cell length")?;
                    Cell::Binary(self.src.slice(self.r.span(len, "binary cell")?))
                }
                tag => {
                    return Err(DecodeError::UnknownTag {
                        context: "tuple cell",
                        tag,
                    })
                }
            };
            cells.push(cell);
        }
        Ok(TupleData(cells))
    }
}
