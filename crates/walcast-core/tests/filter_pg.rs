//! The filter agrees with SQL: for a table of edge values, the rows a compiled filter accepts
//! are exactly the rows the equivalent `WHERE` clause returns on a real Postgres.

use std::sync::Arc;

use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use walcast_core::change::{Change, ChangeKind, Column, Table, Value};
use walcast_core::filter::{self, ColumnInfo};
use walcast_core::pg_type::{TypeInfo, TypeKind, TypeRegistry};
use walcast_pgoutput::{Lsn, ReplicaIdentity};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const BIG: &str = "1234567890123456789012345678901234567890.123456789";
const NEG_BIG: &str = "-99999999999999999999999999999999999999999";

/// Column name, SQL type, stored values (cycled over the rows, with NULLs sprinkled in),
/// and extra constants people would write in filters.
struct Spec {
    name: &'static str,
    sql_type: &'static str,
    stored: &'static [&'static str],
    extra: &'static [&'static str],
    ordered: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "i4",
        sql_type: "int4",
        stored: &["-2147483648", "-1", "0", "1", "42", "2147483647"],
        extra: &["+7", " 42 "],
        ordered: true,
    },
    Spec {
        name: "i8",
        sql_type: "int8",
        stored: &[
            "-9223372036854775808",
            "9223372036854775807",
            "0",
            "-5",
            "10",
        ],
        extra: &["0010"],
        ordered: true,
    },
    Spec {
        name: "num",
        sql_type: "numeric",
        stored: &[
            "NaN",
            "0",
            "-0.000",
            "1.5",
            "1.50",
            "-1e-20",
            "Infinity",
            "-Infinity",
            BIG,
            NEG_BIG,
        ],
        extra: &["1e3", ".5", "-0", "1.5e0", "nan", "-inf"],
        ordered: true,
    },
    Spec {
        name: "f8",
        sql_type: "float8",
        stored: &[
            "NaN",
            "Infinity",
            "-Infinity",
            "0",
            "-0",
            "1.5",
            "1e-300",
            "3.14159",
        ],
        extra: &["nan", "-inf", "1.50", "1e308"],
        ordered: true,
    },
    Spec {
        name: "t",
        sql_type: "text",
        stored: &[
            "", "a", "B", "b", "ab", "é", "a b", " lead", "trail ", "x,y",
        ],
        extra: &["A", "aa", "\"q\"", "back\\slash"],
        ordered: true,
    },
    Spec {
        name: "bc",
        sql_type: "char(5)",
        stored: &["ab", "ab  ", "a", "", "b", "abc"],
        extra: &["ab ", "ab   "],
        ordered: true,
    },
    Spec {
        name: "b",
        sql_type: "bool",
        stored: &["true", "false"],
        extra: &["yes", "off", "T", "0"],
        ordered: true,
    },
    Spec {
        name: "u",
        sql_type: "uuid",
        stored: &[
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "00000000-0000-0000-0000-000000000000",
            "FFFFFFFF-FFFF-FFFF-FFFF-FFFFFFFFFFFF",
            "7f000000-0000-0000-0000-000000000001",
        ],
        extra: &[
            "{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        ],
        ordered: true,
    },
    Spec {
        name: "d",
        sql_type: "date",
        stored: &[
            "2024-05-06",
            "infinity",
            "-infinity",
            "0044-03-15 BC",
            "0001-01-01",
            "2000-02-29",
            "1999-12-31",
        ],
        extra: &["0001-12-31 BC", "2024-05-06T10:00:00"],
        ordered: true,
    },
    Spec {
        name: "ts",
        sql_type: "timestamp",
        stored: &[
            "2024-05-06 07:08:09.123456",
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00 BC",
            "1970-01-01 00:00:00",
            "2024-05-06 07:08:09",
        ],
        extra: &[
            "2024-05-06T07:08:09",
            "2024-05-06",
            "2024-05-06 07:08:09.1234564",
        ],
        ordered: true,
    },
    Spec {
        name: "tstz",
        sql_type: "timestamptz",
        stored: &[
            "2024-05-06 07:08:09.123456+00",
            "2024-05-06 09:08:09+02",
            "infinity",
            "-infinity",
            "0044-03-15 12:00:00+00 BC",
            "1970-01-01 00:00:00+00",
        ],
        extra: &[
            "2024-05-06T07:08:09.123456Z",
            "2024-05-06 09:08:09+02:00",
            "2024-05-06",
            "2024-05-06T05:08:09-02",
            "2024-05-06 07:08:09",
        ],
        ordered: true,
    },
    Spec {
        name: "m",
        sql_type: "mood",
        stored: &["sad", "ok", "happy"],
        extra: &[],
        ordered: false,
    },
];

