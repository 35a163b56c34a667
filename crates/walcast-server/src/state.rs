//! Process-wide state shared by the HTTP handlers, socket tasks and the replication pump.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use walcast_core::broadcast::Topics;
use walcast_core::hub::Hub;
use walcast_core::pg_type::TypeRegistry;

use crate::auth::JwtVerifier;
use crate::authz::roles::TokenRoles;
use crate::db::sql::{ExclusivePool, SqlPool};
use crate::realtime::broadcast::BroadcastLimits;
use crate::realtime::limiter::Limited;

/// Settings the socket layer needs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_channels_per_client: usize,
    pub socket_send_queue: usize,
    /// Bytes one socket's send queue may hold.
    pub socket_send_queue_bytes: usize,
    /// Longest a socket's write may make no progress.
    pub write_timeout: Duration,
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    pub channel_error_backoff: Duration,
    pub connect_error_backoff: Duration,
    /// Broadcast and presence limits.
    pub broadcast: BroadcastLimits,
    pub max_connections: u64,
    /// Joins per second, server-wide.
    pub max_joins_per_second: u32,
    /// Joins per second per client (all its sockets) and per socket.
    pub max_joins_per_second_per_client: u32,
    pub max_joins_per_second_per_socket: u32,
    /// REST broadcast messages per second, server-wide and per client.
    pub max_http_broadcasts_per_second: u32,
    pub max_http_broadcasts_per_second_per_client: u32,
    /// Channels one topic may hold; 0 = no cap.
    pub max_members_per_channel: usize,
    /// Broadcast and presence pushes one channel may send per second.
    pub max_events_per_second: u32,
    /// Exact origins allowed to open WebSockets; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
    /// Session resume: window and buffer bounds.
    pub resume: crate::realtime::resume::SessionLimits,
    /// Public channels are refused (`--private-only`).
    pub private_only: bool,
    /// Presence is on for every channel (`--presence-enabled`).
    pub presence_enabled: bool,
    /// How DELETEs on RLS tables without their old row are delivered (joins warn
    /// subscribers who would miss them).
    pub rls_deletes: crate::authz::rls::RlsDeletes,
    /// Cap on how long a `postgres_changes_options.wait` join is held
    /// (`--postgres-changes-wait-max-ms`).
    pub postgres_changes_wait_max: Duration,
    /// How long `replication_ready` waits for the stream (`--replication-ready-timeout-ms`).
    pub replication_ready_timeout: Duration,
}

/// Shared by everything in `walcast serve`.
pub struct AppState {
    pub jwt: JwtVerifier,
    pub hub: Arc<Hub>,
    pub sql: Arc<SqlPool>,
    pub publication: String,
    pub limits: Limits,
    /// Type catalog shared with the pump (filters are compiled against column types).
    pub types: Arc<RwLock<TypeRegistry>>,
    /// True while the replication stream is established.
    pub streaming: Arc<AtomicBool>,
    /// Why the stream is (not) running, for `/readyz`.
    pub health: Arc<Health>,
    /// Set once shutdown began: new joins are refused.
    pub shutting_down: AtomicBool,
    /// Connections for authorization checks (RLS on changes, private channels): each check
    /// owns its session (role, claims, timeout) while it runs.
    pub authz: Arc<ExclusivePool>,
    /// Broadcast topics and presence.
    pub topics: Arc<Topics>,
    /// Joins per client and server-wide.
    pub join_limits: Limited,
    /// REST broadcast messages per client and server-wide.
    pub rest_limits: Limited,
    /// Which token roles clients may use.
    pub token_roles: TokenRoles,
    /// Channels of sockets opened with a `session_id`, live and parked.
    pub sessions: Arc<crate::realtime::resume::Sessions>,
    /// Change feeds (SSE, long-poll): the history they resume from.
    pub feeds: Arc<crate::feed::Feeds>,
    /// What joins read from the catalog (the pump invalidates it on Relation messages).
    pub catalog: Arc<crate::db::catalog_cache::CatalogCache>,
    /// Private-channel read checks, batched into shared round trips.
    pub private_reads: crate::authz::private::ReadBatcher,
    /// Cluster mode (`--redis-url`): this node and the Redis it shares with the others.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Cluster mode, running: the Redis link, node registry and broadcast/presence bus.
    pub cluster_node: Option<Arc<crate::cluster::ClusterNode>>,
    /// Cluster mode: the per-client join and HTTP broadcast shares, counted on every node.
    pub cluster_limits: Option<Arc<crate::cluster::limits::ClusterLimits>>,
    next_subscriber: AtomicU64,
    sockets: AtomicU64,
}

