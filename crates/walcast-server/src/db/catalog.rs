//! Catalog look-ups on the SQL connection: user types for value conversion.

use anyhow::{Context, Result};
use walcast_core::pg_type::{Oid, TypeRegistry, TypeRow, RESOLVE_TYPES_SQL};

/// Resolve `oids` (and every user type they depend on) into `registry`. Types that no
/// longer exist stay unresolved; their values are then rendered as JSON strings.
pub async fn resolve_types(
    client: &tokio_postgres::Client,
    registry: &mut TypeRegistry,
    oids: &[Oid],
) -> Result<()> {
    if oids.is_empty() {
        return Ok(());
    }
    let rows = client
        .query(RESOLVE_TYPES_SQL, &[&oids])
        .await
        .context("resolving user-defined types from pg_type")?;
    for row in rows {
        let names: Vec<String> = row.try_get(9)?;
        let types: Vec<u32> = row.try_get(10)?;
        registry.ingest(TypeRow {
            oid: row.try_get(0)?,
            name: row.try_get(1)?,
            typtype: row.try_get::<_, i8>(2)? as u8,
            category: row.try_get::<_, i8>(3)? as u8,
            element: row.try_get(4)?,
            delimiter: row.try_get::<_, i8>(5)? as u8,
            base: row.try_get(6)?,
            range_subtype: row.try_get(8)?,
            fields: names.into_iter().zip(types).collect(),
        });
    }
    Ok(())
}

/// What a join needs to know about a table.
#[derive(Debug, Clone)]
pub struct TableMeta {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// Columns in attnum order.
    pub columns: Vec<walcast_core::filter::ColumnInfo>,
    /// Primary-key columns (always sent when a binding selects columns).
    pub primary_key: Vec<String>,
    pub rls_enabled: bool,
    /// `pg_class.relreplident`: `f` (full), `d` (default: the primary key), `i` (an index),
    /// `n` (nothing). Only `f` gives DELETEs an old row that policies can judge.
    pub replica_identity: char,
    /// Part of the streamed publication.
    pub published: bool,
}

const FIND_TABLES_SQL: &str = "\
SELECT c.oid, n.nspname::text, c.relname::text, c.relrowsecurity,
       EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables pt
               WHERE pt.pubname = $1 AND pt.schemaname = n.nspname AND pt.tablename = c.relname),
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT a.atttypid FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum),
       ARRAY(SELECT a.attname::text FROM pg_catalog.pg_index i
             JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
             WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY a.attnum),
       c.relreplident::text
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname = $2 AND c.relname = $3";

/// Look up one table by schema and name (no wildcards; those are matched per change).
pub async fn find_table(
    client: &tokio_postgres::Client,
    publication: &str,
    schema: &str,
    table: &str,
) -> Result<Option<TableMeta>> {
    let row = client
        .query_opt(FIND_TABLES_SQL, &[&publication, &schema, &table])
        .await
        .context("looking up the table in pg_class")?;
    let Some(row) = row else { return Ok(None) };
    let names: Vec<String> = row.try_get(5)?;
    let types: Vec<u32> = row.try_get(6)?;
    Ok(Some(TableMeta {
        oid: row.try_get(0)?,
        schema: row.try_get(1)?,
        name: row.try_get(2)?,
        rls_enabled: row.try_get(3)?,
        published: row.try_get(4)?,
        columns: names
            .into_iter()
            .zip(types)
            .map(|(name, type_oid)| walcast_core::filter::ColumnInfo { name, type_oid })
            .collect(),
        primary_key: row.try_get(7)?,
        replica_identity: row.try_get::<_, String>(8)?.chars().next().unwrap_or('d'),
    }))
}

/// Whether a role of that name exists (token roles must be real roles).
pub async fn role_exists(client: &tokio_postgres::Client, role: &str) -> Result<bool> {
    let row = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
            &[&role],
        )
        .await
        .context("looking up the role")?;
    Ok(row.try_get(0)?)
}

/// Access of a role to a table: SELECT on it (or on some of its columns), the columns it
/// may SELECT, and whether row-level security is on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableAccess {
    pub select: bool,
    pub rls_enabled: bool,
    /// Row-level security applies to this role here: it is on, and the role neither
    /// bypasses it (superuser, `BYPASSRLS`) nor owns the table without `FORCE`.
    pub rls_applies: bool,
    /// Columns the role may not SELECT (trimmed from payloads, refused in filters).
    pub hidden_columns: Vec<String>,
}

impl TableAccess {
    pub fn may_read(&self, column: &str) -> bool {
        !self.hidden_columns.iter().any(|c| c == column)
    }
}

/// `has_any_column_privilege(role, table, 'SELECT')`, the columns without
/// `has_column_privilege(…, 'SELECT')`, and `relrowsecurity`; the role is a bound parameter.
/// A role that no longer exists gets no access.
pub async fn table_access(
    client: &tokio_postgres::Client,
    role: &str,
    table_oid: u32,
) -> Result<TableAccess> {
    let row = client
        .query_opt(
            "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)
                      AND pg_catalog.has_any_column_privilege($1, c.oid, 'SELECT'),
                    c.relrowsecurity,
                    ARRAY(SELECT a.attname::text FROM pg_catalog.pg_attribute a
                          WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                            AND NOT (EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)
                                     AND pg_catalog.has_column_privilege($1, c.oid, a.attnum, 'SELECT'))
                          ORDER BY a.attnum),
                    c.relrowsecurity AND NOT COALESCE(
                        (SELECT r.rolsuper OR r.rolbypassrls
                                OR (pg_catalog.pg_has_role(r.oid, c.relowner, 'USAGE')
                                    AND NOT c.relforcerowsecurity)
                         FROM pg_catalog.pg_roles r WHERE r.rolname = $1),
                        true)
             FROM pg_catalog.pg_class c WHERE c.oid = $2",
            &[&role, &table_oid],
        )
        .await
        .context("checking table privileges")?;
    Ok(match row {
        Some(r) => TableAccess {
            select: r.try_get(0)?,
            rls_enabled: r.try_get(1)?,
            hidden_columns: r.try_get(2)?,
            rls_applies: r.try_get(3)?,
        },
        None => TableAccess {
            select: false,
            rls_enabled: false,
            rls_applies: false,
            hidden_columns: Vec::new(),
        },
    })
}
