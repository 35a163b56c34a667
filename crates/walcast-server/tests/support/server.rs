//! A real `walcast serve` child process for integration tests, and a small WebSocket client.
#![allow(dead_code)]

use std::net::IpAddr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "walcast-test-secret-walcast-test-secret";

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs() as i64
}

/// An HS256 token for `role`, valid for `ttl` seconds (negative: already expired).
pub fn token(role: &str, ttl: i64) -> String {
    token_with(json!({"role": role, "exp": now_unix() + ttl, "sub": format!("{role}-user")}))
}

/// An HS256 token with exactly these claims; `exp` is added (one hour ahead) when missing.
pub fn token_with(claims: Value) -> String {
    let mut claims = claims;
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now_unix() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("an HS256 token with JSON claims always encodes")
}

pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: std::path::PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
        .port()
}

/// How to start a server beyond [`Server::start`]'s defaults.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Extra command-line arguments.
    pub args: Vec<String>,
    /// Extra environment variables (e.g. `RUST_LOG`, `ALLOWED_ORIGINS`).
    pub env: Vec<(String, String)>,
    /// Run the server with this many file descriptors (`prlimit --nofile=N:N`).
    pub fd_limit: Option<u64>,
}

impl Options {
    pub fn args(mut self, args: &[&str]) -> Options {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Options {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    pub fn fd_limit(mut self, n: u64) -> Options {
        self.fd_limit = Some(n);
        self
    }
}

/// An HTTP response read to the end of a `Connection: close` exchange.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header of that (case-insensitive) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| {
            panic!(
                "expected a JSON body (status {}), got {:?}: {e}",
                self.status, self.body
            )
        })
    }
}

/// Parse a raw HTTP/1.1 response (status line, headers, body; chunked bodies decoded).
pub fn parse_http_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            if n == 0 || after.len() < n {
                break;
            }
            out.push_str(&after[..n]);
            rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
        }
        out
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// A random-enough `Sec-WebSocket-Key` (16 bytes, base64).
fn ws_key() -> String {
    use base64::Engine;
    let n = uuid::Uuid::new_v4();
    base64::engine::general_purpose::STANDARD.encode(n.as_bytes())
}

impl Server {
    /// Start `walcast serve` on a free port and wait for /readyz.
    pub async fn start(database_url: &str, slot: &str, extra: &[&str]) -> Server {
        Server::start_with(database_url, slot, Options::default().args(extra)).await
    }

    /// [`Server::start`] with extra arguments, environment and a descriptor limit. Panics
    /// with the server's log when it exits before it is ready (e.g. an unknown flag).
    pub async fn start_with(database_url: &str, slot: &str, opts: Options) -> Server {
        Server::spawn_until(database_url, slot, opts, "/readyz").await
    }

    /// [`Server::start_with`], returning once the server answers HTTP (`/healthz`) whether
    /// or not its replication stream is up (e.g. a server whose slot another one holds).
    pub async fn start_serving(database_url: &str, slot: &str, opts: Options) -> Server {
        Server::spawn_until(database_url, slot, opts, "/healthz").await
    }

    async fn spawn_until(database_url: &str, slot: &str, opts: Options, probe: &str) -> Server {
        let port = free_port();
        let log =
            std::env::temp_dir().join(format!("walcast-serve-{}-{port}.log", std::process::id()));
        let file = std::fs::File::create(&log)
            .unwrap_or_else(|e| panic!("cannot create the server log {}: {e}", log.display()));
        let mut cmd = match opts.fd_limit {
            Some(n) => {
                // prlimit sets the limit on itself and execs the server: same pid.
                let mut c = std::process::Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}"))
                    .arg("--")
                    .arg(super::walcast_bin());
                let plain = super::walcast();
                for (k, v) in plain.get_envs() {
                    if let (Some(v), Some(k)) = (v, k.to_str()) {
                        c.env(k, v);
                    }
                }
                c
            }
            None => super::walcast(),
        };
        cmd.args(["serve", "--database-url", database_url, "--slot", slot])
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
            .args(&opts.args)
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn walcast serve");
        let mut server = Server { child, port, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = server.get(probe).await {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "walcast serve exited ({status}) before it was ready; args {:?}; log:\n{}",
                    opts.args,
                    server.log()
                );
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident set size now, in KiB (VmRSS).
    pub fn rss_kib(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// A plain HTTP GET; returns (status, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        self.get_with(path, "").await
    }

    /// GET with extra header lines (each ending in `\r\n`).
    pub async fn get_with(&self, path: &str, headers: &str) -> std::io::Result<(u16, String)> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{headers}\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let r = parse_http_response(&buf);
        Ok((r.status, r.body))
    }

