//! Compiling a parsed filter against a table's columns (typed constants, checked
//! operators) and evaluating it on a change's row image with SQL's three-valued logic.

use std::cmp::Ordering;

use super::grammar::*;
use super::like::{compile_like, like_match, LikePattern};
use super::regex::{compile_regex, RegexPattern};
use super::scalar::*;
use crate::change::{Change, ChangeKind, Value};
use crate::pg_type::{Oid, TypeKind, TypeRegistry};

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
pub(super) enum Class {
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

#[derive(Debug, Clone)]
enum Test {
    Cmp(CmpOp, Scalar),
    /// Items; `None` is a NULL item.
    In(Vec<Option<Scalar>>),
    IsNull,
    IsBool(bool),
    IsDistinct(Scalar),
    Like {
        pattern: LikePattern,
        fold: bool,
    },
    /// `match`/`imatch` (case folding is compiled into the pattern).
    Regex(Box<RegexPattern>),
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
        Operation::Match(pattern) | Operation::IMatch(pattern) => {
            // text, varchar, name, "char": the types whose `~` is plain text matching.
            if class != Class::Text {
                return Err(refuse(
                    ": match and imatch need a text, varchar or name column",
                ));
            }
            let icase = matches!(cond.op, Operation::IMatch(_));
            Test::Regex(Box::new(compile_regex(pattern, icase)?))
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

    /// The columns the conditions read, in condition order (may repeat).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.conditions.iter().map(|c| &*c.column)
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
        if let Test::Regex(pattern) = &self.test {
            return Some(pattern.is_match(text?) != self.negate);
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
            Test::Like { .. } | Test::Regex(_) => None,
        };
        if self.negate {
            result.map(|b| !b)
        } else {
            result
        }
    }
}
