//! The `walcast` binary's library: command line, the replication pump, the realtime
//! server (HTTP, WebSocket, channels), authorization and metrics.
//!
//! Binaries stay thin: `main.rs` parses the command line and calls [`run`].

pub mod auth;
pub mod broadcast;
pub mod broadcast_api;
pub mod catalog;
pub mod changes;
pub mod check;
pub mod cli;
pub mod demo;
pub mod env_compat;
pub mod http;
pub mod listener;
pub mod metrics;
pub mod migrate;
pub mod outbox;
pub mod private;
pub mod pump;
pub mod rls;
pub mod serve;
pub mod slot_metrics;
pub mod socket;
pub mod source;
pub mod sql;
pub mod state;
pub mod tail;

/// Run one CLI command to completion.
pub async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Tail(args) => tail::run(args).await,
        cli::Command::Serve(args) => serve::run(*args).await,
        cli::Command::Check(args) => check::run(args).await,
        cli::Command::Migrate(args) => migrate_command(args).await,
        cli::Command::Demo(args) => demo::run(args).await,
    }
}

/// `walcast migrate`: apply the realtime schema objects (`sql/`) and say what was done.
async fn migrate_command(args: cli::MigrateArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = walcast_replication::ReplicationConfig::from_url(&args.database_url)
        .context("invalid --database-url / DATABASE_URL")?;
    let mut client = sql::connect(&cfg, "walcast migrate").await?;
    let applied = migrate::run(&mut client).await?;
    if applied.files.is_empty() {
        println!("realtime schema up to date");
    } else {
        for f in applied.files {
            println!("applied sql/{f}");
        }
    }
    Ok(())
}
