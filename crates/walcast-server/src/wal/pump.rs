//! The replication pump: WAL → changes → authorization → hub, in commit order per
//! subscriber, never blocking on clients, and never ending because the database went away.
//!
//! ```text
//!  Replicator.recv ─▶ ChangeDecoder ─▶ hub.route_owned ─▶ per routed identity:
//!     ▲   (Disconnected / Reconnected:          ├─ decided now (no RLS check), lane empty ─▶ hub.deliver_routed
//!     │    readiness, channels told)            └─ else ─▶ its lane (wal::lanes), FIFO
//!     │                                   lanes ready ─▶ check batches (wal::checks), beside the loop
//!     │                                   verdicts ─▶ each lane delivers its decided prefix
//!     └── confirmed position = end of the newest transaction with every earlier one delivered
//! ```
//!
//! Invariants:
//! - Per subscriber, changes are delivered in commit order (see [`crate::wal::lanes`]).
//! - A slow, failing or unavailable check delays only the identities it decides for; the
//!   pump keeps reading, routing and delivering for everyone else meanwhile. Only when lanes
//!   hold more than [`MAX_QUEUED`] items does it stop reading (TCP pushes back on the
//!   walsender; the reader task keeps the connection alive).
//! - The position confirmed to Postgres never passes a transaction with an undelivered
//!   change; after a reconnection the unconfirmed transactions are streamed again and routed
//!   afresh (at-least-once into the hub).
//! - Default deny: no verdict, no delivery. A check that cannot run is retried (with
//!   backoff); a check that raises stops that identity's bindings with a `system` error.
//! - Transient trouble (connection lost, server restarting, a message we cannot decode, types
//!   we cannot resolve yet) never ends the pump; readiness says what is wrong and channels
//!   with postgres_changes are told when the stream goes and comes back. Only a definite
//!   condition (slot dropped or invalidated, wal_level, authentication) stops streaming, and
//!   then broadcast and presence keep working.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use walcast_core::broadcast::Topics;
use walcast_core::change::{Change, ChangeDecoder, Decoded};
use walcast_core::hub::{Access, DispatchScratch, Hub};
use walcast_core::pg_type::TypeRegistry;
use walcast_protocol::outbound::SystemStatus;
use walcast_replication::{Lsn, Replicator, StreamEvent};

use crate::authz::rls::{self, PolicyCache, RowRule};
use crate::authz::shape::TermValue;
use crate::db::catalog::resolve_types;
use crate::db::sql::{ExclusivePool, SqlPool};
use crate::metrics;
use crate::realtime::changes::STREAM_DOWN;
use crate::state::{Health, Readiness};
use crate::wal::checks::{self, BatchResult, ItemOutcome, LaneWork};
use crate::wal::lanes::{lane_key, Lanes, Txns, Verdict};

/// Most items one lane puts into one check batch.
pub const BATCH_MAX: usize = 1_000;
/// Items waiting in lanes past which the pump stops reading the stream until checks catch up.
pub const MAX_QUEUED: usize = 100_000;
/// Longest pending items wait for more to gather while the pump is behind the stream.
const GATHER_MAX: Duration = Duration::from_millis(25);
/// Check batches of one role run side by side (the size of the authorization pool).
const AUTHZ_PARALLEL: usize = 4;
/// Check batches in flight at most when starting lanes that run alone.
const SOLO_IN_FLIGHT: usize = 2 * AUTHZ_PARALLEL;
/// Longest undelivered changes may hold back confirmations while their checks cannot run
/// (the database shutting down, authorization connections refused): past it the stream is
/// let go and resumed later from the last confirmed position. A logical walsender waits for
/// its client to confirm everything before Postgres can shut down, so holding on would keep
/// Postgres from stopping.
const UNAVAILABLE_HOLD_MAX: Duration = Duration::from_secs(2);
/// Type resolution retries after a database error, up to this delay between tries.
const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(5);

/// What `postgres_changes` channels are told when the slot was created anew.
pub const RESYNC_REQUIRED: &str = "ResyncRequired: the replication slot was recreated; changes committed meanwhile were lost, refetch your data";
/// What they are told when the stream is back.
pub const SUBSCRIBED: &str = "Subscribed to PostgreSQL";

/// A cached policy and when it was compiled.
type TimedPolicy = (Arc<rls::TablePolicy>, Instant);

/// A check batch in flight, and whether it is a shared one (counted against the pool).
type Batch = std::pin::Pin<Box<dyn std::future::Future<Output = (BatchResult, bool)> + Send>>;

/// A derivation ahead of rows: resolves to the identities it was asked for and those whose
/// values it cached.
type Ahead = std::pin::Pin<Box<dyn std::future::Future<Output = AheadDone> + Send>>;

/// An identity and the (cache key, expression) of each value it lacks.
type Wanted = (Arc<walcast_core::hub::Identity>, Vec<(Arc<str>, Arc<str>)>);

/// A cached policy with the table shape it was compiled for and when.
type CachedPolicy = (
    Arc<walcast_core::change::Table>,
    Arc<rls::TablePolicy>,
    Instant,
);

/// (asked, derived) identities of a finished derivation ahead of rows.
type AheadDone = (
    Vec<Arc<walcast_core::hub::Identity>>,
    Vec<Arc<walcast_core::hub::Identity>>,
);

/// Derivations ahead of rows in flight at most (each holds one authorization connection
/// for one pipelined round trip); identities arriving meanwhile wait for the next.
const AHEAD_IN_FLIGHT: usize = 2;

