//! The `postgres_changes` row filter: PostgREST-like grammar, compiled against a table's
//! columns at subscribe time, evaluated against each change's row image.
//!
//! ```text
//!  join config "filter" ──parse()──▶ Filter (syntax only)
//!                                      │ compile(columns from the catalog, type registry)
//!                                      ▼
//!                              CompiledFilter (typed constants, checked operators)
//!                                      │ matches(&Change)   (hot path: no SQL, no allocation
//!                                      ▼                     beyond what a value parse needs)
//!                                    bool
//! ```
//!
//! # Grammar
//!
//! ```text
//! filter     = ws* | condition ( "," condition )*        (empty/whitespace-only: no filter)
//! condition  = column "=" [ "not." ] operation            (column: text before the first "=",
//!                                                           surrounding whitespace trimmed)
//! operation  = cmp_op "." value
//!            | "in." "(" [ item ( "," item )* ] ")"        (at most 100 items)
//!            | "is." ( "null" | "true" | "false" | "unknown" )   (case-insensitive)
//!            | ( "like" | "ilike" ) "." value              (% or * = any run, _ = one char,
//!                                                           \ escapes the next char)
//!            | "isdistinct." value
//! cmp_op     = "eq" | "neq" | "lt" | "lte" | "gt" | "gte"
//! value      = quoted | raw                                (raw: the rest of the condition)
//! item       = quoted | raw_item                           (raw_item: trimmed; unquoted `null`,
//!                                                           any case, is SQL NULL as in an
//!                                                           array literal)
//! quoted     = '"' ( '\' any | not-'"' )* '"'              (backslash escapes any char)
//! ```
//!
//! Conditions are split on `,` except inside `( … )` or `" … "`; they are ANDed. An empty
//! condition (`a=eq.1,,b=eq.2`, a trailing comma) is an error. Each condition is trimmed, so
//! a value that must keep leading or trailing spaces has to be quoted. `match`/`imatch` (regular
//! expressions) are recognised and refused with a clear error: Postgres's ARE dialect is not
//! something we can reproduce faithfully, and a filter that silently disagrees with SQL is
//! worse than one that is refused.
//!
//! # Evaluation
//!
//! - INSERT and UPDATE are evaluated against `record`, DELETE against `old_record` (the
//!   identity columns, or the whole row under `REPLICA IDENTITY FULL`). TRUNCATE never matches.
//!   For UPDATE, a column the new image does not carry (unchanged TOAST) is taken from
//!   `old_record` when that image has it.
//! - Columns are looked up by name in the change's *current* table, so DDL after compile is
//!   harmless: a column that is gone, or a value the image does not carry
//!   ([`Value::Missing`], [`Value::UnchangedToast`]), fails the match. A value whose text no
//!   longer parses as the compiled type (the column's type changed) fails the match too.
//! - SQL three-valued logic: every condition yields true, false or NULL, and the filter
//!   matches only when all are true. A comparison with NULL is NULL, and `not.` of NULL is
//!   still NULL (no match). `is` and `isdistinct` never yield NULL, so their negations are
//!   plain negations. `in` follows `x = ANY(array)`: true if any item equals, else NULL if `x`
//!   or an item is NULL, else false; an empty list is false.
//! - Typed comparison by the column's type (domains resolved to their base):
//!   - `int2/int4/int8`: exact `i64`, values range-checked for the column's width.
//!   - `numeric`: an exact decimal comparator over normalized digit strings (no `f64`, any
//!     number of digits, exponent notation accepted); `NaN` equals itself and sorts above
//!     `Infinity`, as in Postgres.
//!   - `float4/float8`: IEEE values (a `float4` constant is rounded to `f32` like the SQL cast
//!     would), with Postgres's total order: `NaN = NaN` and NaN is the greatest, `-0 = 0`.
//!   - `bool`: every spelling `boolin` accepts; `false < true`.
//!   - `text`, `varchar`, `name`, `"char"`: bytewise, i.e. the `C` collation. Databases whose
//!     default collation is linguistic order text differently for `lt/gt`; equality agrees.
//!     `bpchar` ignores trailing spaces on both sides as Postgres does; `citext` compares
//!     lower-cased text.
//!   - `uuid`: as 128-bit integers (case and hyphen placement do not matter).
//!   - `date`, `timestamp`, `timestamptz`: microseconds (with `±infinity`), accepting the ISO
//!     text the stream carries (`2024-05-06 07:08:09.123456+00`, `… BC`) and what people type
//!     (`2024-05-06`, `2024-05-06T07:08:09Z`, `… +02:00`, fractional seconds). A `timestamptz`
//!     constant without an offset is read as UTC (the server's session time zone); an offset
//!     on a `timestamp` constant is ignored, as Postgres ignores it.
//!   - enums: `eq/neq/in/isdistinct` compare labels; ordering is refused at compile (label
//!     order lives in `pg_enum`, which the filter does not see).
//!   - everything else (json, jsonb, arrays, ranges, composites, bytea, interval, inet, …):
//!     `eq/neq/in/isdistinct` compare the Postgres text form exactly; ordering is refused.
//!     `json` has no equality operator in Postgres, so only `is` is accepted on it.
//!   - `like/ilike`: text-like columns only, matched against the text as stored (a `bpchar`
//!     keeps its padding, as `bpcharlike` does); `ilike` lower-cases both sides with Unicode
//!     case mapping, which is what a UTF-8 `LC_CTYPE` does (a database with `LC_CTYPE=C`
//!     only folds ASCII letters).
//!
//! Invariants: parsing and evaluation never panic on any input (everything here is external
//! input: the filter comes from a client, the values from the WAL); nothing is indexed
//! unchecked; exact types never go through floating point; pattern matching is
//! O(pattern × value), never exponential.

use std::cmp::Ordering;
use std::fmt;

use crate::change::{Change, ChangeKind, Value};
use crate::pg_type::{Oid, TypeKind, TypeRegistry};

/// Largest number of items in an `in.(…)` list (Supabase's limit).
pub const MAX_IN_VALUES: usize = 100;

