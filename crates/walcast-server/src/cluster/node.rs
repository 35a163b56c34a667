//! A running cluster node: the Redis link, the registry and the bus, started together, and
//! what `/readyz` says about them.

use std::sync::Arc;

use walcast_core::broadcast::{Body, TopicKey, Topics};

use super::bus::Relay;
use super::link::Link;
use super::nodes::Registry;
use super::Cluster;

/// This node's cluster machinery (cluster mode only).
pub struct ClusterNode {
    pub cluster: Arc<Cluster>,
    /// The shared Redis link (part 2 issues its commands through it as well).
    pub link: Link,
    pub registry: Arc<Registry>,
    relay: Arc<Relay>,
}

impl ClusterNode {
    /// Start linking to Redis, heartbeating and relaying for `topics`.
    pub fn start(cluster: Arc<Cluster>, topics: Arc<Topics>) -> Arc<ClusterNode> {
        let link = Link::start(cluster.client().clone());
        let registry = Registry::start(cluster.clone(), link.clone(), topics.clone());
        let relay = super::bus::start(cluster.clone(), link.clone(), topics);
        Arc::new(ClusterNode {
            cluster,
            link,
            registry,
            relay,
        })
    }

    /// Relay a client or HTTP broadcast to the other nodes (never a database broadcast).
    pub fn relay(&self, key: &TopicKey, body: &Body, stored_id: Option<&str>) {
        self.relay.broadcast(key, body, stored_id);
    }

    /// Whether Redis answers.
    pub fn redis_ok(&self) -> bool {
        self.link.is_up()
    }

    /// Live nodes, this one included.
    pub fn size(&self) -> usize {
        self.registry.size()
    }

    /// One line for `/readyz` and `walcast check`:
    /// `cluster: node=<id> nodes=<n> redis=ok` or `… redis=down (<why>)`.
    pub fn status_line(&self) -> String {
        let redis = if self.redis_ok() {
            "ok".to_owned()
        } else {
            format!(
                "down ({}); serving local sockets only",
                self.link
                    .last_error()
                    .unwrap_or_else(|| "connecting".into())
            )
        };
        format!(
            "cluster: node={} nodes={} redis={redis}",
            self.cluster.node_id(),
            self.size()
        )
    }
}
