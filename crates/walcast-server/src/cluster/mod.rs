//! Cluster mode: several walcast nodes over one Redis (`--redis-url`), any node serving any
//! client. Redis is an adapter at the server's edge: the hub, topics and presence of each
//! node stay local, and this module carries between nodes what they must share.
//!
//! ```text
//!                 ┌──────────── Redis (keys under `walcast:<slot>:`) ────────────┐
//!  node A         │                                                              │   node B
//!  (streamer) slot ─▶ pump ─┬─▶ own hub                                         │
//!                           └─▶ change stream (one entry per transaction) ───────┼─▶ pump ─▶ own hub
//!  lease: held by the streamer, renewed well within --failover-timeout-secs      │
//!  broadcast ─▶ own topic + publish on the topic's channel ──────────────────────┼─▶ own topic (only
//!                                                                                │   topics with local members)
//!  presence: each node owns its entries (keyed by node), others merge them ◀─────┼─▶ and drop a node's
//!                                                                                │   entries once it is silent
//!  node registry: heartbeats, cluster size ◀─────────────────────────────────────┘
//! ```
//!
//! Invariants every part keeps:
//! - One streamer: only the lease holder streams the slot, and it stops streaming before its
//!   lease can expire; Postgres's one active consumer per slot backs this up.
//! - The slot's confirmed position moves only past transactions already published.
//! - Every node, the streamer included, routes changes to its own sockets and runs
//!   row-level security for its own subscribers; positions drop what a node already routed.
//! - Without Redis a node keeps serving its own sockets and says so on `/readyz`.

pub mod bus;
pub mod link;
pub mod node;
pub mod nodes;
pub mod presence;
pub mod sessions;

pub use node::ClusterNode;

use std::sync::Arc;
use std::time::Duration;

use crate::cli::ClusterArgs;

pub mod changes;
pub mod lease;
pub mod limits;

pub mod inspect;

/// A fresh multiplexed connection whose commands give up after `timeout` (each caller
/// reconnects after an error: no hidden retries that would outlast a lease). Only for what
/// cannot share the node's [`link::Link`]: the change stream's blocking read, and
/// `walcast check`, which is no node.
pub(crate) async fn connect(
    cluster: &Cluster,
    timeout: Duration,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    cluster
        .client()
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Why cluster mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `--redis-url` does not parse: fix the configuration.
    #[error("invalid --redis-url / REDIS_URL: {0}")]
    InvalidUrl(String),
}

/// This node's view of the cluster: who it is, where Redis is, and the key namespace.
#[derive(Debug)]
pub struct Cluster {
    node_id: Arc<str>,
    prefix: String,
    client: redis::Client,
    failover_timeout: Duration,
    presence_node_timeout: Duration,
}

impl Cluster {
    /// `None` without `--redis-url`. Keys are namespaced by the slot name: nodes of one
    /// cluster share a slot, and two clusters may share a Redis.
    pub fn from_args(args: &ClusterArgs, slot: &str) -> Result<Option<Arc<Cluster>>, ClusterError> {
        let Some(url) = args.redis_url.as_deref().filter(|u| !u.trim().is_empty()) else {
            return Ok(None);
        };
        let client =
            redis::Client::open(url.trim()).map_err(|e| ClusterError::InvalidUrl(e.to_string()))?;
        let node_id: Arc<str> = match args.node_id.as_deref().map(str::trim) {
            Some(id) if !id.is_empty() => id.into(),
            _ => default_node_id().into(),
        };
        Ok(Some(Arc::new(Cluster {
            node_id,
            prefix: format!("walcast:{slot}:"),
            client,
            failover_timeout: Duration::from_secs(args.failover_timeout_secs.max(1)),
            presence_node_timeout: Duration::from_secs(args.presence_node_timeout_secs.max(1)),
        })))
    }

    /// This node's id, unique per process run.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// A key in this cluster's namespace: `walcast:<slot>:<name>`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The Redis client (new connections: multiplexed commands, pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// `--failover-timeout-secs`.
    pub fn failover_timeout(&self) -> Duration {
        self.failover_timeout
    }

    /// `--presence-node-timeout-secs`.
    pub fn presence_node_timeout(&self) -> Duration {
        self.presence_node_timeout
    }
}

/// Host name, process id and a random suffix: a restarted process is a new node, so its
/// predecessor's presence entries and lease are never mistaken for its own.
fn default_node_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "walcast".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &suffix[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: Option<&str>, node: Option<&str>) -> ClusterArgs {
        ClusterArgs {
            redis_url: url.map(str::to_string),
            node_id: node.map(str::to_string),
            failover_timeout_secs: 5,
            presence_node_timeout_secs: 15,
        }
    }

    #[test]
    fn no_url_means_single_process() {
        assert!(Cluster::from_args(&args(None, None), "walcast")
            .unwrap()
            .is_none());
        assert!(Cluster::from_args(&args(Some("  "), None), "walcast")
            .unwrap()
            .is_none());
    }

    #[test]
    fn keys_are_namespaced_by_slot() {
        let c = Cluster::from_args(&args(Some("redis://127.0.0.1:1"), Some("n1")), "s1")
            .unwrap()
            .unwrap();
        assert_eq!(c.node_id(), "n1");
        assert_eq!(c.key("lease"), "walcast:s1:lease");
    }

    #[test]
    fn default_node_ids_differ_per_run() {
        let a = Cluster::from_args(&args(Some("redis://127.0.0.1:1"), None), "s")
            .unwrap()
            .unwrap();
        let b = Cluster::from_args(&args(Some("redis://127.0.0.1:1"), None), "s")
            .unwrap()
            .unwrap();
        assert_ne!(a.node_id(), b.node_id());
        assert!(a.node_id().contains(&std::process::id().to_string()));
    }

    #[test]
    fn a_bad_url_is_a_clear_error() {
        let err = Cluster::from_args(&args(Some("http://nope"), None), "s").unwrap_err();
        assert!(err.to_string().contains("REDIS_URL"), "{err}");
    }
}
