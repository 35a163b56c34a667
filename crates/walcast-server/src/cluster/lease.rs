//! The streamer lease: one Redis key says which node streams the slot.
//!
//! ```text
//!  every node, every `poll` (failover/20):   SET walcast:<slot>:lease <node> NX PX ttl
//!  the holder, every `renew` (ttl/3):        extend.lua: PEXPIRE only if the value is still <node>
//!                                            ─▶ may stream until  sent_at + 2/3 ttl   (`until`)
//!  clean shutdown:                           release.lua: DEL only if the value is still <node>
//!  on taking it (acquire.lua):               HSET walcast:<slot>:lease_info node <node> since <ms>
//!  the holder, at each renewal, while its
//!  replication connection is up:             SET walcast:<slot>:streaming <node> PX failover
//!
//!  time ─────────────────────────────────────────────────────────────────────────▶
//!  renew sent ─┬─ until (stop streaming) ─── ttl/3 margin ─── key expires ─── next holder
//! ```
//!
//! Invariants:
//! - `ttl` is 3/4 of `--failover-timeout-secs`, and followers try every 1/20 of it: a dead
//!   holder's key expires and another node holds it within the failover timeout.
//! - A holder stops streaming at `until`, measured from *before* its last successful renewal
//!   was sent, a third of the TTL before the key can expire: it has dropped its replication
//!   connection before anyone else may acquire the lease. A renewal that fails or times out
//!   does not move `until`.
//! - `streaming` says that postgres_changes flow: it exists only while some lease holder has
//!   had its replication connection up within the last `--failover-timeout-secs`. Holding
//!   the lease is not enough (a holder cut from Postgres keeps renewing). Followers read it
//!   and allow one more failover timeout before they call the stream lost (see
//!   [`crate::cluster::changes`]), so a handover or a Redis restarted empty that a streamer
//!   marks again within that time goes unreported.
//! - A holder whose replication connection has not been up for a whole failover timeout
//!   (since it took the lease or last streamed) releases the lease and does not try again
//!   for another failover timeout: a streamer cut from Postgres hands the slot to a node that
//!   can reach it. Nodes that all cannot stream take turns, harmlessly.
//! - This is only the first fence. Publishing checks the lease atomically in the same Lua
//!   script (see [`crate::cluster::changes`]), so a holder that stalled past its lease cannot
//!   publish; and Postgres lets one walsender use the slot at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::link::Link;
use super::Cluster;

/// Whether this node may stream, and until when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Another node (or nobody) holds the lease.
    Follower,
    /// This node holds the lease and may stream until `until` (local monotonic clock).
    Held { until: Instant },
}

impl LeaseState {
    /// Held now.
    pub fn held_now(&self) -> bool {
        matches!(self, LeaseState::Held { until } if *until > Instant::now())
    }
}

/// Timings derived from `--failover-timeout-secs`.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimes {
    pub ttl: Duration,
    pub renew: Duration,
    pub poll: Duration,
    /// How long after a renewal was sent the holder may stream.
    pub valid_for: Duration,
}

impl LeaseTimes {
    pub fn new(failover: Duration) -> LeaseTimes {
        let ttl = failover * 3 / 4;
        LeaseTimes {
            ttl,
            renew: ttl / 3,
            poll: (failover / 20).max(Duration::from_millis(50)),
            valid_for: ttl * 2 / 3,
        }
    }
}

/// KEYS: lease, streaming. ARGV: node, ttl ms, "1" while streaming, streaming ttl ms.
const EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if ARGV[3] == '1' then redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4]) end
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// KEYS: lease, lease_info. ARGV: node, ttl ms. 1 when this node took the lease.
const ACQUIRE: &str = r#"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[2], 'node', ARGV[1], 'since', now)
return 1
"#;

const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The lease key's name.
pub fn lease_key(cluster: &Cluster) -> String {
    cluster.key("lease")
}

/// Who took the lease last, and when (Redis time, ms): `node`, `since`.
pub fn lease_info_key(cluster: &Cluster) -> String {
    cluster.key("lease_info")
}

/// The key that exists while postgres_changes flow (see the module docs).
pub fn streaming_key(cluster: &Cluster) -> String {
    cluster.key("streaming")
}

/// How long `streaming` outlives the last renewal of a holder that streamed.
pub fn streaming_ttl(failover: Duration) -> Duration {
    failover
}

