//! The replication connection before streaming: identify the system, check `wal_level`,
//! make sure the publication and the slot exist and are usable, then `START_REPLICATION`.
//!
//! Every identifier and literal pasted into a command goes through
//! `postgres_protocol::escape` (replication commands cannot take parameters).

use std::time::Duration;

use postgres_protocol::escape::{escape_identifier, escape_literal};

use crate::config::ReplicationConfig;
use crate::connection::{Connection, SimpleRow};
use crate::error::{sqlstate, DbError, ReplicationError};
use crate::stream::{ReplicationStream, StreamSettings};
use crate::Lsn;

/// The answer to `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemIdentity {
    /// Unique cluster identifier (a 64-bit number, as text).
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: Lsn,
    /// The database we are connected to.
    pub dbname: Option<String>,
}

/// What [`ReplicationClient::ensure_publication`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicationStatus {
    /// It was there already.
    Existing,
    /// We created it `FOR ALL TABLES`.
    Created,
}

/// What to do when the slot is missing (or invalidated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPolicy {
    /// Create a missing slot (a first start).
    Create,
    /// A missing slot is an error: it existed before, so changes may have been lost.
    MustExist,
    /// Create a missing slot, and drop and create an invalidated one (the operator accepted
    /// that changes made meanwhile are lost).
    Recreate,
}

/// What [`ReplicationClient::ensure_slot`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotStatus {
    /// The slot existed; streaming resumes after its `confirmed_flush_lsn`.
    Existing {
        /// The slot's `confirmed_flush_lsn`, when set.
        confirmed_flush: Option<Lsn>,
    },
    /// We created it; streaming starts at its consistent point.
    Created {
        /// `consistent_point` returned by `CREATE_REPLICATION_SLOT`.
        consistent_point: Lsn,
    },
}

/// An authenticated logical-walsender connection, not yet streaming.
pub struct ReplicationClient {
    conn: Connection,
    cfg: ReplicationConfig,
    /// Where the slot is known to be confirmed; the stream starts its flush there so that the
    /// first status update never reports an older position than the server already has.
    slot_confirmed_flush: Lsn,
    wal_sender_timeout: Option<Duration>,
}

/// Opens a replication connection (`replication=database`) and authenticates.
pub async fn connect(cfg: &ReplicationConfig) -> Result<ReplicationClient, ReplicationError> {
    let conn = Connection::connect(cfg).await?;
    Ok(ReplicationClient {
        conn,
        cfg: cfg.clone(),
        slot_confirmed_flush: Lsn(0),
        wal_sender_timeout: None,
    })
}

impl ReplicationClient {
    /// The walsender's process id (what `pg_stat_replication.pid` and
    /// `pg_replication_slots.active_pid` show).
    pub fn backend_pid(&self) -> i32 {
        self.conn.backend_pid
    }

