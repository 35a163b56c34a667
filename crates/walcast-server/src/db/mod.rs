//! Ordinary SQL to the source database: connection pools ([`sql`]), catalog look-ups
//! ([`catalog`], cached for joins by [`catalog_cache`]), the `realtime` schema migration ([`migrate`]) and the retention of
//! `realtime.messages` ([`retention`]).

pub mod catalog;
pub mod catalog_cache;
pub mod migrate;
pub mod retention;
pub mod sql;
