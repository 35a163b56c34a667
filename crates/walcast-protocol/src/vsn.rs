//! Serializer version negotiation (`vsn` query parameter).
//!
//! Phoenix picks the serializer by matching the client's `vsn` against the requirements
//! `~> 1.0.0` and `~> 2.0.0` with Elixir's semver rules. Clients only ever send
//! `1.0.0` or `2.0.0`, but matching the same rule means a client that sends, say,
//! `2.0.1` gets the same answer from walcast as from the reference server.
//!
//! `~> M.0.0` means `>= M.0.0 and < M.1.0`. Pre-releases take part (Elixir's
//! `Version.match?` allows them by default), so `1.0.1-dev` matches `~> 1.0.0` while
//! `1.0.0-rc.1` does not (it sorts before `1.0.0`). Build metadata is ignored.

use thiserror::Error;

/// The frame format of one WebSocket connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vsn {
    /// `vsn=1.0.0`: JSON object text frames, no binary frames.
    V1,
    /// `vsn=2.0.0`: JSON array text frames plus binary user-broadcast frames.
    V2,
}

/// The `vsn` query parameter named no supported serializer; the upgrade is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unsupported serializer version {offered:?}; supported: ~> 1.0.0, ~> 2.0.0")]
pub struct VsnError {
    /// What the client sent, cut to 64 characters so a hostile value cannot flood logs.
    pub offered: String,
}

impl Vsn {
    /// Negotiates the serializer from the raw `vsn` query value (`None` when absent).
    ///
    /// Absent means `1.0.0`, as in Phoenix. A present but empty value is an error (Phoenix
    /// only substitutes the default for a missing parameter).
    pub fn from_query(vsn: Option<&str>) -> Result<Vsn, VsnError> {
        let Some(raw) = vsn else {
            return Ok(Vsn::V1);
        };
        let refuse = || VsnError {
            offered: raw.chars().take(64).collect(),
        };
        let v = Semver::parse(raw).ok_or_else(refuse)?;
        // Inside `~> M.0.0` only `M.0.0-pre` falls below the lower bound.
        let in_range = |major| v.major == major && v.minor == 0 && !(v.patch == 0 && v.pre);
        if in_range(1) {
            Ok(Vsn::V1)
        } else if in_range(2) {
            Ok(Vsn::V2)
        } else {
            Err(refuse())
        }
    }

    /// The canonical version string of this serializer.
    pub fn as_str(self) -> &'static str {
        match self {
            Vsn::V1 => "1.0.0",
            Vsn::V2 => "2.0.0",
        }
    }

    /// Whether binary frames (kinds 3 and 4) exist in this format.
    pub fn supports_binary(self) -> bool {
        matches!(self, Vsn::V2)
    }
}

/// The parts of a semantic version that the `~>` rule looks at.
struct Semver {
    major: u64,
    minor: u64,
    patch: u64,
    pre: bool,
}

impl Semver {
    fn parse(s: &str) -> Option<Semver> {
        let (rest, build) = match s.split_once('+') {
            Some((rest, build)) => (rest, Some(build)),
            None => (s, None),
        };
        if let Some(build) = build {
            identifiers_ok(build, false)?;
        }
        let (core, pre) = match rest.split_once('-') {
            Some((core, pre)) => {
                identifiers_ok(pre, true)?;
                (core, true)
            }
            None => (rest, false),
        };
        let mut parts = core.split('.');
        let major = numeric(parts.next()?)?;
        let minor = numeric(parts.next()?)?;
        let patch = numeric(parts.next()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(Semver {
            major,
            minor,
            patch,
            pre,
        })
    }
}

/// A version number part: digits, no leading zero (semver 2.0.0 §2).
fn numeric(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Dot-separated `[0-9A-Za-z-]+` identifiers; numeric pre-release ones without leading zeros.
fn identifiers_ok(s: &str, pre: bool) -> Option<()> {
    for id in s.split('.') {
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return None;
        }
        if pre && id.len() > 1 && id.starts_with('0') && id.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_is_v1() {
        assert_eq!(Vsn::from_query(None), Ok(Vsn::V1));
    }

    #[test]
    fn tilde_ranges() {
        for (input, want) in [
            ("1.0.0", Vsn::V1),
            ("1.0.7", Vsn::V1),
            ("1.0.12+build.5", Vsn::V1),
            ("1.0.1-dev", Vsn::V1),
            ("2.0.0", Vsn::V2),
            ("2.0.3", Vsn::V2),
            ("2.0.0+sha.abc", Vsn::V2),
        ] {
            assert_eq!(Vsn::from_query(Some(input)), Ok(want), "{input}");
        }
    }

    #[test]
    fn outside_or_invalid_is_refused() {
        for input in [
            "",
            "1",
            "1.0",
            "2.0",
            "1.1.0",
            "0.9.9",
            "3.0.0",
            "2.1.0",
            "1.0.0-rc.1",
            "2.0.0-beta",
            "01.0.0",
            "1.00.0",
            "1.0.0.0",
            " 1.0.0",
            "1.0.0 ",
            "v2.0.0",
            "2.0.0+",
            "2.0.1-01",
            "1.0.x",
            "99999999999999999999.0.0",
        ] {
            let err = Vsn::from_query(Some(input)).unwrap_err();
            assert_eq!(err.offered, input, "{input}");
        }
    }

    #[test]
    fn offered_is_bounded() {
        let long = "9".repeat(1000);
        let err = Vsn::from_query(Some(&long)).unwrap_err();
        assert_eq!(err.offered.chars().count(), 64);
    }

    #[test]
    fn canonical_strings() {
        assert_eq!(Vsn::V1.as_str(), "1.0.0");
        assert_eq!(Vsn::V2.as_str(), "2.0.0");
        assert!(!Vsn::V1.supports_binary());
        assert!(Vsn::V2.supports_binary());
    }
}