pub struct Pump {
    /// The slot, or in cluster mode the slot or the cluster's change stream.
    replicator: Source,
    decoder: ChangeDecoder,
    types: Arc<RwLock<TypeRegistry>>,
    hub: Arc<Hub>,
    sql: Arc<SqlPool>,
    authz: Arc<ExclusivePool>,
    policies: Arc<Mutex<PolicyCache>>,
    scratch: DispatchScratch,
    /// Broadcast topics, for `realtime.messages` rows (`realtime.send`) from the database.
    topics: Option<Arc<Topics>>,
    health: Arc<Health>,
    lanes: Lanes,
    txns: Txns,
    /// Confirmations are held (lanes have items): released up to what was delivered.
    holding: bool,
    checks: FuturesUnordered<Batch>,
    /// Shared batches in flight: at most [`AUTHZ_PARALLEL`] (see `launch_checks`).
    shared_in_flight: usize,
    /// When the oldest pending item not yet in a batch was queued.
    gathering_since: Option<Instant>,
    /// The stream ran at least once (a loss is then "lost", not "starting").
    streamed: bool,
    /// What joins cached from the catalog: forgotten with the policies (Relation messages,
    /// new connections).
    catalog: Option<Arc<crate::db::catalog_cache::CatalogCache>>,
    /// DELETEs that policies cannot judge (`--rls-deletes`).
    rls_deletes: crate::authz::rls::RlsDeletes,
    /// How far the stream has been read outside transactions: the end of the last commit,
    /// or a keepalive's or non-transactional message's position. Once the lanes are empty,
    /// everything up to it has been delivered.
    read_through: Lsn,
    /// Change feeds: every decoded change is recorded in their history before routing.
    feeds: Option<Arc<crate::feed::Feeds>>,
    /// Relations with a value gate in the hub, and when it must go: when the oldest policy
    /// it was derived from expires ([`rls::POLICY_TTL`]), so a gate never outlives the
    /// freshness the policy cache keeps.
    gate_expiry: std::collections::HashMap<u32, Instant>,
    /// Claims values being derived ahead of rows (see [`Pump::derive_ahead`]).
    ahead: FuturesUnordered<Ahead>,
    /// Identities to derive ahead once a slot in `ahead` frees.
    ahead_waiting: Vec<Arc<walcast_core::hub::Identity>>,
    /// Identities (by pointer) with a derivation ahead in flight: their lanes wait for it
    /// instead of deriving the same values again in a check batch.
    ahead_running: std::collections::HashSet<usize>,
    /// The open transaction's changes not routed yet: once a change of a table with a
    /// membership policy is decoded, it and every later change of its transaction wait for
    /// the commit (see [`Pump::on_decoded`]).
    held: Vec<Change>,
    /// The open transaction outgrew [`HELD_MAX`]: its changes are routed as decoded and
    /// judged without membership sets (they wait in lanes for sets as of the commit).
    spilled: bool,
    /// Routing the held changes at their commit: membership sets may decide them.
    at_commit: bool,
    /// Per membership table: tables gated with sets derived from it, ungated at its next
    /// change in the stream.
    set_gates: std::collections::HashMap<u32, Vec<u32>>,
}

/// Changes of one transaction held for its commit at most (then routed as decoded).
const HELD_MAX: usize = 1024;
/// How long a gate built from membership sets lives at most (the sets' own age limit,
/// [`rls::POLICY_TTL`], is checked whenever they decide a row).
const SET_GATE_TTL: Duration = Duration::from_secs(1);

impl Pump {
    pub fn new(
        replicator: Replicator,
        types: Arc<RwLock<TypeRegistry>>,
        hub: Arc<Hub>,
        sql: Arc<SqlPool>,
        authz: Arc<ExclusivePool>,
    ) -> Pump {
        Pump::with_source(Source::Slot(replicator), types, hub, sql, authz)
    }

    /// A pump reading from `source` (cluster mode: [`Source::Cluster`]).
    pub fn with_source(
        source: Source,
        types: Arc<RwLock<TypeRegistry>>,
        hub: Arc<Hub>,
        sql: Arc<SqlPool>,
        authz: Arc<ExclusivePool>,
    ) -> Pump {
        Pump {
            replicator: source,
            decoder: ChangeDecoder::new(),
            types,
            hub,
            sql,
            authz,
            policies: Arc::default(),
            catalog: None,
            rls_deletes: Default::default(),
            scratch: DispatchScratch::default(),
            topics: None,
            health: Arc::default(),
            lanes: Lanes::default(),
            txns: Txns::default(),
            holding: false,
            read_through: Lsn(0),
            checks: FuturesUnordered::new(),
            shared_in_flight: 0,
            gathering_since: None,
            streamed: false,
            feeds: None,
            gate_expiry: Default::default(),
            ahead: FuturesUnordered::new(),
            ahead_waiting: Vec::new(),
            ahead_running: Default::default(),
            held: Vec::new(),
            spilled: false,
            at_commit: false,
            set_gates: Default::default(),
        }
    }

    /// The publication streamed: policies reading a table it publishes in full (a
    /// membership table) are decided in process (authz/shape.rs).
    pub fn with_publication(self, publication: &str) -> Pump {
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_publication(publication);
        self
    }

    /// Record every change in the feeds' history (before it is routed).
    pub fn with_history(mut self, feeds: Arc<crate::feed::Feeds>) -> Pump {
        self.feeds = Some(feeds);
        self
    }

    /// Deliver `realtime.messages` rows (database broadcasts) to these topics.
    pub fn with_topics(mut self, topics: Arc<Topics>) -> Pump {
        self.topics = Some(topics);
        self
    }

    /// What DELETEs the policies cannot judge become.
    pub fn with_rls_deletes(mut self, deletes: crate::authz::rls::RlsDeletes) -> Pump {
        self.rls_deletes = deletes;
        self
    }

    /// Invalidate the joins' catalog cache where the policy cache is invalidated.
    pub fn with_catalog(mut self, catalog: Arc<crate::db::catalog_cache::CatalogCache>) -> Pump {
        self.catalog = Some(catalog);
        self
    }

    /// Report readiness here.
    pub fn with_health(mut self, health: Arc<Health>) -> Pump {
        self.health = health;
        self
    }