    /// How the connection authenticated: `trust`, `password`, `md5`, `SCRAM-SHA-256` or
    /// `SCRAM-SHA-256-PLUS` (channel-bound to the TLS session).
    pub fn auth_method(&self) -> &'static str {
        self.conn.auth_method
    }

    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        self.conn.tls
    }

    /// A server parameter reported at startup (`server_version`, `TimeZone`, …).
    pub fn parameter(&self, name: &str) -> Option<&str> {
        self.conn.parameters.get(name).map(String::as_str)
    }

    /// Major server version (e.g. 15), from `server_version`.
    pub fn server_major_version(&self) -> Option<u32> {
        let v = self.parameter("server_version")?;
        let digits: String = v.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    }

    /// Runs a command with the simple-query protocol (the only one a walsender accepts) and
    /// returns its rows with text columns. Since PG10 a logical walsender also runs SQL.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleRow>, ReplicationError> {
        self.conn.simple_query(sql).await?.map_err(|db| self.db(db))
    }

    /// `IDENTIFY_SYSTEM`.
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| ReplicationError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |name: &str| {
            row.get(name).ok_or_else(|| {
                ReplicationError::Protocol(format!("IDENTIFY_SYSTEM returned no {name}"))
            })
        };
        let timeline = field("timeline")?;
        let xlogpos = field("xlogpos")?;
        Ok(SystemIdentity {
            system_id: field("systemid")?.to_owned(),
            timeline: timeline.parse().map_err(|_| {
                ReplicationError::Protocol(format!("IDENTIFY_SYSTEM timeline '{timeline}'"))
            })?,
            xlogpos: parse_lsn(xlogpos)?,
            dbname: row.get("dbname").map(str::to_owned),
        })
    }

    /// Fails with [`ReplicationError::WalLevel`] unless `wal_level = logical`, and reads
    /// `wal_sender_timeout` to size the feedback interval.
    pub async fn check_wal_level(&mut self) -> Result<(), ReplicationError> {
        let rows = self.simple_query("SHOW wal_level").await?;
        let level = rows
            .first()
            .and_then(|r| r.values().first().cloned().flatten())
            .unwrap_or_default();
        if level != "logical" {
            return Err(ReplicationError::WalLevel(level));
        }
        let rows = self.simple_query("SHOW wal_sender_timeout").await?;
        self.wal_sender_timeout = rows
            .first()
            .and_then(|r| r.values().first().cloned().flatten())
            .and_then(|v| parse_duration_setting(&v));
        tracing::debug!(wal_sender_timeout = ?self.wal_sender_timeout, "server settings checked");
        Ok(())
    }

    /// Makes sure the configured publication exists, creating it `FOR ALL TABLES` when
    /// allowed. Otherwise the error carries the exact SQL to run.
    pub async fn ensure_publication(&mut self) -> Result<PublicationStatus, ReplicationError> {
        let name = self.cfg.publication.clone();
        let exists = format!(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
            escape_literal(&name)
        );
        if !self.simple_query(&exists).await?.is_empty() {
            return Ok(PublicationStatus::Existing);
        }
        let create = format!(
            "CREATE PUBLICATION {} FOR ALL TABLES",
            escape_identifier(&name)
        );
        let missing = |reason: String| ReplicationError::PublicationMissing {
            name: name.clone(),
            reason,
            sql: format!("{create};"),
        };
        if !self.cfg.create_publication {
            return Err(missing("walcast is not allowed to create it".into()));
        }
        match self.conn.simple_query(&create).await? {
            Ok(_) => {
                tracing::info!(publication = %name, "created publication for all tables");
                Ok(PublicationStatus::Created)
            }
            // Another node created it between our check and our CREATE.
            Err(db) if db.code == sqlstate::DUPLICATE_OBJECT => Ok(PublicationStatus::Existing),
            Err(db) if db.code == sqlstate::INSUFFICIENT_PRIVILEGE => Err(missing(format!(
                "role \"{}\" may not create it: {}",
                self.cfg.user, db.message
            ))),
            Err(db) => Err(self.db(db)),
        }
    }

    /// Makes sure the configured slot exists, is a pgoutput slot of this database, is not
    /// in use and still has its WAL; creates it (`NOEXPORT_SNAPSHOT`) when missing.
    pub async fn ensure_slot(&mut self) -> Result<SlotStatus, ReplicationError> {
        self.ensure_slot_inner(None, SlotPolicy::Create).await
    }

    /// As [`Self::ensure_slot`]; a slot held by `previous_pid` (our own previous walsender,
    /// which the server may not have reaped yet) is a transient condition.
    pub(crate) async fn ensure_slot_inner(
        &mut self,
        previous_pid: Option<i32>,
        policy: SlotPolicy,
    ) -> Result<SlotStatus, ReplicationError> {
        let slot = self.cfg.slot.clone();
        // `*` rather than a column list: `wal_status` only exists since PG13, and missing
        // columns simply read as NULL through `SimpleRow::get`.
        let query = format!(
            "SELECT * FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
            escape_literal(&slot)
        );
        for _ in 0..2 {
            let rows = self.simple_query(&query).await?;
            if let Some(row) = rows.first() {
                match self.check_slot(row, previous_pid) {
                    Err(ReplicationError::SlotInvalidated { .. })
                        if policy == SlotPolicy::Recreate =>
                    {
                        tracing::warn!(slot = %slot, "dropping the invalidated replication slot to create it again (--recreate-slot)");
                        let drop = format!("DROP_REPLICATION_SLOT {}", escape_identifier(&slot));
                        if let Err(db) = self.conn.simple_query(&drop).await? {
                            return Err(self.db(db));
                        }
                        continue;
                    }
                    other => return other,
                }
            }
            if policy == SlotPolicy::MustExist {
                return Err(ReplicationError::SlotMissing { slot });
            }
            let create = format!(
                "CREATE_REPLICATION_SLOT {}{} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
                escape_identifier(&slot),
                if self.cfg.temporary_slot {
                    " TEMPORARY"
                } else {
                    ""
                }
            );
            match self.conn.simple_query(&create).await? {
                Ok(rows) => {
                    let point = rows
                        .first()
                        .and_then(|r| r.get("consistent_point"))
                        .ok_or_else(|| {
                            ReplicationError::Protocol(
                                "CREATE_REPLICATION_SLOT returned no consistent_point".into(),
                            )
                        })?;
                    let consistent_point = parse_lsn(point)?;
                    tracing::info!(
                        slot = %slot,
                        temporary = self.cfg.temporary_slot,
                        %consistent_point,
                        "created replication slot"
                    );
                    self.slot_confirmed_flush = consistent_point;
                    return Ok(SlotStatus::Created { consistent_point });
                }
                // Created concurrently by someone else: look again.
                Err(db) if db.code == sqlstate::DUPLICATE_OBJECT => continue,
                Err(db) => return Err(self.db(db)),
            }
        }
        Err(ReplicationError::Protocol(format!(
            "replication slot \"{slot}\" keeps appearing and disappearing"
        )))
    }

    fn check_slot(
        &mut self,
        row: &SimpleRow,
        previous_pid: Option<i32>,
    ) -> Result<SlotStatus, ReplicationError> {
        let slot = self.cfg.slot.clone();
        let unusable = |problem: String| ReplicationError::SlotUnusable {
            slot: slot.clone(),
            problem,
        };
        if row.get("slot_type") != Some("logical") {
            return Err(unusable("it is a physical slot".into()));
        }
        match row.get("plugin") {
            Some("pgoutput") => {}
            other => {
                return Err(unusable(format!(
                    "it uses the output plugin '{}' instead of pgoutput",
                    other.unwrap_or("")
                )))
            }
        }
        if let Some(db) = row.get("database") {
            if db != self.cfg.dbname {
                return Err(unusable(format!(
                    "it belongs to database \"{db}\", not \"{}\"",
                    self.cfg.dbname
                )));
            }
        }
        if row.get("wal_status") == Some("lost") {
            return Err(ReplicationError::SlotInvalidated {
                slot,
                message: "wal_status is 'lost': the WAL it needs was removed".into(),
            });
        }
        if row.get("active") == Some("t") {
            let pid = row.get("active_pid").and_then(|p| p.parse().ok());
            return Err(match (pid, previous_pid) {
                (Some(p), Some(prev)) if p == prev => {
                    ReplicationError::SlotHeldByPreviousConnection { slot, pid: p }
                }
                _ => ReplicationError::SlotInUse { slot, pid },
            });
        }
        let confirmed_flush = row.get("confirmed_flush_lsn").map(parse_lsn).transpose()?;
        if let Some(lsn) = confirmed_flush {
            self.slot_confirmed_flush = lsn;
        }
        Ok(SlotStatus::Existing { confirmed_flush })
    }

    /// `START_REPLICATION SLOT … LOGICAL start_lsn (proto_version '1', publication_names …,
    /// messages 'true')` and hands the connection to a [`ReplicationStream`].
    ///
    /// The server starts at `max(start_lsn, slot.confirmed_flush_lsn)`; `Lsn(0)` means "where
    /// the slot is".
    pub async fn start(mut self, start_lsn: Lsn) -> Result<ReplicationStream, ReplicationError> {
        let publications = escape_literal(&escape_identifier(&self.cfg.publication));
        // `messages` (pg_logical_emit_message) needs PG14; older servers reject the option.
        let messages = match self.server_major_version() {
            Some(v) if v < 14 => "",
            _ => ", messages 'true'",
        };
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {} (proto_version '1', publication_names {}{})",
            escape_identifier(&self.cfg.slot),
            start_lsn,
            publications,
            messages
        );
        if let Err(db) = self.conn.start_copy_both(&sql).await? {
            return Err(self.start_error(db));
        }
        let status_interval = match self.wal_sender_timeout {
            // A third of the server's timeout leaves room for one lost update and a slow
            // scheduler before the walsender gives up on us.
            Some(t) if !t.is_zero() => self.cfg.status_interval.min(t / 3),
            _ => self.cfg.status_interval,
        }
        .max(Duration::from_millis(100));
        let initial_flush = start_lsn.max(self.slot_confirmed_flush);
        tracing::info!(
            slot = %self.cfg.slot,
            publication = %self.cfg.publication,
            %start_lsn,
            backend_pid = self.conn.backend_pid,
            "replication started"
        );
        Ok(ReplicationStream::spawn(
            self.conn,
            StreamSettings {
                status_interval,
                server_timeout: self.cfg.server_timeout,
                channel_capacity: self.cfg.channel_capacity.max(1),
                initial_flush,
                user: self.cfg.user.clone(),
                dbname: self.cfg.dbname.clone(),
                slot: self.cfg.slot.clone(),
                publication: self.cfg.publication.clone(),
                ceiling: self.cfg.confirm_ceiling.clone(),
            },
        ))
    }

    /// START_REPLICATION refusals that have a specific meaning.
    fn start_error(&self, db: DbError) -> ReplicationError {
        map_slot_error(
            db,
            &self.cfg.slot,
            &self.cfg.publication,
            &self.cfg.user,
            &self.cfg.dbname,
        )
    }

    fn db(&self, db: DbError) -> ReplicationError {
        ReplicationError::from_db(db, &self.cfg.user, &self.cfg.dbname)
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.terminate().await;
    }
}

