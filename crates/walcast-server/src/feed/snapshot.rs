//! A feed's snapshot: the rows that match its filter now, read as the caller's role with its
//! claims (so row-level security and column privileges apply), and the transaction
//! visibility of the read, which aligns the snapshot with the change stream.
//!
//! ```text
//!  feed subscribed to the hub (floor F): changes after F queue in its outbox with their xid
//!  BEGIN REPEATABLE READ READ ONLY; SET LOCAL ROLE; claims   ← the snapshot is taken here
//!    pg_current_snapshot() = xmin:xmax:xip    rows (::text, filtered like the stream)
//!  ROLLBACK; L = pg_current_wal_insert_lsn(); wait until delivery got through L
//!  queued change visible in the snapshot (xid < xmin, or < xmax and not in xip) ─▶ dropped
//!  every other queued change (and everything later) ─▶ streamed after `snapshot_end`
//! ```
//!
//! Why this has neither gap nor duplicate:
//! - A change at or below F committed before the feed subscribed, hence before the snapshot
//!   was taken: it is visible, and the rows include it. The hub never queues it.
//! - A change above F is queued. If its transaction is visible in the snapshot the rows
//!   include it and it is dropped; if not, it is streamed. Postgres removes a transaction
//!   from the running set only after writing its commit record, so a transaction whose
//!   commit record lies after L (read once the snapshot existed) is never visible: waiting
//!   for delivery through L decides every change the snapshot could have seen.
//! - `snapshot_end` carries E, the highest position of a dropped change (or F): resuming
//!   from E replays exactly the invisible ones. That needs the visible ones to precede the
//!   invisible ones in commit order, which Postgres does not promise (a transaction can
//!   leave the running set before another that committed earlier); when the queued
//!   changes interleave, the snapshot is taken again (see [`aligned`] in the feed module).

use std::sync::Arc;

use walcast_core::change::{Change, ChangeKind, Column, Table, Value};
use walcast_core::hub::{Identity, Visibility};
use walcast_core::payload::render_data_visible;
use walcast_core::subscription::Binding;
use walcast_core::value::to_json_string;
use walcast_core::Position;

use crate::authz::rls::{claim_str, quote_ident};
use crate::db::catalog::table_access;
use crate::state::AppState;

/// Longest a snapshot query may run.
const SNAPSHOT_TIMEOUT_MS: u64 = 60_000;

/// Why a snapshot could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("a snapshot needs one table: give `schema` and `table` without wildcards")]
    Wildcard,
    #[error("the table was not found")]
    NoTable,
    #[error("the database refused the snapshot: {0}")]
    Refused(String),
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
}

/// A snapshot's transaction visibility (`pg_current_snapshot()`), 64-bit transaction ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xids {
    pub xmin: u64,
    pub xmax: u64,
    pub xip: Vec<u64>,
}

impl Xids {
    /// Parse `xmin:xmax:xip,xip,…`.
    pub fn parse(text: &str) -> Option<Xids> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Xids { xmin, xmax, xip })
    }

    /// Whether the committed transaction `xid` (32 bits, as pgoutput sends it) is visible in
    /// this snapshot. The epoch is taken from `xmax`: a transaction that committed near the
    /// snapshot lies within 2^31 of it.
    pub fn sees(&self, xid: u32) -> bool {
        let x = widen(xid, self.xmax);
        if x < self.xmin {
            return true;
        }
        if x >= self.xmax {
            return false;
        }
        !self.xip.contains(&x)
    }
}

/// The 64-bit transaction id nearest `reference` whose low 32 bits are `xid`.
fn widen(xid: u32, reference: u64) -> u64 {
    const HALF: u64 = 1 << 31;
    const EPOCH: u64 = 1 << 32;
    let candidate = (reference & !0xFFFF_FFFF) | u64::from(xid);
    if candidate > reference && candidate - reference > HALF && candidate >= EPOCH {
        candidate - EPOCH
    } else if candidate < reference && reference - candidate > HALF {
        candidate + EPOCH
    } else {
        candidate
    }
}

/// Rows read in one snapshot.
#[derive(Debug)]
pub struct Snapshot {
    pub xids: Xids,
    /// Each row as `{"schema","table","columns","record"}`.
    pub rows: Vec<String>,
    /// Each row's `record` alone.
    pub records: Vec<String>,
}

