//! From the write-ahead log to the hub: the replication settings ([`source`]), the pump that
//! decodes, authorizes and hands changes on ([`pump`]) through per-identity [`lanes`] and
//! authorization batches ([`checks`]), and the slot's health gauges ([`slot_metrics`]).

pub mod checks;
pub mod lanes;
pub mod pump;
pub mod slot_metrics;
pub mod source;
