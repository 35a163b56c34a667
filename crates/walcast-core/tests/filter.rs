//! Filter grammar, compile-time checks, evaluation semantics and property tests.

use std::sync::Arc;

use proptest::prelude::*;
use walcast_core::change::{Change, ChangeKind, Column, Table, Value};
use walcast_core::filter::{self, ColumnInfo, CompiledFilter, FilterError, InItem, Operation};
use walcast_core::pg_type::{TypeInfo, TypeKind, TypeRegistry};
use walcast_pgoutput::{Lsn, ReplicaIdentity};

const INT4: u32 = 23;
const INT8: u32 = 20;
const NUMERIC: u32 = 1700;
const FLOAT8: u32 = 701;
const TEXT: u32 = 25;
const BPCHAR: u32 = 1042;
const BOOL: u32 = 16;
const UUID: u32 = 2950;
const DATE: u32 = 1082;
const TIMESTAMPTZ: u32 = 1184;
const JSONB: u32 = 3802;
const JSON: u32 = 114;
const MOOD: u32 = 50_000;
const POSINT: u32 = 50_001;

fn registry() -> TypeRegistry {
    let mut types = TypeRegistry::new();
    types.insert(TypeInfo {
        oid: MOOD,
        name: "mood".into(),
        kind: TypeKind::Enum,
    });
    types.insert(TypeInfo {
        oid: POSINT,
        name: "posint".into(),
        kind: TypeKind::Domain { base: INT4 },
    });
    types
}

fn cols(spec: &[(&str, u32)]) -> Vec<ColumnInfo> {
    spec.iter()
        .map(|(n, o)| ColumnInfo {
            name: (*n).into(),
            type_oid: *o,
        })
        .collect()
}

fn compile(filter: &str, spec: &[(&str, u32)]) -> Result<CompiledFilter, FilterError> {
    filter::parse(filter)?.compile(&cols(spec), &registry())
}

fn value(v: Option<&str>) -> Value {
    match v {
        None => Value::Null,
        Some(t) => Value::Present {
            text: t.into(),
            json: "null".into(),
        },
    }
}

/// A change on a table with the given columns; `record`/`old_record` as given.
fn change_with(
    kind: ChangeKind,
    spec: &[(&str, u32)],
    record: Option<Vec<Value>>,
    old_record: Option<Vec<Value>>,
) -> Change {
    let columns: Vec<Column> = spec
        .iter()
        .map(|(n, o)| Column {
            name: (*n).into(),
            type_name: "t".into(),
            type_oid: *o,
            is_key: false,
        })
        .collect();
    Change {
        table: Arc::new(Table {
            relation_id: 1,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: columns.into(),
        }),
        kind,
        commit_lsn: Lsn(1),
        index_in_txn: 0,
        xid: 0,
        commit_time_us: 0,
        record,
        old_record,
    }
}

fn insert(spec: &[(&str, u32)], row: &[Option<&str>]) -> Change {
    let row = row.iter().map(|v| value(*v)).collect();
    change_with(ChangeKind::Insert, spec, Some(row), None)
}

/// Does `filter` (on a single column `c` of type `oid`) accept a row where `c` is `v`?
fn accepts(filter: &str, oid: u32, v: Option<&str>) -> bool {
    let spec = [("c", oid)];
    let f = compile(filter, &spec).unwrap_or_else(|e| panic!("{filter}: {e}"));
    f.matches(&insert(&spec, &[v]))
}

