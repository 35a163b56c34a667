//! The change stream across nodes: the lease holder streams the slot and publishes every
//! transaction to a Redis Stream; every other node reads that stream. Either way the pump
//! gets the same [`StreamEvent`]s (raw pgoutput messages) and decodes, authorizes and routes
//! them for its own sockets.
//!
//! ```text
//!  streamer: Replicator ─▶ buffer Begin … Commit ─▶ publish.lua ─┬─▶ yield to own pump
//!                                                  (lease check, │    (Commit handed on only
//!                                                   dedupe, XADD)│     after publishing)
//!  Redis:   walcast:<slot>:changes  (XADD MAXLEN ~ N; one entry per transaction:
//!           end = commit end LSN, prev = the entry before's end, rel = Relation messages of
//!           the relations it touches, txn = its messages)
//!  follower: XREAD BLOCK from the last entry id ─▶ skip end ≤ last routed ─▶ yield to own pump
//! ```
//!
//! Invariants:
//! - Publish before hand-on: a Commit is given to the pump (and so declared handed on, and
//!   later confirmed to the slot) only after its transaction is in the Redis stream. A
//!   streamer that cannot publish drops its replication connection: the slot stays at the
//!   last published transaction and the next streamer replays from there.
//! - One publisher: `publish.lua` adds an entry only while the lease key holds this node's
//!   id, and only if its end LSN is beyond the last published one (`walcast:<slot>:published`):
//!   a replay after failover publishes nothing twice, a stale streamer publishes nothing.
//! - Per node, transactions are routed in commit order, each once: a transaction whose commit
//!   end is ≤ the last this node routed is skipped (the slot's replay after failover, or an
//!   entry read again). Only after the pump dropped undelivered work (a `Disconnected` it was
//!   told) does the node go back to what the pump had delivered, and read from there again.
//! - A follower whose next entry was trimmed away (its `prev` is past what the follower
//!   routed) is told it missed changes, like a recreated slot.
//! - A follower is up (ready, its channels told `ok`) only while changes flow: Redis
//!   confirmed the `streaming` mark (set by a lease holder whose replication connection is
//!   up, living `F` = `--failover-timeout-secs`, see [`crate::cluster::lease`]) within the
//!   last `F`, so some node streamed within the last 2F. Past that, whether no node streams
//!   or Redis cannot be read, the pump is told the stream is lost, exactly as a single node
//!   whose replication connection dropped: `/readyz` 503, a `system` error on
//!   postgres_changes channels, `ok` again once a mark is seen. Anything shorter (a Redis
//!   blip, Redis restarted empty and marked again in time, a failover) is not reported: the
//!   follower reads on after its last entry and its pump drops nothing.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::Value;
use tokio::sync::watch;
use tokio::time::Instant;
use walcast_replication::{Lsn, ReplicationConfig, ReplicationError, Replicator, StreamEvent};

use super::lease::{LeaseState, SlotUp};
use super::link::Link;
use super::Cluster;
use crate::metrics;

/// Entries kept in the Redis stream (approximately: `MAXLEN ~`). A follower that falls
/// further behind than this is told it missed changes.
pub const STREAM_MAXLEN: u64 = 100_000;
/// Entries one follower read takes.
const READ_COUNT: usize = 256;
/// How long one follower read blocks in Redis.
const READ_BLOCK: Duration = Duration::from_millis(200);
/// Redis commands give up after this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before trying again after Redis or the slot said no.
const RETRY: Duration = Duration::from_millis(200);

/// How often a follower asks whether some node streams the slot.
fn flow_check_every(failover: Duration) -> Duration {
    (failover / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
}

/// Most transactions published in one round trip, and about how many bytes.
const PUBLISH_BATCH: usize = 64;
const PUBLISH_BATCH_BYTES: usize = 1 << 20;

/// KEYS: lease, stream, published. ARGV: node, maxlen, then (end, rel, txn) per transaction
/// in commit order. -1 (nothing added) unless the lease is this node's; else how many were
/// added (those at or before the last published end are not).
const PUBLISH: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local prev = redis.call('GET', KEYS[3])
local added = 0
for i = 3, #ARGV, 3 do
  local e = ARGV[i]
  if not prev or prev < e then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'end', e, 'prev', prev or '', 'rel', ARGV[i + 1], 'txn', ARGV[i + 2])
    prev = e
    added = added + 1
  end
end
if added > 0 then redis.call('SET', KEYS[3], prev) end
return added
"#;

/// A transaction gathered by the streamer, ready to publish.
struct Gathered {
    end: Lsn,
    rel: Vec<u8>,
    txn: Vec<u8>,
    events: Vec<StreamEvent>,
}

