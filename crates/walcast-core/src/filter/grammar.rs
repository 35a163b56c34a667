//! The filter text: `column=[not.]operator.value`, comma-separated (see the grammar in
//! [`crate::filter`]). Syntax only; types are checked by [`super::eval`].

use std::cmp::Ordering;
use std::fmt;

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
    #[error("unknown operator `{operator}` (supported: eq, neq, lt, lte, gt, gte, in, like, ilike, match, imatch, is, isdistinct, each optionally prefixed with `not.`)")]
    UnknownOperator { operator: String },
    /// A `match`/`imatch` pattern Postgres itself would reject.
    #[error("invalid regular expression `{pattern}`: {reason}")]
    InvalidRegex {
        pattern: String,
        reason: &'static str,
    },
    /// A `match`/`imatch` pattern Postgres accepts but walcast cannot evaluate exactly.
    #[error("regular expression `{pattern}` is not supported: {what}")]
    UnsupportedRegex { pattern: String, what: &'static str },
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
    pub(super) fn name(self) -> &'static str {
        match self {
            CmpOp::Eq => "eq",
            CmpOp::Neq => "neq",
            CmpOp::Lt => "lt",
            CmpOp::Lte => "lte",
            CmpOp::Gt => "gt",
            CmpOp::Gte => "gte",
        }
    }

    pub(super) fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Neq)
    }

    pub(super) fn holds(self, ord: Ordering) -> bool {
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
    /// `match`: Postgres's `~` (POSIX regular expression).
    Match(String),
    /// `imatch`: Postgres's `~*` (case-insensitive).
    IMatch(String),
    IsDistinct(String),
}

impl Operation {
    pub(super) fn name(&self) -> &'static str {
        match self {
            Operation::Cmp(op, _) => op.name(),
            Operation::In(_) => "in",
            Operation::Is(_) => "is",
            Operation::Like(_) => "like",
            Operation::ILike(_) => "ilike",
            Operation::Match(_) => "match",
            Operation::IMatch(_) => "imatch",
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
        "match" => Operation::Match(unquote(value, segment)?),
        "imatch" => Operation::IMatch(unquote(value, segment)?),
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

impl fmt::Display for CmpOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}
