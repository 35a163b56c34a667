//! `like` / `ilike` patterns: `%` (or `*`) any run, `_` one character, `\\` escapes.
//!
//! The pattern comes from a client and is evaluated against every change of its table under
//! a lock all subscribers share, so its cost must not depend on how adversarial it is. The
//! matcher runs in time linear in the value (characters are Unicode scalar values, as
//! Postgres LIKE on UTF-8 matches characters):
//!
//! ```text
//!  head % seg₁ % seg₂ % … % segₖ % tail
//!  ────                             ────   anchored: compared in place, O(len) each
//!         ────   ────       ────           each found at its leftmost occurrence after
//!                                          the previous one; the searches cover disjoint
//!                                          stretches of the value, so together they read
//!                                          each character at most once
//! ```
//!
//! Leftmost is enough: all occurrences of a segment have the same length, so the leftmost
//! one ends first and leaves the most room for the segments after it. A segment is searched
//! as `_`ⁱ core `_`ʲ: the outer `_` runs are plain skips, a core of literals only is found
//! with `memchr::memmem` (Two-Way, worst case linear), and a core with `_` inside with a
//! shift-and automaton, one `u64` of state per 64 pattern positions. The whole match is thus
//! O(pattern + value × ⌈c / 64⌉), where c is the length of the longest core with a `_` inside
//! (the factor is 1 for every core up to 64 characters). A value shorter than the runs need
//! fails before any search, so c never exceeds the value's length: whatever the pattern,
//! the work is at most O(pattern + value × min(pattern, value) / 64). (A backtracking
//! matcher is O(pattern × value): `%` + 5000 `_` + `Z` against 100,000 characters took
//! seconds.)
//! Compiled masks are kept per block of 64 positions, so memory is linear in the pattern.
//!
//! Case folding (`ilike`): pattern literals are lower-cased character by character here
//! (a character may become several, e.g. `İ`); the caller lower-cases the value as a string.

use super::grammar::FilterError;
use memchr::memmem;

/// One pattern position between `%`s: a literal character or `_`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unit {
    Lit(char),
    One,
}

impl Unit {
    fn accepts(self, c: char) -> bool {
        match self {
            Unit::Lit(l) => l == c,
            Unit::One => true,
        }
    }
}

/// A compiled `like` pattern: `head`, then for a pattern with `%` the segments between
/// them and the `tail` after the last one.
#[derive(Debug, Clone)]
pub(super) struct LikePattern {
    /// Units before the first `%`: they must match the start of the value.
    head: Vec<Unit>,
    /// `None` when the pattern has no `%`: `head` must then be the whole value.
    rest: Option<Rest>,
}

#[derive(Debug, Clone)]
struct Rest {
    /// The non-empty runs between consecutive `%`, in pattern order.
    middle: Vec<Segment>,
    /// Characters the middle runs need at least: their lengths added up.
    middle_len: usize,
    /// Units after the last `%`: they must match the end of the value.
    tail: Vec<Unit>,
}

/// A run between two `%`: `lead` times `_`, the core, `trail` times `_`.
#[derive(Debug, Clone)]
struct Segment {
    lead: usize,
    /// `None` when the run is only `_` (then `trail` is 0).
    core: Option<Core>,
    trail: usize,
}

/// A segment core: starts and ends with a literal.
#[derive(Debug, Clone)]
enum Core {
    /// Literals only, searched as UTF-8 bytes. A valid UTF-8 needle found in a valid UTF-8
    /// value always starts and ends on character boundaries, so a byte match is a
    /// character match.
    Literal(Box<memmem::Finder<'static>>),
    /// Literals with `_` among them.
    Wild(ShiftAnd),
}

/// Shift-and over the units of a core: after reading a character, bit `i` of the state is
/// set iff units `0..=i` match the characters that end there. Positions are grouped in
/// blocks of 64, one state word per block.
#[derive(Debug, Clone)]
struct ShiftAnd {
    /// Number of units, at least 1.
    len: usize,
    /// `ceil(len / 64)` blocks, the first holding positions 0..64.
    blocks: Vec<Block>,
}

/// The masks of 64 pattern positions. Kept per block so that memory stays linear in the
/// pattern (a mask per distinct character over the whole core would be quadratic).
#[derive(Debug, Clone)]
struct Block {
    /// Index into `masks` for each ASCII character; 0 (the `_` positions only) for the
    /// ones that appear in no literal of the block.
    ascii: [u8; 128],
    /// Index into `masks` for other characters, sorted by character.
    other: Vec<(char, u8)>,
    /// `masks[0]`: the `_` positions; `masks[k]`: those plus the positions of one literal.
    masks: Vec<u64>,
}

// ---------------------------------------------------------------------------------------
// Compilation

/// A pattern token: what the text of the pattern means before it is split at `%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Unit(Unit),
    Any,
}

