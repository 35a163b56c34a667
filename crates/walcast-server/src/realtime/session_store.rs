//! Session resume across restarts: the session channels' records, the WAL they may need,
//! and their restoration at startup.
//!
//! ```text
//!  every second (and once more at shutdown):
//!    Sessions::channels ─▶ rows (who, topic, bindings, role + claims, acked, parked_at)
//!      ├─ changed rows upserted, gone rows deleted ─▶ realtime.walcast_sessions (UNLOGGED)
//!      └─ min(acked) ─▶ ConfirmCeiling: the slot is never confirmed past what a session
//!                       may ask for again, so a restart can read it from the slot
//!  startup, before streaming:
//!    rows ─▶ parked channels (hub subscriber after `acked`, topic member) ─▶ the stream,
//!            read from the slot's confirmed position, refills their buffers
//! ```
//!
//! Invariants:
//! - The ceiling is set before streaming starts and never above a live or parked channel's
//!   persisted `acked`, so everything after `acked` is still in the slot after a crash. A
//!   record is written at most a second after its channel changed: a crash within that second
//!   may repeat deliveries the client had acknowledged, never lose one.
//! - A restored channel whose `acked` lies before the slot's confirmed position (the record
//!   outlived the WAL, e.g. after `--recreate-slot`) is restored as lost: its rejoin is told
//!   to resync, never given a replay with a hole.
//! - Rows hold token claims; the table is revoked from PUBLIC.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use walcast_core::broadcast::{JoinOptions, Member, TopicKey};
use walcast_core::hub::{ChannelTarget, Framing, Identity};
use walcast_core::Position;
use walcast_protocol::{JoinPayload, Vsn};
use walcast_replication::{ConfirmCeiling, Lsn};

use crate::realtime::resume::{ChannelSpec, Lost, Meta, RestoredChannel, Resumable, SessionKey};
use crate::state::AppState;

/// How often records and the ceiling are brought up to date.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// One channel's record, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    session_id: String,
    who: String,
    topic: String,
    role: String,
    claims: String,
    vsn: &'static str,
    private: bool,
    /// JSON array of the raw postgres_changes entries.
    entries: String,
    broadcast: bool,
    acked: String,
    parked: bool,
    /// Not stored: a lost channel needs nothing replayed.
    lost: bool,
}

type RowKey = (String, String, String);

fn row_of(r: &Resumable) -> Row {
    let meta = r.meta();
    Row {
        session_id: r.key.id.to_string(),
        who: r.key.who.to_string(),
        topic: r.topic.to_string(),
        role: meta.identity.role.to_string(),
        claims: meta.identity.claims.to_string(),
        vsn: r.spec.vsn.as_str(),
        private: r.spec.private,
        entries: format!("[{}]", r.spec.entries.join(",")),
        broadcast: meta.broadcast,
        acked: r.acked().to_string(),
        parked: r.parked_since().is_some(),
        lost: r.lost().is_some(),
    }
}

/// The lowest position any session channel may still need replayed.
fn ceiling_of(channels: &[Arc<Resumable>]) -> Option<Lsn> {
    channels
        .iter()
        .filter(|r| r.lost().is_none())
        .map(|r| r.acked().lsn)
        .min()
}

/// The same over records: what was persisted is what a restart replays from.
fn ceiling_of_rows<'a>(rows: impl Iterator<Item = &'a Row>) -> Option<Lsn> {
    rows.filter(|r| !r.lost)
        .filter_map(|r| Position::parse(&r.acked).ok())
        .map(|p| p.lsn)
        .min()
}

/// Writes the records and keeps the ceiling; runs for the server's life.
pub struct SessionStore {
    state: Arc<AppState>,
    ceiling: ConfirmCeiling,
    written: HashMap<RowKey, Row>,
    /// The table is missing (no privileges to create it): records are not kept.
    disabled: bool,
    /// Cluster mode: this node's id, the owner of the records it writes ('' otherwise).
    /// Records another node claimed (it resumed the session) are neither updated nor
    /// deleted by this one.
    node: String,
}

impl SessionStore {
    pub fn new(state: Arc<AppState>, ceiling: ConfirmCeiling) -> SessionStore {
        SessionStore {
            ceiling,
            written: HashMap::new(),
            disabled: false,
            node: state
                .cluster
                .as_ref()
                .map(|c| c.node_id().to_owned())
                .unwrap_or_default(),
            state,
        }
    }

