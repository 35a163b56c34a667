//! pgoutput text values → JSON, with Postgres `to_jsonb(value)` parity.
//!
//! Supabase's reference path builds each column with `to_jsonb(text::type)`, so that is the
//! contract: for a value `v` of type `t`, [`write_json`] on `v::text` appends JSON that is
//! equal, as `jsonb`, to `to_jsonb(v)`. The integration test `tests/values.rs` checks this
//! against a real server for every built-in type family.
//!
//! It relies on the replication session settings pinned by walcast (the text pgoutput sends
//! is produced by the walsender's output functions, so these decide its shape):
//!
//! | setting | value | why |
//! |---|---|---|
//! | `DateStyle` | `ISO` | dates/timestamps arrive as `YYYY-MM-DD HH:MM:SS…`, which is what we turn into ISO 8601 |
//! | `TimeZone` | `UTC` | timestamptz arrives as `…+00`; to_jsonb renders in the session zone too |
//! | `IntervalStyle` | `postgres` | interval text is passed through as a string |
//! | `extra_float_digits` | `3` (≥ 1) | floats arrive in shortest round-trip form, so no digits are lost |
//! | `bytea_output` | `hex` | bytea arrives as `\x…`, which to_jsonb also emits |
//! | `client_encoding` | `UTF8` | text is valid UTF-8 (it is a `&str` here) |
//!
//! Rules (by [`TypeKind`]):
//!
//! - `bool`: `t`/`f` → `true`/`false`.
//! - `int2/int4/int8`, `numeric`: JSON numbers with the digits exactly as sent (never through
//!   `f64`: int8 and numeric exceed its precision; numeric keeps its scale, `1.50`). Numeric
//!   `NaN`/`Infinity`/`-Infinity` → strings.
//! - `float4/float8`: to_jsonb feeds the float's text through `numeric_in`, and jsonb prints
//!   numerics without exponent, so `1e+100` → `1` followed by 100 zeros, `1.5e-07` →
//!   `0.00000015`, `-0` → `0`. We render the same plain decimal (scale =
//!   max(0, fraction digits − exponent), like `numeric_in`). `NaN`/`±Infinity` → strings.
//! - `json`: embedded verbatim (whitespace and duplicate keys kept, like `to_json`) once it is
//!   validated; `jsonb`: embedded. A document that does not validate (including lone UTF-16
//!   surrogate escapes, which `json` accepts but JSON parsers and `jsonb` reject) is an error.
//! - `date`: the text (`2024-05-06`, `infinity`, `0044-03-15 BC`, `12345-01-02`) as a string;
//!   to_jsonb's XSD date style prints dates exactly like ISO.
//! - `timestamp`/`timestamptz`: the space between date and time becomes `T`; a `+HH` offset
//!   widens to `+HH:MM` (XSD style always prints minutes); ` BC` stays a suffix;
//!   `infinity`/`-infinity` stay as they are.
//! - `oid`, `bytea`, `text`-likes (bpchar keeps trailing blanks), `uuid`, `time`, `timetz`,
//!   `interval`, `money`, network, bit strings, geometric, `tsvector`, `xml`, ranges, enums,
//!   and anything unknown: the text as a JSON string.
//! - domains: converted as their base type.
//! - composites `(1,"a b",,t)`: an object of the fields in attnum order, each converted by its
//!   type (unquoted empty = `null`, `""` = empty string, `\x` and `""` escapes).
//! - arrays `{1,NULL}`, `{{1,2},{3,4}}`, `[0:1]={1,2}`: (nested) JSON arrays, elements
//!   converted by element type; unquoted `NULL` (any case) = `null`, quoted `"NULL"` = the
//!   string; elements separated by the element type's `typdelim`. `int2vector`/`oidvector`
//!   (space-separated, no braces) are arrays too, as in to_jsonb.
//!
//! Known deviations from to_jsonb:
//! - key order: to_jsonb builds a jsonb object (keys sorted by length, then bytes); we keep
//!   attnum order like `to_json`. Equal as jsonb.
//! - user base types with a cast to json (hstore → object, PostGIS geometry → GeoJSON) render
//!   as their text: to_jsonb would call the cast, which needs the server.
//! - `json` documents that jsonb cannot hold (`\u0000`, numbers beyond numeric's range) make
//!   to_jsonb fail; we embed them as they are (valid JSON, what `to_json` does). Documents
//!   with unpaired surrogate escapes are sent as strings (see above).
//! - The reference table lists `oid` among the JSON numbers; to_jsonb makes it a string, and
//!   so do we (parity wins).
//!
//! Malformed text never panics: parsers return [`ValueError`], [`write_json`] leaves `out` as
//! it was, and the caller falls back to the text as a JSON string ([`to_json_string`] does).
//! Work is proportional to the input; nothing is allocated except when an escaped array or
//! composite element has to be unescaped.

use std::borrow::Cow;

use crate::pg_type::{Oid, TypeInfo, TypeKind, TypeRegistry};

/// Nesting of types (domain → array → composite → …) we follow before giving up. Postgres
/// cannot build cycles, but a registry filled by hand could.
const MAX_TYPE_DEPTH: usize = 64;

/// Postgres's `MAXDIM`: array_out never prints more dimensions.
const MAX_ARRAY_DIMS: usize = 6;

/// Floats have at most 3 exponent digits; bounding it keeps the expanded decimal small even
/// for malformed text.
const MAX_FLOAT_EXPONENT: i64 = 400;

const INT2VECTOR_OID: Oid = 22;
const OIDVECTOR_OID: Oid = 30;

/// Why a value's text could not be converted. Every variant means the same thing to the
/// caller: the text was not what the type's output function produces, so send it as a
/// string instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid {what} text")]
    Invalid { what: &'static str },
    #[error("malformed {what} literal at byte {at}: {reason}")]
    Malformed {
        what: &'static str,
        at: usize,
        reason: &'static str,
    },
    #[error("composite literal does not have the type's {expected} fields")]
    FieldCount { expected: usize },
    #[error(
        "value nested deeper than {MAX_TYPE_DEPTH} types or {MAX_ARRAY_DIMS} array dimensions"
    )]
    TooDeep,
}

