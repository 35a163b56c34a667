//! One authorization batch: the pending items of some lanes (all of one role, or one lane
//! alone) judged against their tables' policies, in one database round trip.
//!
//! ```text
//!  LaneWork × n ─▶ per (lane, table): policy (cache, or compile under the role) ─┬─ no RLS check ─▶ verdict
//!                                                                                └─ RowCheck ─▶ images ─┐
//!  rls::check_groups: BEGIN; SET LOCAL ROLE; [SAVEPOINT; claims; check; ROLLBACK TO]×groups; ROLLBACK
//!                                                                           ─▶ visible ordinals ─▶ verdicts
//! ```
//!
//! Runs as a future beside the pump (nothing here touches the hub or the lanes): its result
//! is applied by the pump, in order, when it arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use walcast_core::change::{Change, ChangeKind, Table};
use walcast_core::hub::{Access, Identity};

use crate::authz::rls::{
    self, AuthzError, GroupCheck, ImageBatch, PolicyCache, RlsDeletes, RowCheck, RowRule,
    TablePolicy,
};
use crate::authz::shape::{self, Shape};
use crate::db::sql::ExclusivePool;
use crate::metrics;
use crate::wal::lanes::LaneKey;
use walcast_pgoutput::ReplicaIdentity;

/// One lane's share of a batch: its pending items.
pub struct LaneWork {
    pub key: LaneKey,
    pub identity: Arc<Identity>,
    pub items: Vec<(u64, Arc<Change>)>,
}

/// What became of one item.
#[derive(Debug, Clone)]
pub enum ItemOutcome {
    Decided(Access),
    /// The check could not run (connection, server): try again later.
    Unavailable,
    /// The check ran and raised for this identity: deny and stop its bindings.
    Failed {
        code: String,
        message: String,
    },
}

/// A finished batch.
pub struct BatchResult {
    pub generation: u64,
    pub lanes: Vec<LaneResult>,
}

/// One lane's share of a batch: item outcomes by sequence number, and the slowest of its
/// checks.
pub type LaneResult = (LaneKey, Vec<(u64, ItemOutcome)>, Duration);

/// A table policy, from the cache or compiled now (and cached), as of no earlier than
/// transaction `xid`, the first change it judges.
async fn policy(
    pool: &ExclusivePool,
    cache: &Mutex<PolicyCache>,
    role: &Arc<str>,
    table: &Arc<Table>,
    xid: u32,
) -> Result<Arc<TablePolicy>, AuthzError> {
    if let Some(p) = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(role, table)
    {
        return Ok(p);
    }
    let publication = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .publication();
    let compiled =
        Arc::new(rls::compile_for(pool, role, table, xid, publication.as_deref()).await?);
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(role.clone(), table, compiled.clone());
    Ok(compiled)
}

/// A term's cache key and the expression to evaluate for it.
type KeyedExpr = (Arc<str>, Arc<str>);

/// Compiled policies of this batch, by (role, table shape).
type Compiled = HashMap<(Arc<str>, usize), Result<Arc<TablePolicy>, AuthzError>>;

/// The policy for `change`'s table under `role`: compiled once per batch and table shape.
async fn compiled_policy(
    pool: &ExclusivePool,
    cache: &Mutex<PolicyCache>,
    compiled: &mut Compiled,
    role: &Arc<str>,
    change: &Change,
) -> Result<Arc<TablePolicy>, AuthzError> {
    let shape = Arc::as_ptr(&change.table) as usize;
    if let Some(p) = compiled.get(&(role.clone(), shape)) {
        return p.clone();
    }
    let p = policy(pool, cache, role, &change.table, change.xid).await;
    if let Err(e) = &p {
        tracing::warn!(error = ?e.to_string(), role = ?role, relid = change.table.relation_id, "compiling table policies failed");
    }
    compiled.insert((role.clone(), shape), p.clone());
    p
}

