//! Properties of `write_json` on arbitrary text: it never panics, what it writes is valid
//! JSON, errors leave the output untouched, and array/composite literals written the way
//! `array_out`/`record_out` write them come back with the same elements.

use proptest::prelude::*;
use serde_json::Value;
use walcast_core::{to_json_string, write_json, Oid, TypeInfo, TypeKind, TypeRegistry};

const PAIR: Oid = 60_000;
const PAIR_ARRAY: Oid = 60_001;
const DOMAIN_OVER_ARRAY: Oid = 60_002;
const NESTED: Oid = 60_003;

fn registry() -> TypeRegistry {
    let mut reg = TypeRegistry::new();
    reg.insert(TypeInfo {
        oid: PAIR,
        name: "pair".into(),
        kind: TypeKind::Composite {
            fields: vec![("n".into(), 23), ("t".into(), 25)],
        },
    });
    reg.insert(TypeInfo {
        oid: PAIR_ARRAY,
        name: "_pair".into(),
        kind: TypeKind::Array {
            element: PAIR,
            delimiter: b',',
        },
    });
    reg.insert(TypeInfo {
        oid: DOMAIN_OVER_ARRAY,
        name: "texts".into(),
        kind: TypeKind::Domain { base: 1009 },
    });
    reg.insert(TypeInfo {
        oid: NESTED,
        name: "nested".into(),
        kind: TypeKind::Composite {
            fields: vec![
                ("p".into(), PAIR),
                ("a".into(), PAIR_ARRAY),
                ("j".into(), 114),
                ("f".into(), 701),
            ],
        },
    });
    reg
}

/// bool, int4, int8, numeric, float4, float8, json, jsonb, text, bytea, date, timestamp,
/// timestamptz, int2vector, oidvector, _int4, _text, _json, _box, _float8, _timestamptz,
/// user composite, array of composites, domain over array, composite of composites.
const SAMPLE_TYPES: &[Oid] = &[
    16,
    23,
    20,
    1700,
    700,
    701,
    114,
    3802,
    25,
    17,
    1082,
    1114,
    1184,
    22,
    30,
    1007,
    1009,
    199,
    1020,
    1022,
    1185,
    PAIR,
    PAIR_ARRAY,
    DOMAIN_OVER_ARRAY,
    NESTED,
];

/// Text made of the characters that matter to the parsers, so malformed literals are
/// near-misses rather than noise.
fn literalish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[{}(),;\"\\\\ NULnul0-9.eE+:\\[\\]=TtfBC-]{0,40}",
        "\\PC{0,40}",
        any::<String>(),
    ]
}

fn check(reg: &TypeRegistry, oid: Oid, text: &str) -> Result<(), TestCaseError> {
    let mut out = String::from("[");
    match write_json(reg, oid, text, &mut out) {
        Ok(()) => {
            out.push(']');
            let parsed = serde_json::from_str::<Value>(&out);
            prop_assert!(
                parsed.is_ok(),
                "{text:?} as {oid} wrote invalid JSON {out:?}"
            );
        }
        Err(_) => prop_assert_eq!(&out, "[", "error must leave the output untouched"),
    }
    let fallback = to_json_string(reg, oid, text);
    prop_assert!(
        serde_json::from_str::<Value>(&fallback).is_ok(),
        "to_json_string({text:?} as {oid}) is invalid JSON {fallback:?}"
    );
    Ok(())
}

/// array_out's quoting: quote when empty, `NULL`, or containing specials; escape `"`/`\`.
fn array_element(s: &str, delimiter: char) -> String {
    let needs_quotes = s.is_empty()
        || s.eq_ignore_ascii_case("NULL")
        || s.chars().any(|c| {
            c == delimiter || matches!(c, '"' | '\\' | '{' | '}') || c.is_ascii_whitespace()
        });
    if !needs_quotes {
        return s.to_owned();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// record_out's quoting: quote when empty or containing specials; double `"` and `\`.
fn record_field(s: &str) -> String {
    let needs_quotes = s.is_empty()
        || s.chars()
            .any(|c| matches!(c, '"' | '\\' | '(' | ')' | ',') || c.is_ascii_whitespace());
    if !needs_quotes {
        return s.to_owned();
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if matches!(c, '"' | '\\') {
            out.push(c);
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn text_json(s: &Option<String>) -> Value {
    s.clone().map_or(Value::Null, Value::String)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn never_panics_and_writes_valid_json(text in literalish(), pick in 0..SAMPLE_TYPES.len()) {
        let reg = registry();
        check(&reg, SAMPLE_TYPES[pick], &text)?;
    }

    #[test]
    fn every_sample_type_on_the_same_text(text in literalish()) {
        let reg = registry();
        for &oid in SAMPLE_TYPES {
            check(&reg, oid, &text)?;
        }
    }

    #[test]
    fn text_arrays_round_trip(items in proptest::collection::vec(proptest::option::of(any::<String>()), 0..8)) {
        let literal = format!(
            "{{{}}}",
            items
                .iter()
                .map(|i| i.as_deref().map_or("NULL".to_owned(), |s| array_element(s, ',')))
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = to_json_string(&registry(), 1009, &literal);
        let expected = Value::Array(items.iter().map(text_json).collect());
        prop_assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(expected), "literal {:?}", literal);
    }

    #[test]
    fn composite_arrays_round_trip(
        items in proptest::collection::vec(
            proptest::option::of((proptest::option::of(any::<i32>()), proptest::option::of(any::<String>()))),
            0..5,
        )
    ) {
        let literal = format!(
            "{{{}}}",
            items
                .iter()
                .map(|item| match item {
                    None => "NULL".to_owned(),
                    Some((n, t)) => {
                        let record = format!(
                            "({},{})",
                            n.map(|n| n.to_string()).unwrap_or_default(),
                            t.as_deref().map(record_field).unwrap_or_default()
                        );
                        array_element(&record, ',')
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        );
        let out = to_json_string(&registry(), PAIR_ARRAY, &literal);
        let expected = Value::Array(
            items
                .iter()
                .map(|item| match item {
                    None => Value::Null,
                    Some((n, t)) => serde_json::json!({ "n": n, "t": text_json(t) }),
                })
                .collect(),
        );
        prop_assert_eq!(serde_json::from_str::<Value>(&out).ok(), Some(expected), "literal {:?}", literal);
    }

    #[test]
    fn floats_keep_their_value(f in any::<f64>().prop_filter("finite", |f| f.is_finite())) {
        // Rust's `{:e}` is a shortest round-trip form like float8out's; the expanded decimal
        // must denote the same double.
        let text = format!("{f:e}");
        let out = to_json_string(&registry(), 701, &text);
        prop_assert!(!out.contains(['e', 'E']), "{} kept an exponent: {}", text, out);
        let back: f64 = out.parse().map_err(|e| TestCaseError::fail(format!("{out}: {e}")))?;
        prop_assert_eq!(back, f, "{} → {}", text, out);
    }
}
