//! Load generators and benchmarks for walcast.
//!
//! Binaries: `drain` (decode throughput of `walcast tail`), `pgchanges-latency`,
//! `pgchanges-throughput` and `idle-sockets` (the postgres_changes targets over WebSocket).
//! The modules below are their shared parts: [`harness`] starts Postgres and the server,
//! [`realtime`] is a lean protocol client, [`writer`] an open-loop commit generator and
//! [`pgchanges`] the subscriber/latency run both postgres_changes binaries share.

pub mod harness;
pub mod pgchanges;
pub mod realtime;
pub mod writer;
