//! JSON string escaping for the outbound frame writers.
//!
//! The writers assemble frames by concatenating pre-serialized JSON pieces, so the only
//! values they ever need to quote themselves are strings (topics, events, refs, reasons).
//! This module owns that quoting. It escapes exactly what RFC 8259 requires (quote,
//! backslash, C0 controls) and leaves every other character as UTF-8, which keeps the
//! output byte-for-byte what `serde_json` would produce for the same string.

/// Appends `s` to `out` as a JSON string literal (with the surrounding quotes).
pub(crate) fn write_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &str = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0x08 => "\\b",
            0x0c => "\\f",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` indexes an ASCII byte, so both slices end on char boundaries.
        out.push_str(&s[start..i]);
        if short.is_empty() {
            push_unicode_escape(out, b);
        } else {
            out.push_str(short);
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends `s` as a JSON string literal, or `null` when absent (refs are nullable).
pub(crate) fn write_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => write_str(out, s),
        None => out.push_str("null"),
    }
}

/// Upper bound of the escaped length, used to size buffers in one allocation.
pub(crate) fn escaped_len_hint(s: &str) -> usize {
    // Most strings need no escaping; a small slack avoids a regrow for the usual one
    // or two escaped characters without scanning the string twice.
    s.len() + 2 + 8
}

fn push_unicode_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push_str("\\u00");
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0x0f)]));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quoted(s: &str) -> String {
        let mut out = String::new();
        write_str(&mut out, s);
        out
    }

    #[test]
    fn escapes_what_json_requires() {
        assert_eq!(quoted("plain"), r#""plain""#);
        assert_eq!(quoted("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(quoted("\n\r\t\u{8}\u{c}"), r#""\n\r\t\b\f""#);
        assert_eq!(quoted("\u{0}\u{1f}"), r#""\u0000\u001f""#);
        assert_eq!(quoted("é😀\u{2028}"), "\"é😀\u{2028}\"");
    }

    #[test]
    fn matches_serde_json() {
        for s in ["", "x", "\u{7f}", "\u{0}a\"\\/", "tab\there", "ünï\u{1}"] {
            assert_eq!(quoted(s), serde_json::to_string(s).unwrap(), "for {s:?}");
        }
    }
}
