//! Session resume on any node: a client that rejoins with its `session_id` on node B resumes
//! the session node A kept, with what it missed replayed from the cluster's change stream.
//!
//! ```text
//!  join under session S on B, B has no channel of S:
//!   1 claim   UPDATE realtime.walcast_sessions SET node = B WHERE session = S
//!             RETURNING the records and their previous owner A      (row locks: one winner
//!                                                                     per moment, in order)
//!   2 hand-over  A ≠ B: PUBLISH walcast:<slot>:handover:<A> {S, reply key}
//!             A alive: drops its copy of S (parked or live; a rejoin on A is told it moved),
//!                      RPUSH reply key {topic: acked}  ─▶ B BLPOPs it (HANDOVER_WAIT)
//!             A dead (no subscriber, or no answer in time): the records' acked is used
//!   3 restore each channel of S on B, parked: topic member, hub subscriber after acked;
//!             F = what B had routed then. Changes B routes from then on buffer as usual
//!   4 replay  XREVRANGE walcast:<slot>:changes back to the entry ending at or before acked
//!             ─▶ decode (each entry carries its Relation messages) ─▶ changes in (acked, F]
//!             ─▶ a private hub and topics holding only this channel: the same routing,
//!                row-level security checks and rendering as live ─▶ put before the buffer
//!  then the join's ordinary resume takes the channel over: reply, replay, live.
//! ```
//!
//! Invariants:
//! - One copy: the previous owner drops its channels before it answers, and the records
//!   belong to the claimer from the claim on (`node` column): the previous owner neither
//!   updates nor deletes them. Two nodes claiming at once serialize on the rows; the later
//!   one asks the earlier one to hand over, which it does only once its own take-over is
//!   complete (one take-over or hand-over of a session at a time per node).
//! - Nothing silently lost: a stream that no longer reaches back to `acked` (trimmed past
//!   MAXLEN) makes the channel lost (`ResyncRequired`); so does any failure to take over
//!   (Redis or Postgres unreachable). A channel the previous owner no longer had is resumed
//!   as lost too.
//! - Exactly once, in commit order: the replay holds the stream's positions in (acked, F];
//!   what B routes after subscribing reaches the channel live (after F, or a transaction
//!   published late, which the replay then lacks), and a buffered delivery the replay also
//!   holds is dropped when the replay is put in front. The stream is in commit order, so a
//!   late transaction comes after everything replayed.
//! - A client that reconnects to the same node resumes locally, as in one process: nothing
//!   here runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::Value;
use walcast_core::broadcast::{JoinOptions, Member, TopicKey, Topics};
use walcast_core::change::{Change, ChangeDecoder, Decoded};
use walcast_core::hub::{Access, ChannelTarget, Framing, Hub, OutFrame, Outbox};
use walcast_core::Position;

use super::changes::{parse_entry, Entry};
use super::Cluster;
use crate::authz::rls::PolicyCache;
use crate::realtime::resume::{Lost, SessionKey};
use crate::realtime::session_store::{self, Prepared};
use crate::state::AppState;

/// How long the claimer waits for the previous owner to hand a session over.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);
/// Redis commands give up after this long.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Stream entries read per round trip when reading back.
const READ_BACK_COUNT: usize = 512;

/// One take-over or hand-over of a session at a time on this node (see the invariants);
/// different sessions proceed in parallel.
static TAKING: std::sync::LazyLock<Mutex<HashMap<SessionKey, Arc<tokio::sync::Mutex<()>>>>> =
    std::sync::LazyLock::new(Default::default);

/// Held while a session is taken over or handed over here.
struct SessionLock {
    key: SessionKey,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

async fn lock_session(key: &SessionKey) -> SessionLock {
    let lock = TAKING
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key.clone())
        .or_default()
        .clone();
    SessionLock {
        key: key.clone(),
        _held: lock.lock_owned().await,
    }
}