/// Whether this node's replication connection is up: the flag of the replicator the change
/// source is streaming with, if any. Shared by the source (which sets it) and the lease task
/// (which marks the slot as streamed while it is up).
#[derive(Clone, Default)]
pub struct SlotUp(Arc<Mutex<Option<Arc<AtomicBool>>>>);

impl SlotUp {
    /// Follow `flag` (a replicator's streaming flag), or nothing (`None`: not streaming).
    pub fn set(&self, flag: Option<Arc<AtomicBool>>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = flag;
    }

    pub fn is_up(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire))
    }
}

/// Runs the lease until `stop` flips (or `give_up` is set: this node cannot stream, e.g. a
/// definite replication error), then releases it. The receiver follows the state.
pub fn spawn(
    cluster: Arc<Cluster>,
    link: Link,
    give_up: Arc<AtomicBool>,
    slot_up: SlotUp,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<LeaseState>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(LeaseState::Follower);
    let handle = tokio::spawn(async move {
        let times = LeaseTimes::new(cluster.failover_timeout());
        let key = lease_key(&cluster);
        let me = cluster.node_id().to_string();
        let extend = redis::Script::new(EXTEND);
        let acquire = redis::Script::new(ACQUIRE);
        let info_key = lease_info_key(&cluster);
        let streaming_key = streaming_key(&cluster);
        let streaming_ms = streaming_ttl(cluster.failover_timeout()).as_millis() as u64;
        // While held: when the lease was taken, or this node's slot was last seen up.
        let mut streamed_at = Instant::now();
        // After stepping down: no acquisition before this, so another node gets its turn.
        let mut resting_until: Option<Instant> = None;
        loop {
            if *stop.borrow() || give_up.load(Ordering::Acquire) {
                break;
            }
            let held = matches!(*tx.borrow(), LeaseState::Held { .. });
            if !held && resting_until.is_some_and(|t| t > Instant::now()) {
                tokio::select! {
                    _ = tokio::time::sleep(times.poll) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            let sent_at = Instant::now();
            let outcome = async {
                // The node's one Redis link: the lease lives or lapses with what /readyz
                // reports as the node's Redis.
                let mut conn = link.conn().ok_or_else(link_down)?;
                let c = &mut conn;
                let ttl_ms = times.ttl.as_millis() as u64;
                let won: bool = if held {
                    let streaming = if slot_up.is_up() { "1" } else { "0" };
                    let n: i64 = extend
                        .key(&key)
                        .key(&streaming_key)
                        .arg(&me)
                        .arg(ttl_ms)
                        .arg(streaming)
                        .arg(streaming_ms)
                        .invoke_async(c)
                        .await?;
                    n == 1
                } else {
                    let n: i64 = acquire
                        .key(&key)
                        .key(&info_key)
                        .arg(&me)
                        .arg(ttl_ms)
                        .invoke_async(c)
                        .await?;
                    n == 1
                };
                redis::RedisResult::Ok(won)
            };
            match tokio::time::timeout(times.renew, outcome).await {
                Ok(Ok(true)) => {
                    if !held {
                        tracing::info!(node = %me, "took the streamer lease");
                        streamed_at = Instant::now();
                    }
                    tx.send_replace(LeaseState::Held {
                        until: sent_at + times.valid_for,
                    });
                }
                Ok(Ok(false)) => {
                    if held {
                        tracing::warn!(node = %me, "the streamer lease is someone else's now");
                        tx.send_replace(LeaseState::Follower);
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot reach Redis for the streamer lease");
                }
                Err(_) => {
                    tracing::warn!("Redis did not answer for the streamer lease in time");
                }
            }
            // A held lease whose `until` passed is gone for this node (the key may still be
            // there, but it expires before we could use it safely).
            if matches!(*tx.borrow(), LeaseState::Held { until } if until <= Instant::now()) {
                tracing::warn!(node = %me, "could not renew the streamer lease in time; stopped streaming");
                tx.send_replace(LeaseState::Follower);
            }
            // A holder that cannot stream (cut from Postgres, the slot busy) for a whole
            // failover timeout lets the lease go: another node may reach the database.
            if matches!(*tx.borrow(), LeaseState::Held { .. }) {
                if slot_up.is_up() {
                    streamed_at = Instant::now();
                } else if streamed_at.elapsed() > cluster.failover_timeout() {
                    tracing::warn!(node = %me, waited = ?cluster.failover_timeout(), "holding the streamer lease without streaming the slot; letting another node try");
                    tx.send_replace(LeaseState::Follower);
                    release(&cluster, &link).await;
                    resting_until = Some(Instant::now() + cluster.failover_timeout());
                }
            }
            let wait = if matches!(*tx.borrow(), LeaseState::Held { .. }) {
                times.renew.saturating_sub(sent_at.elapsed())
            } else {
                times.poll
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.changed() => {}
            }
        }
        let was_held = matches!(*tx.borrow(), LeaseState::Held { .. });
        tx.send_replace(LeaseState::Follower);
        if was_held {
            release(&cluster, &link).await;
        }
    });
    (rx, handle)
}

/// The error of a command that could not be sent: the link is down.
pub(crate) fn link_down() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "Redis is unreachable (the node's link is down)",
    ))
}