/// Why a filter was refused. The `Display` text is meant for the client: the server puts it
/// after ``Error parsing `filter` params: `` or after `Exception: ` in a `system` message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    /// A condition between commas is empty.
    #[error("empty condition at position {position} (conditions are `column=operator.value`, separated by `,`)")]
    EmptyCondition { position: usize },
    /// No `=` between column and operator.
    #[error("invalid condition `{condition}`: expected `column=operator.value`")]
    MissingEquals { condition: String },
    /// Nothing before `=`.
    #[error("invalid condition `{condition}`: the column name is empty")]
    EmptyColumn { condition: String },
    /// No `.` after the operator.
    #[error("invalid condition `{condition}`: expected `operator.value` after `=`")]
    MissingValue { condition: String },
    /// An operator we do not know.
    #[error("unknown operator `{operator}` (supported: eq, neq, lt, lte, gt, gte, in, like, ilike, is, isdistinct, each optionally prefixed with `not.`)")]
    UnknownOperator { operator: String },
    /// An operator we know but refuse.
    #[error("operator `{operator}` (regular expression) is not supported; use `like` or `ilike`")]
    UnsupportedOperator { operator: String },
    /// `in` without its parentheses, or with text after them.
    #[error("invalid `in` filter `{value}`: values must be in parentheses, e.g. `in.(1,2,3)`")]
    InList { value: String },
    /// An empty unquoted item in an `in` list (`(a,,b)`).
    #[error("invalid `in` filter `{value}`: empty value in the list (quote it as `\"\"` for an empty string)")]
    EmptyInItem { value: String },
    /// More than [`MAX_IN_VALUES`] items.
    #[error("too many values for `in` filter. Maximum 100")]
    TooManyInValues,
    /// A `"` without its closing partner.
    #[error("unterminated quoted value in filter `{condition}`")]
    UnterminatedQuote { condition: String },
    /// Text after a closing quote.
    #[error("unexpected text after the quoted value in `{condition}`")]
    TrailingAfterQuote { condition: String },
    /// `is.` with something else than null/true/false/unknown.
    #[error("invalid value `{value}` for `is`: expected null, true, false or unknown")]
    InvalidIsValue { value: String },
    /// A `like`/`ilike` pattern ending with a lone backslash.
    #[error("invalid pattern `{pattern}`: a pattern must not end with the escape character `\\`")]
    PatternEndsWithEscape { pattern: String },
    /// The column is not in the table (or not visible).
    #[error("invalid column for filter {column}")]
    UnknownColumn { column: String },
    /// The value does not parse as the column's type.
    #[error("invalid value `{value}` for column `{column}` of type {type_name}")]
    InvalidValue {
        column: String,
        value: String,
        type_name: String,
    },
    /// The operator makes no sense for the column's type.
    #[error(
        "operator `{operator}` is not supported on column `{column}` of type {type_name}{hint}"
    )]
    OperatorNotSupported {
        operator: String,
        column: String,
        type_name: String,
        /// Either empty or starting with `: ` (what to use instead).
        hint: &'static str,
    },
}

/// Comparison operators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmpOp {
    Eq,
    Neq,
    Lt,
    Lte,
    Gt,
    Gte,
}

impl CmpOp {
    fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Neq => "neq",
            CmpOp::Lt => "lt",
            CmpOp::Lte => "lte",
            CmpOp::Gt => "gt",
            CmpOp::Gte => "gte",
        }
    }

    fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Neq)
    }

    fn holds(self, ord: Ordering) -> bool {
        match self {
            CmpOp::Eq => ord == Ordering::Equal,
            CmpOp::Neq => ord != Ordering::Equal,
            CmpOp::Lt => ord == Ordering::Less,
            CmpOp::Lte => ord != Ordering::Greater,
            CmpOp::Gt => ord == Ordering::Greater,
            CmpOp::Gte => ord != Ordering::Less,
        }
    }
}

/// The right-hand side of `is.`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IsValue {
    Null,
    True,
    False,
    Unknown,
}

/// One item of an `in` list: a value, or an unquoted `null`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InItem {
    Null,
    Value(String),
}

/// A parsed (not yet typed) operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    Cmp(CmpOp, String),
    In(Vec<InItem>),
    Is(IsValue),
    Like(String),
    ILike(String),
    IsDistinct(String),
}

impl Operation {
    fn name(&self) -> &'static str {
        match self {
            Operation::Cmp(op, _) => op.name(),
            Operation::In(_) => "in",
            Operation::Is(_) => "is",
            Operation::Like(_) => "like",
            Operation::ILike(_) => "ilike",
            Operation::IsDistinct(_) => "isdistinct",
        }
    }
}

/// One `column=[not.]op.value` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub column: String,
    pub negate: bool,
    pub op: Operation,
}

/// A syntactically valid filter: conditions to be ANDed. Empty means "no filter".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    pub conditions: Vec<Condition>,
}

/// Parse a filter string (syntax only; see the module docs for the grammar).
pub fn parse(filter: &str) -> Result<Filter, FilterError> {
    if filter.trim().is_empty() {
        return Ok(Filter::default());
    }
    let mut conditions = Vec::new();
    for (i, segment) in split_conditions(filter)?.into_iter().enumerate() {
        let segment = segment.trim();
        if segment.is_empty() {
            return Err(FilterError::EmptyCondition { position: i + 1 });
        }
        conditions.push(parse_condition(segment)?);
    }
    Ok(Filter { conditions })
}

