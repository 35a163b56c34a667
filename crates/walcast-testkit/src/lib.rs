//! Test support for walcast: throwaway Postgres clusters, a fault-injecting TCP proxy and
//! helpers shared by the integration, end-to-end and benchmark code. Dev-only: never a normal
//! dependency.

mod pg;
pub mod proxy;

pub use pg::{connect, ClusterOptions, PgCluster, StopMode, TestDb};
pub use proxy::{FaultProxy, ProxyStats};
