//! Connection settings for the replication connection, parsed from a libpq-style URL.
//!
//! Accepted form: `postgres[ql]://user:password@host:port/dbname?param=value&…` with
//! percent-encoding anywhere. Query parameters understood: `sslmode`, `sslrootcert`,
//! `application_name`, `connect_timeout` (seconds), and `host`/`port`/`user`/`password`/
//! `dbname`, which override the URL parts, and `hostaddr` (connect to this IP, check the
//! certificate against `host`), (libpq does the same). A `host` that starts with
//! `/` is a unix socket directory (`/path/.s.PGSQL.<port>`).
//!
//! The password is only reachable through [`ReplicationConfig::password`]; `Debug` and
//! `Display` never print it, so configs can be logged freely.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// What to do about TLS, with libpq's names and meanings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Never use TLS.
    Disable,
    /// Use TLS if the server offers it, without verifying the certificate.
    #[default]
    Prefer,
    /// Require TLS, without verifying the certificate (unless `sslrootcert` is set, in which
    /// case it behaves like `verify-ca`, as libpq does).
    Require,
    /// Require TLS and a certificate chain that ends at a trusted root, any host name.
    VerifyCa,
    /// Require TLS, a trusted chain and a certificate valid for the host name.
    VerifyFull,
}

impl SslMode {
    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(SslMode::Disable),
            // `allow` tries plain text first; we have no reason to prefer that, and treating
            // it as `prefer` never gives less security than asked for.
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(ConfigError::Invalid(format!(
                "sslmode '{other}' is not one of disable, prefer, require, verify-ca, verify-full"
            ))),
        }
    }
}

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A directory holding the `.s.PGSQL.<port>` socket.
    Unix(PathBuf),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Tcp(h) => f.write_str(h),
            Host::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A configuration mistake; never worth retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The URL or one of its parameters is malformed.
    #[error("invalid database url: {0}")]
    Invalid(String),
}

/// Everything needed to open, check and stream from a replication connection.
#[derive(Clone)]
pub struct ReplicationConfig {
    /// Server host.
    pub host: Host,
    /// Numeric address to connect to instead of resolving `host` (libpq's `hostaddr`);
    /// `host` is still the name the certificate is checked against.
    pub hostaddr: Option<std::net::IpAddr>,
    /// Server port.
    pub port: u16,
    /// Role to log in as; it needs the `REPLICATION` attribute.
    pub user: String,
    password: Option<String>,
    /// Database to stream from (logical slots belong to one database).
    pub dbname: String,
    /// TLS policy.
    pub sslmode: SslMode,
    /// PEM file with the root certificates to trust instead of the webpki roots.
    pub sslrootcert: Option<PathBuf>,
    /// Shown in `pg_stat_replication.application_name`.
    pub application_name: String,
    /// Publication streamed by `START_REPLICATION`.
    pub publication: String,
    /// Logical replication slot name.
    pub slot: String,
    /// Create the slot `TEMPORARY` (dropped when the connection ends: nothing is retained
    /// while walcast is down, so changes made meanwhile are never delivered).
    pub temporary_slot: bool,
    /// Create the slot again when it was dropped or invalidated while walcast ran (changes
    /// made meanwhile are lost; the consumer is told with `StreamEvent::SlotRecreated`).
    pub recreate_slot: bool,
    /// Whether `ensure_publication` may run `CREATE PUBLICATION … FOR ALL TABLES`.
    pub create_publication: bool,
    /// Longest gap between two standby status updates. Lowered automatically to a third of
    /// the server's `wal_sender_timeout` when that is shorter.
    pub status_interval: Duration,
    /// No bytes from the server for this long (while we are reading) means the connection
    /// is dead. Raised automatically to `wal_sender_timeout` + 10 s when that is longer.
    pub server_timeout: Duration,
    /// Limit for TCP connect + TLS + authentication.
    pub connect_timeout: Duration,
    /// Events buffered between the reader task and the consumer. When full, the reader stops
    /// reading the socket (TCP pushes back on the walsender) but keeps sending feedback.
    pub channel_capacity: usize,
    /// A position confirmations must not pass even once handed on (see
    /// [`ConfirmCeiling`]); shared by every stream made with this configuration.
    pub confirm_ceiling: ConfirmCeiling,
}

