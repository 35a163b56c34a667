//! The `realtime` schema objects walcast relies on (`sql/*.sql`, embedded at build time),
//! applied by `walcast serve` at startup when missing or changed, and by `walcast migrate`.
//!
//! ```text
//!  read-only: which files are recorded in realtime.walcast_migrations (name, md5)?
//!     all recorded with the same checksum ─▶ done (no DDL, no privileges needed)
//!     otherwise ─▶ one transaction: advisory lock, create the record table, apply each
//!                  missing or changed file in name order, record it
//! ```
//!
//! Invariants: files are idempotent, so applying one again is harmless; a server that lacks
//! the privileges to create them does not fail when they are already there; concurrent
//! starts serialize on an advisory lock.

use anyhow::{Context, Result};

include!(concat!(env!("OUT_DIR"), "/sql_files.rs"));

/// Advisory lock key serializing migrations ("walcast" in ASCII).
const LOCK_KEY: i64 = 0x0077_616c_6361_7374;

/// What a migration run did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub files: Vec<String>,
}

async fn recorded(client: &impl tokio_postgres::GenericClient) -> Result<Vec<(String, String)>> {
    let exists: bool = client
        .query_one(
            "SELECT pg_catalog.to_regclass('realtime.walcast_migrations') IS NOT NULL",
            &[],
        )
        .await?
        .try_get(0)?;
    if !exists {
        return Ok(Vec::new());
    }
    let rows = client
        .query(
            "SELECT name, checksum FROM realtime.walcast_migrations",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect()
}

fn checksum(sql: &str) -> String {
    // FNV-1a, 64 bit: enough to notice an edited file (not a security boundary).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in sql.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Apply the embedded files that are missing or changed.
pub async fn run(client: &mut tokio_postgres::Client) -> Result<Applied> {
    let done = recorded(client)
        .await
        .context("reading realtime.walcast_migrations")?;
    let todo = |done: &[(String, String)]| -> Vec<(&'static str, &'static str)> {
        SQL_FILES
            .iter()
            .filter(|(name, sql)| !done.iter().any(|(n, c)| n == name && *c == checksum(sql)))
            .copied()
            .collect()
    };
    if todo(&done).is_empty() {
        return Ok(Applied::default());
    }
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_catalog.pg_advisory_xact_lock($1)", &[&LOCK_KEY])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS realtime;
         CREATE TABLE IF NOT EXISTS realtime.walcast_migrations (
             name text PRIMARY KEY, checksum text NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now())",
    )
    .await
    .context(
        "creating realtime.walcast_migrations (does the walcast user have CREATE on the database?)",
    )?;
    // Someone else may have applied them while we waited for the lock.
    let done = recorded(&tx).await?;
    let mut applied = Applied::default();
    for (name, sql) in todo(&done) {
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying sql/{name}"))?;
        tx.execute(
            "INSERT INTO realtime.walcast_migrations (name, checksum) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET checksum = EXCLUDED.checksum, applied_at = now()",
            &[&name, &checksum(sql)],
        )
        .await?;
        applied.files.push(name.to_string());
    }
    tx.commit().await?;
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_embedded_in_name_order() {
        let names: Vec<&str> = SQL_FILES.iter().map(|(n, _)| *n).collect();
        assert!(names.contains(&"realtime.sql"), "{names:?}");
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }

    #[test]
    fn checksum_changes_with_the_text() {
        assert_eq!(checksum("a"), checksum("a"));
        assert_ne!(checksum("a"), checksum("b"));
    }
}
