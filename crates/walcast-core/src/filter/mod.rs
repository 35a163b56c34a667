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
//!            | ( "match" | "imatch" ) "." value            (Postgres's ~ and ~*; see `regex`)
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
//! a value that must keep leading or trailing spaces has to be quoted. `match`/`imatch` take
//! a Postgres regular expression (ARE); the subset whose meaning is reproduced exactly is
//! evaluated, and anything else is refused at subscribe time with the reason (see `regex`):
//! a filter that silently disagrees with SQL is worse than one that is refused.
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
//!   - `match/imatch`: text, varchar and name columns, matched as `~`/`~*` under the `C`
//!     locale (ASCII classes and case folding; see `regex`).
//!
//! Invariants: parsing and evaluation never panic on any input (everything here is external
//! input: the filter comes from a client, the values from the WAL); nothing is indexed
//! unchecked; exact types never go through floating point; `like`/`ilike` matching is linear
//! in the value whatever the pattern: O(pattern + value × ⌈c / 64⌉), c being the length of
//! the longest `%`-delimited run with a `_` between two literals (so the factor is 1 for runs
//! up to 64 characters, and c is never searched beyond the value's length), since the runs
//! are searched left to right, each from where the previous one ended, and never again from
//! the start (see `like`); `match`/`imatch` run a size-bounded automaton, never a backtracker,
//! so they are O(automaton × value) with the automaton bounded at compile time (see `regex`).
//!
//! # Modules
//!
//! [`grammar`] parses the text, [`eval`] compiles it against the columns and evaluates it,
//! `scalar` parses typed values (numbers, booleans, uuids, timestamps), `like` matches
//! `like`/`ilike` patterns and `regex` compiles `match`/`imatch` patterns.

pub mod eval;
pub mod grammar;
mod like;
pub mod regex;
mod scalar;

pub use eval::{ColumnInfo, CompiledFilter};
pub use grammar::{
    parse, CmpOp, Condition, Filter, FilterError, InItem, IsValue, Operation, MAX_IN_VALUES,
};
pub use scalar::{Decimal, Instant};