/// Split on top-level commas: not inside `( … )` nor `" … "`.
fn split_conditions(filter: &str) -> Result<Vec<&str>, FilterError> {
    let mut out = Vec::new();
    let mut depth: usize = 0;
    let mut in_quote = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in filter.char_indices() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_quote = false;
            }
            continue;
        }
        match c {
            '"' => in_quote = true,
            '(' => depth += 1,
            // A stray `)` is just a character of a value; saturate rather than go negative.
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&filter[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if in_quote {
        return Err(FilterError::UnterminatedQuote {
            condition: filter[start..].trim().to_owned(),
        });
    }
    out.push(&filter[start..]);
    Ok(out)
}

fn parse_condition(segment: &str) -> Result<Condition, FilterError> {
    let Some((column, rest)) = segment.split_once('=') else {
        return Err(FilterError::MissingEquals {
            condition: segment.to_owned(),
        });
    };
    let column = column.trim();
    if column.is_empty() {
        return Err(FilterError::EmptyColumn {
            condition: segment.to_owned(),
        });
    }
    let missing_value = || FilterError::MissingValue {
        condition: segment.to_owned(),
    };
    let (mut op, mut value) = rest.split_once('.').ok_or_else(missing_value)?;
    let mut negate = false;
    if op == "not" {
        negate = true;
        (op, value) = value.split_once('.').ok_or_else(missing_value)?;
    }
    let operation = match op {
        "eq" => Operation::Cmp(CmpOp::Eq, unquote(value, segment)?),
        "neq" => Operation::Cmp(CmpOp::Neq, unquote(value, segment)?),
        "lt" => Operation::Cmp(CmpOp::Lt, unquote(value, segment)?),
        "lte" => Operation::Cmp(CmpOp::Lte, unquote(value, segment)?),
        "gt" => Operation::Cmp(CmpOp::Gt, unquote(value, segment)?),
        "gte" => Operation::Cmp(CmpOp::Gte, unquote(value, segment)?),
        "like" => Operation::Like(unquote(value, segment)?),
        "ilike" => Operation::ILike(unquote(value, segment)?),
        "isdistinct" => Operation::IsDistinct(unquote(value, segment)?),
        "in" => Operation::In(parse_in_list(value, segment)?),
        "is" => Operation::Is(match value.trim().to_ascii_lowercase().as_str() {
            "null" => IsValue::Null,
            "true" => IsValue::True,
            "false" => IsValue::False,
            "unknown" => IsValue::Unknown,
            _ => {
                return Err(FilterError::InvalidIsValue {
                    value: value.to_owned(),
                })
            }
        }),
        "match" | "imatch" => {
            return Err(FilterError::UnsupportedOperator {
                operator: op.to_owned(),
            })
        }
        _ => {
            return Err(FilterError::UnknownOperator {
                operator: op.to_owned(),
            })
        }
    };
    Ok(Condition {
        column: column.to_owned(),
        negate,
        op: operation,
    })
}

/// A whole value: quoted (escapes resolved) or raw (verbatim).
fn unquote(value: &str, condition: &str) -> Result<String, FilterError> {
    if !value.starts_with('"') {
        return Ok(value.to_owned());
    }
    let (text, rest) = read_quoted(value, condition)?;
    if !rest.trim().is_empty() {
        return Err(FilterError::TrailingAfterQuote {
            condition: condition.to_owned(),
        });
    }
    Ok(text)
}

/// Reads a quoted string at the start of `s` (which starts with `"`); returns the unescaped
/// text and what follows the closing quote.
fn read_quoted<'a>(s: &'a str, condition: &str) -> Result<(String, &'a str), FilterError> {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((_, c)) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some((_, e)) => out.push(e),
                None => break,
            },
            '"' => {
                let rest = match chars.next() {
                    Some((j, _)) => s.get(j..).unwrap_or(""),
                    None => "",
                };
                return Ok((out, rest));
            }
            _ => out.push(c),
        }
    }
    Err(FilterError::UnterminatedQuote {
        condition: condition.to_owned(),
    })
}

fn parse_in_list(value: &str, condition: &str) -> Result<Vec<InItem>, FilterError> {
    let trimmed = value.trim();
    let inner = trimmed
        .strip_prefix('(')
        .and_then(|v| v.strip_suffix(')'))
        .ok_or_else(|| FilterError::InList {
            value: value.to_owned(),
        })?;
    let mut items = Vec::new();
    if inner.trim().is_empty() {
        return Ok(items);
    }
    let mut rest = inner;
    loop {
        if items.len() == MAX_IN_VALUES {
            return Err(FilterError::TooManyInValues);
        }
        let lead = rest.trim_start();
        let (item, after) = if lead.starts_with('"') {
            let (text, after) = read_quoted(lead, condition)?;
            let after = after.trim_start();
            if !(after.is_empty() || after.starts_with(',')) {
                return Err(FilterError::TrailingAfterQuote {
                    condition: condition.to_owned(),
                });
            }
            (InItem::Value(text), after)
        } else {
            let end = lead.find(',').unwrap_or(lead.len());
            let raw = lead.get(..end).unwrap_or("").trim();
            if raw.is_empty() {
                return Err(FilterError::EmptyInItem {
                    value: value.to_owned(),
                });
            }
            let item = if raw.eq_ignore_ascii_case("null") {
                InItem::Null
            } else {
                InItem::Value(raw.to_owned())
            };
            (item, lead.get(end..).unwrap_or(""))
        };
        items.push(item);
        match after.strip_prefix(',') {
            Some(next) => rest = next,
            None => break,
        }
    }
    Ok(items)
}

/// A column as the catalog describes it at join time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnInfo {
    pub name: String,
    pub type_oid: u32,
}

impl Filter {
    /// True when there are no conditions (every row matches).
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Type-check the filter against a table's columns and turn every constant into a typed
    /// value. All errors a client can cause surface here, at subscribe time.
    pub fn compile(
        &self,
        columns: &[ColumnInfo],
        types: &TypeRegistry,
    ) -> Result<CompiledFilter, FilterError> {
        let mut conditions = Vec::with_capacity(self.conditions.len());
        for cond in &self.conditions {
            let Some(col) = columns.iter().find(|c| c.name == cond.column) else {
                return Err(FilterError::UnknownColumn {
                    column: cond.column.clone(),
                });
            };
            conditions.push(compile_condition(cond, col, types)?);
        }
        Ok(CompiledFilter { conditions })
    }
}

/// How values of a column compare. Chosen once at compile time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Int {
        min: i64,
        max: i64,
    },
    Numeric,
    Float4,
    Float8,
    Bool,
    /// text, varchar, name, "char": bytewise.
    Text,
    /// bpchar: bytewise without trailing spaces.
    Bpchar,
    /// citext: lower-cased.
    CiText,
    Uuid,
    Date,
    Timestamp,
    Timestamptz,
    Enum,
    /// json: no equality operator in Postgres.
    Json,
    /// Everything else: exact text form, equality only.
    Opaque,
}

impl Class {
    fn ordered(self) -> bool {
        !matches!(self, Class::Enum | Class::Json | Class::Opaque)
    }

