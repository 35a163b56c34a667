//! Turning a join's `config.postgres_changes` entries into live hub bindings.
//!
//! Each entry is checked the way Supabase's subscription trigger checks it, with the same
//! error texts: schema/table present, filter grammar, the table exists and is in the
//! publication, the channel's role may SELECT it, filter columns and values fit the column
//! types, selected columns exist. Valid entries are registered; each invalid one is reported
//! as a `system` error without affecting the others, and the join itself still succeeds
//! (unless it asked for `postgres_changes_options.wait`: then the first error refuses it, see
//! the session).

use walcast_core::filter;
use walcast_core::subscription::{binding_id, Binding, EventFilter};
use walcast_protocol::PostgresBinding;

use crate::authz::rls::RlsDeletes;
use crate::db::catalog::{TableAccess, TableMeta};
use crate::state::AppState;

/// The `postgres_changes` system error a channel gets while the replication stream is down
/// (at join, or when the stream is lost); an `ok` follows when it is back.
pub const STREAM_DOWN: &str =
    "Replication stream is down: changes will be delivered once it is back";

/// The integer id echoed in the join reply for an entry. Never 0: some clients treat 0 as
/// "no id".
pub fn id_for(entry: &PostgresBinding) -> u32 {
    binding_id(entry.raw.get()).max(1)
}

/// `[event: *, schema: public, table: x, filters: [], select: ]`, as Supabase prints it.
fn describe(entry: &PostgresBinding) -> String {
    format!(
        "[event: {}, schema: {}, table: {}, filters: [{}], select: {}]",
        entry.event.as_deref().unwrap_or("*"),
        entry.schema.as_deref().unwrap_or(""),
        entry.table.as_deref().unwrap_or(""),
        entry.filter.as_deref().unwrap_or(""),
        entry
            .select
            .as_ref()
            .map(|s| s.join(","))
            .unwrap_or_default()
    )
}

fn unable(entry: &PostgresBinding, exception: impl std::fmt::Display) -> String {
    format!(
        "Unable to subscribe to changes with given parameters. An exception happened so please check your connect parameters: {}. Exception: {exception}",
        describe(entry)
    )
}

/// The bindings that passed, a `system` error text for each entry that did not, and
/// notices for bindings that are live but will miss some changes (sent with status `ok`).
#[derive(Debug, Default)]
pub struct Checked {
    pub bindings: Vec<Binding>,
    pub errors: Vec<String>,
    pub notices: Vec<String>,
}

/// The join-time notice for a binding that will never see a table's DELETEs: row-level
/// security judges each row, but the WAL carries no deleted row to judge (only
/// `REPLICA IDENTITY FULL` logs it), so those DELETEs are dropped for this subscriber. Said
/// once, at join, so the app does not go stale silently.
fn missed_deletes(
    meta: &TableMeta,
    access: &TableAccess,
    event: EventFilter,
    deletes: RlsDeletes,
) -> Option<String> {
    if !matches!(event, EventFilter::All | EventFilter::Delete)
        || !access.rls_applies
        || meta.replica_identity == 'f'
    {
        return None;
    }
    let table = format!("{}.{}", quote_ident(&meta.schema), quote_ident(&meta.name));
    // With the opt-in the key goes out, unless the WAL does not even carry a key.
    let no_key = meta.replica_identity == 'n'
        || (meta.replica_identity == 'd' && meta.primary_key.is_empty());
    match deletes {
        RlsDeletes::PrimaryKey if !no_key => None,
        RlsDeletes::PrimaryKey => Some(format!(
            "DeletesNotDelivered: DELETEs on {table} will not reach this channel: the table has row-level security and its replica identity logs no key for a deleted row. Run ALTER TABLE {table} REPLICA IDENTITY FULL so they can be authorized and delivered."
        )),
        RlsDeletes::Drop => Some(format!(
            "DeletesNotDelivered: DELETEs on {table} will not reach this channel: the table has row-level security and REPLICA IDENTITY {}, so the deleted row is not in the WAL for the policies to judge. Run ALTER TABLE {table} REPLICA IDENTITY FULL (or start walcast with --rls-deletes=primary-key to send the primary key alone to every subscriber who may SELECT the table).",
            match meta.replica_identity {
                'n' => "NOTHING",
                'i' => "USING INDEX",
                _ => "DEFAULT",
            }
        )),
    }
}

