//! The streamer lease: one Redis key says which node streams the slot.
//!
//! ```text
//!  every node, every `poll` (failover/20):   SET walcast:<slot>:lease <node> NX PX ttl
//!  the holder, every `renew` (ttl/3):        extend.lua: PEXPIRE only if the value is still <node>
//!                                            ─▶ may stream until  sent_at + 2/3 ttl   (`until`)
//!  clean shutdown:                           release.lua: DEL only if the value is still <node>
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
//! - This is only the first fence. Publishing checks the lease atomically in the same Lua
//!   script (see [`crate::cluster::changes`]), so a holder that stalled past its lease cannot
//!   publish; and Postgres lets one walsender use the slot at a time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

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

const EXTEND: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
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

/// Runs the lease until `stop` flips (or `give_up` is set: this node cannot stream, e.g. a
/// definite replication error), then releases it. The receiver follows the state.
pub fn spawn(
    cluster: Arc<Cluster>,
    give_up: Arc<AtomicBool>,
    mut stop: watch::Receiver<bool>,
) -> (watch::Receiver<LeaseState>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(LeaseState::Follower);
    let handle = tokio::spawn(async move {
        let times = LeaseTimes::new(cluster.failover_timeout());
        let key = lease_key(&cluster);
        let me = cluster.node_id().to_string();
        let extend = redis::Script::new(EXTEND);
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        loop {
            if *stop.borrow() || give_up.load(Ordering::Acquire) {
                break;
            }
            let held = matches!(*tx.borrow(), LeaseState::Held { .. });
            let sent_at = Instant::now();
            let outcome = async {
                let c = match conn.as_mut() {
                    Some(c) => c,
                    None => conn.insert(super::connect(&cluster, times.renew).await?),
                };
                let ttl_ms = times.ttl.as_millis() as u64;
                let won: bool = if held {
                    let n: i64 = extend
                        .key(&key)
                        .arg(&me)
                        .arg(ttl_ms)
                        .invoke_async(c)
                        .await?;
                    n == 1
                } else {
                    let v: Option<String> = redis::cmd("SET")
                        .arg(&key)
                        .arg(&me)
                        .arg("NX")
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async(c)
                        .await?;
                    v.is_some()
                };
                redis::RedisResult::Ok(won)
            };
            match tokio::time::timeout(times.renew, outcome).await {
                Ok(Ok(true)) => {
                    if !held {
                        tracing::info!(node = %me, "took the streamer lease");
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
                    conn = None;
                }
                Err(_) => {
                    tracing::warn!("Redis did not answer for the streamer lease in time");
                    conn = None;
                }
            }
            // A held lease whose `until` passed is gone for this node (the key may still be
            // there, but it expires before we could use it safely).
            if matches!(*tx.borrow(), LeaseState::Held { until } if until <= Instant::now()) {
                tracing::warn!(node = %me, "could not renew the streamer lease in time; stopped streaming");
                tx.send_replace(LeaseState::Follower);
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
            release(&cluster, conn).await;
        }
    });
    (rx, handle)
}

async fn release(cluster: &Cluster, conn: Option<redis::aio::MultiplexedConnection>) {
    let attempt = async {
        let mut c = match conn {
            Some(c) => c,
            None => super::connect(cluster, Duration::from_secs(1)).await?,
        };
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

    #[test]
    fn a_holder_stops_well_before_its_key_expires() {
        let t = LeaseTimes::new(Duration::from_secs(5));
        assert!(t.valid_for + t.renew <= t.ttl);
        // Dead holder: expiry plus one poll stays within the failover timeout.
        assert!(t.ttl + t.poll <= Duration::from_secs(5));
    }
}
