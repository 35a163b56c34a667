//! Node registry: every node heartbeats into one sorted set, and the live set is the nodes
//! seen within `--presence-node-timeout-secs`. A node that drops out of the live set loses
//! its presence entries on every other node.
//!
//! ```text
//!  every timeout/3:  EVALSHA heartbeat ─▶ walcast:<slot>:nodes  (ZSET node → last seen, ms)
//!                       TIME (Redis's clock: no skew between nodes)
//!                       ZADD self now; ZREMRANGEBYSCORE < now − 10·timeout (forget old nodes)
//!                       ZRANGEBYSCORE ≥ now − timeout ──▶ live set ──▶ size, drop silent nodes
//! ```
//!
//! Invariants:
//! - Only Redis's clock stamps heartbeats, so nodes with skewed clocks agree on who is live.
//! - This node always counts itself live. Presence of a node outside the live set is dropped
//!   (with leaves to local members); so is every other node's presence once Redis has been
//!   unreachable for longer than the timeout, since nothing can vouch for them any more.
//!   The re-sync when Redis is back brings the live ones back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use walcast_core::broadcast::Topics;

use super::link::Link;
use super::Cluster;

const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
return redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
"#;

/// The live set, as the last heartbeat saw it.
#[derive(Default)]
pub struct Registry {
    live: Mutex<Vec<String>>,
}

impl Registry {
    /// Live nodes, this one included (just this one before the first heartbeat).
    pub fn live(&self) -> Vec<String> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Cluster size: live nodes, at least 1 (this node).
    pub fn size(&self) -> usize {
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
            .max(1)
    }

    fn set(&self, live: Vec<String>) {
        crate::metrics::cluster_nodes(live.len().max(1));
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = live;
    }

    /// Start heartbeating for this node.
    pub fn start(cluster: Arc<Cluster>, link: Link, topics: Arc<Topics>) -> Arc<Registry> {
        let reg = Arc::new(Registry::default());
        reg.set(vec![cluster.node_id().to_owned()]);
        tokio::spawn(run(reg.clone(), cluster, link, topics));
        reg
    }
}

/// How often to heartbeat: a third of the timeout, so a live node is never missed twice.
pub fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 3).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

async fn run(reg: Arc<Registry>, cluster: Arc<Cluster>, link: Link, topics: Arc<Topics>) {
    let timeout = cluster.presence_node_timeout();
    let every = heartbeat_interval(timeout);
    let script = redis::Script::new(HEARTBEAT);
    let key = cluster.key("nodes");
    let me = cluster.node_id().to_owned();
    let mut last_ok = Instant::now();
    loop {
        let beat = match link.conn() {
            Some(mut conn) => tokio::time::timeout(
                Duration::from_secs(2),
                script
                    .key(&key)
                    .arg(&me)
                    .arg(timeout.as_millis() as u64)
                    .arg(timeout.as_millis() as u64 * 10)
                    .invoke_async::<Vec<String>>(&mut conn),
            )
            .await
            .map_err(|_| "heartbeat timed out".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string())),
            None => Err("Redis is down".to_owned()),
        };
        let live = match beat {
            Ok(mut live) => {
                last_ok = Instant::now();
                if !live.contains(&me) {
                    live.push(me.clone());
                }
                live.sort();
                Some(live)
            }
            Err(e) => {
                tracing::debug!(error = ?e, "cluster heartbeat failed");
                // Nobody can vouch for the others once Redis has been gone this long.
                (last_ok.elapsed() > timeout).then(|| vec![me.clone()])
            }
        };
        if let Some(live) = live {
            let set: HashSet<&str> = live.iter().map(String::as_str).collect();
            for node in topics.remote_nodes() {
                if !set.contains(&*node) {
                    let n = topics.drop_node(&node);
                    tracing::info!(node = %node, entries = n, "cluster: node is silent; its presences left");
                }
            }
            let before = reg.size();
            if before != live.len() {
                tracing::info!(nodes = live.len(), "cluster size changed");
            }
            reg.set(live);
        }
        tokio::time::sleep(every).await;
    }
}
