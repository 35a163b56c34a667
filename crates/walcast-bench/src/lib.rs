//! Load generators and benchmarks for walcast.
//!
//! Binaries: `drain` (decode throughput of `walcast tail`), `pgchanges-latency`,
//! `pgchanges-throughput` and `idle-sockets` (the postgres_changes targets over WebSocket),
//! `broadcast-fanout` (broadcast delivery against a Node.js baseline).
//! The modules below are their shared parts: [`harness`] starts Postgres and the server,
//! [`realtime`] is a lean protocol client, [`rawws`] an allocation-free frame reader,
//! [`writer`] an open-loop commit generator, [`cost`] server CPU per delivery (one node vs a
//! cluster), [`pgchanges`] the subscriber/latency run both
//! postgres_changes binaries share, and [`worker`] the worker processes that hold sockets.

pub mod cost;
pub mod harness;
pub mod pgchanges;
pub mod rawws;
pub mod realtime;
pub mod worker;
pub mod writer;
