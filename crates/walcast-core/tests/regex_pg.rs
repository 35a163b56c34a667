//! `match` / `imatch` agree with Postgres's `~` / `~*`: thousands of random patterns from a
//! grammar covering the supported ARE subset (plus syntax Postgres rejects and syntax walcast
//! refuses), each run against random values, decided by walcast and by a real Postgres
//! (`C` collation, the locale walcast reproduces).
//!
//! For every pattern:
//! - Postgres rejects it → walcast refuses it;
//! - walcast accepts it → for every value, walcast's answer is Postgres's answer;
//! - walcast refuses it as unsupported → Postgres accepts it (the refusal is ours, and said so).
//!
//! Fixed seed by default (`WALCAST_REGEX_SEED`), `WALCAST_REGEX_PATTERNS` patterns (default
//! 3000), 48 values each.

use walcast_core::filter::regex::compile_regex;
use walcast_core::filter::FilterError;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

/// Characters values are made of: letters in both cases (ASCII and not), digits, word and
/// non-word punctuation, spaces and a newline.
const VALUE_CHARS: &[char] = &[
    'a', 'b', 'c', 'A', 'B', 'z', 'é', 'É', 'ß', '1', '9', '_', '-', '.', ' ', '\n', '\t', '[',
    ']', '\\', '*', 'K', 'k', '\u{212a}',
];

fn value(rng: &mut Rng) -> String {
    let len = rng.below(10);
    (0..len)
        .map(|_| VALUE_CHARS[rng.below(VALUE_CHARS.len())])
        .collect()
}

/// Literal characters a pattern uses (escaped where ARE gives them a meaning).
const LITERALS: &[&str] = &[
    "a",
    "b",
    "c",
    "A",
    "B",
    "z",
    "é",
    "É",
    "1",
    "_",
    "-",
    " ",
    "k",
    "K",
    "\\.",
    "\\*",
    "\\[",
    "\\\\",
    "]",
    "}",
    ",",
    "\\n",
    "\\t",
    "\\x41",
    "\\x61",
    "\\u00e9",
    "\\U000000c9",
    "\\B",
    "\\e",
    "\\ca",
];
const BRACKET_MEMBERS: &[&str] = &[
    "a",
    "b",
    "A",
    "z",
    "é",
    "1",
    "_",
    " ",
    "a-c",
    "A-Z",
    "0-9",
    "a-z",
    "é-ÿ",
    "[:alpha:]",
    "[:digit:]",
    "[:alnum:]",
    "[:upper:]",
    "[:lower:]",
    "[:space:]",
    "[:punct:]",
    "[:xdigit:]",
    "[:blank:]",
    "[:print:]",
    "[:graph:]",
    "[:cntrl:]",
    "\\d",
    "\\s",
    "\\w",
    "\\n",
    "\\]",
    "\\\\",
    ".",
    "*",
    "^",
    "$",
    "(",
    "|",
];
const ESCAPES: &[&str] = &[
    "\\d", "\\D", "\\s", "\\S", "\\w", "\\W", "\\m", "\\M", "\\y", "\\Y", "\\A", "\\Z",
];
/// Syntax walcast refuses on purpose, and syntax Postgres rejects.
const ODD: &[&str] = &[
    "(",
    ")",
    "[",
    "{",
    "}",
    "*",
    "+",
    "?",
    "|",
    "\\",
    "{2}",
    "{1,0}",
    "{300}",
    "(?=a)",
    "(?!a)",
    "(?<=a)",
    "(\\1)",
    "\\1",
    "\\07",
    "[[.a.]]",
    "[[=a=]]",
    "[[:nope:]]",
    "[z-a]",
    "\\q",
    "[\\D]",
    "(?:",
    "{,2}",
    "[a",
    "\\0",
    "^*",
    "$+",
    "\\m?",
    "**",
    "(?#c)",
    "[]a]",
    "[^]a]",
    "[a-]",
    "[-a]",
    "a{1}{2}",
    "a*?",
    "a+?",
    "a??",
    "a{1,2}?",
    "()",
    "(|a)",
    "[\\w-z]",
];
const PREFIXES: &[&str] = &[
    "", "", "", "", "***:", "***=", "(?i)", "(?c)", "(?q)", "(?t)", "(?n)", "(?x)", "(?b)", "(?z)",
];

fn atom(rng: &mut Rng, depth: usize) -> String {
    match rng.below(12) {
        0..=3 => rng.pick(LITERALS).to_string(),
        4 => ".".to_string(),
        5 | 6 => {
            let mut s = String::from("[");
            if rng.chance(30) {
                s.push('^');
            }
            for _ in 0..1 + rng.below(3) {
                s.push_str(rng.pick(BRACKET_MEMBERS));
            }
            s.push(']');
            s
        }
        7 => rng.pick(ESCAPES).to_string(),
        8 if depth < 3 => {
            let open = if rng.chance(30) { "(?:" } else { "(" };
            format!("{open}{})", alternation(rng, depth + 1))
        }
        9 => rng.pick(&["^", "$"]).to_string(),
        10 if rng.chance(40) => rng.pick(ODD).to_string(),
        _ => rng.pick(LITERALS).to_string(),
    }
}