    fn text_like(self) -> bool {
        matches!(self, Class::Text | Class::Bpchar | Class::CiText)
    }
}

const OID_CHAR: Oid = 18;
const OID_NAME: Oid = 19;
const OID_INT2: Oid = 21;
const OID_INT4: Oid = 23;
const OID_TEXT: Oid = 25;
const OID_FLOAT4: Oid = 700;
const OID_BPCHAR: Oid = 1042;
const OID_VARCHAR: Oid = 1043;
const OID_UUID: Oid = 2950;

/// The comparison class and the display name of a column type (domains resolved).
fn classify(oid: Oid, types: &TypeRegistry) -> (Class, String) {
    let display = types
        .get(oid)
        .map(|t| t.name.clone())
        .unwrap_or_else(|| format!("oid {oid}"));
    let mut oid = oid;
    // Domains can stack; a bound keeps a corrupt (cyclic) registry from looping forever.
    for _ in 0..32 {
        let Some(info) = types.get(oid) else {
            return (Class::Opaque, display);
        };
        let class = match &info.kind {
            TypeKind::Domain { base } => {
                oid = *base;
                continue;
            }
            TypeKind::Bool => Class::Bool,
            TypeKind::Int => match oid {
                OID_INT2 => Class::Int {
                    min: i16::MIN.into(),
                    max: i16::MAX.into(),
                },
                OID_INT4 => Class::Int {
                    min: i32::MIN.into(),
                    max: i32::MAX.into(),
                },
                // int8
                _ => Class::Int {
                    min: i64::MIN,
                    max: i64::MAX,
                },
            },
            TypeKind::Numeric => Class::Numeric,
            TypeKind::Float if oid == OID_FLOAT4 => Class::Float4,
            TypeKind::Float => Class::Float8,
            TypeKind::Date => Class::Date,
            TypeKind::Timestamp => Class::Timestamp,
            TypeKind::Timestamptz => Class::Timestamptz,
            TypeKind::Enum => Class::Enum,
            TypeKind::Json => Class::Json,
            TypeKind::Text => match oid {
                OID_TEXT | OID_VARCHAR | OID_NAME | OID_CHAR => Class::Text,
                OID_BPCHAR => Class::Bpchar,
                OID_UUID => Class::Uuid,
                _ if info.name == "citext" => Class::CiText,
                _ => Class::Opaque,
            },
            _ => Class::Opaque,
        };
        return (class, display);
    }
    (Class::Opaque, display)
}

/// A typed constant or column value.
#[derive(Debug, Clone, PartialEq)]
enum Scalar {
    Int(i64),
    Numeric(Decimal),
    Float(f64),
    Bool(bool),
    /// Text-like, enum and opaque values, already normalized for their class.
    Text(Box<str>),
    Uuid(u128),
    Time(Instant),
}

/// Parse text as a value of `class`. `None` when it does not parse.
fn parse_scalar(class: Class, text: &str) -> Option<Scalar> {
    match class {
        Class::Int { min, max } => {
            let v = parse_int(text)?;
            (min..=max).contains(&v).then_some(Scalar::Int(v))
        }
        Class::Numeric => Decimal::parse(text).map(Scalar::Numeric),
        Class::Float4 => parse_float(text, true).map(Scalar::Float),
        Class::Float8 => parse_float(text, false).map(Scalar::Float),
        Class::Bool => parse_bool(text).map(Scalar::Bool),
        Class::Text | Class::Enum | Class::Json | Class::Opaque => Some(Scalar::Text(text.into())),
        Class::Bpchar => Some(Scalar::Text(text.trim_end_matches(' ').into())),
        Class::CiText => Some(Scalar::Text(text.to_lowercase().into())),
        Class::Uuid => parse_uuid(text).map(Scalar::Uuid),
        Class::Date => parse_datetime(text, DateMode::Date).map(Scalar::Time),
        Class::Timestamp => parse_datetime(text, DateMode::Timestamp).map(Scalar::Time),
        Class::Timestamptz => parse_datetime(text, DateMode::Timestamptz).map(Scalar::Time),
    }
}

