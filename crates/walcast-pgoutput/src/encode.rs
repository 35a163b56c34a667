//! Writes messages and frames back to wire form: the exact inverse of decoding.
//!
//! Its job is letting tests (here and in other crates) synthesize replication streams, so it
//! follows the same layouts as the decoder, tag constants included. The rules that make
//! `decode(encode(m)) == m` hold:
//!
//! * an `xid: Some(_)` is written as the in-stream prefix, so such a message must be decoded
//!   by a [`Decoder`](crate::Decoder) that is inside a Stream Start/Stop, and `None` by one
//!   that is not (exactly what Postgres does);
//! * a namespace of `"pg_catalog"` is written as the empty string, like the server does (so
//!   an empty namespace cannot round-trip: it decodes to `"pg_catalog"`);
//! * a `StreamAbort` writes the v4 fields only if both are `Some`.
//!
//! Values the wire cannot carry (a NUL inside a string, more than `i16::MAX` columns, a cell
//! longer than `i32::MAX`) are an [`EncodeError`]; on error `out` is left as it was.

use bytes::{BufMut, Bytes, BytesMut};

use crate::framing::{ReplicationFrame, XLogData};
use crate::lsn::Lsn;
use crate::message::{
    tag, Cell, LogicalMessage, OldTuple, Prepare, TupleData, COLUMN_FLAG_KEY,
    MESSAGE_TRANSACTIONAL, PG_CATALOG, TRUNCATE_CASCADE, TRUNCATE_RESTART_IDENTITY,
};

