//! The streaming half: a reader task that owns the socket, and the consumer handle.
//!
//! ```text
//!             ┌──────────────────────── reader task (owns the socket) ─────────────────────┐
//!  walsender ─┤ CopyData ─▶ ReplicationFrame::parse ─▶ pending slot ─▶ Sender::reserve() ──┼─▶ bounded channel ─▶ ReplicationStream::recv()
//!      ▲      │   'k' reply requested ─▶ status update at once                              │                         │ consumer
//!      │      │   timer (status interval) ─▶ status update, even while the slot is full     │                         │ calls recv() again
//!      └──────┤◀─ 'r' write = received, flush = handed_on, apply = flush ◀─ Notify ◀────────┼── handed_on (AtomicU64) ◀┘ = previous event handed on
//!             └─────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Backpressure: while the pending slot is occupied (channel full) the task does not read the
//! socket, so TCP flow control throttles the walsender. It keeps its timer and keeps writing
//! status updates, because the walsender, blocked on its full send buffer, still reads our
//! replies; that is what keeps it from hitting `wal_sender_timeout`.
//!
//! Ack invariants (what "flush" means to Postgres: "everything before this may be dropped"):
//! * An event is *handed on* when the consumer calls `recv` again (or
//!   [`ReplicationStream::mark_handed_on`]).
//! * Flush moves to a Commit's `end_lsn` (bytes 10..18 of the Commit message) only once that
//!   Commit, and therefore every message of its transaction before it, has been handed on.
//!   The XLogData header positions are never used as ack positions.
//! * When the last handed-on message is a keepalive and no transaction is open (after a
//!   Commit, or before any Begin), the keepalive's `wal_end` is confirmed: everything the
//!   server sent before it has been handed on, and transactions still in progress commit
//!   after it, so nothing is skipped on restart. This keeps an idle database from pinning WAL.
//! * Flush is monotonic and starts at the slot's known confirmed position; write is the
//!   latest position received (never below flush); apply = flush.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, Instant};

use crate::client::map_slot_error;
use crate::connection::{log_notice, parse_db_error, Backend, Connection};
use crate::error::ReplicationError;
use crate::{Lsn, ReplicationFrame, StandbyStatusUpdate, XLogData};

/// Fastest we send an update because the flush position moved (the timer and reply
/// requests are not throttled).
const FEEDBACK_MIN_GAP: Duration = Duration::from_millis(100);
/// How long a graceful shutdown waits for the server to finish the COPY.
const SHUTDOWN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What the stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// One pgoutput message with the walsender's positions.
    XLogData(XLogData),
    /// The server's keepalive; `wal_end` is how far it has sent. Seeing one with nothing
    /// after it means "caught up".
    Keepalive {
        /// Server's sent position.
        wal_end: Lsn,
    },
    /// Only from [`crate::Replicator`]: the connection was re-established and streaming
    /// resumes after the last confirmed commit. Drop per-connection state (the relation
    /// cache, any partly received transaction): the server sends Relation messages again and
    /// repeats the transaction that was not confirmed.
    Reconnected {
        /// Position passed to START_REPLICATION.
        resume_from: Lsn,
    },
    /// Only from [`crate::Replicator`]: the established stream was lost and the replicator is
    /// reconnecting (with backoff). Sent once per loss, before the next `Reconnected`.
    Disconnected {
        /// Why, for logs and readiness probes.
        reason: String,
    },
    /// Only from [`crate::Replicator`], right before `Reconnected`: the slot was missing or
    /// invalidated and was created again (`--recreate-slot`); changes committed between the
    /// old slot's last confirmed position and now were not streamed.
    SlotRecreated,
}

type Item = Result<StreamEvent, ReplicationError>;

pub(crate) struct StreamSettings {
    pub(crate) status_interval: Duration,
    pub(crate) server_timeout: Duration,
    pub(crate) channel_capacity: usize,
    pub(crate) initial_flush: Lsn,
    pub(crate) user: String,
    pub(crate) dbname: String,
    pub(crate) slot: String,
    pub(crate) publication: String,
    pub(crate) ceiling: crate::ConfirmCeiling,
}

/// Shared between the consumer handle and the reader task.
struct Shared {
    /// Highest position the consumer has made safe to confirm.
    handed_on: AtomicU64,
    /// Rung when `handed_on` moves, so the update goes out soon rather than at the next tick.
    moved: Notify,
    /// Last flush position actually written to the server.
    sent_flush: AtomicU64,
}

