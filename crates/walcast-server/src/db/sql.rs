//! Ordinary SQL connections to the source database (catalog look-ups, type resolution,
//! authorization checks), with the same address, credentials and TLS policy as the
//! replication connection.

use anyhow::{Context, Result};
use tokio_postgres::config::SslMode as PgSslMode;
use walcast_replication::{Host, ReplicationConfig, SslMode};

/// Open a SQL connection; its driver task is spawned on the current runtime.
pub async fn connect(
    cfg: &ReplicationConfig,
    application_name: &str,
) -> Result<tokio_postgres::Client> {
    let mut pg = tokio_postgres::Config::new();
    match &cfg.host {
        Host::Tcp(h) => pg.host(h),
        Host::Unix(p) => pg.host_path(p),
    };
    pg.port(cfg.port)
        .user(&cfg.user)
        .dbname(&cfg.dbname)
        .application_name(application_name)
        .options(
            "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=postgres -c extra_float_digits=3",
        )
        .connect_timeout(cfg.connect_timeout);
    if let Some(pw) = cfg.password() {
        pg.password(pw);
    }
    if cfg.sslmode == SslMode::Disable {
        let (client, conn) = pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| explain(cfg, e))?;
        spawn_driver(conn);
        return Ok(client);
    }
    pg.ssl_mode(if cfg.sslmode == SslMode::Prefer {
        PgSslMode::Prefer
    } else {
        PgSslMode::Require
    });
    let tls = walcast_replication::tls_client_config(cfg.sslmode, cfg.sslrootcert.as_deref())
        .context("building the TLS configuration")?;
    let connector = tokio_postgres_rustls::MakeRustlsConnect::new(tls);
    let (client, conn) = pg.connect(connector).await.map_err(|e| explain(cfg, e))?;
    spawn_driver(conn);
    Ok(client)
}

fn spawn_driver<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // On the serving runtime even when a socket on the intake runtime opened it: the
    // connection is pooled and serves everyone afterwards.
    crate::realtime::intake::spawn_serving(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = ?e.to_string(), "sql connection ended");
        }
    });
}

/// Turn a connection failure into one line that says what to do.
fn explain(cfg: &ReplicationConfig, e: tokio_postgres::Error) -> anyhow::Error {
    use tokio_postgres::error::SqlState;
    let at = format!("{}:{}", cfg.host, cfg.port);
    if let Some(db) = e.as_db_error() {
        let code = db.code();
        if *code == SqlState::INVALID_PASSWORD {
            return anyhow::anyhow!(
                "password authentication failed for user \"{}\" at {at}: check the user and password in --database-url (DATABASE_URL)",
                cfg.user
            );
        }
        if *code == SqlState::INVALID_CATALOG_NAME {
            return anyhow::anyhow!(
                "database \"{}\" does not exist at {at}: check the database name in --database-url",
                cfg.dbname
            );
        }
        if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION {
            return anyhow::anyhow!(
                "{at} refused user \"{}\": {} (allow it in pg_hba.conf)",
                cfg.user,
                db.message()
            );
        }
        return anyhow::anyhow!("connecting to {at} as {}: {}", cfg.user, db.message());
    }
    anyhow::anyhow!("cannot connect to {at}: {e}; is Postgres running and reachable from here?")
}

/// A few shared SQL connections for catalog look-ups and authorization checks. Each
/// `tokio_postgres::Client` pipelines concurrent queries, so a handful is plenty; a closed
/// connection is replaced on next use.
pub struct SqlPool {
    cfg: ReplicationConfig,
    slots: Vec<tokio::sync::Mutex<Option<std::sync::Arc<tokio_postgres::Client>>>>,
    next: std::sync::atomic::AtomicUsize,
}

