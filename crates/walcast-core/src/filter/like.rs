//! `like` / `ilike` patterns: `%` (or `*`) any run, `_` one character, `\\` escapes.

use super::grammar::FilterError;
// ---------------------------------------------------------------------------------------
// LIKE

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LikeTok {
    Lit(char),
    One,
    Any,
}

pub(super) fn compile_like(pattern: &str, fold: bool) -> Result<Vec<LikeTok>, FilterError> {
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

pub(super) fn push_lit(out: &mut Vec<LikeTok>, c: char, fold: bool) {
    if fold {
        out.extend(c.to_lowercase().map(LikeTok::Lit));
    } else {
        out.push(LikeTok::Lit(c));
    }
}

/// Wildcard match with one backtrack point (the last `%`): O(pattern × text), and correct
/// for patterns made of literals, `_` and `%` only.
pub(super) fn like_match(pattern: &[LikeTok], text: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
