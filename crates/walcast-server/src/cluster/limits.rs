//! Per-client rate limits across nodes: `--max-joins-per-second-per-client` and
//! `--max-http-broadcasts-per-second-per-client` count a client's units on every node, not
//! only on the one it reached, without a Redis round trip per join or broadcast.
//!
//! ```text
//!  check(client, second, n)  (in memory, on the node's own path, after its local limits)
//!     others(client) + taken here(client) + n > share ─▶ refused (the client is over)
//!     else taken here += n, unreported += n
//!  every FLUSH_EVERY, one pipeline for the clients with unreported units:
//!     INCRBY walcast:<slot>:rate:<limit>:<unix second>:<client> unreported ; EXPIRE 5
//!     ─▶ the cluster's total ─▶ others(client) = total − what this node reported
//! ```
//!
//! Invariants:
//! - Never a Redis round trip on the join or broadcast path: `check` reads memory only.
//! - A node learns the others' units for a client once it reported some of its own for
//!   that second (the reply carries the total): the cluster may overshoot a client's share
//!   by what the other nodes let through before their next flush (one flush interval each),
//!   never by more. The per-node limits still hold on their own.
//! - Windows are Redis keys per wall-clock second (nodes' clocks agree to well within one),
//!   expiring after a few seconds: memory in Redis is bounded by the clients active in the
//!   last seconds. Redis down: the per-node limits alone apply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Cluster;

/// How often a node reports its units and learns the others'.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A window's key outlives its second by this much.
const KEY_TTL_SECS: u64 = 5;

#[derive(Debug, Default, Clone, Copy)]
struct Share {
    /// Units this node took for the client in the current second.
    taken: u32,
    /// Of those, not yet reported to Redis.
    unreported: u32,
    /// Reported to Redis by this node in the current second.
    reported: u32,
    /// Units the other nodes took, as the last report's total said.
    others: u32,
}

#[derive(Debug, Default)]
struct Window {
    second: u64,
    clients: HashMap<Arc<str>, Share>,
}

/// One per-client limit, counted across the cluster.
#[derive(Debug)]
pub struct ClusterShares {
    cluster: Arc<Cluster>,
    /// Names the limit in its Redis keys (`joins`, `http_broadcasts`).
    limit: &'static str,
    per_client: u32,
    window: Mutex<Window>,
}

impl ClusterShares {
    pub fn new(cluster: Arc<Cluster>, limit: &'static str, per_client: u32) -> ClusterShares {
        ClusterShares {
            cluster,
            limit,
            per_client: per_client.max(1),
            window: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Take `n` units for `client` in wall-clock second `second`; false when the cluster
    /// already took the client's share.
    pub fn check(&self, client: &Arc<str>, second: u64, n: u32) -> bool {
        let mut w = self.lock();
        if second > w.second {
            w.second = second;
            w.clients.clear();
        }
        // A second before the current one (a clock stepped back) counts in the current.
        let per_client = self.per_client;
        let s = w.clients.entry(client.clone()).or_default();
        let total = s.others.saturating_add(s.taken).saturating_add(n);
        if total > per_client {
            return false;
        }
        s.taken += n;
        s.unreported += n;
        true
    }

    fn key(&self, second: u64, client: &str) -> String {
        self.cluster
            .key(&format!("rate:{}:{second}:{client}", self.limit))
    }

    /// Report the units not yet reported and learn the cluster's totals for every client
    /// active here this second: one pipeline.
    pub async fn flush(
        &self,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> redis::RedisResult<()> {
        let (second, batch): (u64, Vec<(Arc<str>, u32)>) = {
            let mut w = self.lock();
            let second = w.second;
            let batch = w
                .clients
                .iter_mut()
                .filter(|(_, s)| s.taken > 0)
                .map(|(c, s)| {
                    let n = std::mem::take(&mut s.unreported);
                    s.reported += n;
                    (c.clone(), n)
                })
                .collect();
            (second, batch)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (client, n) in &batch {
            let key = self.key(second, client);
            if *n > 0 {
                pipe.cmd("INCRBY")
                    .arg(&key)
                    .arg(*n)
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(KEY_TTL_SECS)
                    .ignore();
            } else {
                pipe.cmd("GET").arg(&key);
            }
        }
        let totals: Vec<Option<i64>> = pipe.query_async(conn).await?;
        let mut w = self.lock();
        if w.second != second {
            // The second turned while the pipeline ran: its totals no longer matter.
            return Ok(());
        }
        for ((client, _), total) in batch.iter().zip(totals) {
            if let Some(s) = w.clients.get_mut(client) {
                let total = u32::try_from(total.unwrap_or(0).max(0)).unwrap_or(u32::MAX);
                s.others = total.saturating_sub(s.reported);
            }
        }
        Ok(())
    }

    /// Flush every [`FLUSH_EVERY`] for the server's life; Redis trouble is retried (the
    /// per-node limits hold meanwhile).
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut conn: Option<redis::aio::MultiplexedConnection> = None;
            loop {
                tick.tick().await;
                let c = match &mut conn {
                    Some(c) => c,
                    None => match super::connect(&me.cluster, Duration::from_secs(2)).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            tracing::debug!(error = %e, "cluster rate limits cannot reach Redis; per-node limits apply");
                            continue;
                        }
                    },
                };
                if let Err(e) = me.flush(c).await {
                    tracing::debug!(error = %e, "cannot report rate-limit units to Redis; per-node limits apply");
                    conn = None;
                }
            }
        });
    }
}