/// What the last event returned by `recv` means for the ack position once handed on.
#[derive(Debug, Clone, Copy)]
enum Handed {
    Begin,
    Commit(Lsn),
    Keepalive(Lsn),
    Other,
}

/// A running replication stream. Dropping it closes the connection after a last status
/// update (confirming only what was handed on).
pub struct ReplicationStream {
    rx: mpsc::Receiver<Item>,
    shared: Arc<Shared>,
    task: Option<JoinHandle<Result<Lsn, ReplicationError>>>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    last: Option<Handed>,
    in_transaction: bool,
    handed_on: Lsn,
    /// While set, positions that become safe are kept in `held` instead of being confirmed:
    /// the consumer has received those commits but not handed their changes on yet.
    holding: bool,
    held: Lsn,
    backend_pid: i32,
}

impl ReplicationStream {
    pub(crate) fn spawn(conn: Connection, settings: StreamSettings) -> ReplicationStream {
        let (tx, rx) = mpsc::channel(settings.channel_capacity);
        let (shutdown_tx, shutdown_rx) = oneshot::channel();
        let shared = Arc::new(Shared {
            handed_on: AtomicU64::new(settings.initial_flush.0),
            moved: Notify::new(),
            sent_flush: AtomicU64::new(0),
        });
        let backend_pid = conn.backend_pid;
        let now = Instant::now();
        let task = ReaderTask {
            conn,
            tx,
            shared: shared.clone(),
            received: settings.initial_flush,
            sent_flush: Lsn(0),
            last_status_at: now,
            // The first update goes out at once: it tells the server where we stand.
            next_status_at: now,
            last_rx_at: now,
            reply_now: false,
            settings,
        };
        let handle = tokio::spawn(task.run(shutdown_rx));
        ReplicationStream {
            rx,
            shared,
            task: Some(handle),
            shutdown_tx: Some(shutdown_tx),
            last: None,
            in_transaction: false,
            handed_on: Lsn(0),
            holding: false,
            held: Lsn(0),
            backend_pid,
        }
    }

    /// The next event. Calling it again declares the previous event handed on. `None` once
    /// the stream has ended (after an error was returned, or after shutdown).
    pub async fn recv(&mut self) -> Option<Result<StreamEvent, ReplicationError>> {
        self.mark_handed_on();
        let item = self.rx.recv().await?;
        if let Ok(event) = &item {
            self.last = Some(classify(event));
        }
        Some(item)
    }

    /// Declares the event returned by the last `recv` handed on without asking for the
    /// next one (e.g. right before [`Self::shutdown`]).
    pub fn mark_handed_on(&mut self) {
        let Some(last) = self.last.take() else {
            return;
        };
        let safe = match last {
            Handed::Begin => {
                self.in_transaction = true;
                None
            }
            Handed::Commit(end_lsn) => {
                self.in_transaction = false;
                Some(end_lsn)
            }
            Handed::Keepalive(wal_end) if !self.in_transaction => Some(wal_end),
            Handed::Keepalive(_) | Handed::Other => None,
        };
        if let Some(lsn) = safe {
            if self.holding {
                self.held = self.held.max(lsn);
            } else {
                self.publish(lsn);
            }
        }
    }

    fn publish(&mut self, lsn: Lsn) {
        if lsn > self.handed_on {
            self.handed_on = lsn;
            let before = self.shared.handed_on.fetch_max(lsn.0, Ordering::AcqRel);
            if lsn.0 > before {
                self.shared.moved.notify_one();
            }
        }
    }

    /// Stop confirming: commits received from now on are not declared handed on by the next
    /// `recv` but kept until [`Self::release`]. For a consumer that gathers several
    /// transactions before handing their changes on (so a crash in between replays them).
    pub fn hold(&mut self) {
        self.holding = true;
    }

    /// While holding: the commits up to `lsn` were handed on, confirm them (the rest stays
    /// held). `lsn` is a commit's end position the consumer finished.
    pub fn release_to(&mut self, lsn: Lsn) {
        let to = self.held.min(lsn);
        self.publish(to);
    }

    /// Everything received so far was handed on: confirm what [`Self::hold`] kept back (the
    /// event returned by the last `recv` is declared by the next one, as usual).
    pub fn release(&mut self) {
        self.holding = false;
        let held = std::mem::replace(&mut self.held, Lsn(0));
        self.publish(held);
    }

