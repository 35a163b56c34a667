//! The driver of one WebSocket: moves bytes between the socket, the [`Session`] and the
//! database work the session asks for. All decisions are the session's.
//!
//! ```text
//!   hub, topics (other tasks) ──push──┐        (never blocks: a full queue marks overflow)
//!   session replies ──────────push──▶ SocketOutbox ─┐
//!                                                   ▼
//!   client ◀── ws.feed(frame)… ws.flush() (write timeout) ◀── driver: select! { shutdown,
//!   client ──▶ decode ──▶ session.on_frame ──▶ work ──▶ in flight (concurrently)     queued frames,
//!                          session.on_done ◀── finished work ◀──┘                   inbound frames,
//!                          session.on_tick ◀── one timer (session.next_deadline)    finished work,
//!                                                                                   the timer }
//! ```
//!
//! Invariants:
//! - One task per connection; it alone writes the socket. Everything bound for the client goes
//!   through the bounded queue, so the client sees frames in the order they were queued.
//! - The driver never waits on the database: join and write checks run as futures beside the
//!   loop, so heartbeats and other channels are answered while a check is pending.
//! - Queued frames are written in batches with one flush (coalesced writes). A write that
//!   makes no progress for `--write-timeout-secs` ends the socket with 4008, like an
//!   overflowing queue: a client that stops reading costs at most its queue's byte bound.
//! - One timer per socket, re-armed only when it fires or the session's deadline moves
//!   earlier, not on every inbound frame.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use walcast_core::hub::OutFrame;
use walcast_protocol::{decode_binary_bytes_within, decode_text_within, Vsn};

use crate::metrics;
use crate::realtime::outbox::{self, OutboxReader};
use crate::realtime::session::{Exit, Now, Outcome, Session};
use crate::realtime::{authorize, intake};
use crate::state::AppState;

/// WebSocket close code for a client that cannot keep up (private-use range).
pub const CLOSE_SLOW_CLIENT: u16 = 4008;
/// Longest a socket waits for its close frame to be written before it just drops.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a closing socket lingers after its close frame when the client's input cannot be
/// read any more, so the client can read the close before the connection is reset.
const CLOSE_LINGER: Duration = Duration::from_millis(500);
/// Most frames written between two flushes.
const MAX_BATCH: usize = 512;

/// What the upgrade handler established before the socket starts.
pub struct Connection {
    pub vsn: Vsn,
    /// The connection token (`apikey`), the default channel token.
    pub token: Arc<str>,
    /// The client's key for per-client limits (token `sub`, else address).
    pub client: Arc<str>,
    /// This socket's place under `--max-connections`, given back when the socket ends.
    pub slot: crate::state::SocketGuard,
    /// `session_id` (session resume), validated.
    pub session_id: Option<Arc<str>>,
}

type InFlight = FuturesUnordered<Pin<Box<dyn Future<Output = (u64, Outcome)> + Send>>>;

/// Run a connection to completion. Started on the intake runtime (see
/// [`crate::realtime::intake`]), the task moves itself to the serving runtime once its first
/// join is live or [`intake::INTAKE_LIMIT`] has passed.
pub async fn run(
    ws: WebSocket,
    state: Arc<AppState>,
    conn: Connection,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    metrics::socket_opened();
    let limits = &state.limits;
    let (outbox, reader) = outbox::bounded(
        limits.socket_send_queue.max(16),
        limits.socket_send_queue_bytes,
    );
    // Boxed: the task's future is allocated for the socket's whole life anyway, and keeping
    // the session out of it keeps the future's own layout (which rustc does not pack well
    // across the select's states) small.
    let session = Box::new(Session::new(
        state.clone(),
        conn.vsn,
        conn.token,
        conn.client,
        outbox,
        conn.session_id,
        Now::system(),
    ));
    let mut driver = Box::new(Driver {
        ws,
        vsn: conn.vsn,
        state,
        session,
        reader,
        in_flight: None,
        shutdown,
        slot: conn.slot,
    });
    if let Some(serving) = intake::serving() {
        let until = tokio::time::Instant::now() + intake::INTAKE_LIMIT;
        match driver.drive(Some(until)).await {
            Some(exit) => driver.finish(exit).await,
            None => {
                // Live (or past the limit): the rest of the socket's life at full priority.
                serving.spawn(async move {
                    let exit = driver.drive(None).await.unwrap_or(Exit::ClientGone);
                    driver.finish(exit).await;
                });
            }
        }
        return;
    }
    let exit = driver.drive(None).await.unwrap_or(Exit::ClientGone);
    driver.finish(exit).await;
}

