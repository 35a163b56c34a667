//! Policy shapes decided in process: policies that compare a row's columns with values
//! derived from the claims alone, like `owner = (current_setting('request.jwt.claims',
//! true)::jsonb ->> 'sub')`, combined with `AND` / `OR`.
//!
//! ```text
//!  compile (rls.rs): every SELECT policy's deparsed qual ─ recognize ─▶ Shape (or None)
//!     Shape = OR(permissive formulas) AND AND(restrictive formulas)
//!     formula = term | AND(formulas) | OR(formulas);  term = column = E   (E claims-only)
//!  per identity, once: BEGIN; SET LOCAL ROLE; claims; SELECT (E)::text, pg_typeof(E)::text …
//!     ─▶ Derived per E (cached by identity, kept across recompiles by E's text)
//!  per row: term true ⇔ column's text = E's text (both non-NULL, same type) ─▶ Access
//! ```
//!
//! Invariants (why the answer equals Postgres's):
//! - Recognized exactly or not at all: the whole deparsed text of every policy must parse
//!   with this small grammar; anything else (a function other than `current_setting` of the
//!   three claim settings, a qualified name, `NOT`, `IS`, another operator, a sub-select with
//!   `FROM`) leaves the table on per-group evaluation.
//! - E reads nothing but the claim settings and constants, through built-in functions and
//!   casts to built-in types (the text is deparsed with `search_path = pg_catalog`, so an
//!   unqualified name is pg_catalog's): its value depends only on the identity's claims, so it
//!   is computed once per identity, in Postgres, under its role and claims, and cached.
//! - Equality is decided on text only where it is exactly the type's equality: E's type
//!   must be the column's own type, one of `text` (deterministic collation), `uuid`,
//!   `smallint`, `integer`, `bigint`, whose output functions are canonical (equal values,
//!   equal text). Any other pairing is unusable for that identity and falls back.
//! - No `NOT` is accepted, so the formula is monotone: SQL's NULL (a NULL column or a NULL E)
//!   counts as false exactly where Postgres would not return the row.
//! - A derivation that raises is never used: that identity keeps per-group evaluation, which
//!   raises (or not) exactly as before.

use std::sync::Arc;

use walcast_core::change::{Change, ChangeKind, Value};
use walcast_core::hub::{Access, Identity};
use walcast_pgoutput::ReplicaIdentity;

use tokio_postgres::types::Type;

use super::rls::{self, AuthzError, RlsDeletes, TablePolicy};
use crate::db::sql::ExclusivePool;

/// A boolean combination of terms (no negation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Formula {
    /// Index into [`Shape::terms`].
    Term(usize),
    And(Vec<Formula>),
    Or(Vec<Formula>),
}

/// `column = expr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Term {
    /// Index of the column in the change's columns.
    pub column: usize,
    /// The column's type (`format_type`), which E's type must equal.
    pub type_name: String,
    /// The claims-only expression, as deparsed: what is evaluated for an identity.
    pub expr: Arc<str>,
    /// What its derived values are cached by: `expr`, followed by the inlined bodies of
    /// the functions it calls, so that redefining such a function (which sends no Relation
    /// message) makes the next compilation derive afresh instead of reusing old values.
    pub key: Arc<str>,
    /// A membership term (`column IN (SELECT m.c FROM t m WHERE …)`, `EXISTS (…)`): `expr`
    /// is a statement returning the set of values (as text) the row's column must be in,
    /// read from the table with this relation id (see [`MemberTable`]).
    pub set: Option<u32>,
}

/// Zero-argument functions that policies call (`auth.uid()`), by their deparsed qualified
/// name, with the expression Postgres inlines for a call (from `EXPLAIN VERBOSE`). Only
/// functions Postgres inlines are here: a SQL function whose body is one expression, not
/// SECURITY DEFINER, without SET clauses.
#[derive(Debug, Clone, Default)]
pub struct Functions {
    inlined: Vec<(String, Vec<Tok>, String)>,
    /// Tables that membership sub-selects may read (see [`MemberTable`]).
    pub tables: Vec<MemberTable>,
    /// The name of the table the policies are on (`pg_class.relname`), as a sub-select's
    /// correlated reference (`EXISTS (… WHERE m.room = rooms.id)`) names it.
    pub outer: Option<String>,
}

/// A table that a membership sub-select reads (`FROM public.members m`), as the catalog
/// describes it at compilation.
#[derive(Debug, Clone)]
pub struct MemberTable {
    /// `schema.table`, as deparsed.
    pub name: String,
    pub relid: u32,
    /// Its columns: name, type (`format_type`), deterministic collation.
    pub columns: Vec<(String, String, bool)>,
    /// Whether every change of it reaches walcast in the stream, so that the sets derived
    /// from it can be invalidated at the point of the change: a plain table (no partition,
    /// no inheritance child) published with inserts, updates, deletes and truncates and
    /// without a row filter, whose own row-level security (if it applies to the role) is
    /// claims-only. Otherwise a membership term on it is not recognized.
    pub fresh: bool,
}

impl Functions {
    /// Remember that a call of `name` (`schema.function`, as deparsed) inlines to `body`
    /// (EXPLAIN's deparsed output). A body
    /// this grammar cannot read is not remembered (the call stays unrecognized).
    pub fn insert(&mut self, name: &str, body: &str) {
        if let Some(tokens) = tokenize(body) {
            self.inlined
                .push((name.to_owned(), tokens, body.trim().to_owned()));
        }
    }

    fn get(&self, name: &str) -> Option<(&[Tok], &str)> {
        self.inlined
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, t, b)| (t.as_slice(), b.as_str()))
    }
}

/// The schema-qualified zero-argument calls (`auth.uid()`) in policy texts, by deparsed name,
/// each name `schema.function` of plain lower-case identifiers (what Postgres deparses
/// unquoted); these are the candidates for [`Functions`].
pub fn called_functions(quals: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for q in quals {
        let Some(t) = tokenize(q) else { continue };
        for (i, tok) in t.iter().enumerate() {
            let Tok::Ident {
                name,
                quoted: false,
            } = tok
            else {
                continue;
            };
            if t.get(i + 1) != Some(&Tok::Open) || t.get(i + 2) != Some(&Tok::Close) {
                continue;
            }
            let Some((schema, function)) = name.split_once('.') else {
                continue;
            };
            let plain = |x: &str| {
                !x.is_empty()
                    && x.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            };
            if plain(schema)
                && plain(function)
                && !out.iter().any(|(s, f)| s == schema && f == function)
            {
                out.push((schema.to_owned(), function.to_owned()));
            }
        }
    }
    out
}

/// The tables membership sub-selects in policy texts read (`FROM schema.table`), each
/// `(schema, table)` of plain lower-case identifiers: the candidates for [`MemberTable`].
pub fn member_tables(quals: &[&str]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for q in quals {
        let Some(t) = tokenize(q) else { continue };
        for w in t.windows(2) {
            let (
                true,
                Tok::Ident {
                    name,
                    quoted: false,
                },
            ) = (is_word(&w[0], "FROM"), &w[1])
            else {
                continue;
            };
            let Some((schema, table)) = name.split_once('.') else {
                continue;
            };
            if plain_name(schema)
                && plain_name(table)
                && !out.iter().any(|(s, n)| s == schema && n == table)
            {
                out.push((schema.to_owned(), table.to_owned()));
            }
        }
    }
    out
}

/// What Postgres deparses without quotes: lower-case letters, digits, underscores.
fn plain_name(x: &str) -> bool {
    !x.is_empty()
        && !x.as_bytes()[0].is_ascii_digit()
        && x.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A table's SELECT policies for a role, recognized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub terms: Vec<Term>,
    pub permissive: Vec<Formula>,
    pub restrictive: Vec<Formula>,
}

/// E's value for one identity: its text (`None`: NULL) and its type, or `None` when
/// computing it raised.
pub type Derived = Option<(Option<String>, String)>;

