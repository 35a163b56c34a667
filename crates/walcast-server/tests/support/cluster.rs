//! Cluster-mode nodes for the integration tests: `walcast serve` processes sharing one real
//! `redis-server`, one Postgres and one slot name.

use std::time::{Duration, Instant};

use super::server::{Options, Server};

/// One node `id` of the cluster on `redis_url`, with a short failover timeout so tests see
/// take-overs quickly, plus `extra` arguments. Not waited on: see [`until_ready`].
pub async fn node(db_url: &str, slot: &str, redis_url: &str, id: &str, extra: &[&str]) -> Server {
    let mut args = vec![
        "--redis-url",
        redis_url,
        "--node-id",
        id,
        "--failover-timeout-secs",
        "2",
    ];
    args.extend_from_slice(extra);
    Server::start_serving(db_url, slot, Options::default().args(&args)).await
}

/// `n` nodes named `node0`… on `redis`, each ready (one streams the slot, the others follow
/// the change stream).
pub async fn nodes(
    db_url: &str,
    slot: &str,
    redis: &walcast_testkit::RedisServer,
    n: usize,
) -> Vec<Server> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(node(db_url, slot, &redis.url(), &format!("node{i}"), &[]).await);
    }
    for s in &out {
        until_ready(s).await;
    }
    out
}

/// Waits (up to 30 s) for `/readyz` to answer 200.
pub async fn until_ready(s: &Server) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok((200, _)) = s.get("/readyz").await {
            return;
        }
        assert!(Instant::now() < deadline, "node not ready:\n{}", s.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node's role (`streamer` or `follower`) from a ready `/readyz`; `None` while not ready.
pub async fn role(s: &Server) -> Option<String> {
    let (status, body) = s.get("/readyz").await.ok()?;
    if status != 200 {
        return None;
    }
    body.lines()
        .find_map(|l| l.strip_prefix("role: "))
        .map(str::to_string)
}
