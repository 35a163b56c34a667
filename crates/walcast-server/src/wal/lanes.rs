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
//! - Per subscriber, deliveries keep commit order. Within an identity: a change is delivered
//!   directly only when its identity's lane is empty; otherwise it queues behind the lane's
//!   items, decided or not, and a lane delivers only its decided prefix. Across identities (a
//!   channel whose token changed while its earlier changes still wait in the old identity's
//!   lane): the new item carries a gate, "after that lane delivered that item", and its lane
//!   holds at it until the gate opens.
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
use walcast_core::subscription::SubscriberId;
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
    /// Deliver only once these lanes delivered these items: a subscriber of this item had
    /// earlier changes waiting in another identity's lane (its token changed).
    pub after: Vec<(LaneKey, u64)>,
}

/// One identity's queue of changes.
pub struct Lane {
    pub identity: Arc<Identity>,
    pub items: VecDeque<Item>,
    /// How many of `items` are [`Verdict::Pending`]: kept by `push` and by [`Lane::recount`],
    /// which whoever changes verdicts calls. The pump asks every lane whether it is ready on
    /// every turn: scanning the items there cost (items waiting) per WAL message.
    pending: usize,
    /// A check batch with some of its items is running.
    pub checking: bool,
    /// After a check that could not run: not again before this.
    pub retry_at: Option<Instant>,
    backoff: Duration,
    /// Its checks have been fast: it may share a pipelined transaction with other lanes.
    pub proven_fast: bool,
    /// After a slow check: runs alone until then.
    pub solo_until: Option<Instant>,
    /// When it last had an item (an idle lane is kept a while, remembering its speed).
    last_used: Instant,
    /// The sequence number of the last item delivered from it (items leave in order).
    delivered_through: u64,
    /// Since when its checks cannot run (cleared by one that runs).
    pub unavailable_since: Option<Instant>,
}

/// The first retry delay after an unavailable check, and the longest.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A check slower than this sends its lane to run alone for [`SOLO_FOR`].
pub const SLOW_CHECK: Duration = Duration::from_millis(200);
const SOLO_FOR: Duration = Duration::from_secs(60);
/// An empty lane is forgotten after this long without items.
const IDLE_FOR: Duration = Duration::from_secs(60);

impl Lane {
    fn new(identity: Arc<Identity>) -> Lane {
        Lane {
            identity,
            items: VecDeque::new(),
            pending: 0,
            checking: false,
            retry_at: None,
            backoff: RETRY_MIN,
            proven_fast: false,
            solo_until: None,
            last_used: Instant::now(),
            delivered_through: 0,
            unavailable_since: None,
        }
    }

    /// Has pending items and may start a check at `now`.
    pub fn ready(&self, now: Instant) -> bool {
        !self.checking && self.retry_at.is_none_or(|t| t <= now) && self.pending > 0
    }