/// The per-client limits counted across the cluster.
#[derive(Debug)]
pub struct ClusterLimits {
    pub joins: Arc<ClusterShares>,
    pub http_broadcasts: Arc<ClusterShares>,
}

impl ClusterLimits {
    /// Start counting joins and HTTP broadcasts across nodes, with these per-client shares.
    pub fn start(cluster: Arc<Cluster>, joins: u32, http_broadcasts: u32) -> ClusterLimits {
        let joins = Arc::new(ClusterShares::new(cluster.clone(), "joins", joins));
        let http_broadcasts = Arc::new(ClusterShares::new(
            cluster,
            "http_broadcasts",
            http_broadcasts,
        ));
        joins.spawn();
        http_broadcasts.spawn();
        ClusterLimits {
            joins,
            http_broadcasts,
        }
    }
}

/// The current wall-clock second.
pub fn second_now() -> u64 {
    u64::try_from(crate::state::now_unix()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ClusterArgs;

    fn cluster(url: &str, node: &str) -> Arc<Cluster> {
        let args = ClusterArgs {
            redis_url: Some(url.to_string()),
            node_id: Some(node.to_string()),
            failover_timeout_secs: 5,
            presence_node_timeout_secs: 15,
        };
        Cluster::from_args(&args, "limits").unwrap().unwrap()
    }

    /// Two nodes on a real redis-server: a client's joins on one count on the other once
    /// reported, within a second; the next second starts afresh; another client is not
    /// affected.
    #[tokio::test]
    async fn a_clients_share_is_counted_across_nodes() {
        let redis = walcast_testkit::RedisServer::start().unwrap();
        let a = ClusterShares::new(cluster(&redis.url(), "a"), "joins", 4);
        let b = ClusterShares::new(cluster(&redis.url(), "b"), "joins", 4);
        let client = redis::Client::open(redis.url()).unwrap();
        let mut ca = client.get_multiplexed_async_connection().await.unwrap();
        let mut cb = client.get_multiplexed_async_connection().await.unwrap();
        let alice: Arc<str> = Arc::from("sub:alice");
        let bob: Arc<str> = Arc::from("sub:bob");
        let s = 1_000;
        // Alice takes 3 on A, which reports them.
        for _ in 0..3 {
            assert!(a.check(&alice, s, 1));
        }
        a.flush(&mut ca).await.unwrap();
        // B has not heard of Alice this second: it lets one through (the overshoot bounded
        // by one flush interval), reports it and learns the cluster's total of 4.
        assert!(b.check(&alice, s, 1));
        b.flush(&mut cb).await.unwrap();
        assert!(!b.check(&alice, s, 1), "B counts A's units");
        // A learns B's unit at its next flush, though it has nothing new to report.
        a.flush(&mut ca).await.unwrap();
        assert!(!a.check(&alice, s, 1), "A counts B's unit");
        assert!(b.check(&bob, s, 4), "another client has its own share");
        // The next second starts afresh on both.
        assert!(a.check(&alice, s + 1, 2));
        a.flush(&mut ca).await.unwrap();
        assert!(b.check(&alice, s + 1, 1));
        b.flush(&mut cb).await.unwrap();
        assert!(b.check(&alice, s + 1, 1));
        assert!(
            !b.check(&alice, s + 1, 1),
            "2 on A and 2 on B: the share of 4"
        );
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("walcast:limits:rate:joins:*")
            .query_async(&mut ca)
            .await
            .unwrap();
        assert!(!keys.is_empty());
        let ttl: i64 = redis::cmd("TTL")
            .arg(&keys[0])
            .query_async(&mut ca)
            .await
            .unwrap();
        assert!(
            ttl > 0 && ttl <= KEY_TTL_SECS as i64,
            "windows expire: {ttl}"
        );
    }
}
