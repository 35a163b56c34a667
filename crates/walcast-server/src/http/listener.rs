//! The accept loop: HTTP/1.1 with WebSocket upgrades, TCP_NODELAY on every connection, and a
//! bound on connections that are not doing anything useful yet.
//!
//! ```text
//!  accept ─▶ connection task ──request in flight──▶ (busy: not pending)
//!              │   ▲                                      │ response body done
//!              │   └──────────────────────────────────────┘
//!              │ no request in flight = pending:
//!              │   closed after --handshake-timeout-secs without one (nothing sent, a
//!              │   trickled request, an HTTP/2 preface, an idle keep-alive)
//!              │   at most --max-pending-connections: the oldest is closed for a newcomer
//!              └─ upgraded to a WebSocket: the connection task ends, the socket task owns it
//! ```
//!
//! Why not `axum::serve`: it sets no deadline on a connection that sends nothing (or
//! trickles its handshake), so such connections pile up until the process runs out of file
//! descriptors and even `/healthz` stops answering; and it leaves Nagle's algorithm on, which
//! delays small frames.
//!
//! Invariants:
//! - A connection without a request in flight never lives longer than the handshake timeout,
//!   and never more than `max_pending` of them exist: what an idle client can hold is bounded
//!   whatever it sends. Connections serving a long response (an event stream) are busy, not
//!   pending.
//! - File descriptors are budgeted at start ([`fd_budget`]): sockets, pending connections and
//!   a reserve for the database and the health endpoints fit under `RLIMIT_NOFILE`. Should
//!   `accept` still hit the limit, one descriptor held in reserve is released to accept and
//!   close the newcomer, so the listen queue keeps moving.
//! - Only HTTP/1.1 is served: the clients speak it for WebSockets and REST, and an h2c
//!   preface is answered like any other garbage (closed at the deadline).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tower::ServiceExt;

/// How the accept loop treats connections.
#[derive(Debug, Clone, Copy)]
pub struct ListenerConfig {
    /// Longest a connection may be pending (no request in flight, not upgraded).
    pub handshake_timeout: Duration,
    /// Most pending connections at once.
    pub max_pending: usize,
}

/// Serve `app` until `shutdown` resolves; connections already upgraded keep running (their
/// tasks watch the shutdown signal themselves).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: ListenerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut builder = Builder::new(TokioExecutor::new()).http1_only();
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.handshake_timeout);
    let pending = Arc::new(PendingSet::new(config.max_pending));
    let mut reserve = Reserve::open();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors: an idle pending connection makes room first, so a
                    // probe or a real client at the head of the queue is not the one shed.
                    if is_out_of_descriptors(&e) && pending.evict_oldest() {
                        tracing::debug!("out of file descriptors: closed the oldest pending connection");
                        pending.settled(Duration::from_millis(100)).await;
                        continue;
                    }
                    if is_out_of_descriptors(&e) && reserve.shed(&listener).await {
                        tracing::warn!("out of file descriptors: a new connection was closed at once");
                        continue;
                    }
                    tracing::warn!(error = ?e.to_string(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let (id, kill) = pending.enter();
        // A newcomer that evicted someone waits until that one's descriptor is free, so
        // pending connections never exceed their budget even for a moment.
        pending.settled(Duration::from_millis(100)).await;
        let service = {
            let app = app.clone();
            let activity = activity.clone();
            let pending = pending.clone();
            hyper::service::service_fn(
                move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let started = activity.begin(&pending, id);
                    let app = app.clone();
                    async move {
                        let resp = app.oneshot(req.map(Body::new)).await?;
                        Ok::<_, Infallible>(resp.map(|b| {
                            Body::new(Tracked {
                                inner: b,
                                _guard: started,
                            })
                        }))
                    }
                },
            )
        };
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let timeout = config.handshake_timeout;
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut conn = Box::pin(conn);
            let mut deadline = Instant::now() + timeout;
            loop {
                tokio::select! {
                    res = conn.as_mut() => {
                        if let Err(e) = res {
                            tracing::debug!(%peer, error = ?e.to_string(), "http connection ended with an error");
                        }
                        break;
                    }
                    _ = kill.notified() => {
                        tracing::debug!(%peer, "closing the oldest pending connection for a newcomer");
                        break;
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        match activity.idle_deadline(timeout) {
                            Some(at) if at <= Instant::now() => {
                                tracing::debug!(%peer, "closing a connection that sent no request in time");
                                break;
                            }
                            Some(at) => deadline = at,
                            // Busy: look again a timeout from now.
                            None => deadline = Instant::now() + timeout,
                        }
                    }
                }
            }
            // The descriptor is released before the set hears of it (the accept loop may be
            // waiting for exactly this descriptor).
            drop(conn);
            pending.leave(id);
        });
    }
}

