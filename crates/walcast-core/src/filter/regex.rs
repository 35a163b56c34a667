//! `match` / `imatch` patterns: Postgres's `~` / `~*` (POSIX advanced regular expressions,
//! AREs) for the subset whose meaning we can reproduce exactly, evaluated in linear time.
//!
//! ```text
//!  pattern ──parse (this module)──▶ Hir (regex-syntax) ──▶ meta::Regex (regex-automata)
//!            │ refuses, with a reason:                       is_match: lazy DFA / PikeVM,
//!            │  - what Postgres refuses (invalid)             O(pattern × value), never
//!            │  - what we do not reproduce (unsupported)      backtracking
//! ```
//!
//! The question asked is only "does some substring match?", so greediness and which
//! alternative wins never matter: a pattern is a regular language, and any automaton for it
//! answers the same. What does matter is the language itself, and that is where AREs differ
//! from Rust's syntax, so the pattern is parsed here and the automaton built from the parsed
//! tree (never by handing ARE text to another regex parser):
//!
//! - `.` and negated brackets match a newline (ARE's default, not newline-sensitive); `^`
//!   and `$` (and `\A`, `\Z`) anchor at the start and end of the whole value only.
//! - Classes, `\w`/`\d`/`\s`, word constraints (`\m`, `\M`, `\y`, `\Y`) and case folding
//!   follow the `C` locale, as a database or column with `C` collation (ctype) does: they
//!   classify and fold ASCII only. (A database with a linguistic `LC_CTYPE` also classifies
//!   and folds non-ASCII letters; ASCII values agree either way.) Case folding is done here,
//!   character by character, never by the regex engine's Unicode folding.
//! - Supported: literals and `\`-escaped characters, `.`, brackets (ranges, `[:class:]`,
//!   escapes inside), groups `( )` and `(?: )`, `|`, `*` `+` `?` `{m}` `{m,}` `{m,n}` and
//!   their non-greedy forms, `^` `$`, the class escapes, the constraint escapes, the
//!   character-entry escapes (`\n`, `\t`, `\x41`, `\u00e9`, …), the `***:` and `***=`
//!   prefixes, and leading embedded options `(?i)`, `(?c)`, `(?q)`, `(?t)`.
//! - Refused as unsupported (with the reason): back-references, lookahead/lookbehind,
//!   octal escapes, comments `(?#…)`, `\D`/`\S`/`\W` inside brackets, collating elements
//!   and equivalence classes (`[.x.]`, `[=x=]`), the newline-sensitive, expanded and
//!   BRE/ERE options (`n`, `m`, `p`, `w`, `x`, `b`, `e`).
//! - Refused as invalid: what Postgres itself rejects (unbalanced parentheses or brackets,
//!   a quantifier with nothing to repeat or after another one (a `{` not followed by a
//!   digit is a literal, as in Postgres), bounds above 255 or
//!   reversed, reversed ranges, unknown classes or escapes, a trailing `\`).
//!
//! Invariants: parsing never panics and recurses at most [`MAX_DEPTH`] groups deep; patterns
//! are at most [`MAX_PATTERN_CHARS`] characters, and the compiled automaton is bounded by
//! [`NFA_SIZE_LIMIT`] (a pattern whose repetitions would exceed it is refused), so matching a
//! value costs O(automaton × value) at worst, whatever the pattern.

use regex_automata::meta;
use regex_syntax::hir::{Class, ClassUnicode, ClassUnicodeRange, Hir, Look, Repetition};

use super::grammar::FilterError;

/// Longest pattern accepted, in characters.
pub const MAX_PATTERN_CHARS: usize = 1_000;
/// Deepest group nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Largest repetition bound (Postgres's `DUPMAX`).
const DUPMAX: u32 = 255;
/// Ceiling on the compiled automaton's heap, in bytes. Small patterns need a few KiB; the
/// ceiling is what a short pattern with nested bounds (`(a{255}){255}`) could otherwise
/// make a subscription hold.
pub const NFA_SIZE_LIMIT: usize = 256 << 10;
/// Ceiling on the lazy DFA's cache, per pattern and per thread matching with it; when a
/// value needs more, matching falls back to the PikeVM (still linear, slower).
const LAZY_DFA_CACHE: usize = 256 << 10;