/// A value that has no wire representation.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    #[error("{what} contains a NUL byte")]
    InteriorNul { what: &'static str },
    #[error("{what} is too long for its length field ({len})")]
    TooLong { what: &'static str, len: usize },
}

/// Appends one pgoutput message (an XLogData payload).
pub fn message(msg: &LogicalMessage, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    let result = write_message(msg, out);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// One pgoutput message as its own buffer.
pub fn message_to_bytes(msg: &LogicalMessage) -> Result<Bytes, EncodeError> {
    let mut out = BytesMut::new();
    message(msg, &mut out)?;
    Ok(out.freeze())
}

/// Appends one replication frame (a CopyData payload).
pub fn frame(f: &ReplicationFrame, out: &mut BytesMut) {
    f.encode(out);
}

/// One replication frame as its own buffer.
pub fn frame_to_bytes(f: &ReplicationFrame) -> Bytes {
    let mut out = BytesMut::new();
    f.encode(&mut out);
    out.freeze()
}

/// An XLogData frame carrying `msg`: the usual unit a test feeds to a replication reader.
pub fn xlog_data(
    wal_start: Lsn,
    wal_end: Lsn,
    send_time: i64,
    msg: &LogicalMessage,
) -> Result<Bytes, EncodeError> {
    let data = message_to_bytes(msg)?;
    Ok(frame_to_bytes(&ReplicationFrame::XLogData(XLogData {
        wal_start,
        wal_end,
        send_time,
        data,
    })))
}

fn write_message(msg: &LogicalMessage, out: &mut BytesMut) -> Result<(), EncodeError> {
    match msg {
        LogicalMessage::Begin(m) => {
            out.put_u8(tag::BEGIN);
            out.put_u64(m.final_lsn.0);
            out.put_i64(m.commit_time);
            out.put_u32(m.xid);
        }
        LogicalMessage::Commit(m) => {
            out.put_u8(tag::COMMIT);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
        }
        LogicalMessage::Origin(m) => {
            out.put_u8(tag::ORIGIN);
            out.put_u64(m.commit_lsn.0);
            cstr(out, &m.name, "origin name")?;
        }
        LogicalMessage::Relation(m) => {
            out.put_u8(tag::RELATION);
            xid(out, m.xid);
            out.put_u32(m.id);
            namespace(out, &m.namespace, "relation namespace")?;
            cstr(out, &m.name, "relation name")?;
            out.put_u8(m.replica_identity.to_wire());
            out.put_i16(count_i16(m.columns.len(), "relation columns")?);
            for c in &m.columns {
                out.put_u8(if c.is_key { COLUMN_FLAG_KEY } else { 0 });
                cstr(out, &c.name, "relation column name")?;
                out.put_u32(c.type_oid);
                out.put_i32(c.type_modifier);
            }
        }
        LogicalMessage::Type(m) => {
            out.put_u8(tag::TYPE);
            xid(out, m.xid);
            out.put_u32(m.id);
            namespace(out, &m.namespace, "type namespace")?;
            cstr(out, &m.name, "type name")?;
        }
        LogicalMessage::Insert(m) => {
            out.put_u8(tag::INSERT);
            xid(out, m.xid);
            out.put_u32(m.relation_id);
            out.put_u8(tag::TUPLE_NEW);
            tuple(out, &m.new)?;
        }
        LogicalMessage::Update(m) => {
            out.put_u8(tag::UPDATE);
            xid(out, m.xid);
            out.put_u32(m.relation_id);
            if let Some(old) = &m.old {
                old_tuple(out, old)?;
            }
            out.put_u8(tag::TUPLE_NEW);
            tuple(out, &m.new)?;
        }
        LogicalMessage::Delete(m) => {
            out.put_u8(tag::DELETE);
            xid(out, m.xid);
            out.put_u32(m.relation_id);
            old_tuple(out, &m.old)?;
        }
        LogicalMessage::Truncate(m) => {
            out.put_u8(tag::TRUNCATE);
            xid(out, m.xid);
            let n = i32::try_from(m.relation_ids.len()).map_err(|_| EncodeError::TooLong {
                what: "truncate relation ids",
                len: m.relation_ids.len(),
            })?;
            out.put_i32(n);
            let mut options = 0;
            if m.cascade {
                options |= TRUNCATE_CASCADE;
            }
            if m.restart_identity {
                options |= TRUNCATE_RESTART_IDENTITY;
            }
            out.put_u8(options);
            for id in &m.relation_ids {
                out.put_u32(*id);
            }
        }
        LogicalMessage::Message(m) => {
            out.put_u8(tag::MESSAGE);
            xid(out, m.xid);
            out.put_u8(if m.transactional {
                MESSAGE_TRANSACTIONAL
            } else {
                0
            });
            out.put_u64(m.lsn.0);
            cstr(out, &m.prefix, "message prefix")?;
            out.put_i32(len_i32(m.content.len(), "message content")?);
            out.put_slice(&m.content);
        }
        LogicalMessage::StreamStart(m) => {
            out.put_u8(tag::STREAM_START);
            out.put_u32(m.xid);
            out.put_u8(u8::from(m.first_segment));
        }
        LogicalMessage::StreamStop => out.put_u8(tag::STREAM_STOP),
        LogicalMessage::StreamCommit(m) => {
            out.put_u8(tag::STREAM_COMMIT);
            out.put_u32(m.xid);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
        }
        LogicalMessage::StreamAbort(m) => {
            out.put_u8(tag::STREAM_ABORT);
            out.put_u32(m.xid);
            out.put_u32(m.subxid);
            if let (Some(lsn), Some(time)) = (m.abort_lsn, m.abort_time) {
                out.put_u64(lsn.0);
                out.put_i64(time);
            }
        }
        LogicalMessage::BeginPrepare(m) => {
            out.put_u8(tag::BEGIN_PREPARE);
            out.put_u64(m.prepare_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.prepare_time);
            out.put_u32(m.xid);
            cstr(out, &m.gid, "begin prepare gid")?;
        }
        LogicalMessage::Prepare(m) => prepare(out, tag::PREPARE, m)?,
        LogicalMessage::StreamPrepare(m) => prepare(out, tag::STREAM_PREPARE, m)?,
        LogicalMessage::CommitPrepared(m) => {
            out.put_u8(tag::COMMIT_PREPARED);
            out.put_u8(m.flags);
            out.put_u64(m.commit_lsn.0);
            out.put_u64(m.end_lsn.0);
            out.put_i64(m.commit_time);
            out.put_u32(m.xid);
            cstr(out, &m.gid, "commit prepared gid")?;
        }
        LogicalMessage::RollbackPrepared(m) => {
            out.put_u8(tag::ROLLBACK_PREPARED);
            out.put_u8(m.flags);
            out.put_u64(m.prepare_end_lsn.0);
            out.put_u64(m.rollback_end_lsn.0);
            out.put_i64(m.prepare_time);
            out.put_i64(m.rollback_time);
            out.put_u32(m.xid);
            cstr(out, &m.gid, "rollback prepared gid")?;
        }
    }
    Ok(())
}

fn prepare(out: &mut BytesMut, t: u8, m: &Prepare) -> Result<(), EncodeError> {
    out.put_u8(t);
    out.put_u8(m.flags);
    out.put_u64(m.prepare_lsn.0);
    out.put_u64(m.end_lsn.0);
    out.put_i64(m.prepare_time);
    out.put_u32(m.xid);
    cstr(out, &m.gid, "prepare gid")
}

fn xid(out: &mut BytesMut, xid: Option<u32>) {
    if let Some(xid) = xid {
        out.put_u32(xid);
    }
}

fn cstr(out: &mut BytesMut, s: &str, what: &'static str) -> Result<(), EncodeError> {
    if s.as_bytes().contains(&0) {
        return Err(EncodeError::InteriorNul { what });
    }
    out.put_slice(s.as_bytes());
    out.put_u8(0);
    Ok(())
}

fn namespace(out: &mut BytesMut, ns: &str, what: &'static str) -> Result<(), EncodeError> {
    cstr(out, if ns == PG_CATALOG { "" } else { ns }, what)
}

fn count_i16(n: usize, what: &'static str) -> Result<i16, EncodeError> {
    i16::try_from(n).map_err(|_| EncodeError::TooLong { what, len: n })
}

fn len_i32(n: usize, what: &'static str) -> Result<i32, EncodeError> {
    i32::try_from(n).map_err(|_| EncodeError::TooLong { what, len: n })
}

/// Appends a TupleData (column count and cells), without a tuple marker.
pub fn tuple(out: &mut BytesMut, t: &TupleData) -> Result<(), EncodeError> {
    out.put_i16(count_i16(t.0.len(), "tuple columns")?);
    for cell in &t.0 {
        match cell {
            Cell::Null => out.put_u8(tag::CELL_NULL),
            Cell::UnchangedToast => out.put_u8(tag::CELL_UNCHANGED_TOAST),
            Cell::Text(b) => {
                out.put_u8(tag::CELL_TEXT);
                out.put_i32(len_i32(b.len(), "text cell")?);
                out.put_slice(b);
            }
            Cell::Binary(b) => {
                out.put_u8(tag::CELL_BINARY);
                out.put_i32(len_i32(b.len(), "binary cell")?);
                out.put_slice(b);
            }
        }
    }
    Ok(())
}

fn old_tuple(out: &mut BytesMut, old: &OldTuple) -> Result<(), EncodeError> {
    match old {
        OldTuple::Key(t) => {
            out.put_u8(tag::TUPLE_KEY);
            tuple(out, t)
        }
        OldTuple::Full(t) => {
            out.put_u8(tag::TUPLE_OLD);
            tuple(out, t)
        }
    }
}