    /// Any HTTP/1.1 request (`Connection: close`), with `headers` as (name, value) pairs.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(parse_http_response(&buf))
    }

    /// `POST /api/broadcast` with a bearer token and a JSON body.
    pub async fn rest_broadcast(&self, token: &str, body: &Value) -> HttpResponse {
        let auth = format!("Bearer {token}");
        self.request(
            "POST",
            "/api/broadcast",
            &[
                ("Authorization", &auth),
                ("Content-Type", "application/json"),
            ],
            body.to_string().as_bytes(),
        )
        .await
        .expect("POST /api/broadcast: the server must answer")
    }

    /// The raw bytes of a WebSocket upgrade request for `path_and_query`.
    pub fn upgrade_request(path_and_query: &str, headers: &[(&str, &str)]) -> String {
        let mut req = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n",
            ws_key()
        );
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        req.push_str("\r\n");
        req
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
        Client {
            ws,
            skipped: Vec::new(),
        }
    }

    /// Upgrade at `/socket/websocket?<query>` with extra headers: the client, or the refusal's
    /// HTTP status and body.
    pub async fn try_connect(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<Client, (u16, String)> {
        let url = format!("ws://127.0.0.1:{}/socket/websocket?{query}", self.port);
        let mut req = url.into_client_request().expect("a valid websocket URL");
        for (n, v) in headers {
            req.headers_mut()
                .insert(header_name(n), v.parse().expect("a valid header value"));
        }
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => Ok(Client {
                ws,
                skipped: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .to_string();
                Err((resp.status().as_u16(), body))
            }
            Err(e) => panic!("websocket upgrade failed without an HTTP answer: {e}"),
        }
    }

    /// A vsn 2.0.0 client on a TCP connection from `source` (e.g. 127.0.0.2) whose kernel
    /// receive buffer is `recv_buffer` bytes. The handshake is complete; reading is up to
    /// the caller (a client that never reads lets the server's writes back up).
    pub async fn connect_from(&self, token: &str, source: IpAddr, recv_buffer: u32) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket
            .set_recv_buffer_size(recv_buffer)
            .expect("SO_RCVBUF can be set");
        socket
            .bind((source, 0).into())
            .unwrap_or_else(|e| panic!("bind to {source}: {e}"));
        let stream = socket
            .connect(([127, 0, 0, 1], self.port).into())
            .await
            .expect("TCP connect to the server");
        let _ = stream.set_nodelay(true);
        let (ws, _) = tokio_tungstenite::client_async_with_config(
            self.ws_url(token, "2.0.0"),
            MaybeTlsStream::Plain(stream),
            Some(WebSocketConfig::default().max_message_size(Some(64 << 20))),
        )
        .await
        .expect("websocket handshake");
        Client {
            ws,
            skipped: Vec::new(),
        }
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

/// Header names as `http` wants them (lower case).
fn header_name(n: &str) -> tokio_tungstenite::tungstenite::http::HeaderName {
    tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
        .expect("a valid header name")
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// One frame (or the end) as a client saw it.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A text frame (parsed JSON; a non-JSON text becomes a JSON string).
    Json(Value),
    /// A binary frame.
    Binary(Vec<u8>),
    /// A close frame with its code (1005 when it had none), or the connection ended
    /// without one (`None`).
    Closed(Option<u16>),
}

impl Frame {
    /// The JSON of a text frame.
    pub fn json(&self) -> Option<&Value> {
        match self {
            Frame::Json(v) => Some(v),
            _ => None,
        }
    }

    /// A text frame on `topic` with `event` (vsn 2.0.0 array form).
    pub fn is(&self, topic: &str, event: &str) -> bool {
        self.json().is_some_and(|v| v[2] == topic && v[3] == event)
    }

    /// A vsn 2.0.0 user broadcast (binary kind 4): (topic, event, metadata, payload).
    pub fn user_broadcast(&self) -> Option<(String, String, String, Vec<u8>)> {
        let Frame::Binary(b) = self else { return None };
        if b.len() < 5 || b[0] != 4 {
            return None;
        }
        let (t, e, m) = (b[1] as usize, b[2] as usize, b[3] as usize);
        let rest = &b[5..];
        if rest.len() < t + e + m {
            return None;
        }
        let s = |x: &[u8]| String::from_utf8_lossy(x).into_owned();
        Some((
            s(&rest[..t]),
            s(&rest[t..t + e]),
            s(&rest[t + e..t + e + m]),
            rest[t + e + m..].to_vec(),
        ))
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Frames that [`Client::join_with`] and [`Client::heartbeat`] read past while waiting
    /// for their reply (tests that check what never arrived look here too).
    pub skipped: Vec<Frame>,
}

impl Client {
    /// Connect to a full `ws://` URL.
    pub async fn open(url: &str) -> Result<Client, String> {
        tokio_tungstenite::connect_async(url)
            .await
            .map(|(ws, _)| Client {
                ws,
                skipped: Vec::new(),
            })
            .map_err(|e| e.to_string())
    }

    pub async fn send(&mut self, frame: Value) {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("sending a frame to the server failed: {e}"));
    }

    /// Send without panicking (the server may have closed the socket).
    pub async fn try_send(&mut self, frame: Value) -> bool {
        self.ws
            .send(Message::Text(frame.to_string().into()))
            .await
            .is_ok()
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

    /// Next frame of any kind (text, binary, the end); `None` when nothing came in `limit`.
    pub async fn recv(&mut self, limit: Duration) -> Option<Frame> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(t)))) => {
                    return Some(Frame::Json(
                        serde_json::from_str(&t).unwrap_or_else(|_| Value::String(t.to_string())),
                    ))
                }
                Ok(Some(Ok(Message::Binary(b)))) => return Some(Frame::Binary(b.to_vec())),
                Ok(Some(Ok(Message::Close(Some(f))))) => {
                    return Some(Frame::Closed(Some(f.code.into())))
                }
                Ok(Some(Ok(Message::Close(None)))) => return Some(Frame::Closed(Some(1005))),
                Ok(Some(Err(_))) | Ok(None) => return Some(Frame::Closed(None)),
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// Every frame up to and including the first one matching `pred`. Panics, naming
    /// `what` and listing what did arrive, when none matches within `limit` or the
    /// connection ends first.
    pub async fn collect_until(
        &mut self,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Frame) -> bool,
    ) -> Vec<Frame> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left).await {
                Some(f) => {
                    let done = pred(&f);
                    let closed = matches!(f, Frame::Closed(_));
                    seen.push(f);
                    if done {
                        return seen;
                    }
                    if closed {
                        panic!("expected {what}, but the connection ended; frames: {seen:#?}");
                    }
                }
                None => panic!("expected {what} within {limit:?}; frames instead: {seen:#?}"),
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

    /// Join `topic` with a whole join payload; returns the reply payload (frames before it
    /// go to [`Client::skipped`]).
    pub async fn join_with(&mut self, jref: &str, topic: &str, payload: Value) -> Value {
        self.send(json!([jref, jref, topic, "phx_join", payload]))
            .await;
        let mut frames = self
            .collect_until(
                Duration::from_secs(15),
                &format!("the reply to joining {topic}"),
                |f| {
                    f.json()
                        .is_some_and(|v| v[1] == jref && v[3] == "phx_reply")
                },
            )
            .await;
        let reply = match frames.pop() {
            Some(Frame::Json(v)) => v[4].clone(),
            other => panic!("join reply expected, got {other:?}"),
        };
        self.skipped.extend(frames);
        reply
    }

    /// A heartbeat and its reply; returns how long the reply took.
    pub async fn heartbeat(&mut self, msg_ref: &str, limit: Duration) -> Duration {
        let started = Instant::now();
        self.send(json!([null, msg_ref, "phoenix", "heartbeat", {}]))
            .await;
        let mut frames = self
            .collect_until(limit, "the heartbeat reply", |f| {
                f.json()
                    .is_some_and(|v| v[1] == msg_ref && v[3] == "phx_reply" && v[2] == "phoenix")
            })
            .await;
        let took = started.elapsed();
        frames.pop();
        self.skipped.extend(frames);
        took
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