pub(super) fn compile_like(pattern: &str, fold: bool) -> Result<LikePattern, FilterError> {
    let toks = tokenize(pattern, fold)?;
    let mut runs = toks.split(|t| *t == Tok::Any).map(units);
    let head = runs.next().unwrap_or_default();
    let mut rest: Vec<Vec<Unit>> = runs.collect();
    let Some(tail) = rest.pop() else {
        return Ok(LikePattern { head, rest: None });
    };
    // `%%` (or `%` next to `*`) leaves an empty run: it is one `%`.
    let runs: Vec<Vec<Unit>> = rest.into_iter().filter(|run| !run.is_empty()).collect();
    let middle_len = runs.iter().map(Vec::len).sum();
    let middle = runs.iter().map(|run| Segment::new(run)).collect();
    Ok(LikePattern {
        head,
        rest: Some(Rest {
            middle,
            middle_len,
            tail,
        }),
    })
}

fn tokenize(pattern: &str, fold: bool) -> Result<Vec<Tok>, FilterError> {
    let mut out = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' | '*' => out.push(Tok::Any),
            '_' => out.push(Tok::Unit(Unit::One)),
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

fn push_lit(out: &mut Vec<Tok>, c: char, fold: bool) {
    if fold {
        out.extend(c.to_lowercase().map(|l| Tok::Unit(Unit::Lit(l))));
    } else {
        out.push(Tok::Unit(Unit::Lit(c)));
    }
}

fn units(run: &[Tok]) -> Vec<Unit> {
    run.iter()
        .filter_map(|t| match t {
            Tok::Unit(u) => Some(*u),
            Tok::Any => None,
        })
        .collect()
}

impl Segment {
    fn new(run: &[Unit]) -> Segment {
        let lead = run.iter().take_while(|u| **u == Unit::One).count();
        if lead == run.len() {
            return Segment {
                lead,
                core: None,
                trail: 0,
            };
        }
        let trail = run.iter().rev().take_while(|u| **u == Unit::One).count();
        let core = &run[lead..run.len() - trail];
        let core = if core.contains(&Unit::One) {
            Core::Wild(ShiftAnd::new(core))
        } else {
            let needle: String = core
                .iter()
                .filter_map(|u| match u {
                    Unit::Lit(c) => Some(*c),
                    Unit::One => None,
                })
                .collect();
            Core::Literal(Box::new(
                memmem::Finder::new(needle.as_bytes()).into_owned(),
            ))
        };
        Segment {
            lead,
            core: Some(core),
            trail,
        }
    }
}

impl ShiftAnd {
    fn new(core: &[Unit]) -> ShiftAnd {
        ShiftAnd {
            len: core.len(),
            blocks: core.chunks(64).map(Block::new).collect(),
        }
    }
}

impl Block {
    fn new(units: &[Unit]) -> Block {
        let one = units
            .iter()
            .enumerate()
            .filter(|(_, u)| **u == Unit::One)
            .fold(0u64, |m, (j, _)| m | 1 << j);
        let mut block = Block {
            ascii: [0; 128],
            other: Vec::new(),
            masks: vec![one],
        };
        for (j, u) in units.iter().enumerate() {
            if let Unit::Lit(c) = *u {
                let k = block.index_or_insert(c);
                if let Some(m) = block.masks.get_mut(k) {
                    *m |= 1 << j;
                }
            }
        }
        block.other.sort_unstable_by_key(|(c, _)| *c);
        block
    }

    /// The mask index of `c`, adding a mask for it if it has none yet. At most 64 distinct
    /// literals fit in a block, so indexes fit in a `u8`.
    fn index_or_insert(&mut self, c: char) -> usize {
        let existing = match ascii_index(c) {
            Some(a) => self
                .ascii
                .get(a)
                .map(|&k| usize::from(k))
                .filter(|&k| k != 0),
            None => self
                .other
                .iter()
                .find(|(o, _)| *o == c)
                .map(|&(_, k)| usize::from(k)),
        };
        if let Some(k) = existing {
            return k;
        }
        let k = self.masks.len();
        let Ok(k8) = u8::try_from(k) else {
            // Unreachable with 64 positions per block; `_` positions are still honoured.
            return 0;
        };
        self.masks.push(self.masks.first().copied().unwrap_or(0));
        match ascii_index(c) {
            Some(a) => {
                if let Some(slot) = self.ascii.get_mut(a) {
                    *slot = k8;
                }
            }
            None => self.other.push((c, k8)),
        }
        k
    }

    /// Positions of this block that accept `c`.
    #[inline]
    fn mask(&self, c: char) -> u64 {
        let k = match ascii_index(c) {
            Some(a) => self.ascii.get(a).copied().unwrap_or(0),
            None => match self.other.binary_search_by_key(&c, |(o, _)| *o) {
                Ok(i) => self.other.get(i).map_or(0, |(_, k)| *k),
                Err(_) => 0,
            },
        };
        let one = self.masks.first().copied().unwrap_or(0);
        self.masks.get(usize::from(k)).copied().unwrap_or(one)
    }
}

fn ascii_index(c: char) -> Option<usize> {
    c.is_ascii().then_some(c as usize)
}

// ---------------------------------------------------------------------------------------
// Matching

pub(super) fn like_match(pattern: &LikePattern, text: &str) -> bool {
    let mut front = text.chars();
    for unit in &pattern.head {
        step(1);
        match front.next() {
            Some(c) if unit.accepts(c) => {}
            _ => return false,
        }
    }
    let Some(rest) = &pattern.rest else {
        return front.as_str().is_empty();
    };
    // The tail is matched from the end of what the head left, so the two never overlap.
    let mut back = front;
    for unit in rest.tail.iter().rev() {
        step(1);
        match back.next_back() {
            Some(c) if unit.accepts(c) => {}
            _ => return false,
        }
    }
    let mut region = back.as_str();
    if !rest.middle.is_empty() {
        // A value too short for the runs fails before any search, so no run longer than
        // the value is ever searched: that bounds the shift-and's words per character by
        // the value's length too, however long a pattern the client sent.
        let chars = region.chars().count();
        step(chars);
        if chars < rest.middle_len {
            return false;
        }
    }
    for segment in &rest.middle {
        match segment.find(region) {
            Some(after) => region = after,
            None => return false,
        }
    }
    true
}

impl Segment {
    /// The leftmost occurrence of the segment in `region`: what follows it, or `None`.
    fn find<'t>(&self, region: &'t str) -> Option<&'t str> {
        let region = skip(region, self.lead)?;
        let region = match &self.core {
            None => region,
            Some(Core::Literal(finder)) => {
                let end = finder
                    .find(region.as_bytes())
                    .map(|start| start + finder.needle().len());
                // Work accounting for the tests: the search reads what lies before the end
                // of the match (or all of the region), times a constant, and nothing after.
                #[cfg(test)]
                step(
                    region
                        .get(..end.unwrap_or(region.len()))
                        .map_or(0, |s| s.chars().count()),
                );
                region.get(end?..)?
            }
            Some(Core::Wild(automaton)) => automaton.find(region)?,
        };
        skip(region, self.trail)
    }
}