/// This node's role, for metrics and `/readyz`.
static STREAMER: AtomicBool = AtomicBool::new(false);
static CLUSTERED: AtomicBool = AtomicBool::new(false);

/// `Some("streamer" | "follower")` in cluster mode.
pub fn role() -> Option<&'static str> {
    if !CLUSTERED.load(Ordering::Acquire) {
        return None;
    }
    Some(if STREAMER.load(Ordering::Acquire) {
        "streamer"
    } else {
        "follower"
    })
}

fn set_streamer(on: bool) {
    STREAMER.store(on, Ordering::Release);
    metrics::cluster_role(on);
}

/// An LSN as 16 upper-case hex digits: compares as a string in Lua like the number does.
fn lsn_key(lsn: Lsn) -> String {
    format!("{:016X}", lsn.0)
}

fn parse_lsn_key(s: &[u8]) -> Option<Lsn> {
    let s = std::str::from_utf8(s).ok()?;
    u64::from_str_radix(s, 16).ok().map(Lsn)
}

/// Length-prefixed messages, one blob.
fn pack<'a>(messages: impl Iterator<Item = &'a Bytes>) -> Vec<u8> {
    let mut out = Vec::new();
    for m in messages {
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(m);
    }
    out
}

fn unpack(blob: &[u8]) -> Option<Vec<Bytes>> {
    let mut out = Vec::new();
    let mut rest = blob;
    while !rest.is_empty() {
        let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let msg = rest.get(4..4 + len)?;
        out.push(Bytes::copy_from_slice(msg));
        rest = &rest[4 + len..];
    }
    Some(out)
}

fn relid_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

/// The relations a pgoutput change message touches.
fn touched(data: &[u8], out: &mut Vec<u32>) {
    match data.first() {
        Some(b'I' | b'U' | b'D') => out.extend(relid_at(data, 1)),
        Some(b'T') => {
            let n = relid_at(data, 1).unwrap_or(0) as usize;
            for k in 0..n.min(10_000) {
                out.extend(relid_at(data, 6 + 4 * k));
            }
        }
        _ => {}
    }
}

/// A Commit's end LSN.
fn commit_end(data: &[u8]) -> Option<Lsn> {
    Some(Lsn(u64::from_be_bytes(data.get(10..18)?.try_into().ok()?)))
}

fn xlog(data: Bytes, at: Lsn) -> StreamEvent {
    StreamEvent::XLogData(walcast_pgoutput::framing::XLogData {
        wal_start: at,
        wal_end: at,
        send_time: 0,
        data,
    })
}

/// One entry read from the Redis stream.
pub(crate) struct Entry {
    pub id: String,
    pub end: Lsn,
    pub prev: Option<Lsn>,
    pub rel: Vec<Bytes>,
    pub txn: Vec<Bytes>,
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

pub(crate) fn parse_entry(v: &Value) -> Option<Entry> {
    let Value::Array(parts) = v else { return None };
    let id = String::from_utf8(bulk(parts.first()?)?.to_vec()).ok()?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut end, mut prev, mut rel, mut txn) = (None, None, Vec::new(), Vec::new());
    for pair in fields.chunks(2) {
        let (Some(k), Some(v)) = (pair.first().and_then(bulk), pair.get(1).and_then(bulk)) else {
            continue;
        };
        match k {
            b"end" => end = parse_lsn_key(v),
            b"prev" => prev = parse_lsn_key(v),
            b"rel" => rel = unpack(v)?,
            b"txn" => txn = unpack(v)?,
            _ => {}
        }
    }
    Some(Entry {
        id,
        end: end?,
        prev,
        rel,
        txn,
    })
}

/// XREAD's reply: the entries of our one stream (none on timeout).
fn parse_read(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Nil => Some(Vec::new()),
        Value::Array(streams) => {
            let Value::Array(stream) = streams.into_iter().next()? else {
                return None;
            };
            match stream.into_iter().nth(1)? {
                Value::Array(entries) => Some(entries),
                _ => None,
            }
        }
        Value::Map(streams) => match streams.into_iter().next()?.1 {
            Value::Array(entries) => Some(entries),
            _ => None,
        },
        _ => None,
    }
}

