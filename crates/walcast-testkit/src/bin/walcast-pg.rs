//! `walcast-pg`: start a throwaway Postgres cluster for scripts (the end-to-end suites).
//!
//! Prints one line, `DATABASE_URL=postgres://postgres@127.0.0.1:PORT/DB`, once the cluster
//! accepts connections and the database exists, then stays up until its stdin closes or it
//! gets SIGTERM/SIGINT; the cluster directory is removed when it exits.
//!
//! ```text
//! coproc PG { walcast-pg --database e2e; }; read -r line <&"${PG[0]}"; export "$line"
//! ```

use std::io::Read;

use anyhow::Result;
use walcast_testkit::{ClusterOptions, PgCluster};

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let mut database = "walcast".to_string();
    let mut settings = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--database" => database = args.next().unwrap_or(database),
            "--set" => {
                if let Some((k, v)) = args.next().as_deref().and_then(|kv| kv.split_once('=')) {
                    settings.push((k.to_string(), v.to_string()));
                }
            }
            other => anyhow::bail!("unknown argument {other}; usage: walcast-pg [--database NAME] [--set key=value]..."),
        }
    }
    let cluster = PgCluster::start(ClusterOptions {
        settings,
        ..Default::default()
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let admin = walcast_testkit::connect(&cluster.url("postgres")).await?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE \"{}\"",
                database.replace('"', "\"\"")
            ))
            .await?;
        anyhow::Ok(())
    })?;
    println!("DATABASE_URL={}", cluster.url(&database));
    eprintln!(
        "walcast-pg: cluster up on port {} (log {})",
        cluster.port(),
        cluster.log_path().display()
    );
    // Wait for stdin to close (the parent script exiting closes it) or a signal.
    let mut buf = [0u8; 64];
    let mut stdin = std::io::stdin();
    while let Ok(n) = stdin.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    drop(cluster);
    Ok(())
}