/// Appends the JSON for one non-null pgoutput text value of type `oid` to `out`.
///
/// On error `out` is left exactly as it was, so the caller can write a fallback.
pub fn write_json(
    registry: &TypeRegistry,
    oid: Oid,
    text: &str,
    out: &mut String,
) -> Result<(), ValueError> {
    let start = out.len();
    let result = write_value(registry, registry.get(oid), text, out, 0);
    if result.is_err() {
        out.truncate(start);
    }
    result
}

/// [`write_json`] into a new string, falling back to the text as a JSON string when the text
/// does not parse as its type.
pub fn to_json_string(registry: &TypeRegistry, oid: Oid, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    if write_json(registry, oid, text, &mut out).is_err() {
        write_json_string(text, &mut out);
    }
    out
}

/// Appends `s` as a JSON string literal. Valid JSON for any input: `"`, `\` and control
/// characters are escaped, everything else (including non-BMP characters) is kept as UTF-8.
pub fn write_json_string(s: &str, out: &mut String) {
    out.reserve(s.len() + 2);
    out.push('"');
    write_escaped(s, out);
    out.push('"');
}

/// Escape for each byte: 0 = none, `u` = `\u00XX`, else the character after the backslash.
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = b'u';
        b += 1;
    }
    table[0x08] = b'b';
    table[0x09] = b't';
    table[0x0a] = b'n';
    table[0x0c] = b'f';
    table[0x0d] = b'r';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

