//! Checked big-endian reads over one received message.
//!
//! This is the only place that touches raw offsets. Every read checks the remaining length
//! first and reports [`DecodeError::Truncated`] instead of panicking, and variable-length
//! fields come back as validated ranges so callers can slice the owning `Bytes` without a
//! copy and without a second bounds check that could fail.

use std::ops::Range;

use crate::error::DecodeError;
use crate::lsn::Lsn;

pub(crate) struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    /// The range of the next `len` bytes, consumed. The range is valid for `data`.
    pub(crate) fn span(
        &mut self,
        len: usize,
        what: &'static str,
    ) -> Result<Range<usize>, DecodeError> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|end| *end <= self.data.len())
            .ok_or(DecodeError::Truncated { what })?;
        let range = self.pos..end;
        self.pos = end;
        Ok(range)
    }

    /// Everything left, consumed.
    pub(crate) fn rest(&mut self) -> Range<usize> {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        start..self.data.len()
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let range = self.span(N, what)?;
        self.data
            .get(range)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
            .ok_or(DecodeError::Truncated { what })
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let [b] = self.array::<1>(what)?;
        Ok(b)
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        self.array(what).map(i16::from_be_bytes)
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    pub(crate) fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        self.array(what).map(u64::from_be_bytes).map(Lsn)
    }

    /// A NUL-terminated UTF-8 string; the terminator is consumed, not returned.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.data.get(self.pos..).unwrap_or_default();
        let len = memchr::memchr(0, rest).ok_or(DecodeError::MissingNul { what })?;
        let range = self.span(len, what)?;
        // The NUL itself; memchr found it, so this cannot fail, but stay checked anyway.
        self.span(1, what)?;
        let raw = self
            .data
            .get(range)
            .ok_or(DecodeError::Truncated { what })?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 { what })
    }

    /// A declared length that must be non-negative and fit in what is left.
    pub(crate) fn length_i32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::InvalidLength {
            what,
            len: i64::from(len),
        })?;
        if len > self.remaining() {
            return Err(DecodeError::Truncated { what });
        }
        Ok(len)
    }

    /// Fails with [`DecodeError::TrailingBytes`] unless everything was consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes { what, extra }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_are_big_endian_and_checked() {
        let data = [0x01, 0x02, 0x03, 0x04, 0x05];
        let mut r = Reader::new(&data);
        assert_eq!(r.i16("a"), Ok(0x0102));
        assert_eq!(r.i32("b"), Err(DecodeError::Truncated { what: "b" }));
        // A failed read consumes nothing.
        assert_eq!(r.remaining(), 3);
        assert_eq!(r.u8("c"), Ok(3));
        assert_eq!(
            r.finish("m"),
            Err(DecodeError::TrailingBytes {
                what: "m",
                extra: 2
            })
        );
        assert_eq!(
            r.span(usize::MAX, "d"),
            Err(DecodeError::Truncated { what: "d" })
        );
        assert_eq!(r.rest(), 3..5);
        assert_eq!(r.finish("m"), Ok(()));
    }

    #[test]
    fn cstr_needs_terminator_and_utf8() {
        let mut r = Reader::new(b"ab\0c");
        assert_eq!(r.cstr("s").as_deref(), Ok("ab"));
        assert_eq!(r.cstr("s"), Err(DecodeError::MissingNul { what: "s" }));
        let mut r = Reader::new(b"\xff\0");
        assert_eq!(r.cstr("s"), Err(DecodeError::InvalidUtf8 { what: "s" }));
    }

    #[test]
    fn lengths_are_validated_before_use() {
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xfb]);
        assert_eq!(
            r.length_i32("len"),
            Err(DecodeError::InvalidLength {
                what: "len",
                len: -5
            })
        );
        let mut r = Reader::new(&[0x7f, 0xff, 0xff, 0xff, 0]);
        assert_eq!(
            r.length_i32("len"),
            Err(DecodeError::Truncated { what: "len" })
        );
    }
}