    /// Whether the next `recv` would return at once (events are waiting in the buffer).
    pub fn has_buffered(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The position this consumer has made safe to confirm (commit end or idle keepalive);
    /// `Lsn(0)` until something was handed on.
    pub fn handed_on(&self) -> Lsn {
        self.handed_on
    }

    /// Whether the last handed-on message is inside a transaction (after Begin, before
    /// Commit).
    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// The flush position last written to the server.
    pub fn sent_flush(&self) -> Lsn {
        Lsn(self.shared.sent_flush.load(Ordering::Acquire))
    }

    /// The walsender's process id.
    pub fn backend_pid(&self) -> i32 {
        self.backend_pid
    }

    /// Ends streaming politely: a final status update with the current flush position,
    /// CopyDone, waits (bounded) for the server to finish, Terminate. Returns the flush
    /// position confirmed in that last update. The event returned by the last `recv` is not
    /// confirmed unless [`Self::mark_handed_on`] was called.
    pub async fn shutdown(mut self) -> Result<Lsn, ReplicationError> {
        if let Some(tx) = self.shutdown_tx.take() {
            // An error means the task is already gone; its handle tells us how it ended.
            let _ = tx.send(());
        }
        let Some(handle) = self.task.take() else {
            return Err(ReplicationError::Closed);
        };
        match handle.await {
            Ok(result) => result,
            Err(e) => Err(ReplicationError::Protocol(format!(
                "replication reader task failed: {e}"
            ))),
        }
    }
}

fn classify(event: &StreamEvent) -> Handed {
    match event {
        StreamEvent::XLogData(x) => match x.data.first() {
            Some(b'B') => Handed::Begin,
            Some(b'C') => match commit_end_lsn(&x.data) {
                Some(lsn) => Handed::Commit(lsn),
                None => {
                    // The decoder will reject it too; never ack from a malformed commit.
                    tracing::warn!(wal_start = %x.wal_start, len = x.data.len(), "commit message too short");
                    Handed::Other
                }
            },
            _ => Handed::Other,
        },
        StreamEvent::Keepalive { wal_end } => Handed::Keepalive(*wal_end),
        StreamEvent::Reconnected { .. }
        | StreamEvent::Disconnected { .. }
        | StreamEvent::SlotRecreated => Handed::Other,
    }
}

/// Commit: Byte1 'C', Int8 flags, Int64 commit LSN, Int64 end LSN, Int64 timestamp.
fn commit_end_lsn(data: &[u8]) -> Option<Lsn> {
    let bytes: [u8; 8] = data.get(10..18)?.try_into().ok()?;
    Some(Lsn(u64::from_be_bytes(bytes)))
}

/// Why the reader task woke up.
enum Wake {
    Shutdown,
    StatusDue,
    FlushMoved,
    Delivered,
    ConsumerGone,
    Read(Result<(), ReplicationError>),
    Silent,
}

struct ReaderTask {
    conn: Connection,
    tx: mpsc::Sender<Item>,
    shared: Arc<Shared>,
    settings: StreamSettings,
    /// Latest server position seen (the `write` field).
    received: Lsn,
    sent_flush: Lsn,
    last_status_at: Instant,
    next_status_at: Instant,
    /// Last time bytes arrived (or we started listening again after backpressure).
    last_rx_at: Instant,
    reply_now: bool,
}

impl ReaderTask {
    async fn run(mut self, mut shutdown: oneshot::Receiver<()>) -> Result<Lsn, ReplicationError> {
        // At most one event waits here when the channel is full; while it does, the socket
        // is not read.
        let mut pending: Option<Item> = None;
        // Set once an error is queued: deliver it, then stop.
        let mut failed = false;
        loop {
            // Hand over whatever is already buffered, as long as the channel takes it.
            while pending.is_none() && !failed {
                match self.next_buffered() {
                    Ok(Some(event)) => match self.tx.try_send(Ok(event)) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(item)) => pending = Some(item),
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return self.finish("consumer dropped the stream").await
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        failed = true;
                        pending = Some(Err(e));
                    }
                }
                if self.reply_now && !failed {
                    self.reply_now = false;
                    if let Err(e) = self.send_reply().await {
                        failed = true;
                        pending = Some(Err(e));
                    }
                }
            }