/// Holds the slot's confirmed position back: the slot keeps the WAL after the ceiling, so a
/// consumer that restarts can read again what it had received but may need again (walcast
/// keeps what resumable client sessions may still ask for). `None` (the default) confirms
/// whatever is handed on.
///
/// Postgres's walsender, when told to shut down, waits until the client's confirmed
/// position reaches what it sent. While the ceiling holds confirmations back, the stream
/// answers the server's reply requests with an invalid (zero) flush position, which the
/// walsender then compares its write position against instead, and which leaves the slot
/// where it was: a held-back slot never keeps Postgres from shutting down.
#[derive(Clone, Default)]
pub struct ConfirmCeiling(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ConfirmCeiling {
    const NONE: u64 = 0;

    /// Confirm nothing past `lsn` (`None`: no ceiling).
    pub fn set(&self, lsn: Option<walcast_pgoutput::Lsn>) {
        // LSN 0 is never a useful ceiling (it would hold everything): it stands for none.
        let v = lsn.map_or(Self::NONE, |l| l.0.max(1));
        self.0.store(v, std::sync::atomic::Ordering::Release);
    }

    pub fn get(&self) -> Option<walcast_pgoutput::Lsn> {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            Self::NONE => None,
            v => Some(walcast_pgoutput::Lsn(v)),
        }
    }
}

impl fmt::Debug for ConfirmCeiling {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.get() {
            Some(l) => write!(f, "Some({l})"),
            None => f.write_str("None"),
        }
    }
}

const DEFAULT_PORT: u16 = 5432;

impl ReplicationConfig {
    /// Parses a `postgres://` URL; replication settings get their defaults (publication and
    /// slot `walcast`, persistent slot, publication creation allowed).
    pub fn from_url(input: &str) -> Result<Self, ConfigError> {
        let url = url::Url::parse(input)
            .map_err(|e| ConfigError::Invalid(format!("cannot parse url: {e}")))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err(ConfigError::Invalid(format!(
                "scheme must be postgres:// or postgresql://, not {}://",
                url.scheme()
            )));
        }
        let mut user = non_empty(percent_decode(url.username())?);
        let mut password = match url.password() {
            Some(p) => Some(percent_decode(p)?),
            None => None,
        };
        let mut host = match url.host() {
            None => None,
            Some(url::Host::Domain(d)) => non_empty(percent_decode(d)?),
            Some(url::Host::Ipv4(ip)) => Some(ip.to_string()),
            Some(url::Host::Ipv6(ip)) => Some(ip.to_string()),
        };
        let mut port = url.port();
        let mut dbname = non_empty(percent_decode(url.path().trim_start_matches('/'))?);
        let mut sslmode = SslMode::default();
        let mut sslrootcert = None;
        let mut application_name = None;
        let mut connect_timeout = Duration::from_secs(30);
        let mut hostaddr = None;