impl SqlPool {
    pub fn new(cfg: ReplicationConfig, size: usize) -> SqlPool {
        SqlPool {
            cfg,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// A live connection (opened or reopened on demand).
    pub async fn get(&self) -> Result<std::sync::Arc<tokio_postgres::Client>> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().await;
        if let Some(c) = slot.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let client = std::sync::Arc::new(connect(&self.cfg, "walcast").await?);
        *slot = Some(client.clone());
        Ok(client)
    }
}

impl SqlPool {
    /// The connection settings (for opening other pools to the same database).
    pub fn config(&self) -> &ReplicationConfig {
        &self.cfg
    }
}

/// Connections lent to one task at a time, for work that needs a session of its own:
/// authorization checks run `BEGIN; SET LOCAL ROLE …; …; ROLLBACK`, which must not interleave
/// with anyone else's statements on the connection. A broken connection is replaced on the
/// next lease.
pub struct ExclusivePool {
    cfg: ReplicationConfig,
    application_name: &'static str,
    slots: Vec<tokio::sync::Mutex<Option<PooledConnection>>>,
    next: std::sync::atomic::AtomicUsize,
}

/// Most prepared statements kept per pooled connection; past it the cache starts over.
/// (Statements are keyed by their text; the authorization checks produce one per table
/// policy set, so a handful is the normal size.)
const STATEMENT_CACHE_MAX: usize = 128;

struct PooledConnection {
    client: tokio_postgres::Client,
    /// Statements prepared on this connection, by SQL text: executing one is a Bind and an
    /// Execute, without parsing and planning the text again.
    statements: std::collections::HashMap<String, tokio_postgres::Statement>,
}

/// A connection on loan from an [`ExclusivePool`].
///
/// Returned to the pool by [`Lease::done`] once the borrower left the session clean (its
/// transaction ended). A lease dropped any other way, e.g. because the future using it was
/// cancelled between `BEGIN` and `ROLLBACK`, discards the connection: a session that may
/// still carry another identity's role and claims is never lent again.
pub struct Lease<'a> {
    guard: tokio::sync::MutexGuard<'a, Option<PooledConnection>>,
    clean: bool,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if !self.clean {
            *self.guard = None;
        }
    }
}

impl Lease<'_> {
    const FILLED: &'static str =
        "a lease always holds a connection: acquire() fills the slot before lending it";

    pub fn client(&self) -> &tokio_postgres::Client {
        &self.guard.as_ref().expect(Self::FILLED).client
    }

    /// `sql` prepared on this connection (once; later calls reuse the statement).
    ///
    /// Preparing is parse analysis only: privileges and row-level security are checked when
    /// the statement executes, under the role current then, and Postgres re-plans a cached
    /// plan whose row-level security depended on another role.
    pub async fn prepare_cached(
        &mut self,
        sql: &str,
        types: &[tokio_postgres::types::Type],
    ) -> Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let conn = self.guard.as_mut().expect(Self::FILLED);
        if let Some(statement) = conn.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = conn.client.prepare_typed(sql, types).await?;
        if conn.statements.len() >= STATEMENT_CACHE_MAX {
            conn.statements.clear();
        }
        conn.statements.insert(sql.to_string(), statement.clone());
        Ok(statement)
    }

    /// Drop the connection (after an error that may have left the session dirty).
    pub fn discard(self) {
        // Not marked clean: dropping discards it.
    }

    /// Give the connection back: the borrower's transaction is over.
    pub fn done(mut self) {
        self.clean = true;
    }
}

impl ExclusivePool {
    pub fn new(cfg: ReplicationConfig, application_name: &'static str, size: usize) -> Self {
        ExclusivePool {
            cfg,
            application_name,
            slots: (0..size.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// A free connection (waiting for one when all are lent), opened on demand.
    pub async fn acquire(&self) -> Result<Lease<'_>> {
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = self.slots.len();
        let mut guard = None;
        for k in 0..n {
            if let Ok(g) = self.slots[(start + k) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => {
                let waited = std::time::Instant::now();
                let g = self.slots[start % n].lock().await;
                if waited.elapsed() > std::time::Duration::from_millis(500) {
                    tracing::debug!(waited = ?waited.elapsed(), pool = self.application_name, "waited long for a pooled connection");
                }
                g
            }
        };
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(PooledConnection {
                client: connect(&self.cfg, self.application_name).await?,
                statements: std::collections::HashMap::new(),
            });
        }
        Ok(Lease {
            guard,
            clean: false,
        })
    }
}

/// The server's WAL insert position now: every transaction that committed before this call
/// has its commit record below it, every later one at or above it.
pub async fn wal_insert_lsn(client: &tokio_postgres::Client) -> Result<walcast_replication::Lsn> {
    let row = client
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?;
    let text: String = row.try_get(0)?;
    Ok(text.parse()?)
}
