//! The `data` object of a `postgres_changes` payload, in Supabase's record shape:
//!
//! ```text
//! {"schema","table","type","commit_timestamp","columns":[{"name","type"}…],
//!  "record":{…},"old_record":{…},"errors":null | ["Error 4xx: …"]}
//! ```
//!
//! Invariants:
//! - An identity never gets a column outside its [`Visibility`]; a row whose primary key it
//!   may not read is not shown at all (`Error 401`), and a table without a primary key sends
//!   no row (`Error 400`), as Supabase does.
//! - A payload over `max_record_bytes` keeps only values with short text, and says so
//!   (`Error 413`), instead of being dropped.

use std::fmt::Write as _;

use crate::change::{Change, ChangeKind, Value};
use crate::hub::{HubConfig, Visibility};
use crate::value::write_json_string;

/// The `data` object of a `postgres_changes` payload (Supabase's record shape).
pub fn render_data(change: &Change, select: Option<&[String]>, config: &HubConfig) -> String {
    render_data_visible(change, select, &Visibility::ALL, config)
}

/// [`render_data`] for an identity that sees only `vis` of the change.
pub fn render_data_visible(
    change: &Change,
    select: Option<&[String]>,
    vis: &Visibility,
    config: &HubConfig,
) -> String {
    let kind = change.kind.as_str();
    let table = &change.table;
    let has_key = table.columns.iter().any(|c| c.is_key);
    if !has_key && matches!(change.kind, ChangeKind::Insert | ChangeKind::Update) {
        // Without a primary key a row cannot be identified (Supabase refuses these too).
        let mut out = String::with_capacity(128);
        head(&mut out, change, kind);
        out.push_str(",\"errors\":[\"Error 400: Bad Request, no primary key\"]}");
        return out;
    }
    let granted = |i: usize| -> bool {
        vis.columns
            .as_ref()
            .is_none_or(|m| m.get(i).copied().unwrap_or(false))
    };
    // Under REPLICA IDENTITY FULL pgoutput flags every column as part of the identity, so
    // the flags only name the primary key for the other settings.
    let full = table.replica_identity == walcast_pgoutput::ReplicaIdentity::Full;
    let primary_key = |i: usize| !full && table.columns.get(i).is_some_and(|c| c.is_key);
    if (0..table.columns.len()).any(|i| primary_key(i) && !granted(i)) {
        // A row the role cannot identify is not shown at all (Supabase does the same).
        let mut out = String::with_capacity(128);
        head(&mut out, change, kind);
        out.push_str(",\"errors\":[\"Error 401: Unauthorized\"]}");
        return out;
    }
    let keep = |i: usize| -> bool {
        granted(i)
            && match select {
                None => true,
                Some(cols) => table
                    .columns
                    .get(i)
                    .is_some_and(|c| cols.iter().any(|s| s.as_str() == &*c.name)),
            }
    };
    let keep_old = |i: usize| -> bool { keep(i) && (vis.old_record || primary_key(i)) };
    let full = render_body(change, kind, &keep, &keep_old, None);
    if full.len() <= config.max_record_bytes {
        return full;
    }
    // Too large: keep only values whose text is short, and say so.
    render_body(change, kind, &keep, &keep_old, Some(64))
}

fn head(out: &mut String, change: &Change, kind: &str) {
    out.push_str("{\"schema\":");
    write_json_string(&change.table.schema, out);
    out.push_str(",\"table\":");
    write_json_string(&change.table.name, out);
    out.push_str(",\"type\":\"");
    out.push_str(kind);
    out.push('"');
}

fn render_body(
    change: &Change,
    kind: &str,
    keep: &dyn Fn(usize) -> bool,
    keep_old: &dyn Fn(usize) -> bool,
    max_value_text: Option<usize>,
) -> String {
    let mut out = String::with_capacity(256);
    head(&mut out, change, kind);
    out.push_str(",\"commit_timestamp\":\"");
    out.push_str(&change.commit_timestamp_millis());
    out.push_str("\",\"columns\":[");
    let mut first = true;
    for (i, c) in change.table.columns.iter().enumerate() {
        if !keep(i) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        out.push_str("{\"name\":");
        write_json_string(&c.name, &mut out);
        out.push_str(",\"type\":");
        write_json_string(&c.type_name, &mut out);
        out.push('}');
    }
    out.push(']');
    let short = |keep: &dyn Fn(usize) -> bool, i: usize, row: &[Value]| -> bool {
        keep(i)
            && match max_value_text {
                None => true,
                Some(limit) => row
                    .get(i)
                    .map(|v| v.text().map_or(0, str::len) <= limit)
                    .unwrap_or(false),
            }
    };
    if let Some(rec) = &change.record {
        out.push_str(",\"record\":");
        change.write_row(rec, &mut out, |i| short(keep, i, rec));
    }
    if let Some(old) = &change.old_record {
        out.push_str(",\"old_record\":");
        change.write_row(old, &mut out, |i| short(keep_old, i, old));
    }
    if max_value_text.is_some() {
        let _ = write!(out, ",\"errors\":[\"Error 413: Payload Too Large\"]}}");
    } else {
        out.push_str(",\"errors\":null}");
    }
    out
}