/// Errors from START_REPLICATION or mid-stream that name the slot or publication.
pub(crate) fn map_slot_error(
    db: DbError,
    slot: &str,
    publication: &str,
    user: &str,
    dbname: &str,
) -> ReplicationError {
    match db.code.as_str() {
        sqlstate::OBJECT_IN_USE => ReplicationError::SlotInUse {
            slot: slot.to_owned(),
            pid: pid_from_message(&db.message),
        },
        sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE
            if db.message.contains("can no longer get changes")
                || db.message.contains("invalidated") =>
        {
            ReplicationError::SlotInvalidated {
                slot: slot.to_owned(),
                message: db.message,
            }
        }
        sqlstate::UNDEFINED_OBJECT if db.message.contains("publication") => {
            ReplicationError::PublicationMissing {
                name: publication.to_owned(),
                reason: db.message,
                sql: format!(
                    "CREATE PUBLICATION {} FOR ALL TABLES;",
                    escape_identifier(publication)
                ),
            }
        }
        _ => ReplicationError::from_db(db, user, dbname),
    }
}

/// "replication slot \"x\" is active for PID 1234" → 1234.
fn pid_from_message(message: &str) -> Option<i32> {
    let tail = message.rsplit(' ').next()?;
    tail.trim_end_matches('.').parse().ok()
}

fn parse_lsn(text: &str) -> Result<Lsn, ReplicationError> {
    text.parse()
        .map_err(|_| ReplicationError::Protocol(format!("'{text}' is not an LSN")))
}

/// `SHOW` output for a time setting: `60s`, `1min`, `500ms`, `0`.
fn parse_duration_setting(value: &str) -> Option<Duration> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let n: u64 = value[..digits_end].parse().ok()?;
    let ms = match value[digits_end..].trim() {
        "" | "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        "d" => n * 86_400_000,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_setting("60s"), Some(Duration::from_secs(60)));
        assert_eq!(
            parse_duration_setting("1min"),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_duration_setting("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration_setting("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration_setting("soon"), None);
    }

    #[test]
    fn pid_in_slot_error() {
        assert_eq!(
            pid_from_message("replication slot \"walcast\" is active for PID 4242"),
            Some(4242)
        );
        assert_eq!(pid_from_message("something else"), None);
    }
}