/// A compiled `match`/`imatch` pattern.
#[derive(Debug, Clone)]
pub struct RegexPattern {
    re: meta::Regex,
}

impl RegexPattern {
    /// Does some substring of `value` match?
    pub fn is_match(&self, value: &str) -> bool {
        self.re.is_match(value)
    }
}

/// Why a pattern is refused.
enum Refuse {
    /// Postgres refuses it too.
    Invalid(&'static str),
    /// Postgres accepts it; we do not reproduce it.
    Unsupported(&'static str),
}

type Parsed<T> = Result<T, Refuse>;

/// Compile `pattern` for `~` (`icase` false) or `~*` (`icase` true).
pub fn compile_regex(pattern: &str, icase: bool) -> Result<RegexPattern, FilterError> {
    let err = |r: Refuse| match r {
        Refuse::Invalid(reason) => FilterError::InvalidRegex {
            pattern: pattern.to_owned(),
            reason,
        },
        Refuse::Unsupported(what) => FilterError::UnsupportedRegex {
            pattern: pattern.to_owned(),
            what,
        },
    };
    if pattern.chars().count() > MAX_PATTERN_CHARS {
        return Err(err(Refuse::Unsupported(
            "more than 1000 characters (the longest pattern walcast accepts)",
        )));
    }
    let hir = parse(pattern, icase).map_err(err)?;
    // Full DFAs and the one-pass DFA keep regex-automata's small default limits: they are
    // built at subscribe time and held for the subscription's life.
    let config = meta::Config::new()
        .nfa_size_limit(Some(NFA_SIZE_LIMIT))
        .hybrid_cache_capacity(LAZY_DFA_CACHE);
    let re = meta::Builder::new()
        .configure(config)
        .build_from_hir(&hir)
        .map_err(|_| {
            err(Refuse::Unsupported(
                "repetitions too large to match in bounded time",
            ))
        })?;
    Ok(RegexPattern { re })
}

fn parse(pattern: &str, icase: bool) -> Parsed<Hir> {
    let mut chars: Vec<char> = pattern.chars().collect();
    if chars.contains(&'\0') {
        return Err(Refuse::Invalid("a NUL character"));
    }
    let mut icase = icase;
    // Director prefixes: `***:` (the rest is an ARE) and `***=` (the rest is a literal).
    if chars.starts_with(&['*', '*', '*', ':']) {
        chars.drain(..4);
    } else if chars.starts_with(&['*', '*', '*', '=']) {
        return Ok(literal_string(&chars[4..], icase));
    } else if chars.starts_with(&['*', '*', '*']) {
        return Err(Refuse::Invalid("`***` must be followed by `:` or `=`"));
    }
    // Leading embedded options.
    let mut start = 0;
    if chars.starts_with(&['(', '?']) && chars.get(2).is_some_and(|c| c.is_ascii_alphabetic()) {
        let mut i = 2;
        let mut literal = false;
        loop {
            match chars.get(i) {
                None => return Err(Refuse::Invalid("unterminated embedded options")),
                Some(')') => break,
                Some('i') => icase = true,
                Some('c') => icase = false,
                Some('t') => {}
                Some('q') => literal = true,
                Some('b' | 'e' | 'm' | 'n' | 'p' | 's' | 'w' | 'x') => {
                    return Err(Refuse::Unsupported(
                        "embedded options other than i, c, q and t",
                    ))
                }
                Some(_) => return Err(Refuse::Invalid("invalid embedded option")),
            }
            i += 1;
        }
        start = i + 1;
        if literal {
            return Ok(literal_string(&chars[start..], icase));
        }
    }
    let mut p = Parser {
        chars: &chars,
        pos: start,
        icase,
        depth: 0,
    };
    let hir = p.alternation()?;
    if p.pos < chars.len() {
        // Only a `)` stops the top level early.
        return Err(Refuse::Invalid("parentheses () not balanced"));
    }
    Ok(hir)
}

/// Every character literally (`***=`, `(?q)`).
fn literal_string(chars: &[char], icase: bool) -> Hir {
    Hir::concat(chars.iter().map(|&c| char_hir(c, icase)).collect())
}

/// One character, both ASCII cases under `icase`.
fn char_hir(c: char, icase: bool) -> Hir {
    if icase && c.is_ascii_alphabetic() {
        let cls = ClassUnicode::new([
            ClassUnicodeRange::new(c.to_ascii_lowercase(), c.to_ascii_lowercase()),
            ClassUnicodeRange::new(c.to_ascii_uppercase(), c.to_ascii_uppercase()),
        ]);
        Hir::class(Class::Unicode(cls))
    } else {
        let mut buf = [0u8; 4];
        Hir::literal(c.encode_utf8(&mut buf).as_bytes())
    }
}

/// What an atom is, for the quantifier rules.
#[derive(PartialEq, Eq)]
enum AtomKind {
    /// Can be repeated.
    Repeatable,
    /// An anchor or constraint: Postgres refuses a quantifier on it.
    Constraint,
}

struct Parser<'a> {
    chars: &'a [char],
    pos: usize,
    icase: bool,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos + ahead).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// branch ( `|` branch )*, up to a `)` or the end.
    fn alternation(&mut self) -> Parsed<Hir> {
        let mut branches = vec![self.branch()?];
        while self.peek() == Some('|') {
            self.pos += 1;
            branches.push(self.branch()?);
        }
        Ok(if branches.len() == 1 {
            branches.pop().unwrap_or_else(Hir::empty)
        } else {
            Hir::alternation(branches)
        })
    }

