//! Keeping `realtime.messages` bounded: rows past their own `expires_at` (stored sends with
//! a ttl) or older than the retention are deleted on a schedule, a batch at a time.
//!
//! Every database broadcast (`realtime.send`) is a row there; without this job the table
//! would grow with every message ever sent. Deleting in batches keeps each transaction (and
//! the WAL it writes, which the replication slot streams) small.

use std::sync::Arc;
use std::time::Duration;

use crate::db::sql::SqlPool;

/// Rows deleted per statement.
const BATCH: i64 = 10_000;

const DELETE_SQL: &str = "\
DELETE FROM realtime.messages WHERE id IN (
  SELECT id FROM realtime.messages
  WHERE inserted_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1::float8)
  LIMIT $2)";

/// Rows whose own expiry (a stored send's `persist[ttl]`) has passed, before the retention.
const DELETE_EXPIRED_SQL: &str = "\
DELETE FROM realtime.messages WHERE id IN (
  SELECT id FROM realtime.messages
  WHERE expires_at IS NOT NULL AND expires_at <= pg_catalog.now()
  LIMIT $1)";

/// Delete expired rows every `every` until `stop` resolves.
pub async fn run(
    sql: Arc<SqlPool>,
    retention: Duration,
    every: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tokio::time::sleep(every) => {}
        }
        match sweep(&sql, retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "expired realtime.messages rows deleted"),
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = ?format!("{e:#}"), "cannot delete expired realtime.messages rows (will keep trying quietly)");
            }
            Err(_) => {}
        }
    }
}

/// Delete every expired row, a batch at a time: past its own `expires_at`, or older than the
/// retention (which bounds every row, whatever its expiry); the number deleted.
pub async fn sweep(sql: &SqlPool, retention: Duration) -> anyhow::Result<u64> {
    let client = sql.get().await?;
    let secs = retention.as_secs_f64();
    let mut total = 0;
    loop {
        let n = client.execute(DELETE_EXPIRED_SQL, &[&BATCH]).await?;
        total += n;
        if n < BATCH as u64 {
            break;
        }
    }
    loop {
        let n = client.execute(DELETE_SQL, &[&secs, &BATCH]).await?;
        total += n;
        if n < BATCH as u64 {
            return Ok(total);
        }
    }
}
