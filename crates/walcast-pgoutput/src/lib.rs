//! Sans-IO decoder for the Postgres logical replication stream and the pgoutput plugin.