#[test]
fn grammar() {
    assert!(filter::parse("").unwrap().is_empty());
    assert!(filter::parse("   ").unwrap().is_empty());
    let f =
        filter::parse(r#"a=eq.1, b=not.in.(x,"y,z",null,"null"),c=eq."a,b",d=is.NULL"#).unwrap();
    assert_eq!(f.conditions.len(), 4);
    assert_eq!(f.conditions[0].column, "a");
    assert_eq!(
        f.conditions[1].op,
        Operation::In(vec![
            InItem::Value("x".into()),
            InItem::Value("y,z".into()),
            InItem::Null,
            InItem::Value("null".into()),
        ])
    );
    assert!(f.conditions[1].negate);
    assert_eq!(
        f.conditions[2].op,
        Operation::Cmp(filter::CmpOp::Eq, "a,b".into())
    );
    // Escapes inside quotes; a raw value keeps its dots and equals signs.
    let f = filter::parse(r#"a=eq."q\"uo\\te",b=eq.1.5=x"#).unwrap();
    assert_eq!(
        f.conditions[0].op,
        Operation::Cmp(filter::CmpOp::Eq, r#"q"uo\te"#.into())
    );
    assert_eq!(
        f.conditions[1].op,
        Operation::Cmp(filter::CmpOp::Eq, "1.5=x".into())
    );
    assert_eq!(
        filter::parse("a=in.()").unwrap().conditions[0].op,
        Operation::In(vec![])
    );
}

#[test]
fn grammar_errors_read_well() {
    let err = |f: &str| filter::parse(f).unwrap_err().to_string();
    assert!(err("a=eq.1,,b=eq.2").contains("empty condition at position 2"));
    assert!(err("a=eq.1,").contains("empty condition"));
    assert!(err("a").contains("expected `column=operator.value`"));
    assert!(err("=eq.1").contains("column name is empty"));
    assert!(err("a=eq").contains("expected `operator.value`"));
    assert!(err("a=foo.1").contains("unknown operator `foo`"));
    // Regular expressions parse here; patterns are checked against the column at compile.
    assert!(filter::parse("a=match.^x").is_ok());
    assert!(filter::parse("a=not.imatch.x").is_ok());
    assert!(err("a=in.1,2").contains("parentheses"));
    assert!(err("a=in.(1,2").contains("parentheses"));
    assert!(err("a=in.(1,,2)").contains("empty value"));
    assert!(err(r#"a=eq."abc"#).contains("unterminated"));
    assert!(err(r#"a=eq."abc"x"#).contains("after the quoted value"));
    assert!(err("a=is.maybe").contains("null, true, false or unknown"));
    let many: Vec<String> = (0..101).map(|i| i.to_string()).collect();
    assert_eq!(
        err(&format!("a=in.({})", many.join(","))),
        "too many values for `in` filter. Maximum 100"
    );
    let hundred: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert!(filter::parse(&format!("a=in.({})", hundred.join(","))).is_ok());
}

#[test]
fn compile_errors_name_column_value_and_type() {
    let spec = [
        ("id", INT8),
        ("n", INT4),
        ("u", UUID),
        ("at", TIMESTAMPTZ),
        ("ok", BOOL),
        ("mood", MOOD),
        ("body", TEXT),
        ("doc", JSON),
        ("price", NUMERIC),
    ];
    let err = |f: &str| compile(f, &spec).unwrap_err().to_string();
    assert_eq!(err("nope=eq.1"), "invalid column for filter nope");
    assert_eq!(
        err("id=eq.abc"),
        "invalid value `abc` for column `id` of type int8"
    );
    assert!(err("n=eq.2147483648").contains("of type int4"));
    assert!(err("u=eq.not-a-uuid").contains("`u` of type uuid"));
    assert!(err("at=gt.2024-02-30").contains("of type timestamptz"));
    assert!(err("ok=eq.maybe").contains("of type bool"));
    assert!(err("price=in.(1,x)").contains("invalid value `x`"));
    assert!(err("mood=lt.happy")
        .contains("operator `lt` is not supported on column `mood` of type mood"));
    assert!(err("body=is.true").contains("boolean column"));
    assert!(err("id=like.1%").contains("like and ilike need a text column"));
    assert!(err("doc=eq.{}").contains("json has no equality operator"));
    assert!(err("body=like.abc\\").contains("escape character"));
    assert!(err("id=match.^1").contains("match and imatch need a text, varchar or name column"));
    assert!(err("body=match.a(").contains("invalid regular expression `a(`"));
    assert!(err("body=imatch.(a)\\1").contains("is not supported: back-references"));
    // What does compile.
    for ok in [
        "id=eq.-9223372036854775808",
        "n=in.(1, 2 ,3)",
        "u=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        "at=gte.2024-05-06T07:08:09.5Z",
        "ok=is.unknown",
        "mood=eq.happy",
        "mood=not.in.(sad,ok)",
        "doc=is.null",
        "price=lt.1e-3",
        "body=ilike.*ab_%",
    ] {
        assert!(compile(ok, &spec).is_ok(), "{ok}");
    }
}

#[test]
fn null_semantics() {
    // A comparison with NULL is NULL, and NOT NULL is NULL: neither matches.
    assert!(!accepts("c=eq.1", INT4, None));
    assert!(!accepts("c=not.eq.1", INT4, None));
    assert!(!accepts("c=neq.1", INT4, None));
    assert!(!accepts("c=in.(1,2)", INT4, None));
    assert!(!accepts("c=not.in.(1,2)", INT4, None));
    assert!(accepts("c=is.null", INT4, None));
    assert!(!accepts("c=not.is.null", INT4, None));
    assert!(accepts("c=not.is.null", INT4, Some("0")));
    // IS DISTINCT FROM treats NULL as a value.
    assert!(accepts("c=isdistinct.1", INT4, None));
    assert!(!accepts("c=not.isdistinct.1", INT4, None));
    assert!(!accepts("c=isdistinct.1", INT4, Some("1")));
    assert!(accepts("c=not.isdistinct.1", INT4, Some("1")));
    // x IN (…, NULL): true on a hit, else NULL.
    assert!(accepts("c=in.(1,null)", INT4, Some("1")));
    assert!(!accepts("c=in.(1,null)", INT4, Some("2")));
    assert!(!accepts("c=not.in.(1,null)", INT4, Some("2")));
    assert!(accepts("c=not.in.(1)", INT4, Some("2")));
    // Empty list: x = ANY('{}') is false even for NULL x.
    assert!(!accepts("c=in.()", INT4, Some("1")));
    assert!(accepts("c=not.in.()", INT4, None));
    // Booleans: IS TRUE / IS NOT TRUE never yield NULL.
    assert!(accepts("c=is.true", BOOL, Some("t")));
    assert!(!accepts("c=is.true", BOOL, None));
    assert!(accepts("c=not.is.true", BOOL, None));
    assert!(accepts("c=not.is.true", BOOL, Some("f")));
    assert!(accepts("c=is.unknown", BOOL, None));
    assert!(accepts("c=eq.yes", BOOL, Some("t")));
    assert!(accepts("c=lt.true", BOOL, Some("f")));
}

#[test]
fn typed_comparisons() {
    assert!(accepts("c=gt.9", INT8, Some("10")));
    assert!(accepts("c=eq.007", INT8, Some("7")));
    assert!(accepts("c=eq.1.50", NUMERIC, Some("1.5")));
    assert!(accepts("c=lt.NaN", NUMERIC, Some("Infinity")));
    assert!(accepts("c=eq.nan", NUMERIC, Some("NaN")));
    let big = format!("1{}", "0".repeat(120));
    let bigger = format!("1{}1", "0".repeat(119));
    assert!(accepts(&format!("c=lt.{bigger}"), NUMERIC, Some(&big)));
    assert!(accepts("c=eq.1e120", NUMERIC, Some(&big)));
    assert!(accepts(
        "c=gt.-0.0000000000000000000001",
        NUMERIC,
        Some("0")
    ));
    assert!(accepts("c=eq.NaN", FLOAT8, Some("NaN")));
    assert!(accepts("c=gt.Infinity", FLOAT8, Some("NaN")));
    assert!(accepts("c=eq.-0", FLOAT8, Some("0")));
    assert!(accepts("c=lt.1e308", FLOAT8, Some("-Infinity")));
    assert!(accepts("c=eq.ab", BPCHAR, Some("ab   ")));
    assert!(accepts("c=lt.b", TEXT, Some("B")), "C collation: 'B' < 'b'");
    assert!(!accepts("c=eq.ab", TEXT, Some("ab ")));
    assert!(accepts(
        "c=eq.A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
        UUID,
        Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
    ));
    assert!(accepts(
        "c=gt.2024-05-06T07:08:09+02:00",
        TIMESTAMPTZ,
        Some("2024-05-06 05:08:09.000001+00")
    ));
    assert!(accepts(
        "c=eq.2024-05-06T05:08:09Z",
        TIMESTAMPTZ,
        Some("2024-05-06 05:08:09+00")
    ));
    assert!(accepts("c=lt.0001-01-01", DATE, Some("0044-03-15 BC")));
    assert!(accepts("c=gt.294276-01-01", DATE, Some("infinity")));
    assert!(!accepts("c=lt.-infinity", TIMESTAMPTZ, None));
    assert!(accepts("c=eq.happy", MOOD, Some("happy")));
    assert!(!accepts("c=eq.Happy", MOOD, Some("happy")));
    assert!(accepts("c=eq.5", POSINT, Some("5")), "domain over int4");
    assert!(accepts(r#"c=eq.{"a": 1}"#, JSONB, Some(r#"{"a": 1}"#)));
    assert!(accepts("c=like.a%c", TEXT, Some("abbc")));
    assert!(!accepts("c=like.A%", TEXT, Some("abc")));
    assert!(accepts("c=ilike.A*", TEXT, Some("abc")));
    assert!(accepts("c=ilike.%É%", TEXT, Some("café")));
    // LIKE sees bpchar padding (Postgres's bpcharlike), comparisons do not.
    assert!(!accepts("c=like.ab", BPCHAR, Some("ab  ")));
    assert!(accepts("c=like.ab%", BPCHAR, Some("ab  ")));
    assert!(accepts("c=not.like.x%", TEXT, Some("abc")));
    // Regular expressions: Postgres's ~ and ~* (C locale).
    assert!(accepts("c=match.^a.*z$", TEXT, Some("abcz")));
    assert!(!accepts("c=match.^A", TEXT, Some("abc")));
    assert!(accepts("c=imatch.^A", TEXT, Some("abc")));
    assert!(accepts(r#"c=match."^a{1,2}$""#, TEXT, Some("aa")));
    assert!(accepts("c=not.match.x", TEXT, Some("abc")));
    assert!(!accepts("c=match.x", TEXT, None), "NULL never matches");
    assert!(
        !accepts("c=not.match.x", TEXT, None),
        "nor does its negation"
    );
}

#[test]
fn row_images_by_event_and_name() {
    let spec = [("id", INT8), ("body", TEXT)];
    let f = compile("id=eq.1,body=eq.x", &spec).unwrap();
    let row = |id: &str, body: Value| vec![value(Some(id)), body];
    // DELETE uses old_record.
    let del = change_with(
        ChangeKind::Delete,
        &spec,
        None,
        Some(row("1", value(Some("x")))),
    );
    assert!(f.matches(&del));
    // Key-only old image: the non-key column is Missing, so a filter on it fails.
    let del = change_with(
        ChangeKind::Delete,
        &spec,
        None,
        Some(row("1", Value::Missing)),
    );
    assert!(!f.matches(&del));
    assert!(compile("id=eq.1", &spec).unwrap().matches(&del));
    // UPDATE: unchanged TOAST in the new image falls back to the old image.
    let upd = change_with(
        ChangeKind::Update,
        &spec,
        Some(row("1", Value::UnchangedToast)),
        Some(row("1", value(Some("x")))),
    );
    assert!(f.matches(&upd));
    let upd = change_with(
        ChangeKind::Update,
        &spec,
        Some(row("1", Value::UnchangedToast)),
        Some(row("1", Value::Missing)),
    );
    assert!(!f.matches(&upd));
    // Columns are found by name: a reordered table still works, a dropped column fails.
    let reordered = [("body", TEXT), ("extra", INT4), ("id", INT8)];
    let c = insert(&reordered, &[Some("x"), Some("5"), Some("1")]);
    assert!(f.matches(&c));
    let dropped = [("id", INT8)];
    assert!(!f.matches(&insert(&dropped, &[Some("1")])));
    // A value that no longer parses as the compiled type (type changed) never matches.
    let g = compile("id=not.eq.1", &spec).unwrap();
    assert!(!g.matches(&insert(&spec, &[Some("1.5"), Some("x")])));
    // TRUNCATE never matches, even without conditions.
    let trunc = change_with(ChangeKind::Truncate, &spec, None, None);
    assert!(!compile("", &spec).unwrap().matches(&trunc));
    assert!(compile("", &spec)
        .unwrap()
        .matches(&insert(&spec, &[None, None])));
}

// ---------------------------------------------------------------------------------------
// Properties

fn op_strategy() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["eq", "neq", "lt", "lte", "gt", "gte"])
}

fn reference<T: Ord>(op: &str, a: T, b: T) -> bool {
    match op {
        "eq" => a == b,
        "neq" => a != b,
        "lt" => a < b,
        "lte" => a <= b,
        "gt" => a > b,
        _ => a >= b,
    }
}

/// A decimal as (negative, integer digits, fraction digits), rendered in a random but
/// equivalent spelling; the reference value is the number scaled by 10^12 in an i128.
#[derive(Debug, Clone)]
struct Dec {
    scaled: i128,
    spelling: String,
}

fn decimal_strategy() -> impl Strategy<Value = Dec> {
    (
        any::<bool>(),
        "[0-9]{1,24}",
        "[0-9]{0,12}",
        0usize..3,
        0usize..3,
        -3i32..4,
    )
        .prop_map(|(neg, int, frac, lead, trail, shift)| {
            let frac_padded = format!("{frac:0<12}");
            let magnitude: i128 = format!("{int}{frac_padded}").parse().expect("digits");
            let scaled = if neg { -magnitude } else { magnitude };
            // Equivalent spellings: leading zeros, trailing zeros, or exponent notation.
            let int = format!("{}{int}", "0".repeat(lead));
            let frac = format!("{frac}{}", "0".repeat(trail));
            let sign = if neg { "-" } else { "" };
            let spelling = if shift == 0 || frac.is_empty() {
                if frac.is_empty() {
                    format!("{sign}{int}")
                } else {
                    format!("{sign}{int}.{frac}")
                }
            } else {
                // Move the point `shift` places and compensate with the exponent.
                let digits = format!("{int}{frac}");
                let point = int.len() as i32 + shift;
                let point = point.clamp(0, digits.len() as i32) as usize;
                let exp = int.len() as i32 - point as i32;
                format!("{sign}{}.{}e{exp}", &digits[..point], &digits[point..])
            };
            Dec { scaled, spelling }
        })
}

/// Independent LIKE reference: plain recursion (exponential, fine on short strings).
fn like_reference(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('%', rest)) => (0..=t.len()).any(|i| like_reference(rest, &t[i..])),
        Some(('_', rest)) => !t.is_empty() && like_reference(rest, &t[1..]),
        Some((c, rest)) => t.first() == Some(c) && like_reference(rest, &t[1..]),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(s in any::<String>()) {
        let _ = filter::parse(&s);
    }

    #[test]
    fn parse_and_compile_never_panic_on_filter_shaped_input(
        s in r#"[a-c]{0,2}(=(not\.)?(eq|in|is|like|lt|isdistinct|x)?\.?[-0-9a-z(),"\\ .%*_:TZ+]{0,20}){0,2}(,[a-c=.()"]{0,6}){0,3}"#
    ) {
        if let Ok(f) = filter::parse(&s) {
            for oid in [INT4, NUMERIC, FLOAT8, TEXT, BOOL, UUID, DATE, TIMESTAMPTZ, MOOD, JSON] {
                let spec = [("a", oid), ("b", oid), ("c", oid)];
                if let Ok(cf) = f.compile(&cols(&spec), &registry()) {
                    let _ = cf.matches(&insert(&spec, &[Some("1"), None, Some("x")]));
                }
            }
        }
    }

    #[test]
    fn evaluation_never_panics_on_arbitrary_stream_text(v in any::<String>(), which in 0usize..6) {
        // Stream text is external input too: whatever it holds, evaluation answers.
        let ops = ["eq", "not.lt", "in", "isdistinct", "is", "neq"];
        let constants = [
            (INT4, "1"), (INT8, "1"), (NUMERIC, "1"), (FLOAT8, "1"), (BOOL, "t"),
            (DATE, "2024-01-01"), (TIMESTAMPTZ, "2024-01-01"), (UUID, "{00000000000000000000000000000000}"),
            (TEXT, "a"), (BPCHAR, "a"), (MOOD, "x"), (JSONB, "{}"),
        ];
        let spec = [("c", 0)];
        for (oid, constant) in constants {
            let filter = match ops[which] {
                "in" => format!("c=in.({constant},null)"),
                "is" => "c=is.null".to_owned(),
                op => format!("c={op}.{constant}"),
            };
            let spec = [("c", oid); 1];
            let f = compile(&filter, &spec);
            let ordering_refused = matches!(oid, MOOD | JSONB) && which == 1;
            prop_assert_eq!(f.is_ok(), !ordering_refused, "{}: {:?}", filter, f);
            if let Ok(f) = f {
                let _ = f.matches(&insert(&spec, &[Some(&v)]));
            }
        }
        let f = compile("c=ilike.%a_", &[("c", TEXT)]).expect("compiles");
        let _ = f.matches(&insert(&spec, &[Some(&v)]));
    }

    #[test]
    fn integers_agree_with_i128(a in any::<i64>(), b in any::<i64>(), op in op_strategy(), negate in any::<bool>()) {
        let not = if negate { "not." } else { "" };
        let got = accepts(&format!("c={not}{op}.{b}"), INT8, Some(&a.to_string()));
        prop_assert_eq!(got, reference(op, i128::from(a), i128::from(b)) != negate);
    }

    #[test]
    fn small_integers_agree(a in -5i64..5, b in -5i64..5, op in op_strategy()) {
        // Dense range so equality is exercised often.
        let got = accepts(&format!("c={op}.{b}"), INT4, Some(&a.to_string()));
        prop_assert_eq!(got, reference(op, a, b));
    }

    #[test]
    fn decimals_agree_with_scaled_integers(a in decimal_strategy(), b in decimal_strategy(), op in op_strategy()) {
        let got = accepts(&format!("c={op}.{}", b.spelling), NUMERIC, Some(&a.spelling));
        prop_assert_eq!(got, reference(op, a.scaled, b.scaled), "{} {} {}", a.spelling, op, b.spelling);
        // Every spelling equals its own canonical form.
        let canon = accepts(&format!("c=eq.{}", a.spelling), NUMERIC, Some(&format!("{}e-12", a.scaled)));
        prop_assert!(canon, "{} vs {}e-12", a.spelling, a.scaled);
    }

    #[test]
    fn in_lists_agree(a in -20i64..20, items in prop::collection::vec(-20i64..20, 0..10)) {
        let list: Vec<String> = items.iter().map(|i| i.to_string()).collect();
        let got = accepts(&format!("c=in.({})", list.join(",")), INT8, Some(&a.to_string()));
        prop_assert_eq!(got, items.contains(&a));
        let got = accepts(&format!("c=not.in.({})", list.join(",")), INT8, Some(&a.to_string()));
        prop_assert_eq!(got, !items.contains(&a));
    }

    #[test]
    fn text_agrees_with_bytes(a in "[a-cA-C é]{0,6}", b in "[a-cA-C é]{0,6}", op in op_strategy()) {
        let quoted = format!("\"{}\"", b.replace('\\', "\\\\").replace('"', "\\\""));
        let got = accepts(&format!("c={op}.{quoted}"), TEXT, Some(&a));
        prop_assert_eq!(got, reference(op, a.as_bytes(), b.as_bytes()));
        let got = accepts(&format!("c={op}.{quoted}"), BPCHAR, Some(&a));
        prop_assert_eq!(got, reference(op, a.trim_end_matches(' ').as_bytes(), b.trim_end_matches(' ').as_bytes()));
    }

    #[test]
    fn like_agrees_with_reference(p in "[ab%_]{0,8}", t in "[ab]{0,10}") {
        let got = accepts(&format!("c=like.\"{p}\""), TEXT, Some(&t));
        let pc: Vec<char> = p.chars().collect();
        let tc: Vec<char> = t.chars().collect();
        prop_assert_eq!(got, like_reference(&pc, &tc));
    }
}
