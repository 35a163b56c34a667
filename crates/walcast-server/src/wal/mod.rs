//! From the write-ahead log to the hub: the replication settings ([`source`]), the pump that
//! decodes, authorizes and hands changes on ([`pump`]), and the slot's health gauges
//! ([`slot_metrics`]).

pub mod pump;
pub mod slot_metrics;
pub mod source;
