//! Replication health as the server sees it, polled every few seconds on the SQL pool:
//! how far the slot's confirmed position is behind the WAL (lag in bytes), how much WAL the
//! slot keeps (retained bytes), and whether the slot is still usable.

use std::sync::Arc;
use std::time::Duration;

use crate::db::sql::SqlPool;
use crate::metrics;

/// Poll until `shutdown` resolves.
pub async fn run(
    sql: Arc<SqlPool>,
    slot: String,
    every: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            _ = tick.tick() => {}
        }
        let result = async {
            let client = sql.get().await?;
            let row = client
                .query_opt(
                    "SELECT pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), confirmed_flush_lsn)::int8,
                            pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), restart_lsn)::int8,
                            wal_status::text
                     FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            anyhow::Ok(row)
        }
        .await;
        match result {
            Ok(Some(row)) => {
                let lag: Option<i64> = row.get(0);
                let retained: Option<i64> = row.get(1);
                let status: Option<String> = row.get(2);
                metrics::slot_state(
                    lag.unwrap_or(0),
                    retained.unwrap_or(0),
                    status.as_deref() != Some("lost"),
                );
            }
            Ok(None) => metrics::slot_state(0, 0, false),
            Err(e) => tracing::debug!(error = ?e.to_string(), "slot metrics poll failed"),
        }
    }
}
