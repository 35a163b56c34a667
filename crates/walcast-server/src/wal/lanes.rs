//! Per-identity delivery lanes and the commit-order bookkeeping that decides what may be
//! confirmed to Postgres. Pure data: no I/O, no clock reads (instants are passed in).
//!
//! ```text
//!  pump (commit order) ── change routed to identities ──┬─ decided now (no RLS check) and
//!                                                       │  the identity's lane is empty ─▶ delivered
//!                                                       └─ otherwise ─▶ Lane[identity].items (FIFO)
//!  Lane: items ─▶ pending ones go into a check batch ─▶ verdicts ─▶ deliver the decided prefix
//!  Txns: txn ─ outstanding lane items ─▶ confirmable = end of the newest txn with every
//!        earlier txn finished
//! ```
//!
//! Invariants:
//! - Per identity (so per subscriber) deliveries keep commit order: a change is delivered
//!   directly only when its identity's lane is empty; otherwise it queues behind the lane's
//!   items, decided or not, and a lane delivers only its decided prefix.
//! - A lane waits only for its own checks: a slow or failing policy holds back the identities
//!   it decides for, nobody else.
//! - The position confirmed to Postgres never passes a transaction with an undelivered item.
//! - After a reconnection the generation changes: verdicts of checks started before it are
//!   ignored (the unconfirmed transactions are streamed again and routed afresh).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use walcast_core::change::Change;
use walcast_core::hub::{Access, Identity, Routed};
use walcast_pgoutput::Lsn;

/// A lane's key: its interned identity's address (the hub interns identities, so equal role
/// and claims share one `Arc`).
pub type LaneKey = usize;

pub fn lane_key(identity: &Arc<Identity>) -> LaneKey {
    Arc::as_ptr(identity) as usize
}

/// What is known about one item's delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Needs its table's policy and (for RLS) a check.
    Pending,
    /// In a check batch now.
    Checking,
    Known(Access),
}

/// One change for one identity, waiting in its lane.
pub struct Item {
    pub seq: u64,
    pub txn: u64,
    pub change: Arc<Change>,
    /// This identity's routes only (identity index 0).
    pub routed: Routed,
    pub verdict: Verdict,
}

/// One identity's queue of changes.
pub struct Lane {
    pub identity: Arc<Identity>,
    pub items: VecDeque<Item>,
    /// A check batch with some of its items is running.
    pub checking: bool,
    /// After a check that could not run: not again before this.
    pub retry_at: Option<Instant>,
    backoff: Duration,
    /// Its checks have been fast: it may share a pipelined transaction with other lanes.
    pub proven_fast: bool,
    /// After a slow check: runs alone until then.
    pub solo_until: Option<Instant>,
}

/// The first retry delay after an unavailable check, and the longest.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A check slower than this sends its lane to run alone for [`SOLO_FOR`].
pub const SLOW_CHECK: Duration = Duration::from_millis(200);
const SOLO_FOR: Duration = Duration::from_secs(60);

impl Lane {
    fn new(identity: Arc<Identity>) -> Lane {
        Lane {
            identity,
            items: VecDeque::new(),
            checking: false,
            retry_at: None,
            backoff: RETRY_MIN,
            proven_fast: false,
            solo_until: None,
        }
    }

    /// Has pending items and may start a check at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        !self.checking
            && self.retry_at.is_none_or(|t| t <= now)
            && self.items.iter().any(|i| i.verdict == Verdict::Pending)
    }

    /// May share a pipelined transaction with other lanes of its role at `now`.
    pub fn shares(&self, now: Instant) -> bool {
        self.proven_fast && self.solo_until.is_none_or(|t| t <= now)
    }

    /// A check took `took`: remember whether this lane is fast.
    pub fn record_speed(&mut self, took: Duration, now: Instant) {
        if took > SLOW_CHECK {
            self.proven_fast = false;
            self.solo_until = Some(now + SOLO_FOR);
        } else {
            self.proven_fast = true;
        }
    }

    /// The check could not run: retry later, backing off.
    pub fn unavailable(&mut self, now: Instant) {
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// A check ran: the next failure starts the backoff from the bottom again.
    pub fn available(&mut self) {
        self.retry_at = None;
        self.backoff = RETRY_MIN;
    }

    /// Take the decided items at the front (the ones that can be delivered, in order).
    pub fn decided_prefix(&mut self) -> Vec<Item> {
        let mut out = Vec::new();
        while matches!(self.items.front(), Some(i) if matches!(i.verdict, Verdict::Known(_))) {
            if let Some(item) = self.items.pop_front() {
                out.push(item);
            }
        }
        out
    }
}