/// The pump's source in cluster mode: the slot while this node holds the lease, the Redis
/// stream otherwise.
pub struct ClusterSource {
    cluster: Arc<Cluster>,
    cfg: ReplicationConfig,
    lease: watch::Receiver<LeaseState>,
    /// Set when this node cannot stream the slot at all: the lease is let go.
    give_up: Arc<AtomicBool>,
    /// Ready to deliver changes (for `/readyz` and joins), shared with the app state.
    ready: Arc<AtomicBool>,
    /// The node's Redis link: publishing, catching up, the `streaming` check.
    link: Link,
    /// A connection of its own for `XREAD BLOCK`: a blocking read holds its connection for
    /// up to [`READ_BLOCK`], and on the shared link every other command of the node (lease
    /// renewals, heartbeats, relayed broadcasts) would queue behind it.
    block_conn: Option<redis::aio::MultiplexedConnection>,
    replicator: Option<Replicator>,
    publish: redis::Script,
    /// Events waiting for the pump.
    pending: VecDeque<StreamEvent>,
    /// The streamer's transaction being gathered (raw messages and their events).
    txn: Vec<Bytes>,
    txn_events: Vec<StreamEvent>,
    txn_relations: Vec<u32>,
    in_txn: bool,
    /// Transactions received in full and not yet published (their Commits are held).
    batch: Vec<Gathered>,
    batch_bytes: usize,
    /// The batch is complete: publish it before reading on.
    publish_now: bool,
    /// Latest Relation message per relation id this node's decoder has seen.
    relations: HashMap<u32, Bytes>,
    /// The newest commit end this node handed to its pump.
    last_end: Lsn,
    /// The last stream entry id read (`None` before the first read).
    last_id: Option<String>,
    /// Entries handed to the pump and not yet delivered (end, id), oldest first.
    unconfirmed: VecDeque<(Lsn, String)>,
    confirmed_end: Lsn,
    confirmed_id: Option<String>,
    holding: bool,
    /// The follower's stream is down and the pump was told.
    down_told: bool,
    /// The pump was given a first event after following began.
    announced: bool,
    /// A streamer took over: caught up with the Redis stream before streaming.
    caught_up: bool,
    /// This node's replication connection, for the lease task's `streaming` mark.
    slot_up: SlotUp,
    /// The current replicator has had a connection (after which it reports its own
    /// reconnections to the pump).
    slot_connected: bool,
    /// As a follower: when Redis last confirmed that some node streams the slot (the
    /// `streaming` key was there), or when following began.
    flow_seen_at: Instant,
    next_flow_check: Instant,
    /// Why the last read of the change stream failed, while reads fail.
    read_error: Option<String>,
}

impl ClusterSource {
    pub fn new(
        cluster: Arc<Cluster>,
        link: Link,
        cfg: ReplicationConfig,
        lease: watch::Receiver<LeaseState>,
        give_up: Arc<AtomicBool>,
        ready: Arc<AtomicBool>,
        slot_up: SlotUp,
    ) -> ClusterSource {
        CLUSTERED.store(true, Ordering::Release);
        set_streamer(false);
        ClusterSource {
            cluster,
            cfg,
            lease,
            give_up,
            ready,
            link,
            block_conn: None,
            replicator: None,
            publish: redis::Script::new(PUBLISH),
            pending: VecDeque::new(),
            txn: Vec::new(),
            txn_events: Vec::new(),
            txn_relations: Vec::new(),
            in_txn: false,
            batch: Vec::new(),
            batch_bytes: 0,
            publish_now: false,
            relations: HashMap::new(),
            last_end: Lsn(0),
            last_id: None,
            unconfirmed: VecDeque::new(),
            confirmed_end: Lsn(0),
            confirmed_id: None,
            holding: false,
            down_told: false,
            announced: false,
            caught_up: false,
            slot_up,
            slot_connected: false,
            flow_seen_at: Instant::now(),
            next_flow_check: Instant::now(),
            read_error: None,
        }
    }

    fn stream_key(&self) -> String {
        self.cluster.key("changes")
    }

    /// The shared link's connection (an error while the link is down).
    fn conn(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        self.link.conn().ok_or_else(super::lease::link_down)
    }

    /// The connection for blocking reads.
    async fn block_conn(&mut self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        if let Some(c) = &self.block_conn {
            return Ok(c.clone());
        }
        let c = super::connect(&self.cluster, COMMAND_TIMEOUT + READ_BLOCK).await?;
        self.block_conn = Some(c.clone());
        Ok(c)
    }

