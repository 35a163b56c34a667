//! The fault-injection suite's harness (the scenarios are in `tests/`): a dedicated Postgres
//! per scenario with a [`walcast_testkit::FaultProxy`] in front of it, the real `walcast`
//! binary, subscribers running the official client (Node, `node/subscriber.mjs`), a writer
//! committing at a steady rate, and the checks and report every scenario ends with.
//!
//! See tests/faults/README.md for what each scenario does and the knobs.

pub mod check;
pub mod clock;
pub mod http;
pub mod knobs;
pub mod paths;
pub mod rawws;
pub mod readyz;
pub mod report;
pub mod scenario;
pub mod schema;
pub mod server;
pub mod subscriber;
pub mod token;
pub mod writer;

pub use check::{Completeness, Expect, Loss};
pub use scenario::{Options, Scenario};