    /// Run until `shutdown` resolves. Returns early only after a definite condition stopped
    /// streaming (the error says which); the server keeps serving meanwhile.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::pin!(shutdown);
        let mut outcome = Ok(());
        // A new identity (a channel's first) wakes the loop, so its values are derived
        // before its first row even while the stream is idle.
        let arrivals = Arc::new(tokio::sync::Notify::new());
        {
            let wake = arrivals.clone();
            self.hub.watch_arrivals(move || wake.notify_one());
        }
        loop {
            self.derive_ahead();
            self.launch_checks();
            let wake = self.next_wake();
            let reading = self.lanes.items() < MAX_QUEUED;
            tokio::select! {
                biased;
                _ = &mut shutdown => break,
                Some((result, shared)) = self.checks.next(), if !self.checks.is_empty() => {
                    if shared {
                        self.shared_in_flight -= 1;
                    }
                    self.apply(result);
                }
                Some((asked, derived)) = self.ahead.next(), if !self.ahead.is_empty() => {
                    for identity in &asked {
                        self.ahead_running.remove(&(Arc::as_ptr(identity) as usize));
                    }
                    metrics::authz_derived_ahead(derived.len() as u64);
                    self.gate_known(&derived);
                }
                event = self.replicator.recv(), if reading => {
                    match event {
                        None => break,
                        Some(Ok(event)) => self.on_event(event).await,
                        Some(Err(e)) => {
                            self.stopped(&e.to_string());
                            outcome = Err(anyhow::Error::new(e));
                            break;
                        }
                    }
                }
                _ = sleep_until(wake), if wake.is_some() => {}
                _ = arrivals.notified() => {}
            }
            self.confirm();
            if self
                .lanes
                .unavailable_since()
                .is_some_and(|t| t.elapsed() >= UNAVAILABLE_HOLD_MAX)
                && self.replicator.is_streaming_slot()
            {
                tracing::warn!("authorization has been unavailable for a while: letting go of the stream so nothing is confirmed early; it resumes from the last confirmed position");
                self.drop_pending();
                self.replicator.reconnect(
                    "authorization is unavailable; resuming from the last confirmed position"
                        .into(),
                );
            }
        }
        // Whatever is still in lanes belongs to transactions that are not confirmed: they
        // are streamed again after a restart.
        self.confirm();
        self.replicator.mark_handed_on();
        if outcome.is_ok() {
            match self.replicator.shutdown().await {
                Ok(lsn) => tracing::info!(confirmed = %lsn, "replication stopped"),
                Err(e) => {
                    tracing::warn!(error = ?e.to_string(), "replication did not stop cleanly")
                }
            }
        }
        outcome
    }

    fn stopped(&mut self, why: &str) {
        tracing::error!(reason = ?why, "replication stopped; broadcast and presence keep working");
        self.health.set(Readiness::Stopped(why.to_owned()));
        self.hub
            .notify_all(SystemStatus::Error, &format!("Replication stopped: {why}"));
    }

    async fn on_event(&mut self, event: StreamEvent) {
        match event {
            StreamEvent::XLogData(x) => {
                let decoded = {
                    let types = self.types.read().unwrap_or_else(|p| p.into_inner());
                    self.decoder.decode(&types, &x.data)
                };
                match decoded {
                    Ok(d) => {
                        let outside =
                            matches!(d, Decoded::Message(_)) && !self.decoder.in_transaction();
                        self.handle(d).await;
                        if outside {
                            // Every transaction that committed before it was streamed.
                            self.read_through = self.read_through.max(x.wal_start);
                        }
                    }
                    Err(e) => {
                        // Never skip what we cannot read: reconnect and read it again.
                        tracing::error!(error = ?e.to_string(), wal_start = %x.wal_start, "cannot decode a replication message; reconnecting");
                        self.replicator
                            .reconnect(format!("cannot decode a replication message: {e}"));
                    }
                }
            }
            StreamEvent::Keepalive { wal_end } => {
                if !self.decoder.in_transaction() {
                    self.read_through = self.read_through.max(wal_end);
                }
                // Nothing left to send: caught up, whatever the last commit's age.
                if wal_end <= self.replicator.handed_on() {
                    metrics::replication_lag_seconds(0.0);
                }
            }
            StreamEvent::Disconnected { reason } => {
                metrics::replication_streaming(false);
                self.drop_pending();
                let readiness = if self.streamed {
                    Readiness::Lost(reason)
                } else {
                    Readiness::Starting(reason)
                };
                self.health.set(readiness);
                if self.streamed {
                    self.hub.notify_all(SystemStatus::Error, STREAM_DOWN);
                }
            }
            StreamEvent::Reconnected { resume_from } => {
                tracing::warn!(%resume_from, "replication reconnected; resuming");
                metrics::replication_reconnected();
                self.reset_stream();
                self.up();
            }
            StreamEvent::SlotRecreated => {
                tracing::warn!("the replication slot was created again; telling every postgres_changes channel to refetch");
                self.hub.notify_all(SystemStatus::Error, RESYNC_REQUIRED);
                if let Some(feeds) = &self.feeds {
                    // Changes were lost: no feed may resume across the gap.
                    feeds.history.lost();
                }
            }
        }
        if !self.streamed && self.replicator.is_up() {
            // The first connection: no Reconnected event for it.
            self.up();
        }
    }

    fn up(&mut self) {
        let was = self.streamed;
        self.streamed = true;
        self.health.set(Readiness::Streaming);
        metrics::replication_streaming(true);
        if was {
            self.hub.notify_all(SystemStatus::Ok, SUBSCRIBED);
        }
    }

    /// Undelivered changes belong to unconfirmed transactions, which a new connection streams
    /// again: drop them (and void the checks still running for them).
    fn drop_pending(&mut self) {
        let dropped = self.lanes.reset();
        if dropped > 0 {
            tracing::info!(dropped, "undelivered changes will be streamed again");
        }
        self.txns.reset();
        self.holding = false;
        self.gathering_since = None;
        self.held.clear();
        self.spilled = false;
    }

    /// A new connection: per-connection state goes; the unconfirmed transactions come again.
    fn reset_stream(&mut self) {
        self.decoder.reset();
        self.drop_pending();
        self.policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.hub.ungate_all();
        self.gate_expiry.clear();
        self.set_gates.clear();
        if let Some(catalog) = &self.catalog {
            catalog.clear();
        }
    }

    /// The stream passed a change of `relid`: the membership sets derived from it no longer
    /// decide anything from here on (their change count is behind), and the tables gated
    /// with them are routed to everyone again. Returns whether `relid` has a membership
    /// policy (some role's cached policy).
    fn sets_changed(&mut self, relid: u32, xid: Option<u32>) -> bool {
        let has_sets = {
            let mut policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            policies.note_change(relid, xid);
            policies.has_set_policy(relid)
        };
        if !self.set_gates.is_empty() {
            self.ungate_sets_of(relid);
        }
        has_sets
    }

    fn ungate_sets_of(&mut self, relid: u32) {
        if let Some(tables) = self.set_gates.remove(&relid) {
            for t in tables {
                self.hub.ungate(t);
                self.gate_expiry.remove(&t);
            }
        }
    }

    /// A decoded row change. A membership policy judges a row as of its commit, when its
    /// whole transaction (which may change the membership table after the row) has been
    /// decoded: so from the first change of a table with such a policy, the transaction's
    /// changes are held, in order, and routed at the commit, where sets as of the stream's
    /// position then decide them in process. A transaction beyond [`HELD_MAX`] changes is
    /// routed as decoded instead, without sets: its rows wait in lanes, whose batch
    /// derives sets in a snapshot that sees the transaction.
    fn on_decoded(&mut self, change: Change) {
        let relid = change.table.relation_id;
        let has_sets = self.sets_changed(relid, Some(change.xid));
        let holds = !self.spilled && (!self.held.is_empty() || has_sets);
        if !holds {
            self.on_change(change);
            return;
        }
        self.held.push(change);
        if self.held.len() >= HELD_MAX {
            self.spilled = true;
            // A gate from sets could skip an identity that a later change of this
            // transaction makes a member.
            for (_, tables) in std::mem::take(&mut self.set_gates) {
                for t in tables {
                    self.hub.ungate(t);
                    self.gate_expiry.remove(&t);
                }
            }
            for c in std::mem::take(&mut self.held) {
                self.on_change(c);
            }
        }
    }

    async fn handle(&mut self, decoded: Decoded) {
        match decoded {
            Decoded::Begin { .. } => {
                self.txns.begin();
                self.spilled = false;
            }
            Decoded::Relation {
                table,
                unresolved_types,
            } => {
                self.policies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .forget_table(table.relation_id);
                // A membership table's policies or privileges may have changed.
                let _ = self.sets_changed(table.relation_id, None);
                // Its gate was derived from the policies just forgotten: from this point
                // in the stream every identity is routed and judged afresh.
                self.hub.ungate(table.relation_id);
                self.gate_expiry.remove(&table.relation_id);
                // The same point tells joins: DDL, GRANT/REVOKE and policy changes on the
                // table all send its Relation message again (see db::catalog_cache).
                if let Some(catalog) = &self.catalog {
                    catalog.forget_table(table.relation_id);
                }
                if !unresolved_types.is_empty() {
                    self.resolve(&unresolved_types).await;
                }
            }
            Decoded::Change(change) => self.on_decoded(change),
            Decoded::Changes(changes) => {
                for c in changes {
                    metrics::change_decoded(c.kind.as_str());
                    let _ = self.sets_changed(c.table.relation_id, Some(c.xid));
                }
            }
            Decoded::Commit {
                end_lsn,
                commit_time_us,
                ..
            } => {
                metrics::replication_lag_seconds(seconds_since(commit_time_us));
                if !self.held.is_empty() {
                    self.at_commit = true;
                    for c in std::mem::take(&mut self.held) {
                        self.on_change(c);
                    }
                    self.at_commit = false;
                }
                self.spilled = false;
                self.txns.commit(end_lsn);
                self.read_through = self.read_through.max(end_lsn);
            }
            // Logical messages are never delivered: any role can emit them, so nothing
            // about their author can be trusted (database broadcasts are rows instead).
            Decoded::Message(_) | Decoded::Ignored => {}
        }
    }

    /// Resolve user types before decoding on; a database that is away is waited for (the
    /// reader task keeps the replication connection alive meanwhile).
    async fn resolve(&mut self, oids: &[walcast_core::pg_type::Oid]) {
        let mut delay = Duration::from_millis(100);
        loop {
            let attempt = async {
                let client = self.sql.get().await?;
                let mut types = self.types.read().unwrap_or_else(|p| p.into_inner()).clone();
                resolve_types(&client, &mut types, oids).await?;
                anyhow::Ok(types)
            };
            match attempt.await {
                Ok(types) => {
                    self.decoder.refresh_type_names(&types);
                    *self.types.write().unwrap_or_else(|p| p.into_inner()) = types;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = ?format!("{e:#}"), retry_in = ?delay, "cannot resolve column types yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RESOLVE_RETRY_MAX);
                }
            }
        }
    }

    fn on_change(&mut self, change: Change) {
        metrics::change_decoded(change.kind.as_str());
        let change = Arc::new(change);
        if let Some(feeds) = &self.feeds {
            // Before routing: a feed subscribing after this change was routed finds it here.
            feeds.history.record(&change);
            metrics::feed_history_bytes(feeds.history.bytes());
        }
        if let Some(topics) = &self.topics {
            if crate::realtime::broadcast::is_message_row(&change) {
                crate::realtime::broadcast::deliver_message_row(topics, &change);
            }
        }
        let relid = change.table.relation_id;
        let now = Instant::now();
        if self.gate_expiry.get(&relid).is_some_and(|at| now >= *at) {
            self.hub.ungate(relid);
            self.gate_expiry.remove(&relid);
        }
        // A DELETE without its old row that `--rls-deletes primary-key` delivers to every
        // role that may SELECT the table is not decided by the row: no gate for it.
        let by_row = !(self.rls_deletes == rls::RlsDeletes::PrimaryKey
            && change.kind == walcast_core::change::ChangeKind::Delete
            && change.table.replica_identity != walcast_pgoutput::ReplicaIdentity::Full);
        let mut routed = if by_row {
            self.hub.route_gated(&change, &mut self.scratch)
        } else {
            self.hub.route_owned(&change, &mut self.scratch)
        };
        if routed.is_empty() {
            return;
        }
        metrics::authz_identities_routed(routed.identities().len() as u64);
        // Decide now where possible: a cached policy without a row check, for an identity
        // with nothing waiting in its lane.
        let identities = routed.identities().to_vec();
        let mut now_decided: Vec<Option<Access>> = Vec::with_capacity(identities.len());
        let mut gate_now: Vec<(
            Arc<walcast_core::hub::Identity>,
            Vec<walcast_core::hub::GateKey>,
        )> = Vec::new();
        let mut gate_until: Option<Instant> = None;
        // Membership tables whose sets gate this table (ungated at their next change).
        let mut gated_by: Vec<u32> = Vec::new();
        let at_commit = self.at_commit;
        // Grouped once per change: per identity it would be identities × routes (with one
        // user per identity, users² per row).
        let by_identity = if self.lanes.anyone_waiting() {
            routed.subscribers_by_identity()
        } else {
            Vec::new()
        };
        {
            let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            // Looked up once per role of this change, not once per identity (one per user).
            let mut by_role: Vec<(&Arc<str>, Option<TimedPolicy>)> = Vec::new();
            let mut values = Vec::new();
            for (k, identity) in identities.iter().enumerate() {
                let key = lane_key(identity);
                let queued = self.lanes.busy(key)
                    || by_identity
                        .get(k)
                        .is_some_and(|subs| self.lanes.waiting_elsewhere(key, subs));
                let decided = if queued {
                    None
                } else {
                    let role = &identity.role;
                    let policy = match by_role
                        .iter()
                        .find(|(r, _)| Arc::ptr_eq(r, role) || **r == *role)
                    {
                        Some((_, p)) => p.clone(),
                        None => {
                            let p = policies.get_timed(role, &change.table);
                            by_role.push((role, p.clone()));
                            p
                        }
                    };
                    match policy {
                        Some((p, compiled)) => match (&p.rows, p.select) {
                            (_, false) | (RowRule::Nothing, _) => Some(Access::Deny),
                            (RowRule::All, true) => Some(rls::access(&p, true, true)),
                            // A recognized shape whose values this identity has: decided
                            // here, no check (authz/shape.rs).
                            (RowRule::Check(c), true) => p.shape.as_ref().and_then(|shape| {
                                if !policies.derived_values_at(
                                    identity,
                                    shape,
                                    at_commit,
                                    &mut values,
                                ) {
                                    return None;
                                }
                                // From now on only rows carrying one of its values reach
                                // it: every other row is one its policies refuse. One that
                                // came through the gate is gated already.
                                if by_row && !routed.via_gate(k) {
                                    if let Some(terms) = shape.index_terms() {
                                        let (keys, sets) = gate_keys(shape, &terms, &values);
                                        let mut until = compiled + rls::POLICY_TTL;
                                        if !sets.is_empty() {
                                            until = until.min(now + SET_GATE_TTL);
                                        }
                                        for r in sets {
                                            if !gated_by.contains(&r) {
                                                gated_by.push(r);
                                            }
                                        }
                                        gate_now.push((identity.clone(), keys));
                                        gate_until = Some(
                                            gate_until.map_or(until, |u: Instant| u.min(until)),
                                        );
                                    }
                                }
                                Some(crate::authz::shape::decide(
                                    &p,
                                    &c.reads,
                                    shape,
                                    &values,
                                    &change,
                                    self.rls_deletes,
                                ))
                            }),
                        },
                        None => None,
                    }
                };
                now_decided.push(decided);
            }
        }
        for r in gated_by {
            let tables = self.set_gates.entry(r).or_default();
            if !tables.contains(&relid) {
                tables.push(relid);
            }
        }
        if let Some(until) = gate_until {
            self.hub.gate(relid, gate_now);
            let at = self.gate_expiry.entry(relid).or_insert(until);
            *at = (*at).min(until);
        }
        if now_decided.iter().all(Option::is_some) {
            self.deliver_now(&change, routed, &now_decided);
            return;
        }
        tracing::trace!(table = ?change.table.name, routes = routed.len(), identities = identities.len(), decided = now_decided.iter().filter(|d| d.is_some()).count(), "routed");
        let txn = self.txns.current();
        let laned: Vec<bool> = now_decided.iter().map(Option::is_none).collect();
        let parts = routed.split_off(&laned);
        for (identity, part) in identities.iter().zip(parts) {
            let Some(mine) = part else { continue };
            self.lanes
                .push(identity, txn, change.clone(), mine, Verdict::Pending);
            self.txns.queued(txn);
            self.gathering_since.get_or_insert_with(Instant::now);
        }
        if !self.holding {
            self.replicator.hold();
            self.holding = true;
        }
        self.deliver_now(&change, routed, &now_decided);
    }

    /// Derive claims values before rows need them: for identities that just got their first
    /// channel, and for every identity of a role whose table policy was just compiled
    /// (the cold start: a thousand users joined before the first row). Each role's
    /// identities go in one pipelined round trip (`shape::derive_many`), beside the loop;
    /// once cached, [`Pump::gate_known`] gates them, so a table's rows reach only the
    /// identities whose values they carry from the first row on, and each is decided in
    /// process. Identities whose values are known already are gated at once (a policy
    /// compiled again after its 10 s limit re-gates everyone in one step). Nothing here
    /// decides a row: a derivation that fails or raises leaves the identity as it was
    /// (underived: its first row derives it, or unusable: per-group checks), and a
    /// policy change forgets the table's policies and gates exactly as before.
    fn derive_ahead(&mut self) {
        let arrived = self.hub.take_arrivals();
        let compiled = self
            .policies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_compiled();
        self.ahead_waiting.extend(arrived);
        if !compiled.is_empty() {
            let roles: Vec<&Arc<str>> = compiled.iter().map(|(r, _)| r).collect();
            for identity in self.hub.identities_with_channels() {
                if roles.iter().any(|r| **r == identity.role) {
                    self.ahead_waiting.push(identity);
                }
            }
        }
        if self.ahead_waiting.is_empty() || self.ahead.len() >= AHEAD_IN_FLIGHT {
            return;
        }
        let waiting = std::mem::take(&mut self.ahead_waiting);
        let mut seen: std::collections::HashSet<usize> = Default::default();
        let mut known = Vec::new();
        // Per role: each identity with the (cache key, expression) of each value it lacks.
        let mut wanted: std::collections::BTreeMap<Arc<str>, Vec<Wanted>> = Default::default();
        {
            let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            let mut shapes_of: std::collections::HashMap<Arc<str>, Vec<Arc<rls::TablePolicy>>> =
                Default::default();
            for identity in waiting {
                if !seen.insert(Arc::as_ptr(&identity) as usize) {
                    continue;
                }
                let shaped = shapes_of
                    .entry(identity.role.clone())
                    .or_insert_with(|| self.current_shaped(&policies, &identity.role));
                if shaped.is_empty() {
                    continue;
                }
                let mut missing: Vec<(Arc<str>, Arc<str>)> = Vec::new();
                for p in shaped.iter() {
                    let Some(shape) = &p.shape else { continue };
                    for m in policies.underived(&identity, shape) {
                        if !missing.iter().any(|(k, _)| *k == m.0) {
                            missing.push(m);
                        }
                    }
                }
                if missing.is_empty() {
                    known.push(identity);
                } else {
                    wanted
                        .entry(identity.role.clone())
                        .or_default()
                        .push((identity, missing));
                }
            }
        }
        self.gate_known(&known);
        for (role, wanted) in wanted {
            let pool = self.authz.clone();
            let cache = self.policies.clone();
            let asked: Vec<Arc<walcast_core::hub::Identity>> =
                wanted.iter().map(|(i, _)| i.clone()).collect();
            self.ahead_running
                .extend(asked.iter().map(|i| Arc::as_ptr(i) as usize));
            self.ahead.push(Box::pin(async move {
                let requests: Vec<(Arc<walcast_core::hub::Identity>, Vec<Arc<str>>)> = wanted
                    .iter()
                    .map(|(i, m)| (i.clone(), m.iter().map(|(_, e)| e.clone()).collect()))
                    .collect();
                match crate::authz::shape::derive_many(&pool, &role, &requests).await {
                    Ok(values) => {
                        let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
                        let mut derived = Vec::new();
                        for ((identity, missing), values) in wanted.into_iter().zip(values) {
                            if let Some(values) = values {
                                let keys = missing.into_iter().map(|(k, _)| k).collect();
                                cache.insert_derived(&identity, keys, values);
                                derived.push(identity);
                            }
                        }
                        (asked, derived)
                    }
                    Err(e) => {
                        // Left underived: each identity's first row derives it, as before.
                        tracing::debug!(error = ?e.to_string(), identities = requests.len(), "deriving claims values ahead of rows failed");
                        (asked, Vec::new())
                    }
                }
            }));
        }
    }

    /// The unexpired cached policies of `role` that decide rows by a row check with SELECT
    /// granted, compiled for their relation's current table (a policy compiled for an older
    /// shape of the table indexes other columns).
    fn current_checked(&self, policies: &PolicyCache, role: &str) -> Vec<CachedPolicy> {
        policies
            .policies_of(role)
            .into_iter()
            .filter(|(table, p, _)| {
                self.decoder
                    .table(table.relation_id)
                    .is_some_and(|now| Arc::ptr_eq(now, table))
                    && p.select
                    && matches!(p.rows, RowRule::Check(_))
            })
            .collect()
    }

    /// Of [`Pump::current_checked`], those that decide rows in process (a recognized shape).
    fn current_shaped(&self, policies: &PolicyCache, role: &str) -> Vec<Arc<rls::TablePolicy>> {
        self.current_checked(policies, role)
            .into_iter()
            .filter(|(_, p, _)| p.shape.is_some())
            .map(|(_, p, _)| p)
            .collect()
    }

    /// Gate `identities` on every relation whose current policy for their role they have
    /// all values for: what the pump does when it decides such an identity in process
    /// (`on_change`), done ahead of its rows.
    fn gate_known(&mut self, identities: &[Arc<walcast_core::hub::Identity>]) {
        if identities.is_empty() {
            return;
        }
        type Gated = (
            Vec<(
                Arc<walcast_core::hub::Identity>,
                Vec<walcast_core::hub::GateKey>,
            )>,
            Instant,
        );
        let mut by_relid: std::collections::HashMap<u32, Gated> = Default::default();
        {
            let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
            let mut shaped_of: std::collections::HashMap<Arc<str>, Vec<CachedPolicy>> =
                Default::default();
            let mut values = Vec::new();
            for identity in identities {
                let shaped = shaped_of
                    .entry(identity.role.clone())
                    .or_insert_with(|| self.current_checked(&policies, &identity.role));
                for (table, p, compiled) in shaped.iter() {
                    let Some(shape) = &p.shape else { continue };
                    let Some(terms) = shape.index_terms() else {
                        continue;
                    };
                    if !policies.derived_values(identity, shape, &mut values) {
                        continue;
                    }
                    // Without sets (`derived_values`): a membership shape is never gated
                    // ahead, its sets are derived with the rows they judge.
                    let (keys, _) = gate_keys(shape, &terms, &values);
                    let until = *compiled + rls::POLICY_TTL;
                    let entry = by_relid
                        .entry(table.relation_id)
                        .or_insert_with(|| (Vec::new(), until));
                    entry.0.push((identity.clone(), keys));
                    entry.1 = entry.1.min(until);
                }
            }
        }
        for (relid, (gated, until)) in by_relid {
            self.hub.gate(relid, gated);
            let at = self.gate_expiry.entry(relid).or_insert(until);
            *at = (*at).min(until);
        }
    }

    fn deliver_now(
        &mut self,
        change: &Change,
        routed: walcast_core::hub::Routed,
        decided: &[Option<Access>],
    ) {
        let denied = decided
            .iter()
            .filter(|d| matches!(d, Some(Access::Deny)))
            .count();
        if denied > 0 {
            metrics::delivery_dropped_n("unauthorized", denied as u64);
        }
        let stats = self
            .hub
            .deliver_routed(change, routed, &mut self.scratch, |k| {
                decided.get(k).cloned().flatten().unwrap_or(Access::Deny)
            });
        record(&stats, change);
    }

    /// Start check batches for the lanes that are ready, when the pump is caught up with the
    /// stream (or items have gathered long enough).
    fn launch_checks(&mut self) {
        let now = Instant::now();
        let gathered = self
            .gathering_since
            .is_some_and(|t| now.duration_since(t) >= GATHER_MAX);
        // Waiting for the buffered stream is worth it only while reading it can end the
        // wait: with the lanes full the pump reads nothing until checks free them, so no
        // push restarts the gathering clock and the buffer never drains (the 1,000-user
        // membership bench stopped for good at 100,000 queued items). A retry that is due
        // does not wait either.
        let reading = self.lanes.items() < MAX_QUEUED;
        let retry_due = self.lanes.next_retry().is_some_and(|t| t <= now);
        if self.replicator.has_buffered() && !gathered && reading && !retry_due {
            return;
        }
        let ready = self.lanes.ready(now);
        if ready.is_empty() {
            // Every pending item is in a lane checking (its batch's end re-arms the clock)
            // or backing off (`next_wake`): a clock left running would only spin the loop.
            self.gathering_since = None;
            return;
        }
        // Lanes left pending for a later round (solo batches at their limit) start it within
        // GATHER_MAX even while the stream stays busy, not only once the buffer drains.
        let mut left = false;
        let generation = self.lanes.generation();
        // Lanes proven fast share a transaction per role; the others run alone. A lane whose
        // items all fall on tables whose cached policy needs no per-group statement (a shape
        // decided in process, or no row check at all) cannot be slow: it shares too, and
        // the batch computes the claims values of all its new identities in one round trip
        // (checks::prederive), which is what makes a thousand new users cheap.
        // Shared batches start only while the pool has a connection for them. Lanes that
        // become ready meanwhile wait for the next one and go together: one statement per
        // claims group then covers all their items. Started at once instead, every finished
        // batch sent the one or two lanes it freed as a batch of their own, a round trip
        // (and a snapshot wait) per handful of rows: per-group policies at 1,000 users ran
        // at a fifth of their speed. Solo batches have their own limit, so a slow policy
        // never holds back the fast ones.
        let shared_room = AUTHZ_PARALLEL.saturating_sub(self.shared_in_flight);
        let policies = self.policies.lock().unwrap_or_else(|p| p.into_inner());
        let mut shared: std::collections::BTreeMap<Arc<str>, Vec<LaneWork>> = Default::default();
        let mut solo: Vec<LaneWork> = Vec::new();
        for key in ready {
            let Some(lane) = self.lanes.get_mut(key) else {
                continue;
            };
            // Its values are being derived ahead (one round trip for many identities): it
            // goes once they are known, decided in process, instead of deriving them again.
            if self
                .ahead_running
                .contains(&(Arc::as_ptr(&lane.identity) as usize))
            {
                continue;
            }
            let cheap = lane
                .items
                .iter()
                .filter(|i| i.verdict == Verdict::Pending)
                .all(|i| {
                    policies
                        .get(&lane.identity.role, &i.change.table)
                        .is_some_and(|p| p.shape.is_some() || !matches!(p.rows, RowRule::Check(_)))
                });
            let shares = cheap || lane.shares(now);
            if shares && shared_room == 0 {
                // Goes with the next free connection (a batch's end wakes the loop).
                continue;
            }
            // Solo batches wait for the pool anyway: beyond a few in flight, a lane waits
            // for the next round, by when its table's policy is compiled and may be cheap.
            if !shares && self.checks.len() + solo.len() >= SOLO_IN_FLIGHT {
                left = true;
                continue;
            }
            let mut items = Vec::new();
            for item in lane.items.iter_mut() {
                if item.verdict == Verdict::Pending && items.len() < BATCH_MAX {
                    item.verdict = Verdict::Checking;
                    items.push((item.seq, item.change.clone()));
                }
            }
            lane.recount();
            lane.checking = true;
            let work = LaneWork {
                key,
                identity: lane.identity.clone(),
                items,
            };
            if shares {
                shared
                    .entry(lane.identity.role.clone())
                    .or_default()
                    .push(work);
            } else {
                solo.push(work);
            }
        }
        drop(policies);
        self.gathering_since = left.then_some(now);
        let mut batches: Vec<(Vec<LaneWork>, bool)> =
            solo.into_iter().map(|w| (vec![w], false)).collect();
        for (_, works) in shared {
            let n = works.len().clamp(1, shared_room.max(1));
            let mut parts: Vec<Vec<LaneWork>> = (0..n).map(|_| Vec::new()).collect();
            for (i, w) in works.into_iter().enumerate() {
                parts[i % n].push(w);
            }
            batches.extend(
                parts
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .map(|p| (p, true)),
            );
        }
        tracing::debug!(batches = batches.len(), "authorization batches started");
        for (batch, shared) in batches {
            let pool = self.authz.clone();
            let cache = self.policies.clone();
            self.shared_in_flight += usize::from(shared);
            let run = checks::run(pool, cache, batch, generation, self.rls_deletes);
            self.checks
                .push(Box::pin(async move { (run.await, shared) }));
        }
    }

    /// The verdicts of a batch: decide items, deliver each lane's decided prefix, stop the
    /// identities whose check failed.
    fn apply(&mut self, result: BatchResult) {
        if result.generation != self.lanes.generation() {
            return;
        }
        tracing::debug!(lanes = result.lanes.len(), "authorization batch finished");
        let now = Instant::now();
        let mut stop: Vec<(u64, String)> = Vec::new();
        for (key, outcomes, slowest) in result.lanes {
            let Some(lane) = self.lanes.get_mut(key) else {
                continue;
            };
            lane.checking = false;
            let mut unavailable = false;
            let mut outcomes: std::collections::HashMap<u64, ItemOutcome> =
                outcomes.into_iter().collect();
            for item in lane.items.iter_mut() {
                let Some(outcome) = outcomes.remove(&item.seq) else {
                    continue;
                };
                item.verdict = match outcome {
                    ItemOutcome::Decided(access) => Verdict::Known(access),
                    ItemOutcome::Unavailable => {
                        unavailable = true;
                        Verdict::Pending
                    }
                    ItemOutcome::Failed { code, message } => {
                        tracing::warn!(%code, error = ?message, role = ?lane.identity.role,
                            "authorization failed; stopping this identity's changes");
                        let text = format!(
                            "Unable to authorize changes for this channel's token: a row-level security check failed (SQLSTATE {code}); the subscription was stopped"
                        );
                        for id in item.routed.subscribers_of(0) {
                            if !stop.iter().any(|(s, _)| *s == id) {
                                stop.push((id, text.clone()));
                            }
                        }
                        Verdict::Known(Access::Deny)
                    }
                };
            }
            lane.recount();
            if unavailable {
                lane.unavailable(now);
                tracing::warn!(role = ?lane.identity.role, retry_at = ?lane.retry_at,
                    "authorization unavailable; this identity's changes wait for it");
            } else {
                lane.available();
                lane.record_speed(slowest, now);
            }
            // Items queued while it was checking: they start a round within GATHER_MAX
            // (the clock may have been reset when the lane was not ready).
            if lane.ready(now) {
                self.gathering_since.get_or_insert(now);
            }
            self.deliver_lane(key);
        }
        // A lane that delivered may have opened another's gate (a channel whose token
        // changed): look at every lane whose front is decided until nothing moves.
        loop {
            let mut moved = false;
            for key in self.lanes.decided_fronts() {
                moved |= self.deliver_lane(key);
            }
            if !moved {
                break;
            }
        }
        self.lanes.prune(now);
        let mut stopped = 0;
        for (id, text) in stop {
            if self.hub.fail(id, &text) {
                stopped += 1;
            }
        }
        if stopped > 0 {
            metrics::authz_stopped(stopped);
        }
    }

    /// Deliver what `key`'s lane may deliver now; whether anything went.
    fn deliver_lane(&mut self, key: crate::wal::lanes::LaneKey) -> bool {
        let ready = self.lanes.deliverable(key);
        tracing::trace!(lane = key, delivered = ready.len(), state = ?self.lanes.describe(key), "lane delivery");
        let moved = !ready.is_empty();
        for item in ready {
            let Verdict::Known(access) = item.verdict else {
                continue;
            };
            if access == Access::Deny {
                metrics::delivery_dropped("unauthorized");
            }
            let stats =
                self.hub
                    .deliver_routed(&item.change, item.routed, &mut self.scratch, |_| {
                        access.clone()
                    });
            record(&stats, &item.change);
            self.txns.finished(item.txn);
        }
        moved
    }

    /// Confirm what has been delivered, and tell those waiting for delivery to get somewhere
    /// (aligned snapshots).
    fn confirm(&mut self) {
        if self.holding {
            match self.txns.confirmable() {
                None => {
                    self.replicator.release();
                    self.holding = false;
                }
                Some(Lsn(0)) => {}
                Some(lsn) => {
                    self.replicator.release_to(lsn);
                    self.health.delivered(lsn);
                }
            }
        }
        if !self.holding {
            self.health.delivered(self.read_through);
        }
    }

    /// The next moment the loop must look again without an event: a lane's retry, or the
    /// end of gathering.
    fn next_wake(&self) -> Option<tokio::time::Instant> {
        let gather = self.gathering_since.map(|t| t + GATHER_MAX);
        let retry = self.lanes.next_retry();
        let at = match (gather, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        Some(tokio::time::Instant::from_std(at))
    }
}

