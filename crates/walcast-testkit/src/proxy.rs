//! A fault-injecting TCP proxy: put it between walcast and a test Postgres, then stall, cut or
//! refuse the network on demand.
//!
//! ```text
//!  client ──▶ accept ──▶ admission ─┬─ refusing ──▶ reset at once (SO_LINGER 0)
//!                                   ├─ blackhole ──▶ held open, never dialed, until cut/drop
//!                                   └─ forward ────▶ wait for flow ──▶ dial upstream ──▶ pumps
//!                                                                                        │
//!        flow switch, shared by every forwarded connection:                              │
//!          ┌────────────┐  pause()   ┌──────────┐                                        │
//!          │ forwarding │ ─────────▶ │  paused  │  pumps neither read nor write ◀────────┘
//!          │            │ ◀───────── │          │  new connections wait before dialing
//!          └────────────┘  resume()  └──────────┘
//!
//!        cut(): every open connection of any kind is reset on both sides; accepting goes on
//! ```
//!
//! Admission (`refuse`, `blackhole_new`) decides what happens to connections accepted from
//! now on; the flow switch applies to every forwarded connection, old and new. They combine:
//! a paused proxy that also refuses resets newcomers and stalls the rest.
//!
//! Invariants:
//! - Nothing is lost or reordered across pause/resume: a pump that read a chunk keeps it until
//!   it is written in full, and reads nothing new meanwhile; what the peers send during a pause
//!   waits in the kernel buffers (TCP backpressure, no close).
//! - Every control method returns once the fault is in effect: after `pause()` no further byte
//!   reaches either peer, after `cut()` every connection that was open is closed (both halves,
//!   with a reset), after `refuse(true)` every accept is refused. This holds because the proxy
//!   runs on one thread with a current-thread runtime: the command is applied between two polls
//!   of the connection tasks, and every pump looks at the switch before each read or write.
//! - A connection accepted while paused is held without dialing upstream, so Postgres does not
//!   see a half-started connection (and its `authentication_timeout` does not run) until
//!   `resume()`.
//! - A failing connection (upstream down, a peer's reset) is closed and logged at debug; it never
//!   stops the proxy. A peer's reset is passed on as a reset to the other peer.
//! - Dropping the proxy resets every connection and closes the listener.

use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Forwarding buffer per direction; Postgres messages are mostly far smaller.
const CHUNK: usize = 16 * 1024;

/// A TCP proxy on 127.0.0.1 in front of one upstream address, with faults on demand.
///
/// Runs on its own thread and runtime, so it works the same from synchronous code, a
/// current-thread `#[tokio::test]` or a multi-thread one. The control methods block the calling
/// thread until the proxy thread has applied them (a few microseconds; the proxy never waits on
/// the caller's runtime, so calling them from async code cannot deadlock).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    stats: Arc<Counters>,
    commands: mpsc::UnboundedSender<Command>,
    thread: Option<JoinHandle<()>>,
}

/// Counters, read consistently with what the peers have seen (see [`FaultProxy::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProxyStats {
    /// Connections accepted since start, refused ones included.
    pub accepted: u64,
    /// Connections reset at once because the proxy was refusing.
    pub refused: u64,
    /// Connections the proxy holds open now: forwarding, held by a pause, or blackholed.
    pub active: usize,
    /// Bytes written to upstream (client → upstream).
    pub to_upstream: u64,
    /// Bytes written to clients (upstream → client).
    pub to_client: u64,
}