/// Compare two values of the same class. `None` when the kinds do not line up (never for
/// values produced by [`parse_scalar`] with the same class).
fn compare(a: &Scalar, b: &Scalar) -> Option<Ordering> {
    Some(match (a, b) {
        (Scalar::Int(x), Scalar::Int(y)) => x.cmp(y),
        (Scalar::Numeric(x), Scalar::Numeric(y)) => x.cmp(y),
        (Scalar::Float(x), Scalar::Float(y)) => pg_float_cmp(*x, *y),
        (Scalar::Bool(x), Scalar::Bool(y)) => x.cmp(y),
        (Scalar::Text(x), Scalar::Text(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Scalar::Uuid(x), Scalar::Uuid(y)) => x.cmp(y),
        (Scalar::Time(x), Scalar::Time(y)) => x.cmp(y),
        _ => return None,
    })
}

/// Postgres's float order: NaN equals NaN and is above everything; -0 equals 0.
fn pg_float_cmp(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

#[derive(Debug, Clone)]
enum Test {
    Cmp(CmpOp, Scalar),
    /// Items; `None` is a NULL item.
    In(Vec<Option<Scalar>>),
    IsNull,
    IsBool(bool),
    IsDistinct(Scalar),
    Like {
        pattern: Vec<LikeTok>,
        fold: bool,
    },
}

#[derive(Debug, Clone)]
struct CompiledCondition {
    column: Box<str>,
    class: Class,
    negate: bool,
    test: Test,
}

/// A filter checked against a table: evaluate it with [`CompiledFilter::matches`].
#[derive(Debug, Clone)]
pub struct CompiledFilter {
    conditions: Vec<CompiledCondition>,
}

fn compile_condition(
    cond: &Condition,
    col: &ColumnInfo,
    types: &TypeRegistry,
) -> Result<CompiledCondition, FilterError> {
    let (class, type_name) = classify(col.type_oid, types);
    let refuse = |hint: &'static str| FilterError::OperatorNotSupported {
        operator: cond.op.name().to_owned(),
        column: col.name.clone(),
        type_name: type_name.clone(),
        hint,
    };
    let value = |text: &str| {
        parse_scalar(class, text).ok_or_else(|| FilterError::InvalidValue {
            column: col.name.clone(),
            value: text.to_owned(),
            type_name: type_name.clone(),
        })
    };
    let equality_hint = match class {
        Class::Json => ": json has no equality operator; only `is` is supported",
        _ => ": only eq, neq, in, isdistinct and is are supported",
    };
    let test = match &cond.op {
        Operation::Is(IsValue::Null) => Test::IsNull,
        Operation::Is(is) => {
            if class != Class::Bool {
                return Err(refuse(
                    ": `is.true`, `is.false` and `is.unknown` need a boolean column; use `is.null`",
                ));
            }
            match is {
                IsValue::True => Test::IsBool(true),
                IsValue::False => Test::IsBool(false),
                // `x IS UNKNOWN` is `x IS NULL` for booleans.
                IsValue::Unknown | IsValue::Null => Test::IsNull,
            }
        }
        _ if class == Class::Json => return Err(refuse(equality_hint)),
        Operation::Cmp(op, text) => {
            if op.is_ordering() && !class.ordered() {
                return Err(refuse(equality_hint));
            }
            Test::Cmp(*op, value(text)?)
        }
        Operation::In(items) => Test::In(
            items
                .iter()
                .map(|item| match item {
                    InItem::Null => Ok(None),
                    InItem::Value(text) => value(text).map(Some),
                })
                .collect::<Result<_, _>>()?,
        ),
        Operation::IsDistinct(text) => Test::IsDistinct(value(text)?),
        Operation::Like(pattern) | Operation::ILike(pattern) => {
            if !class.text_like() {
                return Err(refuse(": like and ilike need a text column"));
            }
            let fold = matches!(cond.op, Operation::ILike(_)) || class == Class::CiText;
            Test::Like {
                pattern: compile_like(pattern, fold)?,
                fold,
            }
        }
    };
    Ok(CompiledCondition {
        column: col.name.as_str().into(),
        class,
        negate: cond.negate,
        test,
    })
}

impl CompiledFilter {
    /// A filter that accepts every row.
    pub fn accept_all() -> Self {
        Self {
            conditions: Vec::new(),
        }
    }

    /// True when there are no conditions.
    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// Number of conditions.
    pub fn len(&self) -> usize {
        self.conditions.len()
    }

    /// Does the change's row image satisfy every condition? See the module docs.
    pub fn matches(&self, change: &Change) -> bool {
        let (row, fallback) = match change.kind {
            ChangeKind::Insert => (change.record.as_deref(), None),
            ChangeKind::Update => (change.record.as_deref(), change.old_record.as_deref()),
            ChangeKind::Delete => (change.old_record.as_deref(), None),
            ChangeKind::Truncate => return false,
        };
        if self.conditions.is_empty() {
            return true;
        }
        let Some(row) = row else {
            return false;
        };
        self.conditions.iter().all(|cond| {
            let Some(idx) = change.column_index(&cond.column) else {
                return false;
            };
            let mut value = row.get(idx);
            if !value.is_some_and(Value::is_known) {
                value = fallback.and_then(|old| old.get(idx));
            }
            match value {
                Some(v @ (Value::Null | Value::Present { .. })) => {
                    cond.eval(v.text()) == Some(true)
                }
                _ => false,
            }
        })
    }
}

impl CompiledCondition {
    /// Three-valued result: `None` is SQL NULL.
    fn eval(&self, text: Option<&str>) -> Option<bool> {
        if let Test::Like { pattern, fold } = &self.test {
            // LIKE sees the value as stored: a bpchar keeps its padding (Postgres's
            // bpcharlike does not strip it, unlike bpchar comparison).
            let t = text?;
            let hit = if *fold {
                like_match(pattern, &t.to_lowercase())
            } else {
                like_match(pattern, t)
            };
            return Some(hit != self.negate);
        }
        // A value that no longer parses as the compiled type (the column's type changed
        // since subscribe) cannot be compared: treat it as no match, whatever the negation.
        let value = match text {
            Some(t) => match parse_scalar(self.class, t) {
                Some(v) => Some(v),
                None => return None,
            },
            None => None,
        };
        let result = match &self.test {
            Test::IsNull => Some(value.is_none()),
            Test::IsBool(want) => Some(matches!(value, Some(Scalar::Bool(b)) if b == *want)),
            Test::IsDistinct(c) => Some(match &value {
                None => true,
                Some(v) => compare(v, c) != Some(Ordering::Equal),
            }),
            Test::Cmp(op, c) => {
                let v = value?;
                Some(op.holds(compare(&v, c)?))
            }
            Test::In(items) => {
                if items.is_empty() {
                    Some(false)
                } else {
                    let v = value?;
                    let mut saw_null = false;
                    let mut hit = false;
                    for item in items {
                        match item {
                            None => saw_null = true,
                            Some(c) if compare(&v, c) == Some(Ordering::Equal) => {
                                hit = true;
                                break;
                            }
                            Some(_) => {}
                        }
                    }
                    if hit {
                        Some(true)
                    } else if saw_null {
                        None
                    } else {
                        Some(false)
                    }
                }
            }
            // Handled above, before the value is normalized.
            Test::Like { .. } => None,
        };
        if self.negate {
            result.map(|b| !b)
        } else {
            result
        }
    }
}

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---------------------------------------------------------------------------------------
// LIKE

#[derive(Debug, Clone, PartialEq, Eq)]
enum LikeTok {
    Lit(char),
    One,
    Any,
}

fn compile_like(pattern: &str, fold: bool) -> Result<Vec<LikeTok>, FilterError> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' | '*' => {
                // Consecutive `%` are one `%`; keeps the matcher's backtracking simple.
                if out.last() != Some(&LikeTok::Any) {
                    out.push(LikeTok::Any);
                }
            }
            '_' => out.push(LikeTok::One),
            '\\' => match chars.next() {
                Some(e) => push_lit(&mut out, e, fold),
                None => {
                    return Err(FilterError::PatternEndsWithEscape {
                        pattern: pattern.to_owned(),
                    })
                }
            },
            _ => push_lit(&mut out, c, fold),
        }
    }
    Ok(out)
}

fn push_lit(out: &mut Vec<LikeTok>, c: char, fold: bool) {
    if fold {
        out.extend(c.to_lowercase().map(LikeTok::Lit));
    } else {
        out.push(LikeTok::Lit(c));
    }
}

