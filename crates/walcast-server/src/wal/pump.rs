//! The replication pump: WAL → changes → authorization → hub, in commit order, never
//! blocking on clients.
//!
//! ```text
//! Replicator.recv() ─▶ ChangeDecoder ─▶ hub.route_owned ─▶ pending (this transaction, or
//!      ▲                   │                                  several when behind)
//!      │                   │ Relation: flush, resolve types, forget the table's policies
//!      │                   │ Commit (nothing buffered behind it), or BATCH_MAX pending:
//!      │                   │   flush ─▶ rls (one statement per table × identity group)
//!      │                   │   ─▶ hub.deliver_routed, change by change ─▶ release held commits
//!      └── the next recv() confirms what was handed on (held commits wait for the flush)
//! ```
//!
//! Invariants:
//! - Every routed change is handed to the hub (queued on every authorized socket, or dropped
//!   for a full one) before the position of its Commit is confirmed, and before any `recv`
//!   once [`BATCH_MAX`] are pending: the position confirmed to Postgres never passes a change
//!   that was not handed on, and memory stays bounded whatever the transaction size.
//! - When the pump is behind (more events already buffered at a Commit), it gathers the
//!   following transactions into the same batch, holding their confirmations
//!   ([`Replicator::hold`]) until the batch is delivered, for at most [`GATHER_MAX`] and
//!   [`BATCH_MAX`] changes: one authorization statement per group then covers several
//!   transactions. When it is caught up, every Commit flushes at
//!   once, so gathering never adds latency.
//! - Changes are delivered in the order they were decoded, so each subscriber sees commit
//!   order.
//! - Default deny and isolation as documented in [`crate::authz::rls`]: a failed check for one
//!   identity stops only that identity's channels ([`Hub::fail`]), with a `system` error.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use walcast_core::broadcast::Topics;
use walcast_core::change::{Change, ChangeDecoder, ChangeKind, Decoded};
use walcast_core::hub::{Access, DispatchScratch, Hub, Identity, Routed};
use walcast_core::pg_type::TypeRegistry;
use walcast_replication::{Replicator, StreamEvent};

use crate::authz::rls::{self, AuthzError, ImageBatch, PolicyCache, RowRule, TablePolicy};
use crate::db::catalog::resolve_types;
use crate::db::sql::{ExclusivePool, SqlPool};
use crate::metrics;

/// Most routed changes held before they are authorized and delivered, inside one
/// transaction.
pub const BATCH_MAX: usize = 1_000;
/// Longest the pump keeps gathering buffered transactions into one batch. While it catches
/// up on a backlog something is always buffered; this bounds the delay of the first
/// gathered change and how long its commit stays unconfirmed.
const GATHER_MAX: Duration = Duration::from_millis(25);
/// Authorization transactions run side by side (the size of the authorization pool).
const AUTHZ_PARALLEL: usize = 4;

pub struct Pump {
    replicator: Replicator,
    decoder: ChangeDecoder,
    types: Arc<RwLock<TypeRegistry>>,
    hub: Arc<Hub>,
    sql: Arc<SqlPool>,
    authz: Arc<ExclusivePool>,
    policies: PolicyCache,
    pending: Vec<(Change, Routed)>,
    /// Committed transactions are pending, gathered while more events were buffered: they
    /// are flushed as soon as nothing more is buffered.
    gathering: bool,
    /// When the first gathered transaction's commit arrived.
    gathering_since: Option<Instant>,
    scratch: DispatchScratch,
    /// Broadcast topics, for `realtime.messages` rows (`realtime.send`) from the database.
    topics: Option<Arc<Topics>>,
}

/// The images of one (table, identity) group and where their verdicts go.
struct Group {
    identity: Arc<Identity>,
    relid: u32,
    check: Arc<rls::RowCheck>,
    images: ImageBatch,
    members: Vec<Member>,
}

/// One change's share of a [`Group`].
struct Member {
    /// Index in the pending changes.
    pending: usize,
    /// Index of the identity in that change's [`Routed::identities`].
    identity: usize,
    /// Ordinals of its primary and old images in the group's batch (`None`: not judgeable).
    primary: Option<usize>,
    old: Option<usize>,
}

