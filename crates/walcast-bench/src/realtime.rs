//! A minimal Supabase Realtime client (vsn 2.0.0 text frames) for load generation.
//!
//! ```text
//!  TcpSocket (optional source address, TCP_NODELAY) ─▶ WebSocket handshake (4 KiB read buffer)
//!    ─▶ ["1","1","realtime:bench-<i>","phx_join",{config…postgres_changes INSERT public.bench}]
//!    ◀─ ["1","1",topic,"phx_reply",{"status":"ok","response":{"postgres_changes":[{…,"id":N}]}}]
//!    ◀─ ["1",null,topic,"system",{"extension":"postgres_changes","status":"ok",…}]
//!    ◀─ [null,null,topic,"postgres_changes",{"ids":[N],"data":{…"record":{"id":123,…}}}]  (hot path)
//! ```
//!
//! The hot path never builds a JSON tree: a delivery is recognised by the `,"postgres_changes",{`
//! event field and the row id is read from the first `"id":` after `"record":{`. An escaped
//! quote inside a string value appears as `\"`, so a text column containing `"id":` cannot
//! produce the unescaped needle. Only the join handshake is parsed with serde_json.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use memchr::memmem::Finder;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// Open a WebSocket to `/socket/websocket` with `apikey=token` and `vsn=2.0.0`.
pub async fn connect(
    server: SocketAddr,
    source: Option<IpAddr>,
    token: &str,
    read_buffer: usize,
) -> Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("binding to source address {ip}"))?;
    }
    let stream = socket
        .connect(server)
        .await
        .with_context(|| format!("connecting to {server}"))?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{server}/socket/websocket?apikey={token}&vsn=2.0.0");
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

/// Topic of subscriber `i`.
pub fn topic(i: usize) -> String {
    format!("realtime:bench-{i}")
}

/// The `phx_join` frame for subscriber `i`: one INSERT binding on `public.bench`.
pub fn join_frame(i: usize, token: &str) -> String {
    serde_json::json!([
        "1",
        "1",
        topic(i),
        "phx_join",
        {
            "config": {
                "broadcast": {"self": false, "ack": false},
                "presence": {"key": "", "enabled": false},
                "postgres_changes": [{"event": "INSERT", "schema": "public", "table": "bench"}],
                "private": false
            },
            "access_token": token
        }
    ])
    .to_string()
}

/// A heartbeat with reference `r`.
pub fn heartbeat_frame(r: u64) -> String {
    format!(r#"[null,"hb{r}","phoenix","heartbeat",{{}}]"#)
}

/// What the join handshake produced.
#[derive(Debug, Clone, Copy)]
pub struct Joined {
    /// The binding id from the join reply.
    pub binding_id: i64,
    /// Whether the "Subscribed to PostgreSQL" system message arrived in time.
    pub subscribed: bool,
}

/// Send the join and wait for an ok reply, then (up to `subscribed_wait`) for the
/// `postgres_changes` system message. Fails on an error reply, a system error or a close.
pub async fn join(ws: &mut Ws, i: usize, token: &str, subscribed_wait: Duration) -> Result<Joined> {
    ws.send(Message::text(join_frame(i, token))).await?;
    let binding_id = loop {
        let v = next_json(ws).await?;
        let (event, r, payload) = (&v[3], &v[1], &v[4]);
        if event == "phx_reply" && r == "1" {
            if payload["status"] != "ok" {
                bail!("join refused: {payload}");
            }
            break payload["response"]["postgres_changes"][0]["id"]
                .as_i64()
                .with_context(|| format!("join reply without a binding id: {payload}"))?;
        }
        check_system(&v)?;
    };
    let subscribed = tokio::time::timeout(subscribed_wait, async {
        loop {
            let v = next_json(ws).await?;
            if check_system(&v)? {
                return Ok::<_, anyhow::Error>(());
            }
        }
    })
    .await;
    let subscribed = match subscribed {
        Ok(r) => {
            r?;
            true
        }
        Err(_) => false,
    };
    Ok(Joined {
        binding_id,
        subscribed,
    })
}

/// `Ok(true)` for the postgres_changes ok system message, an error for a system error or
/// a channel close, `Ok(false)` for anything else.
fn check_system(v: &Value) -> Result<bool> {
    match v[3].as_str() {
        Some("system") => {
            let p = &v[4];
            if p["status"] == "ok" {
                Ok(p["extension"] == "postgres_changes")
            } else {
                bail!("system error during join: {p}")
            }
        }
        Some("phx_close") | Some("phx_error") => bail!("channel closed during join: {v}"),
        _ => Ok(false),
    }
}

async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .with_context(|| format!("frame is not JSON: {}", t.as_str()));
            }
            Some(Ok(Message::Close(c))) => bail!("server closed the socket: {c:?}"),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
            None => bail!("socket ended"),
        }
    }
}