    /// Bring records and the ceiling up to date. The ceiling follows what was written: a
    /// restart replays from the records, so the slot must keep what they point at.
    pub async fn flush(&mut self) {
        let channels = self.state.sessions.channels();
        if self.disabled {
            // Nothing survives a restart: hold nothing back.
            self.ceiling.set(None);
            return;
        }
        let now: HashMap<RowKey, Row> = channels
            .iter()
            // Not placed in the stream yet (its join is being committed): next time.
            .filter(|r| r.acked() != Position::ZERO)
            .map(|r| {
                let row = row_of(r);
                (
                    (row.session_id.clone(), row.who.clone(), row.topic.clone()),
                    row,
                )
            })
            .collect();
        let changed: Vec<&Row> = now
            .iter()
            .filter(|(k, row)| self.written.get(*k) != Some(row))
            .map(|(_, row)| row)
            .collect();
        let gone: Vec<&RowKey> = self
            .written
            .keys()
            .filter(|k| !now.contains_key(*k))
            .collect();
        if changed.is_empty() && gone.is_empty() {
            return;
        }
        match self.write(&changed, &gone).await {
            Ok(()) => {
                self.ceiling.set(ceiling_of_rows(now.values()));
                self.written = now;
            }
            Err(e) => {
                // Kept in memory; written on a later tick once the database answers.
                tracing::debug!(error = ?format!("{e:#}"), "cannot write session records yet");
                if is_undefined_table(&e) {
                    tracing::warn!("realtime.walcast_sessions is missing (run `walcast migrate`): sessions will not survive a restart");
                    self.disabled = true;
                    self.ceiling.set(None);
                }
            }
        }
    }

    async fn write(&self, changed: &[&Row], gone: &[&RowKey]) -> Result<()> {
        let client = self.state.sql.get().await?;
        if !changed.is_empty() {
            let col =
                |f: fn(&Row) -> String| -> Vec<String> { changed.iter().map(|r| f(r)).collect() };
            let ids = col(|r| r.session_id.clone());
            let whos = col(|r| r.who.clone());
            let topics = col(|r| r.topic.clone());
            let roles = col(|r| r.role.clone());
            let claims = col(|r| r.claims.clone());
            let vsns = col(|r| r.vsn.to_owned());
            let privates: Vec<bool> = changed.iter().map(|r| r.private).collect();
            let entries = col(|r| r.entries.clone());
            let broadcasts: Vec<bool> = changed.iter().map(|r| r.broadcast).collect();
            let acked = col(|r| r.acked.clone());
            let parked: Vec<bool> = changed.iter().map(|r| r.parked).collect();
            client
                .execute(
                    "INSERT INTO realtime.walcast_sessions AS s \
                       (session_id, who, topic, role, claims, vsn, private, entries, broadcast, acked, parked_at, updated_at, node) \
                     SELECT i, w, t, r, c, v, p, e, b, a, CASE WHEN pk THEN now() END, now(), $12 \
                       FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
                                   $7::bool[], $8::text[], $9::bool[], $10::text[], $11::bool[]) \
                            AS u(i, w, t, r, c, v, p, e, b, a, pk) \
                     ON CONFLICT (session_id, who, topic) DO UPDATE SET \
                       role = excluded.role, claims = excluded.claims, vsn = excluded.vsn, \
                       private = excluded.private, entries = excluded.entries, \
                       broadcast = excluded.broadcast, acked = excluded.acked, \
                       parked_at = CASE WHEN excluded.parked_at IS NULL THEN NULL \
                                        ELSE coalesce(s.parked_at, excluded.parked_at) END, \
                       updated_at = now() \
                     WHERE s.node = excluded.node",
                    &[
                        &ids, &whos, &topics, &roles, &claims, &vsns, &privates, &entries,
                        &broadcasts, &acked, &parked, &self.node,
                    ],
                )
                .await
                .context("upserting session records")?;
        }
        if !gone.is_empty() {
            let ids: Vec<&str> = gone.iter().map(|k| k.0.as_str()).collect();
            let whos: Vec<&str> = gone.iter().map(|k| k.1.as_str()).collect();
            let topics: Vec<&str> = gone.iter().map(|k| k.2.as_str()).collect();
            client
                .execute(
                    "DELETE FROM realtime.walcast_sessions s \
                      USING unnest($1::text[], $2::text[], $3::text[]) AS u(i, w, t) \
                      WHERE s.session_id = u.i AND s.who = u.w AND s.topic = u.t AND s.node = $4",
                    &[&ids, &whos, &topics, &self.node],
                )
                .await
                .context("deleting session records")?;
        }
        Ok(())
    }

    /// Flush every [`FLUSH_EVERY`] until `stop`, then once more (sockets closed at shutdown
    /// have parked by then).
    pub async fn run(mut self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let sessions = self.state.sessions.clone();
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush().await,
                // A new session channel is recorded at once: until it is, a crash would
                // leave its rejoin unaware that anything was missed.
                _ = sessions.registered() => self.flush().await,
                _ = &mut stop => break,
            }
        }
        self.flush().await;
    }
}

