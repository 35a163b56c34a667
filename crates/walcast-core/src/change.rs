//! The change model: pgoutput messages in, typed row changes out.
//!
//! ```text
//!  XLogData.data ──▶ pgoutput::Decoder ──▶ ChangeDecoder ──▶ Decoded::{Begin, Change, Commit, Message, …}
//!                                           │  relation cache (replaced on every Relation)
//!                                           │  type registry (user types resolved by the caller)
//!                                           └─ values rendered once, as to_jsonb would
//! ```
//!
//! Invariants:
//! - Each change is emitted as soon as it is decoded; nothing holds a whole transaction, so
//!   memory does not grow with transaction size.
//! - A change's position is `(commit_lsn, index_in_txn)`: the commit LSN comes from Begin
//!   (`final_lsn`), the index counts the row changes of the transaction from 0.
//! - Tuples are always read against the most recent Relation message for that OID, so DDL
//!   between transactions never breaks decoding.
//! - An unchanged TOAST value is never turned into `null`: it is filled from the full old row
//!   when the table has `REPLICA IDENTITY FULL`, else kept as [`Value::UnchangedToast`] and left
//!   out of the record (and listed as such where the output format allows).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use walcast_pgoutput::{
    Cell, Decoder, LogicalMessage, Lsn, OldTuple, Relation, RelationCache, ReplicaIdentity,
    TupleData, PG_EPOCH_OFFSET_MICROS,
};

use crate::pg_type::{Oid, TypeRegistry};
use crate::position::Position;
use crate::value::{write_json, write_json_string};

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    Insert,
    Update,
    Delete,
    Truncate,
}

impl ChangeKind {
    /// Upper-case name as used on the wire (`INSERT`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Insert => "INSERT",
            ChangeKind::Update => "UPDATE",
            ChangeKind::Delete => "DELETE",
            ChangeKind::Truncate => "TRUNCATE",
        }
    }
}

/// One column of a relation, as announced by the last Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: Arc<str>,
    /// `pg_type.typname` (`int4`, `_text`, a user enum's name, ...).
    pub type_name: Arc<str>,
    pub type_oid: Oid,
    /// Part of the replica identity (the primary key under `REPLICA IDENTITY DEFAULT`).
    pub is_key: bool,
}

/// A table as the stream currently describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub relation_id: u32,
    pub schema: Arc<str>,
    pub name: Arc<str>,
    pub replica_identity: ReplicaIdentity,
    pub columns: Arc<[Column]>,
}

/// One column value of a row image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// The row image has no value for this column (unchanged TOAST, or a non-key column of a
    /// key-only old tuple). Never rendered as `null`.
    Missing,
    /// An unchanged TOASTed value that the WAL does not carry.
    UnchangedToast,
    /// A value: its Postgres text form and its JSON rendering.
    Present { text: Box<str>, json: Box<str> },
}

impl Value {
    /// The Postgres text form, when the value is present.
    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Present { text, .. } => Some(text),
            _ => None,
        }
    }

    /// True when the image carries this column (a value or NULL).
    pub fn is_known(&self) -> bool {
        matches!(self, Value::Null | Value::Present { .. })
    }
}

/// A decoded row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub table: Arc<Table>,
    pub kind: ChangeKind,
    /// LSN of the commit record of the transaction (from Begin).
    pub commit_lsn: Lsn,
    /// Position of this change inside its transaction, from 0.
    pub index_in_txn: u32,
    /// The transaction's id (from Begin): what a snapshot's visibility is judged by.
    pub xid: u32,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// New row image (INSERT, UPDATE), one value per column of `table.columns`.
    pub record: Option<Vec<Value>>,
    /// Old row image (UPDATE with a changed key or REPLICA IDENTITY FULL, DELETE).
    pub old_record: Option<Vec<Value>>,
}

impl Change {
    pub fn schema(&self) -> &str {
        &self.table.schema
    }

    pub fn table_name(&self) -> &str {
        &self.table.name
    }

    pub fn columns(&self) -> &[Column] {
        &self.table.columns
    }

    /// Where the change sits in the commit order.
    pub fn position(&self) -> Position {
        Position::new(self.commit_lsn, self.index_in_txn)
    }