/// A classified inbound text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A postgres_changes delivery with the record's `id` (None when not found).
    Change(Option<u64>),
    /// A `phx_reply` (heartbeat replies land here).
    Reply,
    /// `system`, `phx_close`, `phx_error` or anything else: worth a look.
    Other,
}

/// Precompiled needles for [`Classifier::classify`].
pub struct Classifier {
    change: Finder<'static>,
    record: Finder<'static>,
    id: Finder<'static>,
    reply: Finder<'static>,
}

impl Default for Classifier {
    fn default() -> Self {
        Classifier {
            change: Finder::new(b",\"postgres_changes\",{"),
            record: Finder::new(b"\"record\":{"),
            id: Finder::new(b"\"id\":"),
            reply: Finder::new(b",\"phx_reply\",{"),
        }
    }
}

impl Classifier {
    /// Classify a text frame without parsing it.
    pub fn classify(&self, frame: &[u8]) -> Inbound {
        if let Some(at) = self.change.find(frame) {
            let rest = &frame[at..];
            let id = self.record.find(rest).and_then(|r| {
                let rec = &rest[r..];
                let i = self.id.find(rec)? + 5;
                parse_u64(&rec[i..])
            });
            return Inbound::Change(id);
        }
        if self.reply.find(frame).is_some() {
            return Inbound::Reply;
        }
        Inbound::Other
    }
}

fn parse_u64(b: &[u8]) -> Option<u64> {
    let b = b.strip_prefix(b" ").unwrap_or(b);
    let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    b[..digits].iter().try_fold(0u64, |acc, d| {
        acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_a_delivery() {
        let c = Classifier::default();
        let f = br#"[null,null,"realtime:bench-3","postgres_changes",{"ids":[7],"data":{"schema":"public","table":"bench","type":"INSERT","commit_timestamp":"2026-01-01T00:00:00.000Z","columns":[{"name":"id","type":"int8"}],"record":{"body":"x \"id\":5","id":12345,"n":1},"errors":null}}]"#;
        assert_eq!(c.classify(f), Inbound::Change(Some(12345)));
        let f = br#"[null,null,"realtime:bench-3","postgres_changes",{"ids":[7],"data":{"record":{"id":42}}}]"#;
        assert_eq!(c.classify(f), Inbound::Change(Some(42)));
    }

    #[test]
    fn classifies_replies_and_others() {
        let c = Classifier::default();
        assert_eq!(
            c.classify(br#"[null,"hb1","phoenix","phx_reply",{"status":"ok","response":{}}]"#),
            Inbound::Reply
        );
        assert_eq!(
            c.classify(br#"["1",null,"realtime:x","system",{"status":"error"}]"#),
            Inbound::Other
        );
        assert_eq!(
            c.classify(br#"[null,null,"t","postgres_changes",{"data":{"record":{"id":"x"}}}]"#),
            Inbound::Change(None)
        );
    }

    #[test]
    fn join_frame_is_vsn2() {
        let v: Value = serde_json::from_str(&join_frame(4, "tok")).unwrap();
        assert_eq!(v[2], "realtime:bench-4");
        assert_eq!(v[4]["config"]["postgres_changes"][0]["table"], "bench");
        assert_eq!(v[4]["access_token"], "tok");
    }
}
