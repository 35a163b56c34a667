//! Throwaway Postgres clusters for tests: [`walcast_pgcluster`] plus what only tests need
//! (one shared cluster per test binary, a fresh database per test, tokio clients).
//!
//! ```text
//!  test binary ──(first use)──▶ walcast_pgcluster::PgCluster::start ──▶ postgres
//!       │                                                         │
//!       └── pid watched by a detached watchdog ───────────────────┘
//!             when the test process is gone: SIGQUIT the postmaster, rm -rf the dir
//! ```
//!
//! Invariants:
//! - Every cluster lives in its own temporary directory on a free port, so test binaries can
//!   run in parallel.
//! - The shared cluster (one per test binary) is a static, never dropped: the watchdog removes
//!   it once the test process exits, whatever the way it exits. Dedicated clusters are also
//!   removed on `Drop`.
//! - `wal_level=logical` always; tests that need other settings start a dedicated cluster.

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};

pub use walcast_pgcluster::{ClusterOptions, StopMode};

/// A running throwaway Postgres cluster: a [`walcast_pgcluster::PgCluster`] (every accessor
/// through `Deref`) with the test-only extras.
#[derive(Debug)]
pub struct PgCluster(walcast_pgcluster::PgCluster);

static SHARED: OnceLock<PgCluster> = OnceLock::new();
static DB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl PgCluster {
    /// The cluster shared by every test of this test binary, started on first use.
    pub fn shared() -> &'static PgCluster {
        // A static is never dropped: the watchdog cleans up after the process exits.
        SHARED.get_or_init(|| {
            PgCluster::start(ClusterOptions::default())
                .expect("could not start the shared test Postgres cluster")
        })
    }

    /// Start a dedicated cluster; it is stopped and removed when dropped.
    pub fn start(opts: ClusterOptions) -> Result<PgCluster> {
        walcast_pgcluster::PgCluster::start(opts).map(PgCluster)
    }

    /// Create a new, empty database with a unique name.
    pub async fn fresh_database(&self) -> Result<TestDb> {
        let n = DB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("walcast_test_{}_{n}", std::process::id());
        let admin = connect(&self.url("postgres")).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating database {name}"))?;
        Ok(TestDb {
            url: self.url(&name),
            name,
            port: self.port(),
        })
    }
}

impl Deref for PgCluster {
    type Target = walcast_pgcluster::PgCluster;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A database created for one test.
#[derive(Debug, Clone)]
pub struct TestDb {
    name: String,
    url: String,
    port: u16,
}

impl TestDb {
    /// Database name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `postgres://postgres@127.0.0.1:PORT/NAME`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// URL for another user of this database.
    pub fn url_as(&self, user: &str, password: Option<&str>) -> String {
        match password {
            Some(p) => format!(
                "postgres://{user}:{p}@127.0.0.1:{}/{}",
                self.port, self.name
            ),
            None => format!("postgres://{user}@127.0.0.1:{}/{}", self.port, self.name),
        }
    }

    /// Port of the cluster.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A fresh SQL connection as `postgres` (its connection task is spawned on the current runtime).
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        connect(&self.url).await
    }
}

/// Connect with tokio-postgres (no TLS) and spawn the connection task.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "test connection ended");
        }
    });
    Ok(client)
}