fn write_escaped(s: &str, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut run = 0;
    for (i, &byte) in s.as_bytes().iter().enumerate() {
        let escape = ESCAPES[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        // Escaped bytes are ASCII, so `run..i` always falls on character boundaries.
        out.push_str(s.get(run..i).unwrap_or_default());
        out.push('\\');
        if escape == b'u' {
            out.push_str("u00");
            out.push(char::from(HEX[usize::from(byte >> 4)]));
            out.push(char::from(HEX[usize::from(byte & 0xf)]));
        } else {
            out.push(char::from(escape));
        }
        run = i + 1;
    }
    out.push_str(s.get(run..).unwrap_or_default());
}

fn write_value(
    registry: &TypeRegistry,
    info: Option<&TypeInfo>,
    text: &str,
    out: &mut String,
    depth: usize,
) -> Result<(), ValueError> {
    if depth > MAX_TYPE_DEPTH {
        return Err(ValueError::TooDeep);
    }
    let Some(info) = info else {
        write_json_string(text, out);
        return Ok(());
    };
    match &info.kind {
        TypeKind::Bool => match text {
            "t" => out.push_str("true"),
            "f" => out.push_str("false"),
            _ => return Err(ValueError::Invalid { what: "bool" }),
        },
        TypeKind::Int => {
            if !is_json_integer(text.as_bytes()) {
                return Err(ValueError::Invalid { what: "integer" });
            }
            out.push_str(text);
        }
        TypeKind::Numeric => {
            if is_float_special(text) {
                write_json_string(text, out);
            } else if scan_number(text.as_bytes(), 0) == Some(text.len()) {
                out.push_str(text);
            } else {
                return Err(ValueError::Invalid { what: "numeric" });
            }
        }
        TypeKind::Float => {
            if is_float_special(text) {
                write_json_string(text, out);
            } else {
                write_float(text, out)?;
            }
        }
        TypeKind::Json | TypeKind::Jsonb => {
            validate_json(text)?;
            out.push_str(text);
        }
        TypeKind::Timestamp => write_timestamp(text, false, out),
        TypeKind::Timestamptz => write_timestamp(text, true, out),
        TypeKind::Domain { base } => {
            write_value(registry, registry.get(*base), text, out, depth + 1)?;
        }
        TypeKind::Composite { fields } => write_composite(registry, fields, text, out, depth)?,
        TypeKind::Array { element, delimiter } => {
            let element = registry.get(*element);
            if matches!(info.oid, INT2VECTOR_OID | OIDVECTOR_OID) && !text.starts_with('{') {
                write_vector(registry, element, text, out, depth)?;
            } else {
                let mut parser = ArrayParser {
                    registry,
                    element,
                    delimiter: *delimiter,
                    text,
                    pos: 0,
                    depth,
                };
                parser.write(out)?;
            }
        }
        TypeKind::Bytea
        | TypeKind::Date
        | TypeKind::Text
        | TypeKind::Enum
        | TypeKind::Range { .. }
        | TypeKind::Unknown => write_json_string(text, out),
    }
    Ok(())
}

/// float8out/numeric_out spell the specials like this; to_jsonb turns them into strings
/// because JSON has no such numbers.
fn is_float_special(text: &str) -> bool {
    matches!(text, "NaN" | "Infinity" | "-Infinity")
}

/// `-?(0|[1-9][0-9]*)`
fn is_json_integer(b: &[u8]) -> bool {
    let digits = b.strip_prefix(b"-").unwrap_or(b);
    match digits {
        [b'0'] => true,
        [b'1'..=b'9', rest @ ..] => rest.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// Scans an RFC 8259 number starting at `i`; returns the index after it.
fn scan_number(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = skip_digits(b, i + 1),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = skip_digits(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let end = skip_digits(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

fn skip_digits(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// Writes float text the way `numeric_in` + jsonb's numeric output would print it: plain
/// decimal, scale = max(0, fraction digits − exponent), no sign on zero.
fn write_float(text: &str, out: &mut String) -> Result<(), ValueError> {
    const INVALID: ValueError = ValueError::Invalid { what: "float" };
    let b = text.as_bytes();
    let negative = b.first() == Some(&b'-');
    let int_start = usize::from(negative);
    let int_end = skip_digits(b, int_start);
    if int_end == int_start {
        return Err(INVALID);
    }
    let (frac_start, frac_end) = if b.get(int_end) == Some(&b'.') {
        (int_end + 1, skip_digits(b, int_end + 1))
    } else {
        (int_end, int_end)
    };
    let mut exponent: i64 = 0;
    let mut i = frac_end;
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        let exp_negative = match b.get(i) {
            Some(b'-') => {
                i += 1;
                true
            }
            Some(b'+') => {
                i += 1;
                false
            }
            _ => false,
        };
        let exp_end = skip_digits(b, i);
        if exp_end == i {
            return Err(INVALID);
        }
        for &d in &b[i..exp_end] {
            exponent = exponent * 10 + i64::from(d - b'0');
            if exponent > MAX_FLOAT_EXPONENT {
                return Err(INVALID);
            }
        }
        if exp_negative {
            exponent = -exponent;
        }
        i = exp_end;
    }
    if i != b.len() {
        return Err(INVALID);
    }

    let int_digits = &b[int_start..int_end];
    let frac_digits = &b[frac_start..frac_end];
    // The mantissa digits as one sequence with the decimal point after `point` of them.
    let digit_count = (int_digits.len() + frac_digits.len()) as i64;
    let digit_at = |pos: i64| -> char {
        if pos < 0 || pos >= digit_count {
            return '0';
        }
        let pos = pos as usize;
        let d = if pos < int_digits.len() {
            int_digits[pos]
        } else {
            frac_digits[pos - int_digits.len()]
        };
        char::from(d)
    };
    let point = int_digits.len() as i64 + exponent;
    let scale = (frac_digits.len() as i64 - exponent).max(0);

    let is_zero = int_digits.iter().chain(frac_digits).all(|&d| d == b'0');
    if negative && !is_zero {
        out.push('-');
    }
    match (0..point.max(0)).find(|&p| digit_at(p) != '0') {
        Some(first) => (first..point).for_each(|p| out.push(digit_at(p))),
        None => out.push('0'),
    }
    if scale > 0 {
        out.push('.');
        (point..point + scale).for_each(|p| out.push(digit_at(p)));
    }
    Ok(())
}

/// ISO `YYYY-MM-DD HH:MM:SS[.f][±HH[:MM[:SS]]][ BC]` → to_jsonb's XSD form. Text of another
/// shape (`infinity`, `-infinity`) is a string as it is, which is also what to_jsonb does.
fn write_timestamp(text: &str, with_offset: bool, out: &mut String) {
    let (body, era) = match text.strip_suffix(" BC") {
        Some(body) => (body, " BC"),
        None => (text, ""),
    };
    let Some((date, time)) = body.split_once(' ') else {
        write_json_string(text, out);
        return;
    };
    out.reserve(text.len() + 6);
    out.push('"');
    write_escaped(date, out);
    out.push('T');
    write_escaped(time, out);
    if with_offset {
        // The offset is the last sign in the time part (the date's '-' are before the 'T');
        // ISO prints minutes only when non-zero, XSD always does.
        let offset = time.rfind(['+', '-']).map(|at| &time[at + 1..]);
        if offset.is_some_and(|o| !o.is_empty() && o.bytes().all(|c| c.is_ascii_digit())) {
            out.push_str(":00");
        }
    }
    out.push_str(era);
    out.push('"');
}

/// Collects a literal's unescaped text, borrowing from the source until an escape or quote
/// forces a copy. Positions handed to it are always those of ASCII bytes, so every slice falls
/// on character boundaries.
struct Unescaped<'a> {
    src: &'a str,
    run_start: usize,
    owned: Option<String>,
}

impl<'a> Unescaped<'a> {
    fn new(src: &'a str, start: usize) -> Self {
        Self {
            src,
            run_start: start,
            owned: None,
        }
    }

    /// Leaves the byte at `at` (a quote or a backslash) out of the value.
    fn drop_byte(&mut self, at: usize) {
        let run = self.src.get(self.run_start..at).unwrap_or_default();
        self.owned.get_or_insert_with(String::new).push_str(run);
        self.run_start = at + 1;
    }

    fn finish(self, end: usize) -> Cow<'a, str> {
        let run = self.src.get(self.run_start..end).unwrap_or_default();
        match self.owned {
            None => Cow::Borrowed(run),
            Some(mut owned) => {
                owned.push_str(run);
                Cow::Owned(owned)
            }
        }
    }
}

/// `array_isspace`: the whitespace array_in skips around elements.
fn is_array_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | b'\x0b' | b'\x0c')
}

struct ArrayParser<'r, 't> {
    registry: &'r TypeRegistry,
    element: Option<&'r TypeInfo>,
    delimiter: u8,
    text: &'t str,
    pos: usize,
    depth: usize,
}

impl<'t> ArrayParser<'_, 't> {
    fn malformed(&self, reason: &'static str) -> ValueError {
        ValueError::Malformed {
            what: "array",
            at: self.pos,
            reason,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_array_space) {
            self.pos += 1;
        }
    }

    fn write(&mut self, out: &mut String) -> Result<(), ValueError> {
        // A non-ASCII delimiter could split a character; no real typdelim is one.
        if !self.delimiter.is_ascii()
            || matches!(self.delimiter, b'"' | b'\\' | b'{' | b'}')
            || is_array_space(self.delimiter)
        {
            return Err(self.malformed("unusable delimiter"));
        }
        self.skip_space();
        if self.peek() == Some(b'[') {
            self.skip_dimensions()?;
        }
        if self.peek() != Some(b'{') {
            return Err(self.malformed("expected '{'"));
        }
        self.write_level(out, 1)?;
        self.skip_space();
        if self.pos != self.text.len() {
            return Err(self.malformed("text after the array"));
        }
        Ok(())
    }

    /// `[lb:ub][lb:ub]=`: array_out prints bounds when a lower bound is not 1; JSON arrays
    /// have no bounds, so to_jsonb drops them and so do we.
    fn skip_dimensions(&mut self) -> Result<(), ValueError> {
        while self.peek() == Some(b'[') {
            self.pos += 1;
            let bounds_start = self.pos;
            while self
                .peek()
                .is_some_and(|b| b.is_ascii_digit() || matches!(b, b':' | b'-' | b'+'))
            {
                self.pos += 1;
            }
            if self.pos == bounds_start || self.peek() != Some(b']') {
                return Err(self.malformed("bad dimension bounds"));
            }
            self.pos += 1;
            self.skip_space();
        }
        if self.peek() != Some(b'=') {
            return Err(self.malformed("expected '=' after dimensions"));
        }
        self.pos += 1;
        self.skip_space();
        Ok(())
    }

    /// At a `{`: writes one dimension (and the ones nested in it) as a JSON array.
    fn write_level(&mut self, out: &mut String, dims: usize) -> Result<(), ValueError> {
        if dims > MAX_ARRAY_DIMS {
            return Err(ValueError::TooDeep);
        }
        self.pos += 1;
        out.push('[');
        self.skip_space();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            out.push(']');
            return Ok(());
        }
        let mut first = true;
        loop {
            self.skip_space();
            if !first {
                out.push(',');
            }
            first = false;
            match self.peek() {
                Some(b'{') => self.write_level(out, dims + 1)?,
                Some(b'"') => {
                    let element = self.quoted()?;
                    self.write_element(&element, out)?;
                }
                Some(b'}') => return Err(self.malformed("empty element")),
                Some(b) if b == self.delimiter => return Err(self.malformed("empty element")),
                Some(_) => {
                    let (element, escaped) = self.unquoted()?;
                    if !escaped && element.eq_ignore_ascii_case("NULL") {
                        out.push_str("null");
                    } else {
                        self.write_element(&element, out)?;
                    }
                }
                None => return Err(self.malformed("unterminated array")),
            }
            self.skip_space();
            match self.peek() {
                Some(b'}') => {
                    self.pos += 1;
                    out.push(']');
                    return Ok(());
                }
                Some(b) if b == self.delimiter => self.pos += 1,
                Some(_) => return Err(self.malformed("expected delimiter or '}'")),
                None => return Err(self.malformed("unterminated array")),
            }
        }
    }

    fn write_element(&self, text: &str, out: &mut String) -> Result<(), ValueError> {
        write_value(self.registry, self.element, text, out, self.depth + 1)
    }

    /// At a `"`: the element up to the closing quote, `\x` meaning `x`.
    fn quoted(&mut self) -> Result<Cow<'t, str>, ValueError> {
        let bytes = self.text.as_bytes();
        self.pos += 1;
        let mut value = Unescaped::new(self.text, self.pos);
        loop {
            match bytes.get(self.pos) {
                Some(b'"') => {
                    let value = value.finish(self.pos);
                    self.pos += 1;
                    return Ok(value);
                }
                Some(b'\\') => {
                    value.drop_byte(self.pos);
                    // Skips the escaped byte so a quote or backslash there is literal; a
                    // multi-byte character just continues the run.
                    self.pos += 2;
                }
                Some(_) => self.pos += 1,
                None => return Err(self.malformed("unterminated quoted element")),
            }
        }
    }

    /// An unquoted element up to the delimiter or `}`, trailing whitespace trimmed. Returns
    /// whether it contained escapes (an escaped `NULL` is the string, not null).
    fn unquoted(&mut self) -> Result<(Cow<'t, str>, bool), ValueError> {
        let bytes = self.text.as_bytes();
        let mut value = Unescaped::new(self.text, self.pos);
        let mut escaped = false;
        // End of the value without trailing (unescaped) whitespace.
        let mut end = self.pos;
        loop {
            match bytes.get(self.pos) {
                Some(b'}') => break,
                Some(&b) if b == self.delimiter => break,
                Some(b'\\') => {
                    if self.pos + 1 >= bytes.len() {
                        return Err(self.malformed("backslash at end"));
                    }
                    value.drop_byte(self.pos);
                    escaped = true;
                    self.pos += 2;
                    end = self.pos;
                }
                Some(b'"' | b'{') => return Err(self.malformed("quote or brace in element")),
                Some(&b) => {
                    self.pos += 1;
                    if !is_array_space(b) {
                        end = self.pos;
                    }
                }
                None => return Err(self.malformed("unterminated array")),
            }
        }
        // `end` can sit inside a multi-byte escaped character only if the text ended there,
        // which the loop above rejects; finish() is panic-free regardless.
        Ok((value.finish(end), escaped))
    }
}

