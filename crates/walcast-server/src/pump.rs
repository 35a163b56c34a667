//! The replication pump: WAL → changes → hub, in commit order, never blocking on clients.
//!
//! ```text
//! Replicator.recv() ─▶ ChangeDecoder ─▶ hub.route ─▶ access (role, table) ─▶ hub.deliver
//!      ▲                   │ Relation: resolve types, forget cached access for the table
//!      └── the next recv() confirms everything before it was handed to the hub
//! ```
//!
//! Invariants:
//! - A change is handed to the hub (queued on every matching socket, or dropped for a full
//!   one) before the next `recv`, so the position confirmed to Postgres never passes a
//!   change that was not handed on.
//! - Default deny: a subscriber gets a change only when its role has SELECT on the table,
//!   and, until row-level security is evaluated per row, never from a table with RLS on.
//!   A failed access check delivers nothing.
//! - Access decisions are cached per (role, table) and dropped whenever Postgres re-sends the
//!   table's Relation message (it does after any ALTER, GRANT or REVOKE on it), and after
//!   [`ACCESS_TTL`] in any case.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use walcast_core::change::{Change, ChangeDecoder, Decoded};
use walcast_core::hub::{DispatchScratch, Hub, Identity};
use walcast_core::pg_type::TypeRegistry;
use walcast_replication::{Replicator, StreamEvent};

use crate::catalog::{resolve_types, table_access, TableAccess};
use crate::metrics;
use crate::sql::SqlPool;

/// Longest an access decision is reused without a Relation message invalidating it.
pub const ACCESS_TTL: Duration = Duration::from_secs(30);

pub struct Pump {
    replicator: Replicator,
    decoder: ChangeDecoder,
    types: Arc<RwLock<TypeRegistry>>,
    hub: Arc<Hub>,
    sql: Arc<SqlPool>,
    access: HashMap<(Arc<str>, u32), (TableAccess, Instant)>,
    scratch: DispatchScratch,
}

impl Pump {
    pub fn new(
        replicator: Replicator,
        types: Arc<RwLock<TypeRegistry>>,
        hub: Arc<Hub>,
        sql: Arc<SqlPool>,
    ) -> Pump {
        Pump {
            replicator,
            decoder: ChangeDecoder::new(),
            types,
            hub,
            sql,
            access: HashMap::new(),
            scratch: DispatchScratch::default(),
        }
    }

    /// Run until `shutdown` resolves or replication fails for good.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            let event = tokio::select! {
                ev = self.replicator.recv() => ev,
                _ = &mut shutdown => break,
            };
            let Some(event) = event else { break };
            match event? {
                StreamEvent::XLogData(x) => {
                    let decoded = {
                        let types = self.types.read().unwrap_or_else(|p| p.into_inner());
                        self.decoder.decode(&types, &x.data)?
                    };
                    self.handle(decoded).await?;
                }
                StreamEvent::Keepalive { .. } => {}
                StreamEvent::Reconnected { resume_from } => {
                    tracing::warn!(%resume_from, "replication reconnected; resuming");
                    metrics::replication_reconnected();
                    self.decoder.reset();
                    self.access.clear();
                }
            }
        }
        self.replicator.mark_handed_on();
        match self.replicator.shutdown().await {
            Ok(lsn) => tracing::info!(confirmed = %lsn, "replication stopped"),
            Err(e) => tracing::warn!(error = %e, "replication did not stop cleanly"),
        }
        Ok(())
    }

    async fn handle(&mut self, decoded: Decoded) -> Result<()> {
        match decoded {
            Decoded::Relation {
                table,
                unresolved_types,
            } => {
                self.access.retain(|(_, rel), _| *rel != table.relation_id);
                if !unresolved_types.is_empty() {
                    let client = self.sql.get().await?;
                    let mut types = self.types.read().unwrap_or_else(|p| p.into_inner()).clone();
                    resolve_types(&client, &mut types, &unresolved_types).await?;
                    self.decoder.refresh_type_names(&types);
                    *self.types.write().unwrap_or_else(|p| p.into_inner()) = types;
                }
            }
            Decoded::Change(change) => {
                metrics::change_decoded(change.kind.as_str());
                self.dispatch(&change).await;
            }
            Decoded::Changes(changes) => {
                for c in changes {
                    metrics::change_decoded(c.kind.as_str());
                }
            }
            _ => {}
        }
        Ok(())
    }

    async fn dispatch(&mut self, change: &Change) {
        let identities = self.hub.route(change, &mut self.scratch);
        if identities.is_empty() {
            return;
        }
        let relid = change.table.relation_id;
        let mut decisions: Vec<(Arc<Identity>, bool)> = Vec::with_capacity(identities.len());
        for identity in identities {
            let allowed = match self.access_for(&identity.role, relid).await {
                // Row-level security is not evaluated per row yet: default deny.
                Some(a) => a.select && !a.rls_enabled,
                None => false,
            };
            if !allowed {
                metrics::delivery_dropped("unauthorized");
            }
            decisions.push((identity, allowed));
        }
        let stats = self.hub.deliver(change, &mut self.scratch, |id| {
            decisions.iter().any(|(i, allowed)| *allowed && **i == *id)
        });
        metrics::changes_delivered(stats.delivered);
        if stats.dropped > 0 {
            metrics::delivery_dropped_n("slow_client", stats.dropped);
        }
    }

    async fn access_for(&mut self, role: &Arc<str>, relid: u32) -> Option<TableAccess> {
        let key = (role.clone(), relid);
        if let Some((a, at)) = self.access.get(&key) {
            if at.elapsed() < ACCESS_TTL {
                return Some(*a);
            }
        }
        let result = async {
            let client = self.sql.get().await?;
            table_access(&client, role, relid).await
        }
        .await;
        match result {
            Ok(a) => {
                self.access.insert(key, (a, Instant::now()));
                Some(a)
            }
            Err(e) => {
                tracing::warn!(error = %e, role = %role, relid, "access check failed; delivering nothing");
                None
            }
        }
    }
}
