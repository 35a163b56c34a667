//! The `walcast` binary's library: command line, the replication pump, the realtime
//! server (HTTP, WebSocket, channels), authorization and metrics.
//!
//! Binaries stay thin: `main.rs` parses the command line and calls [`run`].

pub mod auth;
pub mod authz;
pub mod cli;
pub mod cluster;
pub mod cmd;
pub mod db;
pub mod env_compat;
pub mod feed;
pub mod http;
pub mod metrics;
pub mod realtime;
pub mod state;
pub mod wal;

/// Run one CLI command to completion.
pub async fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        cli::Command::Tail(args) => cmd::tail::run(args).await,
        cli::Command::Serve(args) => cmd::serve::run(*args).await,
        cli::Command::Check(args) => cmd::check::run(args).await,
        cli::Command::Migrate(args) => migrate_command(args).await,
        cli::Command::Demo(args) => cmd::demo::run(args).await,
    }
}

/// `walcast migrate`: apply the realtime schema objects (`sql/`) and say what was done.
async fn migrate_command(args: cli::MigrateArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let cfg = walcast_replication::ReplicationConfig::from_url(&args.database_url)
        .context("invalid --database-url / DATABASE_URL")?;
    let mut client = db::sql::connect(&cfg, "walcast migrate").await?;
    let applied = db::migrate::run(&mut client).await?;
    if applied.files.is_empty() {
        println!("realtime schema up to date");
    } else {
        for f in applied.files {
            println!("applied sql/{f}");
        }
    }
    Ok(())
}