/// Compute, in one round trip, the claims values that recognized shapes of this batch need
/// and that its identities do not have yet (see [`shape::derive_many`]); what this leaves
/// out, `by_shape` computes one identity at a time.
async fn prederive(
    pool: &ExclusivePool,
    cache: &Mutex<PolicyCache>,
    lanes: &[LaneWork],
    compiled: &mut Compiled,
) {
    let Some(role) = lanes.first().map(|l| l.identity.role.clone()) else {
        return;
    };
    // Per identity: (cache key, expression) of each value it lacks.
    let mut wanted: Vec<(Arc<Identity>, Vec<KeyedExpr>)> = Vec::new();
    for lane in lanes {
        for (_, change) in &lane.items {
            let Ok(p) = compiled_policy(pool, cache, compiled, &role, change).await else {
                continue;
            };
            let (RowRule::Check(_), true, Some(shape)) = (&p.rows, p.select, &p.shape) else {
                continue;
            };
            let missing = cache
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .underived(&lane.identity, shape);
            if missing.is_empty() {
                continue;
            }
            match wanted
                .iter_mut()
                .find(|(i, _)| Arc::ptr_eq(i, &lane.identity))
            {
                Some((_, have)) => {
                    for m in missing {
                        if !have.iter().any(|(k, _)| *k == m.0) {
                            have.push(m);
                        }
                    }
                }
                None => wanted.push((lane.identity.clone(), missing)),
            }
        }
    }
    // One identity costs the same round trip either way.
    if wanted.len() < 2 {
        return;
    }
    let requests: Vec<(Arc<Identity>, Vec<Arc<str>>)> = wanted
        .iter()
        .map(|(i, m)| (i.clone(), m.iter().map(|(_, e)| e.clone()).collect()))
        .collect();
    match shape::derive_many(pool, &role, &requests).await {
        Ok(values) => {
            metrics::authz_derivations_batched(values.iter().flatten().count() as u64);
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            for ((identity, missing), values) in wanted.into_iter().zip(values) {
                if let Some(values) = values {
                    let keys = missing.into_iter().map(|(k, _)| k).collect();
                    cache.insert_derived(&identity, keys, values);
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = ?e.to_string(), identities = requests.len(), "deriving claims values in one batch failed; one by one instead");
        }
    }
}

/// A membership term to derive: its cache key, its statement, its table.
type SetTerm = (Arc<str>, Arc<str>, u32);

/// Membership sets derived in this batch, per identity (by address): what its lanes' rows
/// are judged with (see [`derive_sets`]).
type BatchSets = HashMap<usize, Vec<rls::CachedSet>>;

/// Derive, in one round trip, the membership sets the recognized shapes of this batch's
/// rows need, for every identity of the batch, in a snapshot that sees every row's
/// transaction and the last change of each membership table the stream has passed. So a
/// row is judged with sets as of no earlier than its commit (its whole transaction is
/// visible, with whatever it changed in the membership table), as the per-group check
/// would. The sets go to the cache too, valid for the change count read before deriving
/// (the pump uses them for later rows while no change of the table passes).
async fn derive_sets(
    pool: &ExclusivePool,
    cache: &Mutex<PolicyCache>,
    lanes: &[LaneWork],
    compiled: &mut Compiled,
) -> BatchSets {
    let mut out = BatchSets::new();
    let Some(role) = lanes.first().map(|l| l.identity.role.clone()) else {
        return out;
    };
    // Per identity: (key, expression, membership table) of each set its rows need.
    let mut wanted: Vec<(Arc<Identity>, Vec<SetTerm>)> = Vec::new();
    let mut xids: Vec<u32> = Vec::new();
    for lane in lanes {
        for (_, change) in &lane.items {
            let Ok(p) = compiled_policy(pool, cache, compiled, &role, change).await else {
                continue;
            };
            let (RowRule::Check(_), true, Some(shape)) = (&p.rows, p.select, &p.shape) else {
                continue;
            };
            if !shape.has_sets() {
                continue;
            }
            xids.push(change.xid);
            let at = match wanted
                .iter()
                .position(|(i, _)| Arc::ptr_eq(i, &lane.identity))
            {
                Some(at) => at,
                None => {
                    wanted.push((lane.identity.clone(), Vec::new()));
                    wanted.len() - 1
                }
            };
            for t in &shape.terms {
                let Some(relid) = t.set else { continue };
                if !wanted[at].1.iter().any(|(k, _, _)| *k == t.key) {
                    wanted[at].1.push((t.key.clone(), t.expr.clone(), relid));
                }
            }
        }
    }
    if wanted.is_empty() {
        return out;
    }
    // The change counts the sets will be valid for, and the transactions to see.
    let mut epochs: HashMap<u32, u64> = HashMap::new();
    {
        let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        for (_, terms) in &wanted {
            for (_, _, relid) in terms {
                let (epoch, last) = cache.changes_of(*relid);
                epochs.insert(*relid, epoch);
                xids.extend(last);
            }
        }
    }
    xids.sort_unstable();
    xids.dedup();
    let requests: Vec<(Arc<Identity>, Vec<Arc<str>>)> = wanted
        .iter()
        .map(|(i, t)| (i.clone(), t.iter().map(|(_, e, _)| e.clone()).collect()))
        .collect();
    let derived = match shape::derive_sets_many(pool, &role, &requests, &xids).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = ?e.to_string(), identities = requests.len(), "deriving membership sets failed; checking rows instead");
            return out;
        }
    };
    metrics::authz_derivations_batched(derived.iter().flatten().count() as u64);
    let now = std::time::Instant::now();
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    for ((identity, terms), sets) in wanted.into_iter().zip(derived) {
        let Some(sets) = sets else { continue };
        let cached: Vec<rls::CachedSet> = terms
            .into_iter()
            .zip(sets)
            .map(|((key, _, relid), values)| rls::CachedSet {
                key,
                relid,
                epoch: epochs.get(&relid).copied().unwrap_or(0),
                at: now,
                values: values.map(Arc::new),
            })
            .collect();
        cache.insert_sets(&identity, cached.clone());
        out.insert(Arc::as_ptr(&identity) as usize, cached);
    }
    out
}

