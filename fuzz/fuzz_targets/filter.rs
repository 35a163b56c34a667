//! The postgres_changes filter grammar is client input: parsing and compiling must never
//! panic, whatever the text and whatever column types it meets. A compiled filter is also
//! evaluated (it runs on every change, `like` patterns included) against a row whose values
//! are the input itself and the text after its last newline, so values and patterns meet.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use walcast_core::change::{Change, ChangeKind, Column, Table, Value};
use walcast_core::filter::{parse, ColumnInfo};
use walcast_core::pg_type::TypeRegistry;
use walcast_pgoutput::{Lsn, ReplicaIdentity};

/// Built once: constructing the registry costs far more than one fuzz input.
fn registry() -> &'static TypeRegistry {
    static TYPES: std::sync::OnceLock<TypeRegistry> = std::sync::OnceLock::new();
    TYPES.get_or_init(TypeRegistry::new)
}

/// A change of a table with `columns`, every value `text` (or NULL).
fn change(columns: &[ColumnInfo], text: Option<&str>) -> Change {
    let table = Table {
        relation_id: 1,
        schema: "public".into(),
        name: "t".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: columns
            .iter()
            .map(|c| Column {
                name: c.name.as_str().into(),
                type_name: "fuzz".into(),
                type_oid: c.type_oid,
                is_key: false,
            })
            .collect(),
    };
    let value = || match text {
        Some(t) => Value::Present {
            text: t.into(),
            json: "null".into(),
        },
        None => Value::Null,
    };
    Change {
        table: Arc::new(table),
        kind: ChangeKind::Insert,
        commit_lsn: Lsn(1),
        index_in_txn: 0,
        xid: 0,
        commit_time_us: 0,
        record: Some(columns.iter().map(|_| value()).collect()),
        old_record: None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(filter) = parse(text) else { return };
    let types = registry();
    let value = text.rsplit_once('\n').map_or(text, |(_, v)| v);
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
        let Ok(compiled) = filter.compile(&columns, types) else {
            continue;
        };
        for v in [Some(text), Some(value), None] {
            let _ = compiled.matches(&change(&columns, v));
        }
    }
});
