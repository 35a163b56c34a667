//! The node's link to Redis: one multiplexed command connection, kept up by a task that
//! (re)connects with backoff and pings once a second for health and round trip.
//!
//! ```text
//!  link task ──connect (backoff 200 ms … 5 s)──▶ ConnectionManager ──PING every 1 s──▶ Redis
//!      │                                             ▲ clone (cheap, same connection)
//!      └─▶ up: watch<bool>, rtt, last error          └── registry, bus, part 2 (lease, changes)
//! ```
//!
//! Reuse: [`Link::conn`] hands out a clone of the `redis::aio::ConnectionManager` (or `None`
//! while Redis is down), and [`Link::watch_up`] wakes a task when Redis comes back. Other
//! modules of `crate::cluster` issue their commands through it instead of opening their own.
//!
//! Invariants:
//! - Never blocks a caller on Redis: [`Link::conn`] is a snapshot, `None` when down.
//! - `up` is true only after a PING answered within the response timeout; a failed PING
//!   makes it false at once, and after three in a row the connection is rebuilt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::watch;

/// How long a command may take before Redis counts as unreachable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const PING_EVERY: Duration = Duration::from_secs(1);

/// A cloneable handle on the node's Redis link.
#[derive(Clone)]
pub struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: Mutex<Option<ConnectionManager>>,
    up: watch::Sender<bool>,
    rtt_us: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl Link {
    /// Start the link task for `client`.
    pub fn start(client: redis::Client) -> Link {
        let (up, _) = watch::channel(false);
        let link = Link {
            inner: Arc::new(Inner {
                client,
                conn: Mutex::new(None),
                up,
                rtt_us: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        };
        tokio::spawn(link.clone().run());
        link
    }

    /// The command connection, `None` while Redis is down. Clones share one connection.
    pub fn conn(&self) -> Option<ConnectionManager> {
        if !self.is_up() {
            return None;
        }
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The Redis client (for connections of their own, such as pub/sub).
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// Whether the last PING was answered.
    pub fn is_up(&self) -> bool {
        *self.inner.up.borrow()
    }

    /// Changes of [`Link::is_up`].
    pub fn watch_up(&self) -> watch::Receiver<bool> {
        self.inner.up.subscribe()
    }

    /// Round trip of the last answered PING.
    pub fn rtt(&self) -> Duration {
        Duration::from_micros(self.inner.rtt_us.load(Ordering::Relaxed))
    }

    /// Why Redis is down (the last error), for `/readyz`.
    pub fn last_error(&self) -> Option<String> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_up(&self, up: bool, error: Option<String>) {
        if up {
            *self
                .inner
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = None;
        } else if let Some(e) = error {
            *self
                .inner
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(e);
        }
        let was = *self.inner.up.borrow();
        if was != up {
            if up {
                tracing::info!("cluster: Redis is reachable");
            } else {
                tracing::warn!(error = ?self.last_error(), "cluster: Redis is unreachable; serving local sockets only");
            }
            self.inner.up.send_replace(up);
        }
        crate::metrics::cluster_redis_up(up);
    }

    async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        let mut failures = 0u32;
        loop {
            let current = self
                .inner
                .conn
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let mut conn = match current {
                Some(c) => c,
                None => match self.connect().await {
                    Ok(c) => {
                        *self.inner.conn.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(c.clone());
                        backoff = Duration::from_millis(200);
                        c
                    }
                    Err(e) => {
                        self.set_up(false, Some(e));
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let start = Instant::now();
            let ping = tokio::time::timeout(
                RESPONSE_TIMEOUT,
                redis::cmd("PING").query_async::<String>(&mut conn),
            )
            .await;
            match ping {
                Ok(Ok(_)) => {
                    let rtt = start.elapsed();
                    self.inner
                        .rtt_us
                        .store(rtt.as_micros() as u64, Ordering::Relaxed);
                    crate::metrics::cluster_redis_rtt(rtt.as_secs_f64());
                    failures = 0;
                    self.set_up(true, None);
                }
                Ok(Err(e)) => {
                    failures += 1;
                    self.set_up(false, Some(e.to_string()));
                }
                Err(_) => {
                    failures += 1;
                    self.set_up(false, Some("PING timed out".into()));
                }
            }
            if failures >= 3 {
                // The manager reconnects by itself, but a connection stuck half-open is
                // cheaper to replace than to wait out.
                *self.inner.conn.lock().unwrap_or_else(|p| p.into_inner()) = None;
                failures = 0;
            }
            let pause = if self.is_up() {
                PING_EVERY
            } else {
                Duration::from_millis(250)
            };
            tokio::time::sleep(pause).await;
        }
    }

    async fn connect(&self) -> Result<ConnectionManager, String> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(RESPONSE_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        match tokio::time::timeout(
            RESPONSE_TIMEOUT * 2,
            ConnectionManager::new_with_config(self.inner.client.clone(), config),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("connecting timed out".into()),
        }
    }
}