/// Read the rows `binding` matches now, as `identity`.
pub async fn read(
    state: &AppState,
    identity: &Identity,
    binding: &Binding,
) -> Result<Snapshot, SnapshotError> {
    if binding.schema == "*" || binding.table == "*" {
        return Err(SnapshotError::Wildcard);
    }
    let unavailable = |e: &dyn std::fmt::Display| SnapshotError::Unavailable(format!("{e:#}"));
    let catalog = state.sql.get().await.map_err(|e| unavailable(&e))?;
    let table = table_of(&catalog, &binding.schema, &binding.table).await?;
    let access = table_access(&catalog, &identity.role, table.relation_id)
        .await
        .map_err(|e| unavailable(&e))?;
    drop(catalog);
    let readable: Vec<bool> = table
        .columns
        .iter()
        .map(|c| access.may_read(&c.name))
        .collect();
    // Only the columns the role may read are selected (a hidden one would make the SELECT
    // fail); the others stay absent and are masked from the rendering.
    let list: Vec<String> = table
        .columns
        .iter()
        .zip(&readable)
        .map(|(c, ok)| {
            if *ok {
                format!("{}::text", quote_ident(&c.name))
            } else {
                "NULL::text".to_string()
            }
        })
        .collect();
    let select_sql = format!(
        "SELECT {} FROM {}.{}",
        if list.is_empty() {
            "1".to_string()
        } else {
            list.join(", ")
        },
        quote_ident(&table.schema),
        quote_ident(&table.name)
    );
    let lease = state.authz.acquire().await.map_err(|e| unavailable(&e))?;
    let client = lease.client();
    let setup = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {SNAPSHOT_TIMEOUT_MS}",
        quote_ident(&identity.role)
    );
    let work = async {
        client.batch_execute(&setup).await?;
        let claims: &str = &identity.claims;
        let sub = claim_str(&identity.claims, "sub");
        let role: &str = &identity.role;
        // The first statement takes the transaction's snapshot: every later one reads it.
        client
            .execute(
                "SELECT pg_catalog.set_config('request.jwt.claims', $1, true), \
                 pg_catalog.set_config('request.jwt.claim.sub', $2, true), \
                 pg_catalog.set_config('request.jwt.claim.role', $3, true)",
                &[&claims, &sub, &role],
            )
            .await?;
        let xids: String = client
            .query_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
            .await?
            .try_get(0)?;
        let rows = client.query(&select_sql, &[]).await?;
        Ok::<_, tokio_postgres::Error>((xids, rows))
    };
    let result = work.await;
    match client.batch_execute("ROLLBACK").await {
        Ok(()) => lease.done(),
        Err(_) => lease.discard(),
    }
    let (xids, rows) = result.map_err(|e| match e.as_db_error() {
        Some(db) => SnapshotError::Refused(format!("{} ({})", db.message(), db.code().code())),
        None => unavailable(&e),
    })?;
    let xids = Xids::parse(&xids)
        .ok_or_else(|| SnapshotError::Unavailable(format!("unexpected snapshot {xids:?}")))?;
    let vis = Visibility {
        columns: readable
            .iter()
            .any(|r| !r)
            .then(|| Arc::from(readable.clone())),
        old_record: true,
    };
    let types = state
        .types
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let config = state.hub.config().clone();
    let mut out = Snapshot {
        xids,
        rows: Vec::new(),
        records: Vec::new(),
    };
    for row in rows {
        let mut record = Vec::with_capacity(table.columns.len());
        for (i, c) in table.columns.iter().enumerate() {
            let text: Option<String> = row.try_get(i).map_err(|e| unavailable(&e))?;
            record.push(match (readable[i], text) {
                (false, _) => Value::Missing,
                (true, None) => Value::Null,
                (true, Some(t)) => {
                    let json = to_json_string(&types, c.type_oid, &t);
                    Value::Present {
                        text: t.into(),
                        json: json.into(),
                    }
                }
            });
        }
        let change = Change {
            table: table.clone(),
            kind: ChangeKind::Insert,
            commit_lsn: walcast_pgoutput::Lsn(0),
            index_in_txn: 0,
            xid: 0,
            commit_time_us: 0,
            record: Some(record),
            old_record: None,
        };
        // The same filter the stream applies, on the same values.
        if let Some(f) = &binding.filter {
            if !f.matches(&change) {
                continue;
            }
        }
        let data = render_data_visible(&change, binding.select.as_deref(), &vis, &config);
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&data) else {
            continue;
        };
        let record = v.get("record").cloned().unwrap_or(serde_json::Value::Null);
        let shown = serde_json::json!({
            "schema": v.get("schema"),
            "table": v.get("table"),
            "columns": v.get("columns"),
            "record": record,
        });
        out.records.push(record.to_string());
        out.rows.push(shown.to_string());
    }
    Ok(out)
}

