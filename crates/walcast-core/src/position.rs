//! Positions: where a change sits in the commit order, as clients see and echo it back.
//!
//! ```text
//!   commit LSN of its transaction   index of the change in the transaction
//!   ┌──────────────┴─────────────┐ ┌────┴───┐
//!   0000000001A2B3C8               00000003        24 upper-case hex digits, fixed width
//! ```
//!
//! Invariants:
//! - Ordering the strings byte-wise orders the changes by commit (fixed width, upper-case
//!   hex), so clients may compare them without parsing; to them they are opaque.
//! - Two transactions never share a commit LSN, and a transaction numbers its changes from 0
//!   in decoding order, so a position names exactly one change and a stream re-read from the
//!   slot gives every change the same position again.
//! - Every change committed after a moment has a commit LSN above the WAL insert position
//!   read at that moment, so [`Position::through`] of that LSN is a boundary: everything
//!   committed before it sorts at or below, everything after sorts above.

use std::fmt;
use std::str::FromStr;

use walcast_pgoutput::Lsn;

/// A change's place in the commit order: its transaction's commit LSN, then its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    pub lsn: Lsn,
    pub index: u32,
}

/// Length of a position's text form.
pub const POSITION_LEN: usize = 24;

impl Position {
    /// Before every change.
    pub const ZERO: Position = Position {
        lsn: Lsn(0),
        index: 0,
    };

    pub fn new(lsn: Lsn, index: u32) -> Position {
        Position { lsn, index }
    }

    /// After every change of a transaction committed at or before `lsn`, before every change
    /// committed later: the boundary a WAL position read from the server draws.
    pub fn through(lsn: Lsn) -> Position {
        Position {
            lsn,
            index: u32::MAX,
        }
    }

    /// After every change committed before `lsn` and before any committed at `lsn` or later.
    pub fn just_before(lsn: Lsn) -> Position {
        match lsn.0.checked_sub(1) {
            Some(prev) => Position::through(Lsn(prev)),
            None => Position::ZERO,
        }
    }

    /// Parse the text form; anything but exactly 24 hex digits is refused.
    pub fn parse(text: &str) -> Result<Position, PositionError> {
        let bytes = text.as_bytes();
        if bytes.len() != POSITION_LEN || !bytes.iter().all(u8::is_ascii_hexdigit) {
            return Err(PositionError);
        }
        // Both halves are 16 and 8 hex digits: they cannot overflow their integers.
        let lsn = u64::from_str_radix(&text[..16], 16).map_err(|_| PositionError)?;
        let index = u32::from_str_radix(&text[16..], 16).map_err(|_| PositionError)?;
        Ok(Position {
            lsn: Lsn(lsn),
            index,
        })
    }

    /// The text form into a fixed buffer (no allocation on the delivery path).
    pub fn to_array(self) -> [u8; POSITION_LEN] {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [0u8; POSITION_LEN];
        for (i, slot) in out[..16].iter_mut().enumerate() {
            *slot = HEX[((self.lsn.0 >> (60 - 4 * i)) & 0xF) as usize];
        }
        for (i, slot) in out[16..].iter_mut().enumerate() {
            *slot = HEX[((self.index >> (28 - 4 * i)) & 0xF) as usize];
        }
        out
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let buf = self.to_array();
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

/// A position that is not 24 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed position: expected the 24 hex digits of an event id walcast sent")]
pub struct PositionError;

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Position::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_is_fixed_width() {
        let p = Position::new(Lsn(0x01A2_B3C8), 3);
        assert_eq!(p.to_string(), "0000000001A2B3C800000003");
        assert_eq!(Position::parse(&p.to_string()), Ok(p));
        let max = Position::new(Lsn(u64::MAX), u32::MAX);
        assert_eq!(max.to_string(), "F".repeat(24));
        assert_eq!(Position::parse(&max.to_string()), Ok(max));
        assert_eq!(
            Position::parse("0000000001a2b3c800000003"),
            Ok(p),
            "lower case is accepted"
        );
    }

    #[test]
    fn strings_sort_like_positions() {
        let ps = [
            Position::new(Lsn(1), 0),
            Position::new(Lsn(1), 1),
            Position::new(Lsn(1), 0x10),
            Position::new(Lsn(2), 0),
            Position::new(Lsn(0x1_0000_0000), 0),
            Position::through(Lsn(0x1_0000_0000)),
        ];
        for w in ps.windows(2) {
            assert!(w[0] < w[1]);
            assert!(w[0].to_string() < w[1].to_string(), "{} {}", w[0], w[1]);
        }
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "0",
            "0000000001A2B3C80000000",
            "0000000001A2B3C8000000033",
            "0000000001A2B3C80000000G",
            "+000000001A2B3C800000003",
            "0000000001A2B3C8 0000003",
            "ÿÿÿÿÿÿÿÿÿÿÿÿ",
        ] {
            assert_eq!(Position::parse(bad), Err(PositionError), "{bad:?}");
        }
    }

    #[test]
    fn boundaries() {
        let lsn = Lsn(100);
        assert!(Position::new(Lsn(99), u32::MAX) <= Position::just_before(lsn));
        assert!(Position::new(lsn, 0) > Position::just_before(lsn));
        assert!(Position::new(lsn, u32::MAX) <= Position::through(lsn));
        assert!(Position::new(Lsn(101), 0) > Position::through(lsn));
        assert_eq!(Position::just_before(Lsn(0)), Position::ZERO);
    }
}
