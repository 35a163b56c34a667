//! The in-memory history of recent changes that change feeds replay from.
//!
//! ```text
//!  pump: every decoded change ─▶ History::record (before the hub routes it)
//!        entries: (start, …, last]   oldest dropped past --history-bytes (start moves up)
//!  feed resume (Last-Event-ID / offset = P, live floor F):
//!        P < start ─▶ ResyncRequired (409)      else the entries in (P, F] ─▶ filter, RLS
//! ```
//!
//! Invariants:
//! - Every change committed after `start` and routed so far is held: the pump records a
//!   change before routing it (and thereby before raising the hub's floor), so a feed whose
//!   live floor is `F` finds every change at or below `F` here.
//! - Positions are strictly increasing: a change streamed again after a reconnection (at or
//!   below `last`) is not recorded twice.
//! - Memory is bounded by the configured bytes (an estimate of each change's size); 0 keeps
//!   nothing, and then only a position at or after the newest change can be resumed.
//! - After the replication slot was created anew, changes may have been lost: the history
//!   empties and nothing before the next change can be resumed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use walcast_core::change::{Change, ChangeKind, Value};
use walcast_core::Position;

/// Bytes counted for a change besides its values (struct, Arc, queue slot).
const ENTRY_OVERHEAD: usize = 160;

/// A resume position older than what the history holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("ResyncRequired: position {asked} is older than the changes walcast still holds (from {start}); refetch your data and start again without Last-Event-ID")]
pub struct TooOld {
    pub asked: Position,
    pub start: Position,
}

/// Recent changes in commit order.
pub struct History {
    inner: Mutex<Inner>,
}

struct Inner {
    entries: VecDeque<(Arc<Change>, usize)>,
    bytes: usize,
    capacity: usize,
    /// Every change after this position is held (up to `last`); `None` until known.
    start: Option<Position>,
    last: Position,
}