/// A column of the table, as recognition needs to know it.
pub struct ShapeColumn<'a> {
    pub name: &'a str,
    pub type_name: &'a str,
    /// Index in the change's columns (`None`: not streamed, never recognized).
    pub source: Option<usize>,
    /// Its collation is deterministic (or it has none).
    pub deterministic: bool,
}

impl<'a> ShapeColumn<'a> {
    /// The columns of a table read from the catalog as `(name, type, deterministic)`, in
    /// order: every one streamed, at its own index.
    pub fn of_catalog(columns: &'a [(String, String, bool)]) -> Vec<ShapeColumn<'a>> {
        columns
            .iter()
            .enumerate()
            .map(|(i, (name, type_name, deterministic))| ShapeColumn {
                name,
                type_name,
                source: Some(i),
                deterministic: *deterministic,
            })
            .collect()
    }
}

/// Recognize a table's SELECT policies (`(permissive, deparsed qual)`). `None` unless
/// every policy is recognized and at least one is permissive.
pub fn recognize(policies: &[(bool, &str)], columns: &[ShapeColumn<'_>]) -> Option<Shape> {
    recognize_with(policies, columns, &Functions::default())
}

/// [`recognize`], looking through the calls of `functions` to the expressions Postgres
/// inlines for them.
pub fn recognize_with(
    policies: &[(bool, &str)],
    columns: &[ShapeColumn<'_>],
    functions: &Functions,
) -> Option<Shape> {
    let mut shape = Shape {
        terms: Vec::new(),
        permissive: Vec::new(),
        restrictive: Vec::new(),
    };
    for (permissive, qual) in policies {
        let tokens = tokenize(qual)?;
        let f = formula(&tokens, columns, functions, &mut shape.terms)?;
        if *permissive {
            shape.permissive.push(f);
        } else {
            shape.restrictive.push(f);
        }
    }
    (!shape.permissive.is_empty()).then_some(shape)
}

/// Why a policy (`qual`, deparsed) is not decided in process, in words for `walcast check`;
/// `None` when it would be (alone, for a table with `columns`).
pub fn why_per_user(
    qual: &str,
    columns: &[ShapeColumn<'_>],
    functions: &Functions,
) -> Option<String> {
    if recognize_with(&[(true, qual)], columns, functions).is_some() {
        return None;
    }
    let not_a_comparison = "is not a comparison of a column with claims (combined with AND/OR) \
         on a text, uuid or integer column: e.g. NOT, IS, <>, another operator or type";
    let Some(t) = tokenize(qual) else {
        return Some(not_a_comparison.into());
    };
    if t.iter().any(|x| is_word(x, "FROM")) {
        for (schema, table) in member_tables(&[qual]) {
            let name = format!("{schema}.{table}");
            if !functions.tables.iter().any(|m| m.name == name && m.fresh) {
                return Some(format!(
                    "reads another table, {name}, whose changes walcast cannot follow in the \
                     stream (it must be a plain table in the publication for INSERT, UPDATE, \
                     DELETE and TRUNCATE without a row filter, and its own policies, if any, \
                     claims-only)"
                ));
            }
        }
        return Some(
            "reads another table in a form not decided in process (recognized: \
             col IN (SELECT m.c FROM schema.t m WHERE m.x = <claims>) and \
             EXISTS (SELECT 1 FROM schema.t m WHERE m.c = <table>.col AND m.x = <claims>), \
             compared on a text, uuid or integer column)"
                .into(),
        );
    }
    for (i, x) in t.iter().enumerate() {
        let Tok::Ident { name, .. } = x else { continue };
        let known = name == "current_setting"
            || CALLS.iter().any(|c| is_word(x, c))
            || functions
                .get(name)
                .is_some_and(|(body, _)| claims_only(body, functions, &mut Vec::new(), 1));
        if t.get(i + 1) == Some(&Tok::Open) && !known {
            return Some(format!(
                "calls {name}(), which Postgres does not inline to an expression of the claims alone"
            ));
        }
    }
    Some(not_a_comparison.into())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Ident { name: String, quoted: bool },
    Str(String),
    Num(String),
    Open,
    Close,
    Comma,
    Cast,
    Arrow,
    ArrowText,
    Eq,
}

fn tokenize(s: &str) -> Option<Vec<Tok>> {
    let b = s.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        match c {
            b' ' | b'\n' | b'\t' => i += 1,
            b'(' => {
                out.push(Tok::Open);
                i += 1
            }
            b')' => {
                out.push(Tok::Close);
                i += 1
            }
            b',' => {
                out.push(Tok::Comma);
                i += 1
            }
            b'=' => {
                out.push(Tok::Eq);
                i += 1
            }
            b':' if b.get(i + 1) == Some(&b':') => {
                out.push(Tok::Cast);
                i += 2
            }
            b'-' if b.get(i + 1) == Some(&b'>') => {
                if b.get(i + 2) == Some(&b'>') {
                    out.push(Tok::ArrowText);
                    i += 3
                } else {
                    out.push(Tok::Arrow);
                    i += 2
                }
            }
            b'\'' | b'"' => {
                let quote = c;
                let mut text = Vec::new();
                i += 1;
                loop {
                    match b.get(i) {
                        None => return None,
                        Some(&q) if q == quote => {
                            if b.get(i + 1) == Some(&quote) {
                                text.push(quote);
                                i += 2;
                            } else {
                                i += 1;
                                break;
                            }
                        }
                        Some(&x) => {
                            text.push(x);
                            i += 1
                        }
                    }
                }
                let text = String::from_utf8(text).ok()?;
                out.push(if quote == b'\'' {
                    Tok::Str(text)
                } else {
                    Tok::Ident {
                        name: text,
                        quoted: true,
                    }
                });
            }
            b'0'..=b'9' => {
                let start = i;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(Tok::Num(s.get(start..i)?.to_owned()));
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                // A '.' makes a qualified name one token: never a column or an allowed word.
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'.')
                {
                    i += 1;
                }
                out.push(Tok::Ident {
                    name: s.get(start..i)?.to_owned(),
                    quoted: false,
                });
            }
            _ => return None,
        }
    }
    Some(out)
}

fn is_word(t: &Tok, word: &str) -> bool {
    matches!(t, Tok::Ident { name, quoted: false } if name.eq_ignore_ascii_case(word))
}

/// The closing parenthesis of the one opening at `open`.
fn closing(t: &[Tok], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, tok) in t.iter().enumerate().skip(open) {
        match tok {
            Tok::Open => depth += 1,
            Tok::Close => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Positions of depth-0 tokens satisfying `pred`; `None` if parentheses do not balance.
fn top_level(t: &[Tok], pred: impl Fn(&Tok) -> bool) -> Option<Vec<usize>> {
    let mut depth = 0usize;
    let mut at = Vec::new();
    for (i, tok) in t.iter().enumerate() {
        match tok {
            Tok::Open => depth += 1,
            Tok::Close => depth = depth.checked_sub(1)?,
            _ if depth == 0 && pred(tok) => at.push(i),
            _ => {}
        }
    }
    (depth == 0).then_some(at)
}

fn split_at(t: &[Tok], at: &[usize]) -> Vec<Vec<Tok>> {
    let mut parts = Vec::new();
    let mut start = 0;
    for &i in at {
        parts.push(t[start..i].to_vec());
        start = i + 1;
    }
    parts.push(t[start..].to_vec());
    parts
}

fn formula(
    t: &[Tok],
    columns: &[ShapeColumn<'_>],
    functions: &Functions,
    terms: &mut Vec<Term>,
) -> Option<Formula> {
    if t.is_empty() {
        return None;
    }
    if t.first() == Some(&Tok::Open) && closing(t, 0) == Some(t.len() - 1) {
        return formula(&t[1..t.len() - 1], columns, functions, terms);
    }
    for (word, make) in [
        ("OR", Formula::Or as fn(Vec<Formula>) -> Formula),
        ("AND", Formula::And),
    ] {
        let at = top_level(t, |x| is_word(x, word))?;
        if !at.is_empty() {
            let parts = split_at(t, &at)
                .iter()
                .map(|p| formula(p, columns, functions, terms))
                .collect::<Option<Vec<_>>>()?;
            return Some(make(parts));
        }
    }
    if is_word(&t[0], "EXISTS") || t.get(1).is_some_and(|x| is_word(x, "IN")) {
        return membership(t, columns, functions, terms);
    }
    let eq = top_level(t, |x| *x == Tok::Eq)?;
    let [at] = eq[..] else { return None };
    let (lhs, rhs) = (&t[..at], &t[at + 1..]);
    let (col, expr) = match (column(lhs, columns), column(rhs, columns)) {
        (Some(c), None) => (c, rhs),
        (None, Some(c)) => (c, lhs),
        _ => return None,
    };
    let mut looked_through = Vec::new();
    if !claims_only(expr, functions, &mut looked_through, 0) {
        return None;
    }
    let c = &columns[col];
    if !matches!(
        c.type_name,
        "text" | "uuid" | "smallint" | "integer" | "bigint"
    ) || (c.type_name == "text" && !c.deterministic)
    {
        return None;
    }
    let expr: Arc<str> = render(expr).into();
    let key = if looked_through.is_empty() {
        expr.clone()
    } else {
        // Not SQL: a cache key only (the unit separator cannot occur in deparsed text).
        let mut key = expr.to_string();
        for body in looked_through {
            key.push('\u{1f}');
            key.push_str(body);
        }
        key.into()
    };
    terms.push(Term {
        column: c.source?,
        type_name: c.type_name.to_owned(),
        expr,
        key,
        set: None,
    });
    Some(Formula::Term(terms.len() - 1))
}

/// Whether a row's column and a membership table's column compare by text exactly: the
/// same type, one with canonical output, and deterministic collations for text.
fn comparable(a: (&str, bool), b: (&str, bool)) -> bool {
    a.0 == b.0
        && matches!(a.0, "text" | "uuid" | "smallint" | "integer" | "bigint")
        && (a.0 != "text" || (a.1 && b.1))
}

/// The conjuncts of `t` (AND, at any depth of parentheses), each without its parentheses.
fn conjuncts(t: &[Tok], out: &mut Vec<Vec<Tok>>) -> Option<()> {
    if t.is_empty() {
        return None;
    }
    if t.first() == Some(&Tok::Open) && closing(t, 0) == Some(t.len() - 1) {
        return conjuncts(&t[1..t.len() - 1], out);
    }
    let at = top_level(t, |x| is_word(x, "AND"))?;
    if at.is_empty() {
        out.push(t.to_vec());
        return Some(());
    }
    for part in split_at(t, &at) {
        conjuncts(&part, out)?;
    }
    Some(())
}

/// A membership term, as Postgres deparses the two Supabase forms:
///
/// ```text
/// col IN ( SELECT q.c FROM schema.table [q] [WHERE cond] )
/// EXISTS ( SELECT [1] FROM schema.table [q] WHERE cond )   cond has exactly one q.c = <table>.col
/// ```
///
/// where every other conjunct of `cond` is `q.x = E` with E claims-only. Then, for an
/// identity, the rows the policy returns are those whose `col` is in
/// `SELECT q.c FROM schema.table q WHERE <the claims-only conjuncts>` evaluated under its
/// role and claims: the sub-select reads no column of the outer row but `col`, and compares
/// it by the equality of a type whose text is canonical. Anything else is not recognized.
fn membership(
    t: &[Tok],
    columns: &[ShapeColumn<'_>],
    functions: &Functions,
    terms: &mut Vec<Term>,
) -> Option<Formula> {
    let n = t.len();
    let (outer_col, sub) =
        if n >= 4 && is_word(&t[1], "IN") && t[2] == Tok::Open && closing(t, 2) == Some(n - 1) {
            (Some(column(&t[..1], columns)?), &t[3..n - 1])
        } else if n >= 3
            && is_word(&t[0], "EXISTS")
            && t[1] == Tok::Open
            && closing(t, 1) == Some(n - 1)
        {
            (None, &t[2..n - 1])
        } else {
            return None;
        };
    if !is_word(sub.first()?, "SELECT") {
        return None;
    }
    let from = sub.iter().position(|x| is_word(x, "FROM"))?;
    let target = &sub[1..from];
    let Some(Tok::Ident {
        name: table,
        quoted: false,
    }) = sub.get(from + 1)
    else {
        return None;
    };
    let member = functions.tables.iter().find(|m| m.name == *table)?;
    if !member.fresh {
        return None;
    }
    let (_, bare) = table.split_once('.')?;
    let mut rest = from + 2;
    let (q, alias) = match sub.get(rest) {
        Some(
            x @ Tok::Ident {
                name,
                quoted: false,
            },
        ) if !is_word(x, "WHERE") && plain_name(name) => {
            rest += 1;
            (name.as_str(), true)
        }
        _ => (bare, false),
    };
    let cond: &[Tok] = match sub.get(rest) {
        None => &[],
        Some(x) if is_word(x, "WHERE") && rest + 1 < sub.len() => &sub[rest + 1..],
        _ => return None,
    };
    let outer = functions.outer.as_deref()?;
    if q == outer || !plain_name(outer) {
        return None;
    }
    // `q.c` → the membership table's column c.
    let member_col = |x: &[Tok]| -> Option<usize> {
        let [Tok::Ident {
            name,
            quoted: false,
        }] = x
        else {
            return None;
        };
        let (p, c) = name.split_once('.')?;
        (p == q)
            .then(|| member.columns.iter().position(|(n, _, _)| n == c))
            .flatten()
    };
    // `<outer>.c` → the policy table's column c.
    let outer_col_ref = |x: &[Tok]| -> Option<usize> {
        let [Tok::Ident {
            name,
            quoted: false,
        }] = x
        else {
            return None;
        };
        let (p, c) = name.split_once('.')?;
        (p == outer)
            .then(|| columns.iter().position(|col| col.name == c))
            .flatten()
    };
    let mut parts = Vec::new();
    if !cond.is_empty() {
        conjuncts(cond, &mut parts)?;
    }
    let mut correlated: Vec<(usize, usize)> = Vec::new();
    let mut filters: Vec<&[Tok]> = Vec::new();
    let mut looked_through = Vec::new();
    for part in &parts {
        let eq = top_level(part, |x| *x == Tok::Eq)?;
        let [at] = eq[..] else { return None };
        let (lhs, rhs) = (&part[..at], &part[at + 1..]);
        match (
            member_col(lhs),
            member_col(rhs),
            outer_col_ref(lhs),
            outer_col_ref(rhs),
        ) {
            (Some(m), None, None, Some(o)) | (None, Some(m), Some(o), None) => {
                correlated.push((m, o))
            }
            (Some(_), None, None, None) if claims_only(rhs, functions, &mut looked_through, 0) => {
                filters.push(part)
            }
            (None, Some(_), None, None) if claims_only(lhs, functions, &mut looked_through, 0) => {
                filters.push(part)
            }
            _ => return None,
        }
    }
    let (key_col, col) = match (outer_col, target, &correlated[..]) {
        (Some(o), target, []) => (member_col(target)?, o),
        (None, [] | [Tok::Num(_)], [(m, o)]) => (*m, *o),
        _ => return None,
    };
    if matches!(target, [Tok::Num(x)] if x != "1") {
        return None;
    }
    let c = &columns[col];
    let (key_name, key_type, key_deterministic) = &member.columns[key_col];
    if !comparable(
        (c.type_name, c.deterministic),
        (key_type, *key_deterministic),
    ) {
        return None;
    }
    let mut sql =
        format!("SELECT ARRAY(SELECT DISTINCT ({q}.{key_name})::pg_catalog.text FROM {table}");
    if alias {
        sql.push(' ');
        sql.push_str(q);
    }
    for (i, f) in filters.iter().enumerate() {
        sql.push_str(if i == 0 { " WHERE (" } else { " AND (" });
        sql.push_str(&render(f));
        sql.push(')');
    }
    sql.push(')');
    let expr: Arc<str> = sql.into();
    let mut key = expr.to_string();
    for body in looked_through {
        key.push('\u{1f}');
        key.push_str(body);
    }
    terms.push(Term {
        column: c.source?,
        type_name: c.type_name.to_owned(),
        expr,
        key: key.into(),
        set: Some(member.relid),
    });
    Some(Formula::Term(terms.len() - 1))
}

fn column(t: &[Tok], columns: &[ShapeColumn<'_>]) -> Option<usize> {
    let [Tok::Ident { name, quoted }] = t else {
        return None;
    };
    if !quoted
        && ["true", "false", "null", "and", "or", "not"]
            .contains(&name.to_ascii_lowercase().as_str())
    {
        return None;
    }
    columns.iter().position(|c| c.name == name)
}

/// The settings a claims-only expression may read: the three walcast sets per identity, and
/// `request.jwt.claim`, which Supabase's `auth.jwt()` reads first and nobody sets (NULL both
/// when a value is derived and when a row is checked).
const SETTINGS: [&str; 4] = [
    "request.jwt.claims",
    "request.jwt.claim.sub",
    "request.jwt.claim.role",
    "request.jwt.claim",
];
/// Built-in functions of their arguments alone that may wrap claims (`auth.uid()`'s body).
const CALLS: [&str; 2] = ["COALESCE", "NULLIF"];
/// How deep inlined bodies may nest (a body calling another inlined function).
const INLINE_DEPTH: usize = 4;

/// What an open parenthesis opened.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Paren {
    Group,
    /// `( SELECT expr [AS name] )`.
    Select,
    /// The argument list of one of [`CALLS`].
    Args,
}
const TYPES: [&str; 8] = [
    "text", "jsonb", "json", "uuid", "integer", "bigint", "smallint", "boolean",
];

/// Whether the tokens are an expression of constants and the claim settings only, looking
/// through the calls of `functions` (their bodies pushed onto `looked_through`).
fn claims_only<'f>(
    t: &[Tok],
    functions: &'f Functions,
    looked_through: &mut Vec<&'f str>,
    depth: usize,
) -> bool {
    let mut i = 0;
    let mut open: Vec<Paren> = Vec::new();
    while i < t.len() {
        match &t[i] {
            Tok::Open => {
                // `( SELECT expr )`: a scalar sub-select without FROM is its expression.
                let select = t.get(i + 1).is_some_and(|x| is_word(x, "SELECT"));
                open.push(if select { Paren::Select } else { Paren::Group });
                if select {
                    i += 1;
                }
            }
            Tok::Close => {
                if open.pop().is_none() {
                    return false;
                }
            }
            // The output name of the sub-select's column, right before its end.
            x if is_word(x, "AS")
                && open.last() == Some(&Paren::Select)
                && matches!(t.get(i + 1), Some(Tok::Ident { .. }))
                && t.get(i + 2) == Some(&Tok::Close) =>
            {
                i += 1
            }
            Tok::Comma if open.last() == Some(&Paren::Args) => {}
            Tok::Str(_) | Tok::Num(_) | Tok::Arrow | Tok::ArrowText => {}
            Tok::Cast => match t.get(i + 1) {
                Some(Tok::Ident {
                    name,
                    quoted: false,
                }) if TYPES.contains(&name.as_str()) => i += 1,
                _ => return false,
            },
            x if CALLS.iter().any(|c| is_word(x, c)) && t.get(i + 1) == Some(&Tok::Open) => {
                open.push(Paren::Args);
                i += 1;
            }
            Tok::Ident {
                name,
                quoted: false,
            } if name == "current_setting" => {
                // current_setting('<claim setting>'::text [, true|false])
                let ok = matches!(t.get(i + 1), Some(Tok::Open))
                    && matches!(t.get(i + 2), Some(Tok::Str(s)) if SETTINGS.contains(&s.as_str()))
                    && t.get(i + 3) == Some(&Tok::Cast)
                    && t.get(i + 4).is_some_and(|x| is_word(x, "text"));
                if !ok {
                    return false;
                }
                match (t.get(i + 5), t.get(i + 6), t.get(i + 7)) {
                    (Some(Tok::Close), _, _) => i += 5,
                    (Some(Tok::Comma), Some(b), Some(Tok::Close))
                        if is_word(b, "true") || is_word(b, "false") =>
                    {
                        i += 7
                    }
                    _ => return false,
                }
            }
            // `schema.function()` that Postgres inlines to a claims-only expression.
            Tok::Ident {
                name,
                quoted: false,
            } if t.get(i + 1) == Some(&Tok::Open) && t.get(i + 2) == Some(&Tok::Close) => {
                let Some((body, text)) = functions.get(name) else {
                    return false;
                };
                if depth >= INLINE_DEPTH || !claims_only(body, functions, looked_through, depth + 1)
                {
                    return false;
                }
                looked_through.push(text);
                i += 2;
            }
            Tok::Ident { .. } | Tok::Comma | Tok::Eq => return false,
        }
        i += 1;
    }
    open.is_empty()
}

/// The tokens as SQL again (for evaluating E on its own), separated by spaces.
fn render(t: &[Tok]) -> String {
    let mut parts: Vec<String> = Vec::with_capacity(t.len());
    for tok in t {
        parts.push(match tok {
            Tok::Ident { name, quoted: true } => rls::quote_ident(name),
            Tok::Ident { name, .. } => name.clone(),
            Tok::Str(x) => format!("'{}'", x.replace('\'', "''")),
            Tok::Num(n) => n.clone(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
            Tok::Comma => ",".into(),
            Tok::Cast => "::".into(),
            Tok::Arrow => "->".into(),
            Tok::ArrowText => "->>".into(),
            Tok::Eq => "=".into(),
        });
    }
    parts.join(" ")
}

/// The values a membership term's column must be among, for one identity.
pub type MemberSet = std::collections::HashSet<Box<str>>;

/// Per identity asked (`None`: left out, try later), per set (`None`: it raised).
pub type DerivedSets = Vec<Option<Vec<Option<MemberSet>>>>;

/// A term's resolved value for one identity: E's text (`None`: NULL), or the set of a
/// membership term.
#[derive(Debug, Clone, Copy)]
pub enum TermValue<'a> {
    One(Option<&'a str>),
    Set(&'a MemberSet),
}

impl Shape {
    /// Whether any term is a membership term (whose values depend on a table, not only on
    /// the claims).
    pub fn has_sets(&self) -> bool {
        self.terms.iter().any(|t| t.set.is_some())
    }

    /// The derived value of each term for one identity into `out`, from `lookup` (claims-only
    /// terms, by cache key) and `sets` (membership terms); whether all are there and usable
    /// (not raised, and of the column's type).
    pub fn resolve_into<'a>(
        &self,
        lookup: impl Fn(&Arc<str>) -> Option<&'a Derived>,
        sets: impl Fn(&Term) -> Option<&'a MemberSet>,
        out: &mut Vec<TermValue<'a>>,
    ) -> bool {
        out.clear();
        for t in &self.terms {
            if t.set.is_some() {
                match sets(t) {
                    Some(s) => out.push(TermValue::Set(s)),
                    None => return false,
                }
                continue;
            }
            match lookup(&t.key) {
                Some(Some((value, ty))) if *ty == t.type_name => {
                    out.push(TermValue::One(value.as_deref()))
                }
                _ => return false,
            }
        }
        true
    }

    fn eval(&self, f: &Formula, row: &[Value], values: &[TermValue<'_>]) -> bool {
        match f {
            Formula::Term(i) => {
                let (Some(term), Some(v)) = (self.terms.get(*i), values.get(*i)) else {
                    return false;
                };
                let Some(text) = row.get(term.column).and_then(Value::text) else {
                    return false;
                };
                match v {
                    TermValue::One(Some(v)) => text == *v,
                    TermValue::One(None) => false,
                    TermValue::Set(s) => s.contains(text),
                }
            }
            Formula::And(fs) => fs.iter().all(|f| self.eval(f, row, values)),
            Formula::Or(fs) => fs.iter().any(|f| self.eval(f, row, values)),
        }
    }

    /// Terms at least one of which is true of every row the policies return, if there are
    /// such (`None`: some permissive formula implies no single term). A row none of whose
    /// terms hold is returned by no permissive policy, so it is invisible: routing by these
    /// terms' values loses nothing (see [`walcast_core::hub::Hub::gate`]).
    pub fn index_terms(&self) -> Option<Vec<usize>> {
        fn implied(f: &Formula) -> Option<Vec<usize>> {
            match f {
                Formula::Term(i) => Some(vec![*i]),
                // A conjunction implies each conjunct: any one with index terms will do;
                // the one with fewest keeps the index tight.
                Formula::And(fs) => fs.iter().filter_map(implied).min_by_key(Vec::len),
                // A disjunction implies one of its disjuncts: each must have index terms.
                Formula::Or(fs) => {
                    let mut out = Vec::new();
                    for f in fs {
                        out.extend(implied(f)?);
                    }
                    Some(out)
                }
            }
        }
        let mut out = Vec::new();
        for f in &self.permissive {
            out.extend(implied(f)?);
        }
        out.dedup();
        (!out.is_empty()).then_some(out)
    }

    /// Whether the policies return `row` (permissive ones OR'd, restrictive ones AND'd).
    pub fn visible(&self, row: &[Value], values: &[TermValue<'_>]) -> bool {
        self.permissive.iter().any(|f| self.eval(f, row, values))
            && self.restrictive.iter().all(|f| self.eval(f, row, values))
    }
}

/// The access of an identity to `change` under `policy` (whose rows are a checked rule
/// with this shape), decided in process exactly as the per-group check would
/// (wal/checks.rs): the same images, the same judgeability, the same DELETE rule.
pub fn decide(
    policy: &TablePolicy,
    reads: &[bool],
    shape: &Shape,
    values: &[TermValue<'_>],
    change: &Change,
    deletes: RlsDeletes,
) -> Access {
    if !policy.select {
        return Access::Deny;
    }
    if deletes == RlsDeletes::PrimaryKey
        && change.kind == ChangeKind::Delete
        && change.table.replica_identity != ReplicaIdentity::Full
    {
        return rls::access(policy, true, true);
    }
    let judge = |row: &[Value]| -> Option<bool> {
        let judgeable = reads
            .iter()
            .enumerate()
            .all(|(i, r)| !*r || row.get(i).is_some_and(Value::is_known));
        judgeable.then(|| shape.visible(row, values))
    };
    let images = rls::images(change);
    let primary = images.primary.as_deref().and_then(judge);
    let old = match (primary, images.old) {
        _ if change.kind == ChangeKind::Delete => primary,
        (Some(_), Some(row)) => judge(row),
        _ => None,
    };
    rls::access(policy, primary == Some(true), old == Some(true))
}

/// The statement that computes `exprs`: each one's text and type.
fn derive_sql(exprs: &[Arc<str>]) -> String {
    let mut sql = String::from("SELECT ");
    for (i, e) in exprs.iter().enumerate() {
        if i > 0 {
            sql.push_str(", ");
        }
        // The expressions are catalog text from pg_policy, re-rendered from their tokens.
        sql.push_str(&format!(
            "({e})::pg_catalog.text, pg_catalog.pg_typeof({e})::pg_catalog.text"
        ));
    }
    sql
}

/// One identity's statement in a pipelined derivation: under a savepoint, its claims set
/// (`request.jwt.claims`, `sub`, role) and `st` run; rolled back after, so nothing the
/// statement or a function it calls sets is seen by the next identity's.
async fn derive_step(
    client: &tokio_postgres::Client,
    claims_st: &tokio_postgres::Statement,
    st: &tokio_postgres::Statement,
    identity: &Identity,
    role: &str,
) -> (
    Result<(), tokio_postgres::Error>,
    Result<tokio_postgres::Row, tokio_postgres::Error>,
) {
    let claims: &str = &identity.claims;
    let sub = rls::claim_str(&identity.claims, "sub");
    let sub: &str = &sub;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&claims, &sub, &role];
    let (s, c, row, r) = tokio::join!(
        client.batch_execute("SAVEPOINT walcast_derive"),
        client.query(claims_st, &params),
        client.query_one(st, &[]),
        client.batch_execute("ROLLBACK TO SAVEPOINT walcast_derive"),
    );
    (s.and(c.map(drop)).and(r), row)
}

/// The membership sets of many identities of one role, in one REPEATABLE READ transaction
/// and one pipelined round trip, in a snapshot that sees every transaction of `xids` (the
/// judged rows' and the last change of each membership table the stream has passed):
/// `BEGIN; SET LOCAL ROLE; timeout; search_path`, the snapshot, then per identity
/// `SAVEPOINT; claims; SELECT ARRAY(…), …; ROLLBACK TO SAVEPOINT`, then `ROLLBACK`. While
/// the snapshot does not see them yet, it runs again shortly (as the row checks do).
///
/// Each sub-select runs under the identity's role and claims, as it would inside the
/// policy: row-level security on the membership table and privileges apply the same, and
/// a sub-select that raises gives that identity `None` sets (per-group checks decide).
pub async fn derive_sets_many(
    pool: &ExclusivePool,
    role: &str,
    wanted: &[(Arc<Identity>, Vec<Arc<str>>)],
    xids: &[u32],
) -> Result<DerivedSets, AuthzError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    rls::until_visible(|| derive_sets_once(pool, role, wanted, xids)).await
}

async fn derive_sets_once(
    pool: &ExclusivePool,
    role: &str,
    wanted: &[(Arc<Identity>, Vec<Arc<str>>)],
    xids: &[u32],
) -> Result<Option<DerivedSets>, AuthzError> {
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    // SET takes no snapshot: the transaction's snapshot is the one the first query reports.
    let setup = format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET LOCAL ROLE {}; \
         SET LOCAL statement_timeout = {}; SET LOCAL search_path = pg_catalog",
        rls::quote_ident(role),
        rls::CHECK_TIMEOUT.as_millis()
    );
    let prepared = async {
        lease.client().batch_execute(&setup).await?;
        let claims = lease
            .client()
            .prepare_typed(rls::SET_CLAIMS_SQL, &[Type::TEXT, Type::TEXT, Type::TEXT])
            .await?;
        let snapshot = lease
            .client()
            .prepare("SELECT pg_catalog.pg_current_snapshot()::pg_catalog.text")
            .await?;
        let mut statements: Vec<(String, tokio_postgres::Statement)> = Vec::new();
        let mut index = Vec::with_capacity(wanted.len());
        for (_, exprs) in wanted {
            let sql = exprs.iter().map(|e| format!("({e})")).collect::<Vec<_>>();
            let sql = format!("SELECT {}", sql.join(", "));
            match statements.iter().position(|(s, _)| *s == sql) {
                Some(k) => index.push(k),
                None => {
                    let st = lease.client().prepare(&sql).await?;
                    statements.push((sql, st));
                    index.push(statements.len() - 1);
                }
            }
        }
        Ok::<_, tokio_postgres::Error>((claims, snapshot, statements, index))
    }
    .await;
    let (claims_st, snapshot_st, statements, index) = match prepared {
        Ok(p) => p,
        Err(err) => {
            let err = AuthzError::from_pg(&err);
            lease.discard();
            return Err(err);
        }
    };
    let client = lease.client();
    let role_text: &str = role;
    let snapshot = client.query_one(&snapshot_st, &[]);
    let mut steps = Vec::with_capacity(wanted.len());
    for ((identity, exprs), &k) in wanted.iter().zip(&index) {
        let st = &statements[k].1;
        let claims_st = &claims_st;
        steps.push(async move {
            let (done, row) = derive_step(client, claims_st, st, identity, role_text).await;
            (done, row, exprs.len())
        });
    }
    let (snapshot, results, end) = tokio::join!(
        snapshot,
        futures_util::future::join_all(steps),
        client.batch_execute("ROLLBACK")
    );
    if let Err(err) = end {
        // The session may still carry the role: never lend it again.
        let err = AuthzError::from_pg(&err);
        lease.discard();
        return Err(err);
    }
    lease.done();
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
    let snapshot: String = snapshot.and_then(|r| r.try_get(0)).map_err(get)?;
    let sees = crate::feed::snapshot::Xids::parse(&snapshot)
        .ok_or_else(|| AuthzError::Unavailable(format!("unreadable snapshot {snapshot:?}")))?;
    if !xids.iter().all(|x| sees.sees(*x)) {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(results.len());
    for (setup, row, n) in results {
        out.push(match (setup, row) {
            (Ok(()), Ok(row)) => {
                let mut sets = Vec::with_capacity(n);
                for i in 0..n {
                    let values: Vec<Option<String>> = row.try_get(i).map_err(get)?;
                    // NULL is in no set: `col IN (…)` and `=` are never true for it.
                    sets.push(Some(values.into_iter().flatten().map(Into::into).collect()));
                }
                Some(sets)
            }
            // The sub-select raised for these claims (no privilege, a bad cast): unusable.
            (_, Err(e)) if matches!(AuthzError::from_pg(&e), AuthzError::Failed { .. }) => {
                Some(vec![None; n])
            }
            _ => None,
        });
    }
    Ok(Some(out))
}

/// [`derive`] for many identities of one role in one transaction and one pipelined round
/// trip: `BEGIN READ ONLY; SET LOCAL ROLE; search_path; timeout`, then per identity
/// `SAVEPOINT; claims; SELECT exprs; ROLLBACK TO SAVEPOINT`, then `ROLLBACK`. An identity
/// whose statement raises gets unusable values (as with [`derive`]); an identity left out
/// of the answer (`None`) is computed later, one by one. Any failure of the batch itself is
/// an error: the caller falls back to [`derive`] per identity.
///
/// This is what keeps a cold start cheap: until an identity's values are known, every row of
/// the table is routed to it and judged by a per-group check, so a thousand users joining
/// at once would otherwise wait for a thousand sequential round trips.
pub async fn derive_many(
    pool: &ExclusivePool,
    role: &str,
    wanted: &[(Arc<Identity>, Vec<Arc<str>>)],
) -> Result<Vec<Option<Vec<Derived>>>, AuthzError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let setup = format!(
        "BEGIN READ ONLY; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {}; \
         SET LOCAL search_path = pg_catalog",
        rls::quote_ident(role),
        rls::CHECK_TIMEOUT.as_millis()
    );
    // Prepared inside the transaction, so names resolve with search_path = pg_catalog (a
    // plan keeps the search_path it was made with when Postgres re-plans it).
    let prepared = async {
        lease.client().batch_execute(&setup).await?;
        let claims = lease
            .client()
            .prepare_typed(rls::SET_CLAIMS_SQL, &[Type::TEXT, Type::TEXT, Type::TEXT])
            .await?;
        // Distinct statements, and which one each identity runs.
        let mut statements: Vec<(String, tokio_postgres::Statement)> = Vec::new();
        let mut index = Vec::with_capacity(wanted.len());
        for (_, exprs) in wanted {
            let sql = derive_sql(exprs);
            match statements.iter().position(|(s, _)| *s == sql) {
                Some(k) => index.push(k),
                None => {
                    let st = lease.client().prepare(&sql).await?;
                    statements.push((sql, st));
                    index.push(statements.len() - 1);
                }
            }
        }
        Ok::<_, tokio_postgres::Error>((claims, statements, index))
    }
    .await;
    let (claims_st, statements, index) = match prepared {
        Ok(p) => p,
        Err(err) => {
            let err = AuthzError::from_pg(&err);
            lease.discard();
            return Err(err);
        }
    };
    let client = lease.client();
    let role_text: &str = role;
    let mut steps = Vec::with_capacity(wanted.len());
    for ((identity, exprs), &k) in wanted.iter().zip(&index) {
        let st = &statements[k].1;
        let claims_st = &claims_st;
        steps.push(async move {
            let (done, row) = derive_step(client, claims_st, st, identity, role_text).await;
            (done, row, exprs.len())
        });
    }
    let (results, end) = tokio::join!(
        futures_util::future::join_all(steps),
        client.batch_execute("ROLLBACK")
    );
    if let Err(err) = end {
        // The session may still carry the role: never lend it again.
        let err = AuthzError::from_pg(&err);
        lease.discard();
        return Err(err);
    }
    lease.done();
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
    let mut out = Vec::with_capacity(results.len());
    for (setup, row, n) in results {
        out.push(match (setup, row) {
            (Ok(()), Ok(row)) => {
                let mut values = Vec::with_capacity(n);
                for i in 0..n {
                    let value: Option<String> = row.try_get(2 * i).map_err(get)?;
                    let ty: String = row.try_get(2 * i + 1).map_err(get)?;
                    values.push(Some((value, ty)));
                }
                Some(values)
            }
            // The expression raised for these claims: unusable, as with `derive`.
            (_, Err(e)) if matches!(AuthzError::from_pg(&e), AuthzError::Failed { .. }) => {
                Some(vec![None; n])
            }
            _ => None,
        });
    }
    Ok(out)
}

/// Compute `exprs` for one identity in Postgres, under its role and claims, in one
/// transaction that is rolled back. A statement that raises makes every one unusable
/// (`None`); a connection problem is an error (try again later).
pub async fn derive(
    pool: &ExclusivePool,
    identity: &Identity,
    exprs: &[Arc<str>],
) -> Result<Vec<Derived>, AuthzError> {
    let sql = derive_sql(exprs);
    let lease = pool
        .acquire()
        .await
        .map_err(|e| AuthzError::Unavailable(format!("{e:#}")))?;
    let client = lease.client();
    let setup = format!(
        "BEGIN READ ONLY; SET LOCAL ROLE {}; SET LOCAL statement_timeout = {}; \
         SET LOCAL search_path = pg_catalog",
        rls::quote_ident(&identity.role),
        rls::CHECK_TIMEOUT.as_millis()
    );
    let claims: &str = &identity.claims;
    let sub = rls::claim_str(&identity.claims, "sub");
    let sub: &str = &sub;
    let role: &str = &identity.role;
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&claims, &sub, &role];
    // One step after the other, not pipelined: a query given as text is parsed in a round
    // trip of its own before it runs, so a ROLLBACK sent alongside would end the
    // transaction first and the query would run without the role and the claims.
    if let Err(err) = client.batch_execute(&setup).await {
        let err = AuthzError::from_pg(&err);
        lease.discard();
        return Err(err);
    }
    let row = async {
        client.query(rls::SET_CLAIMS_SQL, &params).await?;
        client.query_one(&sql, &[]).await
    }
    .await;
    if let Err(err) = client.batch_execute("ROLLBACK").await {
        let err = AuthzError::from_pg(&err);
        lease.discard();
        return Err(err);
    }
    lease.done();
    let row = match row {
        Ok(row) => row,
        Err(err) => {
            return match AuthzError::from_pg(&err) {
                AuthzError::Unavailable(m) => Err(AuthzError::Unavailable(m)),
                AuthzError::Failed { .. } => Ok(vec![None; exprs.len()]),
            }
        }
    };
    let get = |e: tokio_postgres::Error| AuthzError::Unavailable(e.to_string());
    let mut out = Vec::with_capacity(exprs.len());
    for i in 0..exprs.len() {
        let value: Option<String> = row.try_get(2 * i).map_err(get)?;
        let ty: String = row.try_get(2 * i + 1).map_err(get)?;
        out.push(Some((value, ty)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<ShapeColumn<'static>> {
        [
            ("owner", "text"),
            ("o2", "uuid"),
            ("n", "integer"),
            ("Odd", "text"),
            ("f", "double precision"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (name, type_name))| ShapeColumn {
            name,
            type_name,
            source: Some(i),
            deterministic: true,
        })
        .collect()
    }

    #[test]
    fn deparsed_claims_comparisons_are_recognized() {
        let c = cols();
        // As pg_get_expr deparses them (Postgres 15).
        let a = "(owner = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))";
        let s = recognize(&[(true, a)], &c).expect("recognized");
        assert_eq!(s.terms.len(), 1);
        assert_eq!(s.terms[0].column, 0);
        assert_eq!(
            &*s.terms[0].expr,
            "( ( current_setting ( 'request.jwt.claims' :: text , true ) ) :: jsonb ->> 'sub' :: text )"
        );
        let p2 = "(( SELECT (((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'tenant'::text))::integer AS int4) = n)";
        assert_eq!(recognize(&[(true, p2)], &c).unwrap().terms[0].column, 2);
        let b = "((((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))::uuid = o2)";
        assert_eq!(recognize(&[(true, b)], &c).unwrap().terms[0].column, 1);
        let d = "(((\"Odd\" = current_setting('request.jwt.claim.sub'::text, true)) AND (n = 3)) OR (owner = ( SELECT ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))))";
        let s = recognize(&[(true, d), (false, b)], &c).expect("recognized");
        assert_eq!(s.terms.len(), 4);
        assert!(matches!(&s.permissive[0], Formula::Or(v) if v.len() == 2));
        assert_eq!(s.restrictive.len(), 1);
    }

    #[test]
    fn index_terms_cover_every_visible_row() {
        let c = cols();
        let own = "(owner = ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))";
        let s = recognize(&[(true, own)], &c).unwrap();
        assert_eq!(s.index_terms(), Some(vec![0]));
        // (a AND b) OR c: a (or b) or c must hold.
        let q = "(((\"Odd\" = current_setting('request.jwt.claim.sub'::text, true)) AND (n = 3)) OR (owner = 'x'::text))";
        let s = recognize(&[(true, q)], &c).unwrap();
        assert_eq!(s.index_terms(), Some(vec![0, 2]));
        // Two permissive policies: either one's term.
        let s = recognize(&[(true, own), (true, "(n = 3)")], &c).unwrap();
        assert_eq!(s.index_terms(), Some(vec![0, 1]));
        // A restrictive policy narrows, never widens: the permissive terms still index.
        let s = recognize(&[(true, own), (false, "(n = 3)")], &c).unwrap();
        assert_eq!(s.index_terms(), Some(vec![0]));
    }

    #[test]
    fn inlined_functions_are_looked_through() {
        let c = cols();
        // What EXPLAIN VERBOSE shows for Supabase's auth.uid() (search_path = pg_catalog).
        let body = "(COALESCE(NULLIF(current_setting('request.jwt.claim.sub'::text, true), ''::text), ((NULLIF(current_setting('request.jwt.claims'::text, true), ''::text))::jsonb ->> 'sub'::text)))::uuid";
        let mut f = Functions::default();
        f.insert("auth.uid", body);
        let q = "(o2 = auth.uid())";
        assert_eq!(recognize(&[(true, q)], &c), None, "not without the body");
        let s = recognize_with(&[(true, q)], &c, &f).expect("recognized");
        assert_eq!(&*s.terms[0].expr, "auth.uid ( )");
        assert!(s.terms[0].key.starts_with("auth.uid ( )\u{1f}"));
        assert!(s.terms[0].key.ends_with(body));
        // The sub-select form.
        let q2 = "(o2 = ( SELECT auth.uid() AS uid))";
        assert!(recognize_with(&[(true, q2)], &c, &f).is_some());
        // Another body, another key: a redefinition derives afresh.
        let mut g = Functions::default();
        g.insert(
            "auth.uid",
            "((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'other'::text)::uuid",
        );
        let s2 = recognize_with(&[(true, q)], &c, &g).expect("recognized");
        assert_ne!(s.terms[0].key, s2.terms[0].key);
        assert_eq!(s.terms[0].expr, s2.terms[0].expr);
        // Bodies that read anything but the claims are not looked through.
        for bad in [
            "public.current_setting('request.jwt.claims'::text, true)",
            "( SELECT m.who FROM members m)",
            "(current_setting('search_path'::text))::uuid",
            "auth.uid()",
            "COALESCE(NULLIF(now(), now()))",
        ] {
            let mut h = Functions::default();
            h.insert("auth.uid", bad);
            assert_eq!(recognize_with(&[(true, q)], &c, &h), None, "{bad}");
        }
        // A comma outside COALESCE/NULLIF arguments stays refused.
        let mut h = Functions::default();
        h.insert("auth.uid", "(NULLIF('a'::text, 'b'::text), 'c'::text)");
        assert_eq!(recognize_with(&[(true, q)], &c, &h), None);
        assert_eq!(
            called_functions(&[q, q2, "(owner = \"Auth\".uid())", "(owner = a.b.c())"]),
            vec![("auth".to_string(), "uid".to_string())]
        );
    }

    #[test]
    fn anything_else_stays_per_group() {
        let c = cols();
        for q in [
            "rls_bench_is_mine(owner)",
            "(owner = auth.uid())",
            "(owner <> ((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text))",
            "(NOT (owner = 'x'::text))",
            "(owner = current_setting('search_path'::text))",
            "(owner = (n)::text)",
            "(owner = ( SELECT m.owner FROM members m))",
            "(owner = ( SELECT 'a'::text AS x FROM members))",
            "(f = (3)::double precision)",
            "(owner = lower(((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'sub'::text)))",
            "((owner = 'a'::text) IS TRUE)",
            "(owner = E'a'::text)",
            "(owner = owner)",
        ] {
            assert_eq!(recognize(&[(true, q)], &c), None, "{q}");
        }
        // A restrictive policy alone shows nothing: not a shape (RowRule::Nothing decides).
        let a = "(owner = 'a'::text)";
        assert_eq!(recognize(&[(false, a)], &c), None);
        // One unrecognized policy among recognized ones: the table stays per group.
        assert_eq!(recognize(&[(true, a), (true, "rls_fn(owner)")], &c), None);
        // A nondeterministic collation: text equality is not byte equality.
        let mut c2 = cols();
        c2[0].deterministic = false;
        assert_eq!(recognize(&[(true, a)], &c2), None);
    }

    fn present(text: &str) -> Value {
        Value::Present {
            text: text.into(),
            json: format!("{text:?}").into(),
        }
    }

    #[test]
    fn nulls_and_types_never_show_a_row() {
        let c = cols();
        let q = "((owner = 'a'::text) OR (n = 3))";
        let s = recognize(&[(true, q)], &c).unwrap();
        let row = |owner: Option<&str>, n: Option<&str>| {
            vec![
                owner.map_or(Value::Null, present),
                Value::Null,
                n.map_or(Value::Null, present),
            ]
        };
        let d: Vec<Derived> = vec![
            Some((Some("a".into()), "text".into())),
            Some((Some("3".into()), "integer".into())),
        ];
        let mut values = Vec::new();
        assert!(s.resolve_into(
            |e| s.terms.iter().position(|t| t.expr == *e).map(|i| &d[i]),
            |_| None,
            &mut values
        ));
        assert!(s.visible(&row(Some("a"), None), &values));
        assert!(s.visible(&row(None, Some("3")), &values));
        assert!(!s.visible(&row(Some("b"), Some("4")), &values));
        assert!(!s.visible(&row(None, None), &values));
        // E of another type than its column: unusable (falls back to the check).
        let wrong: Vec<Derived> = vec![
            Some((Some("a".into()), "text".into())),
            Some((Some("3".into()), "bigint".into())),
        ];
        let mut none = Vec::new();
        assert!(!s.resolve_into(
            |e| s.terms.iter().position(|t| t.expr == *e).map(|i| &wrong[i]),
            |_| None,
            &mut none
        ));
        // A NULL E matches nothing.
        let null: Vec<Derived> = vec![Some((None, "text".into())), Some((None, "integer".into()))];
        let mut values = Vec::new();
        assert!(s.resolve_into(
            |e| s.terms.iter().position(|t| t.expr == *e).map(|i| &null[i]),
            |_| None,
            &mut values
        ));
        assert!(!s.visible(&row(Some("a"), Some("3")), &values));
    }

    fn member_context(fresh: bool) -> Functions {
        let mut f = Functions::default();
        f.insert(
            "auth.uid",
            "(NULLIF(current_setting('request.jwt.claim.sub'::text, true), ''::text))::uuid",
        );
        f.tables.push(MemberTable {
            name: "public.members".into(),
            relid: 77,
            columns: vec![
                ("room".into(), "integer".into(), true),
                ("who".into(), "uuid".into(), true),
                ("note".into(), "text".into(), true),
            ],
            fresh,
        });
        f.outer = Some("msgs".into());
        f
    }

    #[test]
    fn membership_sub_selects_are_recognized_as_deparsed() {
        let c = cols();
        let f = member_context(true);
        // What pg_get_expr prints for the two Supabase forms (Postgres 15,
        // search_path = pg_catalog), for a policy on table msgs (n is the room column).
        let a = "(n IN ( SELECT m.room\n   FROM public.members m\n  WHERE (m.who = auth.uid())))";
        let b = "(EXISTS ( SELECT 1\n   FROM public.members m\n  WHERE ((m.room = msgs.n) AND (m.who = auth.uid()))))";
        let d = "(EXISTS ( SELECT 1\n   FROM public.members\n  WHERE ((members.room = msgs.n) AND (members.who = ( SELECT auth.uid() AS uid)))))";
        for q in [a, b, d] {
            let s = recognize_with(&[(true, q)], &c, &f).unwrap_or_else(|| panic!("{q}"));
            assert_eq!(s.terms.len(), 1);
            assert_eq!(s.terms[0].column, 2);
            assert_eq!(s.terms[0].set, Some(77));
            assert!(
                s.terms[0]
                    .expr
                    .starts_with("SELECT ARRAY(SELECT DISTINCT ("),
                "{}",
                s.terms[0].expr
            );
            assert!(s.has_sets());
            assert_eq!(s.index_terms(), Some(vec![0]));
        }
        let s = recognize_with(&[(true, a)], &c, &f).unwrap();
        assert_eq!(
            &*s.terms[0].expr,
            "SELECT ARRAY(SELECT DISTINCT (m.room)::pg_catalog.text FROM public.members m WHERE (m.who = auth.uid ( )))"
        );
        // Combined with a claims-only term.
        let own = "(o2 = auth.uid())";
        let s = recognize_with(&[(true, own), (true, b)], &c, &f).expect("both");
        assert_eq!(s.terms.len(), 2);
        // A set decides by membership of the row's column text.
        let set: MemberSet = ["3".into(), "5".into()].into_iter().collect();
        let values = [TermValue::Set(&set)];
        let s = recognize_with(&[(true, a)], &c, &f).unwrap();
        let row = |n: Option<&str>| vec![Value::Null, Value::Null, n.map_or(Value::Null, present)];
        assert!(s.visible(&row(Some("5")), &values));
        assert!(!s.visible(&row(Some("4")), &values));
        assert!(!s.visible(&row(None), &values));
    }

    #[test]
    fn other_sub_selects_stay_per_group() {
        let c = cols();
        let f = member_context(true);
        for q in [
            // An unqualified column inside binds to the sub-select's table: deparsed
            // qualified with the alias, it correlates nothing.
            "(EXISTS ( SELECT\n   FROM public.members m\n  WHERE ((m.who = auth.uid()) AND (m.room = m.room))))",
            // Another operator, a second correlation, OR, NOT, a function of the row.
            "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.room = msgs.n) AND (m.who <> auth.uid()))))",
            "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.room = msgs.n) AND (m.note = msgs.owner))))",
            "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.room = msgs.n) OR (m.who = auth.uid()))))",
            "(NOT (n IN ( SELECT m.room FROM public.members m WHERE (m.who = auth.uid()))))",
            "(EXISTS ( SELECT 1 FROM public.members m WHERE ((m.room = msgs.n) AND (m.who = auth.uid())) LIMIT 1))",
            // The correlation in an IN, a column of another type, a table not known fresh.
            "(n IN ( SELECT m.room FROM public.members m WHERE (m.room = msgs.n)))",
            "(owner IN ( SELECT m.room FROM public.members m WHERE (m.who = auth.uid())))",
            "(n IN ( SELECT m.room FROM public.other m WHERE (m.who = auth.uid())))",
            "(n IN ( SELECT m.room FROM public.members m JOIN public.members k ON true))",
            "(n IN ( SELECT m.room FROM public.members m, public.members k WHERE (m.who = auth.uid())))",
            "(n IN ( SELECT max(m.room) AS max FROM public.members m WHERE (m.who = auth.uid())))",
            "(EXISTS ( SELECT 2 FROM public.members m WHERE (m.room = msgs.n)))",
        ] {
            assert_eq!(recognize_with(&[(true, q)], &c, &f), None, "{q}");
        }
        let stale = member_context(false);
        let a = "(n IN ( SELECT m.room FROM public.members m WHERE (m.who = auth.uid())))";
        assert_eq!(recognize_with(&[(true, a)], &c, &stale), None);
        assert_eq!(
            member_tables(&[a, "(x IN ( SELECT \"Q\".y FROM \"Odd\".t))"]),
            vec![("public".to_string(), "members".to_string())]
        );
    }

    /// The membership-shaped policies of the differential test (tests/rls.rs), as Postgres 15
    /// deparses them, are recognized together: that test really takes the set path.
    #[test]
    fn the_differential_membership_policies_are_recognized() {
        let c: Vec<ShapeColumn<'static>> = [
            ("id", "bigint"),
            ("owner", "text"),
            ("tenant", "integer"),
            ("team", "integer"),
            ("score", "integer"),
            ("secret", "text"),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (name, type_name))| ShapeColumn {
            name,
            type_name,
            source: Some(i),
            deterministic: true,
        })
        .collect();
        let mut f = Functions::default();
        f.insert(
            "auth.jwt",
            "(COALESCE(NULLIF(current_setting('request.jwt.claims'::text, true), ''::text), '{}'::text))::jsonb",
        );
        f.insert(
            "auth.uid",
            "NULLIF(current_setting('request.jwt.claim.sub'::text, true), ''::text)",
        );
        f.tables.push(MemberTable {
            name: "public.members".into(),
            relid: 5,
            columns: vec![
                ("team".into(), "integer".into(), true),
                ("member".into(), "text".into(), true),
            ],
            fresh: true,
        });
        f.outer = Some("docs0".into());
        let p0 =
            "(team IN ( SELECT m.team\n   FROM public.members m\n  WHERE (m.member = auth.uid())))";
        let p1 = "(EXISTS ( SELECT 1\n   FROM public.members m\n  WHERE ((m.team = docs0.team) AND (m.member = auth.uid()))))";
        let p2 = "((owner = auth.uid()) AND (tenant = ((auth.jwt() ->> 'tenant'::text))::integer))";
        let r = "((tenant = (((current_setting('request.jwt.claims'::text, true))::jsonb ->> 'tenant'::text))::integer) OR (owner = 'u4'::text))";
        let s = recognize_with(&[(true, p0), (true, p1), (true, p2), (false, r)], &c, &f)
            .expect("recognized");
        assert_eq!(s.terms.iter().filter(|t| t.set.is_some()).count(), 2);
    }
}