/// Wildcard match with one backtrack point (the last `%`): O(pattern × text), and correct
/// for patterns made of literals, `_` and `%` only.
fn like_match(pattern: &[LikeTok], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(LikeTok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(LikeTok::One) => {
                p += 1;
                t += 1;
            }
            Some(LikeTok::Lit(c)) if text.get(t) == Some(c) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|tok| *tok == LikeTok::Any))
}

// ---------------------------------------------------------------------------------------
// Scalars: integers, floats, booleans, uuids

/// `int8in`-style: optional whitespace, sign, decimal digits.
fn parse_int(text: &str) -> Option<i64> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let digits = t.strip_prefix(['+', '-']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // i64's parser accepts exactly this shape (including i64::MIN), with overflow checks.
    t.parse().ok()
}

/// `float8in`/`float4in`: decimal or exponent notation, `NaN`, `[+-]Infinity`/`inf`.
/// Finite input that overflows is an error, as in Postgres.
fn parse_float(text: &str, single: bool) -> Option<f64> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let unsigned = t.strip_prefix(['+', '-']).unwrap_or(t);
    let special = unsigned.eq_ignore_ascii_case("infinity")
        || unsigned.eq_ignore_ascii_case("inf")
        || (unsigned.eq_ignore_ascii_case("nan") && unsigned.len() == t.len());
    if !special
        && !unsigned
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
    {
        return None;
    }
    let v = if single {
        f64::from(t.parse::<f32>().ok()?)
    } else {
        t.parse::<f64>().ok()?
    };
    (special || v.is_finite()).then_some(v)
}

/// `boolin`: t/true/y/yes/on/1 and f/false/n/no/off/0, any case, unique prefixes of the
/// words accepted.
fn parse_bool(text: &str) -> Option<bool> {
    let t = text
        .trim_matches(|c: char| c.is_ascii_whitespace())
        .to_ascii_lowercase();
    let prefix_of = |word: &str| !t.is_empty() && word.starts_with(t.as_str());
    if prefix_of("true") || prefix_of("yes") || t == "1" || (t.len() >= 2 && prefix_of("on")) {
        Some(true)
    } else if prefix_of("false")
        || prefix_of("no")
        || t == "0"
        || (t.len() >= 2 && prefix_of("off"))
    {
        Some(false)
    } else {
        None
    }
}

/// `uuid_in`: 32 hex digits, optionally braced, a hyphen allowed after any group of four.
fn parse_uuid(text: &str) -> Option<u128> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let t = match t.strip_prefix('{') {
        Some(inner) => inner.strip_suffix('}')?,
        None => t,
    };
    let mut v: u128 = 0;
    let mut n = 0usize;
    let mut prev_hyphen = true;
    for c in t.chars() {
        if c == '-' {
            // Only between groups of four digits, never doubled, never first.
            if prev_hyphen || n % 4 != 0 || n == 32 {
                return None;
            }
            prev_hyphen = true;
            continue;
        }
        let d = c.to_digit(16)?;
        if n == 32 {
            return None;
        }
        v = (v << 4) | u128::from(d);
        n += 1;
        prev_hyphen = false;
    }
    (n == 32 && !t.ends_with('-')).then_some(v)
}

// ---------------------------------------------------------------------------------------
// Exact decimals

/// An exact `numeric` value. Finite values are `0.d1d2…dn × 10^exp` with `d1 ≠ 0` and
/// `dn ≠ 0` (zero has no digits), so equal numbers have equal representations and order is
/// a comparison of (sign, exponent, digit string).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decimal {
    kind: DecimalKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum DecimalKind {
    NegInfinity,
    Finite {
        negative: bool,
        exp: i64,
        digits: Box<[u8]>,
    },
    Infinity,
    NaN,
}

/// Exponents beyond this are refused: far outside numeric's range, and it keeps the
/// exponent arithmetic trivially overflow-free.
const MAX_EXPONENT: i64 = 1_000_000;

impl Decimal {
    /// Parse `numeric_in` text: `[+-]digits[.digits][e[+-]digits]`, `.5`, `5.`, `NaN`,
    /// `[+-]Infinity`/`inf`, surrounded by optional whitespace. `None` when it is not one.
    pub fn parse(text: &str) -> Option<Decimal> {
        let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
        if t.eq_ignore_ascii_case("nan") {
            return Some(Decimal {
                kind: DecimalKind::NaN,
            });
        }
        let (negative, body) = match t.as_bytes().first() {
            Some(b'-') => (true, t.get(1..)?),
            Some(b'+') => (false, t.get(1..)?),
            _ => (false, t),
        };
        if body.eq_ignore_ascii_case("infinity") || body.eq_ignore_ascii_case("inf") {
            return Some(Decimal {
                kind: if negative {
                    DecimalKind::NegInfinity
                } else {
                    DecimalKind::Infinity
                },
            });
        }
        let (mantissa, exp_part) = match body.find(['e', 'E']) {
            Some(i) => (body.get(..i)?, Some(body.get(i + 1..)?)),
            None => (body, None),
        };
        let (int_part, frac_part) = match mantissa.split_once('.') {
            Some((i, f)) => (i, f),
            None => (mantissa, ""),
        };
        let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
        if (int_part.is_empty() && frac_part.is_empty())
            || !all_digits(int_part)
            || !all_digits(frac_part)
        {
            return None;
        }
        let mut exp: i64 = match exp_part {
            None => 0,
            Some(e) => {
                let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
                // Length bound first so the parse below cannot overflow.
                if digits.is_empty() || digits.len() > 9 || !all_digits(digits) {
                    return None;
                }
                let v: i64 = digits.parse().ok()?;
                if v > MAX_EXPONENT {
                    return None;
                }
                if e.starts_with('-') {
                    -v
                } else {
                    v
                }
            }
        };
        let int_len = i64::try_from(int_part.len()).ok()?;
        exp += int_len;
        let mut digits: Vec<u8> = int_part
            .bytes()
            .chain(frac_part.bytes())
            .map(|b| b - b'0')
            .collect();
        let leading = digits.iter().take_while(|d| **d == 0).count();
        if leading == digits.len() {
            return Some(Decimal::zero());
        }
        digits.drain(..leading);
        exp -= i64::try_from(leading).ok()?;
        while digits.last() == Some(&0) {
            digits.pop();
        }
        Some(Decimal {
            kind: DecimalKind::Finite {
                negative,
                exp,
                digits: digits.into_boxed_slice(),
            },
        })
    }

