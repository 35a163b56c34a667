//! A real `walcast serve` child process for integration tests, and a small WebSocket client.
#![allow(dead_code)]

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "walcast-test-secret-walcast-test-secret";

/// An HS256 token for `role`, valid for `ttl` seconds (negative: already expired).
pub fn token(role: &str, ttl: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"role": role, "exp": now + ttl, "sub": format!("{role}-user")}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Server {
    /// Start `walcast serve` on a free port and wait for /readyz.
    pub async fn start(database_url: &str, slot: &str, extra: &[&str]) -> Server {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("walcast-serve-{}-{port}.log", std::process::id()));
        let file = std::fs::File::create(&log).unwrap();
        let child = super::walcast()
            .args(["serve", "--database-url", database_url, "--slot", slot])
            .args([
                "--jwt-secret",
                SECRET,
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args([
                "--channel-error-backoff-ms",
                "0",
                "--connect-error-backoff-ms",
                "0",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn walcast serve");
        let server = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = server.get("/readyz").await {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "server not ready:\n{}",
                server.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A plain HTTP GET; returns (status, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        self.get_with(path, "").await
    }

    /// GET with extra header lines (each ending in `\r\n`).
    pub async fn get_with(&self, path: &str, headers: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    pub fn ws_url(&self, token: &str, vsn: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/socket/websocket?apikey={token}&vsn={vsn}",
            self.port
        )
    }

    pub async fn connect(&self, token: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url(token, "2.0.0"))
            .await
            .expect("websocket connect");
        Client { ws }
    }

    /// SIGTERM; returns the exit status and how long the exit took.
    pub fn terminate(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let started = Instant::now();
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        while started.elapsed() < limit {
            if let Ok(Some(status)) = self.child.try_wait() {
                return (Some(status), started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (None, started.elapsed())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
    }

    /// Next text frame as JSON, or None on close/timeout.
    pub async fn next(&mut self, limit: Duration) -> Option<Value> {
        loop {
            match tokio::time::timeout(limit, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return serde_json::from_str(&t).ok(),
                Ok(Some(Ok(Message::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Wait for the next frame matching `pred`.
    pub async fn until(&mut self, limit: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            let f = self.next(left).await?;
            if pred(&f) {
                return Some(f);
            }
        }
        None
    }

    /// Join `topic` (vsn 2) with postgres_changes bindings; returns the reply payload.
    pub async fn join(&mut self, jref: &str, topic: &str, bindings: Value, token: &str) -> Value {
        self.send(json!([jref, jref, topic, "phx_join", {"config": {"postgres_changes": bindings}, "access_token": token}]))
            .await;
        let reply = self
            .until(Duration::from_secs(15), |f| {
                f[1] == jref && f[3] == "phx_reply"
            })
            .await
            .expect("join reply");
        reply[4].clone()
    }

    /// The close frame's code, waiting at most `limit`.
    pub async fn close_code(&mut self, limit: Duration) -> Option<u16> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.ws.next()).await {
                Ok(Some(Ok(Message::Close(Some(f))))) => return Some(f.code.into()),
                Ok(Some(Ok(Message::Close(None)))) => return Some(1005),
                Ok(Some(Ok(_))) => continue,
                _ => return None,
            }
        }
        None
    }
}
