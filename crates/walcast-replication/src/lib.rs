//! The logical replication connection of walcast, on `postgres-protocol` and tokio.
//!
//! Upstream `tokio-postgres` cannot do CopyBoth, so this crate speaks the few parts of the
//! protocol a logical replication client needs: startup with `replication=database`,
//! authentication (trust, cleartext, md5, SCRAM-SHA-256 with channel binding over TLS),
//! TLS per `sslmode`, simple queries, and the CopyBoth stream of XLogData and keepalives.
//! It checks the server (`wal_level`), the publication and the slot, streams, sends feedback
//! and reconnects. It does not decode pgoutput: it only peeks at the first byte of each
//! message (Begin / Commit) and at Commit's end LSN, for the flush bookkeeping.
//!
//! ```text
//!                       ┌────────────────── reader task (owns the socket) ──────────────────┐
//!   Postgres walsender ─┤ CopyData 'w' XLogData / 'k' keepalive ─▶ pending ─▶ reserve() ────┼─▶ bounded channel
//!        ▲              │  'k' with reply requested ─▶ 'r' at once                           │        │
//!        │              │  timer: 'r' every status interval, even while the channel is full │        ▼
//!        └── 'r' ◀──────┤  flush = handed_on (read from the consumer side)                  │  ReplicationStream::recv()
//!                       └────────────────────────────────────────────────▲──────────────────┘        │ consumer (decoder → hub)
//!                                                                        └── handed_on ◀─────────────┘ next recv() = previous
//!                                                                                                        event handed on
//! ```
//!
//! Invariants:
//! * **Feedback never waits for the consumer.** Keepalive reply requests are answered and a
//!   status update is written at least every status interval (10 s, or a third of
//!   `wal_sender_timeout` if shorter) even while the channel is full. While it is full the
//!   socket is not read, so TCP flow control throttles the walsender instead of memory
//!   growing.
//! * **Flush moves past a commit only after the commit was handed on**: an XLogData whose
//!   message is a Commit (`'C'`) moves flush to that Commit's `end_lsn`, once the consumer
//!   asks for the next event. Never from XLogData header positions, never on receipt.
//! * **Idle confirm**: a keepalive handed on outside a transaction confirms its `wal_end`,
//!   so an idle (or only-unpublished-tables) database does not pin WAL.
//! * **Monotonic**: flush never moves backwards; write ≥ flush; apply = flush.
//! * **Dead peers are noticed**: no bytes for `server_timeout` while reading → error (we
//!   ping with reply-requested when the server has been quiet for a status interval).
//! * [`Replicator`] reconnects with jittered exponential backoff (100 ms → 30 s) after
//!   transient errors and resumes at the handed-on position, reporting each loss once
//!   ([`StreamEvent::Disconnected`]); fatal errors (see [`ReplicationError::is_transient`])
//!   are returned once, each with the fix in its message. A persistent slot that existed and
//!   is gone is fatal ([`ReplicationError::SlotMissing`]) unless `recreate_slot` is set: a
//!   silently recreated slot would hide lost changes.
//!
//! ```no_run
//! # async fn run() -> Result<(), walcast_replication::ReplicationError> {
//! use walcast_replication::{ReplicationConfig, Replicator, StreamEvent};
//! let cfg = ReplicationConfig::from_url("postgres://walcast:secret@db:5432/app?sslmode=verify-full")?
//!     .with_publication("walcast")
//!     .with_slot("walcast");
//! let mut replicator = Replicator::new(cfg);
//! while let Some(event) = replicator.recv().await {
//!     match event? {
//!         StreamEvent::XLogData(x) => { /* decode x.data and dispatch */ }
//!         StreamEvent::Keepalive { .. } => {}
//!         StreamEvent::Reconnected { .. } => { /* reset the relation cache */ }
//!         StreamEvent::Disconnected { reason } => { /* report it; the replicator retries */ }
//!         StreamEvent::SlotRecreated => { /* changes between the old and new slot are lost */ }
//!     }
//! }
//! # Ok(()) }
//! ```

mod client;
mod config;
mod connection;
mod error;
mod replicator;
mod stream;
mod tls;

pub use client::{connect, PublicationStatus, ReplicationClient, SlotStatus, SystemIdentity};
pub use config::{ConfigError, ConfirmCeiling, Host, ReplicationConfig, SslMode};
pub use connection::SimpleRow;
pub use error::{DbError, ReplicationError};
pub use replicator::Replicator;
pub use stream::{ReplicationStream, StreamEvent};

/// The rustls client configuration for an `sslmode` (shared with ordinary SQL connections).
pub use tls::client_config as tls_client_config;
pub use walcast_pgoutput::{Lsn, PrimaryKeepalive, XLogData};

use walcast_pgoutput::{ReplicationFrame, StandbyStatusUpdate, PG_EPOCH_OFFSET_MICROS};