async fn release(cluster: &Cluster, link: &Link) {
    let attempt = async {
        let mut c = link.conn().ok_or_else(link_down)?;
        let n: i64 = redis::Script::new(RELEASE)
            .key(lease_key(cluster))
            .arg(cluster.node_id())
            .invoke_async(&mut c)
            .await?;
        redis::RedisResult::Ok(n)
    };
    match tokio::time::timeout(Duration::from_secs(1), attempt).await {
        Ok(Ok(1)) => tracing::info!("released the streamer lease"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot release the streamer lease; it expires"),
        Err(_) => tracing::warn!("releasing the streamer lease timed out; it expires"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts against a real redis-server: only a free lease is taken (and recorded
    /// with who and when), only its holder extends it, and only a holder that streams marks
    /// the slot as streamed.
    #[tokio::test]
    async fn acquire_extend_and_the_streaming_mark() {
        let redis = walcast_testkit::RedisServer::start().unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let base = c.clone();
        let (acquire, extend) = (redis::Script::new(ACQUIRE), redis::Script::new(EXTEND));
        let take = |node: &'static str| {
            let mut c = base.clone();
            let acquire = acquire.clone();
            async move {
                let n: i64 = acquire
                    .key("lease")
                    .key("info")
                    .arg(node)
                    .arg(5000)
                    .invoke_async(&mut c)
                    .await
                    .unwrap();
                n
            }
        };
        let renew = |node: &'static str, streaming: &'static str| {
            let mut c = base.clone();
            let extend = extend.clone();
            async move {
                let n: i64 = extend
                    .key("lease")
                    .key("streaming")
                    .arg(node)
                    .arg(5000)
                    .arg(streaming)
                    .arg(3000)
                    .invoke_async(&mut c)
                    .await
                    .unwrap();
                n
            }
        };
        assert_eq!(take("a").await, 1);
        assert_eq!(take("b").await, 0, "the lease is a's");
        let info: Vec<(String, String)> = redis::cmd("HGETALL")
            .arg("info")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(info[0], ("node".to_string(), "a".to_string()), "{info:?}");
        let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
        let since: u64 = info[1].1.parse().unwrap();
        assert!(
            since / 1000 <= secs && since / 1000 + 60 > secs,
            "{since} vs {secs}"
        );

        let marked = |c: &mut redis::aio::MultiplexedConnection| {
            let mut c = c.clone();
            async move {
                let v: Option<String> = redis::cmd("GET")
                    .arg("streaming")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                v
            }
        };
        assert_eq!(renew("a", "0").await, 1, "the holder extends");
        assert_eq!(marked(&mut c).await, None, "not streaming: no mark");
        assert_eq!(renew("b", "1").await, 0, "b does not hold the lease");
        assert_eq!(marked(&mut c).await, None, "nor may it mark the slot");
        assert_eq!(renew("a", "1").await, 1);
        assert_eq!(marked(&mut c).await.as_deref(), Some("a"));
        let pttl: i64 = redis::cmd("PTTL")
            .arg("streaming")
            .query_async(&mut c)
            .await
            .unwrap();
        assert!(pttl > 0 && pttl <= 3000, "the mark expires: {pttl}");
    }

    #[test]
    fn a_holder_stops_well_before_its_key_expires() {
        let t = LeaseTimes::new(Duration::from_secs(5));
        assert!(t.valid_for + t.renew <= t.ttl);
        // Dead holder: expiry plus one poll stays within the failover timeout.
        assert!(t.ttl + t.poll <= Duration::from_secs(5));
    }
}
