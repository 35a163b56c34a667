//! A raw WebSocket client (tokio-tungstenite) for what the official client cannot do: join a
//! channel and then never read another byte.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub struct RawSocket {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// How a socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// A close frame with this code.
    Close(Option<u16>),
    /// EOF or a reset without a close frame.
    Dropped(String),
    /// Still open at the deadline.
    StillOpen,
}

impl RawSocket {
    /// Connect (vsn 1.0.0) and join `realtime:<topic>` for broadcast and presence.
    pub async fn join(port: u16, token: &str, topic: &str) -> Result<RawSocket> {
        let url = format!("ws://127.0.0.1:{port}/realtime/v1/websocket?apikey={token}&vsn=1.0.0");
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .context("raw WebSocket connect")?;
        let join = json!({
            "topic": format!("realtime:{topic}"),
            "event": "phx_join",
            "ref": "1",
            "join_ref": "1",
            "payload": {
                "config": {
                    "broadcast": { "ack": false, "self": false },
                    "presence": { "key": "" },
                    "postgres_changes": [],
                    "private": false
                },
                "access_token": token
            }
        });
        ws.send(Message::text(join.to_string())).await?;
        let reply = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(msg) = ws.next().await {
                if let Message::Text(t) = msg? {
                    let v: serde_json::Value = serde_json::from_str(&t)?;
                    if v["event"] == "phx_reply" && v["ref"] == "1" {
                        return Ok::<_, anyhow::Error>(v);
                    }
                }
            }
            bail!("socket closed before the join reply")
        })
        .await
        .context("no join reply within 10 s")??;
        if reply["payload"]["status"] != "ok" {
            bail!("join refused: {reply}");
        }
        Ok(RawSocket { ws })
    }

    /// Read everything until the socket ends or `timeout` passes.
    pub async fn drain(&mut self, timeout: Duration) -> Ended {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Ended::StillOpen,
                Ok(None) => return Ended::Dropped("EOF".into()),
                Ok(Some(Err(e))) => return Ended::Dropped(e.to_string()),
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Ended::Close(frame.map(|f| u16::from(f.code)))
                }
                Ok(Some(Ok(_))) => {}
            }
        }
    }
}