    fn zero() -> Decimal {
        Decimal {
            kind: DecimalKind::Finite {
                negative: false,
                exp: 0,
                digits: Box::new([]),
            },
        }
    }

    /// -2 for -Infinity, -1 negative, 0 zero, 1 positive, 2 +Infinity, 3 NaN.
    fn rank(&self) -> i8 {
        match &self.kind {
            DecimalKind::NegInfinity => -2,
            DecimalKind::Finite { digits, .. } if digits.is_empty() => 0,
            DecimalKind::Finite { negative: true, .. } => -1,
            DecimalKind::Finite { .. } => 1,
            DecimalKind::Infinity => 2,
            DecimalKind::NaN => 3,
        }
    }
}

impl Ord for Decimal {
    fn cmp(&self, other: &Self) -> Ordering {
        let rank = self.rank().cmp(&other.rank());
        if rank != Ordering::Equal {
            return rank;
        }
        match (&self.kind, &other.kind) {
            (
                DecimalKind::Finite {
                    negative,
                    exp: e1,
                    digits: d1,
                },
                DecimalKind::Finite {
                    exp: e2,
                    digits: d2,
                    ..
                },
            ) => {
                // Normalized: a larger exponent is a larger magnitude; with equal exponents
                // the digit strings compare lexicographically (no trailing zeros, so a
                // proper prefix is the smaller number).
                let magnitude = e1.cmp(e2).then_with(|| d1.cmp(d2));
                if *negative {
                    magnitude.reverse()
                } else {
                    magnitude
                }
            }
            _ => Ordering::Equal,
        }
    }
}

impl PartialOrd for Decimal {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

// ---------------------------------------------------------------------------------------
// Dates and timestamps

/// A point on the timestamp line: microseconds since 1970-01-01 00:00 UTC (or local
/// midnight for `timestamp`/`date`), with Postgres's infinities at the ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Instant {
    NegInfinity,
    Micros(i128),
    Infinity,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DateMode {
    Date,
    Timestamp,
    Timestamptz,
}

const MICROS_PER_DAY: i128 = 86_400_000_000;

/// A small cursor over ASCII bytes; every read is checked.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) -> bool {
        let start = self.i;
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
        self.i > start
    }

    /// Up to `max` digits (at least one) as a number.
    fn number(&mut self, max: usize) -> Option<(i64, usize)> {
        let start = self.i;
        let mut v: i64 = 0;
        while let Some(b) = self.peek() {
            if !b.is_ascii_digit() || self.i - start == max {
                break;
            }
            v = v * 10 + i64::from(b - b'0');
            self.i += 1;
        }
        let n = self.i - start;
        (n > 0).then_some((v, n))
    }

    fn rest_eq_ignore_case(&self, word: &str) -> bool {
        self.s
            .get(self.i..)
            .is_some_and(|r| r.eq_ignore_ascii_case(word.as_bytes()))
    }

    fn done(&self) -> bool {
        self.i >= self.s.len()
    }
}

/// Parses the ISO forms Postgres prints under `DateStyle=ISO` and the common ISO 8601 forms
/// people write. See the module docs for what the offset means per mode.
fn parse_datetime(text: &str, mode: DateMode) -> Option<Instant> {
    let t = text.trim_matches(|c: char| c.is_ascii_whitespace());
    let unsigned = t.strip_prefix('+').unwrap_or(t);
    if unsigned.eq_ignore_ascii_case("infinity") {
        return Some(Instant::Infinity);
    }
    if t.eq_ignore_ascii_case("-infinity") {
        return Some(Instant::NegInfinity);
    }
    if t.eq_ignore_ascii_case("epoch") {
        return Some(Instant::Micros(0));
    }
    let mut c = Cursor {
        s: t.as_bytes(),
        i: 0,
    };
    // Date: year (1+ digits; Postgres prints at least 4), month, day.
    let (year, _) = c.number(9)?;
    if !c.eat(b'-') {
        return None;
    }
    let (month, _) = c.number(2)?;
    if !c.eat(b'-') {
        return None;
    }
    let (day, _) = c.number(2)?;
    let mut micros_of_day: i128 = 0;
    let mut offset_secs: i64 = 0;
    // Time: `T` or spaces, then HH:MM[:SS[.frac]].
    let before_time = c.i;
    let had_t = c.eat(b'T') || c.eat(b't');
    if had_t || c.skip_spaces() {
        if let Some((h, _)) = c.number(2) {
            if !c.eat(b':') {
                return None;
            }
            let (mi, _) = c.number(2)?;
            let mut sec: i64 = 0;
            let mut frac: i128 = 0;
            if c.eat(b':') {
                (sec, _) = c.number(2)?;
                if c.eat(b'.') {
                    frac = parse_fraction(&mut c)?;
                }
            }
            if h > 24 || mi > 59 || sec > 60 || (h == 24 && (mi, sec, frac) != (0, 0, 0)) {
                return None;
            }
            micros_of_day =
                (i128::from(h) * 3600 + i128::from(mi) * 60 + i128::from(sec)) * 1_000_000 + frac;
            // Zone: Z, UTC/GMT, or ±HH[[:]MM[[:]SS]], optionally after spaces.
            let before_zone = c.i;
            c.skip_spaces();
            let zulu = c.eat(b'Z') || c.eat(b'z');
            if zulu {
                // UTC: offset stays 0.
            } else if matches!(c.peek(), Some(b'+' | b'-')) {
                let negative = c.peek() == Some(b'-');
                c.i += 1;
                let (oh, ohlen) = c.number(2)?;
                let mut secs = oh * 3600;
                if ohlen == 2 {
                    let colon = c.eat(b':');
                    if let Some((om, _)) = c.number(2) {
                        secs += om * 60;
                        if (!colon || c.eat(b':')) && c.peek().is_some_and(|b| b.is_ascii_digit()) {
                            let (os, _) = c.number(2)?;
                            secs += os;
                        }
                    } else if colon {
                        return None;
                    }
                }
                if oh > 15 {
                    return None;
                }
                offset_secs = if negative { -secs } else { secs };
            } else if c
                .s
                .get(c.i..c.i + 3)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"utc") || w.eq_ignore_ascii_case(b"gmt"))
            {
                c.i += 3;
            } else {
                c.i = before_zone;
            }
        } else if had_t {
            return None;
        } else {
            c.i = before_time;
        }
    }
    // Era.
    let before_era = c.i;
    let mut bc = false;
    if c.skip_spaces() {
        if c.rest_eq_ignore_case("bc") {
            c.i += 2;
            bc = true;
        } else if c.rest_eq_ignore_case("ad") {
            c.i += 2;
        } else {
            c.i = before_era;
        }
    }
    // Year 0 does not exist in the input syntax: 1 BC precedes 1 AD.
    if !c.done() || year == 0 {
        return None;
    }
    // 1 BC is astronomical year 0, 2 BC is -1, ...
    let year = if bc { 1 - year } else { year };
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) {
        return None;
    }
    let days = i128::from(days_from_civil(year, month, day));
    Some(Instant::Micros(match mode {
        DateMode::Date => days * MICROS_PER_DAY,
        DateMode::Timestamp => days * MICROS_PER_DAY + micros_of_day,
        DateMode::Timestamptz => {
            days * MICROS_PER_DAY + micros_of_day - i128::from(offset_secs) * 1_000_000
        }
    }))
}

