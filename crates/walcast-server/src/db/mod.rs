//! Ordinary SQL to the source database: connection pools ([`sql`]), catalog look-ups
//! ([`catalog`]), the `realtime` schema migration ([`migrate`]) and the retention of
//! `realtime.messages` ([`retention`]).

pub mod catalog;
pub mod migrate;
pub mod retention;
pub mod sql;
