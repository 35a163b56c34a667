//! A receive-mostly WebSocket client with no per-frame allocation, for load generators that
//! must read hundreds of thousands of frames per second on a shared core.
//!
//! ```text
//!  TcpSocket (optional source address, TCP_NODELAY) ─▶ GET <path> Upgrade: websocket ─▶ 101
//!  read(2) into one reused buffer ─▶ next_frame(): header parsed in place, payload borrowed
//!  send_text(): one masked frame (all-zero mask key, so the payload is copied, not xored)
//! ```
//!
//! Invariants:
//! - Bytes after the handshake response stay in the buffer (a server may send frames right
//!   behind the 101).
//! - A frame is returned only when it is complete; a frame larger than the buffer grows it.
//! - No extensions are negotiated, so frames are never compressed; fragmented messages come
//!   back frame by frame (the load generators only ever see small single-frame messages).
//! - The accept key is not verified: this talks to servers under test, not to strangers.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use anyhow::{bail, Context, Result};
use memchr::memmem;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// WebSocket opcodes the callers care about.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A client WebSocket over one TCP stream with one reused read buffer.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Length of the frame at `start` once its header is known and it is incomplete.
    need: usize,
    out: Vec<u8>,
}

impl RawWs {
    /// Connect and upgrade `path` (path and query, e.g. `/socket/websocket?vsn=2.0.0`).
    pub async fn connect(
        server: SocketAddr,
        source: Option<IpAddr>,
        path: &str,
        buf_size: usize,
    ) -> Result<RawWs> {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding to source address {ip}"))?;
        }
        let mut stream = socket
            .connect(server)
            .await
            .with_context(|| format!("connecting to {server}"))?;
        stream.set_nodelay(true)?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let mut ws = RawWs {
            stream,
            buf: vec![0; buf_size.max(1024)],
            start: 0,
            end: 0,
            need: 0,
            out: Vec::with_capacity(256),
        };
        let head_end = loop {
            if let Some(i) = memmem::find(&ws.buf[..ws.end], b"\r\n\r\n") {
                break i + 4;
            }
            if ws.end == ws.buf.len() {
                bail!("handshake response larger than {} bytes", ws.buf.len());
            }
            let n = ws.stream.read(&mut ws.buf[ws.end..]).await?;
            if n == 0 {
                bail!("connection closed during the WebSocket handshake");
            }
            ws.end += n;
        };
        let head = String::from_utf8_lossy(&ws.buf[..head_end]);
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "101" {
            bail!(
                "upgrade refused: {}",
                head.lines().next().unwrap_or_default()
            );
        }
        ws.start = head_end;
        Ok(ws)
    }

    /// Send one text message (a single masked frame).
    pub async fn send_text(&mut self, text: &str) -> std::io::Result<()> {
        self.send_frame(opcode::TEXT, text.as_bytes()).await
    }

    /// Send one masked frame with the given opcode.
    pub async fn send_frame(&mut self, op: u8, payload: &[u8]) -> std::io::Result<()> {
        self.out.clear();
        self.out.push(0x80 | op);
        let len = payload.len();
        if len < 126 {
            self.out.push(0x80 | len as u8);
        } else if len <= u16::MAX as usize {
            self.out.push(0x80 | 126);
            self.out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            self.out.push(0x80 | 127);
            self.out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        // Mask key 0: masking is the identity, and servers must accept any key.
        self.out.extend_from_slice(&[0, 0, 0, 0]);
        self.out.extend_from_slice(payload);
        self.stream.write_all(&self.out).await
    }

    /// The next complete frame already in the buffer: `(opcode, payload range)`; the range
    /// stays valid until the next [`RawWs::fill`]. `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Range<usize>)>> {
        let avail = &self.buf[self.start..self.end];
        if avail.len() < 2 {
            return Ok(None);
        }
        let op = avail[0] & 0x0F;
        let masked = avail[1] & 0x80 != 0;
        let (len, mut header) = match avail[1] & 0x7F {
            126 => {
                if avail.len() < 4 {
                    return Ok(None);
                }
                (u64::from(u16::from_be_bytes([avail[2], avail[3]])), 4)
            }
            127 => {
                if avail.len() < 10 {
                    return Ok(None);
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&avail[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask_at = header;
        if masked {
            header += 4;
        }
        let Ok(len) = usize::try_from(len) else {
            bail!("frame length {len} does not fit in memory");
        };
        if len > 64 << 20 {
            bail!("frame of {len} bytes is larger than a load generator accepts");
        }
        let total = header + len;
        if avail.len() < total {
            self.need = total;
            return Ok(None);
        }
        let payload = self.start + header..self.start + total;
        if masked {
            let key = [
                avail[mask_at],
                avail[mask_at + 1],
                avail[mask_at + 2],
                avail[mask_at + 3],
            ];
            for (i, b) in self.buf[payload.clone()].iter_mut().enumerate() {
                *b ^= key[i % 4];
            }
        }
        self.start += total;
        self.need = 0;
        Ok(Some((op, payload)))
    }

    /// Bytes of a range returned by [`RawWs::next_frame`].
    pub fn payload(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Read more bytes (one read(2)); `Ok(0)` at end of stream. Invalidates frame ranges.
    pub async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && (self.buf.len() - self.end < 512 || self.need > 0) {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.need > self.buf.len() {
            self.buf.resize(self.need, 0);
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// The unsigned decimal right after the first `needle` in `frame` (e.g. `"t":`).
pub fn number_after(frame: &[u8], needle: &memmem::Finder<'_>) -> Option<u64> {
    let at = needle.find(frame)? + needle.needle().len();
    let digits = frame[at..]
        .iter()
        .take(20)
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 || digits > 19 {
        return None;
    }
    frame[at..at + digits].iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// The status code of a close frame's payload, if it has one.
pub fn close_code(payload: &[u8]) -> Option<u16> {
    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_numbers_by_byte_search() {
        let t = memmem::Finder::new(b"\"t\":");
        let s = memmem::Finder::new(b"\"s\":");
        let f = br#"[null,null,"realtime:fanout-0","broadcast",{"type":"broadcast","event":"tick","payload":{"t":1764313200123456,"s":42,"pad":"xx"}}]"#;
        assert_eq!(number_after(f, &t), Some(1_764_313_200_123_456));
        assert_eq!(number_after(f, &s), Some(42));
        assert_eq!(number_after(br#"{"t":"x"}"#, &t), None);
        assert_eq!(number_after(br#"{"s":1}"#, &t), None);
        assert_eq!(number_after(br#"{"t":99999999999999999999}"#, &t), None);
    }

    #[test]
    fn close_codes() {
        assert_eq!(close_code(&[0x0F, 0xA8, b'x']), Some(4008));
        assert_eq!(close_code(&[]), None);
    }
}