/// Fractional seconds → microseconds, rounding half up at the seventh digit.
fn parse_fraction(c: &mut Cursor<'_>) -> Option<i128> {
    let mut micros: i128 = 0;
    let mut n = 0;
    let mut round_up = false;
    while let Some(b) = c.peek() {
        if !b.is_ascii_digit() {
            break;
        }
        match n {
            0..=5 => micros = micros * 10 + i128::from(b - b'0'),
            6 => round_up = b >= b'5',
            _ => {}
        }
        n += 1;
        c.i += 1;
    }
    if n == 0 {
        return None;
    }
    for _ in n..6 {
        micros *= 10;
    }
    Some(micros + i128::from(round_up))
}

fn is_leap(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        _ => 28,
    }
}

/// Proleptic Gregorian (astronomical year) → days since 1970-01-01.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_normalize() {
        let d = |s: &str| Decimal::parse(s).unwrap_or_else(|| panic!("{s} parses"));
        assert_eq!(d("1.50"), d("001.5"));
        assert_eq!(d("15e-1"), d("1.5"));
        assert_eq!(d("-0.000"), d("0"));
        assert!(d("-1") < d("-0.5"));
        assert!(d("NaN") > d("Infinity"));
        assert!(d("-inf") < d("-1e999"));
        assert!(d("12") < d("12.0001"));
        assert!(d("99") < d("100"));
        assert!(Decimal::parse("1e").is_none());
        assert!(Decimal::parse(".").is_none());
        assert!(Decimal::parse("1.2.3").is_none());
        assert!(Decimal::parse("--1").is_none());
    }

    #[test]
    fn datetimes_parse() {
        let ts = |s: &str| parse_datetime(s, DateMode::Timestamptz);
        assert_eq!(ts("1970-01-01 00:00:00+00"), Some(Instant::Micros(0)));
        assert_eq!(ts("1970-01-01T02:00:00+02:00"), Some(Instant::Micros(0)));
        assert_eq!(ts("1970-01-01T00:00:00Z"), Some(Instant::Micros(0)));
        assert_eq!(ts("1970-01-01 00:00:00.5"), Some(Instant::Micros(500_000)));
        assert_eq!(ts("1969-12-31 19:00:00-0500"), Some(Instant::Micros(0)));
        assert_eq!(ts("1970-01-01"), Some(Instant::Micros(0)));
        assert_eq!(ts("-infinity"), Some(Instant::NegInfinity));
        assert!(ts("0001-01-01 00:00:00+00 BC") < ts("0001-01-01 00:00:00+00"));
        assert_eq!(
            parse_datetime("0001-12-31 BC", DateMode::Date),
            Some(Instant::Micros(
                i128::from(days_from_civil(0, 12, 31)) * MICROS_PER_DAY
            ))
        );
        assert_eq!(ts("2023-02-29"), None);
        assert_eq!(ts("2024-13-01"), None);
        assert_eq!(ts("2024-01-01 25:00"), None);
        assert_eq!(ts("2024-01-01T"), None);
        assert_eq!(ts("2024-01-01 junk"), None);
        assert_eq!(
            parse_datetime("2024-01-01 10:00+05", DateMode::Timestamp),
            parse_datetime("2024-01-01 10:00", DateMode::Timestamp)
        );
    }

    #[test]
    fn like_patterns() {
        let m = |p: &str, t: &str| like_match(&compile_like(p, false).expect("pattern"), t);
        assert!(m("a%", "abc"));
        assert!(m("a*c", "abbbc"));
        assert!(m("_b_", "abc"));
        assert!(!m("_b", "abc"));
        assert!(m("%", ""));
        assert!(m("100\\%", "100%"));
        assert!(!m("100\\%", "1000"));
        assert!(m("%a%a%a%b", "aaaaaaaaaaaaaaab"));
        assert!(!m("%a%a%a%b", "aaaaaaaaaaaaaaaa"));
        assert!(compile_like("ab\\", false).is_err());
    }

    #[test]
    fn uuids_and_bools() {
        let a = parse_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11");
        assert!(a.is_some());
        assert_eq!(a, parse_uuid("{a0eebc999c0b4ef8bb6d6bb9bd380a11}"));
        assert_eq!(a, parse_uuid("a0ee-bc99-9c0b-4ef8-bb6d-6bb9-bd38-0a11"));
        assert_eq!(parse_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"), None);
        assert_eq!(parse_uuid("-a0eebc999c0b4ef8bb6d6bb9bd380a11"), None);
        assert_eq!(parse_bool(" Yes "), Some(true));
        assert_eq!(parse_bool("of"), Some(false));
        assert_eq!(parse_bool("o"), None);
        assert_eq!(parse_bool(""), None);
        assert_eq!(parse_bool("tr"), Some(true));
    }
}
