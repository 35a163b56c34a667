//! Log sequence numbers and the Postgres timestamp epoch.
//!
//! An LSN is a 64-bit byte position in the WAL. Postgres prints it as two upper-case hex
//! halves (`%X/%X`, high 32 bits then low 32 bits, no zero padding), and that text form is
//! what `START_REPLICATION … LOGICAL X/X`, `IDENTIFY_SYSTEM` and `pg_replication_slots`
//! use, so [`Lsn`] round-trips through exactly that form.

use std::fmt;
use std::str::FromStr;

/// Add to a protocol timestamp (µs since 2000-01-01 00:00:00 UTC) to get Unix microseconds.
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Converts a protocol timestamp to Unix microseconds, saturating instead of overflowing
/// (a hostile or corrupt timestamp must not panic in debug builds).
pub fn pg_to_unix_micros(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_OFFSET_MICROS)
}

/// Converts Unix microseconds to a protocol timestamp, saturating instead of overflowing.
pub fn unix_to_pg_micros(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_MICROS)
}

/// A WAL position.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Debug)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `0/0`: in `START_REPLICATION` it means "from the slot's confirmed_flush_lsn".
    pub const ZERO: Lsn = Lsn(0);
}

impl From<u64> for Lsn {
    fn from(v: u64) -> Self {
        Lsn(v)
    }
}

impl From<Lsn> for u64 {
    fn from(l: Lsn) -> Self {
        l.0
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN in Postgres's `X/Y` form.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("invalid LSN {input:?}: expected X/Y with 1 to 8 hex digits on each side")]
pub struct LsnParseError {
    /// The rejected text.
    pub input: String,
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    /// Accepts what `pg_lsn_in` accepts: 1–8 hex digits (any case), `/`, 1–8 hex digits.
    /// `u32::from_str_radix` alone would also take a leading `+`, hence the digit check.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError {
            input: s.to_owned(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let half = |part: &str| -> Option<u64> {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            u32::from_str_radix(part, 16).ok().map(u64::from)
        };
        let hi = half(hi).ok_or_else(err)?;
        let lo = half(lo).ok_or_else(err)?;
        Ok(Lsn((hi << 32) | lo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn display_matches_postgres() {
        assert_eq!(Lsn(0x16B_3748).to_string(), "0/16B3748");
        assert_eq!(Lsn(1 << 32).to_string(), "1/0");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
        assert_eq!(Lsn(0xAB_0000_00CD).to_string(), "AB/CD");
    }

    #[test]
    fn parses_postgres_text() {
        assert_eq!("0/16B3748".parse::<Lsn>(), Ok(Lsn(0x16B_3748)));
        assert_eq!("0/16b3748".parse::<Lsn>(), Ok(Lsn(0x16B_3748)));
        assert_eq!("1/0".parse::<Lsn>(), Ok(Lsn(1 << 32)));
        assert_eq!("00000001/00000000".parse::<Lsn>(), Ok(Lsn(1 << 32)));
        assert_eq!("FFFFFFFF/FFFFFFFF".parse::<Lsn>(), Ok(Lsn(u64::MAX)));
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "0",
            "0/0/0",
            "+1/0",
            "1/+0",
            "-1/0",
            "0x1/0",
            "1 /0",
            "123456789/0",
            "0/123456789",
            "g/0",
            "0/ 1",
            "１/0",
        ] {
            let e = bad.parse::<Lsn>().unwrap_err();
            assert_eq!(e.input, bad);
        }
    }

    #[test]
    fn epoch_conversions_saturate() {
        assert_eq!(pg_to_unix_micros(0), 946_684_800_000_000);
        assert_eq!(unix_to_pg_micros(946_684_800_000_000), 0);
        assert_eq!(pg_to_unix_micros(i64::MAX), i64::MAX);
        assert_eq!(unix_to_pg_micros(i64::MIN), i64::MIN);
    }

    proptest! {
        #[test]
        fn text_round_trips(v in any::<u64>()) {
            let text = Lsn(v).to_string();
            prop_assert_eq!(text.parse::<Lsn>(), Ok(Lsn(v)));
            prop_assert_eq!(text.to_lowercase().parse::<Lsn>(), Ok(Lsn(v)));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,24}") {
            let _ = s.parse::<Lsn>();
        }
    }
}