        // `query_pairs` percent-decodes keys and values.
        for (key, value) in url.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "sslmode" => sslmode = value.parse()?,
                "sslrootcert" => sslrootcert = non_empty(value).map(PathBuf::from),
                "application_name" => application_name = non_empty(value),
                "host" => host = non_empty(value),
                "hostaddr" => {
                    hostaddr = Some(value.parse().map_err(|_| {
                        ConfigError::Invalid(format!("hostaddr '{value}' is not an IP address"))
                    })?)
                }
                "port" => {
                    port = Some(value.parse().map_err(|_| {
                        ConfigError::Invalid(format!("port '{value}' is not a number"))
                    })?)
                }
                "user" => user = non_empty(value),
                "password" => password = Some(value),
                "dbname" => dbname = non_empty(value),
                "connect_timeout" => {
                    let secs: u64 = value.parse().map_err(|_| {
                        ConfigError::Invalid(format!("connect_timeout '{value}' is not seconds"))
                    })?;
                    // libpq treats 0 as "wait forever"; a day is forever enough and keeps
                    // the arithmetic simple.
                    connect_timeout = Duration::from_secs(if secs == 0 { 86_400 } else { secs });
                }
                other => {
                    // Silently ignoring a typo like `sslmod=verify-full` would lower security
                    // without anyone noticing, so unknown parameters are an error.
                    return Err(ConfigError::Invalid(format!(
                        "unsupported parameter '{other}' (supported: sslmode, sslrootcert, \
                         application_name, connect_timeout, host, hostaddr, port, user, password, dbname)"
                    )));
                }
            }
        }

        let user = user.ok_or_else(|| {
            ConfigError::Invalid("no user name: use postgres://user@host/db".into())
        })?;
        let host = match host {
            Some(h) if h.starts_with('/') => Host::Unix(PathBuf::from(h)),
            Some(h) => Host::Tcp(h),
            None => Host::Tcp("localhost".into()),
        };
        let dbname = dbname.unwrap_or_else(|| user.clone());
        Ok(ReplicationConfig {
            host,
            hostaddr,
            port: port.unwrap_or(DEFAULT_PORT),
            user,
            password,
            dbname,
            sslmode,
            sslrootcert,
            application_name: application_name.unwrap_or_else(|| "walcast".into()),
            publication: "walcast".into(),
            slot: "walcast".into(),
            temporary_slot: false,
            recreate_slot: false,
            create_publication: true,
            status_interval: Duration::from_secs(10),
            server_timeout: Duration::from_secs(70),
            connect_timeout,
            channel_capacity: 1024,
            confirm_ceiling: ConfirmCeiling::default(),
        })
    }

    /// The password, if any. Kept behind a method so that it cannot leak through `Debug`.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// Replaces the password (e.g. one read from a secrets file).
    pub fn set_password(&mut self, password: Option<String>) {
        self.password = password;
    }

    /// Sets the publication name.
    pub fn with_publication(mut self, name: impl Into<String>) -> Self {
        self.publication = name.into();
        self
    }

    /// Sets the slot name.
    pub fn with_slot(mut self, name: impl Into<String>) -> Self {
        self.slot = name.into();
        self
    }

    /// Chooses a temporary slot.
    pub fn with_temporary_slot(mut self, temporary: bool) -> Self {
        self.temporary_slot = temporary;
        self
    }

    /// Allows or forbids `CREATE PUBLICATION`.
    pub fn with_create_publication(mut self, allowed: bool) -> Self {
        self.create_publication = allowed;
        self
    }

    /// Sets the status interval.
    pub fn with_status_interval(mut self, interval: Duration) -> Self {
        self.status_interval = interval;
        self
    }

    /// Sets the dead-connection timeout.
    pub fn with_server_timeout(mut self, timeout: Duration) -> Self {
        self.server_timeout = timeout;
        self
    }

    /// Sets the channel capacity (at least 1).
    pub fn with_channel_capacity(mut self, capacity: usize) -> Self {
        self.channel_capacity = capacity.max(1);
        self
    }
}

impl FromStr for ReplicationConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ReplicationConfig::from_url(s)
    }
}

impl fmt::Debug for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplicationConfig")
            .field("host", &self.host)
            .field("hostaddr", &self.hostaddr)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("sslmode", &self.sslmode)
            .field("sslrootcert", &self.sslrootcert)
            .field("application_name", &self.application_name)
            .field("publication", &self.publication)
            .field("slot", &self.slot)
            .field("temporary_slot", &self.temporary_slot)
            .field("recreate_slot", &self.recreate_slot)
            .field("create_publication", &self.create_publication)
            .field("status_interval", &self.status_interval)
            .field("server_timeout", &self.server_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("channel_capacity", &self.channel_capacity)
            .field("confirm_ceiling", &self.confirm_ceiling)
            .finish()
    }
}

