//! Test support for walcast: throwaway Postgres clusters and Redis servers, a fault-injecting
//! TCP proxy and helpers shared by the integration, end-to-end and benchmark code. Dev-only:
//! never a normal dependency.

mod pg;
pub mod proxy;
mod redis;

pub use pg::{connect, ClusterOptions, PgCluster, StopMode, TestDb};
pub use proxy::{FaultProxy, ProxyStats};
pub use redis::RedisServer;