const ROWS: usize = 36;

fn stored_value(spec_index: usize, row: usize) -> Option<&'static str> {
    let spec = &SPECS[spec_index];
    // A NULL every seventh row, at a different phase per column.
    if (row + spec_index) % 7 == 3 {
        return None;
    }
    Some(spec.stored[(row + spec_index) % spec.stored.len()])
}

/// Quote a filter constant PostgREST-style when it would not survive raw.
fn filter_constant(v: &str) -> String {
    if v.is_empty()
        || v.contains([',', '"', '(', ')', '\\'])
        || v.trim() != v
        || v.eq_ignore_ascii_case("null")
    {
        format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        v.to_owned()
    }
}

/// A Postgres array literal for `= ANY($1)`.
fn array_literal(items: &[Option<&str>]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|i| match i {
            None => "NULL".to_owned(),
            Some(v) => format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\"")),
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

struct Fixture {
    client: Client,
    columns: Vec<ColumnInfo>,
    types: TypeRegistry,
    changes: Vec<(i32, Change)>,
    /// Column name → `pg_type.typname`.
    typnames: Vec<(String, String)>,
}

impl Fixture {
    fn typname(&self, column: &str) -> &str {
        self.typnames
            .iter()
            .find(|(n, _)| n == column)
            .map(|(_, t)| t.as_str())
            .expect("column of the fixture")
    }

    /// Left-hand side of a SQL comparison: text-like columns in the C collation.
    fn lhs(&self, column: &str) -> String {
        match self.typname(column) {
            "text" | "bpchar" => format!("({column} COLLATE \"C\")"),
            _ => column.to_owned(),
        }
    }

