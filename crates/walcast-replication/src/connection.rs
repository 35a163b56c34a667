//! The wire connection: socket (+ TLS), startup, authentication, simple query, and framing of
//! backend messages including `'W'` CopyBothResponse.
//!
//! ```text
//! TCP ──SSLRequest──▶ 'S' → rustls handshake │ 'N' → plain (prefer) or error
//!     ──StartupMessage(user, database, replication=database, options=-c …)──▶
//!     ◀──'R' auth loop: 0 ok · 3 cleartext · 5 md5 · 10/11/12 SASL SCRAM-SHA-256[-PLUS]
//!     ◀──ParameterStatus* · BackendKeyData · ReadyForQuery
//!     ──Query──▶ ◀──RowDescription · DataRow* · CommandComplete · ReadyForQuery
//!     ──START_REPLICATION──▶ ◀──'W' CopyBothResponse · CopyData*
//! ```
//!
//! A walsender only speaks the simple-query protocol, so every command goes through
//! [`Connection::simple_query`]. `postgres_protocol`'s `Message::parse` does not know `'W'`,
//! so [`Connection::try_parse`] peeks at the header and consumes that one itself.
//!
//! Invariants: nothing from the network is trusted: message lengths are capped before any
//! allocation, every decode failure is an error, never a panic.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{self, ChannelBinding, ScramSha256};
use postgres_protocol::message::backend::{self, ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::client::TlsStream;

use crate::config::{Host, ReplicationConfig, SslMode};
use crate::error::{DbError, ReplicationError};
use crate::tls;

/// Largest backend message we accept. Postgres caps a single datum at 1 GB; anything beyond
/// that is a corrupt length, and we refuse to allocate for it.
const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Session settings pinned for every replication connection: they fix the text form of
/// values pgoutput sends (dates, intervals, floats, bytea). All are `USERSET`, so they are
/// allowed in the startup `options`.
const SESSION_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c TimeZone=UTC -c bytea_output=hex";

/// The socket, plain or TLS.
pub(crate) enum Socket {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    Unix(UnixStream),
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Socket::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_flush(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Socket::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Socket::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Socket::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A backend message, or the CopyBothResponse `postgres_protocol` cannot parse.
pub(crate) enum Backend {
    Message(Message),
    CopyBothResponse,
}

/// One row of a simple-query result, all columns in text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleRow {
    columns: Arc<[String]>,
    values: Vec<Option<String>>,
}

impl SimpleRow {
    /// The value of column `name`; `None` for SQL NULL or an unknown column.
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = self.columns.iter().position(|c| c == name)?;
        self.values.get(i)?.as_deref()
    }

    /// Column names.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Values by position.
    pub fn values(&self) -> &[Option<String>] {
        &self.values
    }
}

/// An authenticated connection in walsender mode.
pub(crate) struct Connection {
    socket: Socket,
    read_buf: BytesMut,
    write_buf: BytesMut,
    pub(crate) parameters: HashMap<String, String>,
    pub(crate) backend_pid: i32,
    pub(crate) user: String,
    pub(crate) dbname: String,
    /// How we authenticated: `trust`, `password`, `md5`, `SCRAM-SHA-256[-PLUS]`.
    pub(crate) auth_method: &'static str,
    pub(crate) tls: bool,
}

impl Connection {
    /// Connects, negotiates TLS, starts up in logical walsender mode and authenticates.
    pub(crate) async fn connect(cfg: &ReplicationConfig) -> Result<Connection, ReplicationError> {
        match tokio::time::timeout(cfg.connect_timeout, Self::connect_inner(cfg)).await {
            Ok(result) => result,
            Err(_) => Err(ReplicationError::Timeout(
                "connecting and authenticating to Postgres",
            )),
        }
    }

    async fn connect_inner(cfg: &ReplicationConfig) -> Result<Connection, ReplicationError> {
        let (socket, end_point) = open_socket(cfg).await?;
        let mut conn = Connection {
            socket,
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::with_capacity(1024),
            parameters: HashMap::new(),
            backend_pid: 0,
            user: cfg.user.clone(),
            dbname: cfg.dbname.clone(),
            auth_method: "trust",
            tls: end_point.is_some(),
        };
        let params = [
            ("user", cfg.user.as_str()),
            ("database", cfg.dbname.as_str()),
            // `database` = logical walsender (SQL allowed too); `true` would be physical.
            ("replication", "database"),
            ("application_name", cfg.application_name.as_str()),
            // pgoutput text values go through server→client encoding conversion.
            ("client_encoding", "UTF8"),
            ("options", SESSION_OPTIONS),
        ];
        frontend::startup_message(params, &mut conn.write_buf)?;
        conn.flush().await?;
        conn.authenticate(cfg, end_point).await?;
        conn.wait_ready().await?;
        tracing::debug!(
            backend_pid = conn.backend_pid,
            server_version = conn.parameters.get("server_version").map(String::as_str),
            "replication connection ready"
        );
        Ok(conn)
    }

    /// The auth loop, up to AuthenticationOk.
    async fn authenticate(
        &mut self,
        cfg: &ReplicationConfig,
        end_point: Option<Vec<u8>>,
    ) -> Result<(), ReplicationError> {
        let password = || {
            cfg.password()
                .map(str::as_bytes)
                .ok_or_else(|| ReplicationError::PasswordRequired(cfg.user.clone()))
        };
        loop {
            match self.read_message().await? {
                Backend::Message(Message::AuthenticationOk) => return Ok(()),
                Backend::Message(Message::AuthenticationCleartextPassword) => {
                    frontend::password_message(password()?, &mut self.write_buf)?;
                    self.flush().await?;
                    self.auth_method = "password";
                }
                Backend::Message(Message::AuthenticationMd5Password(body)) => {
                    let hash = postgres_protocol::authentication::md5_hash(
                        cfg.user.as_bytes(),
                        password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write_buf)?;
                    self.flush().await?;
                    self.auth_method = "md5";
                }
                Backend::Message(Message::AuthenticationSasl(body)) => {
                    let mut plain = false;
                    let mut plus = false;
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next().map_err(protocol)? {
                        plain |= m == sasl::SCRAM_SHA_256;
                        plus |= m == sasl::SCRAM_SHA_256_PLUS;
                    }
                    // Channel binding proves the TLS session ends at the server that knows
                    // the password, defeating a man in the middle even when the certificate
                    // is not verified. Without TLS the client cannot bind ('n'); with TLS and
                    // a server that did not offer -PLUS we say we could have ('y'), so a
                    // downgrade by a middlebox stripping -PLUS makes the exchange fail.
                    let (mechanism, binding) = match (&end_point, plus, plain) {
                        (Some(hash), true, _) => (
                            sasl::SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(hash.clone()),
                        ),
                        (Some(_), false, true) => {
                            (sasl::SCRAM_SHA_256, ChannelBinding::unrequested())
                        }
                        (None, _, true) => (sasl::SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => {
                            return Err(ReplicationError::UnsupportedAuth(
                                "a SASL mechanism other than SCRAM-SHA-256".into(),
                            ))
                        }
                    };
                    tracing::debug!(mechanism, "scram authentication");
                    let mut scram = ScramSha256::new(password()?, binding);
                    frontend::sasl_initial_response(
                        mechanism,
                        scram.message(),
                        &mut self.write_buf,
                    )?;
                    self.flush().await?;
                    self.scram_continue(&mut scram).await?;
                    self.auth_method = mechanism;
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(self.error_from(body.fields()))
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::AuthenticationKerberosV5) => {
                    return Err(ReplicationError::UnsupportedAuth("Kerberos V5".into()))
                }
                Backend::Message(Message::AuthenticationScmCredential) => {
                    return Err(ReplicationError::UnsupportedAuth("SCM credential".into()))
                }
                Backend::Message(
                    Message::AuthenticationGss | Message::AuthenticationGssContinue(_),
                ) => return Err(ReplicationError::UnsupportedAuth("GSSAPI".into())),
                Backend::Message(Message::AuthenticationSspi) => {
                    return Err(ReplicationError::UnsupportedAuth("SSPI".into()))
                }
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during authentication".into(),
                    ))
                }
            }
        }
    }

    /// SASLContinue → SASLResponse, SASLFinal (server signature checked by `finish`).
    async fn scram_continue(&mut self, scram: &mut ScramSha256) -> Result<(), ReplicationError> {
        match self.read_message().await? {
            Backend::Message(Message::AuthenticationSaslContinue(body)) => {
                scram.update(body.data()).map_err(|e| {
                    ReplicationError::Protocol(format!("scram server-first message: {e}"))
                })?;
            }
            Backend::Message(Message::ErrorResponse(body)) => {
                return Err(self.error_from(body.fields()))
            }
            _ => return Err(protocol_msg("expected SASLContinue")),
        }
        frontend::sasl_response(scram.message(), &mut self.write_buf)?;
        self.flush().await?;
        match self.read_message().await? {
            Backend::Message(Message::AuthenticationSaslFinal(body)) => {
                // A wrong server signature means the server does not know the password: it
                // is not the server we meant to talk to.
                scram.finish(body.data()).map_err(|e| {
                    ReplicationError::Protocol(format!(
                        "scram: the server could not prove it knows the password ({e})"
                    ))
                })?;
                Ok(())
            }
            Backend::Message(Message::ErrorResponse(body)) => Err(self.error_from(body.fields())),
            _ => Err(protocol_msg("expected SASLFinal")),
        }
    }

    /// ParameterStatus / BackendKeyData until ReadyForQuery.
    async fn wait_ready(&mut self) -> Result<(), ReplicationError> {
        loop {
            match self.read_message().await? {
                Backend::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(protocol)?.to_owned();
                    let value = body.value().map_err(protocol)?.to_owned();
                    self.parameters.insert(name, value);
                }
                Backend::Message(Message::BackendKeyData(body)) => {
                    self.backend_pid = body.process_id();
                }
                Backend::Message(Message::ReadyForQuery(_)) => return Ok(()),
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ErrorResponse(body)) => {
                    return Err(self.error_from(body.fields()))
                }
                _ => return Err(protocol_msg("unexpected message before ReadyForQuery")),
            }
        }
    }

    /// Runs one simple-query command and collects its rows (text columns). A server error
    /// is returned after the server is ready again, so the connection stays usable.
    pub(crate) async fn simple_query(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<SimpleRow>, DbError>, ReplicationError> {
        tracing::debug!(sql, "replication command");
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut columns: Arc<[String]> = Arc::from(Vec::new());
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Backend::Message(Message::RowDescription(body)) => {
                    let names: Vec<String> = body
                        .fields()
                        .map(|f| Ok(f.name().to_owned()))
                        .collect()
                        .map_err(protocol)?;
                    columns = Arc::from(names);
                }
                Backend::Message(Message::DataRow(body)) => {
                    let buf = body.buffer();
                    let values: Vec<Option<String>> = body
                        .ranges()
                        .map(|r| {
                            Ok(r.and_then(|r| {
                                buf.get(r).map(|b| String::from_utf8_lossy(b).into_owned())
                            }))
                        })
                        .collect()
                        .map_err(protocol)?;
                    rows.push(SimpleRow {
                        columns: columns.clone(),
                        values,
                    });
                }
                Backend::Message(Message::CommandComplete(_) | Message::EmptyQueryResponse) => {}
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(parse_db_error(body.fields())?);
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(body)) => {
                    let name = body.name().map_err(protocol)?.to_owned();
                    let value = body.value().map_err(protocol)?.to_owned();
                    self.parameters.insert(name, value);
                }
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return Ok(match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    })
                }
                _ => return Err(protocol_msg("unexpected message in a simple query")),
            }
        }
    }

    /// Sends START_REPLICATION (or any command answered by CopyBoth) and waits for `'W'`.
    pub(crate) async fn start_copy_both(
        &mut self,
        sql: &str,
    ) -> Result<Result<(), DbError>, ReplicationError> {
        tracing::debug!(sql, "replication command");
        frontend::query(sql, &mut self.write_buf)?;
        self.flush().await?;
        let mut error = None;
        loop {
            match self.read_message().await? {
                Backend::CopyBothResponse if error.is_none() => return Ok(Ok(())),
                Backend::Message(Message::ErrorResponse(body)) => {
                    error = Some(parse_db_error(body.fields())?)
                }
                Backend::Message(Message::NoticeResponse(body)) => log_notice(body.fields()),
                Backend::Message(Message::ParameterStatus(_)) => {}
                Backend::Message(Message::ReadyForQuery(_)) => {
                    return match error {
                        Some(e) => Ok(Err(e)),
                        None => Err(protocol_msg("command finished without CopyBothResponse")),
                    }
                }
                _ => return Err(protocol_msg("unexpected message before CopyBothResponse")),
            }
        }
    }

    /// Maps an ErrorResponse body to the most specific error.
    fn error_from(&self, fields: ErrorFields<'_>) -> ReplicationError {
        match parse_db_error(fields) {
            Ok(db) => ReplicationError::from_db(db, &self.user, &self.dbname),
            Err(e) => e,
        }
    }

    /// Parses one complete message from the buffer, if there is one.
    pub(crate) fn try_parse(&mut self) -> Result<Option<Backend>, ReplicationError> {
        let header = match backend::Header::parse(&self.read_buf).map_err(protocol)? {
            Some(h) => h,
            None => return Ok(None),
        };
        // `Header::parse` guarantees len >= 4, so this cannot wrap.
        let total = header.len() as usize + 1;
        if total > MAX_MESSAGE_LEN {
            return Err(ReplicationError::Protocol(format!(
                "backend message of {total} bytes exceeds the {MAX_MESSAGE_LEN} byte limit"
            )));
        }
        if self.read_buf.len() < total {
            self.read_buf.reserve(total - self.read_buf.len());
            return Ok(None);
        }
        if header.tag() == b'W' {
            // Body: overall format + per-column formats; for a logical stream it is always
            // "binary, 0 columns" and carries nothing we need.
            self.read_buf.advance(total);
            return Ok(Some(Backend::CopyBothResponse));
        }
        match Message::parse(&mut self.read_buf).map_err(protocol)? {
            Some(m) => Ok(Some(Backend::Message(m))),
            None => Err(protocol_msg("complete message did not parse")),
        }
    }

    /// Reads more bytes from the socket. Cancel-safe: if the future is dropped before it
    /// completes, no bytes are lost.
    pub(crate) async fn fill(&mut self) -> Result<(), ReplicationError> {
        if self.read_buf.capacity() - self.read_buf.len() < 4096 {
            self.read_buf.reserve(16 * 1024);
        }
        let n = self.socket.read_buf(&mut self.read_buf).await?;
        if n == 0 {
            return Err(ReplicationError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )));
        }
        Ok(())
    }

    pub(crate) async fn read_message(&mut self) -> Result<Backend, ReplicationError> {
        loop {
            if let Some(m) = self.try_parse()? {
                return Ok(m);
            }
            self.fill().await?;
        }
    }

    /// Buffer for frontend messages; sent by [`Connection::flush`].
    pub(crate) fn write_buf(&mut self) -> &mut BytesMut {
        &mut self.write_buf
    }

    pub(crate) async fn flush(&mut self) -> Result<(), ReplicationError> {
        if !self.write_buf.is_empty() {
            self.socket.write_all(&self.write_buf).await?;
            self.write_buf.clear();
        }
        self.socket.flush().await?;
        Ok(())
    }

    /// Sends Terminate and closes the socket, ignoring errors: the server may be gone.
    pub(crate) async fn terminate(mut self) {
        frontend::terminate(&mut self.write_buf);
        let _ = self.flush().await;
        let _ = self.socket.shutdown().await;
    }
}