    /// Index of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.table.columns.iter().position(|c| &*c.name == name)
    }

    /// Commit time as `YYYY-MM-DDTHH:MM:SS.mmmZ` (Supabase's `commit_timestamp`).
    pub fn commit_timestamp_millis(&self) -> String {
        format_unix_micros_ms(self.commit_time_us)
    }

    /// The JSON line printed by `walcast tail`: the whole change model.
    pub fn to_tail_json(&self) -> String {
        let mut out = String::with_capacity(256);
        out.push_str("{\"lsn\":\"");
        let _ = write!(out, "{}", self.commit_lsn);
        let _ = write!(out, "\",\"index\":{}", self.index_in_txn);
        out.push_str(",\"commit_time\":\"");
        out.push_str(&format_unix_micros(self.commit_time_us));
        out.push_str("\",\"schema\":");
        write_json_string(&self.table.schema, &mut out);
        out.push_str(",\"table\":");
        write_json_string(&self.table.name, &mut out);
        out.push_str(",\"kind\":\"");
        out.push_str(self.kind.as_str());
        out.push_str("\",\"columns\":[");
        for (i, c) in self.table.columns.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str("{\"name\":");
            write_json_string(&c.name, &mut out);
            out.push_str(",\"type\":");
            write_json_string(&c.type_name, &mut out);
            let _ = write!(out, ",\"oid\":{}", c.type_oid);
            if c.is_key {
                out.push_str(",\"key\":true");
            }
            out.push('}');
        }
        out.push(']');
        if let Some(rec) = &self.record {
            out.push_str(",\"record\":");
            self.write_row(rec, &mut out, |_| true);
            let unchanged: Vec<&str> = rec
                .iter()
                .zip(self.table.columns.iter())
                .filter(|(v, _)| matches!(v, Value::UnchangedToast))
                .map(|(_, c)| &*c.name)
                .collect();
            if !unchanged.is_empty() {
                out.push_str(",\"unchanged_toast\":[");
                for (i, n) in unchanged.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json_string(n, &mut out);
                }
                out.push(']');
            }
        }
        if let Some(old) = &self.old_record {
            out.push_str(",\"old_record\":");
            self.write_row(old, &mut out, |_| true);
        }
        out.push('}');
        out
    }

    /// Write a row image as a JSON object in column order, keeping only the columns for
    /// which `keep(index)` is true and leaving out values the image does not carry.
    pub fn write_row(&self, row: &[Value], out: &mut String, keep: impl Fn(usize) -> bool) {
        out.push('{');
        let mut first = true;
        for (i, (v, c)) in row.iter().zip(self.table.columns.iter()).enumerate() {
            if !keep(i) {
                continue;
            }
            let json: &str = match v {
                Value::Null => "null",
                Value::Present { json, .. } => json,
                Value::Missing | Value::UnchangedToast => continue,
            };
            if !first {
                out.push(',');
            }
            first = false;
            write_json_string(&c.name, out);
            out.push(':');
            out.push_str(json);
        }
        out.push('}');
    }
}

/// A logical decoding message (`pg_logical_emit_message`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmittedMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
    /// Commit LSN and index when transactional (inside a transaction).
    pub commit_lsn: Option<Lsn>,
    pub index_in_txn: Option<u32>,
}

impl EmittedMessage {
    /// The JSON line printed by `walcast tail`.
    pub fn to_tail_json(&self) -> String {
        let mut out = String::with_capacity(128);
        out.push_str("{\"kind\":\"MESSAGE\",\"lsn\":\"");
        let _ = write!(out, "{}", self.commit_lsn.unwrap_or(self.lsn));
        out.push('"');
        if let Some(i) = self.index_in_txn {
            let _ = write!(out, ",\"index\":{i}");
        }
        let _ = write!(out, ",\"message_lsn\":\"{}\"", self.lsn);
        let _ = write!(out, ",\"transactional\":{}", self.transactional);
        out.push_str(",\"prefix\":");
        write_json_string(&self.prefix, &mut out);
        match std::str::from_utf8(&self.content) {
            Ok(s) => {
                out.push_str(",\"content\":");
                write_json_string(s, &mut out);
            }
            Err(_) => {
                out.push_str(",\"content_hex\":\"");
                for b in self.content.iter() {
                    let _ = write!(out, "{b:02x}");
                }
                out.push('"');
            }
        }
        out.push('}');
        out
    }
}