/// One change's share of a check group.
struct Member {
    lane: usize,
    seq: u64,
    policy: Arc<TablePolicy>,
    /// Ordinals of its primary and old images in the group's batch (`None`: not judgeable).
    primary: Option<usize>,
    old: Option<usize>,
}

/// Judge the batch. `lanes` are all of one role.
pub async fn run(
    pool: Arc<ExclusivePool>,
    cache: Arc<Mutex<PolicyCache>>,
    lanes: Vec<LaneWork>,
    generation: u64,
    deletes: RlsDeletes,
) -> BatchResult {
    let mut outcomes: Vec<Vec<(u64, ItemOutcome)>> = lanes.iter().map(|_| Vec::new()).collect();
    let mut slowest: Vec<Duration> = vec![Duration::ZERO; lanes.len()];
    // Per (lane, table shape): the group of images to check.
    let mut groups: Vec<(GroupCheck, Vec<Member>)> = Vec::new();
    let mut group_of: HashMap<(usize, usize), usize> = HashMap::new();
    let mut compiled: Compiled = HashMap::new();
    let mut unshaped: std::collections::HashSet<(usize, usize)> = Default::default();
    // The transactions of the images sent to Postgres: the check's snapshot must see them.
    let mut xids: Vec<u32> = Vec::new();
    prederive(&pool, &cache, &lanes, &mut compiled).await;
    let sets = derive_sets(&pool, &cache, &lanes, &mut compiled).await;
    for (li, lane) in lanes.iter().enumerate() {
        for (seq, change) in &lane.items {
            let shape = Arc::as_ptr(&change.table) as usize;
            let p =
                compiled_policy(&pool, &cache, &mut compiled, &lane.identity.role, change).await;
            let p = match p {
                Ok(p) => p,
                Err(e) => {
                    outcomes[li].push((*seq, failure(e)));
                    continue;
                }
            };
            let check = match (&p.rows, p.select) {
                // The key alone cannot be judged by the policies: with the opt-in it goes to
                // whoever may SELECT the table (columns it may not read stay masked).
                (RowRule::Check(_), true)
                    if deletes == RlsDeletes::PrimaryKey
                        && change.kind == ChangeKind::Delete
                        && change.table.replica_identity != ReplicaIdentity::Full =>
                {
                    outcomes[li].push((*seq, ItemOutcome::Decided(rls::access(&p, true, true))));
                    continue;
                }
                (RowRule::Check(c), true) => {
                    // A recognized shape: decided in process once the identity's values
                    // are known (computed here the first time); otherwise the row check.
                    if let Some(shape) = p
                        .shape
                        .as_ref()
                        .filter(|s| !unshaped.contains(&(li, Arc::as_ptr(s) as usize)))
                    {
                        match by_shape(
                            &pool,
                            &cache,
                            &sets,
                            &lane.identity,
                            &p,
                            c,
                            shape,
                            change,
                            deletes,
                        )
                        .await
                        {
                            Some(access) => {
                                outcomes[li].push((*seq, ItemOutcome::Decided(access)));
                                continue;
                            }
                            // Unusable for this lane and table: not asked again this batch.
                            None => {
                                unshaped.insert((li, Arc::as_ptr(shape) as usize));
                            }
                        }
                    }
                    c.clone()
                }
                (RowRule::All, _) => {
                    outcomes[li].push((*seq, ItemOutcome::Decided(rls::access(&p, true, true))));
                    continue;
                }
                _ => {
                    outcomes[li].push((*seq, ItemOutcome::Decided(Access::Deny)));
                    continue;
                }
            };
            let g = *group_of.entry((li, shape)).or_insert_with(|| {
                groups.push((
                    GroupCheck {
                        identity: lane.identity.clone(),
                        check: check.clone(),
                        images: ImageBatch::default(),
                    },
                    Vec::new(),
                ));
                groups.len() - 1
            });
            let (group, members) = &mut groups[g];
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
            xids.push(change.xid);
            members.push(Member {
                lane: li,
                seq: *seq,
                policy: p.clone(),
                primary,
                old,
            });
        }
    }
    // Groups without a judgeable image decide without a round trip.
    let (to_check, empty): (Vec<_>, Vec<_>) =
        groups.into_iter().partition(|(g, _)| !g.images.is_empty());
    for (_, members) in empty {
        for m in members {
            outcomes[m.lane].push((m.seq, ItemOutcome::Decided(Access::Deny)));
        }
    }
    if !to_check.is_empty() {
        let (checks, members): (Vec<GroupCheck>, Vec<Vec<Member>>) = to_check.into_iter().unzip();
        xids.sort_unstable();
        xids.dedup();
        let started = std::time::Instant::now();
        let results = rls::check_groups(&pool, checks, &xids).await;
        metrics::authz_check_seconds(started.elapsed().as_secs_f64());
        for ((result, took), members) in results.into_iter().zip(members) {
            match &result {
                Ok(_) => metrics::authz_check("ok"),
                Err(AuthzError::Unavailable(_)) => metrics::authz_check("unavailable"),
                Err(AuthzError::Failed { .. }) => metrics::authz_check("failed"),
            }
            for m in members {
                slowest[m.lane] = slowest[m.lane].max(took);
                let outcome = match &result {
                    Ok(visible) => {
                        let seen =
                            |o: Option<usize>| o.is_some_and(|o| visible.get(o) == Some(&true));
                        ItemOutcome::Decided(rls::access(&m.policy, seen(m.primary), seen(m.old)))
                    }
                    Err(e) => failure(e.clone()),
                };
                outcomes[m.lane].push((m.seq, outcome));
            }
        }
    }
    BatchResult {
        generation,
        lanes: lanes
            .iter()
            .zip(outcomes)
            .zip(slowest)
            .map(|((l, o), s)| (l.key, o, s))
            .collect(),
    }
}

