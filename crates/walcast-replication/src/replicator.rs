//! The reconnecting driver: connect, check, start, stream, and after any transient failure
//! do it all again from the last handed-on position.
//!
//! ```text
//!  ┌─▶ connect ─▶ IDENTIFY_SYSTEM ─▶ wal_level ─▶ publication ─▶ slot ─▶ START_REPLICATION at resume
//!  │                                                                         │
//!  │   backoff 100 ms → 30 s, jittered          events ─▶ consumer ◀─────────┘
//!  └── transient error (connection lost, server restart, our old walsender still holding the slot)
//!      fatal error (password, wal_level, publication, slot in use / invalidated, database) ─▶ returned once
//! ```
//!
//! Resuming: START_REPLICATION asks for the consumer's handed-on position; the server starts
//! at `max(that, confirmed_flush_lsn)` and only skips transactions whose commit ends before
//! it, so nothing handed on is lost and at most the transaction in flight repeats. After a
//! reconnect the consumer gets [`StreamEvent::Reconnected`] first.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::client::{connect, SlotPolicy, SlotStatus, SystemIdentity};
use crate::config::ReplicationConfig;
use crate::error::ReplicationError;
use crate::stream::{ReplicationStream, StreamEvent};
use crate::Lsn;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection that streamed this long counts as healthy: the next failure starts the
/// backoff from the bottom again.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Exponential backoff with jitter (each delay uniformly in [d/2, d]), so that many nodes
/// do not reconnect in lockstep after a server restart.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: BACKOFF_MIN }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(BACKOFF_MAX);
        let half = d / 2;
        // RandomState is seeded randomly per instance: good enough for jitter, no rand dep.
        let r = RandomState::new().build_hasher().finish();
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(if nanos == 0 { 0 } else { r % nanos })
    }
}

/// A replication stream that survives connection loss.
pub struct Replicator {
    cfg: ReplicationConfig,
    stream: Option<ReplicationStream>,
    /// Where the next START_REPLICATION begins: the handed-on position of the streams so far.
    resume: Lsn,
    identity: Option<SystemIdentity>,
    previous_pid: Option<i32>,
    connected_once: bool,
    connected_at: Instant,
    backoff: Backoff,
    /// A fatal error was returned; the replicator is finished.
    done: bool,
    /// True while a stream is established (for health checks).
    streaming: Arc<AtomicBool>,
    /// The slot was found or created once: from then on a missing slot means lost changes.
    slot_seen: bool,
    /// A loss was reported with [`StreamEvent::Disconnected`] and not yet followed by a
    /// reconnection.
    lost_reported: bool,
    /// The last establish created the slot anew after it had been seen.
    recreated: bool,
    /// `SlotRecreated` was returned; `Reconnected` comes next.
    reconnected_pending: bool,
    /// Why the stream is down, while it is.
    down_reason: Option<String>,
}

impl Replicator {
    /// A replicator for `cfg`; nothing happens until the first [`Replicator::recv`].
    pub fn new(cfg: ReplicationConfig) -> Self {
        Replicator {
            cfg,
            stream: None,
            resume: Lsn(0),
            identity: None,
            previous_pid: None,
            connected_once: false,
            connected_at: Instant::now(),
            backoff: Backoff::new(),
            done: false,
            streaming: Arc::new(AtomicBool::new(false)),
            slot_seen: false,
            lost_reported: false,
            recreated: false,
            reconnected_pending: false,
            down_reason: None,
        }
    }

    /// Starts at `lsn` instead of the slot's confirmed position (a checkpoint of our own).
    pub fn with_start_lsn(mut self, lsn: Lsn) -> Self {
        self.resume = lsn;
        self
    }