/// `region` without its first `n` characters; `None` if it is shorter. O(min(n, len)).
fn skip(region: &str, n: usize) -> Option<&str> {
    let mut chars = region.chars();
    for _ in 0..n {
        step(1);
        chars.next()?;
    }
    Some(chars.as_str())
}

impl ShiftAnd {
    /// The leftmost occurrence in `region`: what follows it, or `None`.
    fn find<'t>(&self, region: &'t str) -> Option<&'t str> {
        match self.blocks.as_slice() {
            [block] => self.find_one_word(block, region),
            blocks => self.find_words(blocks, region),
        }
    }

    /// Cores of at most 64 units: the state is one word.
    fn find_one_word<'t>(&self, block: &Block, region: &'t str) -> Option<&'t str> {
        let hit = 1u64 << (self.len.saturating_sub(1) % 64);
        let mut state = 0u64;
        let mut chars = region.chars();
        while let Some(c) = chars.next() {
            step(1);
            // `| 1`: an occurrence may start at every character.
            state = ((state << 1) | 1) & block.mask(c);
            if state & hit != 0 {
                return Some(chars.as_str());
            }
        }
        None
    }

    /// Longer cores: one word per block, the top bit of each carried into the next.
    fn find_words<'t>(&self, blocks: &[Block], region: &'t str) -> Option<&'t str> {
        let last = self.len.saturating_sub(1) / 64;
        let hit = 1u64 << (self.len.saturating_sub(1) % 64);
        let mut state = vec![0u64; blocks.len()];
        // Words at index `live` and above are zero. A partial match advances one position
        // per character, so only word `live` can become non-zero next: the words above it
        // are skipped, which keeps a long core cheap on text that rarely matches its start.
        let mut live = 1usize;
        let mut chars = region.chars();
        while let Some(c) = chars.next() {
            let upto = (live + 1).min(blocks.len());
            step(upto);
            let mut carry = 1u64;
            let mut top = 0;
            for (k, (word, block)) in state.iter_mut().zip(blocks).take(upto).enumerate() {
                let old = *word;
                *word = ((old << 1) | carry) & block.mask(c);
                carry = old >> 63;
                if *word != 0 {
                    top = k + 1;
                }
            }
            live = top.max(1);
            if state.get(last).is_some_and(|w| w & hit != 0) {
                return Some(chars.as_str());
            }
        }
        None
    }
}

// ---------------------------------------------------------------------------------------
// Work accounting (tests only): the number of inner-loop steps since the last reset.

#[cfg(test)]
thread_local! {
    static STEPS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[inline(always)]
fn step(_n: usize) {
    #[cfg(test)]
    STEPS.with(|s| s.set(s.get() + _n));
}

#[cfg(test)]
mod tests;