/// int2vector/oidvector output: elements separated by single spaces, no braces.
fn write_vector(
    registry: &TypeRegistry,
    element: Option<&TypeInfo>,
    text: &str,
    out: &mut String,
    depth: usize,
) -> Result<(), ValueError> {
    out.push('[');
    for (i, item) in text.split_ascii_whitespace().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_value(registry, element, item, out, depth + 1)?;
    }
    out.push(']');
    Ok(())
}

/// `record_out` text → JSON object. Follows `record_in`'s reading rules: an empty unquoted
/// field is NULL, quotes may appear anywhere in a field and toggle quoting, `\x` is `x`, and
/// `""` inside quotes is `"`.
fn write_composite(
    registry: &TypeRegistry,
    fields: &[(String, Oid)],
    text: &str,
    out: &mut String,
    depth: usize,
) -> Result<(), ValueError> {
    let bytes = text.as_bytes();
    let malformed = |at: usize, reason: &'static str| ValueError::Malformed {
        what: "composite",
        at,
        reason,
    };
    let mut pos = 0;
    while bytes.get(pos).is_some_and(u8::is_ascii_whitespace) {
        pos += 1;
    }
    if bytes.get(pos) != Some(&b'(') {
        return Err(malformed(pos, "expected '('"));
    }
    pos += 1;
    out.push('{');
    for (index, (name, oid)) in fields.iter().enumerate() {
        if index > 0 {
            if bytes.get(pos) != Some(&b',') {
                return Err(ValueError::FieldCount {
                    expected: fields.len(),
                });
            }
            pos += 1;
            out.push(',');
        }
        write_json_string(name, out);
        out.push(':');
        if matches!(bytes.get(pos), Some(b',' | b')')) {
            out.push_str("null");
            continue;
        }
        let mut value = Unescaped::new(text, pos);
        let mut in_quotes = false;
        loop {
            match bytes.get(pos) {
                None => return Err(malformed(pos, "unterminated composite")),
                Some(b',' | b')') if !in_quotes => break,
                Some(b'\\') => {
                    if pos + 1 >= bytes.len() {
                        return Err(malformed(pos, "backslash at end"));
                    }
                    value.drop_byte(pos);
                    pos += 2;
                }
                Some(b'"') if in_quotes && bytes.get(pos + 1) == Some(&b'"') => {
                    value.drop_byte(pos);
                    pos += 2;
                }
                Some(b'"') => {
                    value.drop_byte(pos);
                    in_quotes = !in_quotes;
                    pos += 1;
                }
                Some(_) => pos += 1,
            }
        }
        let value = value.finish(pos);
        write_value(registry, registry.get(*oid), &value, out, depth + 1)?;
    }
    if bytes.get(pos) != Some(&b')') {
        return Err(ValueError::FieldCount {
            expected: fields.len(),
        });
    }
    pos += 1;
    if !bytes[pos..].iter().all(u8::is_ascii_whitespace) {
        return Err(malformed(pos, "text after the composite"));
    }
    out.push('}');
    Ok(())
}