    /// piece*, up to `|`, `)` or the end.
    fn branch(&mut self) -> Parsed<Hir> {
        let mut pieces = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            if matches!(c, '*' | '+' | '?') || self.bound_follows() {
                return Err(Refuse::Invalid("quantifier operand invalid"));
            }
            let (atom, kind) = self.atom()?;
            pieces.push(self.quantified(atom, kind)?);
        }
        Ok(Hir::concat(pieces))
    }

    fn quantified(&mut self, atom: Hir, kind: AtomKind) -> Parsed<Hir> {
        let (min, max) = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') if self.bound_follows() => {
                if kind == AtomKind::Constraint {
                    return Err(Refuse::Invalid("quantifier operand invalid"));
                }
                self.pos += 1;
                let bound = self.bound()?;
                self.lazy_suffix();
                self.no_second_quantifier()?;
                return Ok(repeat(atom, bound.0, bound.1));
            }
            _ => return Ok(atom),
        };
        if kind == AtomKind::Constraint {
            return Err(Refuse::Invalid("quantifier operand invalid"));
        }
        self.pos += 1;
        self.lazy_suffix();
        self.no_second_quantifier()?;
        Ok(repeat(atom, min, max))
    }

    /// A `?` after a quantifier makes it non-greedy: the same language.
    fn lazy_suffix(&mut self) {
        if self.peek() == Some('?') {
            self.pos += 1;
        }
    }

    fn no_second_quantifier(&self) -> Parsed<()> {
        if matches!(self.peek(), Some('*' | '+' | '?')) || self.bound_follows() {
            return Err(Refuse::Invalid("quantifier operand invalid"));
        }
        Ok(())
    }

    /// A `{` starts a bound only when a digit follows; otherwise it is a literal `{`.
    fn bound_follows(&self) -> bool {
        self.peek() == Some('{') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit())
    }

    /// `m}`, `m,}` or `m,n}` after `{`.
    fn bound(&mut self) -> Parsed<(u32, Option<u32>)> {
        let min = self
            .number()?
            .ok_or(Refuse::Invalid("invalid repetition count(s)"))?;
        let max = if self.peek() == Some(',') {
            self.pos += 1;
            self.number()?
        } else {
            Some(min)
        };
        if self.next() != Some('}') {
            return Err(Refuse::Invalid("invalid repetition count(s)"));
        }
        if max.is_some_and(|m| m < min) {
            return Err(Refuse::Invalid("invalid repetition count(s)"));
        }
        Ok((min, max))
    }

    fn number(&mut self) -> Parsed<Option<u32>> {
        let mut n: Option<u32> = None;
        while let Some(d) = self.peek().and_then(|c| c.to_digit(10)) {
            self.pos += 1;
            let v = n.unwrap_or(0).saturating_mul(10).saturating_add(d);
            if v > DUPMAX {
                return Err(Refuse::Invalid("invalid repetition count(s)"));
            }
            n = Some(v);
        }
        Ok(n)
    }

    fn atom(&mut self) -> Parsed<(Hir, AtomKind)> {
        let Some(c) = self.next() else {
            return Ok((Hir::empty(), AtomKind::Repeatable));
        };
        let repeatable = |h| Ok((h, AtomKind::Repeatable));
        match c {
            '(' => {
                if self.peek() == Some('?') {
                    match self.peek_at(1) {
                        Some(':') => self.pos += 2,
                        Some('=' | '!' | '<') => {
                            return Err(Refuse::Unsupported("lookahead and lookbehind constraints"))
                        }
                        Some('#') => return Err(Refuse::Unsupported("comments (?#…)")),
                        _ => return Err(Refuse::Invalid("invalid `(?` group")),
                    }
                }
                self.depth += 1;
                if self.depth > MAX_DEPTH {
                    return Err(Refuse::Unsupported("groups nested more than 64 deep"));
                }
                let inner = self.alternation()?;
                self.depth -= 1;
                if self.next() != Some(')') {
                    return Err(Refuse::Invalid("parentheses () not balanced"));
                }
                repeatable(inner)
            }
            ')' => Err(Refuse::Invalid("parentheses () not balanced")),
            '.' => repeatable(Hir::class(Class::Unicode(ClassUnicode::new([
                ClassUnicodeRange::new('\0', char::MAX),
            ])))),
            '^' => Ok((Hir::look(Look::Start), AtomKind::Constraint)),
            '$' => Ok((Hir::look(Look::End), AtomKind::Constraint)),
            '[' => repeatable(self.bracket()?),
            '\\' => self.escape(),
            c => repeatable(char_hir(c, self.icase)),
        }
    }

    /// After `\` outside brackets.
    fn escape(&mut self) -> Parsed<(Hir, AtomKind)> {
        let Some(c) = self.next() else {
            return Err(Refuse::Invalid("invalid escape \\ sequence"));
        };
        let constraint = |l| Ok((Hir::look(l), AtomKind::Constraint));
        match c {
            'A' => constraint(Look::Start),
            'Z' => constraint(Look::End),
            'm' => constraint(Look::WordStartAscii),
            'M' => constraint(Look::WordEndAscii),
            'y' => constraint(Look::WordAscii),
            'Y' => constraint(Look::WordAsciiNegate),
            'd' | 's' | 'w' | 'D' | 'S' | 'W' => {
                let mut cls = named_class(c.to_ascii_lowercase());
                if c.is_ascii_uppercase() {
                    cls.negate();
                }
                Ok((Hir::class(Class::Unicode(cls)), AtomKind::Repeatable))
            }
            _ => {
                let ch = self.entry_escape(c)?;
                Ok((char_hir(ch, self.icase), AtomKind::Repeatable))
            }
        }
    }

    /// A character-entry escape (`\` already read, `c` the character after it), or a
    /// non-alphanumeric character escaped to itself.
    fn entry_escape(&mut self, c: char) -> Parsed<char> {
        let ch = match c {
            'a' => '\u{7}',
            'b' => '\u{8}',
            'B' => '\\',
            'e' => '\u{1b}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\u{b}',
            'c' => {
                let x = self
                    .next()
                    .ok_or(Refuse::Invalid("invalid escape \\ sequence"))?;
                char::from_u32(u32::from(x) & 0x1f)
                    .filter(|&c| c != '\0')
                    .ok_or(Refuse::Unsupported("a control escape for NUL"))?
            }
            'u' => self.hex(4, 4)?,
            'U' => self.hex(8, 8)?,
            'x' => self.hex(1, usize::MAX)?,
            '0'..='9' => {
                return Err(Refuse::Unsupported(
                    "back-references and octal escapes (\\1, \\07, …)",
                ))
            }
            c if c.is_alphanumeric() => return Err(Refuse::Invalid("invalid escape \\ sequence")),
            c => c,
        };
        Ok(ch)
    }

    /// Between `min` and `max` hex digits (as many as there are, up to `max`).
    fn hex(&mut self, min: usize, max: usize) -> Parsed<char> {
        let mut v: u32 = 0;
        let mut n = 0;
        while n < max {
            let Some(d) = self.peek().and_then(|c| c.to_digit(16)) else {
                break;
            };
            self.pos += 1;
            n += 1;
            v = v.saturating_mul(16).saturating_add(d);
        }
        if n < min {
            return Err(Refuse::Invalid("invalid escape \\ sequence"));
        }
        char::from_u32(v)
            .filter(|&c| c != '\0')
            .ok_or(Refuse::Unsupported(
                "an escape for NUL, a surrogate or beyond U+10FFFF",
            ))
    }

    /// After `[`: the bracket expression up to its `]`.
    fn bracket(&mut self) -> Parsed<Hir> {
        let negate = self.peek() == Some('^');
        if negate {
            self.pos += 1;
        }
        let mut set = ClassUnicode::empty();
        let mut first = true;
        loop {
            let c = self
                .next()
                .ok_or(Refuse::Invalid("brackets [] not balanced"))?;
            if c == ']' && !first {
                break;
            }
            first = false;
            let start = match c {
                '[' => match self.peek() {
                    Some(':') => {
                        self.pos += 1;
                        let name = self.class_name()?;
                        set.union(&named_class_by_name(&name)?);
                        if self.peek() == Some('-') && self.peek_at(1) != Some(']') {
                            return Err(Refuse::Invalid("invalid character range"));
                        }
                        continue;
                    }
                    Some('.' | '=') => {
                        return Err(Refuse::Unsupported(
                            "collating elements and equivalence classes ([.x.], [=x=])",
                        ))
                    }
                    _ => '[',
                },
                '\\' => {
                    let e = self
                        .next()
                        .ok_or(Refuse::Invalid("brackets [] not balanced"))?;
                    match e {
                        'd' | 's' | 'w' => {
                            set.union(&named_class(e));
                            if self.peek() == Some('-') && self.peek_at(1) != Some(']') {
                                return Err(Refuse::Invalid("invalid character range"));
                            }
                            continue;
                        }
                        'D' | 'S' | 'W' => {
                            return Err(Refuse::Unsupported("\\D, \\S and \\W in brackets"))
                        }
                        'A' | 'Z' | 'm' | 'M' | 'y' | 'Y' => {
                            return Err(Refuse::Invalid("invalid escape \\ sequence"))
                        }
                        e => self.entry_escape(e)?,
                    }
                }
                c => c,
            };
            // A range `start-end`, unless the `-` is the last member.
            let end = if self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c != ']') {
                self.pos += 1;
                let e = self
                    .next()
                    .ok_or(Refuse::Invalid("brackets [] not balanced"))?;
                match e {
                    '[' if matches!(self.peek(), Some(':' | '.' | '=')) => {
                        return Err(Refuse::Unsupported(
                            "a range ending in a class or collating element",
                        ))
                    }
                    '\\' => {
                        let x = self
                            .next()
                            .ok_or(Refuse::Invalid("brackets [] not balanced"))?;
                        if matches!(x, 'd' | 's' | 'w' | 'D' | 'S' | 'W') {
                            return Err(Refuse::Invalid("invalid character range"));
                        }
                        self.entry_escape(x)?
                    }
                    e => e,
                }
            } else {
                start
            };
            if end < start {
                return Err(Refuse::Invalid("invalid character range"));
            }
            set.push(ClassUnicodeRange::new(start, end));
        }
        if self.icase {
            add_ascii_cases(&mut set);
        }
        if negate {
            set.negate();
        }
        Ok(Hir::class(Class::Unicode(set)))
    }

    /// The name of `[:name:]` (after `[:`), through its `:]`.
    fn class_name(&mut self) -> Parsed<String> {
        let mut name = String::new();
        loop {
            match self.next() {
                None => return Err(Refuse::Invalid("brackets [] not balanced")),
                Some(':') if self.peek() == Some(']') => {
                    self.pos += 1;
                    return Ok(name);
                }
                Some(c) => {
                    if name.len() > 16 {
                        return Err(Refuse::Invalid("invalid character class"));
                    }
                    name.push(c);
                }
            }
        }
    }
}

