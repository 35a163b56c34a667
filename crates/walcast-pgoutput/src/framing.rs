//! The CopyData payloads of a `START_REPLICATION … LOGICAL` stream.
//!
//! ```text
//! server → client  CopyData 'd' ─┬─ 'w' XLogData    Int64 wal_start, Int64 wal_end,
//!                                │                  Int64 send_time, Byte[n] one pgoutput message
//!                                └─ 'k' Keepalive   Int64 wal_end, Int64 send_time, Byte1 reply
//! client → server  CopyData 'd' ─── 'r' Standby     Int64 write, Int64 flush, Int64 apply,
//!                                      status       Int64 client_time, Byte1 reply
//! ```
//!
//! The tags are only meaningful at this level: `'r'` here is the standby status update, while
//! inside an XLogData payload the same byte is a pgoutput Rollback Prepared. That is why
//! [`ReplicationFrame::parse`] rejects `'r'` (it never comes from the server) and
//! [`StandbyStatusUpdate::parse`] exists separately, for test servers that read our replies.
//!
//! Invariants: XLogData's `data` is a zero-copy slice of the frame; keepalive and status
//! update bodies must be exactly their fixed size (no trailing bytes).

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::lsn::Lsn;
use crate::reader::Reader;

/// Tag bytes of the replication sub-protocol (inside CopyData).
pub(crate) mod tag {
    pub const XLOG_DATA: u8 = b'w';
    pub const KEEPALIVE: u8 = b'k';
    pub const STANDBY_STATUS: u8 = b'r';
}

/// One server → client CopyData payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationFrame {
    XLogData(XLogData),
    Keepalive(PrimaryKeepalive),
}

/// WAL data: exactly one pgoutput message plus the walsender's positions.
///
/// For logical streams `wal_start` is the decoding write location (Begin's first LSN, the
/// change LSN, Commit's end LSN); it is not an acknowledgement position. Ack from
/// `Commit::end_lsn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XLogData {
    pub wal_start: Lsn,
    pub wal_end: Lsn,
    /// µs since 2000-01-01 UTC.
    pub send_time: i64,
    /// The pgoutput message, a slice of the frame (no copy).
    pub data: Bytes,
}

/// A keepalive; if `reply_requested`, answer with a [`StandbyStatusUpdate`] at once or the
/// walsender disconnects after `wal_sender_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrimaryKeepalive {
    pub wal_end: Lsn,
    /// µs since 2000-01-01 UTC.
    pub send_time: i64,
    pub reply_requested: bool,
}

const XLOG_HEADER_LEN: usize = 1 + 8 + 8 + 8;

impl ReplicationFrame {
    /// Parses one CopyData payload received from the walsender.
    pub fn parse(buf: Bytes) -> Result<ReplicationFrame, DecodeError> {
        let mut r = Reader::new(&buf);
        match r.u8("replication frame tag")? {
            tag::XLOG_DATA => {
                let wal_start = r.lsn("xlogdata wal start")?;
                let wal_end = r.lsn("xlogdata wal end")?;
                let send_time = r.i64("xlogdata send time")?;
                let data = buf.slice(r.rest());
                Ok(ReplicationFrame::XLogData(XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data,
                }))
            }
            tag::KEEPALIVE => {
                let wal_end = r.lsn("keepalive wal end")?;
                let send_time = r.i64("keepalive send time")?;
                // Postgres treats any non-zero byte as "reply requested".
                let reply_requested = r.u8("keepalive reply flag")? != 0;
                r.finish("keepalive")?;
                Ok(ReplicationFrame::Keepalive(PrimaryKeepalive {
                    wal_end,
                    send_time,
                    reply_requested,
                }))
            }
            tag => Err(DecodeError::UnknownTag {
                context: "replication frame",
                tag,
            }),
        }
    }

    /// Writes the frame back in wire form (the inverse of [`ReplicationFrame::parse`]).
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReplicationFrame::XLogData(x) => {
                out.reserve(XLOG_HEADER_LEN + x.data.len());
                out.put_u8(tag::XLOG_DATA);
                out.put_u64(x.wal_start.0);
                out.put_u64(x.wal_end.0);
                out.put_i64(x.send_time);
                out.put_slice(&x.data);
            }
            ReplicationFrame::Keepalive(k) => {
                out.put_u8(tag::KEEPALIVE);
                out.put_u64(k.wal_end.0);
                out.put_i64(k.send_time);
                out.put_u8(u8::from(k.reply_requested));
            }
        }
    }
}

/// Our feedback to the walsender. For logical slots only `flush` moves
/// `confirmed_flush_lsn`; `write` and `apply` only show up in `pg_stat_replication`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StandbyStatusUpdate {
    pub write: Lsn,
    pub flush: Lsn,
    pub apply: Lsn,
    /// µs since 2000-01-01 UTC.
    pub client_time: i64,
    /// Asks the server for an immediate keepalive (a ping).
    pub reply_requested: bool,
}

impl StandbyStatusUpdate {
    /// Size of the encoded body, tag included.
    pub const ENCODED_LEN: usize = 1 + 8 * 4 + 1;

    /// Appends the `'r'` body, ready to be wrapped in a frontend CopyData.
    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(Self::ENCODED_LEN);
        out.put_u8(tag::STANDBY_STATUS);
        out.put_u64(self.write.0);
        out.put_u64(self.flush.0);
        out.put_u64(self.apply.0);
        out.put_i64(self.client_time);
        out.put_u8(u8::from(self.reply_requested));
    }

    /// Parses an `'r'` body (what a walsender reads; used by test servers).
    pub fn parse(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        match r.u8("standby status tag")? {
            tag::STANDBY_STATUS => {}
            tag => {
                return Err(DecodeError::UnknownTag {
                    context: "standby status update",
                    tag,
                })
            }
        }
        let update = StandbyStatusUpdate {
            write: r.lsn("standby status write lsn")?,
            flush: r.lsn("standby status flush lsn")?,
            apply: r.lsn("standby status apply lsn")?,
            client_time: r.i64("standby status client time")?,
            reply_requested: r.u8("standby status reply flag")? != 0,
        };
        r.finish("standby status update")?;
        Ok(update)
    }
}
