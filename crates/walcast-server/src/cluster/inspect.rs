//! What `walcast check --redis-url` reads about a running cluster, without joining it: one
//! connection of its own, read-only commands, every time on Redis's clock.
//!
//! ```text
//!  PING (round trip) · TIME (now, Redis's clock)
//!  ZRANGE walcast:<slot>:nodes WITHSCORES          every node's last heartbeat (ms)
//!  GET + PTTL walcast:<slot>:lease                  who streams, and for how long it may
//!  HGETALL walcast:<slot>:lease_info                who took the lease last, since when
//!  GET + PTTL walcast:<slot>:streaming             whether postgres_changes flow
//!  XLEN + XREVRANGE … COUNT 1 walcast:<slot>:changes  the change stream's length and last entry
//! ```
//!
//! Invariant: nothing here writes to Redis, so checking a live cluster cannot disturb it.

use std::time::{Duration, Instant};

use redis::Value;

use super::Cluster;

/// Why the cluster could not be read.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// The cluster as Redis holds it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// Round trip of one PING.
    pub rtt: Duration,
    /// Redis's clock, ms since the epoch.
    pub now_ms: u64,
    /// Every node that heartbeated recently enough to be remembered: (node, last seen ms).
    pub nodes: Vec<(String, u64)>,
    /// The lease holder and how long its lease has left.
    pub lease: Option<(String, Duration)>,
    /// Who took the lease last, and when (ms since the epoch).
    pub lease_since: Option<(String, u64)>,
    /// The node that last marked the slot as streamed, and how long that mark has left.
    pub streaming: Option<(String, Duration)>,
    /// Entries in the change stream.
    pub stream_len: u64,
    /// The last entry: when it was added (ms since the epoch, from its id) and its commit end.
    pub last_entry: Option<(u64, String)>,
}

impl ClusterView {
    /// Nodes seen within `timeout`, as the registry counts them.
    pub fn live(&self, timeout: Duration) -> Vec<&(String, u64)> {
        let since = self.now_ms.saturating_sub(timeout.as_millis() as u64);
        self.nodes.iter().filter(|(_, at)| *at >= since).collect()
    }

    /// How long ago `at_ms` was, on Redis's clock.
    pub fn ago(&self, at_ms: u64) -> Duration {
        Duration::from_millis(self.now_ms.saturating_sub(at_ms))
    }
}

/// Read the cluster's state; every command together within `timeout`.
pub async fn inspect(cluster: &Cluster, timeout: Duration) -> Result<ClusterView, InspectError> {
    match tokio::time::timeout(timeout, read(cluster, timeout)).await {
        Ok(r) => r,
        Err(_) => Err(InspectError::Timeout(timeout)),
    }
}

async fn read(cluster: &Cluster, timeout: Duration) -> Result<ClusterView, InspectError> {
    let mut c = super::connect(cluster, timeout).await?;
    let start = Instant::now();
    let _: String = redis::cmd("PING").query_async(&mut c).await?;
    let rtt = start.elapsed();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await?;
    let now_ms = secs * 1000 + micros / 1000;

    let nodes: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(cluster.key("nodes"))
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await?;
    let mut nodes: Vec<(String, u64)> = nodes
        .into_iter()
        .map(|(n, at)| (n, at.max(0.0) as u64))
        .collect();
    nodes.sort();

    let lease = holder(&mut c, &super::lease::lease_key(cluster)).await?;
    let streaming = holder(&mut c, &super::lease::streaming_key(cluster)).await?;
    let info: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(super::lease::lease_info_key(cluster))
        .query_async(&mut c)
        .await?;
    let field = |name: &str| info.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let lease_since = match (field("node"), field("since").and_then(|s| s.parse().ok())) {
        (Some(node), Some(since)) => Some((node, since)),
        _ => None,
    };

    let stream = cluster.key("changes");
    let stream_len: u64 = redis::cmd("XLEN").arg(&stream).query_async(&mut c).await?;
    let last: Value = redis::cmd("XREVRANGE")
        .arg(&stream)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut c)
        .await?;
    Ok(ClusterView {
        rtt,
        now_ms,
        nodes,
        lease,
        lease_since,
        streaming,
        stream_len,
        last_entry: last_entry(&last),
    })
}

/// A key's value and time to live (`None` when it does not exist).
async fn holder(
    c: &mut redis::aio::MultiplexedConnection,
    key: &str,
) -> Result<Option<(String, Duration)>, InspectError> {
    let (value, pttl): (Option<String>, i64) = redis::pipe()
        .cmd("GET")
        .arg(key)
        .cmd("PTTL")
        .arg(key)
        .query_async(c)
        .await?;
    Ok(value.map(|v| (v, Duration::from_millis(pttl.max(0) as u64))))
}

/// (ms from the entry id, the `end` field) of XREVRANGE's first entry.
fn last_entry(v: &Value) -> Option<(u64, String)> {
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let Value::Array(entries) = v else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = text(entry.first()?)?;
    let ms = id.split('-').next()?.parse().ok()?;
    let Value::Array(fields) = entry.get(1)? else {
        return None;
    };
    let end = fields
        .chunks(2)
        .find(|p| p.first().and_then(text).as_deref() == Some("end"))
        .and_then(|p| p.get(1).and_then(text))
        .and_then(|hex| u64::from_str_radix(&hex, 16).ok())
        .map(|lsn| format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF))
        .unwrap_or_else(|| "?".into());
    Some((ms, end))
}