/// Every identity with items waiting.
#[derive(Default)]
pub struct Lanes {
    lanes: HashMap<LaneKey, Lane>,
    next_seq: u64,
    generation: u64,
}

impl Lanes {
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether the identity has items waiting (a change for it must queue behind them).
    pub fn busy(&self, key: LaneKey) -> bool {
        self.lanes
            .get(&key)
            .is_some_and(|l| !l.items.is_empty() || l.checking)
    }

    /// Queue an item; its sequence number.
    pub fn push(
        &mut self,
        identity: &Arc<Identity>,
        txn: u64,
        change: Arc<Change>,
        routed: Routed,
        verdict: Verdict,
    ) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.lanes
            .entry(lane_key(identity))
            .or_insert_with(|| Lane::new(identity.clone()))
            .items
            .push_back(Item {
                seq,
                txn,
                change,
                routed,
                verdict,
            });
        seq
    }

    pub fn get_mut(&mut self, key: LaneKey) -> Option<&mut Lane> {
        self.lanes.get_mut(&key)
    }

    /// Lanes that may start a check at `now`.
    pub fn ready(&self, now: Instant) -> Vec<LaneKey> {
        let mut keys: Vec<LaneKey> = self
            .lanes
            .iter()
            .filter(|(_, l)| l.ready(now))
            .map(|(k, _)| *k)
            .collect();
        keys.sort_unstable();
        keys
    }

    /// The earliest retry of a lane waiting after an unavailable check.
    pub fn next_retry(&self) -> Option<Instant> {
        self.lanes
            .values()
            .filter(|l| !l.checking && l.items.iter().any(|i| i.verdict == Verdict::Pending))
            .filter_map(|l| l.retry_at)
            .min()
    }

    /// Drop lanes with nothing left.
    pub fn prune(&mut self) {
        self.lanes.retain(|_, l| !l.items.is_empty() || l.checking);
    }

    /// Everything is dropped and verdicts still running are void (a reconnection: the
    /// unconfirmed transactions are streamed again). Returns the items dropped.
    pub fn reset(&mut self) -> usize {
        self.generation += 1;
        let dropped = self.lanes.values().map(|l| l.items.len()).sum();
        self.lanes.clear();
        dropped
    }

    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Items waiting over every lane.
    pub fn items(&self) -> usize {
        self.lanes.values().map(|l| l.items.len()).sum()
    }
}

/// Transactions with undelivered items, in commit order.
#[derive(Default)]
pub struct Txns {
    next: u64,
    /// txn number → (items not delivered yet, commit end once its Commit was decoded).
    open: BTreeMap<u64, (usize, Option<Lsn>)>,
    /// The current transaction (between Begin and Commit).
    current: Option<u64>,
}

impl Txns {
    /// A Begin: the number of the transaction that starts.
    pub fn begin(&mut self) -> u64 {
        self.next += 1;
        self.current = Some(self.next);
        self.next
    }

    /// The current transaction's number (one is started when a change arrives without
    /// Begin, which pgoutput never does, so numbering cannot go wrong).
    pub fn current(&mut self) -> u64 {
        match self.current {
            Some(t) => t,
            None => self.begin(),
        }
    }

    /// An item of `txn` was queued in a lane.
    pub fn queued(&mut self, txn: u64) {
        self.open.entry(txn).or_insert((0, None)).0 += 1;
    }

    /// An item of `txn` was delivered (or dropped).
    pub fn finished(&mut self, txn: u64) {
        if let Some(entry) = self.open.get_mut(&txn) {
            entry.0 = entry.0.saturating_sub(1);
        }
    }

    /// The current transaction committed at `end`.
    pub fn commit(&mut self, end: Lsn) {
        if let Some(t) = self.current.take() {
            if let Some(entry) = self.open.get_mut(&t) {
                entry.1 = Some(end);
            }
        }
    }

    /// What may be confirmed now: `None` when nothing is held back (everything received was
    /// handed on), else `Some(position)` (the end of the newest finished transaction before
    /// the oldest unfinished one, `Lsn(0)` when there is none).
    pub fn confirmable(&mut self) -> Option<Lsn> {
        let mut upto = Lsn(0);
        while let Some((&t, &(left, end))) = self.open.iter().next() {
            match (left, end) {
                (0, Some(end)) => {
                    upto = end;
                    self.open.remove(&t);
                }
                _ => return Some(upto),
            }
        }
        if self.current.is_some_and(|t| self.open.contains_key(&t)) {
            return Some(upto);
        }
        if upto > Lsn(0) {
            // Everything up to here finished: confirm it all (including keepalives).
            return None;
        }
        None
    }

    /// Forget everything (a reconnection).
    pub fn reset(&mut self) {
        self.open.clear();
        self.current = None;
    }