    /// The next event for the pump. Redis or slot trouble is retried here; a definite
    /// replication error is returned once (the lease is let go first).
    pub async fn recv(&mut self) -> Option<Result<StreamEvent, ReplicationError>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            if !self.holding {
                // Everything handed on so far was delivered.
                self.confirm_to(self.last_end);
            }
            let lease = *self.lease.borrow();
            let held = lease.held_now();
            if !held && self.replicator.is_some() {
                self.stop_streaming("this node no longer holds the streamer lease");
            }
            if held {
                if self.replicator.is_none() {
                    if !self.caught_up {
                        // Route every published transaction before streaming the slot.
                        match self.read(None).await {
                            Ok(0) => self.caught_up = true,
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot read the change stream before streaming; retrying");
                                tokio::time::sleep(RETRY).await;
                            }
                        }
                        continue;
                    }
                    tracing::info!(from = %self.last_end, "streaming the slot for the cluster");
                    let mut r = Replicator::new(self.cfg.clone());
                    if self.holding {
                        r.hold();
                    }
                    self.slot_up.set(Some(r.streaming_flag()));
                    self.slot_connected = false;
                    self.replicator = Some(r);
                    set_streamer(true);
                }
                let LeaseState::Held { until } = lease else {
                    continue;
                };
                if let Some(result) = self.stream_once(until).await {
                    return Some(result);
                }
            } else {
                self.caught_up = false;
                if let Some(event) = self.follow_once().await {
                    return Some(Ok(event));
                }
            }
        }
    }

    /// Stop streaming the slot (lease lost). The transaction being gathered was neither
    /// published nor handed on: the next streamer replays it.
    fn stop_streaming(&mut self, why: &str) {
        if self.is_streaming_slot() {
            // It streamed until now: as a follower it counts from here.
            self.flow_seen_at = Instant::now();
        }
        self.slot_up.set(None);
        if let Some(r) = self.replicator.take() {
            tracing::warn!(
                reason = why,
                "stopped streaming the slot; following the change stream"
            );
            drop(r);
        }
        self.discard_pending();
        self.caught_up = false;
        set_streamer(false);
    }

    /// Forget the transaction being gathered and the batch not yet published: the slot
    /// streams them again from the last confirmed position.
    fn discard_pending(&mut self) {
        self.txn.clear();
        self.txn_events.clear();
        self.txn_relations.clear();
        self.in_txn = false;
        self.batch.clear();
        self.batch_bytes = 0;
        self.publish_now = false;
    }

    /// One step as the streamer: `Some` is something for the pump.
    async fn stream_once(
        &mut self,
        until: Instant,
    ) -> Option<Result<StreamEvent, ReplicationError>> {
        let idle = self.replicator.as_ref().is_some_and(|r| !r.has_buffered());
        if self.publish_now || (idle && !self.batch.is_empty()) {
            // Nothing more is waiting: publish what was gathered before waiting for more.
            self.publish_now = true;
            return self.finish_batch().await.map(Ok);
        }
        let replicator = self.replicator.as_mut()?;
        if replicator.backend_pid().is_some() {
            self.flow_seen_at = Instant::now();
            if !self.slot_connected {
                // A replicator says nothing about its first connection; when the pump was
                // told the stream was lost (as a follower, or by this replicator's failed
                // first attempts), tell it it is back.
                self.slot_connected = true;
                if self.down_told {
                    self.down_told = false;
                    self.ready.store(true, Ordering::Release);
                    return Some(Ok(StreamEvent::Reconnected {
                        resume_from: self.last_end,
                    }));
                }
            }
        }
        let item = tokio::select! {
            item = replicator.recv() => item,
            _ = tokio::time::sleep_until(until) => return None,
            _ = lease_changed(&mut self.lease) => return None,
        };
        let up = replicator.backend_pid().is_some();
        self.ready.store(up, Ordering::Release);
        metrics::cluster_changes_flowing(up);
        if up {
            // This node streams: as a follower again, it counts from here.
            self.flow_seen_at = Instant::now();
        }
        if matches!(item, Some(Ok(StreamEvent::Reconnected { .. }))) {
            // The replicator reports its own reconnections.
            self.down_told = false;
        }
        if up && !self.slot_connected {
            // As above, seen after an item instead.
            self.slot_connected = true;
            if self.down_told {
                self.down_told = false;
                self.pending.push_back(StreamEvent::Reconnected {
                    resume_from: self.last_end,
                });
            }
        }
        match item {
            None => {
                self.slot_up.set(None);
                self.replicator = None;
                None
            }
            Some(Err(e)) if slot_busy(&e) => {
                // The previous streamer's walsender still has the slot: wait for it to go.
                tracing::info!(error = %e, "the slot is still in use by the previous streamer; retrying");
                self.slot_up.set(None);
                self.replicator = None;
                tokio::time::sleep(RETRY).await;
                None
            }
            Some(Err(e)) => {
                self.give_up.store(true, Ordering::Release);
                self.stop_streaming("replication cannot continue");
                Some(Err(e))
            }
            Some(Ok(StreamEvent::XLogData(x))) => self.on_message(x).await.map(Ok),
            Some(Ok(StreamEvent::Keepalive { wal_end })) => {
                let e = StreamEvent::Keepalive { wal_end };
                if self.in_txn {
                    self.txn_events.push(e);
                    None
                } else {
                    Some(Ok(e))
                }
            }
            Some(Ok(e @ StreamEvent::Disconnected { .. })) => {
                // The pump drops what it has not delivered; the slot replays it, so take it
                // again from what was delivered.
                self.discard_pending();
                self.last_end = self.confirmed_end;
                self.unconfirmed.clear();
                self.ready.store(false, Ordering::Release);
                self.down_told = true;
                Some(Ok(e))
            }
            Some(Ok(e)) => {
                // Reconnected / SlotRecreated: the decoder starts afresh.
                self.relations.clear();
                Some(Ok(e))
            }
        }
    }

    async fn on_message(&mut self, x: walcast_pgoutput::framing::XLogData) -> Option<StreamEvent> {
        let tag = x.data.first().copied();
        if tag == Some(b'R') {
            if let Some(id) = relid_at(&x.data, 1) {
                self.relations.insert(id, x.data.clone());
            }
        }
        if tag == Some(b'B') {
            self.in_txn = true;
        }
        if !self.in_txn {
            return Some(StreamEvent::XLogData(x));
        }
        touched(&x.data, &mut self.txn_relations);
        self.txn.push(x.data.clone());
        if tag != Some(b'C') {
            self.txn_events.push(StreamEvent::XLogData(x));
            return None;
        }
        self.in_txn = false;
        let end = commit_end(&x.data).unwrap_or(x.wal_end);
        self.txn_events.push(StreamEvent::XLogData(x));
        let mut rels = std::mem::take(&mut self.txn_relations);
        rels.sort_unstable();
        rels.dedup();
        let gathered = Gathered {
            end,
            rel: pack(rels.iter().filter_map(|id| self.relations.get(id))),
            txn: pack(self.txn.iter()),
            events: std::mem::take(&mut self.txn_events),
        };
        self.txn.clear();
        self.batch_bytes += gathered.rel.len() + gathered.txn.len();
        self.batch.push(gathered);
        let more_waiting = self.replicator.as_ref().is_some_and(|r| r.has_buffered());
        if more_waiting
            && self.batch.len() < PUBLISH_BATCH
            && self.batch_bytes < PUBLISH_BATCH_BYTES
        {
            // More transactions are already here: publish them together (one round trip).
            // Reading on declares this Commit handed on, so hold confirmations meanwhile.
            if let Some(r) = self.replicator.as_mut() {
                r.hold();
            }
            return None;
        }
        self.publish_now = true;
        self.finish_batch().await
    }

    /// Publish the gathered transactions, then hand them to the pump. Cancel-safe: until it
    /// finished, `publish_now` says so and the next `recv` starts here again (publishing is
    /// idempotent), before the replicator could declare another Commit handed on.
    async fn finish_batch(&mut self) -> Option<StreamEvent> {
        let published = self.publish_batch().await;
        self.publish_now = false;
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        if !published {
            self.stop_streaming("cannot publish while holding the lease");
            return None;
        }
        if !self.holding {
            // Confirmations were held only for the batch: every Commit in it is published.
            if let Some(r) = self.replicator.as_mut() {
                r.release();
            }
        }
        for g in batch {
            if g.end <= self.last_end {
                // Replayed after failover: routed already, as a follower.
                metrics::cluster_skipped(1);
                continue;
            }
            self.last_end = g.end;
            self.unconfirmed.push_back((g.end, String::new()));
            self.pending.extend(g.events);
        }
        self.pending.pop_front()
    }

    /// Publish the gathered transactions; false once the lease is gone (nothing published).
    async fn publish_batch(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let key = self.stream_key();
        loop {
            let until = match *self.lease.borrow() {
                LeaseState::Held { until } if until > Instant::now() => until,
                _ => return false,
            };
            let attempt = async {
                let mut c = self.conn()?;
                let mut call = self.publish.prepare_invoke();
                call.key(super::lease::lease_key(&self.cluster))
                    .key(&key)
                    .key(self.cluster.key("published"))
                    .arg(self.cluster.node_id())
                    .arg(STREAM_MAXLEN);
                for g in &self.batch {
                    call.arg(lsn_key(g.end)).arg(&g.rel).arg(&g.txn);
                }
                let n: i64 = call.invoke_async(&mut c).await?;
                redis::RedisResult::Ok(n)
            };
            match tokio::time::timeout_at(until, attempt).await {
                // Entries already published (by the previous streamer) are not added again.
                Ok(Ok(n)) if n >= 0 => {
                    metrics::cluster_published(n as u64);
                    return true;
                }
                Ok(Ok(_)) => return false,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot publish transactions; retrying while the lease lasts");
                    tokio::time::sleep(RETRY).await;
                }
                Err(_) => return false,
            }
        }
    }

    /// One step as a follower: `Some` is something for the pump.
    ///
    /// One rule decides whether changes flow, whatever went wrong: Redis confirmed a
    /// `streaming` mark (which lives `F` = `--failover-timeout-secs`) within the last `F`,
    /// so some node streamed within the last 2F. A shorter Redis blip or an empty Redis
    /// that a streamer marks again in time changes nothing: no 503, no system message, and
    /// reading resumes after the last entry.
    async fn follow_once(&mut self) -> Option<StreamEvent> {
        let mut lease = self.lease.clone();
        let got = tokio::select! {
            r = self.read(Some(READ_BLOCK)) => r,
            _ = lease_changed(&mut lease) => return None,
        };
        let read_ok = match got {
            Ok(_) => {
                if self.read_error.take().is_some() {
                    tracing::info!("reading the cluster's change stream again");
                }
                self.check_flow().await;
                true
            }
            Err(e) => {
                self.block_conn = None;
                if self.read_error.is_none() {
                    tracing::warn!(error = %e, "cannot read the cluster's change stream; retrying");
                }
                self.read_error = Some(e.to_string());
                false
            }
        };
        let failover = self.cluster.failover_timeout();
        let flowing = self.flow_seen_at.elapsed() <= failover;
        metrics::cluster_changes_flowing(flowing && read_ok);
        if !flowing {
            self.ready.store(false, Ordering::Release);
            if !self.down_told {
                let secs = (failover * 2).as_secs();
                let reason = match &self.read_error {
                    Some(e) => format!(
                        "the cluster's change stream (Redis) has been unreachable for over {} s: {e}",
                        failover.as_secs()
                    ),
                    None => format!(
                        "no node of the cluster has streamed the slot for {secs} s \
                         (the streamer cannot reach the database, or no node can stream)"
                    ),
                };
                tracing::warn!(reason = %reason, "postgres_changes are not flowing");
                return Some(self.lost(reason));
            }
            if !read_ok {
                tokio::time::sleep(RETRY).await;
            }
            return None;
        }
        if !read_ok {
            tokio::time::sleep(RETRY).await;
            return None;
        }
        self.ready.store(true, Ordering::Release);
        if self.down_told {
            self.down_told = false;
            if self.announced {
                return Some(StreamEvent::Reconnected {
                    resume_from: self.last_end,
                });
            }
        }
        if !self.announced {
            // The pump marks the stream up on its first event: tell it at once, not at the
            // first change.
            self.announced = true;
            return Some(StreamEvent::Keepalive {
                wal_end: self.last_end,
            });
        }
        None
    }

    /// Tell the pump the stream is lost: it drops what it has not delivered, so read that
    /// again from what it had delivered.
    fn lost(&mut self, reason: String) -> StreamEvent {
        self.ready.store(false, Ordering::Release);
        self.down_told = true;
        self.last_end = self.confirmed_end;
        self.last_id = self.confirmed_id.clone().or(self.last_id.take());
        self.unconfirmed.clear();
        self.relations.clear();
        StreamEvent::Disconnected { reason }
    }

    /// As a follower, at most every [`flow_check_every`]: does some node stream the slot?
    /// Only Redis answering "yes" moves `flow_seen_at`.
    async fn check_flow(&mut self) {
        let now = Instant::now();
        if now < self.next_flow_check {
            return;
        }
        self.next_flow_check = now + flow_check_every(self.cluster.failover_timeout());
        let key = super::lease::streaming_key(&self.cluster);
        let asked = async {
            let mut c = self.conn()?;
            let n: i64 = redis::cmd("EXISTS").arg(&key).query_async(&mut c).await?;
            redis::RedisResult::Ok(n == 1)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, asked).await {
            Ok(Ok(true)) => self.flow_seen_at = now,
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot ask Redis whether a node streams"),
            Err(_) => tracing::debug!("Redis did not say in time whether a node streams"),
        }
    }

    /// Read entries after the last one into `pending`; how many entries came.
    async fn read(&mut self, block: Option<Duration>) -> redis::RedisResult<usize> {
        let key = self.stream_key();
        let last_id = match &self.last_id {
            Some(id) => id.clone(),
            None => {
                // A node that starts follows from the newest entry on: it has no subscribers
                // from before.
                let v: Value = redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut self.conn()?)
                    .await?;
                let newest = match v {
                    Value::Array(entries) => entries.first().and_then(parse_entry),
                    _ => None,
                };
                let id = match newest {
                    Some(e) => {
                        self.last_end = self.last_end.max(e.end);
                        self.confirmed_end = self.last_end;
                        e.id
                    }
                    None => "0-0".to_string(),
                };
                self.last_id = Some(id.clone());
                self.confirmed_id = Some(id.clone());
                id
            }
        };
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(READ_COUNT);
        if let Some(b) = block {
            cmd.arg("BLOCK").arg(b.as_millis() as u64);
        }
        cmd.arg("STREAMS").arg(&key).arg(&last_id);
        let v: Value = match block {
            Some(_) => cmd.query_async(&mut self.block_conn().await?).await?,
            None => cmd.query_async(&mut self.conn()?).await?,
        };
        let Some(entries) = parse_read(v) else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Parse,
                "unexpected XREAD reply",
            )));
        };
        let n = entries.len();
        for raw in &entries {
            let Some(entry) = parse_entry(raw) else {
                tracing::error!("an entry of the change stream cannot be read; skipped");
                continue;
            };
            self.last_id = Some(entry.id.clone());
            self.take_entry(entry);
        }
        Ok(n)
    }

    fn take_entry(&mut self, entry: Entry) {
        if entry.end <= self.last_end {
            metrics::cluster_skipped(1);
            if self.unconfirmed.is_empty() && !self.holding {
                self.confirmed_id = Some(entry.id);
            }
            return;
        }
        if let Some(prev) = entry.prev {
            if self.last_end > Lsn(0) && prev > self.last_end {
                tracing::warn!(missed_after = %self.last_end, resumed_at = %prev, "entries of the change stream were trimmed before this node read them; telling channels to refetch");
                self.pending.push_back(StreamEvent::SlotRecreated);
            }
        }
        for rel in entry.rel {
            let Some(id) = relid_at(&rel, 1) else {
                continue;
            };
            // Only relations this node's decoder does not know yet: a repeated Relation
            // message would needlessly forget cached policies.
            if self.relations.get(&id) != Some(&rel) {
                self.relations.insert(id, rel.clone());
                self.pending.push_back(xlog(rel, entry.end));
            }
        }
        for msg in entry.txn {
            if msg.first() == Some(&b'R') {
                if let Some(id) = relid_at(&msg, 1) {
                    self.relations.insert(id, msg.clone());
                }
            }
            self.pending.push_back(xlog(msg, entry.end));
        }
        self.last_end = entry.end;
        self.unconfirmed.push_back((entry.end, entry.id));
        metrics::cluster_followed(1);
    }

    /// The pump delivered everything up to `lsn`.
    fn confirm_to(&mut self, lsn: Lsn) {
        self.confirmed_end = self.confirmed_end.max(lsn);
        while let Some((end, _)) = self.unconfirmed.front() {
            if *end > self.confirmed_end {
                break;
            }
            if let Some((_, id)) = self.unconfirmed.pop_front() {
                if !id.is_empty() {
                    self.confirmed_id = Some(id);
                }
            }
        }
    }

    pub fn hold(&mut self) {
        self.holding = true;
        if let Some(r) = self.replicator.as_mut() {
            r.hold();
        }
    }

    pub fn release_to(&mut self, lsn: Lsn) {
        self.confirm_to(lsn);
        if let Some(r) = self.replicator.as_mut() {
            r.release_to(lsn);
        }
    }

    pub fn release(&mut self) {
        self.holding = false;
        self.confirm_to(self.last_end);
        if !self.batch.is_empty() {
            // Commits of unpublished transactions stay held; released once published.
            return;
        }
        if let Some(r) = self.replicator.as_mut() {
            r.release();
        }
    }

    pub fn mark_handed_on(&mut self) {
        if let Some(r) = self.replicator.as_mut() {
            r.mark_handed_on();
        }
    }

    pub fn reconnect(&mut self, reason: String) {
        if let Some(r) = self.replicator.as_mut() {
            r.reconnect(reason);
        }
    }

    pub fn has_buffered(&self) -> bool {
        !self.pending.is_empty() || self.replicator.as_ref().is_some_and(|r| r.has_buffered())
    }

    pub fn handed_on(&self) -> Lsn {
        match &self.replicator {
            Some(r) => r.handed_on(),
            None => self.confirmed_end,
        }
    }

    /// Streaming the slot, or following the change stream.
    pub fn is_up(&self) -> bool {
        match &self.replicator {
            Some(r) => r.backend_pid().is_some(),
            None => self.ready.load(Ordering::Acquire),
        }
    }

    pub fn is_streaming_slot(&self) -> bool {
        self.replicator
            .as_ref()
            .is_some_and(|r| r.backend_pid().is_some())
    }

    pub async fn shutdown(mut self) -> Result<Lsn, ReplicationError> {
        set_streamer(false);
        self.slot_up.set(None);
        match self.replicator.take() {
            Some(r) => r.shutdown().await,
            None => Ok(self.confirmed_end),
        }
    }
}

