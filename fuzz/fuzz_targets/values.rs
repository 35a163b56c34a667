//! Text → JSON conversion runs on every value the WAL carries: it must never panic, and what
//! it writes must always be valid JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast_core::pg_type::TypeRegistry;
use walcast_core::value::write_json;

/// Built once: constructing the registry costs far more than one fuzz input.
fn registry() -> &'static TypeRegistry {
    static TYPES: std::sync::OnceLock<TypeRegistry> = std::sync::OnceLock::new();
    TYPES.get_or_init(TypeRegistry::new)
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    let types = registry();
    // First byte picks the type, the rest is the text.
    let oids = [
        16u32, 17, 20, 21, 23, 25, 114, 700, 701, 1000, 1007, 1009, 1020, 1082, 1114, 1184, 1186,
        1231, 1700, 2950, 3802, 3807, 3904, 1115, 1185,
    ];
    let oid = oids[data[0] as usize % oids.len()];
    let Ok(text) = std::str::from_utf8(&data[1..]) else {
        return;
    };
    let mut out = String::new();
    if write_json(types, oid, text, &mut out).is_ok() {
        assert!(
            serde_json::from_str::<serde::de::IgnoredAny>(&out).is_ok(),
            "invalid JSON for oid {oid} from {text:?}: {out}"
        );
    } else {
        assert!(out.is_empty(), "output must be untouched on error");
    }
});