/// What a connection is doing: requests in flight, and since when it has been idle.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }
}

impl Activity {
    /// A request starts: the connection is busy (not pending) until the guard drops, which
    /// is when its response body is done.
    fn begin(self: &Arc<Self>, pending: &Arc<PendingSet>, id: u64) -> Busy {
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            pending.busy(id);
        }
        Busy {
            activity: self.clone(),
            pending: pending.clone(),
            id,
        }
    }

    /// When an idle connection runs out of time; `None` while a request is in flight.
    fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = *self.idle_since.lock().unwrap_or_else(|p| p.into_inner());
        Some(since + timeout)
    }
}

/// Held while a request (and its response body) is in flight.
struct Busy {
    activity: Arc<Activity>,
    pending: Arc<PendingSet>,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        *self
            .activity
            .idle_since
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        if self.activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.pending.idle(self.id);
        }
    }
}

/// A response body that keeps its connection counted as busy until it is done (dropped).
struct Tracked {
    inner: Body,
    _guard: Busy,
}

impl http_body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The pending connections, oldest first, each with the switch that closes it.
#[derive(Debug)]
struct PendingSet {
    max: usize,
    inner: Mutex<PendingInner>,
    /// Fired when a dying connection has ended.
    released: Notify,
}

#[derive(Debug, Default)]
struct PendingInner {
    next: u64,
    /// Pending, by when they became pending (a sequence number).
    order: BTreeMap<u64, u64>,
    /// Every live connection: its kill switch and, while pending, its key in `order`.
    conns: std::collections::HashMap<u64, (Arc<Notify>, Option<u64>)>,
    /// Connections told to close whose tasks have not ended yet: they still hold a
    /// descriptor, so the accept loop waits for them before taking more.
    dying: std::collections::HashSet<u64>,
}

impl PendingSet {
    fn new(max: usize) -> PendingSet {
        PendingSet {
            max: max.max(1),
            inner: Mutex::default(),
            released: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PendingInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection (pending): its id and kill switch. Evicts the oldest pending one
    /// when the set is full.
    fn enter(&self) -> (u64, Arc<Notify>) {
        let mut s = self.lock();
        s.next += 1;
        let id = s.next;
        let kill = Arc::new(Notify::new());
        s.conns.insert(id, (kill.clone(), None));
        Self::make_pending(&mut s, id, self.max);
        (id, kill)
    }

    fn make_pending(s: &mut PendingInner, id: u64, max: usize) {
        while s.order.len() >= max {
            let Some((_, oldest)) = s.order.pop_first() else {
                break;
            };
            if let Some((kill, key)) = s.conns.get_mut(&oldest) {
                *key = None;
                kill.notify_one();
                s.dying.insert(oldest);
            }
            crate::metrics::pending_evicted();
        }
        s.next += 1;
        let key = s.next;
        s.order.insert(key, id);
        if let Some((_, k)) = s.conns.get_mut(&id) {
            *k = Some(key);
        }
    }

    /// The connection started a request: not pending any more.
    fn busy(&self, id: u64) {
        let mut s = self.lock();
        if let Some((_, key)) = s.conns.get_mut(&id) {
            if let Some(k) = key.take() {
                s.order.remove(&k);
            }
        }
    }

    /// The connection finished its last request: pending again (the newest).
    fn idle(&self, id: u64) {
        let mut s = self.lock();
        if s.conns.get(&id).is_some_and(|(_, key)| key.is_none()) {
            Self::make_pending(&mut s, id, self.max);
        }
    }

    /// Close the oldest pending connection (the process is out of descriptors); false when
    /// none is pending.
    fn evict_oldest(&self) -> bool {
        let mut s = self.lock();
        let Some((_, oldest)) = s.order.pop_first() else {
            return false;
        };
        if let Some((kill, key)) = s.conns.get_mut(&oldest) {
            *key = None;
            kill.notify_one();
            s.dying.insert(oldest);
        }
        crate::metrics::pending_evicted();
        true
    }

    /// Wait (at most `limit`) until every connection told to close has released its
    /// descriptor: eviction is asynchronous, and accepting faster than evicted tasks end
    /// would overshoot the descriptor budget.
    async fn settled(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if self.lock().dying.is_empty() {
                return;
            }
            if tokio::time::timeout_at(deadline, released).await.is_err() {
                return;
            }
        }
    }

    /// The connection is gone.
    fn leave(&self, id: u64) {
        let mut s = self.lock();
        if s.dying.remove(&id) {
            self.released.notify_waiters();
        }
        if let Some((_, Some(key))) = s.conns.remove(&id) {
            s.order.remove(&key);
        }
    }

    #[cfg(test)]
    fn pending(&self) -> usize {
        self.lock().order.len()
    }
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24) and ENFILE (23).
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// One file descriptor held back for the moment the process runs out: released to accept
/// (and close) the connection at the head of the listen queue, then taken again.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn open() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    async fn shed(&mut self, listener: &TcpListener) -> bool {
        if self.0.take().is_none() {
            return false;
        }
        let shed = match tokio::time::timeout(Duration::from_millis(10), listener.accept()).await {
            Ok(Ok((stream, _))) => {
                drop(stream);
                true
            }
            _ => false,
        };
        self.0 = std::fs::File::open("/dev/null").ok();
        shed
    }
}