/// Bracket nesting for [`validate_json`]: the first 64 levels live in a bitmask so ordinary
/// documents never allocate.
struct Nesting {
    bits: u64,
    depth: usize,
    deeper: Vec<bool>,
}

impl Nesting {
    fn push(&mut self, is_object: bool) {
        if self.depth < 64 {
            self.bits = (self.bits & !(1 << self.depth)) | (u64::from(is_object) << self.depth);
        } else {
            self.deeper.push(is_object);
        }
        self.depth += 1;
    }

    /// Whether the innermost open bracket is an object; None at top level.
    fn top_is_object(&self) -> Option<bool> {
        match self.depth {
            0 => None,
            d if d <= 64 => Some(self.bits & (1 << (d - 1)) != 0),
            _ => self.deeper.last().copied(),
        }
    }

    fn pop(&mut self) {
        if self.depth > 64 {
            self.deeper.pop();
        }
        self.depth = self.depth.saturating_sub(1);
    }
}

/// Strict RFC 8259 check of a whole document, iterative so depth costs no stack. Beyond the
/// grammar it rejects unpaired UTF-16 surrogate escapes: Postgres's `json` type lets them
/// through, but jsonb and common JSON parsers refuse them, so embedding one would break the
/// message.
fn validate_json(text: &str) -> Result<(), ValueError> {
    let b = text.as_bytes();
    let invalid = |at: usize| ValueError::Malformed {
        what: "json",
        at,
        reason: "not a JSON document",
    };
    let skip_ws = |mut i: usize| {
        while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            i += 1;
        }
        i
    };
    // After the opening quote of an object key: the key, then the ':'.
    let key = |i: usize| -> Result<usize, ValueError> {
        if b.get(i) != Some(&b'"') {
            return Err(invalid(i));
        }
        let i = skip_ws(scan_string(b, i + 1).ok_or(invalid(i))?);
        if b.get(i) != Some(&b':') {
            return Err(invalid(i));
        }
        Ok(i + 1)
    };
    let mut nesting = Nesting {
        bits: 0,
        depth: 0,
        deeper: Vec::new(),
    };
    let mut i = 0;
    'value: loop {
        i = skip_ws(i);
        i = match b.get(i) {
            Some(b'{') => {
                let j = skip_ws(i + 1);
                if b.get(j) == Some(&b'}') {
                    j + 1
                } else {
                    nesting.push(true);
                    i = key(j)?;
                    continue 'value;
                }
            }
            Some(b'[') => {
                let j = skip_ws(i + 1);
                if b.get(j) == Some(&b']') {
                    j + 1
                } else {
                    nesting.push(false);
                    i = j;
                    continue 'value;
                }
            }
            Some(b'"') => scan_string(b, i + 1).ok_or(invalid(i))?,
            Some(b't') if b[i..].starts_with(b"true") => i + 4,
            Some(b'f') if b[i..].starts_with(b"false") => i + 5,
            Some(b'n') if b[i..].starts_with(b"null") => i + 4,
            Some(b'-' | b'0'..=b'9') => scan_number(b, i).ok_or(invalid(i))?,
            _ => return Err(invalid(i)),
        };
        // After a complete value: close brackets until a ',' asks for another value.
        loop {
            i = skip_ws(i);
            match (nesting.top_is_object(), b.get(i)) {
                (None, None) => return Ok(()),
                (None, Some(_)) => return Err(invalid(i)),
                (Some(true), Some(b',')) => {
                    i = key(skip_ws(i + 1))?;
                    continue 'value;
                }
                (Some(false), Some(b',')) => {
                    i += 1;
                    continue 'value;
                }
                (Some(true), Some(b'}')) | (Some(false), Some(b']')) => {
                    nesting.pop();
                    i += 1;
                }
                (Some(_), _) => return Err(invalid(i)),
            }
        }
    }
}

