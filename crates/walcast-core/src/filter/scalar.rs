//! Typed values as filters compare them: integers, exact decimals, floats in Postgres's
//! order, booleans, uuids, dates and timestamps, parsed from the text Postgres prints and
//! from what people type.

use std::cmp::Ordering;

/// A typed constant or column value.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Scalar {
    Int(i64),
    Numeric(Decimal),
    Float(f64),
    Bool(bool),
    /// Text-like, enum and opaque values, already normalized for their class.
    Text(Box<str>),
    Uuid(u128),
    Time(Instant),
}

/// Compare two values of the same class. `None` when the kinds do not line up (never for
/// values produced by [`parse_scalar`] with the same class).
pub(super) fn compare(a: &Scalar, b: &Scalar) -> Option<Ordering> {
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
pub(super) fn pg_float_cmp(x: f64, y: f64) -> Ordering {
    match (x.is_nan(), y.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        (false, false) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
    }
}

// ---------------------------------------------------------------------------------------
// Scalars: integers, floats, booleans, uuids

/// `int8in`-style: optional whitespace, sign, decimal digits.
pub(super) fn parse_int(text: &str) -> Option<i64> {
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
pub(super) fn parse_float(text: &str, single: bool) -> Option<f64> {
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
pub(super) fn parse_bool(text: &str) -> Option<bool> {
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
pub(super) fn parse_uuid(text: &str) -> Option<u128> {
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
pub(super) enum DecimalKind {
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
pub(super) const MAX_EXPONENT: i64 = 1_000_000;

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
pub(super) enum DateMode {
    Date,
    Timestamp,
    Timestamptz,
}

pub(super) const MICROS_PER_DAY: i128 = 86_400_000_000;

/// A small cursor over ASCII bytes; every read is checked.
pub(super) struct Cursor<'a> {
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
pub(super) fn parse_datetime(text: &str, mode: DateMode) -> Option<Instant> {
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
pub(super) fn parse_fraction(c: &mut Cursor<'_>) -> Option<i128> {
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

pub(super) fn is_leap(year: i64) -> bool {
    year.rem_euclid(4) == 0 && (year.rem_euclid(100) != 0 || year.rem_euclid(400) == 0)
}

pub(super) fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        _ => 28,
    }
}

/// Proleptic Gregorian (astronomical year) → days since 1970-01-01.
pub(super) fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
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