    /// Connects (if needed) and returns the next event. Transient failures are retried
    /// behind the scenes; a fatal error is returned once, then `None`.
    pub async fn recv(&mut self) -> Option<Result<StreamEvent, ReplicationError>> {
        if self.done {
            return None;
        }
        loop {
            if self.reconnected_pending {
                self.reconnected_pending = false;
                return Some(Ok(StreamEvent::Reconnected {
                    resume_from: self.resume,
                }));
            }
            if let (Some(reason), false) = (&self.down_reason, self.lost_reported) {
                self.lost_reported = true;
                return Some(Ok(StreamEvent::Disconnected {
                    reason: reason.clone(),
                }));
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.establish().await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.streaming.store(true, Ordering::Release);
                        self.connected_at = Instant::now();
                        self.down_reason = None;
                        self.lost_reported = false;
                        if self.connected_once {
                            if self.recreated {
                                // Told first: the consumer warns its subscribers to refetch
                                // before it says the stream is back.
                                self.recreated = false;
                                self.reconnected_pending = true;
                                return Some(Ok(StreamEvent::SlotRecreated));
                            }
                            return Some(Ok(StreamEvent::Reconnected {
                                resume_from: self.resume,
                            }));
                        }
                        self.connected_once = true;
                        continue;
                    }
                    Err(e) if e.is_transient() => {
                        let delay = self.backoff.next_delay();
                        tracing::warn!(error = %e, retry_in = ?delay, "replication connect failed, retrying");
                        if self.down_reason.is_none() {
                            self.down_reason = Some(e.to_string());
                        }
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "replication cannot continue");
                        self.done = true;
                        self.streaming.store(false, Ordering::Release);
                        return Some(Err(e));
                    }
                }
            };
            let item = stream.recv().await;
            // Includes the event handed on by this very call.
            self.resume = self.resume.max(stream.handed_on());
            match item {
                Some(Ok(event)) => return Some(Ok(event)),
                Some(Err(e)) if e.is_transient() => {
                    tracing::warn!(error = %e, resume = %self.resume, "replication connection lost, reconnecting");
                    self.drop_stream(e.to_string());
                }
                Some(Err(e)) => {
                    tracing::error!(error = %e, "replication cannot continue");
                    self.drop_stream(e.to_string());
                    self.done = true;
                    return Some(Err(e));
                }
                None => {
                    tracing::warn!(resume = %self.resume, "replication stream ended, reconnecting");
                    self.drop_stream("the replication stream ended".into());
                }
            }
        }
    }

    /// Drop the current stream and connect again from the last handed-on position (the
    /// consumer found the stream unusable, e.g. a message it cannot decode). The loss is
    /// reported like any other.
    pub fn reconnect(&mut self, reason: String) {
        if self.stream.is_some() {
            self.drop_stream(reason);
        }
    }

    fn drop_stream(&mut self, reason: String) {
        self.streaming.store(false, Ordering::Release);
        if self.down_reason.is_none() {
            self.down_reason = Some(reason);
        }
        if let Some(stream) = self.stream.take() {
            self.previous_pid = Some(stream.backend_pid());
        }
        if self.connected_at.elapsed() >= HEALTHY_AFTER {
            self.backoff.reset();
        }
    }

    /// Connect, check everything, start streaming at the resume position.
    async fn establish(&mut self) -> Result<ReplicationStream, ReplicationError> {
        let mut client = connect(&self.cfg).await?;
        let identity = client.identify_system().await?;
        if let Some(previous) = &self.identity {
            if previous.system_id != identity.system_id {
                // A failover to a server with a copied slot is fine; anything else means the
                // slot's history is not the one we streamed from. Say so loudly.
                tracing::warn!(
                    previous = %previous.system_id,
                    current = %identity.system_id,
                    "connected to a different postgres cluster than before"
                );
            }
        }
        self.identity = Some(identity);
        client.check_wal_level().await?;
        client.ensure_publication().await?;
        // A temporary slot vanishes with its connection by design; a persistent one that
        // was there before and is gone now means someone dropped it.
        let policy = if self.cfg.recreate_slot {
            SlotPolicy::Recreate
        } else if self.slot_seen && !self.cfg.temporary_slot {
            SlotPolicy::MustExist
        } else {
            SlotPolicy::Create
        };
        let status = client.ensure_slot_inner(self.previous_pid, policy).await?;
        if self.slot_seen
            && matches!(status, SlotStatus::Created { .. })
            && !self.cfg.temporary_slot
        {
            self.recreated = true;
        }
        self.slot_seen = true;
        client.start(self.resume).await
    }

    /// While the stream is down: why.
    pub fn down_reason(&self) -> Option<&str> {
        self.down_reason.as_deref()
    }

    /// A flag that is true while a replication stream is established; readiness probes read
    /// it without touching the replicator.
    pub fn streaming_flag(&self) -> Arc<AtomicBool> {
        self.streaming.clone()
    }

    /// Declares the last event handed on (see [`ReplicationStream::mark_handed_on`]).
    pub fn mark_handed_on(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            stream.mark_handed_on();
            self.resume = self.resume.max(stream.handed_on());
        }
    }

    /// Hold back confirmations (see [`ReplicationStream::hold`]) until
    /// [`Replicator::release`]. A reconnection drops what was held: the new stream resumes
    /// from the last confirmed position, so the held transactions are streamed again.
    pub fn hold(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            stream.hold();
        }
    }

    /// Confirm the held commits up to `lsn` (a commit end the consumer finished); the rest
    /// stays held.
    pub fn release_to(&mut self, lsn: Lsn) {
        if let Some(stream) = self.stream.as_mut() {
            stream.release_to(lsn);
            self.resume = self.resume.max(stream.handed_on());
        }
    }

    /// Confirm what [`Replicator::hold`] kept back: every change received so far was handed on.
    pub fn release(&mut self) {
        if let Some(stream) = self.stream.as_mut() {
            stream.release();
            self.resume = self.resume.max(stream.handed_on());
        }
    }

    /// Whether events are already waiting, so the next `recv` returns without waiting.
    pub fn has_buffered(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| s.has_buffered())
    }

    /// The position confirmed safe by the consumer so far (across connections).
    pub fn handed_on(&self) -> Lsn {
        match &self.stream {
            Some(s) => self.resume.max(s.handed_on()),
            None => self.resume,
        }
    }

    /// `IDENTIFY_SYSTEM` of the current (or last) connection.
    pub fn system_identity(&self) -> Option<&SystemIdentity> {
        self.identity.as_ref()
    }

    /// The current walsender's process id, if streaming.
    pub fn backend_pid(&self) -> Option<i32> {
        self.stream.as_ref().map(ReplicationStream::backend_pid)
    }

    /// Ends streaming (see [`ReplicationStream::shutdown`]). Without a live connection it
    /// returns the handed-on position, which the next start resumes from.
    pub async fn shutdown(mut self) -> Result<Lsn, ReplicationError> {
        match self.stream.take() {
            Some(stream) => stream.shutdown().await,
            None => Ok(self.resume),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        let mut b = Backoff::new();
        let first = b.next_delay();
        assert!(first >= BACKOFF_MIN / 2 && first <= BACKOFF_MIN);
        let mut last = first;
        for _ in 0..20 {
            last = b.next_delay();
        }
        assert!(last >= BACKOFF_MAX / 2 && last <= BACKOFF_MAX);
        b.reset();
        assert!(b.next_delay() <= BACKOFF_MIN);
    }
}