    pub fn open(&self) -> usize {
        self.open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(role: &str) -> Arc<Identity> {
        Arc::new(Identity {
            role: role.into(),
            claims: "{}".into(),
        })
    }

    fn change() -> Arc<Change> {
        Arc::new(Change {
            table: Arc::new(walcast_core::change::Table {
                relation_id: 1,
                schema: "public".into(),
                name: "t".into(),
                replica_identity: walcast_pgoutput::ReplicaIdentity::Default,
                columns: Vec::new().into(),
            }),
            kind: walcast_core::change::ChangeKind::Insert,
            commit_lsn: Lsn(1),
            index_in_txn: 0,
            commit_time_us: 0,
            record: None,
            old_record: None,
        })
    }

    #[test]
    fn a_lane_delivers_its_decided_prefix_in_order() {
        let mut lanes = Lanes::default();
        let a = identity("a");
        let s1 = lanes.push(&a, 1, change(), Routed::default(), Verdict::Pending);
        let s2 = lanes.push(
            &a,
            1,
            change(),
            Routed::default(),
            Verdict::Known(Access::ALL),
        );
        let key = lane_key(&a);
        assert!(lanes.busy(key));
        let now = Instant::now();
        assert_eq!(lanes.ready(now), vec![key]);
        let lane = lanes.get_mut(key).unwrap();
        // The decided second item waits behind the undecided first one.
        assert!(lane.decided_prefix().is_empty());
        lane.items[0].verdict = Verdict::Known(Access::Deny);
        let out: Vec<u64> = lane.decided_prefix().iter().map(|i| i.seq).collect();
        assert_eq!(out, vec![s1, s2]);
        lanes.prune();
        assert!(!lanes.busy(key));
        assert!(lanes.is_empty());
    }

    #[test]
    fn unavailable_checks_back_off_and_slow_lanes_run_alone() {
        let mut lanes = Lanes::default();
        let a = identity("a");
        lanes.push(&a, 1, change(), Routed::default(), Verdict::Pending);
        let key = lane_key(&a);
        let now = Instant::now();
        let lane = lanes.get_mut(key).unwrap();
        lane.unavailable(now);
        assert!(!lane.ready(now));
        assert!(lane.ready(now + RETRY_MIN));
        lane.unavailable(now);
        assert_eq!(lane.retry_at, Some(now + 2 * RETRY_MIN));
        assert_eq!(lanes.next_retry(), Some(now + 2 * RETRY_MIN));
        let lane = lanes.get_mut(key).unwrap();
        lane.available();
        assert!(!lane.shares(now), "unproven lanes run alone");
        lane.record_speed(Duration::from_millis(5), now);
        assert!(lane.shares(now));
        lane.record_speed(Duration::from_secs(1), now);
        assert!(!lane.shares(now + Duration::from_secs(1)));
        lane.record_speed(Duration::from_millis(5), now);
        assert!(lane.shares(now + SOLO_FOR));
        assert_eq!(lanes.reset(), 1);
        assert_eq!(lanes.generation(), 1);
    }

    #[test]
    fn confirmations_stop_at_the_oldest_unfinished_transaction() {
        let mut t = Txns::default();
        // Nothing queued: nothing held.
        let t1 = t.begin();
        t.commit(Lsn(100));
        assert_eq!(t.confirmable(), None);
        // txn 2 has two items, txn 3 one.
        let t2 = t.begin();
        t.queued(t2);
        t.queued(t2);
        t.commit(Lsn(200));
        let t3 = t.begin();
        t.queued(t3);
        t.commit(Lsn(300));
        assert_eq!(t.confirmable(), Some(Lsn(0)));
        t.finished(t3);
        assert_eq!(t.confirmable(), Some(Lsn(0)), "txn 2 still open");
        t.finished(t2);
        assert_eq!(t.confirmable(), Some(Lsn(0)));
        t.finished(t2);
        // Everything finished: nothing held back any more.
        assert_eq!(t.confirmable(), None);
        assert_eq!(t.open(), 0);
        // A transaction still being received holds back what it has queued.
        let t4 = t.begin();
        t.queued(t4);
        assert_eq!(t.confirmable(), Some(Lsn(0)));
        let _ = t1;
    }

    #[test]
    fn a_finished_prefix_is_confirmed_up_to_its_end() {
        let mut t = Txns::default();
        let a = t.begin();
        t.queued(a);
        t.commit(Lsn(10));
        let b = t.begin();
        t.queued(b);
        t.commit(Lsn(20));
        t.finished(a);
        assert_eq!(t.confirmable(), Some(Lsn(10)));
        t.finished(b);
        assert_eq!(t.confirmable(), None);
    }
}