    /// Count the pending items again, after verdicts were changed through `items`.
    pub fn recount(&mut self) {
        self.pending = self
            .items
            .iter()
            .filter(|i| i.verdict == Verdict::Pending)
            .count();
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
        self.unavailable_since.get_or_insert(now);
        self.retry_at = Some(now + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    /// A check ran: the next failure starts the backoff from the bottom again.
    pub fn available(&mut self) {
        self.unavailable_since = None;
        self.retry_at = None;
        self.backoff = RETRY_MIN;
    }
}

/// Every identity with items waiting.
#[derive(Default)]
pub struct Lanes {
    lanes: HashMap<LaneKey, Lane>,
    next_seq: u64,
    generation: u64,
    /// Each subscriber with a change waiting: the lane and item of its latest one.
    last_of: HashMap<SubscriberId, (LaneKey, u64)>,
    /// Items over every lane (asked on every turn of the pump).
    total: usize,
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

    /// Whether some subscriber still has a change waiting in a lane (only then can a change
    /// have to queue behind another identity's lane).
    pub fn anyone_waiting(&self) -> bool {
        !self.last_of.is_empty()
    }

    /// Whether `lane` delivered its item `seq` (a lane that is gone delivered everything).
    fn delivered(&self, lane: LaneKey, seq: u64) -> bool {
        self.lanes
            .get(&lane)
            .is_none_or(|l| l.delivered_through >= seq)
    }

    /// Whether one of `subscribers` still waits for a change in a lane other than `key`'s:
    /// a change for them under identity `key` must then queue (behind a gate), not go now.
    pub fn waiting_elsewhere(&self, key: LaneKey, subscribers: &[SubscriberId]) -> bool {
        !self.last_of.is_empty()
            && subscribers.iter().any(|x| {
                self.last_of
                    .get(x)
                    .is_some_and(|&(k, s)| k != key && !self.delivered(k, s))
            })
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
        let key = lane_key(identity);
        let mut after = Vec::new();
        for x in routed.subscribers_of(0) {
            if let Some(&(k, s)) = self.last_of.get(&x) {
                if k != key && !self.delivered(k, s) && !after.contains(&(k, s)) {
                    after.push((k, s));
                }
            }
            self.last_of.insert(x, (key, seq));
        }
        let lane = self
            .lanes
            .entry(key)
            .or_insert_with(|| Lane::new(identity.clone()));
        lane.last_used = Instant::now();
        if verdict == Verdict::Pending {
            lane.pending += 1;
        }
        self.total += 1;
        lane.items.push_back(Item {
            seq,
            txn,
            change,
            routed,
            verdict,
            after,
        });
        seq
    }

    /// Take the items at the front of `key`'s lane that may be delivered now, in order:
    /// decided, with every gate open.
    pub fn deliverable(&mut self, key: LaneKey) -> Vec<Item> {
        let mut out = Vec::new();
        while let Some(front) = self.lanes.get(&key).and_then(|l| l.items.front()) {
            if !matches!(front.verdict, Verdict::Known(_))
                || !front.after.iter().all(|&(k, s)| self.delivered(k, s))
            {
                break;
            }
            let Some(lane) = self.lanes.get_mut(&key) else {
                break;
            };
            let Some(item) = lane.items.pop_front() else {
                break;
            };
            lane.delivered_through = item.seq;
            if item.verdict == Verdict::Pending {
                lane.pending = lane.pending.saturating_sub(1);
            }
            self.total -= 1;
            for x in item.routed.subscribers_of(0) {
                if self.last_of.get(&x) == Some(&(key, item.seq)) {
                    self.last_of.remove(&x);
                }
            }
            out.push(item);
        }
        out
    }

    /// A lane's state in short, for traces: (claims, items, front verdict, front gates, checking).
    pub fn describe(&self, key: LaneKey) -> Option<String> {
        let l = self.lanes.get(&key)?;
        let front = l.items.front();
        Some(format!(
            "{} items={} front={:?} gates={:?} checking={} delivered_through={}",
            l.identity.claims,
            l.items.len(),
            front.map(|i| (i.seq, &i.verdict)),
            front.map(|i| i
                .after
                .iter()
                .map(|&(k, s)| (k, s, self.delivered(k, s)))
                .collect::<Vec<_>>()),
            l.checking,
            l.delivered_through
        ))
    }

    /// Lanes whose front item is decided (it may be held only by a gate): after another lane
    /// delivered, these are worth a look.
    pub fn decided_fronts(&self) -> Vec<LaneKey> {
        self.lanes
            .iter()
            .filter(|(_, l)| {
                l.items
                    .front()
                    .is_some_and(|i| matches!(i.verdict, Verdict::Known(_)))
            })
            .map(|(k, _)| *k)
            .collect()
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
            .filter(|l| !l.checking && l.pending > 0)
            .filter_map(|l| l.retry_at)
            .min()
    }

    /// Since when the longest-waiting lane's checks cannot run, if any waits.
    pub fn unavailable_since(&self) -> Option<Instant> {
        self.lanes
            .values()
            .filter(|l| !l.items.is_empty())
            .filter_map(|l| l.unavailable_since)
            .min()
    }

    /// Forget lanes that have been empty for a while (a lane holds its identity, so its key
    /// cannot be reused by another identity while it exists).
    pub fn prune(&mut self, now: Instant) {
        self.lanes.retain(|_, l| {
            !l.items.is_empty()
                || l.checking
                || now.saturating_duration_since(l.last_used) < IDLE_FOR
        });
    }

    /// Everything is dropped and verdicts still running are void (a reconnection: the
    /// unconfirmed transactions are streamed again). Returns the items dropped.
    pub fn reset(&mut self) -> usize {
        self.generation += 1;
        let dropped = self.lanes.values().map(|l| l.items.len()).sum();
        self.lanes.clear();
        self.last_of.clear();
        self.total = 0;
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
        self.total
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
            xid: 0,
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
        // The decided second item waits behind the undecided first one.
        assert!(lanes.deliverable(key).is_empty());
        lanes.get_mut(key).unwrap().items[0].verdict = Verdict::Known(Access::Deny);
        let out: Vec<u64> = lanes.deliverable(key).iter().map(|i| i.seq).collect();
        assert_eq!(out, vec![s1, s2]);
        lanes.prune(now);
        assert!(!lanes.busy(key));
        assert_eq!(
            lanes.len(),
            1,
            "an idle lane remembers its speed for a while"
        );
        lanes.prune(now + IDLE_FOR + Duration::from_secs(1));
        assert!(lanes.is_empty());
    }

    fn routed_to(
        hub: &walcast_core::hub::Hub,
        identity: &Arc<Identity>,
        subscriber: u64,
    ) -> Routed {
        let change = change();
        // A channel of `identity` subscribed to the change's table.
        #[derive(Default)]
        struct Null;
        impl walcast_core::hub::Outbox for Null {
            fn push(&self, _: walcast_core::hub::OutFrame) -> bool {
                true
            }
        }
        hub.subscribe(
            subscriber,
            walcast_core::hub::ChannelTarget {
                outbox: Arc::new(Null),
                framing: walcast_core::hub::Framing::Phoenix(walcast_protocol::Vsn::V2),
                after: None,
                topic: "realtime:x".into(),
                identity: identity.clone(),
            },
            vec![walcast_core::subscription::Binding {
                id: 1,
                event: walcast_core::subscription::EventFilter::All,
                schema: "public".into(),
                table: "t".into(),
                filter: None,
                select: None,
            }],
            || (),
        );
        hub.route_owned(&change, &mut Default::default())
    }

    #[test]
    fn a_channel_whose_token_changed_gets_its_old_changes_first() {
        let hub = walcast_core::hub::Hub::new(Default::default());
        let (a, b) = (identity("a"), identity("b"));
        let mut lanes = Lanes::default();
        // Channel 7 under identity a: one change waits for a's check.
        let routed = routed_to(&hub, &a, 7);
        let ka = lane_key(&routed.identities()[0]);
        let sa = lanes.push(
            &routed.identities()[0].clone(),
            1,
            change(),
            routed,
            Verdict::Pending,
        );
        // Its token changes to b; the next change for it must not overtake.
        let routed = routed_to(&hub, &b, 7);
        let ib = routed.identities()[0].clone();
        let kb = lane_key(&ib);
        assert!(lanes.waiting_elsewhere(kb, &routed.subscribers_of(0)));
        let sb = lanes.push(&ib, 2, change(), routed, Verdict::Known(Access::ALL));
        assert!(lanes.deliverable(kb).is_empty(), "held by the gate");
        lanes.get_mut(ka).unwrap().items[0].verdict = Verdict::Known(Access::ALL);
        assert_eq!(lanes.decided_fronts().len(), 2);
        assert_eq!(
            lanes
                .deliverable(ka)
                .iter()
                .map(|i| i.seq)
                .collect::<Vec<_>>(),
            [sa]
        );
        assert_eq!(
            lanes
                .deliverable(kb)
                .iter()
                .map(|i| i.seq)
                .collect::<Vec<_>>(),
            [sb]
        );
        assert!(!lanes.waiting_elsewhere(ka, &[7]));
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
