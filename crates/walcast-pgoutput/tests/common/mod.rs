//! A field-by-field byte writer for hand-written wire layouts.
//!
//! Deliberately independent of the crate's encoder: golden tests spell out each field of the
//! spec in order, so a layout mistake shared by encoder and decoder cannot hide.

#![allow(dead_code)]

use bytes::Bytes;

#[derive(Default, Clone)]
pub struct Wire(pub Vec<u8>);

impl Wire {
    pub fn new() -> Self {
        Wire(Vec::new())
    }
    /// Byte1 / Int8.
    pub fn byte(mut self, b: u8) -> Self {
        self.0.push(b);
        self
    }
    pub fn int16(mut self, v: i16) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn int32(mut self, v: i32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn uint32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn int64(mut self, v: i64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn uint64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// String: the bytes then a NUL.
    pub fn string(mut self, s: &str) -> Self {
        self.0.extend_from_slice(s.as_bytes());
        self.0.push(0);
        self
    }
    /// Raw bytes with no length or terminator.
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn bytes(self) -> Bytes {
        Bytes::from(self.0)
    }
}