/// Opens TCP (+TLS) or the unix socket. Returns the channel-binding hash when TLS is on.
async fn open_socket(
    cfg: &ReplicationConfig,
) -> Result<(Socket, Option<Vec<u8>>), ReplicationError> {
    let host = match &cfg.host {
        Host::Unix(dir) => {
            // libpq never uses TLS over unix sockets either; the kernel is the transport.
            if matches!(
                cfg.sslmode,
                SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
            ) {
                return Err(ReplicationError::TlsUnavailable(cfg.sslmode));
            }
            let path = dir.join(format!(".s.PGSQL.{}", cfg.port));
            let s =
                UnixStream::connect(&path)
                    .await
                    .map_err(|source| ReplicationError::Connect {
                        addr: path.display().to_string(),
                        source,
                    })?;
            return Ok((Socket::Unix(s), None));
        }
        Host::Tcp(h) => h.as_str(),
    };
    let tcp = match cfg.hostaddr {
        Some(ip) => connect_tcp(&ip.to_string(), cfg.port).await?,
        None => connect_tcp(host, cfg.port).await?,
    };
    if cfg.sslmode == SslMode::Disable {
        return Ok((Socket::Tcp(tcp), None));
    }
    let mut tcp = tcp;
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    // Exactly one byte: anything the server sent after it before the handshake would be
    // unauthenticated data (CVE-2021-23222), so it must stay unread by the plain socket.
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {}
        b'N' if cfg.sslmode == SslMode::Prefer => {
            tracing::debug!("server does not accept tls, continuing without (sslmode=prefer)");
            return Ok((Socket::Tcp(tcp), None));
        }
        b'N' => return Err(ReplicationError::TlsUnavailable(cfg.sslmode)),
        // An old server answers SSLRequest with an ErrorResponse.
        b'E' => return Err(ReplicationError::TlsUnavailable(cfg.sslmode)),
        other => {
            return Err(ReplicationError::Protocol(format!(
                "unexpected answer {other:#04x} to SSLRequest"
            )))
        }
    }
    let config = tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())?;
    let name = tls::server_name(host)?;
    let tls_stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| ReplicationError::Tls(format!("handshake with {host}: {e}")))?;
    let end_point = tls_stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|cert| tls::tls_server_end_point(cert.as_ref()));
    Ok((Socket::Tls(Box::new(tls_stream)), end_point))
}

