//! A change feed's outbox: what the hub (or a broadcast topic) pushed, waiting for the feed's
//! HTTP response to write it.
//!
//! Invariants:
//! - Never blocks the pump: a push only appends under a short lock; past the byte bound the
//!   outbox overflows, drops what it held and refuses the rest, and the feed ends (the
//!   client resumes from its last event id out of the history instead).
//! - Positioned frames keep their position and committing transaction id, so a feed can
//!   align them with a snapshot; frames at or below `skip_through` (what the client already
//!   has, or what a replay from history covers) are discarded.

use std::collections::VecDeque;
use std::sync::Mutex;

use bytes::Bytes;
use walcast_core::hub::{OutFrame, Outbox};
use walcast_core::Position;

/// One queued frame.
#[derive(Debug, Clone)]
pub enum Item {
    /// A change's `data` object, at its position, committed by `xid`.
    Change { at: Position, xid: u32, data: Bytes },
    /// Anything else: a `system` payload (change feeds) or a Phoenix broadcast frame
    /// (broadcast feeds).
    Other(Bytes),
}

#[derive(Debug, Default)]
struct Buf {
    items: VecDeque<Item>,
    bytes: usize,
    overflowed: bool,
    closed: bool,
    skip_through: Position,
}

/// The outbox of one feed.
#[derive(Debug)]
pub struct FeedOutbox {
    buf: Mutex<Buf>,
    notify: tokio::sync::Notify,
    max_bytes: usize,
}

impl FeedOutbox {
    pub fn new(max_bytes: usize, skip_through: Position) -> FeedOutbox {
        FeedOutbox {
            buf: Mutex::new(Buf {
                skip_through,
                ..Buf::default()
            }),
            notify: tokio::sync::Notify::new(),
            max_bytes: max_bytes.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self, item: Item, len: usize) -> bool {
        let mut buf = self.lock();
        if buf.closed || buf.overflowed {
            return false;
        }
        if buf.bytes + len > self.max_bytes {
            buf.overflowed = true;
            buf.items.clear();
            buf.bytes = 0;
            drop(buf);
            self.notify.notify_one();
            return false;
        }
        buf.bytes += len;
        buf.items.push_back(item);
        drop(buf);
        self.notify.notify_one();
        true
    }

    /// Discard positioned frames at or below `p` from now on (and those queued).
    pub fn skip_through(&self, p: Position) {
        let mut buf = self.lock();
        buf.skip_through = buf.skip_through.max(p);
        let keep = buf.skip_through;
        let mut freed = 0;
        buf.items.retain(|i| match i {
            Item::Change { at, data, .. } if *at <= keep => {
                freed += data.len();
                false
            }
            _ => true,
        });
        buf.bytes -= freed;
    }

    /// Everything queued, oldest first; `Err(())` once the outbox overflowed.
    pub fn take(&self) -> Result<Vec<Item>, Overflowed> {
        let mut buf = self.lock();
        if buf.overflowed {
            return Err(Overflowed);
        }
        buf.bytes = 0;
        Ok(buf.items.drain(..).collect())
    }

    /// Remove the queued changes `drop` picks (they are covered by a snapshot).
    pub fn remove_changes(&self, drop: impl Fn(Position, u32) -> bool) {
        let mut buf = self.lock();
        let mut freed = 0;
        buf.items.retain(|i| match i {
            Item::Change { at, xid, data } if drop(*at, *xid) => {
                freed += data.len();
                false
            }
            _ => true,
        });
        buf.bytes -= freed;
    }

    /// (position, xid) of every queued change, oldest first.
    pub fn queued_changes(&self) -> Result<Vec<(Position, u32)>, Overflowed> {
        let buf = self.lock();
        if buf.overflowed {
            return Err(Overflowed);
        }
        Ok(buf
            .items
            .iter()
            .filter_map(|i| match i {
                Item::Change { at, xid, .. } => Some((*at, *xid)),
                Item::Other(_) => None,
            })
            .collect())
    }

    /// Wait until something was queued (or the outbox overflowed) since the last take.
    pub async fn ready(&self) {
        self.notify.notified().await
    }

    /// The feed is gone: refuse everything from now on.
    pub fn close(&self) {
        let mut buf = self.lock();
        buf.closed = true;
        buf.items.clear();
        buf.bytes = 0;
    }
}

/// The outbox went over its bound: the feed must end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflowed;

fn bytes_of(frame: OutFrame) -> Bytes {
    match frame {
        OutFrame::Text(b) | OutFrame::Binary(b) => b,
    }
}

impl Outbox for FeedOutbox {
    fn push(&self, frame: OutFrame) -> bool {
        let b = bytes_of(frame);
        let len = b.len();
        self.queue(Item::Other(b), len)
    }

    fn push_at(&self, at: Position, xid: u32, frame: OutFrame) -> bool {
        if at <= self.lock().skip_through {
            return true;
        }
        let data = bytes_of(frame);
        let len = data.len();
        self.queue(Item::Change { at, xid, data }, len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_pgoutput::Lsn;

    fn frame(s: &str) -> OutFrame {
        OutFrame::text(s.to_string())
    }

    #[test]
    fn skips_covered_positions_and_overflows_past_its_bound() {
        let o = FeedOutbox::new(10, Position::new(Lsn(5), 0));
        assert!(o.push_at(Position::new(Lsn(5), 0), 1, frame("old")));
        assert!(o.push_at(Position::new(Lsn(6), 0), 1, frame("abc")));
        assert!(o.push_at(Position::new(Lsn(7), 0), 2, frame("def")));
        o.skip_through(Position::new(Lsn(6), 0));
        assert_eq!(o.queued_changes().unwrap(), [(Position::new(Lsn(7), 0), 2)]);
        o.remove_changes(|_, xid| xid == 2);
        assert!(o.take().unwrap().is_empty());
        assert!(o.push_at(Position::new(Lsn(8), 0), 3, frame("0123456789")));
        assert!(!o.push_at(Position::new(Lsn(9), 0), 3, frame("x")));
        assert_eq!(o.take().unwrap_err(), Overflowed);
    }
}
