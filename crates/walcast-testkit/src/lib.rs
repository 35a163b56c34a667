//! Test support for walcast: throwaway Postgres clusters and helpers shared by the
//! integration, end-to-end and benchmark code. Dev-only: never a normal dependency.

mod pg;

pub use pg::{connect, ClusterOptions, PgCluster, TestDb};