fn repeat(sub: Hir, min: u32, max: Option<u32>) -> Hir {
    Hir::repetition(Repetition {
        min,
        max,
        greedy: true,
        sub: Box::new(sub),
    })
}

/// `[A-Z]` ranges of a set gain their lower-case partners and vice versa (ASCII only, the
/// `C` locale's folding).
fn add_ascii_cases(set: &mut ClassUnicode) {
    let mut extra = Vec::new();
    for r in set.iter() {
        for (lo, hi, delta) in [('a', 'z', -32i32), ('A', 'Z', 32)] {
            let s = r.start().max(lo);
            let e = r.end().min(hi);
            if s <= e {
                let shift = |c: char| char::from_u32((c as i32 + delta) as u32).unwrap_or(c);
                extra.push(ClassUnicodeRange::new(shift(s), shift(e)));
            }
        }
    }
    for r in extra {
        set.push(r);
    }
}

fn ranges(list: &[(char, char)]) -> ClassUnicode {
    ClassUnicode::new(list.iter().map(|&(a, b)| ClassUnicodeRange::new(a, b)))
}

/// `\d`, `\s`, `\w` in the `C` locale.
fn named_class(c: char) -> ClassUnicode {
    match c {
        'd' => ranges(&[('0', '9')]),
        's' => ranges(&[('\t', '\r'), (' ', ' ')]),
        _ => ranges(&[('0', '9'), ('A', 'Z'), ('_', '_'), ('a', 'z')]),
    }
}