/// The table as the stream would describe it: columns in order with their types, the
/// primary key flagged.
async fn table_of(
    client: &tokio_postgres::Client,
    schema: &str,
    name: &str,
) -> Result<Arc<Table>, SnapshotError> {
    let rows = client
        .query(
            "SELECT c.oid, a.attname::text, a.atttypid, t.typname::text,
                    COALESCE(a.attnum = ANY (i.indkey), false)
             FROM pg_catalog.pg_class c
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
             JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid
             JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
             LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary
             WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[&schema, &name],
        )
        .await
        .map_err(|e| SnapshotError::Unavailable(e.to_string()))?;
    let mut relation_id = None;
    let mut columns = Vec::with_capacity(rows.len());
    for r in &rows {
        let get = |e: tokio_postgres::Error| SnapshotError::Unavailable(e.to_string());
        relation_id = Some(r.try_get::<_, u32>(0).map_err(get)?);
        let name: String = r.try_get(1).map_err(get)?;
        let type_name: String = r.try_get(3).map_err(get)?;
        columns.push(Column {
            name: name.into(),
            type_oid: r.try_get(2).map_err(get)?,
            type_name: type_name.into(),
            is_key: r.try_get(4).map_err(get)?,
        });
    }
    let relation_id = relation_id.ok_or(SnapshotError::NoTable)?;
    Ok(Arc::new(Table {
        relation_id,
        schema: schema.into(),
        name: name.into(),
        replica_identity: walcast_pgoutput::ReplicaIdentity::Default,
        columns: columns.into(),
    }))
}

/// How the queued changes (position, xid; all above the feed's floor) line up with a
/// snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Alignment {
    /// `snapshot_end`'s id: the last queued change the snapshot saw, or the floor.
    pub end: Position,
    /// A change the snapshot did not see precedes one it saw: resuming from `end` would
    /// skip the former, so the snapshot should be read again.
    pub interleaved: bool,
}

/// Align `queued` with `xids` (see the module docs).
pub fn align(floor: Position, queued: &[(Position, u32)], xids: &Xids) -> Alignment {
    let last_seen = queued
        .iter()
        .filter(|(_, xid)| xids.sees(*xid))
        .map(|(at, _)| *at)
        .max();
    let first_unseen = queued
        .iter()
        .filter(|(_, xid)| !xids.sees(*xid))
        .map(|(at, _)| *at)
        .min();
    Alignment {
        end: last_seen.map_or(floor, |p| p.max(floor)),
        interleaved: matches!((last_seen, first_unseen), (Some(v), Some(i)) if i < v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn visibility_follows_the_snapshot() {
        let x = Xids::parse("100:105:101,103").unwrap();
        assert_eq!(x.xip, [101, 103]);
        assert!(x.sees(99));
        assert!(x.sees(100));
        assert!(!x.sees(101));
        assert!(x.sees(102));
        assert!(!x.sees(103));
        assert!(!x.sees(105));
        assert!(!x.sees(7000));
        assert_eq!(Xids::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert!(Xids::parse("5:x:").is_none());
    }

    #[test]
    fn alignment_ends_after_the_seen_changes_and_flags_interleaving() {
        use walcast_pgoutput::Lsn;
        let x = Xids::parse("100:110:104").unwrap();
        let floor = Position::new(Lsn(10), 0);
        let p = |lsn: u64| Position::new(Lsn(lsn), 0);
        assert_eq!(
            align(floor, &[], &x),
            Alignment {
                end: floor,
                interleaved: false
            }
        );
        // Seen (101, 102) then unseen (104 running, 111 after xmax): end after the seen.
        let a = align(
            floor,
            &[(p(11), 101), (p(12), 102), (p(13), 104), (p(14), 111)],
            &x,
        );
        assert_eq!(
            a,
            Alignment {
                end: p(12),
                interleaved: false
            }
        );
        // Nothing seen: the stream continues from the floor.
        let a = align(floor, &[(p(13), 104), (p(14), 111)], &x);
        assert_eq!(
            a,
            Alignment {
                end: floor,
                interleaved: false
            }
        );
        // 104 committed first but left the running set after 105: interleaved.
        let a = align(floor, &[(p(13), 104), (p(14), 105)], &x);
        assert_eq!(
            a,
            Alignment {
                end: p(14),
                interleaved: true
            }
        );
    }

    #[test]
    fn ids_are_widened_across_an_epoch() {
        let epoch = 1u64 << 32;
        // xmax just past a wraparound: a 32-bit xid near the top belongs to the last epoch.
        let x = Xids {
            xmin: epoch - 10,
            xmax: epoch + 5,
            xip: vec![epoch - 3, epoch + 2],
        };
        assert!(x.sees(u32::MAX - 20));
        assert!(!x.sees(u32::MAX - 2));
        assert!(x.sees(1));
        assert!(!x.sees(2));
        assert!(!x.sees(5));
    }
}
