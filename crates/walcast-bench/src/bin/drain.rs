//! Drain benchmark: how fast does `walcast tail` empty a backlog of single-row commits,
//! compared with `pg_recvlogical` reading the same backlog from its own slot?
//!
//! ```text
//! cargo build --release -p walcast-server -p walcast-bench
//! target/release/drain --rows 1000000 --rounds 3
//! ```
//!
//! One throwaway cluster; one slot per (tool, round) created before the backlog is written,
//! so every run reads exactly the same WAL. Runs alternate (walcast, recvlogical, walcast, …)
//! so drift on the shared machine hits both sides alike. The figure reported is the ratio of
//! the medians: walcast's drain rate over pg_recvlogical's.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use walcast_testkit::{ClusterOptions, PgCluster};

#[derive(Parser)]
struct Opts {
    /// Single-row INSERT transactions in the backlog.
    #[arg(long, default_value_t = 1_000_000)]
    rows: u64,
    /// Runs of each tool.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The walcast binary (defaults to target/release/walcast next to this binary).
    #[arg(long)]
    walcast: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let opts = Opts::parse();
    let walcast = walcast_bench::harness::walcast_binary(opts.walcast.as_deref())?;
    let cluster = PgCluster::start(ClusterOptions {
        settings: vec![
            ("synchronous_commit".into(), "off".into()),
            ("max_wal_size".into(), "4GB".into()),
        ],
        ..Default::default()
    })?;
    let db = cluster.fresh_database().await?;
    let client = db.connect().await?;
    client
        .batch_execute(
            "CREATE TABLE bench (id bigserial PRIMARY KEY, n int8 NOT NULL, body text NOT NULL);
             CREATE PUBLICATION walcast FOR TABLE bench;",
        )
        .await?;
    let mut slots = Vec::new();
    for round in 0..opts.rounds {
        for tool in ["walcast", "recvlogical"] {
            let slot = format!("{tool}_{round}");
            client
                .execute(
                    "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                    &[&slot],
                )
                .await?;
            slots.push((tool, slot));
        }
    }
    eprintln!("writing {} single-row commits…", opts.rows);
    let t = Instant::now();
    // A procedure may COMMIT inside its loop only when CALLed as its own statement (a
    // multi-statement query string is one implicit transaction).
    client
        .batch_execute(
            "CREATE PROCEDURE fill(n int8) LANGUAGE plpgsql AS $$
             BEGIN
               FOR i IN 1..n LOOP
                 INSERT INTO bench (n, body) VALUES (i, 'row number ' || i);
                 COMMIT;
               END LOOP;
             END $$",
        )
        .await?;
    client
        .execute("CALL fill($1)", &[&(opts.rows as i64)])
        .await?;
    let end_lsn: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    eprintln!(
        "backlog written in {:.1}s, end lsn {end_lsn}",
        t.elapsed().as_secs_f64()
    );

    let mut walcast_secs = Vec::new();
    let mut recv_secs = Vec::new();
    for (tool, slot) in &slots {
        let t = Instant::now();
        let status = if *tool == "walcast" {
            Command::new(&walcast)
                .args([
                    "tail",
                    "--exit-when-caught-up",
                    "--publication",
                    "walcast",
                    "--slot",
                ])
                .arg(slot)
                .args(["--database-url", db.url()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .status()?
        } else {
            Command::new(cluster.bin_dir().join("pg_recvlogical"))
                .args(["--start", "--no-loop", "-f", "/dev/null", "-S", slot])
                .args(["-o", "proto_version=1", "-o", "publication_names=walcast"])
                .arg(format!("--endpos={end_lsn}"))
                .args(["-d", db.url()])
                .stdout(Stdio::null())
                .status()?
        };
        let secs = t.elapsed().as_secs_f64();
        if !status.success() {
            bail!("{tool} on {slot} failed: {status}");
        }
        eprintln!(
            "{tool:<12} {slot:<14} {secs:7.2}s  {:>9.0} commits/s",
            opts.rows as f64 / secs
        );
        if *tool == "walcast" {
            walcast_secs.push(secs);
        } else {
            recv_secs.push(secs);
        }
    }
    let (w, r) = (median(&mut walcast_secs), median(&mut recv_secs));
    println!(
        "drain of {} single-row commits: walcast {:.0}/s (median {:.2}s), pg_recvlogical {:.0}/s (median {:.2}s), ratio walcast/pg_recvlogical = {:.2}",
        opts.rows,
        opts.rows as f64 / w,
        w,
        opts.rows as f64 / r,
        r,
        r / w
    );
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