/// What one pgoutput message turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    Begin {
        commit_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    /// A row change (TRUNCATE yields one per truncated table).
    Changes(Vec<Change>),
    Change(Change),
    Commit {
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    Message(EmittedMessage),
    /// A Relation message was applied. `unresolved_types` are type OIDs the registry does not
    /// know yet: resolve them (see `pg_type::RESOLVE_TYPES_SQL`) before decoding further.
    Relation {
        table: Arc<Table>,
        unresolved_types: Vec<Oid>,
    },
    /// Messages that carry nothing for consumers (Type, Origin, stream/two-phase framing).
    Ignored,
}

/// Errors while turning pgoutput messages into changes.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The bytes do not decode: the stream is corrupt or we have a bug. Reconnect.
    #[error("pgoutput decode error: {0}")]
    Decode(#[from] walcast_pgoutput::DecodeError),
    /// A row for a relation we never saw described. The stream is inconsistent. Reconnect.
    #[error("row for unknown relation {0}")]
    UnknownRelation(u32),
    /// A tuple whose column count differs from its Relation message.
    #[error("tuple has {got} columns but relation {relation} has {expected}")]
    ColumnCount {
        relation: u32,
        expected: usize,
        got: usize,
    },
}

#[derive(Debug, Clone, Copy)]
struct Txn {
    commit_lsn: Lsn,
    xid: u32,
    commit_time_us: i64,
    next_index: u32,
}

/// Turns the raw pgoutput messages of one replication session into [`Decoded`] events.
///
/// Call [`ChangeDecoder::reset`] after a reconnect: the server re-sends Relation messages
/// for every relation in a new session.
#[derive(Debug, Default)]
pub struct ChangeDecoder {
    decoder: Decoder,
    relations: RelationCache,
    tables: HashMap<u32, Arc<Table>>,
    txn: Option<Txn>,
}