/// `[:name:]` in the `C` locale (ASCII only).
fn named_class_by_name(name: &str) -> Parsed<ClassUnicode> {
    Ok(match name {
        "alpha" => ranges(&[('A', 'Z'), ('a', 'z')]),
        "upper" => ranges(&[('A', 'Z')]),
        "lower" => ranges(&[('a', 'z')]),
        "digit" => ranges(&[('0', '9')]),
        "xdigit" => ranges(&[('0', '9'), ('A', 'F'), ('a', 'f')]),
        "alnum" => ranges(&[('0', '9'), ('A', 'Z'), ('a', 'z')]),
        "space" => ranges(&[('\t', '\r'), (' ', ' ')]),
        "blank" => ranges(&[('\t', '\t'), (' ', ' ')]),
        "punct" => ranges(&[('!', '/'), (':', '@'), ('[', '`'), ('{', '~')]),
        "print" => ranges(&[(' ', '~')]),
        "graph" => ranges(&[('!', '~')]),
        "cntrl" => ranges(&[('\0', '\u{1f}'), ('\u{7f}', '\u{7f}')]),
        _ => return Err(Refuse::Invalid("invalid character class")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, v: &str) -> bool {
        compile_regex(p, false)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .is_match(v)
    }

    fn mi(p: &str, v: &str) -> bool {
        compile_regex(p, true)
            .unwrap_or_else(|e| panic!("{p}: {e}"))
            .is_match(v)
    }

    #[test]
    fn the_basics() {
        assert!(m("^a.*z$", "abcz"));
        assert!(!m("^a.*z$", "abczq"));
        assert!(m("a.c", "a\nc"), "`.` matches a newline");
        assert!(m("[^x]", "\n"));
        assert!(!m("^b", "a\nb"), "`^` is the start of the value only");
        assert!(m("colou?r", "my color"));
        assert!(m("^(ab){2,3}$", "ababab"));
        assert!(!m("^(ab){2,3}$", "ab"));
        assert!(m("^[[:alpha:]]+$", "Hello"));
        assert!(
            !m("^[[:alpha:]]+$", "héllo"),
            "C locale: ASCII letters only"
        );
        assert!(m("\\mfoo\\M", "a foo b"));
        assert!(!m("\\mfoo\\M", "afoo"));
        assert!(m("\\yx\\y", "x"));
        assert!(m("a\\Yb", "ab"));
        assert!(m("***=a.c", "xa.cx"));
        assert!(!m("***=a.c", "abc"));
        assert!(m("(?i)ABC", "abc"));
        assert!(m("\\x41\\u00e9", "Aé"));
        assert!(m("[\\d]+-\\w", "12-a"));
        assert!(
            m("^a{,2}$", "a{,2}"),
            "a `{{` without a digit after it is literal"
        );
        assert!(m("^{x", "{x"));
    }

    #[test]
    fn imatch_folds_ascii_only() {
        assert!(mi("^hello$", "HeLLo"));
        assert!(mi("[a-c]", "B"));
        assert!(!mi("[^a-c]", "B"));
        assert!(
            !mi("é", "É"),
            "non-ASCII letters are not folded in the C locale"
        );
        assert!(!mi("k", "\u{212a}"), "no Unicode folding (Kelvin sign)");
        assert!(mi("(?c)abc", "abc"));
        assert!(!mi("(?c)abc", "ABC"));
    }

    #[test]
    fn what_postgres_refuses_is_refused() {
        for p in [
            "(",
            ")",
            "a)",
            "[a",
            "*a",
            "a**",
            "a{2",
            "a{3,2}",
            "a{256}",
            "[z-a]",
            "\\",
            "[[:nope:]]",
            "\\q",
            "^*",
            "a|*",
            "(*)",
            "***x",
        ] {
            let e = compile_regex(p, false).expect_err(p);
            assert!(matches!(e, FilterError::InvalidRegex { .. }), "{p}: {e}");
        }
    }

    #[test]
    fn what_we_do_not_reproduce_is_refused() {
        for p in [
            "(a)\\1", "a(?=b)", "(?n)a", "[[.a.]]", "[[=a=]]", "(?x)a b", "\\07",
        ] {
            let e = compile_regex(p, false).expect_err(p);
            assert!(
                matches!(e, FilterError::UnsupportedRegex { .. }),
                "{p}: {e}"
            );
        }
        let long = "a".repeat(MAX_PATTERN_CHARS + 1);
        assert!(compile_regex(&long, false).is_err());
        // Nested bounds that would blow the automaton up are refused, not built.
        assert!(compile_regex("((((a{255}){255}){255}){255})", false).is_err());
        assert!(compile_regex("(.{255}){255}", false).is_err());
        // While a long, ordinary pattern is fine.
        assert!(compile_regex(
            &format!("^({})$", ["[[:alpha:]]{1,20}"; 20].join("|")),
            false
        )
        .is_ok());
    }

    #[test]
    fn matching_stays_linear_on_adversarial_patterns() {
        // A backtracking matcher takes exponential time on this; the automaton does not.
        let p = compile_regex("^(a|a)*(a|aa)*(a+)+b$", false).expect("compiles");
        let value = "a".repeat(50_000);
        assert!(!p.is_match(&value));
    }
}