fn quantifier(rng: &mut Rng) -> String {
    let q = match rng.below(10) {
        0..=3 => return String::new(),
        4 => "*".to_string(),
        5 => "+".to_string(),
        6 => "?".to_string(),
        7 => format!("{{{}}}", rng.below(4)),
        8 => format!("{{{},}}", rng.below(3)),
        _ => {
            let a = rng.below(3);
            format!("{{{a},{}}}", a + rng.below(3))
        }
    };
    if rng.chance(20) {
        format!("{q}?")
    } else {
        q
    }
}

fn alternation(rng: &mut Rng, depth: usize) -> String {
    let mut branches = Vec::new();
    for _ in 0..1 + usize::from(rng.chance(30)) + usize::from(rng.chance(10)) {
        let mut b = String::new();
        for _ in 0..rng.below(4) + usize::from(depth == 0) {
            b.push_str(&atom(rng, depth));
            b.push_str(&quantifier(rng));
        }
        branches.push(b);
    }
    branches.join("|")
}

fn pattern(rng: &mut Rng) -> String {
    format!("{}{}", rng.pick(PREFIXES), alternation(rng, 0))
}

#[derive(Default, Debug)]
struct Tally {
    patterns: usize,
    accepted: usize,
    invalid: usize,
    unsupported: usize,
    comparisons: usize,
    matched: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn match_and_imatch_agree_with_postgres() -> TestResult {
    let seed: u64 = std::env::var("WALCAST_REGEX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f07e);
    let count: usize = std::env::var("WALCAST_REGEX_PATTERNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3000);
    let db = walcast_testkit::PgCluster::shared()
        .fresh_database()
        .await?;
    let client = db.connect().await?;
    // The column types walcast accepts `match`/`imatch` on all have `~` and `~*` (the
    // differential below runs on text; these values are text-like the same way).
    let row = client
        .query_one(
            "SELECT 'a'::\"char\" ~ 'a', 'ab'::name ~* 'B', 'ab'::varchar ~ '^a'",
            &[],
        )
        .await?;
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    let mut rng = Rng(seed.wrapping_mul(2).wrapping_add(1));
    let mut tally = Tally::default();
    let mut failures = Vec::new();
    let mut values: Vec<String> = Vec::new();
    for n in 0..count {
        // A new set of values every 50 patterns; some match by construction below.
        if n % 50 == 0 {
            values = (0..40).map(|_| value(&mut rng)).collect();
        }
        let p = pattern(&mut rng);
        let icase = rng.chance(35);
        // Values built from the pattern's own literals, so matches are common.
        let mut vals = values.clone();
        for _ in 0..8 {
            let plain: String = p
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == ' ')
                .collect();
            let cut = rng.below(plain.chars().count() + 1);
            let mut v: String = plain.chars().take(cut).collect();
            if rng.chance(50) {
                v = v.to_uppercase();
            }
            if rng.chance(50) {
                v = format!("{}{v}{}", value(&mut rng), value(&mut rng));
            }
            vals.push(v);
        }
        tally.patterns += 1;
        let op = if icase { "~*" } else { "~" };
        let sql = format!(
            "SELECT array_agg((v COLLATE \"C\") {op} $1 ORDER BY i) FROM unnest($2::text[]) WITH ORDINALITY AS t(v, i)"
        );
        let pg: Result<Vec<bool>, String> = match client.query_one(&sql, &[&p, &vals]).await {
            Ok(row) => Ok(row.get(0)),
            Err(e) => Err(e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| e.to_string())),
        };
        let ours = compile_regex(&p, icase);
        match (&pg, ours) {
            (Err(pg_err), Ok(_)) => failures.push(format!(
                "{op} {p:?}: Postgres rejects it ({pg_err}) but walcast accepts it"
            )),
            // Refused either way (a pattern using syntax we do not support may also be
            // invalid further on; we stop at the first reason).
            (Err(_), Err(_)) => tally.invalid += 1,
            (Ok(_), Err(FilterError::UnsupportedRegex { .. })) => tally.unsupported += 1,
            (Ok(_), Err(e)) => failures.push(format!(
                "{op} {p:?}: Postgres accepts it but walcast calls it invalid: {e}"
            )),
            (Ok(expected), Ok(re)) => {
                tally.accepted += 1;
                for (v, want) in vals.iter().zip(expected) {
                    tally.comparisons += 1;
                    tally.matched += usize::from(*want);
                    if re.is_match(v) != *want {
                        failures.push(format!(
                            "{op} {p:?} on {v:?}: Postgres says {want}, walcast says {}",
                            !want
                        ));
                    }
                }
            }
        }
        if failures.len() > 30 {
            break;
        }
    }
    eprintln!("seed {seed}: {tally:?}");
    assert!(
        failures.is_empty(),
        "{} disagreements (seed {seed}):\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The grammar must exercise every outcome, and evaluation most of all.
    assert!(tally.accepted * 2 > tally.patterns, "{tally:?}");
    assert!(tally.invalid > 0 && tally.unsupported > 0, "{tally:?}");
    assert!(
        tally.matched * 10 > tally.comparisons && tally.matched * 10 < tally.comparisons * 9,
        "values should both match and not: {tally:?}"
    );
    Ok(())
}
