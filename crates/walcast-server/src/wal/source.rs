//! Turning CLI source arguments into replication settings, and the checks every command
//! runs before streaming.

use anyhow::{Context, Result};
use walcast_replication::ReplicationConfig;

use crate::cli::SourceArgs;

/// Replication settings from the command line.
pub fn replication_config(args: &SourceArgs, application_name: &str) -> Result<ReplicationConfig> {
    let mut cfg = ReplicationConfig::from_url(&args.database_url)
        .context("invalid --database-url / DATABASE_URL")?
        .with_publication(args.publication.clone())
        .with_slot(args.slot.clone())
        .with_temporary_slot(args.temporary_slot)
        .with_create_publication(!args.no_create_publication);
    cfg.application_name = application_name.to_string();
    cfg.recreate_slot = args.recreate_slot;
    Ok(cfg)
}