            let reading = pending.is_none() && !failed;
            let silence_deadline = self.last_rx_at + self.settings.server_timeout;
            // The branches only borrow fields; everything that needs `&mut self` happens
            // after the select, on the `Wake` it produced.
            let wake = tokio::select! {
                // Timers first: under a constant flow of data the socket is always
                // readable, and feedback must not starve.
                biased;
                _ = &mut shutdown => Wake::Shutdown,
                _ = sleep_until(self.next_status_at), if !failed => Wake::StatusDue,
                _ = self.shared.moved.notified(), if !failed => Wake::FlushMoved,
                permit = self.tx.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        if let Some(item) = pending.take() {
                            permit.send(item);
                        }
                        Wake::Delivered
                    }
                    Err(_) => Wake::ConsumerGone,
                },
                read = self.conn.fill(), if reading => Wake::Read(read),
                _ = sleep_until(silence_deadline), if reading => Wake::Silent,
                _ = self.tx.closed(), if pending.is_none() => Wake::ConsumerGone,
            };
            match wake {
                Wake::Shutdown => return self.finish("shutdown requested").await,
                Wake::ConsumerGone => return self.finish("consumer dropped the stream").await,
                Wake::StatusDue => {
                    // Silence from the server while we are listening: ask for a keepalive,
                    // so a dead peer is told apart from a quiet one.
                    let ping =
                        reading && self.last_rx_at.elapsed() >= self.settings.status_interval;
                    if let Err(e) = self.send_status(ping).await {
                        failed = true;
                        pending = Some(Err(e));
                    }
                }
                Wake::FlushMoved => {
                    let soon = self.last_status_at + FEEDBACK_MIN_GAP;
                    self.next_status_at = self.next_status_at.min(soon);
                }
                Wake::Delivered => {
                    if failed {
                        // The error reached the consumer; the connection is unusable.
                        self.conn.terminate().await;
                        return Err(ReplicationError::Closed);
                    }
                    // We were not listening while blocked; silence starts now.
                    self.last_rx_at = Instant::now();
                }
                Wake::Read(Ok(())) => self.last_rx_at = Instant::now(),
                Wake::Read(Err(e)) => {
                    failed = true;
                    pending = Some(Err(e));
                }
                Wake::Silent => {
                    tracing::warn!(timeout = ?self.settings.server_timeout, "no data from the server, dropping the connection");
                    failed = true;
                    pending = Some(Err(ReplicationError::ServerSilent(
                        self.settings.server_timeout,
                    )));
                }
            }
        }
    }

    /// Decodes one buffered message into an event, answering what needs no consumer.
    fn next_buffered(&mut self) -> Result<Option<StreamEvent>, ReplicationError> {
        loop {
            let Some(message) = self.conn.try_parse()? else {
                return Ok(None);
            };
            match message {
                Backend::Message(Message::CopyData(body)) => {
                    let frame = ReplicationFrame::parse(body.into_bytes()).map_err(|e| {
                        ReplicationError::Protocol(format!("replication frame: {e}"))
                    })?;
                    return Ok(Some(match frame {
                        ReplicationFrame::XLogData(x) => {
                            self.received = self.received.max(x.wal_end);
                            StreamEvent::XLogData(x)
                        }
                        ReplicationFrame::Keepalive(k) => {
                            self.received = self.received.max(k.wal_end);
                            if k.reply_requested {
                                self.reply_now = true;
                            }
                            StreamEvent::Keepalive { wal_end: k.wal_end }
                        }
                    }));
                }
                Backend::Message(Message::CopyDone) => return Err(ReplicationError::StreamEnded),
                // A walsender told to shut down ends the stream with CommandComplete ("COPY
                // 0") and no CopyDone once everything it sent is replicated: the server is
                // going away, which is transient, not a protocol violation.
                Backend::Message(Message::CommandComplete(_) | Message::ReadyForQuery(_)) => {
                    return Err(ReplicationError::StreamEnded)
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let db = parse_db_error(body.fields())?;
                    tracing::warn!(code = %db.code, message = %db.message, "replication stream error from the server");
                    let s = &self.settings;
                    return Err(map_slot_error(
                        db,
                        &s.slot,
                        &s.publication,
                        &s.user,
                        &s.dbname,
                    ));
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(_)) => {}
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message inside the replication stream".into(),
                    ))
                }
            }
        }
    }

    /// The flush position to confirm: what was handed on, up to the ceiling, never less
    /// than already confirmed. Also whether the ceiling holds something back.
    fn flush_position(&self) -> (Lsn, bool) {
        let handed_on = Lsn(self.shared.handed_on.load(Ordering::Acquire));
        let capped = match self.settings.ceiling.get() {
            Some(ceiling) => handed_on.min(ceiling),
            None => handed_on,
        };
        let flush = self.sent_flush.max(capped);
        (flush, flush < handed_on)
    }

    /// The answer to a keepalive that asked for one. While the ceiling holds confirmations
    /// back it carries flush 0 (see [`crate::ConfirmCeiling`]): the slot stays put and a
    /// walsender waiting to shut down compares our write position instead.
    async fn send_reply(&mut self) -> Result<(), ReplicationError> {
        let (_, held_back) = self.flush_position();
        if !held_back {
            return self.send_status(false).await;
        }
        let update = StandbyStatusUpdate {
            write: self.received.max(self.sent_flush),
            flush: Lsn(0),
            apply: Lsn(0),
            client_time: pg_now_micros(),
            reply_requested: false,
        };
        tracing::trace!(write = %update.write, "reply with the confirmation held back");
        self.write_update(update).await?;
        let now = Instant::now();
        self.last_status_at = now;
        Ok(())
    }

    async fn write_update(&mut self, update: StandbyStatusUpdate) -> Result<(), ReplicationError> {
        let mut body = BytesMut::with_capacity(StandbyStatusUpdate::ENCODED_LEN);
        update.encode(&mut body);
        frontend::CopyData::new(body.freeze())?.write(self.conn.write_buf());
        match tokio::time::timeout(self.settings.server_timeout, self.conn.flush()).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::ServerSilent(self.settings.server_timeout)),
        }
    }

    /// Writes a standby status update with the current positions.
    async fn send_status(&mut self, reply_requested: bool) -> Result<(), ReplicationError> {
        let (flush, _) = self.flush_position();
        let write = self.received.max(flush);
        let update = StandbyStatusUpdate {
            write,
            flush,
            apply: flush,
            client_time: pg_now_micros(),
            reply_requested,
        };
        self.write_update(update).await?;
        if flush != self.sent_flush {
            tracing::debug!(%write, %flush, "confirmed flush position");
        } else {
            tracing::trace!(%write, %flush, reply_requested, "status update");
        }
        self.sent_flush = flush;
        self.shared.sent_flush.store(flush.0, Ordering::Release);
        let now = Instant::now();
        self.last_status_at = now;
        self.next_status_at = now + self.settings.status_interval;
        Ok(())
    }

    /// Final status update, CopyDone, drain to ReadyForQuery (bounded), Terminate.
    async fn finish(mut self, why: &'static str) -> Result<Lsn, ReplicationError> {
        tracing::debug!(reason = why, "closing the replication stream");
        self.send_status(false).await?;
        frontend::copy_done(self.conn.write_buf());
        self.conn.flush().await?;
        let drain = async {
            loop {
                match self.conn.read_message().await? {
                    Backend::Message(Message::ReadyForQuery(_)) => {
                        return Ok::<(), ReplicationError>(())
                    }
                    Backend::Message(Message::ErrorResponse(body)) => {
                        let db = parse_db_error(body.fields())?;
                        tracing::warn!(code = %db.code, message = %db.message, "error while ending the replication stream");
                    }
                    Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                    // Data still in flight was not handed on, so it is simply not confirmed.
                    _ => {}
                }
            }
        };
        match tokio::time::timeout(SHUTDOWN_DRAIN_TIMEOUT, drain).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "connection ended while draining"),
            Err(_) => tracing::warn!("server did not finish the replication stream in time"),
        }
        let flush = self.sent_flush;
        self.conn.terminate().await;
        tracing::info!(%flush, "replication stream closed");
        Ok(flush)
    }
}

fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix - crate::PG_EPOCH_OFFSET_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn xlog(data: &[u8]) -> StreamEvent {
        StreamEvent::XLogData(XLogData {
            wal_start: Lsn(1),
            wal_end: Lsn(2),
            send_time: 0,
            data: Bytes::copy_from_slice(data),
        })
    }

    #[test]
    fn commit_end_lsn_is_bytes_10_to_18() {
        let mut data = vec![b'C', 0];
        data.extend_from_slice(&0x10u64.to_be_bytes());
        data.extend_from_slice(&0x0123_4567_89ab_cdefu64.to_be_bytes());
        data.extend_from_slice(&0u64.to_be_bytes());
        assert!(matches!(
            classify(&xlog(&data)),
            Handed::Commit(Lsn(0x0123_4567_89ab_cdef))
        ));
        assert!(matches!(classify(&xlog(&data[..17])), Handed::Other));
        assert!(matches!(classify(&xlog(b"B")), Handed::Begin));
        assert!(matches!(classify(&xlog(b"")), Handed::Other));
    }
}