/// One connection's state between turns of its loop: everything the loop needs, so the
/// loop can stop on one runtime and go on on another.
struct Driver {
    ws: WebSocket,
    vsn: Vsn,
    state: Arc<AppState>,
    session: Box<Session>,
    reader: OutboxReader,
    /// Created on first use: an idle socket keeps no set of pending work.
    in_flight: Option<InFlight>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// This socket's place under `--max-connections`.
    slot: crate::state::SocketGuard,
}

impl Driver {
    /// Serve the connection until it must end (`Some`), or, with `intake` set, until the
    /// session has a live channel and no work in flight or the deadline passes (`None`: the
    /// caller moves the driver on). Timers are created here, on the runtime that polls them.
    async fn drive(&mut self, intake: Option<tokio::time::Instant>) -> Option<Exit> {
        let limits = self.state.limits.clone();
        let mut armed = self.session.next_deadline(Now::system());
        let sleep = tokio::time::sleep_until(armed.into());
        tokio::pin!(sleep);
        let handover = async {
            match intake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(handover);
        loop {
            if let Some(exit) = self.session.exit() {
                return Some(exit);
            }
            let pending = self.in_flight.as_ref().is_some_and(|f| !f.is_empty());
            tokio::select! {
                biased;
                _ = self.shutdown.changed() => return Some(Exit::Close(1012, "service restart")),
                _ = self.reader.ready() => {
                    if let Some(exit) = write_queued(&mut self.ws, &self.reader, limits.write_timeout).await {
                        return Some(exit);
                    }
                }
                done = next_done(&mut self.in_flight), if pending => {
                    if let Some((op, outcome)) = done {
                        self.session.on_done(Now::system(), op, outcome);
                    }
                }
                msg = self.ws.recv() => {
                    let now = Now::system();
                    let session = &mut self.session;
                    match msg {
                        Some(Ok(msg)) => match msg {
                            Message::Text(t) => {
                                metrics::frame_in(metrics::FrameKind::Text, t.len());
                                match decode_text_within(self.vsn, t.as_str(), limits.max_frame_bytes) {
                                    Ok(frame) => session.on_frame(now, frame),
                                    Err(e) => session.on_bad_frame(now, e),
                                }
                            }
                            Message::Binary(b) => {
                                metrics::frame_in(metrics::FrameKind::Binary, b.len());
                                match decode_binary_bytes_within(self.vsn, &b, limits.max_frame_bytes) {
                                    Ok(frame) => session.on_frame(now, frame),
                                    Err(e) => session.on_bad_frame(now, e),
                                }
                            }
                            Message::Close(_) => return Some(Exit::ClientGone),
                            // Pings are answered by the WebSocket layer itself.
                            Message::Ping(_) | Message::Pong(_) => session.touch(now),
                        },
                        Some(Err(e)) => {
                            if is_too_big(e) {
                                return Some(Exit::Close(1009, "message too big"));
                            }
                            return Some(Exit::ClientGone);
                        }
                        None => return Some(Exit::ClientGone),
                    }
                    // Write the reply (e.g. to a heartbeat) now rather than on another turn.
                    if let Some(exit) = write_queued(&mut self.ws, &self.reader, limits.write_timeout).await {
                        return Some(exit);
                    }
                }
                _ = &mut sleep => {
                    self.session.on_tick(Now::system());
                    armed = self.session.next_deadline(Now::system());
                    sleep.as_mut().reset(armed.into());
                }
                _ = &mut handover => return None,
            }
            for work in self.session.take_work() {
                let state = self.state.clone();
                self.in_flight
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(Box::pin(async move {
                        let outcome = authorize::run(&state, work.kind).await;
                        (work.op, outcome)
                    }));
            }
            if self.in_flight.as_ref().is_some_and(|f| f.is_empty()) {
                self.in_flight = None;
            }
            if intake.is_some() && self.in_flight.is_none() && self.session.channel_count() > 0 {
                return None;
            }
            let deadline = self.session.next_deadline(Now::system());
            if deadline < armed {
                armed = deadline;
                sleep.as_mut().reset(armed.into());
            }
        }
    }

    /// Leave every channel and say goodbye as `exit` asks.
    async fn finish(self: Box<Self>, exit: Exit) {
        let Driver {
            mut ws,
            mut session,
            reader,
            in_flight,
            slot,
            ..
        } = *self;
        // Unfinished checks are dropped here: their pooled connections are discarded, never
        // returned mid-transaction (see `db::sql::Lease`).
        drop(in_flight);
        session.leave_all(Now::system());
        // A closing socket no longer counts against --max-connections while it says goodbye.
        drop(slot);
        if let Exit::Close(code, reason) = exit {
            // Flush what is already queued (e.g. a final system message), then close.
            let close = async {
                while let Some(frame) = reader.pop() {
                    if ws.feed(to_message(frame)).await.is_err() {
                        return;
                    }
                }
                if ws
                    .send(Message::Close(Some(CloseFrame {
                        code,
                        reason: Utf8Bytes::from_static(reason),
                    })))
                    .await
                    .is_err()
                {
                    return;
                }
                // Let the client read the close frame before the socket goes: closing a socket
                // that still holds unread input (say, the rest of an oversized message) resets
                // the connection, and a reset makes the peer drop what it had not read yet.
                // Wait for its close (or anything final), reading what it still sends.
                loop {
                    match ws.recv().await {
                        Some(Ok(Message::Close(_))) | None => return,
                        Some(Ok(_)) => {}
                        Some(Err(_)) => {
                            tokio::time::sleep(CLOSE_LINGER).await;
                            return;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, close).await;
        }
        metrics::socket_closed();
    }
}

async fn next_done(in_flight: &mut Option<InFlight>) -> Option<(u64, Outcome)> {
    match in_flight {
        Some(f) => f.next().await,
        None => std::future::pending().await,
    }
}

/// Write what is queued, or say why the connection must end: the client is gone, its queue
/// overflowed, or its writes stopped making progress (it cannot keep up).
async fn write_queued(
    ws: &mut WebSocket,
    reader: &OutboxReader,
    timeout: Duration,
) -> Option<Exit> {
    if reader.overflowed() {
        metrics::slow_client_disconnect();
        tracing::info!("closing a slow client: send queue full");
        return Some(Exit::Close(
            CLOSE_SLOW_CLIENT,
            "slow client: send queue full",
        ));
    }
    let first = reader.pop()?;
    match tokio::time::timeout(timeout, write_batch(ws, first, reader)).await {
        Ok(Ok(())) => None,
        Ok(Err(_)) => Some(Exit::ClientGone),
        Err(_) => {
            metrics::slow_client_disconnect();
            tracing::info!("closing a slow client: writes made no progress");
            // The close frame is tried with its own short timeout, then the socket is dropped.
            Some(Exit::Close(
                CLOSE_SLOW_CLIENT,
                "slow client: writes made no progress",
            ))
        }
    }
}

/// A frame or message over `--max-frame-bytes`: answered with 1009 rather than a silent drop.
fn is_too_big(e: axum::Error) -> bool {
    matches!(
        e.into_inner().downcast_ref::<tungstenite::Error>(),
        Some(tungstenite::Error::Capacity(_))
    )
}

fn to_message(frame: OutFrame) -> Message {
    match frame {
        OutFrame::Text(b) => match Utf8Bytes::try_from(b) {
            Ok(t) => Message::Text(t),
            // Frames are built from Rust strings; this cannot happen, but never panic.
            Err(_) => Message::Text(Utf8Bytes::from_static("")),
        },
        OutFrame::Binary(b) => Message::Binary(b),
    }
}

/// Write `first` and whatever else is queued (up to a batch), then flush once.
async fn write_batch(
    ws: &mut WebSocket,
    first: OutFrame,
    reader: &OutboxReader,
) -> Result<(), axum::Error> {
    let (mut text, mut binary, mut bytes) = (0u64, 0u64, 0u64);
    let mut next = Some(first);
    let mut n = 0;
    while let Some(frame) = next.take() {
        bytes += frame.len() as u64;
        match &frame {
            OutFrame::Text(_) => text += 1,
            OutFrame::Binary(_) => binary += 1,
        }
        ws.feed(to_message(frame)).await?;
        n += 1;
        if n < MAX_BATCH {
            next = reader.pop();
        }
    }
    ws.flush().await?;
    tracing::trace!(frames = n, "wrote a batch");
    metrics::frames_out(text, binary, bytes);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output_size<A, B, C, D, Fut, F>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// An idle connection's memory is mostly its task: keep the future small (checks run as
    /// boxed futures beside it, not inlined in it).
    #[test]
    fn connection_task_stays_small() {
        let size = output_size(run);
        eprintln!("socket task future: {size} bytes");
        assert!(size < 2048, "socket task future is {size} bytes");
    }
}
#[cfg(test)]
mod size_probe {
    #[test]
    fn probe() {
        eprintln!(
            "session {} conn {}",
            std::mem::size_of::<crate::realtime::session::Session>(),
            std::mem::size_of::<super::Connection>()
        );
    }
}