impl ChangeDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forget per-session state (after a reconnect).
    pub fn reset(&mut self) {
        *self = Self::default();
    }

    /// The relation's table as its changes are decoded now (from its last Relation message
    /// in this session), if one was received.
    pub fn table(&self, relation_id: u32) -> Option<&Arc<Table>> {
        self.tables.get(&relation_id)
    }

    /// True between Begin and Commit.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Refresh column type names after the registry learned new types.
    pub fn refresh_type_names(&mut self, types: &TypeRegistry) {
        for (id, table) in self.tables.iter_mut() {
            if let Some(rel) = self.relations.get(*id) {
                *table = Arc::new(build_table(rel, types));
            }
        }
    }

    /// Decode one pgoutput message.
    pub fn decode(&mut self, types: &TypeRegistry, data: &Bytes) -> Result<Decoded, ChangeError> {
        let msg = self.decoder.decode(data)?;
        Ok(match msg {
            LogicalMessage::Begin(b) => {
                let commit_time_us = b.commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS);
                self.txn = Some(Txn {
                    commit_lsn: b.final_lsn,
                    xid: b.xid,
                    commit_time_us,
                    next_index: 0,
                });
                Decoded::Begin {
                    commit_lsn: b.final_lsn,
                    commit_time_us,
                    xid: b.xid,
                }
            }
            LogicalMessage::Commit(c) => {
                self.txn = None;
                Decoded::Commit {
                    commit_lsn: c.commit_lsn,
                    end_lsn: c.end_lsn,
                    commit_time_us: c.commit_time.saturating_add(PG_EPOCH_OFFSET_MICROS),
                }
            }
            LogicalMessage::Relation(rel) => {
                let id = rel.id;
                let mut oids: Vec<Oid> = rel.columns.iter().map(|c| c.type_oid).collect();
                oids.sort_unstable();
                oids.dedup();
                let unresolved_types = types.unresolved(oids);
                let rel = self.relations.apply(rel);
                let table = Arc::new(build_table(&rel, types));
                self.tables.insert(id, table.clone());
                Decoded::Relation {
                    table,
                    unresolved_types,
                }
            }
            LogicalMessage::Insert(ins) => {
                let (table, txn) = self.row_context(ins.relation_id)?;
                let record = convert_tuple(&table, types, &ins.new, None)?;
                Decoded::Change(Change {
                    table,
                    kind: ChangeKind::Insert,
                    commit_lsn: txn.commit_lsn,
                    index_in_txn: txn.next_index,
                    xid: txn.xid,
                    commit_time_us: txn.commit_time_us,
                    record: Some(record),
                    old_record: None,
                })
            }
            LogicalMessage::Update(up) => {
                let (table, txn) = self.row_context(up.relation_id)?;
                let old = match &up.old {
                    Some(OldTuple::Full(t)) | Some(OldTuple::Key(t)) => {
                        Some(convert_tuple(&table, types, t, None)?)
                    }
                    None => None,
                };
                let old_full = matches!(up.old, Some(OldTuple::Full(_)));
                let record =
                    convert_tuple(&table, types, &up.new, old.as_deref().filter(|_| old_full))?;
                // Without an old image, REPLICA IDENTITY DEFAULT still lets us name the key:
                // pgoutput sends no 'K' tuple when the key did not change, so the key values of
                // the new row are the old ones too (what Supabase puts in old_record).
                let old_record = match old {
                    Some(o) if old_full => Some(o),
                    Some(o) => Some(key_only(&table, o)),
                    None => Some(key_only(&table, record.clone())),
                };
                Decoded::Change(Change {
                    table,
                    kind: ChangeKind::Update,
                    commit_lsn: txn.commit_lsn,
                    index_in_txn: txn.next_index,
                    xid: txn.xid,
                    commit_time_us: txn.commit_time_us,
                    record: Some(record),
                    old_record,
                })
            }
            LogicalMessage::Delete(del) => {
                let (table, txn) = self.row_context(del.relation_id)?;
                let old = match &del.old {
                    OldTuple::Full(t) => convert_tuple(&table, types, t, None)?,
                    OldTuple::Key(t) => key_only(&table, convert_tuple(&table, types, t, None)?),
                };
                Decoded::Change(Change {
                    table,
                    kind: ChangeKind::Delete,
                    commit_lsn: txn.commit_lsn,
                    index_in_txn: txn.next_index,
                    xid: txn.xid,
                    commit_time_us: txn.commit_time_us,
                    record: None,
                    old_record: Some(old),
                })
            }
            LogicalMessage::Truncate(t) => {
                let mut out = Vec::with_capacity(t.relation_ids.len());
                for id in t.relation_ids {
                    let (table, txn) = self.row_context(id)?;
                    out.push(Change {
                        table,
                        kind: ChangeKind::Truncate,
                        commit_lsn: txn.commit_lsn,
                        index_in_txn: txn.next_index,
                        xid: txn.xid,
                        commit_time_us: txn.commit_time_us,
                        record: None,
                        old_record: None,
                    });
                }
                Decoded::Changes(out)
            }
            LogicalMessage::Message(m) => {
                let (commit_lsn, index_in_txn) = match (&mut self.txn, m.transactional) {
                    (Some(txn), true) => {
                        let i = txn.next_index;
                        txn.next_index = txn.next_index.saturating_add(1);
                        (Some(txn.commit_lsn), Some(i))
                    }
                    _ => (None, None),
                };
                Decoded::Message(EmittedMessage {
                    transactional: m.transactional,
                    lsn: m.lsn,
                    prefix: m.prefix,
                    content: m.content,
                    commit_lsn,
                    index_in_txn,
                })
            }
            _ => Decoded::Ignored,
        })
    }

    /// The table and transaction a row message belongs to; advances the index in the
    /// transaction. A row outside Begin/Commit (impossible without streaming) gets the
    /// position of the last known commit and index 0.
    fn row_context(&mut self, relation_id: u32) -> Result<(Arc<Table>, Txn), ChangeError> {
        let table = self
            .tables
            .get(&relation_id)
            .cloned()
            .ok_or(ChangeError::UnknownRelation(relation_id))?;
        let txn = match &mut self.txn {
            Some(txn) => {
                let snapshot = *txn;
                txn.next_index = txn.next_index.saturating_add(1);
                snapshot
            }
            None => Txn {
                commit_lsn: Lsn::ZERO,
                xid: 0,
                commit_time_us: 0,
                next_index: 0,
            },
        };
        Ok((table, txn))
    }
}