    async fn sql_ids(
        &self,
        where_clause: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<i32>, tokio_postgres::Error> {
        let rows = self
            .client
            .query(
                &format!("SELECT id FROM f WHERE {where_clause} ORDER BY id"),
                params,
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    fn filter_ids(&self, filter: &str) -> Result<Vec<i32>, filter::FilterError> {
        let compiled = filter::parse(filter)?.compile(&self.columns, &self.types)?;
        Ok(self
            .changes
            .iter()
            .filter(|(_, c)| compiled.matches(c))
            .map(|(id, _)| *id)
            .collect())
    }
}

async fn fixture() -> Result<Fixture, Box<dyn std::error::Error + Send + Sync>> {
    let db = walcast_testkit::PgCluster::shared()
        .fresh_database()
        .await?;
    let client = db.connect().await?;
    client
        .batch_execute(
            "SET TimeZone = 'UTC';
             SET DateStyle = 'ISO';
             CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');",
        )
        .await?;
    let column_defs: Vec<String> = SPECS
        .iter()
        .map(|s| format!("{} {}", s.name, s.sql_type))
        .collect();
    client
        .batch_execute(&format!(
            "CREATE TABLE f (id int4 PRIMARY KEY, {})",
            column_defs.join(", ")
        ))
        .await?;
    let placeholders: Vec<String> = SPECS
        .iter()
        .enumerate()
        .map(|(i, s)| format!("${}::text::{}", i + 2, s.sql_type))
        .collect();
    let insert = client
        .prepare(&format!(
            "INSERT INTO f VALUES ($1, {})",
            placeholders.join(", ")
        ))
        .await?;
    for row in 0..ROWS {
        let id = i32::try_from(row)?;
        let values: Vec<Option<&str>> = (0..SPECS.len()).map(|i| stored_value(i, row)).collect();
        let mut params: Vec<&(dyn ToSql + Sync)> = vec![&id];
        params.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
        client.execute(&insert, &params).await?;
    }

    let catalog = client
        .query(
            "SELECT a.attname::text, a.atttypid, t.typname::text, t.typtype::text
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
             WHERE a.attrelid = 'f'::regclass AND a.attnum > 0 AND NOT a.attisdropped
             ORDER BY a.attnum",
            &[],
        )
        .await?;
    let mut types = TypeRegistry::new();
    let mut columns = Vec::new();
    let mut table_columns = Vec::new();
    let mut typnames = Vec::new();
    for r in &catalog {
        let name: String = r.get(0);
        let oid: u32 = r.get(1);
        let typname: String = r.get(2);
        let typtype: String = r.get(3);
        if typtype == "e" {
            types.insert(TypeInfo {
                oid,
                name: typname.clone(),
                kind: TypeKind::Enum,
            });
        }
        table_columns.push(Column {
            name: name.as_str().into(),
            type_name: typname.as_str().into(),
            type_oid: oid,
            is_key: name == "id",
        });
        columns.push(ColumnInfo {
            name: name.clone(),
            type_oid: oid,
        });
        typnames.push((name, typname));
    }
    let table = Arc::new(Table {
        relation_id: 1,
        schema: "public".into(),
        name: "f".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: table_columns.into(),
    });

    // The row images as the stream carries them: each column's output function. `::text`
    // is that for every type here but bpchar, whose cast to text strips the padding.
    let select_list: Vec<String> = std::iter::once("id::text".to_owned())
        .chain(SPECS.iter().map(|s| {
            if s.sql_type.starts_with("char") {
                format!("bpcharout({})::text", s.name)
            } else {
                format!("{}::text", s.name)
            }
        }))
        .collect();
    let rows = client
        .query(
            &format!("SELECT id, {} FROM f ORDER BY 1", select_list.join(", ")),
            &[],
        )
        .await?;
    let mut changes = Vec::new();
    for r in &rows {
        let id: i32 = r.get(0);
        let record: Vec<Value> = (1..r.len())
            .map(|i| match r.get::<_, Option<String>>(i) {
                None => Value::Null,
                Some(text) => Value::Present {
                    text: text.into(),
                    json: "null".into(),
                },
            })
            .collect();
        changes.push((
            id,
            Change {
                table: table.clone(),
                kind: ChangeKind::Insert,
                commit_lsn: Lsn(1),
                index_in_txn: 0,
                xid: 0,
                commit_time_us: 0,
                record: Some(record),
                old_record: None,
            },
        ));
    }
    assert_eq!(changes.len(), ROWS);
    Ok(Fixture {
        client,
        columns,
        types,
        changes,
        typnames,
    })
}

const CMP_OPS: &[(&str, &str)] = &[
    ("eq", "="),
    ("neq", "<>"),
    ("lt", "<"),
    ("lte", "<="),
    ("gt", ">"),
    ("gte", ">="),
];

#[tokio::test]
async fn comparisons_agree_with_sql() -> TestResult {
    let fx = fixture().await?;
    let mut failures = Vec::new();
    let mut checked = 0usize;
    let mut nonempty = 0usize;
    for spec in SPECS {
        let col = spec.name;
        let cast = format!("$1::text::\"{}\"", fx.typname(col));
        let constants: Vec<&str> = spec.stored.iter().chain(spec.extra).copied().collect();
        for constant in constants {
            let mut cases: Vec<(String, String)> = Vec::new();
            for (op, sql_op) in CMP_OPS {
                if !spec.ordered && !matches!(*op, "eq" | "neq") {
                    continue;
                }
                let expr = format!("{} {sql_op} {cast}", fx.lhs(col));
                cases.push((
                    format!("{col}={op}.{}", filter_constant(constant)),
                    expr.clone(),
                ));
                cases.push((
                    format!("{col}=not.{op}.{}", filter_constant(constant)),
                    format!("NOT ({expr})"),
                ));
            }
            cases.push((
                format!("{col}=isdistinct.{}", filter_constant(constant)),
                format!("{col} IS DISTINCT FROM {cast}"),
            ));
            cases.push((
                format!("{col}=not.isdistinct.{}", filter_constant(constant)),
                format!("{col} IS NOT DISTINCT FROM {cast}"),
            ));
            for (filter, sql) in cases {
                let want = fx.sql_ids(&sql, &[&constant]).await?;
                match fx.filter_ids(&filter) {
                    Ok(got) if got == want => {}
                    Ok(got) => failures.push(format!(
                        "{filter}\n    sql ({sql}) [{constant}]: {want:?}\n    filter: {got:?}"
                    )),
                    Err(e) => failures.push(format!("{filter}: refused: {e}")),
                }
                checked += 1;
                nonempty += usize::from(!want.is_empty());
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} filters disagree with SQL:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{checked} comparison filters agree with SQL ({nonempty} with a non-empty result)");
    // The comparisons must have had something to disagree about.
    assert!(checked > 700, "only {checked} cases");
    assert!(
        nonempty * 2 > checked,
        "only {nonempty} of {checked} non-empty"
    );
    Ok(())
}

#[tokio::test]
async fn lists_patterns_and_is_agree_with_sql() -> TestResult {
    let fx = fixture().await?;
    // (filter, column for ANY/LIKE, SQL template with $1 as the only parameter)
    let in_cases: &[(&str, &[Option<&str>])] = &[
        ("i4", &[Some("1"), Some("42"), None]),
        ("i4", &[Some("0"), Some("1")]),
        ("i4", &[]),
        ("t", &[Some("a b"), Some("B"), Some("")]),
        ("t", &[Some("x,y"), Some("é")]),
        ("m", &[Some("sad"), Some("happy")]),
        ("m", &[Some("ok")]),
        ("num", &[Some("1.5"), Some("NaN")]),
        ("num", &[Some(BIG), Some("-inf"), None]),
        ("bc", &[Some("ab"), Some("b")]),
        ("d", &[Some("infinity"), Some("2000-02-29")]),
        ("u", &[Some("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11")]),
        ("b", &[Some("t")]),
        ("tstz", &[Some("2024-05-06 07:08:09+00"), Some("-infinity")]),
    ];
    let mut failures = Vec::new();
    let mut checked = 0;
    for (col, items) in in_cases {
        let list: Vec<String> = items
            .iter()
            .map(|i| match i {
                None => "null".to_owned(),
                Some(v) => filter_constant(v),
            })
            .collect();
        let literal = array_literal(items);
        let any = format!("{col} = ANY($1::text::\"{}\"[])", fx.typname(col));
        for (negate, sql) in [(false, any.clone()), (true, format!("NOT ({any})"))] {
            let not = if negate { "not." } else { "" };
            let filter = format!("{col}={not}in.({})", list.join(","));
            let want = fx.sql_ids(&sql, &[&literal]).await?;
            match fx.filter_ids(&filter) {
                Ok(got) if got == want => {}
                other => failures.push(format!("{filter}: sql {want:?}, filter {other:?}")),
            }
            checked += 1;
        }
    }
    // like / ilike: the SQL pattern is the filter's with `*` spelled `%`.
    let like_cases: &[(&str, &str, &str)] = &[
        ("t", "like", "a%"),
        ("t", "like", "*b"),
        ("t", "ilike", "A*"),
        ("t", "like", "_"),
        ("t", "like", "%a%"),
        ("t", "like", ""),
        ("t", "ilike", "%É%"),
        ("t", "like", "% %"),
        ("t", "like", "%\\,%"),
        ("bc", "like", "ab"),
        ("bc", "like", "a_"),
        ("bc", "like", "ab%"),
        ("bc", "ilike", "A%"),
    ];
    // ilike folds case with Unicode rules, as a UTF-8 LC_CTYPE does; the test cluster is
    // initialized with the C locale, so evaluate ILIKE under a UTF-8 collation when the
    // cluster has one (otherwise only ASCII cases are meaningful).
    let utf8_collation: Option<String> = fx
        .client
        .query_opt(
            "SELECT collname::text FROM pg_collation
             WHERE collname IN ('C.utf8', 'C.UTF-8', 'en_US.utf8', 'en_US.UTF-8')
             ORDER BY collname LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    eprintln!("ilike evaluated under collation {utf8_collation:?}");
    for (col, op, pattern) in like_cases {
        let sql_op = if *op == "like" { "LIKE" } else { "ILIKE" };
        let sql_pattern = pattern.replace('*', "%");
        let lhs = match (&utf8_collation, *op) {
            (Some(c), "ilike") => format!("({col} COLLATE \"{c}\")"),
            (None, "ilike") if !pattern.is_ascii() => continue,
            _ => (*col).to_owned(),
        };
        let expr = format!("{lhs} {sql_op} $1::text");
        for (negate, sql) in [(false, expr.clone()), (true, format!("NOT ({expr})"))] {
            let not = if negate { "not." } else { "" };
            let filter = format!("{col}={not}{op}.{}", filter_constant(pattern));
            let want = fx.sql_ids(&sql, &[&sql_pattern]).await?;
            match fx.filter_ids(&filter) {
                Ok(got) if got == want => {}
                other => failures.push(format!("{filter}: sql {want:?}, filter {other:?}")),
            }
            checked += 1;
        }
    }
    // is / multi-condition filters, with their SQL spelled out.
    let fixed: &[(&str, &str)] = &[
        ("b=is.true", "b IS TRUE"),
        ("b=is.false", "b IS FALSE"),
        ("b=is.unknown", "b IS UNKNOWN"),
        ("b=not.is.true", "b IS NOT TRUE"),
        ("b=not.is.false", "b IS NOT FALSE"),
        ("i4=is.null", "i4 IS NULL"),
        ("tstz=not.is.null", "tstz IS NOT NULL"),
        ("m=is.null", "m IS NULL"),
        ("i4=gt.0,b=is.true", "i4 > 0 AND b IS TRUE"),
        ("t=neq.a, m=eq.ok", "t <> 'a' AND m = 'ok'"),
        (
            "num=gte.0,f8=lt.Infinity,d=not.eq.infinity",
            "num >= 0 AND f8 < 'Infinity' AND NOT (d = 'infinity')",
        ),
        (
            "i8=not.in.(0,10),t=not.is.null",
            "NOT (i8 = ANY('{0,10}')) AND t IS NOT NULL",
        ),
    ];
    for (filter, sql) in fixed {
        let want = fx.sql_ids(sql, &[]).await?;
        match fx.filter_ids(filter) {
            Ok(got) if got == want => {}
            other => failures.push(format!("{filter}: sql {want:?}, filter {other:?}")),
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} filters disagree with SQL:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

/// Values Postgres refuses to cast are refused at compile time too, naming column and type.
#[tokio::test]
async fn invalid_values_are_refused_like_sql() -> TestResult {
    let fx = fixture().await?;
    let cases: &[(&str, &str)] = &[
        ("i4", "abc"),
        ("i4", "2147483648"),
        ("i4", "1.5"),
        ("i8", "9223372036854775808"),
        ("num", "1.2.3"),
        ("num", "abc"),
        ("f8", "1e400"),
        ("f8", "x"),
        ("b", "maybe"),
        ("b", "o"),
        ("u", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"),
        ("u", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11x"),
        ("d", "2023-02-29"),
        ("d", "2024-13-01"),
        ("d", "0000-01-01"),
        ("ts", "2024-05-06 25:00:00"),
        ("tstz", "2024-05-06T07:08:09+99"),
    ];
    let mut failures = Vec::new();
    for (col, value) in cases {
        let sql = format!("SELECT $1::text::\"{}\"", fx.typname(col));
        let sql_refuses = fx.client.query(&sql, &[value]).await.is_err();
        let filter = format!("{col}=eq.{}", filter_constant(value));
        let ours = fx.filter_ids(&filter);
        let message_ok = match &ours {
            Err(e) => {
                let m = e.to_string();
                m.contains(col) && m.contains(value.trim()) && m.contains(fx.typname(col))
            }
            Ok(_) => false,
        };
        if !sql_refuses || !message_ok {
            failures.push(format!(
                "{filter}: sql refuses: {sql_refuses}, ours: {ours:?}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// A small deterministic generator (xorshift64*), so a failure names a reproducible case.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32;
        usize::try_from(x).unwrap_or(0) % n
    }

    fn string(&mut self, alphabet: &[char], max_len: usize) -> String {
        let len = self.below(max_len + 1);
        (0..len)
            .map(|_| alphabet[self.below(alphabet.len())])
            .collect()
    }
}

/// The filter's pattern in SQL: an unescaped `*` is `%`; escapes carry over as they are
/// (`\` escapes any character in SQL LIKE too).
fn sql_like_pattern(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' => out.push('%'),
            '\\' => {
                out.push('\\');
                out.extend(chars.next());
            }
            c => out.push(c),
        }
    }
    out
}

/// Random `like`/`ilike` patterns over a tiny alphabet against random values: the rows the
/// filter accepts are the rows SQL returns, and a pattern ending with a lone escape, which no
/// value can match in SQL (Postgres raises an error when a value reaches it), is refused at
/// compile time. The alphabets avoid characters whose lower case differs between
/// Rust's full Unicode mapping and libc's one-to-one `towlower` (`İ`, final `Σ`): there the
/// filter follows Rust, as documented in `filter`.
#[tokio::test]
async fn random_like_patterns_agree_with_sql() -> TestResult {
    const VALUES: usize = 60;
    const PATTERNS: usize = 300;
    let db = walcast_testkit::PgCluster::shared()
        .fresh_database()
        .await?;
    let client = db.connect().await?;
    client
        .batch_execute("CREATE TABLE lk (id int4 PRIMARY KEY, t text)")
        .await?;
    let mut rng = Rng(0x5eed_1ce0_fc0f_fee0);
    let text_chars = [
        'a', 'b', 'A', 'B', 'é', 'É', 'ß', 'ẞ', '%', '_', '*', '\\', ' ',
    ];
    let pattern_chars = ['a', 'b', 'A', 'É', 'ẞ', '%', '%', '*', '_', '_', '\\', ' '];
    let table = Arc::new(Table {
        relation_id: 1,
        schema: "public".into(),
        name: "lk".into(),
        replica_identity: ReplicaIdentity::Default,
        columns: vec![
            Column {
                name: "id".into(),
                type_name: "int4".into(),
                type_oid: 23,
                is_key: true,
            },
            Column {
                name: "t".into(),
                type_name: "text".into(),
                type_oid: 25,
                is_key: false,
            },
        ]
        .into(),
    });
    let mut changes = Vec::new();
    for id in 0..i32::try_from(VALUES)? {
        // Every tenth value NULL, and some long enough for runs past one 64-position block.
        let text = match id % 10 {
            0 => None,
            9 => Some(rng.string(&text_chars[..4], 150)),
            _ => Some(rng.string(&text_chars, 8)),
        };
        client
            .execute("INSERT INTO lk VALUES ($1, $2)", &[&id, &text])
            .await?;
        let value = |t: Option<&str>| match t {
            None => Value::Null,
            Some(t) => Value::Present {
                text: t.into(),
                json: "null".into(),
            },
        };
        changes.push((
            id,
            Change {
                table: table.clone(),
                kind: ChangeKind::Insert,
                commit_lsn: Lsn(1),
                index_in_txn: 0,
                xid: 0,
                commit_time_us: 0,
                record: Some(vec![value(Some(&id.to_string())), value(text.as_deref())]),
                old_record: None,
            },
        ));
    }
    let columns = [
        ColumnInfo {
            name: "id".into(),
            type_oid: 23,
        },
        ColumnInfo {
            name: "t".into(),
            type_oid: 25,
        },
    ];
    let types = TypeRegistry::new();
    let utf8_collation: Option<String> = client
        .query_opt(
            "SELECT collname::text FROM pg_collation
             WHERE collname IN ('C.utf8', 'C.UTF-8', 'en_US.utf8', 'en_US.UTF-8')
             ORDER BY collname LIMIT 1",
            &[],
        )
        .await?
        .map(|r| r.get(0));

    let mut failures = Vec::new();
    let (mut checked, mut nonempty, mut refused) = (0usize, 0usize, 0usize);
    for i in 0..PATTERNS {
        // Some patterns are long runs of `a`/`b`/`_` (several 64-position blocks).
        let pattern = if i % 10 == 9 {
            format!("%{}%", rng.string(&['a', 'b', '_'], 140))
        } else {
            rng.string(&pattern_chars, 7)
        };
        for op in ["like", "ilike"] {
            let lhs = match (&utf8_collation, op) {
                (Some(c), "ilike") => format!("(t COLLATE \"{c}\")"),
                (None, "ilike") if !pattern.is_ascii() => continue,
                _ => "t".to_owned(),
            };
            let sql = format!(
                "SELECT id FROM lk WHERE {lhs} {} $1 ORDER BY id",
                op.to_uppercase()
            );
            let want: Result<Vec<i32>, _> = client
                .query(&sql, &[&sql_like_pattern(&pattern)])
                .await
                .map(|rows| rows.iter().map(|r| r.get(0)).collect());
            let filter = format!("t={op}.{}", filter_constant(&pattern));
            let got: Result<Vec<i32>, _> = filter::parse(&filter)
                .and_then(|f| f.compile(&columns, &types))
                .map(|compiled| {
                    changes
                        .iter()
                        .filter(|(_, c)| compiled.matches(c))
                        .map(|(id, _)| *id)
                        .collect()
                });
            match (&want, &got) {
                (Ok(w), Ok(g)) if w == g => nonempty += usize::from(!w.is_empty()),
                // A trailing escape: Postgres raises an error only when a value gets that far
                // in the pattern, so no value can ever match; the filter refuses it up front.
                (Err(_) | Ok(_), Err(filter::FilterError::PatternEndsWithEscape { .. }))
                    if want.as_ref().map_or(true, Vec::is_empty) =>
                {
                    refused += 1
                }
                _ => failures.push(format!(
                    "{filter} (sql {:?}): sql {want:?}, filter {got:?}",
                    sql_like_pattern(&pattern)
                )),
            }
            checked += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} patterns disagree with SQL:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!(
        "{checked} random patterns agree with SQL ({nonempty} non-empty, {refused} ending with \
         an escape; ilike under collation {utf8_collation:?})"
    );
    assert!(
        nonempty * 4 > checked,
        "only {nonempty} of {checked} matched a row"
    );
    Ok(())
}