impl Pump {
    pub fn new(
        replicator: Replicator,
        types: Arc<RwLock<TypeRegistry>>,
        hub: Arc<Hub>,
        sql: Arc<SqlPool>,
        authz: Arc<ExclusivePool>,
    ) -> Pump {
        Pump {
            replicator,
            decoder: ChangeDecoder::new(),
            types,
            hub,
            sql,
            authz,
            policies: PolicyCache::default(),
            pending: Vec::new(),
            gathering: false,
            gathering_since: None,
            scratch: DispatchScratch::default(),
            topics: None,
        }
    }

    /// Deliver `realtime.broadcast` logical messages to these broadcast topics.
    pub fn with_topics(mut self, topics: Arc<Topics>) -> Pump {
        self.topics = Some(topics);
        self
    }

    /// Run until `shutdown` resolves or replication fails for good.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            if self.gathering && !self.replicator.has_buffered() {
                // Gathered transactions must not wait for events that may never come.
                self.flush().await;
            }
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
                StreamEvent::Keepalive { wal_end } => {
                    // Nothing left to send: caught up, whatever the last commit's age.
                    if wal_end <= self.replicator.handed_on() {
                        metrics::replication_lag_seconds(0.0);
                    }
                }
                StreamEvent::Reconnected { resume_from } => {
                    tracing::warn!(%resume_from, "replication reconnected; resuming");
                    metrics::replication_reconnected();
                    self.decoder.reset();
                    // The unconfirmed transactions are sent again from their start.
                    self.pending.clear();
                    self.gathering = false;
                    self.gathering_since = None;
                    self.policies.clear();
                }
            }
        }
        // Pending changes belong to a transaction whose commit was not received, so its
        // position is not confirmed: it is streamed again after a restart.
        self.replicator.mark_handed_on();
        match self.replicator.shutdown().await {
            Ok(lsn) => tracing::info!(confirmed = %lsn, "replication stopped"),
            Err(e) => tracing::warn!(error = ?e.to_string(), "replication did not stop cleanly"),
        }
        Ok(())
    }

    async fn handle(&mut self, decoded: Decoded) -> Result<()> {
        match decoded {
            Decoded::Relation {
                table,
                unresolved_types,
            } => {
                // Changes before it were decoded against the old shape: authorize them with
                // the policies compiled for that shape.
                self.flush().await;
                self.policies.forget_table(table.relation_id);
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
                if let Some(topics) = self.topics.clone() {
                    if crate::realtime::broadcast::is_message_row(&change) {
                        // Changes decoded before the broadcast go out before it.
                        self.flush().await;
                        crate::realtime::broadcast::deliver_message_row(&topics, &change);
                    }
                }
                let routed = self.hub.route_owned(&change, &mut self.scratch);
                if !routed.is_empty() {
                    self.pending.push((change, routed));
                    if self.pending.len() >= BATCH_MAX {
                        self.flush().await;
                    }
                }
            }
            Decoded::Changes(changes) => {
                for c in changes {
                    metrics::change_decoded(c.kind.as_str());
                }
            }
            Decoded::Commit { commit_time_us, .. } => {
                metrics::replication_lag_seconds(seconds_since(commit_time_us));
                let gathered_for = self.gathering_since.map_or(Duration::ZERO, |t| t.elapsed());
                if !self.pending.is_empty()
                    && self.pending.len() < BATCH_MAX
                    && gathered_for < GATHER_MAX
                    && self.replicator.has_buffered()
                {
                    // Behind the stream: gather the next transactions into this batch, so
                    // one authorization statement per group covers all of them. Nothing is
                    // delayed (the next events are already here) and the commit stays
                    // unconfirmed until its changes are handed on.
                    self.replicator.hold();
                    self.gathering = true;
                    self.gathering_since.get_or_insert_with(Instant::now);
                } else {
                    self.flush().await;
                }
            }
            // Logical messages are never delivered: any role can emit them, so nothing
            // about their author can be trusted (database broadcasts are rows instead).
            Decoded::Message(_) => {}
            _ => {}
        }
        Ok(())
    }

    /// Authorize and deliver every pending change, in order; then confirm the transactions
    /// held back while they were gathered.
    async fn flush(&mut self) {
        self.deliver_pending().await;
        self.replicator.release();
        self.gathering = false;
        self.gathering_since = None;
    }

    async fn deliver_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let pending = std::mem::take(&mut self.pending);

        // 1. Table policy per (role, table) among the routed identities, looked up (or
        //    compiled) once per pair, then kept per change and identity index for steps 2 and 4.
        let mut table_policy: HashMap<(Arc<str>, u32), Arc<TablePolicy>> = HashMap::new();
        let mut policy_of: Vec<Vec<Arc<TablePolicy>>> = Vec::with_capacity(pending.len());
        for (change, routed) in &pending {
            let relid = change.table.relation_id;
            let mut per_identity = Vec::with_capacity(routed.identities().len());
            for identity in routed.identities() {
                let key = (identity.role.clone(), relid);
                if let Some(p) = table_policy.get(&key) {
                    per_identity.push(p.clone());
                    continue;
                }
                let policy = match self.policies.get(&identity.role, relid) {
                    Some(p) => p,
                    None => match rls::compile(&self.authz, &identity.role, &change.table).await {
                        Ok(p) => {
                            let p = Arc::new(p);
                            self.policies
                                .insert(identity.role.clone(), relid, p.clone());
                            p
                        }
                        Err(e) => {
                            tracing::warn!(error = ?e.to_string(), role = ?identity.role, relid, "compiling table policies failed; delivering nothing");
                            metrics::authz_check("unavailable");
                            Arc::new(TablePolicy::DENY)
                        }
                    },
                };
                table_policy.insert(key, policy.clone());
                per_identity.push(policy);
            }
            policy_of.push(per_identity);
        }

        // 2. Group the images to check per (table, identity). Identities are interned by the
        //    hub, so a group is keyed by the identity's pointer, never by its claims text.
        let mut groups: Vec<Group> = Vec::new();
        let mut group_of: HashMap<(u32, usize), usize> = HashMap::new();
        for (idx, (change, routed)) in pending.iter().enumerate() {
            let relid = change.table.relation_id;
            for (k, identity) in routed.identities().iter().enumerate() {
                let policy = &policy_of[idx][k];
                let RowRule::Check(check) = &policy.rows else {
                    continue;
                };
                if !policy.select {
                    continue;
                }
                let key = (relid, Arc::as_ptr(identity) as usize);
                let g = *group_of.entry(key).or_insert_with(|| {
                    groups.push(Group {
                        identity: identity.clone(),
                        relid,
                        check: check.clone(),
                        images: ImageBatch::default(),
                        members: Vec::new(),
                    });
                    groups.len() - 1
                });
                let group = &mut groups[g];
                let images = rls::images(change);
                let primary = images
                    .primary
                    .as_deref()
                    .and_then(|row| group.images.push(row, &check.reads));
                let old = match (primary, images.old) {
                    // A DELETE's old row is the image that was judged.
                    _ if change.kind == ChangeKind::Delete => primary,
                    (Some(_), Some(row)) => group.images.push(row, &check.reads),
                    _ => None,
                };
                group.members.push(Member {
                    pending: idx,
                    identity: k,
                    primary,
                    old,
                });
            }
        }

        // 3. One transaction and round trip per role (claims switched between groups), split
        //    in up to AUTHZ_PARALLEL chunks run side by side on the authorization pool.
        let mut by_role: HashMap<Arc<str>, Vec<usize>> = HashMap::new();
        for (i, g) in groups.iter().enumerate() {
            if !g.images.is_empty() {
                by_role.entry(g.identity.role.clone()).or_default().push(i);
            }
        }
        let mut groups_images: Vec<ImageBatch> = groups
            .iter_mut()
            .map(|g| std::mem::take(&mut g.images))
            .collect();
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        for (_, idxs) in by_role {
            let n = idxs.len().clamp(1, AUTHZ_PARALLEL);
            let mut parts: Vec<Vec<usize>> = vec![Vec::new(); n];
            for (k, i) in idxs.into_iter().enumerate() {
                parts[k % n].push(i);
            }
            chunks.extend(parts.into_iter().filter(|p| !p.is_empty()));
        }
        let authz = self.authz.clone();
        let chunk_results = futures_util::future::join_all(chunks.iter().map(|chunk| {
            let work: Vec<rls::GroupCheck> = chunk
                .iter()
                .map(|&i| rls::GroupCheck {
                    identity: groups[i].identity.clone(),
                    check: groups[i].check.clone(),
                    images: std::mem::take(&mut groups_images[i]),
                })
                .collect();
            let authz = authz.clone();
            async move {
                let started = std::time::Instant::now();
                let r = rls::check_role_groups(&authz, work).await;
                metrics::authz_check_seconds(started.elapsed().as_secs_f64());
                r
            }
        }))
        .await;
        let mut results: Vec<Result<Vec<bool>, AuthzError>> =
            (0..groups.len()).map(|_| Ok(Vec::new())).collect();
        for (chunk, rs) in chunks.iter().zip(chunk_results) {
            for (&i, r) in chunk.iter().zip(rs) {
                results[i] = r;
            }
        }

        // Verdicts per pending change, per identity index: (primary visible, old visible);
        // `None` (no verdict) denies.
        let mut verdicts: Vec<Vec<Option<(bool, bool)>>> = pending
            .iter()
            .map(|(_, routed)| vec![None; routed.identities().len()])
            .collect();
        for (group, result) in groups.iter().zip(results) {
            match result {
                Ok(visible) => {
                    metrics::authz_check("ok");
                    let seen = |o: Option<usize>| o.is_some_and(|o| visible.get(o) == Some(&true));
                    for m in &group.members {
                        verdicts[m.pending][m.identity] = Some((seen(m.primary), seen(m.old)));
                    }
                }
                Err(AuthzError::Unavailable(e)) => {
                    metrics::authz_check("unavailable");
                    tracing::warn!(error = ?e.to_string(), role = ?group.identity.role, relid = group.relid, "authorization unavailable; delivering nothing");
                }
                Err(AuthzError::Failed { code, message }) => {
                    metrics::authz_check("failed");
                    tracing::warn!(%code, error = ?message, role = ?group.identity.role, relid = group.relid, "authorization failed; stopping this identity's changes");
                    let message = format!(
                        "Unable to authorize changes for this channel's token: a row-level security check failed (SQLSTATE {code}); the subscription was stopped"
                    );
                    let mut stopped = Vec::new();
                    for m in &group.members {
                        for id in pending[m.pending].1.subscribers_of(m.identity) {
                            if !stopped.contains(&id) && self.hub.fail(id, &message) {
                                stopped.push(id);
                            }
                        }
                    }
                    metrics::authz_stopped(stopped.len() as u64);
                }
            }
        }

        // 4. Deliver in order.
        for (idx, (change, routed)) in pending.into_iter().enumerate() {
            let decisions: Vec<Access> = policy_of[idx]
                .iter()
                .enumerate()
                .map(|(k, policy)| match &policy.rows {
                    RowRule::All => rls::access(policy, true, true),
                    RowRule::Nothing => Access::Deny,
                    RowRule::Check(_) => match verdicts[idx][k] {
                        Some((primary, old)) => rls::access(policy, primary, old),
                        None => Access::Deny,
                    },
                })
                .collect();
            let denied = decisions.iter().filter(|d| **d == Access::Deny).count();
            if denied > 0 {
                metrics::delivery_dropped_n("unauthorized", denied as u64);
            }
            let stats = self
                .hub
                .deliver_routed(&change, routed, &mut self.scratch, |k| {
                    decisions.get(k).cloned().unwrap_or(Access::Deny)
                });
            metrics::changes_delivered(stats.delivered);
            if stats.delivered > 0 {
                metrics::commit_to_send(seconds_since(change.commit_time_us));
            }
            if stats.dropped > 0 {
                metrics::delivery_dropped_n("slow_client", stats.dropped);
            }
        }
    }
}

/// Seconds from a Unix-microseconds timestamp until now (0 if it lies in the future).
fn seconds_since(unix_us: i64) -> f64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    (now - unix_us).max(0) as f64 / 1e6
}
