//! Ordinary SQL to the source database: connection pools ([`sql`]), catalog look-ups
//! ([`catalog`]) and the `realtime` schema migration ([`migrate`]).

pub mod catalog;
pub mod migrate;
pub mod sql;