impl Drop for SessionLock {
    fn drop(&mut self) {
        let mut locks = TAKING.lock().unwrap_or_else(|p| p.into_inner());
        // The map's reference and this guard's: nobody waits, forget the key.
        if locks
            .get(&self.key)
            .is_some_and(|l| Arc::strong_count(l) <= 2)
        {
            locks.remove(&self.key);
        }
    }
}

/// Why a take-over failed (the join is then told to resync).
#[derive(Debug, thiserror::Error)]
pub enum TakeOverError {
    #[error("session records: {0:#}")]
    Records(#[from] anyhow::Error),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

fn handover_channel(cluster: &Cluster, node: &str) -> String {
    cluster.key(&format!("handover:{node}"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Request {
    id: String,
    who: String,
    reply: String,
}

/// What the previous owner had of one channel.
#[derive(serde::Serialize, serde::Deserialize)]
struct Handed {
    acked: String,
    lost: bool,
}

/// Take over session `key` from the node that kept it, when this node has none of its
/// channels: afterwards the join's ordinary claim resumes it (or says to resync). No-op
/// outside cluster mode.
pub async fn take_over(state: &AppState, key: &SessionKey, topic: &str) {
    let Some(cluster) = state.cluster.clone() else {
        return;
    };
    let _one = lock_session(key).await;
    if state.sessions.has(key) {
        return;
    }
    if let Err(e) = try_take_over(state, &cluster, key).await {
        tracing::warn!(error = %e, "cannot take a session over from another node; its join is told to resync");
        crate::metrics::session_resync("takeover_failed");
        state
            .sessions
            .note_lost(key, Arc::from(topic), Lost::Dropped, Instant::now());
    }
}

async fn try_take_over(
    state: &AppState,
    cluster: &Arc<Cluster>,
    key: &SessionKey,
) -> Result<(), TakeOverError> {
    let me = cluster.node_id();
    let client = state.sql.get().await?;
    let rows = client
        .query(
            "WITH old AS (SELECT session_id, who, topic, node FROM realtime.walcast_sessions \
                           WHERE session_id = $1 AND who = $2 FOR UPDATE) \
             UPDATE realtime.walcast_sessions s SET node = $3 FROM old \
              WHERE s.session_id = old.session_id AND s.who = old.who AND s.topic = old.topic \
             RETURNING s.session_id, s.who, s.topic, s.role, s.claims, s.vsn, s.private, \
                       s.entries, s.broadcast, s.acked, old.node, \
                       s.parked_at IS NOT NULL \
                         AND s.parked_at < now() - make_interval(secs => $4)",
            &[
                &&*key.id,
                &&*key.who,
                &me,
                &state.sessions.limits().window.as_secs_f64(),
            ],
        )
        .await
        .map_err(anyhow::Error::from)?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut records = Vec::new();
    let mut previous: Option<String> = None;
    for row in &rows {
        let rec = session_store::record_of(row)?;
        let node: String = row.try_get(10).map_err(anyhow::Error::from)?;
        let expired: bool = row.try_get(11).map_err(anyhow::Error::from)?;
        previous.get_or_insert(node);
        records.push((rec, expired));
    }
    let previous = previous.unwrap_or_default();
    if previous == me {
        // Ours already: what this node knows (left, expired, lost) is the truth.
        return Ok(());
    }
    let handed = if previous.is_empty() {
        None
    } else {
        ask_hand_over(cluster, &previous, key).await?
    };
    crate::metrics::session_taken_over(handed.is_some());
    tracing::info!(from = %previous, alive = handed.is_some(), channels = records.len(), "taking a session over from another node");
    let now = Instant::now();
    if let Some(h) = &handed {
        // Channels the previous owner had but had not recorded yet (it records a new one
        // at once, so this is a matter of milliseconds): their rejoin must not start after
        // a gap unawares.
        for topic in h.keys() {
            if !records.iter().any(|(rec, _)| &rec.topic == topic) {
                state
                    .sessions
                    .note_lost(key, Arc::from(topic.as_str()), Lost::Dropped, now);
            }
        }
    }
    for (mut rec, expired) in records {
        let mut lost = expired.then_some(Lost::Expired);
        if let Some(h) = &handed {
            match h.get(&rec.topic) {
                Some(ch) => {
                    rec.acked = ch.acked.clone();
                    if ch.lost {
                        lost = Some(Lost::Dropped);
                    }
                }
                // The previous owner no longer had it: never resume it with a hole.
                None => lost = Some(Lost::Dropped),
            }
        }
        let p = session_store::prepare(state, &rec, |_| false, now).await?;
        if let Some(why) = lost {
            p.r.set_lost(why);
            continue;
        }
        if p.r.lost().is_some() {
            continue;
        }
        // After `acked`, not after what this node routed: a transaction committed before
        // the floor and not yet in the stream (a node started while the streamer was
        // failing over) is routed to it live once published, since it is not in the replay.
        session_store::join_topic(state, &p);
        let routed = session_store::subscribe(state, &p, Some(p.acked));
        match replay(state, cluster, &p, routed).await {
            Ok(Some(frames)) => {
                crate::metrics::session_replayed_from_stream(frames.len());
                p.r.prepend_replay(frames);
            }
            Ok(None) => p.r.set_lost(Lost::Trimmed),
            Err(e) => {
                tracing::warn!(error = %e, "cannot replay a taken-over session from the change stream; it will have to resync");
                p.r.set_lost(Lost::Dropped);
            }
        }
    }
    Ok(())
}

/// Ask `node` to hand `key` over. `None` when it is not there to answer (dead).
async fn ask_hand_over(
    cluster: &Cluster,
    node: &str,
    key: &SessionKey,
) -> Result<Option<HashMap<String, Handed>>, redis::RedisError> {
    let mut c = super::connect(cluster, COMMAND_TIMEOUT + HANDOVER_WAIT).await?;
    let reply = cluster.key(&format!("handed:{}", uuid::Uuid::new_v4().simple()));
    let request = Request {
        id: key.id.to_string(),
        who: key.who.to_string(),
        reply: reply.clone(),
    };
    let body = serde_json::to_string(&request).unwrap_or_default();
    let listeners: i64 = redis::cmd("PUBLISH")
        .arg(handover_channel(cluster, node))
        .arg(body)
        .query_async(&mut c)
        .await?;
    if listeners == 0 {
        return Ok(None);
    }
    let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
        .arg(&reply)
        .arg(HANDOVER_WAIT.as_secs_f64())
        .query_async(&mut c)
        .await?;
    let Some((_, body)) = got else {
        tracing::warn!(
            node,
            "the node that kept a session did not hand it over in time; taking it from its records"
        );
        return Ok(None);
    };
    Ok(serde_json::from_slice(&body).ok())
}

/// Answer hand-over requests addressed to this node, for the server's life.
pub fn spawn_handover(state: Arc<AppState>, cluster: Arc<Cluster>) {
    crate::metrics::describe_cluster_sessions();
    tokio::spawn(async move {
        let channel = handover_channel(&cluster, cluster.node_id());
        loop {
            let mut pubsub = match cluster.client().get_async_pubsub().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "session hand-over listener cannot reach Redis yet");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Err(e) = pubsub.subscribe(&channel).await {
                tracing::debug!(error = %e, "session hand-over listener cannot subscribe yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(request) = serde_json::from_slice::<Request>(msg.get_payload_bytes()) else {
                    tracing::warn!("ignoring a malformed session hand-over request");
                    continue;
                };
                // Each on its own: one waiting for its session's lock holds up no other.
                let (state, cluster) = (state.clone(), cluster.clone());
                tokio::spawn(async move {
                    if let Err(e) = hand_over(&state, &cluster, request).await {
                        tracing::warn!(error = %e, "cannot answer a session hand-over request");
                    }
                });
            }
            tracing::debug!("session hand-over listener lost Redis; reconnecting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Drop this node's copy of a session another node takes over, and tell it what the client
/// surely saw.
async fn hand_over(
    state: &AppState,
    cluster: &Cluster,
    request: Request,
) -> Result<(), redis::RedisError> {
    let key = SessionKey {
        id: Arc::from(request.id.as_str()),
        who: Arc::from(request.who.as_str()),
    };
    let _one = lock_session(&key).await;
    let mut handed: HashMap<String, Handed> = HashMap::new();
    for r in state.sessions.hand_over(&key, Instant::now()) {
        state.hub.unsubscribe(r.id);
        if let Some(k) = TopicKey::from_topic(&r.topic, r.spec.private) {
            state.topics.leave(&k, r.id);
        }
        handed.insert(
            r.topic.to_string(),
            Handed {
                acked: r.acked().to_string(),
                lost: r.lost().is_some(),
            },
        );
    }
    tracing::info!(
        channels = handed.len(),
        "handed a session over to another node"
    );
    let mut c = super::connect(cluster, COMMAND_TIMEOUT).await?;
    let body = serde_json::to_vec(&handed).unwrap_or_default();
    redis::pipe()
        .cmd("RPUSH")
        .arg(&request.reply)
        .arg(body)
        .ignore()
        .cmd("EXPIRE")
        .arg(&request.reply)
        .arg(30)
        .ignore()
        .query_async::<()>(&mut c)
        .await
}

/// The stream entries that may hold changes after `after`, oldest first; `None` when the
/// stream no longer reaches back that far.
async fn read_back(
    cluster: &Cluster,
    after: Position,
) -> Result<Option<Vec<Entry>>, redis::RedisError> {
    let mut c = super::connect(cluster, COMMAND_TIMEOUT).await?;
    let key = cluster.key("changes");
    let mut out: Vec<Entry> = Vec::new();
    let mut upper = "+".to_string();
    loop {
        let v: Value = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg(&upper)
            .arg("-")
            .arg("COUNT")
            .arg(READ_BACK_COUNT)
            .query_async(&mut c)
            .await?;
        let Value::Array(raw) = v else {
            return Ok(None);
        };
        if raw.is_empty() {
            break;
        }
        for r in &raw {
            let Some(e) = parse_entry(r) else {
                tracing::error!(
                    "an entry of the change stream cannot be read; the session will have to resync"
                );
                return Ok(None);
            };
            // Its transaction committed at or before `after`'s commit: everything after
            // is in `out`.
            if e.end <= after.lsn {
                out.reverse();
                return Ok(Some(out));
            }
            upper = format!("({}", e.id);
            out.push(e);
        }
    }
    // The stream's oldest entry: complete only if it is the first ever published, or the
    // one before it ended at or before `after`.
    match out.last() {
        None => Ok(Some(out)),
        Some(oldest) if oldest.prev.is_none_or(|p| p <= after.lsn) => {
            out.reverse();
            Ok(Some(out))
        }
        Some(_) => Ok(None),
    }
}

/// Collects what a private hub and topics deliver to the one channel they hold.
#[derive(Default)]
struct Collector {
    frames: Mutex<Vec<(Position, OutFrame)>>,
}

impl Outbox for Collector {
    fn push(&self, _frame: OutFrame) -> bool {
        // Client broadcasts and presence are not replayed.
        true
    }

    fn push_notice(&self, _frame: OutFrame) -> bool {
        true
    }

    fn push_at(&self, at: Position, _xid: u32, frame: OutFrame) -> bool {
        self.frames
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((at, frame));
        true
    }
}

/// What `p` missed in (acked, floor], rendered as live deliveries would be; `None` when the
/// stream no longer holds it all.
async fn replay(
    state: &AppState,
    cluster: &Cluster,
    p: &Prepared,
    floor: Position,
) -> Result<Option<Vec<(Position, OutFrame)>>, TakeOverError> {
    if floor <= p.acked {
        return Ok(Some(Vec::new()));
    }
    let Some(entries) = read_back(cluster, p.acked).await? else {
        return Ok(None);
    };
    let changes = decode(state, &entries, p.acked, floor).await?;
    if changes.is_empty() {
        return Ok(Some(Vec::new()));
    }
    // A hub and topics holding only this channel: the live path's routing and rendering.
    let collector = Arc::new(Collector::default());
    let hub = Hub::new(state.hub.config().clone());
    if !p.bindings.is_empty() {
        let target = ChannelTarget {
            outbox: collector.clone(),
            framing: Framing::Phoenix(p.vsn),
            topic: p.topic.clone(),
            identity: p.identity.clone(),
            after: Some(p.acked),
        };
        hub.subscribe(p.r.id, target, p.bindings.clone(), || ());
    }
    let topics = Topics::new(0);
    if p.broadcast {
        if let Some(k) = TopicKey::from_topic(&p.topic, p.private) {
            let member = Member {
                outbox: collector.clone(),
                vsn: p.vsn,
                broadcast: true,
                presence: false,
                replayed: None,
            };
            let opts = JoinOptions {
                presence_state: None,
                max_members: None,
            };
            let _ = topics.join(&k, p.r.id, member, opts, || ());
        }
    }
    let mut scratch = walcast_core::hub::DispatchScratch::default();
    let mut routed = Vec::with_capacity(changes.len());
    let mut items = Vec::new();
    for (seq, c) in changes.iter().enumerate() {
        let r = hub.route_owned(c, &mut scratch);
        if !r.is_empty() {
            items.push((seq as u64, c.clone()));
        }
        routed.push(r);
    }
    let mut verdicts: HashMap<u64, crate::wal::checks::ItemOutcome> = HashMap::new();
    if !items.is_empty() {
        let work = crate::wal::checks::LaneWork {
            key: 0,
            identity: p.identity.clone(),
            items,
        };
        let result = crate::wal::checks::run(
            state.authz.clone(),
            Arc::new(Mutex::new(PolicyCache::default())),
            vec![work],
            0,
            state.feeds.rls_deletes(),
        )
        .await;
        verdicts = result
            .lanes
            .into_iter()
            .flat_map(|(_, outcomes, _)| outcomes)
            .collect();
    }
    for (seq, (c, r)) in changes.iter().zip(routed).enumerate() {
        if crate::realtime::broadcast::is_message_row(c) {
            crate::realtime::broadcast::deliver_message_row(&topics, c);
        }
        if r.is_empty() {
            continue;
        }
        use crate::wal::checks::ItemOutcome;
        let access = match verdicts.remove(&(seq as u64)) {
            Some(ItemOutcome::Decided(a)) => a,
            Some(ItemOutcome::Failed { code, .. }) => {
                tracing::info!(%code, "a row-level security check failed while replaying a taken-over session");
                Access::Deny
            }
            Some(ItemOutcome::Unavailable) | None => {
                return Err(TakeOverError::Records(anyhow::anyhow!(
                    "row-level security checks could not run"
                )))
            }
        };
        hub.deliver_routed(c, r, &mut scratch, |_| access.clone());
    }
    let frames = std::mem::take(&mut *collector.frames.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Some(frames))
}

/// The changes of `entries` in (after, through], in commit order.
async fn decode(
    state: &AppState,
    entries: &[Entry],
    after: Position,
    through: Position,
) -> Result<Vec<Arc<Change>>, TakeOverError> {
    let mut types = state
        .types
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut decoder = ChangeDecoder::new();
    let mut out = Vec::new();
    for e in entries {
        for msg in e.rel.iter().chain(e.txn.iter()) {
            let decoded = decoder
                .decode(&types, msg)
                .map_err(|err| anyhow::anyhow!("decoding the change stream: {err}"))?;
            match decoded {
                Decoded::Relation {
                    unresolved_types, ..
                } if !unresolved_types.is_empty() => {
                    let client = state.sql.get().await?;
                    crate::db::catalog::resolve_types(&client, &mut types, &unresolved_types)
                        .await?;
                    decoder.refresh_type_names(&types);
                }
                Decoded::Change(c) => {
                    let at = c.position();
                    if at > after && at <= through {
                        out.push(Arc::new(c));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(out)
}
