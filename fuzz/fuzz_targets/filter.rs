//! The postgres_changes filter grammar is client input: parsing and compiling must never
//! panic, whatever the text and whatever column types it meets.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast_core::filter::{parse, ColumnInfo};
use walcast_core::pg_type::TypeRegistry;

/// Built once: constructing the registry costs far more than one fuzz input.
fn registry() -> &'static TypeRegistry {
    static TYPES: std::sync::OnceLock<TypeRegistry> = std::sync::OnceLock::new();
    TYPES.get_or_init(TypeRegistry::new)
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(filter) = parse(text) else { return };
    let types = registry();
    // A spread of column types, each column name the filter might use.
    let oids = [
        16u32, 20, 23, 25, 700, 701, 1042, 1082, 1114, 1184, 1700, 2950, 3802, 1007,
    ];
    for oid in oids {
        let columns: Vec<ColumnInfo> = filter
            .conditions
            .iter()
            .map(|c| ColumnInfo {
                name: c.column.clone(),
                type_oid: oid,
            })
            .collect();
        let _ = filter.compile(&columns, types);
    }
});