impl FaultProxy {
    /// Listen on a free port of 127.0.0.1 and forward every connection to `upstream`.
    pub fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Counters::default());
        let thread_stats = Arc::clone(&stats);
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || {
                // Built and dropped on this thread: dropping a runtime inside the caller's
                // runtime would panic.
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    let bound = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
                        .await
                        .and_then(|l| l.local_addr().map(|addr| (l, addr)));
                    match bound {
                        Ok((listener, addr)) => {
                            let _ = ready_tx.send(Ok(addr));
                            run(listener, upstream, command_rx, thread_stats).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })?;
        let started = ready_rx
            .recv()
            .unwrap_or_else(|_| Err(io::Error::other("the fault proxy thread died starting")));
        match started {
            Ok(addr) => Ok(FaultProxy {
                addr,
                upstream,
                stats,
                commands,
                thread: Some(thread),
            }),
            Err(e) => {
                let _ = thread.join();
                Err(e)
            }
        }
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Where connections are forwarded.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `database_url` with its host and port replaced by the proxy's (user, password, database
    /// and parameters kept): `postgres://postgres@127.0.0.1:5432/db` becomes
    /// `postgres://postgres@127.0.0.1:PROXY/db`. Refuses URLs whose parameters set the host or
    /// port, which would bypass the proxy.
    pub fn url_for(&self, database_url: &str) -> anyhow::Result<String> {
        rewrite_url(database_url, self.addr)
    }

    /// Network stall: stop forwarding both ways on every connection, and hold new ones without
    /// dialing upstream. Peers see silence, not a close.
    pub fn pause(&self) {
        self.control(Op::Flow { paused: true });
    }

    /// End a stall: forward again, starting with whatever either side sent meanwhile.
    pub fn resume(&self) {
        self.control(Op::Flow { paused: false });
    }

    /// Reset every open connection on both sides (SO_LINGER 0, so peers get an RST, not a FIN);
    /// new connections are accepted as before.
    pub fn cut(&self) {
        self.control(Op::Cut);
    }

    /// While on, accepted connections are reset at once (a database that is down); open ones
    /// keep working.
    pub fn refuse(&self, on: bool) {
        self.control(Op::Refuse(on));
    }

    /// While on, accepted connections are held open and never forwarded, not even after it is
    /// turned off (until `cut()` or drop); open ones keep working.
    pub fn blackhole_new(&self, on: bool) {
        self.control(Op::Blackhole(on));
    }

    /// The counters, including every byte either peer has received so far.
    pub fn stats(&self) -> ProxyStats {
        // A pump counts a write in the same poll that made it; going through the proxy thread
        // first means that poll is over, so a byte a peer has read is always counted here.
        self.control(Op::Sync);
        self.stats.snapshot()
    }

    /// Connections held open now (forwarding, paused or blackholed).
    pub fn active_connections(&self) -> usize {
        self.stats().active
    }

    /// Connections accepted since start, refused ones included.
    pub fn total_accepted(&self) -> u64 {
        self.stats().accepted
    }

    /// Connections reset at once because the proxy was refusing.
    pub fn total_refused(&self) -> u64 {
        self.stats().refused
    }

    /// Bytes forwarded client → upstream.
    pub fn bytes_to_upstream(&self) -> u64 {
        self.stats().to_upstream
    }

    /// Bytes forwarded upstream → client.
    pub fn bytes_to_client(&self) -> u64 {
        self.stats().to_client
    }

    fn control(&self, op: Op) {
        let (done, applied) = std::sync::mpsc::sync_channel(1);
        let sent = self.commands.send(Command { op, done }).is_ok();
        // Carrying on without the fault in place would let a test pass while testing nothing.
        assert!(
            sent && applied.recv().is_ok(),
            "the fault proxy thread is gone (it panicked?)"
        );
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let (done, _) = std::sync::mpsc::sync_channel(1);
        let _ = self.commands.send(Command { op: Op::Stop, done });
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[derive(Debug)]
struct Command {
    op: Op,
    done: std::sync::mpsc::SyncSender<()>,
}

#[derive(Debug)]
enum Op {
    Flow {
        paused: bool,
    },
    Cut,
    Refuse(bool),
    Blackhole(bool),
    /// Nothing to do: the answer itself says every earlier poll is over.
    Sync,
    Stop,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    refused: AtomicU64,
    active: AtomicUsize,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> ProxyStats {
        // The command channel already ordered these reads after the proxy's writes.
        ProxyStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            active: self.active.load(Ordering::Relaxed),
            to_upstream: self.to_upstream.load(Ordering::Relaxed),
            to_client: self.to_client.load(Ordering::Relaxed),
        }
    }
}

/// Counts a connection as active for as long as its task (or its future, on abort) lives.
struct Active(Arc<Counters>);

impl Active {
    fn new(stats: &Arc<Counters>) -> Active {
        stats.active.fetch_add(1, Ordering::Relaxed);
        Active(Arc::clone(stats))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Debug, Clone, Copy)]
enum Admit {
    Forward,
    Blackhole,
}

async fn run(
    listener: TcpListener,
    upstream: SocketAddr,
    mut commands: mpsc::UnboundedReceiver<Command>,
    stats: Arc<Counters>,
) {
    // `send_replace`/`send_modify` below, never `send`: `send` drops the value when no task
    // is subscribed yet.
    let (flow, _) = watch::channel(false);
    // Bumped by every cut; a connection dies once it differs from the value it was born with.
    let (cut_epoch, _) = watch::channel(0u64);
    let mut refusing = false;
    let mut blackhole = false;
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            command = commands.recv() => {
                // A closed channel means the handle is gone without saying Stop.
                let Some(Command { op, done }) = command else { break };
                match op {
                    Op::Flow { paused } => {
                        flow.send_replace(paused);
                    }
                    Op::Cut => cut_all(&cut_epoch, &mut conns).await,
                    Op::Refuse(on) => refusing = on,
                    Op::Blackhole(on) => blackhole = on,
                    Op::Sync => {}
                    Op::Stop => {
                        cut_all(&cut_epoch, &mut conns).await;
                        let _ = done.send(());
                        return;
                    }
                }
                let _ = done.send(());
            }
            accepted = listener.accept() => match accepted {
                Ok((client, peer)) => {
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if refusing {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        reset(&client);
                        tracing::debug!(%peer, "fault proxy refused a connection");
                        continue;
                    }
                    let ticket = Ticket {
                        upstream,
                        admit: if blackhole { Admit::Blackhole } else { Admit::Forward },
                        flow: Flow(flow.subscribe()),
                        // Read here, not in the task: a cut between spawn and the task's first
                        // poll must still end it (cut_all waits for it).
                        born: *cut_epoch.borrow(),
                        cut_epoch: cut_epoch.subscribe(),
                        stats: Arc::clone(&stats),
                        _active: Active::new(&stats),
                    };
                    conns.spawn(connection(client, ticket));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off rather than spin on the error.
                    tracing::debug!(error = %e, "fault proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(joined) = conns.join_next() => log_join(joined),
        }
    }
    cut_all(&cut_epoch, &mut conns).await;
}

/// Reset every connection open now and wait until each one's sockets are closed.
async fn cut_all(cut_epoch: &watch::Sender<u64>, conns: &mut JoinSet<()>) {
    cut_epoch.send_modify(|epoch| *epoch += 1);
    while let Some(joined) = conns.join_next().await {
        log_join(joined);
    }
}

fn log_join(joined: Result<(), tokio::task::JoinError>) {
    if let Err(e) = joined {
        tracing::warn!(error = %e, "fault proxy connection task failed");
    }
}

/// What an accepted connection was admitted with.
struct Ticket {
    upstream: SocketAddr,
    admit: Admit,
    flow: Flow,
    cut_epoch: watch::Receiver<u64>,
    /// The cut epoch at accept time.
    born: u64,
    stats: Arc<Counters>,
    _active: Active,
}

/// One accepted connection, from admission to close.
async fn connection(mut client: TcpStream, ticket: Ticket) {
    let Ticket {
        upstream: upstream_addr,
        admit,
        flow,
        mut cut_epoch,
        born,
        stats,
        _active,
    } = ticket;
    let mut upstream = None;
    let abortive = {
        let work = async {
            match admit {
                Admit::Forward => {
                    forward(&mut client, &mut upstream, upstream_addr, flow, &stats).await
                }
                Admit::Blackhole => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            // An error means the proxy is going away: close as for a cut.
            _ = cut_epoch.wait_for(|epoch| *epoch != born) => true,
            outcome = work => match outcome {
                Ok(()) => false,
                Err(e) => {
                    tracing::debug!(error = %e, "fault proxy connection failed");
                    true
                }
            },
        }
    };
    if abortive {
        reset(&client);
        if let Some(up) = &upstream {
            reset(up);
        }
    }
    // Both sockets close here, with an RST where `reset` was called.
}

/// Make the coming close send an RST instead of a FIN, dropping unsent data.
fn reset(stream: &TcpStream) {
    if let Err(e) = stream.set_zero_linger() {
        tracing::debug!(error = %e, "fault proxy could not set SO_LINGER 0; closing with a FIN");
    }
}

async fn forward(
    client: &mut TcpStream,
    upstream: &mut Option<TcpStream>,
    upstream_addr: SocketAddr,
    mut flow: Flow,
    stats: &Counters,
) -> io::Result<()> {
    // Held while paused: dialing now would start Postgres's authentication clock.
    if !flow.open().await {
        return Ok(());
    }
    let up = upstream.insert(TcpStream::connect(upstream_addr).await?);
    // Without it, Nagle could delay small forwarded writes behind an unacknowledged one.
    let _ = up.set_nodelay(true);
    let _ = client.set_nodelay(true);
    let (mut client_rx, mut client_tx) = client.split();
    let (mut up_rx, mut up_tx) = up.split();
    // The first error ends both directions; the caller then resets both sockets.
    tokio::try_join!(
        pump(&mut client_rx, &mut up_tx, flow.clone(), &stats.to_upstream),
        pump(&mut up_rx, &mut client_tx, flow, &stats.to_client),
    )?;
    Ok(())
}

/// Copy one direction until EOF, passing the EOF on as a write shutdown (the other direction
/// keeps going). Reads and writes only while the flow is on.
async fn pump<R, W>(
    src: &mut R,
    dst: &mut W,
    mut flow: Flow,
    forwarded: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        let Some(n) = flow.gated(src.read(&mut buf)).await else {
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return match flow.gated(dst.shutdown()).await {
                Some(shut) => shut,
                None => Ok(()),
            };
        }
        let mut written = 0;
        while written < n {
            let Some(w) = flow.gated(dst.write(&buf[written..n])).await else {
                return Ok(());
            };
            let w = w?;
            if w == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            written += w;
            // Same poll as the write: `FaultProxy::stats` relies on it.
            forwarded.fetch_add(w as u64, Ordering::Relaxed);
        }
    }
}

/// The pause switch as one pump sees it (`true` = paused).
#[derive(Clone)]
struct Flow(watch::Receiver<bool>);

impl Flow {
    /// Wait until forwarding is on; `false` once the proxy is gone.
    async fn open(&mut self) -> bool {
        self.0.wait_for(|paused| !paused).await.is_ok()
    }

    /// Run one socket operation, polling it only while forwarding is on; `None` once the proxy
    /// is gone.
    ///
    /// The switch is checked before every poll of `op`, and a pause is applied between two polls
    /// (the proxy has a single thread), so once `pause()` returns `op` is not polled again until
    /// resume. tokio's reads and writes do their syscall inside the poll, so an unpolled
    /// operation has moved no byte; it is kept, not dropped, and simply polled again later.
    async fn gated<F, T>(&mut self, op: F) -> Option<T>
    where
        F: Future<Output = T>,
    {
        tokio::pin!(op);
        loop {
            if !self.open().await {
                return None;
            }
            tokio::select! {
                biased;
                // Paused (or the proxy is gone): back to waiting for the switch.
                _ = self.0.wait_for(|paused| *paused) => {}
                out = &mut op => return Some(out),
            }
        }
    }
}

/// Replace host and port of a `scheme://[userinfo@]host[:port][/db][?params]` URL.
fn rewrite_url(url: &str, proxy: SocketAddr) -> anyhow::Result<String> {
    let (scheme, rest) = url
        .split_once("://")
        .with_context(|| format!("{url:?} is not a URL (scheme://...)"))?;
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // A password may hold an encoded '@' but never a raw one, so the last '@' ends userinfo.
    let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
    if let Some((_, query)) = tail.split_once('?') {
        for key in query
            .split('&')
            .map(|pair| pair.split('=').next().unwrap_or(""))
        {
            if matches!(key, "host" | "hostaddr" | "port") {
                bail!("{url:?} sets {key:?} in its parameters, which would bypass the proxy");
            }
        }
    }
    Ok(format!("{scheme}://{userinfo}{proxy}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::rewrite_url;
    use std::net::SocketAddr;

    fn proxy() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40001))
    }

    #[test]
    fn url_keeps_user_database_and_parameters() {
        let cases = [
            (
                "postgres://postgres@127.0.0.1:5432/walcast_test_1",
                "postgres://postgres@127.0.0.1:40001/walcast_test_1",
            ),
            (
                "postgresql://app:p%40ss@db.example:6543/app?sslmode=disable",
                "postgresql://app:p%40ss@127.0.0.1:40001/app?sslmode=disable",
            ),
            ("postgres://localhost", "postgres://127.0.0.1:40001"),
            (
                "postgres://u@[::1]:5432?application_name=x",
                "postgres://u@127.0.0.1:40001?application_name=x",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite_url(input, proxy()).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn url_that_would_bypass_the_proxy_is_refused() {
        for input in [
            "postgres://u@127.0.0.1:5432/db?host=/tmp",
            "postgres://u@127.0.0.1/db?sslmode=disable&port=5433",
            "host=127.0.0.1 port=5432 user=postgres",
        ] {
            assert!(rewrite_url(input, proxy()).is_err(), "{input}");
        }
    }
}