/// `postgres://user@host:port/db?sslmode=…`, never with the password.
impl fmt::Display for ReplicationConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::Tcp(h) if h.contains(':') => write!(
                f,
                "postgres://{}@[{}]:{}/{}",
                self.user, h, self.port, self.dbname
            )?,
            Host::Tcp(h) => write!(
                f,
                "postgres://{}@{}:{}/{}",
                self.user, h, self.port, self.dbname
            )?,
            Host::Unix(p) => write!(
                f,
                "postgres://{}@/{}?host={}&port={}",
                self.user,
                self.dbname,
                p.display(),
                self.port
            )?,
        }
        let sep = if matches!(self.host, Host::Unix(_)) {
            '&'
        } else {
            '?'
        };
        write!(f, "{sep}sslmode={}", self.sslmode)
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

/// Decodes `%XX` escapes (the URL crate leaves user info and path encoded).
fn percent_decode(input: &str) -> Result<String, ConfigError> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConfigError::Invalid("bad percent-encoding".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ConfigError::Invalid("percent-encoding is not valid UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let cfg = ReplicationConfig::from_url(
            "postgres://al%40ice:p%3Ass%2Fw@db.example.com:6543/my%20db?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=rt",
        )
        .unwrap();
        assert_eq!(cfg.user, "al@ice");
        assert_eq!(cfg.password(), Some("p:ss/w"));
        assert_eq!(cfg.host, Host::Tcp("db.example.com".into()));
        assert_eq!(cfg.port, 6543);
        assert_eq!(cfg.dbname, "my db");
        assert_eq!(cfg.sslmode, SslMode::VerifyFull);
        assert_eq!(cfg.sslrootcert, Some(PathBuf::from("/etc/ca.pem")));
        assert_eq!(cfg.application_name, "rt");
        assert_eq!(cfg.status_interval, Duration::from_secs(10));
    }

    #[test]
    fn defaults() {
        let cfg = ReplicationConfig::from_url("postgresql://bob@localhost").unwrap();
        assert_eq!(cfg.port, 5432);
        assert_eq!(cfg.dbname, "bob");
        assert_eq!(cfg.sslmode, SslMode::Prefer);
        assert_eq!(cfg.application_name, "walcast");
        assert_eq!(cfg.password(), None);
        assert_eq!(cfg.publication, "walcast");
        assert_eq!(cfg.slot, "walcast");
    }

    #[test]
    fn ipv6_and_unix_socket() {
        let cfg = ReplicationConfig::from_url("postgres://u@[::1]:5433/d").unwrap();
        assert_eq!(cfg.host, Host::Tcp("::1".into()));
        assert_eq!(cfg.to_string(), "postgres://u@[::1]:5433/d?sslmode=prefer");
        let cfg =
            ReplicationConfig::from_url("postgres:///d?host=/var/run/postgresql&user=u").unwrap();
        assert_eq!(cfg.host, Host::Unix(PathBuf::from("/var/run/postgresql")));
        assert_eq!(cfg.user, "u");
        let cfg = ReplicationConfig::from_url("postgres://u@%2Ftmp%2Fpg/d").unwrap();
        assert_eq!(cfg.host, Host::Unix(PathBuf::from("/tmp/pg")));
    }

    #[test]
    fn secrets_stay_out_of_debug_and_display() {
        let cfg = ReplicationConfig::from_url("postgres://u:hunter2@h/d").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(!cfg.to_string().contains("hunter2"));
        assert!(format!("{cfg:?}").contains("<redacted>"));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(ReplicationConfig::from_url("mysql://u@h/d").is_err());
        assert!(ReplicationConfig::from_url("postgres://u@h/d?sslmode=maybe").is_err());
        assert!(ReplicationConfig::from_url("postgres://u@h/d?sslmod=require").is_err());
        assert!(ReplicationConfig::from_url("postgres://h/d").is_err());
        assert!(ReplicationConfig::from_url("postgres://u@h/d%zz").is_err());
    }
}