impl AppState {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        jwt: JwtVerifier,
        hub: Arc<Hub>,
        sql: Arc<SqlPool>,
        publication: String,
        limits: Limits,
        types: Arc<RwLock<TypeRegistry>>,
        streaming: Arc<AtomicBool>,
        token_roles: TokenRoles,
    ) -> AppState {
        let authz = Arc::new(ExclusivePool::new(sql.config().clone(), "walcast authz", 4));
        let catalog = Arc::new(crate::db::catalog_cache::CatalogCache::new(
            sql.clone(),
            &publication,
        ));
        let private_reads = crate::authz::private::ReadBatcher::new(authz.clone());
        let now = std::time::Instant::now();
        AppState {
            join_limits: Limited::new(
                limits.max_joins_per_second_per_client,
                limits.max_joins_per_second,
                now,
            ),
            rest_limits: Limited::new(
                limits.max_http_broadcasts_per_second_per_client,
                limits.max_http_broadcasts_per_second,
                now,
            ),
            token_roles,
            sessions: Arc::new(crate::realtime::resume::Sessions::new(
                limits.resume.clone(),
            )),
            authz,
            feeds: Arc::default(),
            catalog,
            private_reads,
            cluster: None,
            cluster_node: None,
            cluster_limits: None,
            jwt,
            hub,
            sql,
            publication,
            limits,
            types,
            streaming,
            health: Arc::new(Health::default()),
            shutting_down: AtomicBool::new(false),
            topics: Arc::new(Topics::new(ref_salt())),
            next_subscriber: AtomicU64::new(1),
            sockets: AtomicU64::new(0),
        }
    }

    /// Run as a node of `cluster` (`None`: one process).
    pub fn with_cluster(mut self, cluster: Option<Arc<crate::cluster::Cluster>>) -> AppState {
        self.cluster = cluster;
        self
    }

    /// Start the cluster machinery (link, registry, bus) when running as a node; must run
    /// inside the runtime. A no-op without `--redis-url`.
    pub fn with_cluster_node(mut self) -> AppState {
        if let Some(c) = self.cluster.clone() {
            crate::metrics::describe_cluster();
            self.cluster_node = Some(crate::cluster::ClusterNode::start(
                c.clone(),
                self.topics.clone(),
            ));
            self.cluster_limits = Some(Arc::new(crate::cluster::limits::ClusterLimits::start(
                c,
                self.join_limits.per_client(),
                self.rest_limits.per_client(),
            )));
        }
        self
    }

    /// Relay a client or HTTP broadcast to the other cluster nodes (no-op in one process).
    /// Never for database broadcasts: every node gets those from the change stream.
    pub fn relay_broadcast(
        &self,
        key: &walcast_core::broadcast::TopicKey,
        body: &walcast_core::broadcast::Body,
        stored_id: Option<&str>,
    ) {
        if let Some(node) = &self.cluster_node {
            node.relay(key, body, stored_id);
        }
    }

    /// Take a socket slot: counted in first, then checked, so concurrent upgrades can never
    /// exceed `--max-connections` together. `None` when the server is full.
    pub fn try_socket_slot(self: &Arc<Self>) -> Option<SocketGuard> {
        let guard = SocketGuard(self.clone());
        let before = self.sockets.fetch_add(1, Ordering::AcqRel);
        (before < self.limits.max_connections).then_some(guard)
    }

    pub fn open_sockets(&self) -> u64 {
        self.sockets.load(Ordering::Acquire)
    }

    /// A fresh id for a joined channel.
    pub fn next_subscriber_id(&self) -> u64 {
        self.next_subscriber.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_streaming(&self) -> bool {
        self.streaming.load(Ordering::Acquire)
    }
}

/// Where the replication stream stands, for `/readyz` and for channels told about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Never streamed yet.
    Starting(String),
    Streaming,
    /// Lost; reconnecting with backoff.
    Lost(String),
    /// A definite condition (slot dropped or invalidated, wal_level, authentication): no
    /// more streaming until an operator acts.
    Stopped(String),
}

/// The shared readiness state, and how far delivery has got.
#[derive(Debug)]
pub struct Health {
    readiness: std::sync::Mutex<Readiness>,
    /// Every transaction whose commit record lies at or before this LSN has been delivered
    /// to (or decided for) every channel. Moves forward only; the pump sets it.
    delivered: tokio::sync::watch::Sender<walcast_replication::Lsn>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            readiness: std::sync::Mutex::new(Readiness::Starting(
                "connecting to the database".into(),
            )),
            delivered: tokio::sync::watch::Sender::new(walcast_replication::Lsn(0)),
        }
    }
}

impl Health {
    pub fn get(&self) -> Readiness {
        self.readiness
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, r: Readiness) {
        *self.readiness.lock().unwrap_or_else(|p| p.into_inner()) = r;
    }

    /// Delivery has got through `lsn` (see [`Health::delivered_through`]).
    pub fn delivered(&self, lsn: walcast_replication::Lsn) {
        self.delivered.send_if_modified(|at| {
            let moved = lsn > *at;
            if moved {
                *at = lsn;
            }
            moved
        });
    }

    /// Every transaction committed at or before this LSN has been delivered everywhere.
    pub fn delivered_through(&self) -> walcast_replication::Lsn {
        *self.delivered.borrow()
    }

    /// Wait until delivery got through `lsn`; false after `timeout`.
    pub async fn wait_delivered(
        &self,
        lsn: walcast_replication::Lsn,
        timeout: std::time::Duration,
    ) -> bool {
        let mut rx = self.delivered.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|at| *at >= lsn))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// Salt for presence refs, so refs differ across restarts.
fn ref_salt() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Counts an open socket (for `--max-connections` and graceful shutdown) until dropped.
pub struct SocketGuard(Arc<AppState>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}

impl AppState {
    /// Cluster mode: take `n` joins from `client`'s share counted on every node (after the
    /// node's own limits passed). Always true in one process.
    pub fn cluster_join_share(&self, client: &Arc<str>, n: u32) -> bool {
        self.cluster_limits.as_ref().is_none_or(|l| {
            l.joins
                .check(client, crate::cluster::limits::second_now(), n)
        })
    }

    /// The same for HTTP broadcasts.
    pub fn cluster_http_broadcast_share(&self, client: &Arc<str>, n: u32) -> bool {
        self.cluster_limits.as_ref().is_none_or(|l| {
            l.http_broadcasts
                .check(client, crate::cluster::limits::second_now(), n)
        })
    }
}
