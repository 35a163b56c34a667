//! The matcher against two references (the previous backtracking matcher and a plain
//! dynamic program over the pattern text), and its work bound on adversarial patterns.

use proptest::prelude::*;

use super::*;

fn m(pattern: &str, text: &str) -> bool {
    like_match(&compile_like(pattern, false).expect("pattern"), text)
}

#[test]
fn like_patterns() {
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
fn segments_and_anchors() {
    // Head and tail may not overlap.
    assert!(!m("ab%ba", "aba"));
    assert!(m("ab%ba", "abba"));
    assert!(m("%", "anything"));
    assert!(m("%%", ""));
    assert!(m("_%_", "ab"));
    assert!(!m("_%_", "a"));
    // `_` runs at either side of a middle segment.
    assert!(m("%__b_%", "aabc"));
    assert!(!m("%__b_%", "abc"));
    assert!(!m("%__b_%", "aab"));
    assert!(m("%_%", "x"));
    assert!(!m("%__%", "x"));
    // A `_` inside a core, across the 64-position block boundary.
    let long = format!("%a{}b%", "_".repeat(70));
    assert!(m(&long, &format!("xa{}bx", "y".repeat(70))));
    assert!(!m(&long, &format!("xa{}bx", "y".repeat(69))));
    // Escaped wildcards are literals, in a core too.
    assert!(m("%a\\_b%", "xa_bx"));
    assert!(!m("%a\\_b%", "xacbx"));
    assert!(m("%\\%%", "100%"));
    // Multi-byte characters are one character each.
    assert!(m("_é_", "aéb"));
    assert!(m("%é_%", "ééé"));
    assert!(!m("___", "é"));
}

#[test]
fn ilike_folds_the_pattern_per_character() {
    let fold =
        |p: &str, t: &str| like_match(&compile_like(p, true).expect("pattern"), &t.to_lowercase());
    assert!(fold("ABC", "abc"));
    assert!(fold("%É%", "xÉx"));
    // `İ` lower-cases to two characters, on both sides.
    assert!(fold("İ", "İ"));
    assert!(fold("i_", "İ"));
    assert!(!fold("_", "İ"));
}

// ---------------------------------------------------------------------------------------
// References

/// The matcher this module had before: one backtrack point (the last `%`). Correct, but
/// O(pattern × text). It reads the same token stream, so it checks the matching alone.
fn backtracking(toks: &[Tok], text: &str) -> bool {
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match toks.get(p) {
            Some(Tok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(Tok::Unit(Unit::One)) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Unit(Unit::Lit(c))) if text.get(t) == Some(c) => {
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
    toks.get(p..)
        .is_some_and(|rest| rest.iter().all(|tok| *tok == Tok::Any))
}

/// What a pattern position means, read straight from the pattern text (its own reading of
/// the grammar, so it checks `tokenize` too).
#[derive(Clone, Copy)]
enum Ref {
    Lit(char),
    One,
    Any,
}

/// `None` when the pattern ends with a lone `\`.
fn reference(pattern: &str, text: &str, fold: bool) -> Option<bool> {
    let mut p = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let lit = match c {
            '%' | '*' => {
                p.push(Ref::Any);
                continue;
            }
            '_' => {
                p.push(Ref::One);
                continue;
            }
            '\\' => chars.next()?,
            c => c,
        };
        if fold {
            p.extend(lit.to_lowercase().map(Ref::Lit));
        } else {
            p.push(Ref::Lit(lit));
        }
    }
    let text: Vec<char> = if fold {
        text.to_lowercase().chars().collect()
    } else {
        text.chars().collect()
    };
    // ok[j]: the pattern so far matches text[..j]; prev: the same one token earlier.
    let mut ok = vec![false; text.len() + 1];
    let mut prev = ok.clone();
    ok[0] = true;
    for tok in &p {
        std::mem::swap(&mut ok, &mut prev);
        for j in 0..=text.len() {
            ok[j] = match tok {
                Ref::Any => prev[j] || (j > 0 && ok[j - 1]),
                Ref::One => j > 0 && prev[j - 1],
                Ref::Lit(c) => j > 0 && prev[j - 1] && text[j - 1] == *c,
            };
        }
    }
    Some(ok[text.len()])
}

fn check(pattern: &str, text: &str, fold: bool) -> Result<(), TestCaseError> {
    let want = reference(pattern, text, fold);
    let compiled = compile_like(pattern, fold);
    prop_assert_eq!(compiled.is_ok(), want.is_some(), "compiles: {:?}", pattern);
    let (Ok(compiled), Some(want)) = (compiled, want) else {
        return Ok(());
    };
    let value = if fold {
        text.to_lowercase()
    } else {
        text.to_owned()
    };
    let got = like_match(&compiled, &value);
    prop_assert_eq!(got, want, "{:?} like {:?} (fold {})", text, pattern, fold);
    let toks = tokenize(pattern, fold).expect("compiled above");
    prop_assert_eq!(backtracking(&toks, &value), want, "backtracking");
    Ok(())
}

/// A tiny alphabet, so that random patterns and texts meet often; multi-byte characters
/// and ones whose lower case differs in length (`İ` → `i̇`, `ẞ` → `ß`).
const PATTERN_CHARS: &[char] = &['a', 'b', 'A', 'é', 'İ', 'ẞ', '%', '*', '_', '\\'];
const TEXT_CHARS: &[char] = &[
    'a', 'b', 'A', 'B', 'é', 'É', 'i', '\u{307}', 'İ', 'ß', '%', '_',
];

fn string_of(chars: &'static [char], max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(proptest::sample::select(chars), 0..max)
        .prop_map(|cs| cs.into_iter().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn agrees_with_references(
        pattern in string_of(PATTERN_CHARS, 12),
        text in string_of(TEXT_CHARS, 16),
        fold in any::<bool>(),
    ) {
        check(&pattern, &text, fold)?;
    }
}

proptest! {
    // Fewer cases: the references are quadratic, and these inputs are long.
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Cores longer than one 64-position block: a few long runs joined by `%`.
    #[test]
    fn long_segments_agree_with_references(
        pattern in runs(&['a', 'b', '_'], 100),
        text in string_of(&['a', 'b', 'a'], 300),
    ) {
        check(&format!("%{pattern}%"), &text, false)?;
        check(&pattern, &text, false)?;
    }

    /// Texts made to contain the pattern, or to just miss it (one character changed), so
    /// that matches and near misses of long cores get exercised too.
    #[test]
    fn planted_matches(
        pattern in runs(&['a', 'b', 'é', '_'], 100),
        filler in string_of(&['a', 'b', 'é', 'x'], 40),
        flip in any::<Option<proptest::sample::Index>>(),
    ) {
        let mut planted: Vec<char> = pattern
            .chars()
            .map(|c| match c {
                '_' => 'x',
                '%' => 'a',
                c => c,
            })
            .collect();
        if let (Some(flip), false) = (flip, planted.is_empty()) {
            let i = flip.index(planted.len());
            planted[i] = if planted[i] == 'b' { 'a' } else { 'b' };
        }
        let planted: String = planted.into_iter().collect();
        let text = format!("{filler}{planted}{filler}");
        check(&format!("%{pattern}%"), &text, false)?;
        check(&pattern, &planted, false)?;
        check(&pattern, &text, false)?;
    }
}

/// One to four runs over `chars`, each up to `max` long, joined by `%`.
fn runs(chars: &'static [char], max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(string_of(chars, max), 1..5).prop_map(|runs| runs.join("%"))
}

// ---------------------------------------------------------------------------------------
// Work bound

/// Steps taken by one match, with the longest `_`-bearing core's word count.
fn steps(pattern: &str, text: &str) -> (bool, usize) {
    let compiled = compile_like(pattern, false).expect("pattern");
    STEPS.with(|s| s.set(0));
    let hit = like_match(&compiled, text);
    (hit, STEPS.with(|s| s.get()))
}

fn words(pattern: &LikePattern) -> usize {
    pattern
        .rest
        .iter()
        .flat_map(|r| &r.middle)
        .filter_map(|s| match &s.core {
            Some(Core::Wild(a)) => Some(a.blocks.len()),
            _ => None,
        })
        .max()
        .unwrap_or(1)
}

/// The bound the module docs state: a constant times text × words, plus the pattern.
fn assert_linear(pattern: &str, text: &str) -> bool {
    let compiled = compile_like(pattern, false).expect("pattern");
    let (hit, taken) = steps(pattern, text);
    let n = text.chars().count();
    let bound = 3 * n * words(&compiled) + pattern.chars().count();
    assert!(
        taken <= bound,
        "{taken} steps > {bound} for a {}-char pattern on {n} chars",
        pattern.len()
    );
    hit
}

#[test]
fn adversarial_patterns_take_linear_work() {
    const N: usize = 100_000;
    let a_text = "a".repeat(N);
    let mut z_text = "a".repeat(N - 1);
    z_text.push('Z');

    // The reported stall: many `_` between `%` and a literal that never comes.
    let underscores = "_".repeat(5000);
    assert!(!assert_linear(&format!("%{underscores}Z"), &a_text));
    assert!(assert_linear(&format!("%{underscores}Z"), &z_text));
    assert!(!assert_linear(&format!("%{underscores}Z%"), &a_text));
    assert!(assert_linear(&format!("%{underscores}Z%"), &z_text));
    assert!(!assert_linear(&format!("{underscores}%Z%"), &a_text));

    // Many segments: each is searched after the previous one, never from the start again.
    let many_a = "%a".repeat(2000);
    assert!(!assert_linear(&format!("{many_a}%b"), &a_text));
    assert!(!assert_linear(&format!("{many_a}b%"), &a_text));
    assert!(assert_linear(&format!("{many_a}%"), &a_text));
    assert!(!assert_linear(&format!("{}%", "%a_b".repeat(500)), &a_text));
    assert!(!assert_linear(
        &format!("{}%", "%a_b".repeat(500)),
        &"ab".repeat(N / 2)
    ));
    assert!(assert_linear(&format!("{}%", "%a_a".repeat(500)), &a_text));

    // A long core with `_` inside: one state word per 64 positions, no more.
    let long_core = format!("%a{underscores}b%");
    assert!(!assert_linear(&long_core, &a_text));
    assert!(assert_linear(&long_core, &z_text.replace('Z', "b")));
    let almost = format!("%{}b%", "a_".repeat(200));
    assert!(!assert_linear(&almost, &a_text));

    // A run longer than the value is never searched: the value is too short for it.
    let too_long = format!("%a{}b%", "_".repeat(2 * N));
    assert_eq!(steps(&too_long, &a_text), (false, N));

    // The shape that made the backtracking matcher quadratic.
    let (_, old_steps) = backtracking_steps(&format!("%{}Z", "_".repeat(100)), &a_text);
    assert!(old_steps > 50 * N, "the old matcher took only {old_steps}");
    assert!(steps(&format!("%{}Z", "_".repeat(100)), &a_text).1 < 2 * N);
}

/// The previous matcher's pattern-position advances, to show what the bound replaced.
fn backtracking_steps(pattern: &str, text: &str) -> (bool, usize) {
    let toks = tokenize(pattern, false).expect("pattern");
    let text: Vec<char> = text.chars().collect();
    let (mut p, mut t, mut n) = (0usize, 0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        n += 1;
        match toks.get(p) {
            Some(Tok::Any) => {
                star = Some((p, t));
                p += 1;
            }
            Some(Tok::Unit(Unit::One)) => {
                p += 1;
                t += 1;
            }
            Some(Tok::Unit(Unit::Lit(c))) if text.get(t) == Some(c) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return (false, n),
            },
        }
    }
    (
        toks.get(p..)
            .is_some_and(|r| r.iter().all(|x| *x == Tok::Any)),
        n,
    )
}

#[test]
fn blocks_stay_linear_in_the_pattern() {
    // Every character distinct: a mask per distinct literal per 64-position block, not per
    // core, so a long pattern of distinct characters costs memory linear in its length.
    let pattern: String = std::iter::once('%')
        .chain((0..5000u32).filter_map(|i| char::from_u32(0x4e00 + i)))
        .chain("_x%".chars())
        .collect();
    let compiled = compile_like(&pattern, false).expect("pattern");
    let masks: usize = compiled
        .rest
        .iter()
        .flat_map(|r| &r.middle)
        .filter_map(|s| match &s.core {
            Some(Core::Wild(a)) => Some(a.blocks.iter().map(|b| b.masks.len()).sum::<usize>()),
            _ => None,
        })
        .sum();
    assert!(masks <= 5002 + 5002 / 64 + 1, "{masks} masks");
}