/// The access decided by `shape` for `identity`, computing its derived values first when
/// they are not known; `None` when they cannot be used (the row check decides then).
#[allow(clippy::too_many_arguments)]
async fn by_shape(
    pool: &ExclusivePool,
    cache: &Mutex<PolicyCache>,
    sets: &BatchSets,
    identity: &Arc<Identity>,
    policy: &TablePolicy,
    check: &RowCheck,
    shape: &Shape,
    change: &Change,
    deletes: RlsDeletes,
) -> Option<Access> {
    let mine = sets.get(&(Arc::as_ptr(identity) as usize));
    let decide = |cache: &PolicyCache| {
        let mut values = Vec::new();
        // Membership sets only as derived in this batch (as of this row's commit).
        let lookup = |t: &shape::Term| mine?.iter().find(|s| *s.key == *t.key)?.values.as_deref();
        if !cache.derived_values_with(identity, shape, lookup, &mut values) {
            return None;
        }
        Some(shape::decide(
            policy,
            &check.reads,
            shape,
            &values,
            change,
            deletes,
        ))
    };
    let missing = {
        let cache = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(access) = decide(&cache) {
            return Some(access);
        }
        cache.underived(identity, shape)
    };
    if missing.is_empty() {
        // Known but unusable (raised, or another type): the row check decides.
        return None;
    }
    let (keys, exprs): (Vec<Arc<str>>, Vec<Arc<str>>) = missing.into_iter().unzip();
    match shape::derive(pool, identity, &exprs).await {
        Ok(values) => {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.insert_derived(identity, keys, values);
            decide(&cache)
        }
        Err(e) => {
            tracing::debug!(error = ?e.to_string(), "deriving claims values failed; checking rows instead");
            None
        }
    }
}

fn failure(e: AuthzError) -> ItemOutcome {
    match e {
        AuthzError::Unavailable(_) => ItemOutcome::Unavailable,
        AuthzError::Failed { code, message } => ItemOutcome::Failed { code, message },
    }
}