/// Descriptors held apart from WebSockets and pending connections: database connections,
/// the listener, the runtime's own, health and metrics requests. An eighth of the limit,
/// between 32 and 256.
pub fn fd_reserve(nofile: u64) -> u64 {
    (nofile / 8).clamp(32, 256)
}

/// How many WebSockets and pending connections the process can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    pub max_connections: u64,
    pub max_pending: usize,
}

/// Fit `max_connections` WebSockets and `max_pending` pending connections under the open-file
/// limit (raising the soft limit to the hard one first), keeping [`fd_reserve`] free. When
/// they do not fit, pending connections get what the sockets leave (sockets keep at most three
/// quarters of what is available), with a warning: the process then never runs out of
/// descriptors, so `/healthz` keeps answering whatever a flood of idle connections does.
pub fn fd_budget(max_connections: u64, max_pending: usize) -> FdBudget {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (limit.current, limit.maximum) {
        if cur < max {
            limit.current = Some(max);
            if setrlimit(Resource::Nofile, limit).is_err() {
                limit.current = Some(cur);
            }
        }
    }
    // `None` is "unlimited": nothing to fit under.
    match limit.current {
        Some(nofile) => fit(nofile, max_connections, max_pending),
        None => FdBudget {
            max_connections,
            max_pending,
        },
    }
}

fn fit(nofile: u64, max_connections: u64, max_pending: usize) -> FdBudget {
    let available = nofile.saturating_sub(fd_reserve(nofile));
    if max_connections.saturating_add(max_pending as u64) <= available {
        return FdBudget {
            max_connections,
            max_pending,
        };
    }
    let sockets = max_connections.min(available * 3 / 4).max(1);
    let pending = (max_pending as u64)
        .min(available - sockets.min(available))
        .max(1) as usize;
    tracing::warn!(
        open_files_limit = nofile,
        max_connections,
        max_pending_connections = max_pending,
        using_max_connections = sockets,
        using_max_pending_connections = pending,
        "the open-file limit cannot hold --max-connections sockets plus --max-pending-connections and a reserve; raise `ulimit -n` to use them all"
    );
    FdBudget {
        max_connections: sockets,
        max_pending: pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;

    #[test]
    fn the_oldest_pending_connection_makes_room() {
        let set = PendingSet::new(2);
        let (a, ka) = set.enter();
        let (b, _kb) = set.enter();
        // b starts a request: only a is pending.
        set.busy(b);
        assert_eq!(set.pending(), 1);
        let (c, _kc) = set.enter();
        assert_eq!(set.pending(), 2);
        let (_d, _kd) = set.enter();
        // a was the oldest pending one: it was told to close.
        let notified = ka.notified();
        tokio::pin!(notified);
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(notified.as_mut().poll(&mut cx).is_ready(), "a was evicted");
        set.leave(a);
        assert_eq!(set.pending(), 2);
        // b finishes: pending again as the newest, evicting c.
        set.idle(b);
        assert_eq!(set.pending(), 2);
        set.leave(c);
        set.leave(b);
        assert_eq!(set.pending(), 1);
    }

    #[test]
    fn the_budget_fits_under_the_open_file_limit() {
        // Enough room: asked for, given.
        assert_eq!(
            fit(100_000, 16_384, 1024),
            FdBudget {
                max_connections: 16_384,
                max_pending: 1024
            }
        );
        // `ulimit -n 256`: reserve 32, sockets as asked, pending get the rest.
        let b = fit(256, 16, 1024);
        assert_eq!((b.max_connections, b.max_pending), (16, 208));
        // Too many sockets asked for: three quarters of what is left.
        let b = fit(1024, 16_384, 1024);
        assert_eq!(b.max_connections, 672);
        assert!(b.max_connections + b.max_pending as u64 + fd_reserve(1024) <= 1024);
        assert_eq!(fd_reserve(1_000_000), 256);
        // The real process limit: whatever it is, the budget fits under it.
        let real = fd_budget(u64::MAX / 2, 1024);
        if let Some(limit) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            assert!(real.max_connections + real.max_pending as u64 + fd_reserve(limit) <= limit);
        }
    }
}
