//! The `walcast` subcommands other than `migrate` (see [`crate::run`]): `serve` wires the
//! server together, `tail` prints decoded changes, `check` diagnoses a database, `demo` runs
//! everything on a throwaway cluster.

pub mod check;
pub mod demo;
pub mod serve;
pub mod tail;