/// `name` as a Postgres identifier in a message (quoted only when it needs to be).
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Check every entry under `role`. The catalog is read through the join caches
/// ([`crate::db::catalog_cache`], role attributes in [`crate::authz::roles`]): what a join
/// sees is at most [`crate::db::catalog_cache::CATALOG_TTL`] old.
pub async fn build_bindings(state: &AppState, role: &str, entries: &[PostgresBinding]) -> Checked {
    let mut out = Checked::default();
    match state.token_roles.exists(&state.sql, role).await {
        Ok(true) => {}
        Ok(false) => {
            out.errors.push(unable(
                &entries[0],
                format!("role \"{role}\" does not exist"),
            ));
            return out;
        }
        Err(e) => {
            tracing::warn!(error = ?format!("{e:#}"), "catalog look-up failed during a join");
            out.errors
                .push("Realtime was unable to connect to the project database".to_string());
            return out;
        }
    }
    for entry in entries {
        match check_entry(state, role, entry).await {
            Ok((b, notice)) => {
                out.bindings.push(b);
                out.notices.extend(notice);
            }
            Err(e) => out.errors.push(e),
        }
    }
    out
}

async fn check_entry(
    state: &AppState,
    role: &str,
    entry: &PostgresBinding,
) -> Result<(Binding, Option<String>), String> {
    let (schema, table) = match (entry.schema.as_deref(), entry.table.as_deref()) {
            (None | Some(""), None | Some("")) => {
                return Err(format!(
                    "No subscription params provided. Please provide at least a `schema` or `table` to subscribe to: {}",
                    describe(entry)
                ))
            }
            (None | Some(""), Some(t)) => ("public", t),
            (Some(s), None | Some("")) => (s, "*"),
            (Some(s), Some(t)) => (s, t),
        };
    let parsed = match entry.filter.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(f) => {
            Some(filter::parse(f).map_err(|e| format!("Error parsing `filter` params: {e}"))?)
        }
    };
    let event = EventFilter::from_binding_event(entry.event.as_deref().unwrap_or("*"));
    let id = id_for(entry);
    if schema == "*" || table == "*" {
        if entry.select.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(unable(
                entry,
                "Column selection is not supported for wildcard subscriptions",
            ));
        }
        if parsed.as_ref().is_some_and(|f| !f.conditions.is_empty()) {
            return Err(unable(
                entry,
                "Filters are not supported for wildcard subscriptions",
            ));
        }
        // Access to each table is checked per change (default deny).
        return Ok((
            Binding {
                id,
                event,
                schema: schema.to_string(),
                table: table.to_string(),
                filter: None,
                select: None,
            },
            None,
        ));
    }
    let meta = state
        .catalog
        .table(schema, table)
        .await
        .map_err(|e| unable(entry, e))?;
    let Some(meta) = meta.filter(|m| m.published) else {
        return Err(format!(
                "Unable to subscribe to changes with given parameters. Please check Realtime is enabled for the given connect parameters: {}",
                describe(entry)
            ));
    };
    let access = state
        .catalog
        .access(role, meta.oid)
        .await
        .map_err(|e| unable(entry, e))?;
    if !access.select {
        return Err(unable(
            entry,
            format!("permission denied for table {}", meta.name),
        ));
    }
    // A filter or selection on a column the role cannot read would reveal that column
    // through which rows match (or that it exists): refused, naming it.
    let named = parsed
        .iter()
        .flat_map(|f| f.conditions.iter().map(|c| c.column.as_str()))
        .chain(entry.select.iter().flatten().map(String::as_str));
    for column in named {
        if meta.columns.iter().any(|m| m.name == column) && !access.may_read(column) {
            return Err(unable(
                entry,
                format!("permission denied for column {column}"),
            ));
        }
    }
    let compiled = match &parsed {
        Some(f) if !f.conditions.is_empty() => {
            let types = state
                .types
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Some(
                f.compile(&meta.columns, &types)
                    .map_err(|e| unable(entry, e))?,
            )
        }
        _ => None,
    };
    let select = match &entry.select {
        Some(cols) if !cols.is_empty() => {
            for c in cols {
                if !meta.columns.iter().any(|m| &m.name == c) {
                    return Err(unable(entry, format!("invalid column for select {c}")));
                }
            }
            // Primary-key columns always travel, so clients can identify the row.
            let mut sel: Vec<String> = meta.primary_key.clone();
            for c in cols {
                if !sel.contains(c) {
                    sel.push(c.clone());
                }
            }
            Some(sel)
        }
        _ => None,
    };
    let notice = missed_deletes(&meta, &access, event, state.limits.rls_deletes);
    Ok((
        Binding {
            id,
            event,
            schema: meta.schema,
            table: meta.name,
            filter: compiled,
            select,
        },
        notice,
    ))
}