/// Tries each resolved address in turn.
async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, ReplicationError> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|source| ReplicationError::Connect {
            addr: format!("{host}:{port}"),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                // Status updates are tiny and latency matters for reply requests.
                s.set_nodelay(true)?;
                // Finds a vanished peer even when neither side has anything to say; the
                // application-level server timeout covers the rest.
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(Duration::from_secs(30))
                    .with_interval(Duration::from_secs(10));
                socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive)?;
                return Ok(s);
            }
            Err(e) => {
                tracing::debug!(%addr, error = %e, "connect attempt failed");
                last = Some(e);
            }
        }
    }
    Err(ReplicationError::Connect {
        addr: format!("{host}:{port}"),
        source: last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "host name resolved to no address")
        }),
    })
}

pub(crate) fn parse_db_error(mut fields: ErrorFields<'_>) -> Result<DbError, ReplicationError> {
    let mut db = DbError {
        severity: String::new(),
        code: String::new(),
        message: String::new(),
        detail: None,
        hint: None,
    };
    while let Some(field) = fields.next().map_err(protocol)? {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            // 'V' is the untranslated severity (PG 9.6+); prefer it over 'S'.
            b'V' => db.severity = value,
            b'S' if db.severity.is_empty() => db.severity = value,
            b'C' => db.code = value,
            b'M' => db.message = value,
            b'D' => db.detail = Some(value),
            b'H' => db.hint = Some(value),
            _ => {}
        }
    }
    Ok(db)
}

pub(crate) fn log_notice(fields: ErrorFields<'_>) {
    match parse_db_error(fields) {
        Ok(n) => tracing::info!(
            severity = %n.severity,
            code = %n.code,
            message = %n.message,
            "notice from the replication connection"
        ),
        Err(e) => tracing::warn!(error = %e, "malformed notice from the server"),
    }
}

fn protocol(e: io::Error) -> ReplicationError {
    ReplicationError::Protocol(e.to_string())
}

fn protocol_msg(msg: &str) -> ReplicationError {
    ReplicationError::Protocol(msg.to_owned())
}
