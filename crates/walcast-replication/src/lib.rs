//! Logical replication connection on postgres-protocol and tokio.