/// The lease moved on; never, once the lease task ended (shutdown).
async fn lease_changed(rx: &mut watch::Receiver<LeaseState>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The slot is used by another walsender (the previous streamer's, until Postgres notices it
/// is gone).
fn slot_busy(e: &ReplicationError) -> bool {
    match e {
        ReplicationError::SlotInUse { .. }
        | ReplicationError::SlotHeldByPreviousConnection { .. } => true,
        ReplicationError::Server(db) => db.code == "55006",
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_keys_order_like_lsns() {
        let a = lsn_key(Lsn(0x0_FFFF_FFFF));
        let b = lsn_key(Lsn(0x1_0000_0000));
        assert!(a < b);
        assert_eq!(parse_lsn_key(b.as_bytes()), Some(Lsn(0x1_0000_0000)));
    }

    #[test]
    fn packed_messages_come_back() {
        let msgs = vec![
            Bytes::from_static(b"B123"),
            Bytes::new(),
            Bytes::from_static(b"C"),
        ];
        assert_eq!(unpack(&pack(msgs.iter())).unwrap(), msgs);
        assert!(unpack(&[0, 0, 0, 9, 1]).is_none());
    }

    /// The publish script against a real redis-server: only the lease holder adds entries,
    /// and a replay adds nothing twice.
    #[tokio::test]
    async fn only_the_lease_holder_publishes_and_never_twice() {
        let redis = walcast_testkit::RedisServer::start().unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let script = redis::Script::new(PUBLISH);
        async fn publish(
            script: &redis::Script,
            c: &mut redis::aio::MultiplexedConnection,
            node: &str,
            ends: &[u64],
        ) -> i64 {
            let mut call = script.prepare_invoke();
            call.key("lease")
                .key("changes")
                .key("published")
                .arg(node)
                .arg(100);
            for e in ends {
                call.arg(lsn_key(Lsn(*e)))
                    .arg(&b""[..])
                    .arg(pack([Bytes::from_static(b"C")].iter()));
            }
            call.invoke_async(c).await.unwrap()
        }
        let len = |c: &mut redis::aio::MultiplexedConnection| {
            let mut c = c.clone();
            async move {
                let n: i64 = redis::cmd("XLEN")
                    .arg("changes")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                n
            }
        };
        // Nobody holds the lease, then someone else does: nothing is added.
        assert_eq!(publish(&script, &mut c, "a", &[10]).await, -1);
        let _: () = redis::cmd("SET")
            .arg("lease")
            .arg("b")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(publish(&script, &mut c, "a", &[10]).await, -1);
        assert_eq!(len(&mut c).await, 0);
        // The holder publishes; a replay (b's successor a) adds only what is new.
        assert_eq!(publish(&script, &mut c, "b", &[10, 20]).await, 2);
        let _: () = redis::cmd("SET")
            .arg("lease")
            .arg("a")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(publish(&script, &mut c, "a", &[10, 20, 30]).await, 1);
        assert_eq!(len(&mut c).await, 3);
        let v: Value = redis::cmd("XRANGE")
            .arg("changes")
            .arg("-")
            .arg("+")
            .query_async(&mut c)
            .await
            .unwrap();
        let Value::Array(entries) = v else {
            panic!("{v:?}")
        };
        let parsed: Vec<(Lsn, Option<Lsn>)> = entries
            .iter()
            .map(|e| parse_entry(e).map(|e| (e.end, e.prev)).unwrap())
            .collect();
        assert_eq!(
            parsed,
            vec![
                (Lsn(10), None),
                (Lsn(20), Some(Lsn(10))),
                (Lsn(30), Some(Lsn(20)))
            ]
        );
    }

    #[test]
    fn touched_relations_of_changes() {
        let mut out = Vec::new();
        touched(&[b'I', 0, 0, 0, 7, b'N'], &mut out);
        touched(&[b'T', 0, 0, 0, 2, 0, 0, 0, 0, 8, 0, 0, 0, 9], &mut out);
        touched(&[b'B', 0, 0, 0, 1], &mut out);
        assert_eq!(out, vec![7, 8, 9]);
    }
}