/// After an opening quote: the index after the closing quote, or None if the string is not
/// valid JSON (raw control character, bad escape, unpaired surrogate, unterminated).
fn scan_string(b: &[u8], mut i: usize) -> Option<usize> {
    let hex4 = |at: usize| -> Option<u16> {
        let digits = b.get(at..at + 4)?;
        let mut value = 0u16;
        for &d in digits {
            value = value * 16 + u16::from(char::from(d).to_digit(16)? as u8);
        }
        Some(value)
    };
    loop {
        match *b.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => match *b.get(i + 1)? {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => i += 2,
                b'u' => {
                    let unit = hex4(i + 2)?;
                    i += 6;
                    if (0xDC00..0xE000).contains(&unit) {
                        return None;
                    }
                    if (0xD800..0xDC00).contains(&unit) {
                        if b.get(i..i + 2)? != b"\\u" {
                            return None;
                        }
                        if !(0xDC00..0xE000).contains(&hex4(i + 2)?) {
                            return None;
                        }
                        i += 6;
                    }
                }
                _ => return None,
            },
            0x00..=0x1f => return None,
            _ => i += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg_type::TypeRow;

    const MOOD: Oid = 50_000;
    const POSINT: Oid = 50_001;
    const INNER: Oid = 50_002;
    const OUTER: Oid = 50_003;
    const INNER_ARRAY: Oid = 50_004;
    const INT_LIST: Oid = 50_005;
    const MOOD_ARRAY: Oid = 50_006;
    const PIPE_ARRAY: Oid = 50_007;
    const CYCLE: Oid = 50_008;

    fn row(oid: Oid, name: &str, typtype: u8) -> TypeRow {
        TypeRow {
            oid,
            name: name.to_owned(),
            typtype,
            category: b'U',
            element: 0,
            delimiter: b',',
            base: 0,
            range_subtype: None,
            fields: Vec::new(),
        }
    }

    fn registry() -> TypeRegistry {
        let mut reg = TypeRegistry::new();
        reg.ingest(row(MOOD, "mood", b'e'));
        reg.ingest(TypeRow {
            base: 23,
            ..row(POSINT, "posint", b'd')
        });
        reg.ingest(TypeRow {
            fields: vec![("a".into(), 23), ("b".into(), 25)],
            ..row(INNER, "inner_t", b'c')
        });
        reg.ingest(TypeRow {
            fields: vec![
                ("i".into(), INNER),
                ("arr".into(), 1007),
                ("j".into(), 114),
                ("m".into(), MOOD),
                ("f".into(), 701),
                ("ts".into(), 1184),
            ],
            ..row(OUTER, "outer_t", b'c')
        });
        reg.ingest(TypeRow {
            category: b'A',
            element: INNER,
            ..row(INNER_ARRAY, "_inner_t", b'b')
        });
        reg.ingest(TypeRow {
            base: 1007,
            ..row(INT_LIST, "int_list", b'd')
        });
        reg.ingest(TypeRow {
            category: b'A',
            element: MOOD,
            ..row(MOOD_ARRAY, "_mood", b'b')
        });
        reg.ingest(TypeRow {
            category: b'A',
            element: 25,
            delimiter: b'|',
            ..row(PIPE_ARRAY, "_piped", b'b')
        });
        reg.insert(TypeInfo {
            oid: CYCLE,
            name: "cycle".into(),
            kind: TypeKind::Domain { base: CYCLE },
        });
        reg
    }

    fn json(oid: Oid, text: &str) -> String {
        let mut out = String::new();
        write_json(&registry(), oid, text, &mut out)
            .unwrap_or_else(|e| panic!("{text:?} as {oid}: {e}"));
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{text:?} as {oid} gave invalid JSON {out:?}: {e}"));
        out
    }

    fn error(oid: Oid, text: &str) -> ValueError {
        let mut out = String::from("prefix");
        let err = write_json(&registry(), oid, text, &mut out)
            .expect_err(&format!("{text:?} as {oid} should fail"));
        assert_eq!(out, "prefix", "output must be rolled back on error");
        err
    }

    #[test]
    fn bool() {
        assert_eq!(json(16, "t"), "true");
        assert_eq!(json(16, "f"), "false");
        assert_eq!(error(16, "true"), ValueError::Invalid { what: "bool" });
    }

    #[test]
    fn integers_keep_their_digits() {
        assert_eq!(json(21, "-32768"), "-32768");
        assert_eq!(json(23, "0"), "0");
        assert_eq!(json(20, "9007199254740993"), "9007199254740993");
        assert_eq!(json(20, "-9223372036854775808"), "-9223372036854775808");
        for bad in ["", "-", "01", "1.5", "1e3", " 1", "+1", "--1"] {
            error(23, bad);
        }
    }

    #[test]
    fn oid_is_a_string_like_to_jsonb() {
        assert_eq!(json(26, "26"), r#""26""#);
    }

    #[test]
    fn numeric_exact_and_specials() {
        assert_eq!(json(1700, "1.50"), "1.50");
        assert_eq!(
            json(1700, "12345678901234567890.123456789"),
            "12345678901234567890.123456789"
        );
        assert_eq!(json(1700, "-0.000100"), "-0.000100");
        assert_eq!(json(1700, "NaN"), r#""NaN""#);
        assert_eq!(json(1700, "Infinity"), r#""Infinity""#);
        assert_eq!(json(1700, "-Infinity"), r#""-Infinity""#);
        for bad in ["", ".5", "1.", "nan", "1,5", "0x10"] {
            error(1700, bad);
        }
    }

    #[test]
    fn floats_print_like_jsonb_numeric() {
        assert_eq!(json(701, "1.5"), "1.5");
        assert_eq!(json(701, "-1.5"), "-1.5");
        assert_eq!(json(701, "100"), "100");
        assert_eq!(json(701, "-0"), "0");
        assert_eq!(json(701, "0"), "0");
        assert_eq!(json(701, "1e+100"), format!("1{}", "0".repeat(100)));
        assert_eq!(json(701, "1.5e-07"), "0.00000015");
        assert_eq!(json(701, "1e-05"), "0.00001");
        assert_eq!(json(701, "-2.5e-05"), "-0.000025");
        assert_eq!(json(701, "1.2345678901234568e+17"), "123456789012345680");
        assert_eq!(
            json(700, "3.4028235e+38"),
            format!("34028235{}", "0".repeat(31))
        );
        assert_eq!(json(701, "123.456"), "123.456");
        assert_eq!(json(701, "0.001"), "0.001");
        assert_eq!(json(701, "5e-324").len(), "0.".len() + 324);
        assert_eq!(json(701, "NaN"), r#""NaN""#);
        assert_eq!(json(701, "Infinity"), r#""Infinity""#);
        assert_eq!(json(700, "-Infinity"), r#""-Infinity""#);
        for bad in ["", "e5", "1e", "1e+", ".5", "1.2.3", "1e99999", "inf", "1 "] {
            error(701, bad);
        }
    }

    #[test]
    fn text_like_types_are_strings() {
        assert_eq!(json(25, "plain"), r#""plain""#);
        assert_eq!(json(1042, "ab   "), r#""ab   ""#);
        assert_eq!(json(18, "a"), r#""a""#);
        assert_eq!(json(19, "name"), r#""name""#);
        assert_eq!(
            json(2950, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            r#""a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11""#
        );
        assert_eq!(json(17, r"\x0a0b"), r#""\\x0a0b""#);
        assert_eq!(json(1083, "12:34:56"), r#""12:34:56""#);
        assert_eq!(json(1266, "12:34:56+05:30"), r#""12:34:56+05:30""#);
        assert_eq!(json(1186, "1 day 02:00:00"), r#""1 day 02:00:00""#);
        assert_eq!(json(790, "$1,234.50"), r#""$1,234.50""#);
        assert_eq!(json(869, "10.0.0.1/8"), r#""10.0.0.1/8""#);
        assert_eq!(json(3904, "[1,5)"), r#""[1,5)""#);
        assert_eq!(json(603, "(1,1),(0,0)"), r#""(1,1),(0,0)""#);
        assert_eq!(json(MOOD, "ok"), r#""ok""#);
        // Unknown OIDs (an extension type nobody resolved) are strings too.
        assert_eq!(json(99_999, "whatever"), r#""whatever""#);
    }

    #[test]
    fn string_escaping_is_valid_json_for_anything() {
        let nasty = "q\"b\\s/\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f}\u{7f}é😀\u{2028}";
        let out = json(25, nasty);
        assert_eq!(
            out,
            "\"q\\\"b\\\\s/\\u0000\\u0001\\b\\t\\n\\u000b\\f\\r\\u001f\u{7f}é😀\u{2028}\""
        );
        let back: String = serde_json::from_str(&out).expect("valid JSON string");
        assert_eq!(back, nasty);
    }

    #[test]
    fn json_embedded_verbatim_after_validation() {
        let doc = "{\"a\" : [1, 2.50, {\"b\":null}],  \"a\": true }";
        assert_eq!(json(114, doc), doc);
        assert_eq!(json(114, " \"x\" "), " \"x\" ");
        assert_eq!(json(3802, r#""\"123\"""#), r#""\"123\"""#);
        assert_eq!(json(3802, "[]"), "[]");
        assert_eq!(json(3802, "{}"), "{}");
        assert_eq!(json(3802, r#""\ud83d\ude00""#), r#""\ud83d\ude00""#);
        // Deeper than serde_json's default recursion limit (128), so checked without it:
        // Postgres accepts such documents and the validator must not use the stack for them.
        let deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
        let mut out = String::new();
        write_json(&registry(), 114, &deep, &mut out).expect("deep json is valid");
        assert_eq!(out, deep);
        error(114, &deep[1..]);
        let deep_obj = format!("{}1{}", "{\"k\":".repeat(100), "}".repeat(100));
        assert_eq!(json(114, &deep_obj), deep_obj);
        for bad in [
            "",
            "{",
            "[1,]",
            "{\"a\":1,}",
            "{\"a\" 1}",
            "{1:2}",
            "tru",
            "nul",
            "01",
            "\"\\x\"",
            "\"\u{1}\"",
            "[1] [2]",
            "\"\\ud800\"",
            "\"\\udc00\"",
            "\"\\ud800\\u0041\"",
            "[1}",
            "{\"a\":1]",
            "NaN",
        ] {
            error(114, bad);
        }
    }

    #[test]
    fn dates_and_timestamps() {
        assert_eq!(json(1082, "2024-05-06"), r#""2024-05-06""#);
        assert_eq!(json(1082, "0044-03-15 BC"), r#""0044-03-15 BC""#);
        assert_eq!(json(1082, "12345-01-02"), r#""12345-01-02""#);
        assert_eq!(json(1082, "-infinity"), r#""-infinity""#);
        assert_eq!(
            json(1114, "2024-05-06 07:08:09.123456"),
            r#""2024-05-06T07:08:09.123456""#
        );
        assert_eq!(
            json(1114, "0044-03-15 01:02:03 BC"),
            r#""0044-03-15T01:02:03 BC""#
        );
        assert_eq!(json(1114, "infinity"), r#""infinity""#);
        assert_eq!(
            json(1184, "2024-05-06 07:08:09.123456+00"),
            r#""2024-05-06T07:08:09.123456+00:00""#
        );
        assert_eq!(
            json(1184, "12345-01-02 00:00:00+00"),
            r#""12345-01-02T00:00:00+00:00""#
        );
        assert_eq!(
            json(1184, "0044-03-15 01:02:03+00 BC"),
            r#""0044-03-15T01:02:03+00:00 BC""#
        );
        // Offsets other than UTC (another TimeZone) keep minutes and seconds as printed.
        assert_eq!(
            json(1184, "2024-05-06 07:08:09-03:30"),
            r#""2024-05-06T07:08:09-03:30""#
        );
        assert_eq!(
            json(1184, "1900-01-01 00:00:00+00:09:21"),
            r#""1900-01-01T00:00:00+00:09:21""#
        );
        assert_eq!(json(1184, "-infinity"), r#""-infinity""#);
    }

    #[test]
    fn domains_convert_as_their_base() {
        assert_eq!(json(POSINT, "42"), "42");
        assert_eq!(json(INT_LIST, "{1,2}"), "[1,2]");
        error(POSINT, "x");
        assert_eq!(error(CYCLE, "1"), ValueError::TooDeep);
    }

    #[test]
    fn arrays() {
        assert_eq!(json(1007, "{1,2,NULL}"), "[1,2,null]");
        assert_eq!(json(1007, "{}"), "[]");
        assert_eq!(json(1007, "{{1,2},{3,4}}"), "[[1,2],[3,4]]");
        assert_eq!(json(1007, "{{{1},{2}},{{3},{4}}}"), "[[[1],[2]],[[3],[4]]]");
        assert_eq!(json(1007, "[0:1]={1,2}"), "[1,2]");
        assert_eq!(json(1007, "[-2:-1][1:1]={{1},{2}}"), "[[1],[2]]");
        assert_eq!(json(1000, "{t,f,NULL}"), "[true,false,null]");
        assert_eq!(json(1231, "{1.50,NaN}"), r#"[1.50,"NaN"]"#);
        assert_eq!(
            json(1022, "{1e+20,-0,Infinity}"),
            r#"[100000000000000000000,0,"Infinity"]"#
        );
        assert_eq!(
            json(
                1009,
                r#"{"a,b","c\"d","NULL",NULL,null,"",plain,"back\\slash"}"#
            ),
            r#"["a,b","c\"d","NULL",null,null,"",plain,"back\\slash"]"#
                .replace("plain", "\"plain\"")
        );
        assert_eq!(
            json(1009, r#"{"é😀","{x}"," sp "}"#),
            r#"["é😀","{x}"," sp "]"#
        );
        // array_in trims unquoted whitespace and accepts backslash escapes outside quotes.
        assert_eq!(json(1009, "{ a , b\\,c ,N\\ULL}"), r#"["a","b,c","NULL"]"#);
        assert_eq!(
            json(1182, "{2024-05-06,infinity}"),
            r#"["2024-05-06","infinity"]"#
        );
        assert_eq!(
            json(1185, r#"{"2024-05-06 07:08:09+00",-infinity}"#),
            r#"["2024-05-06T07:08:09+00:00","-infinity"]"#
        );
        assert_eq!(json(MOOD_ARRAY, "{ok,sad}"), r#"["ok","sad"]"#);
        assert_eq!(json(PIPE_ARRAY, "{a,b|c}"), r#"["a,b","c"]"#);
    }

    #[test]
    fn arrays_of_json() {
        assert_eq!(
            json(199, r#"{"{\"a\": [1, 2]}",null,"\"s\"",NULL,3}"#),
            r#"[{"a": [1, 2]},null,"s",null,3]"#
        );
        assert_eq!(json(3807, r#"{"{\"a\": 1}","[]"}"#), r#"[{"a": 1},[]]"#);
        error(199, r#"{"{bad"}"#);
    }

    #[test]
    fn box_arrays_use_semicolons() {
        assert_eq!(
            json(1020, "{(1,1),(0,0);(2,2),(1,1)}"),
            r#"["(1,1),(0,0)","(2,2),(1,1)"]"#
        );
        assert_eq!(json(1020, "{(1,1),(0,0)}"), r#"["(1,1),(0,0)"]"#);
    }

    #[test]
    fn vectors_are_arrays() {
        assert_eq!(json(22, "1 2 3"), "[1,2,3]");
        assert_eq!(json(22, ""), "[]");
        assert_eq!(json(30, "26 1009"), r#"["26","1009"]"#);
    }

    #[test]
    fn composites() {
        assert_eq!(json(INNER, r#"(1,"a b")"#), r#"{"a":1,"b":"a b"}"#);
        assert_eq!(json(INNER, "(,)"), r#"{"a":null,"b":null}"#);
        assert_eq!(json(INNER, r#"(,"")"#), r#"{"a":null,"b":""}"#);
        assert_eq!(
            json(INNER, r#"(2,"q""uote\\back\"x")"#),
            r#"{"a":2,"b":"q\"uote\\back\"x"}"#
        );
        // record_in lets quotes start mid-field and joins the pieces.
        assert_eq!(json(INNER, r#"(3,a"b,c"d)"#), r#"{"a":3,"b":"ab,cd"}"#);
        assert_eq!(json(INNER, "(4,é😀)"), r#"{"a":4,"b":"é😀"}"#);
        assert_eq!(
            json(
                OUTER,
                r#"("(1,""a """"b\\\\"")","{1,NULL}","{""x"": [1, 2]}",ok,1e+100,"2024-05-06 07:08:09+00")"#
            ),
            format!(
                r#"{{"i":{{"a":1,"b":"a \"b\\"}},"arr":[1,null],"j":{{"x": [1, 2]}},"m":"ok","f":1{},"ts":"2024-05-06T07:08:09+00:00"}}"#,
                "0".repeat(100)
            )
        );
        assert_eq!(
            json(OUTER, "(,,,,,)"),
            r#"{"i":null,"arr":null,"j":null,"m":null,"f":null,"ts":null}"#
        );
    }

    #[test]
    fn arrays_of_composites() {
        assert_eq!(
            json(INNER_ARRAY, r#"{"(1,\"a b\")","(,)",NULL,"(2,\"\")"}"#),
            r#"[{"a":1,"b":"a b"},{"a":null,"b":null},null,{"a":2,"b":""}]"#
        );
        assert_eq!(
            json(INNER_ARRAY, r#"{{"(1,x)"},{"(2,\"y,z\")"}}"#),
            r#"[[{"a":1,"b":"x"}],[{"a":2,"b":"y,z"}]]"#
        );
    }

    #[test]
    fn malformed_arrays_are_errors() {
        for bad in [
            "",
            "{",
            "}",
            "{1,2",
            "{1,,2}",
            "{,}",
            "{1}x",
            "{\"a}",
            "{a\"b\"}",
            "{a{b}}",
            "1,2",
            "[1:2]{1,2}",
            "[1:2=",
            "[]={1}",
            "{1\\",
            "{{{{{{{1}}}}}}}",
            "{1}}",
        ] {
            error(1009, bad);
        }
        assert_eq!(
            error(1007, "{1,x}"),
            ValueError::Invalid { what: "integer" }
        );
    }

    #[test]
    fn malformed_composites_are_errors() {
        for bad in [
            "", "1,2", "(1", "(1,2", "(1,2,3)", "(1)", "(1,\"a)", "(1,a)x", "(x,a)", "(1,a\\",
        ] {
            error(INNER, bad);
        }
        assert_eq!(
            error(INNER, "(1,2,3)"),
            ValueError::FieldCount { expected: 2 }
        );
    }

    #[test]
    fn fallback_is_a_string() {
        let reg = registry();
        assert_eq!(to_json_string(&reg, 1007, "{1,"), r#""{1,""#);
        assert_eq!(to_json_string(&reg, 23, "42"), "42");
        let mut out = String::from("[");
        write_json_string("a\"b", &mut out);
        assert_eq!(out, r#"["a\"b""#);
    }
}
