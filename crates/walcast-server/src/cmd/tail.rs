//! `walcast tail`: decoded changes as JSON lines on stdout.
//!
//! ```text
//! Replicator ──XLogData──▶ ChangeDecoder ──Change──▶ stdout (one JSON object per line)
//!      ▲                        │ Relation with unknown types
//!      │                        ▼
//!      │                 SQL connection: resolve pg_type rows
//!      └── next recv() = "everything before was printed" → flush may be confirmed
//! ```
//!
//! Invariant: stdout is flushed at every commit before the next `recv`, so the position
//! confirmed to Postgres never runs ahead of what was written.

use std::io::Write;

use anyhow::{Context, Result};
use walcast_core::change::{ChangeDecoder, Decoded};
use walcast_core::pg_type::TypeRegistry;
use walcast_replication::{Lsn, Replicator, StreamEvent};

use crate::cli::TailArgs;
use crate::db::catalog::resolve_types;
use crate::db::sql;
use crate::wal::source::replication_config;

pub async fn run(args: TailArgs) -> Result<()> {
    let cfg = replication_config(&args.source, "walcast tail")?;
    let sql = sql::connect(&cfg, "walcast tail (catalog)").await?;
    let target = if args.exit_when_caught_up {
        let lsn: String = sql
            .query_one("SELECT pg_catalog.pg_current_wal_lsn()::text", &[])
            .await
            .context("reading the current WAL position")?
            .get(0);
        let lsn: Lsn = lsn.parse().context("parsing pg_current_wal_lsn()")?;
        tracing::info!(target_lsn = %lsn, "will exit once caught up");
        Some(lsn)
    } else {
        None
    };

    let mut replicator = Replicator::new(cfg);
    let mut types = TypeRegistry::new();
    let mut decoder = ChangeDecoder::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let mut printed: u64 = 0;

    let shutdown = tokio::signal::ctrl_c();
    tokio::pin!(shutdown);
    loop {
        let event = tokio::select! {
            ev = replicator.recv() => ev,
            _ = &mut shutdown => {
                tracing::info!("interrupted");
                break;
            }
        };
        let Some(event) = event else { break };
        match event? {
            StreamEvent::XLogData(x) => match decoder.decode(&types, &x.data)? {
                Decoded::Relation {
                    unresolved_types, ..
                } if !unresolved_types.is_empty() => {
                    resolve_types(&sql, &mut types, &unresolved_types).await?;
                    decoder.refresh_type_names(&types);
                }
                Decoded::Change(c) => {
                    writeln!(out, "{}", c.to_tail_json())?;
                    printed += 1;
                }
                Decoded::Changes(cs) => {
                    for c in cs {
                        writeln!(out, "{}", c.to_tail_json())?;
                        printed += 1;
                    }
                }
                Decoded::Message(m) => {
                    writeln!(out, "{}", m.to_tail_json())?;
                    printed += 1;
                    if !m.transactional {
                        out.flush()?;
                    }
                }
                Decoded::Commit { end_lsn, .. } => {
                    out.flush()?;
                    if target.is_some_and(|t| end_lsn >= t) {
                        break;
                    }
                }
                _ => {}
            },
            StreamEvent::Keepalive { wal_end } => {
                if !decoder.in_transaction() && target.is_some_and(|t| wal_end >= t) {
                    break;
                }
            }
            StreamEvent::Reconnected { resume_from } => {
                tracing::warn!(%resume_from, "replication reconnected; resuming");
                decoder.reset();
            }
            StreamEvent::Disconnected { .. } => {}
            StreamEvent::SlotRecreated => {
                tracing::warn!("the replication slot was created again: changes made meanwhile were not streamed");
            }
        }
    }
    out.flush()?;
    drop(out);
    let confirmed = replicator
        .shutdown()
        .await
        .context("closing the replication stream")?;
    tracing::info!(changes = printed, %confirmed, "tail finished");
    Ok(())
}
