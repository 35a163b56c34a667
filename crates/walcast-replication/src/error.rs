//! Errors, grouped by what the caller does next: [`ReplicationError::is_transient`] says
//! whether reconnecting can help. Every fatal variant's `Display` is one line that says what
//! to change.

use std::fmt;
use std::io;

use crate::config::ConfigError;

/// An `ErrorResponse` from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DbError {
    /// `ERROR`, `FATAL`, `PANIC`.
    pub severity: String,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl fmt::Display for DbError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " ({detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " hint: {hint}")?;
        }
        Ok(())
    }
}

/// SQLSTATEs we act on.
pub(crate) mod sqlstate {
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const DUPLICATE_OBJECT: &str = "42710";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const OBJECT_IN_USE: &str = "55006";
    pub const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
}

/// Everything that can go wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicationError {
    /// The database URL or settings are wrong.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// TCP or unix-socket connect failed.
    #[error("could not connect to {addr}: {source}")]
    Connect {
        /// Where we tried.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },

    /// The connection broke (read/write error, EOF).
    #[error("replication connection lost: {0}")]
    Io(#[from] io::Error),

    /// Connect, TLS or authentication did not finish within `connect_timeout`.
    #[error("timed out while {0}")]
    Timeout(&'static str),

    /// The server sent nothing for longer than `server_timeout`.
    #[error("no data from the server for {0:?}: treating the connection as dead")]
    ServerSilent(std::time::Duration),

    /// TLS was required but the server does not offer it.
    #[error("sslmode={0} but the server does not accept TLS: enable ssl on the server or use sslmode=prefer")]
    TlsUnavailable(crate::config::SslMode),

    /// The TLS handshake or certificate check failed.
    #[error("tls: {0}")]
    Tls(String),

    /// The server speaks something we do not expect; a bug on one side.
    #[error("replication protocol error: {0}")]
    Protocol(String),

    /// The server rejected the password (SQLSTATE 28P01) or the login (28000).
    #[error("authentication failed for user \"{user}\": {message}: check the user name and password in the database url and pg_hba.conf")]
    AuthFailed {
        /// Role we tried.
        user: String,
        /// The server's message.
        message: String,
    },

    /// The server wants a password and the URL has none.
    #[error("the server asks for a password for user \"{0}\" but the database url has none: add it as postgres://user:password@host/db")]
    PasswordRequired(String),

    /// The server asks for an authentication method we do not implement.
    #[error("the server asks for {0} authentication, which walcast does not support: use scram-sha-256, md5 or password in pg_hba.conf")]
    UnsupportedAuth(String),

    /// `wal_level` is not `logical`.
    #[error("wal_level is '{0}' but walcast needs 'logical': run ALTER SYSTEM SET wal_level = logical; and restart Postgres")]
    WalLevel(String),

    /// The role may not open a replication connection.
    #[error("role \"{user}\" may not start replication ({message}): run ALTER ROLE \"{user}\" WITH REPLICATION; as a superuser")]
    NotReplicationRole {
        /// Role we tried.
        user: String,
        /// The server's message.
        message: String,
    },

    /// The database does not exist (3D000).
    #[error("database \"{0}\" does not exist: fix the database name in the database url")]
    DatabaseMissing(String),

    /// The publication is missing and we may not (or could not) create it.
    #[error("publication \"{name}\" does not exist ({reason}): run {sql} as a superuser, or list your tables with FOR TABLE instead of FOR ALL TABLES")]
    PublicationMissing {
        /// Publication name.
        name: String,
        /// Why we did not create it.
        reason: String,
        /// The exact statement to run.
        sql: String,
    },

    /// Another connection streams from the slot (55006).
    #[error("replication slot \"{slot}\" is in use by {}: stop the other walcast (or consumer), or use another slot name", pid.map(|p| format!("process {p}")).unwrap_or_else(|| "another process".into()))]
    SlotInUse {
        /// Slot name.
        slot: String,
        /// The walsender holding it, if known.
        pid: Option<i32>,
    },

    /// Our own previous connection still holds the slot (the server has not noticed it is
    /// gone yet); retrying helps once `wal_sender_timeout` has passed.
    #[error("replication slot \"{slot}\" is still held by our previous connection (process {pid}); waiting for the server to release it")]
    SlotHeldByPreviousConnection {
        /// Slot name.
        slot: String,
        /// Our old walsender.
        pid: i32,
    },

    /// The slot lost WAL it needed (`wal_status = lost`, or 55000 on start).
    #[error("replication slot \"{slot}\" is invalidated ({message}): drop it with SELECT pg_drop_replication_slot('{slot}'); and restart walcast (changes made meanwhile are lost); raise max_slot_wal_keep_size to avoid this")]
    SlotInvalidated {
        /// Slot name.
        slot: String,
        /// Why.
        message: String,
    },

    /// The slot existed (walcast streamed from it) and is gone: someone dropped it, so the
    /// changes made since it was last confirmed may be lost. Not recreated silently.
    #[error("replication slot \"{slot}\" no longer exists: it was dropped, so changes made meanwhile may have been lost; restart walcast with --recreate-slot to create it again")]
    SlotMissing {
        /// Slot name.
        slot: String,
    },

    /// A slot with our name exists but cannot be used by us.
    #[error("replication slot \"{slot}\" is not usable: {problem}: drop it with SELECT pg_drop_replication_slot('{slot}'); or choose another slot name")]
    SlotUnusable {
        /// Slot name.
        slot: String,
        /// What is wrong with it.
        problem: String,
    },

    /// Any other `ErrorResponse`.
    #[error("server error: {0}")]
    Server(DbError),

    /// The server ended the replication stream (CopyDone).
    #[error("the server ended the replication stream")]
    StreamEnded,

    /// The stream was already shut down, or its reader task is gone.
    #[error("the replication stream is closed")]
    Closed,
}

impl ReplicationError {
    /// True when reconnecting (after a backoff) may succeed; false when a person has to
    /// change something first.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Connect { .. }
            | ReplicationError::Io(_)
            | ReplicationError::Timeout(_)
            | ReplicationError::ServerSilent(_)
            | ReplicationError::StreamEnded
            | ReplicationError::SlotHeldByPreviousConnection { .. } => true,
            ReplicationError::Server(db) => sqlstate_is_transient(&db.code),
            ReplicationError::Config(_)
            | ReplicationError::TlsUnavailable(_)
            | ReplicationError::Tls(_)
            | ReplicationError::Protocol(_)
            | ReplicationError::AuthFailed { .. }
            | ReplicationError::PasswordRequired(_)
            | ReplicationError::UnsupportedAuth(_)
            | ReplicationError::WalLevel(_)
            | ReplicationError::NotReplicationRole { .. }
            | ReplicationError::DatabaseMissing(_)
            | ReplicationError::PublicationMissing { .. }
            | ReplicationError::SlotInUse { .. }
            | ReplicationError::SlotInvalidated { .. }
            | ReplicationError::SlotMissing { .. }
            | ReplicationError::SlotUnusable { .. }
            | ReplicationError::Closed => false,
        }
    }

    /// The server error behind this error, if any.
    pub fn db_error(&self) -> Option<&DbError> {
        match self {
            ReplicationError::Server(db) => Some(db),
            _ => None,
        }
    }

    /// Turns a server error into the most specific variant we know.
    pub(crate) fn from_db(db: DbError, user: &str, dbname: &str) -> ReplicationError {
        match db.code.as_str() {
            sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION => {
                ReplicationError::AuthFailed {
                    user: user.to_owned(),
                    message: db.message,
                }
            }
            sqlstate::INVALID_CATALOG_NAME => ReplicationError::DatabaseMissing(dbname.to_owned()),
            sqlstate::INSUFFICIENT_PRIVILEGE if db.message.contains("replication") => {
                ReplicationError::NotReplicationRole {
                    user: user.to_owned(),
                    message: db.message,
                }
            }
            _ => ReplicationError::Server(db),
        }
    }
}

/// Connection problems, shutdowns, resource shortages and internal errors can go away;
/// anything about names, privileges or syntax cannot.
fn sqlstate_is_transient(code: &str) -> bool {
    matches!(
        code.get(..2),
        Some("08") | Some("53") | Some("57") | Some("58") | Some("40") | Some("XX")
    )
}