fn is_undefined_table(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<tokio_postgres::Error>())
        .any(|pg| pg.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE))
}

/// Restore the session channels recorded by an earlier run, parked from now, before the
/// stream starts; sets the ceiling to what they need. Returns how many were restored.
/// Records older than the window (parked that long before the restart) are deleted.
pub async fn restore(state: &Arc<AppState>, slot: &str, ceiling: &ConfirmCeiling) -> Result<usize> {
    let client = state.sql.get().await?;
    let window = state.sessions.limits().window;
    let window_secs = window.as_secs_f64();
    client
        .execute(
            "DELETE FROM realtime.walcast_sessions \
              WHERE parked_at < now() - make_interval(secs => $1)",
            &[&window_secs],
        )
        .await
        .context("dropping expired session records")?;
    // The marker row (an empty session id, which no client can present) is there from the
    // first run on; a table without it that is older than the running postmaster was
    // emptied by crash recovery.
    let lost_records: bool = client
        .query_one(
            "SELECT NOT EXISTS (SELECT 1 FROM realtime.walcast_sessions WHERE session_id = '') \
                AND EXISTS (SELECT 1 FROM realtime.walcast_migrations \
                             WHERE name = 'walcast_sessions.sql' \
                               AND applied_at < pg_catalog.pg_postmaster_start_time())",
            &[],
        )
        .await
        .context("looking for the session records' marker")?
        .try_get(0)?;
    client
        .execute(
            "INSERT INTO realtime.walcast_sessions \
                    (session_id, who, topic, role, claims, vsn, private, entries, broadcast, acked) \
             VALUES ('', '', '', '', '', '', false, '[]', false, '') ON CONFLICT DO NOTHING",
            &[],
        )
        .await
        .context("writing the session records' marker")?;
    if lost_records {
        tracing::warn!(
            "the session records of the last run were lost (Postgres recovered from a crash): rejoining sessions are told to resync for one window"
        );
        state.sessions.records_lost(Instant::now());
    }
    if state.cluster.is_some() {
        // Cluster mode: a session is restored by the node its client rejoins, when it
        // rejoins (cluster::sessions), never by every node at startup.
        ceiling.set(None);
        return Ok(0);
    }
    let rows = client
        .query(
            "SELECT session_id, who, topic, role, claims, vsn, private, entries, broadcast, acked \
               FROM realtime.walcast_sessions WHERE session_id <> ''",
            &[],
        )
        .await
        .context("reading session records")?;
    if rows.is_empty() {
        return Ok(0);
    }
    let confirmed: Option<String> = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .context("reading the slot's position")?
        .and_then(|r| r.get(0));
    let confirmed: Option<Lsn> = confirmed.and_then(|t| t.parse().ok());
    let now = Instant::now();
    let mut restored = Vec::new();
    for row in rows {
        match restore_one(state, &row, confirmed, now).await {
            Ok(r) => restored.push(r),
            Err(e) => {
                tracing::warn!(error = ?format!("{e:#}"), "a session record could not be restored");
            }
        }
    }
    ceiling.set(ceiling_of(&restored));
    let lost = restored.iter().filter(|r| r.lost().is_some()).count();
    tracing::info!(
        channels = restored.len(),
        lost,
        "restored session channels from the last run"
    );
    Ok(restored.len())
}

async fn restore_one(
    state: &Arc<AppState>,
    row: &tokio_postgres::Row,
    confirmed: Option<Lsn>,
    now: Instant,
) -> Result<Arc<Resumable>> {
    let rec = record_of(row)?;
    // Everything after `acked` must still be in the slot.
    let p = prepare(
        state,
        &rec,
        |acked| confirmed.is_some_and(|c| c > acked.lsn),
        now,
    )
    .await?;
    if p.r.lost().is_some() {
        return Ok(p.r);
    }
    subscribe(state, &p, Some(p.acked));
    join_topic(state, &p);
    Ok(p.r)
}

/// One channel's record, as read back.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub session_id: String,
    pub who: String,
    pub topic: String,
    pub role: String,
    pub claims: String,
    pub vsn: String,
    pub private: bool,
    pub entries: String,
    pub broadcast: bool,
    pub acked: String,
}

