//! Presence across nodes: a state-based CRDT keyed by node, in the manner of Phoenix's
//! tracker. Each node owns its entries of a topic; the others hold a copy they replace
//! wholesale whenever the owner publishes, and drop when the owner goes silent.
//!
//! ```text
//!  node A: track/untrack/leave ─▶ Topics (own entries, ids < 2^63) ─▶ presence_changed
//!     ─▶ bus: P{origin A, [(A's member id, key, meta with A's phx_ref), …]} ─▶ Redis
//!  node B: P from A ─▶ Topics::merge_node(topic, A, entries)
//!     replace A's entries (B-side ids ≥ 2^63) ─▶ one presence_diff (joins + leaves) to B's members
//!  B's registry: A missing from the live set ─▶ Topics::drop_node(A) ─▶ leaves
//!  B (re)subscribes a topic ─▶ S{origin B} ─▶ every node answers with its P for the topic
//! ```
//!
//! Invariants:
//! - Only the owner changes its entries; a P carries the owner's whole state of the topic,
//!   so applying it is idempotent and the latest one wins (one publisher connection per
//!   node keeps a node's messages in order).
//! - Metas keep the owner's `phx_ref`, so a leave seen on any node names the same ref as
//!   the join did.
//! - A node holds others' entries only for topics with local members (nobody else would see
//!   them); a joiner's `presence_state` has what the node held at that moment, and entries
//!   of other nodes that arrive with the sync answers come as `presence_diff` joins.

use walcast_core::broadcast::{TopicKey, Topics};

use super::bus::Envelope;
use super::Cluster;

/// This node's presence state of `key`, as the others merge it.
pub fn own_state(cluster: &Cluster, topics: &Topics, key: &TopicKey) -> Envelope {
    Envelope::Presence {
        origin: cluster.node_id().to_owned(),
        entries: topics.local_presence(key),
    }
}
