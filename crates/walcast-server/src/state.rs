//! Process-wide state shared by the HTTP handlers, socket tasks and the replication pump.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use walcast_core::broadcast::Topics;
use walcast_core::hub::Hub;
use walcast_core::pg_type::TypeRegistry;

use crate::auth::JwtVerifier;
use crate::db::sql::{ExclusivePool, SqlPool};
use crate::realtime::broadcast::{BroadcastLimits, RateWindow};

/// Settings the socket layer needs.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_channels_per_client: usize,
    pub socket_send_queue: usize,
    pub max_frame_bytes: usize,
    pub idle_timeout: Duration,
    pub channel_error_backoff: Duration,
    pub connect_error_backoff: Duration,
    /// Broadcast and presence limits.
    pub broadcast: BroadcastLimits,
    pub max_connections: u64,
    pub max_joins_per_second: u32,
    /// Broadcast and presence pushes one channel may send per second.
    pub max_events_per_second: u32,
    /// Exact origins allowed to open WebSockets; `None` allows any.
    pub allowed_origins: Option<Vec<String>>,
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
    /// Set once shutdown began: new joins are refused.
    pub shutting_down: AtomicBool,
    /// Connections for authorization checks (RLS on changes, private channels): each check
    /// owns its session (role, claims, timeout) while it runs.
    pub authz: Arc<ExclusivePool>,
    /// Broadcast topics and presence.
    pub topics: Arc<Topics>,
    /// Messages accepted by the REST broadcast endpoints in the current second.
    pub rest_rate: RateWindow,
    next_subscriber: AtomicU64,
    sockets: AtomicU64,
    /// (unix second, joins counted in it) for the server-wide join rate.
    join_window: std::sync::Mutex<(i64, u32)>,
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
    ) -> AppState {
        let authz = Arc::new(ExclusivePool::new(sql.config().clone(), "walcast authz", 4));
        AppState {
            authz,
            jwt,
            hub,
            sql,
            publication,
            limits,
            types,
            streaming,
            shutting_down: AtomicBool::new(false),
            topics: Arc::new(Topics::new(ref_salt())),
            rest_rate: RateWindow::new(Duration::from_secs(1)),
            next_subscriber: AtomicU64::new(1),
            sockets: AtomicU64::new(0),
            join_window: std::sync::Mutex::new((0, 0)),
        }
    }

    /// Count a socket in (returns a guard that counts it out when dropped).
    pub fn socket_guard(self: &Arc<Self>) -> SocketGuard {
        self.sockets.fetch_add(1, Ordering::AcqRel);
        SocketGuard(self.clone())
    }

    /// Count a join against the per-second budget; false when over it.
    pub fn allow_join(&self) -> bool {
        let now = now_unix();
        let mut w = self.join_window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0 != now {
            *w = (now, 0);
        }
        w.1 = w.1.saturating_add(1);
        w.1 <= self.limits.max_joins_per_second
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

    /// Wait (bounded) until the replication stream runs, so a join reply never promises
    /// changes the stream cannot deliver yet.
    pub async fn wait_streaming(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.is_streaming() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
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

/// Counts an open socket for graceful shutdown.
pub struct SocketGuard(Arc<AppState>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::AcqRel);
    }
}