/// An identity's gate keys for a shape's index terms: (column, its value) for each term
/// whose value is not NULL (a NULL value matches no row), and (column, member) for each
/// member of a membership term's set; with the membership tables those sets came from (the
/// gate must go at their next change).
fn gate_keys(
    shape: &crate::authz::shape::Shape,
    terms: &[usize],
    values: &[TermValue<'_>],
) -> (Vec<walcast_core::hub::GateKey>, Vec<u32>) {
    let mut keys = Vec::new();
    let mut sets = Vec::new();
    for &t in terms {
        let Some(term) = shape.terms.get(t) else {
            continue;
        };
        match values.get(t) {
            Some(TermValue::One(Some(v))) => keys.push((term.column, (*v).into())),
            Some(TermValue::Set(set)) => {
                keys.extend(set.iter().map(|v| (term.column, (**v).into())));
                if let Some(r) = term.set {
                    if !sets.contains(&r) {
                        sets.push(r);
                    }
                }
            }
            _ => {}
        }
    }
    (keys, sets)
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn record(stats: &walcast_core::hub::DispatchStats, change: &Change) {
    metrics::changes_delivered(stats.delivered);
    if stats.delivered > 0 {
        metrics::commit_to_send(seconds_since(change.commit_time_us));
    }
    if stats.dropped > 0 {
        metrics::delivery_dropped_n("slow_client", stats.dropped);
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

/// Where the pump's events come from: the slot (one node, or the cluster's streamer), or in
/// cluster mode [`crate::cluster::changes::ClusterSource`], which streams the slot while
/// this node holds the lease and follows the cluster's change stream otherwise. An enum, not
/// a trait object: the single-node path stays a direct call.
// The Replicator stays inline (one Source per process): no extra indirection on its path.
#[allow(clippy::large_enum_variant)]
pub enum Source {
    Slot(Replicator),
    Cluster(Box<crate::cluster::changes::ClusterSource>),
}

impl Source {
    async fn recv(&mut self) -> Option<Result<StreamEvent, walcast_replication::ReplicationError>> {
        match self {
            Source::Slot(r) => r.recv().await,
            Source::Cluster(c) => c.recv().await,
        }
    }

    fn reconnect(&mut self, reason: String) {
        match self {
            Source::Slot(r) => r.reconnect(reason),
            Source::Cluster(c) => c.reconnect(reason),
        }
    }

    fn mark_handed_on(&mut self) {
        match self {
            Source::Slot(r) => r.mark_handed_on(),
            Source::Cluster(c) => c.mark_handed_on(),
        }
    }

    fn hold(&mut self) {
        match self {
            Source::Slot(r) => r.hold(),
            Source::Cluster(c) => c.hold(),
        }
    }

    fn release_to(&mut self, lsn: Lsn) {
        match self {
            Source::Slot(r) => r.release_to(lsn),
            Source::Cluster(c) => c.release_to(lsn),
        }
    }

    fn release(&mut self) {
        match self {
            Source::Slot(r) => r.release(),
            Source::Cluster(c) => c.release(),
        }
    }

    fn has_buffered(&self) -> bool {
        match self {
            Source::Slot(r) => r.has_buffered(),
            Source::Cluster(c) => c.has_buffered(),
        }
    }

    fn handed_on(&self) -> Lsn {
        match self {
            Source::Slot(r) => r.handed_on(),
            Source::Cluster(c) => c.handed_on(),
        }
    }

    /// Changes are coming (the slot is streamed, or the change stream is followed).
    fn is_up(&self) -> bool {
        match self {
            Source::Slot(r) => r.backend_pid().is_some(),
            Source::Cluster(c) => c.is_up(),
        }
    }

    /// This node streams the slot right now.
    fn is_streaming_slot(&self) -> bool {
        match self {
            Source::Slot(r) => r.backend_pid().is_some(),
            Source::Cluster(c) => c.is_streaming_slot(),
        }
    }

    async fn shutdown(self) -> Result<Lsn, walcast_replication::ReplicationError> {
        match self {
            Source::Slot(r) => r.shutdown().await,
            Source::Cluster(c) => c.shutdown().await,
        }
    }
}