fn build_table(rel: &Relation, types: &TypeRegistry) -> Table {
    let columns: Vec<Column> = rel
        .columns
        .iter()
        .map(|c| Column {
            name: Arc::from(c.name.as_str()),
            type_name: types
                .get(c.type_oid)
                .map(|t| Arc::from(t.name.as_str()))
                .unwrap_or_else(|| Arc::from(c.type_oid.to_string().as_str())),
            type_oid: c.type_oid,
            is_key: c.is_key,
        })
        .collect();
    Table {
        relation_id: rel.id,
        schema: Arc::from(rel.namespace.as_str()),
        name: Arc::from(rel.name.as_str()),
        replica_identity: rel.replica_identity,
        columns: columns.into(),
    }
}

/// Keep only the replica-identity columns of an image; the rest were not sent.
fn key_only(table: &Table, mut row: Vec<Value>) -> Vec<Value> {
    for (v, c) in row.iter_mut().zip(table.columns.iter()) {
        if !c.is_key {
            *v = Value::Missing;
        }
    }
    row
}

fn convert_tuple(
    table: &Table,
    types: &TypeRegistry,
    tuple: &TupleData,
    old_full: Option<&[Value]>,
) -> Result<Vec<Value>, ChangeError> {
    if tuple.0.len() != table.columns.len() {
        return Err(ChangeError::ColumnCount {
            relation: table.relation_id,
            expected: table.columns.len(),
            got: tuple.0.len(),
        });
    }
    let mut out = Vec::with_capacity(tuple.0.len());
    let mut json = String::new();
    for (i, (cell, col)) in tuple.0.iter().zip(table.columns.iter()).enumerate() {
        out.push(match cell {
            Cell::Null => Value::Null,
            Cell::UnchangedToast => match old_full.and_then(|o| o.get(i)) {
                Some(v @ (Value::Present { .. } | Value::Null)) => v.clone(),
                _ => Value::UnchangedToast,
            },
            Cell::Text(bytes) | Cell::Binary(bytes) => {
                // pgoutput text is in the client encoding, which we pin to UTF-8; a byte
                // sequence that is not UTF-8 still must not be lost, so it is kept lossily.
                let text = String::from_utf8_lossy(bytes);
                json.clear();
                if write_json(types, col.type_oid, &text, &mut json).is_err() {
                    json.clear();
                    write_json_string(&text, &mut json);
                }
                Value::Present {
                    text: text.into(),
                    json: json.as_str().into(),
                }
            }
        });
    }
    Ok(out)
}

/// Unix microseconds → `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn format_unix_micros(us: i64) -> String {
    let (date, secs_of_day, micros) = split_micros(us);
    format!("{date}T{}.{micros:06}Z", hms(secs_of_day))
}

/// Unix microseconds → `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn format_unix_micros_ms(us: i64) -> String {
    let (date, secs_of_day, micros) = split_micros(us);
    format!("{date}T{}.{:03}Z", hms(secs_of_day), micros / 1000)
}

fn hms(secs: i64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

fn split_micros(us: i64) -> (String, i64, i64) {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let secs_of_day = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    (format!("{y:04}-{m:02}-{d:02}"), secs_of_day, micros)
}

/// Days since 1970-01-01 → proleptic Gregorian (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_format_like_supabase() {
        assert_eq!(format_unix_micros_ms(0), "1970-01-01T00:00:00.000Z");
        // 2025-11-19T00:22:40.877123Z
        assert_eq!(
            format_unix_micros_ms(1_763_511_760_877_123),
            "2025-11-19T00:22:40.877Z"
        );
        assert_eq!(
            format_unix_micros(1_763_511_760_877_123),
            "2025-11-19T00:22:40.877123Z"
        );
        assert_eq!(format_unix_micros(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            format_unix_micros_ms(951_782_400_000_000),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