impl History {
    pub fn new(capacity: usize) -> History {
        History {
            inner: Mutex::new(Inner {
                entries: VecDeque::new(),
                bytes: 0,
                capacity,
                start: None,
                last: Position::ZERO,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes the history may hold (`--history-bytes`).
    pub fn set_capacity(&self, bytes: usize) {
        let mut inner = self.lock();
        inner.capacity = bytes;
        inner.trim();
    }

    /// Every change committed after `p` will be recorded (the stream starts at or before
    /// it): resuming from `p` on is possible.
    pub fn begin(&self, p: Position) {
        let mut inner = self.lock();
        if inner.start.is_none() && inner.entries.is_empty() {
            inner.start = Some(p);
            inner.last = inner.last.max(p);
        }
    }

    /// Changes may have been lost (the slot was created anew): forget everything.
    pub fn lost(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.bytes = 0;
        inner.start = None;
    }

    /// Record a change the pump decoded (before routing it).
    pub fn record(&self, change: &Arc<Change>) {
        if change.kind == ChangeKind::Truncate {
            return;
        }
        let at = change.position();
        let mut inner = self.lock();
        if at <= inner.last && inner.start.is_some() {
            return;
        }
        inner.last = at;
        if inner.start.is_none() {
            // The first change after a loss: nothing before it is known to be complete.
            inner.start = Some(at);
        }
        let size = change_bytes(change);
        inner.bytes += size;
        inner.entries.push_back((change.clone(), size));
        inner.trim();
    }

    /// The changes after `after` up to `through`, or [`TooOld`] when some after `after` are
    /// no longer held.
    pub fn since(&self, after: Position, through: Position) -> Result<Vec<Arc<Change>>, TooOld> {
        let inner = self.lock();
        match inner.start {
            Some(start) if after >= start => {}
            start => {
                return Err(TooOld {
                    asked: after,
                    start: start.unwrap_or(inner.last),
                })
            }
        }
        let from = inner
            .entries
            .partition_point(|(c, _)| c.position() <= after);
        Ok(inner
            .entries
            .range(from..)
            .take_while(|(c, _)| c.position() <= through)
            .map(|(c, _)| c.clone())
            .collect())
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The oldest resumable position, when known.
    pub fn start(&self) -> Option<Position> {
        self.lock().start
    }
}

impl Inner {
    fn trim(&mut self) {
        while self.bytes > self.capacity {
            let Some((c, size)) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= size;
            let at = c.position();
            self.start = Some(self.start.map_or(at, |s| s.max(at)));
        }
    }
}

/// Approximate memory of a held change.
fn change_bytes(change: &Change) -> usize {
    let values = |row: &Option<Vec<Value>>| -> usize {
        row.iter()
            .flatten()
            .map(|v| {
                24 + match v {
                    Value::Present { text, json } => text.len() + json.len(),
                    _ => 0,
                }
            })
            .sum()
    };
    ENTRY_OVERHEAD + values(&change.record) + values(&change.old_record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_core::change::{Column, Table};
    use walcast_pgoutput::{Lsn, ReplicaIdentity};

    fn change(lsn: u64, index: u32, text: &str) -> Arc<Change> {
        let table = Arc::new(Table {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![Column {
                name: "v".into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: true,
            }]
            .into(),
        });
        Arc::new(Change {
            table,
            kind: ChangeKind::Insert,
            commit_lsn: Lsn(lsn),
            index_in_txn: index,
            xid: 1,
            commit_time_us: 0,
            record: Some(vec![Value::Present {
                text: text.into(),
                json: format!("\"{text}\"").into(),
            }]),
            old_record: None,
        })
    }

    #[test]
    fn replays_after_a_position_and_refuses_older_ones() {
        let h = History::new(1 << 20);
        h.begin(Position::new(Lsn(5), 0));
        for (lsn, i) in [(10, 0), (10, 1), (20, 0)] {
            h.record(&change(lsn, i, "x"));
        }
        // Streamed again after a reconnection: not recorded twice.
        h.record(&change(10, 1, "x"));
        let got = h
            .since(Position::new(Lsn(10), 0), Position::through(Lsn(20)))
            .unwrap();
        let at: Vec<Position> = got.iter().map(|c| c.position()).collect();
        assert_eq!(at, [Position::new(Lsn(10), 1), Position::new(Lsn(20), 0)]);
        let upto = h
            .since(Position::new(Lsn(5), 0), Position::through(Lsn(10)))
            .unwrap();
        assert_eq!(upto.len(), 2, "bounded above by `through`");
        assert!(h
            .since(Position::new(Lsn(4), 0), Position::through(Lsn(99)))
            .is_err());
    }

    #[test]
    fn the_bound_moves_the_start_and_a_loss_empties_it() {
        let h = History::new(3 * (ENTRY_OVERHEAD + 24 + 4));
        h.begin(Position::ZERO);
        for lsn in 1..=5 {
            h.record(&change(lsn, 0, "x"));
        }
        assert!(h.bytes() <= 3 * (ENTRY_OVERHEAD + 24 + 4));
        assert_eq!(h.start(), Some(Position::new(Lsn(2), 0)));
        let err = h.since(Position::new(Lsn(1), 0), Position::through(Lsn(9)));
        assert!(err.is_err());
        assert_eq!(
            h.since(Position::new(Lsn(2), 0), Position::through(Lsn(9)))
                .unwrap()
                .len(),
            3
        );
        h.lost();
        assert!(h
            .since(Position::new(Lsn(5), 0), Position::through(Lsn(9)))
            .is_err());
        h.record(&change(7, 0, "y"));
        assert_eq!(h.start(), Some(Position::new(Lsn(7), 0)));
        assert!(h
            .since(Position::new(Lsn(6), 0), Position::through(Lsn(9)))
            .is_err());
        assert_eq!(
            h.since(Position::new(Lsn(7), 0), Position::through(Lsn(9)))
                .unwrap()
                .len(),
            0
        );
    }
}
