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
