//! `match`/`imatch` patterns are client input compiled at subscribe time and run on every
//! change of their table: compiling must never panic whatever the text, and a compiled
//! pattern must answer on any value without panicking. The input is split at its first
//! newline into pattern and value; its first byte's low bit picks `~` or `~*`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast_core::filter::regex::compile_regex;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let (pattern, value) = text.split_once('\n').unwrap_or((text, text));
    if let Ok(re) = compile_regex(pattern, flags & 1 == 1) {
        re.is_match(value);
        re.is_match(pattern);
    }
});