/// The record in a row whose first ten columns are
/// `session_id, who, topic, role, claims, vsn, private, entries, broadcast, acked`.
pub(crate) fn record_of(row: &tokio_postgres::Row) -> Result<Record> {
    Ok(Record {
        session_id: row.try_get(0)?,
        who: row.try_get(1)?,
        topic: row.try_get(2)?,
        role: row.try_get(3)?,
        claims: row.try_get(4)?,
        vsn: row.try_get(5)?,
        private: row.try_get(6)?,
        entries: row.try_get(7)?,
        broadcast: row.try_get(8)?,
        acked: row.try_get(9)?,
    })
}

/// A channel restored from its record, parked, not yet subscribed anywhere.
pub(crate) struct Prepared {
    pub r: Arc<Resumable>,
    pub bindings: Vec<walcast_core::subscription::Binding>,
    pub identity: Arc<Identity>,
    pub vsn: Vsn,
    pub topic: Arc<str>,
    pub private: bool,
    pub broadcast: bool,
    /// The last position its client surely saw.
    pub acked: Position,
}

/// Restore `rec` as a parked channel: lost when `gone(acked)` says what it missed cannot be
/// replayed, or its bindings no longer pass their checks.
pub(crate) async fn prepare(
    state: &AppState,
    rec: &Record,
    gone: impl FnOnce(Position) -> bool,
    now: Instant,
) -> Result<Prepared> {
    let vsn = Vsn::from_query(Some(&rec.vsn)).context("a recorded serializer version")?;
    let acked = Position::parse(&rec.acked).context("a recorded position")?;
    let entries = &rec.entries;
    let payload = serde_json::value::RawValue::from_string(format!(
        "{{\"config\":{{\"postgres_changes\":{entries}}}}}"
    ))
    .context("recorded bindings")?;
    let join = JoinPayload::parse(&payload);
    let bindings = join.config.postgres_changes;
    let identity = Arc::new(Identity {
        role: Arc::from(rec.role.as_str()),
        claims: Arc::from(rec.claims.as_str()),
    });
    let spec = ChannelSpec::new(vsn, rec.private, &bindings);
    let mut lost = gone(acked).then_some(Lost::Dropped);
    let checked = if bindings.is_empty() || lost.is_some() {
        crate::realtime::changes::Checked::default()
    } else {
        crate::realtime::changes::build_bindings(state, &rec.role, &bindings).await
    };
    if !checked.errors.is_empty() {
        lost = Some(Lost::Dropped);
    }
    let id = state.next_subscriber_id();
    let topic: Arc<str> = Arc::from(rec.topic.as_str());
    let r = state.sessions.restore(
        RestoredChannel {
            key: SessionKey {
                id: Arc::from(rec.session_id.as_str()),
                who: Arc::from(rec.who.as_str()),
            },
            id,
            topic: topic.clone(),
            spec,
            acked,
            lost,
            meta: Meta {
                identity: identity.clone(),
                broadcast: rec.broadcast,
            },
        },
        now,
    );
    Ok(Prepared {
        r,
        bindings: checked.bindings,
        identity,
        vsn,
        topic,
        private: rec.private,
        broadcast: rec.broadcast,
        acked,
    })
}

/// Subscribe a prepared channel's bindings to the hub, after `after` (`None`: after what
/// was routed so far). Returns what the hub had routed when it subscribed: every change
/// routed from then on reaches the channel when it is after `after`.
pub(crate) fn subscribe(state: &AppState, p: &Prepared, after: Option<Position>) -> Position {
    if p.bindings.is_empty() {
        return state.hub.routed_through();
    }
    let target = ChannelTarget {
        outbox: p.r.clone(),
        framing: Framing::Phoenix(p.vsn),
        topic: p.topic.clone(),
        identity: p.identity.clone(),
        after,
    };
    let hub = &state.hub;
    hub.subscribe(p.r.id, target, p.bindings.clone(), || hub.routed_through())
}

/// Make a prepared channel a member of its broadcast topic, when it receives broadcasts.
pub(crate) fn join_topic(state: &AppState, p: &Prepared) {
    if !p.broadcast {
        return;
    }
    if let Some(key) = TopicKey::from_topic(&p.topic, p.private) {
        let member = Member {
            outbox: p.r.clone(),
            vsn: p.vsn,
            broadcast: true,
            presence: false,
            replayed: None,
        };
        let opts = JoinOptions {
            presence_state: None,
            max_members: None,
        };
        let _ = state.topics.join(&key, p.r.id, member, opts, || ());
    }
}
