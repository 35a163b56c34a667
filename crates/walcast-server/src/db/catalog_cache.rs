//! What joins read from the catalog, cached: single-flight, bounded in age, invalidated by
//! the replication pump.
//!
//! ```text
//!  join ─▶ TokenRoles (role attributes, authz::roles)   ─┐
//!       ─▶ CatalogCache::table(schema, name)  → TableMeta ├─ SingleFlight: fresh entry? share it
//!       ─▶ CatalogCache::access(role, oid)    → TableAccess┘   else ONE query, every waiter gets it
//!  pump: Relation message for relid ─▶ forget_table(relid)   (DDL, GRANT/REVOKE, policy changes)
//!        new replication connection  ─▶ clear()
//! ```
//!
//! A reconnect storm (thousands of clients joining the same few tables under the same role)
//! then costs a handful of catalog queries instead of three or four per join.
//!
//! Invariants:
//! - Single flight: concurrent callers needing the same key share one query (a
//!   [`futures_util::future::Shared`] future over a task of its own on the shared
//!   [`SqlPool`]): callers that go away (a socket closing mid-join) never cancel it for the
//!   others, nor leave it half-run.
//! - Age bound: an entry is reused only while less than [`CATALOG_TTL`] has passed since its
//!   query *started*, so what a join acts on reflects the catalog as it was at most
//!   `CATALOG_TTL` ago. A REVOKE, an ALTER TABLE or a dropped table is seen by every join
//!   that starts `CATALOG_TTL` after it committed at the latest.
//! - Earlier in practice: a catalog change to a published table (ALTER TABLE, GRANT/REVOKE,
//!   CREATE/ALTER/DROP POLICY, ENABLE ROW LEVEL SECURITY) invalidates its relcache, so
//!   pgoutput sends the table's Relation message again before its next change; the pump then
//!   forgets every entry about that relation, and in-flight loads too (they may have read
//!   the catalog before the change).
//! - Failures are never cached: a query that failed is shared by the callers waiting on it,
//!   and the next caller queries again. Negative answers (no such table, not published) are
//!   not reused either, so a table created and published just now can be joined at once.
//! - Deliveries never rely on this cache: every change is authorized again by the pump with
//!   its own policy cache (`authz::rls`). A stale entry can let a *join* succeed within the
//!   bound, never a row through.
//! - Bounded: each map holds at most [`MAX_ENTRIES`] keys; past it expired entries are
//!   dropped, and if that is not enough the map starts over.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::db::catalog::{find_table, table_access, TableAccess, TableMeta};
use crate::db::sql::SqlPool;
use crate::metrics;

/// Longest a cached catalog answer is reused (counted from when its query started).
pub const CATALOG_TTL: Duration = Duration::from_secs(10);
/// Most keys one map holds.
pub const MAX_ENTRIES: usize = 10_000;

/// Why a load failed, shared by every caller that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(Arc<str>);

impl LoadError {
    pub fn new(text: impl Into<Arc<str>>) -> LoadError {
        LoadError(text.into())
    }
}

type Load<V> = Shared<BoxFuture<'static, Result<V, LoadError>>>;

struct Slot<V> {
    started: Instant,
    load: Load<V>,
}

/// A map of single-flight loads whose answers are reused for a bounded time.
pub struct SingleFlight<K, V> {
    kind: &'static str,
    ttl: Duration,
    entries: Mutex<HashMap<K, Slot<V>>>,
}

impl<K, V> SingleFlight<K, V>
where
    K: Eq + Hash + Clone,
    V: Clone + Send + Sync + 'static,
{
    /// `kind` labels the hit/miss metric (a fixed word, never a key).
    pub fn new(kind: &'static str, ttl: Duration) -> Self {
        SingleFlight {
            kind,
            ttl,
            entries: Mutex::default(),
        }
    }

    /// The value for `key`: shared with a load in flight or a fresh answer when there is
    /// one that `reusable` accepts, else loaded now by `load` (and shared with whoever asks
    /// meanwhile).
    pub async fn get<F, Fut>(
        &self,
        key: &K,
        reusable: impl Fn(&V) -> bool,
        load: F,
    ) -> Result<V, LoadError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<V>> + Send + 'static,
    {
        let shared = {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let current = entries.get(key).filter(|slot| {
                slot.started.elapsed() < self.ttl
                    && match slot.load.peek() {
                        None => true,
                        Some(Ok(v)) => reusable(v),
                        Some(Err(_)) => false,
                    }
            });
            match current {
                Some(slot) => {
                    metrics::catalog_cache(self.kind, "hit");
                    slot.load.clone()
                }
                None => {
                    metrics::catalog_cache(self.kind, "miss");
                    if entries.len() >= MAX_ENTRIES {
                        let ttl = self.ttl;
                        entries.retain(|_, s| s.started.elapsed() < ttl);
                        if entries.len() >= MAX_ENTRIES {
                            entries.clear();
                        }
                    }
                    // Run by a task of its own: the query finishes even when every caller
                    // waiting for it went away (a paused future could hold a pooled
                    // connection's lock until some later caller polled it again). On the
                    // serving runtime: a join on the intake runtime may start it, and joins
                    // of established sockets may wait for it.
                    let task = crate::realtime::intake::spawn_serving(load());
                    let load: Load<V> = async move {
                        match task.await {
                            Ok(answer) => answer.map_err(|e| LoadError::new(format!("{e:#}"))),
                            Err(e) => Err(LoadError::new(format!("catalog look-up task: {e}"))),
                        }
                    }
                    .boxed()
                    .shared();
                    entries.insert(
                        key.clone(),
                        Slot {
                            started: Instant::now(),
                            load: load.clone(),
                        },
                    );
                    load
                }
            }
        };
        shared.await
    }

    /// A fresh, loaded answer, without querying (`None` when there is none).
    pub fn peek(&self, key: &K) -> Option<V> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let slot = entries.get(key)?;
        if slot.started.elapsed() >= self.ttl {
            return None;
        }
        match slot.load.peek() {
            Some(Ok(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// Keep the entries `keep` accepts; it sees `None` for a load still in flight.
    pub fn retain(&self, keep: impl Fn(&K, Option<&V>) -> bool) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|k, slot| match slot.load.peek() {
            Some(Ok(v)) => keep(k, Some(v)),
            Some(Err(_)) => false,
            None => keep(k, None),
        });
    }

    pub fn clear(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Table descriptions and per-role table privileges, as joins read them.
pub struct CatalogCache {
    sql: Arc<SqlPool>,
    publication: Arc<str>,
    /// By (schema, table name).
    tables: SingleFlight<(String, String), Option<TableMeta>>,
    /// By (role, table oid).
    access: SingleFlight<(String, u32), TableAccess>,
}

impl CatalogCache {
    pub fn new(sql: Arc<SqlPool>, publication: &str) -> CatalogCache {
        CatalogCache {
            sql,
            publication: Arc::from(publication),
            tables: SingleFlight::new("table", CATALOG_TTL),
            access: SingleFlight::new("table_access", CATALOG_TTL),
        }
    }

    /// `schema.table` as [`find_table`] describes it (`None`: no such table).
    pub async fn table(&self, schema: &str, table: &str) -> Result<Option<TableMeta>, LoadError> {
        let key = (schema.to_string(), table.to_string());
        let (sql, publication) = (self.sql.clone(), self.publication.clone());
        let (s, t) = key.clone();
        self.tables
            .get(
                &key,
                // Only positive answers are reused (see the module invariants).
                |meta| meta.as_ref().is_some_and(|m| m.published),
                move || async move {
                    let client = sql.get().await?;
                    find_table(&client, &publication, &s, &t).await
                },
            )
            .await
    }

    /// What `role` may SELECT of the table `oid` ([`table_access`]).
    pub async fn access(&self, role: &str, oid: u32) -> Result<TableAccess, LoadError> {
        let key = (role.to_string(), oid);
        let sql = self.sql.clone();
        let r = role.to_string();
        self.access
            .get(
                &key,
                |_| true,
                move || async move {
                    let client = sql.get().await?;
                    table_access(&client, &r, oid).await
                },
            )
            .await
    }

    /// The relation's Relation message arrived (its definition, privileges or policies may
    /// have changed): forget everything about it, and every load still in flight.
    pub fn forget_table(&self, relid: u32) {
        self.tables
            .retain(|_, meta| meta.is_some_and(|m| m.as_ref().is_none_or(|m| m.oid != relid)));
        self.access
            .retain(|(_, oid), loaded| loaded.is_some() && *oid != relid);
    }

    /// Forget everything (a new replication connection: Relation messages come afresh).
    pub fn clear(&self) {
        self.tables.clear();
        self.access.clear();
    }

    /// Entries held (tables, privileges), for tests and debugging.
    pub fn sizes(&self) -> (usize, usize) {
        (self.tables.len(), self.access.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counting(
        calls: &Arc<AtomicUsize>,
        value: u32,
    ) -> impl FnOnce() -> BoxFuture<'static, anyhow::Result<u32>> {
        let calls = calls.clone();
        move || {
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(value)
            }
            .boxed()
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_load() {
        let cache: SingleFlight<u32, u32> = SingleFlight::new("test", Duration::from_secs(60));
        let calls = Arc::new(AtomicUsize::new(0));
        let waits: Vec<_> = (0..50)
            .map(|_| cache.get(&1, |_| true, counting(&calls, 7)))
            .collect();
        let got = futures_util::future::join_all(waits).await;
        assert!(got.iter().all(|r| matches!(r, Ok(7))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.peek(&1), Some(7));
    }

    #[tokio::test]
    async fn expired_failed_and_rejected_answers_are_loaded_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache: SingleFlight<u32, u32> = SingleFlight::new("test", Duration::from_millis(50));
        cache.get(&1, |_| true, counting(&calls, 1)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(cache.peek(&1), None, "expired");
        cache.get(&1, |_| true, counting(&calls, 2)).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        let failing = || async { anyhow::bail!("no connection") };
        assert!(cache.get(&2, |_| true, failing).await.is_err());
        assert_eq!(
            cache.get(&2, |_| true, counting(&calls, 3)).await.unwrap(),
            3
        );
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        cache
            .get(&3, |v| *v != 0, counting(&calls, 0))
            .await
            .unwrap();
        cache
            .get(&3, |v| *v != 0, counting(&calls, 0))
            .await
            .unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            5,
            "rejected answers are not reused"
        );
    }

    #[tokio::test]
    async fn retain_sees_loads_in_flight_as_none() {
        let calls = Arc::new(AtomicUsize::new(0));
        let cache: SingleFlight<u32, u32> = SingleFlight::new("test", Duration::from_secs(60));
        cache.get(&1, |_| true, counting(&calls, 1)).await.unwrap();
        let pending = cache.get(&2, |_| true, counting(&calls, 2));
        let mut pending = Box::pin(pending);
        // Start the second load without finishing it.
        let mut cx = std::task::Context::from_waker(futures_util::task::noop_waker_ref());
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        cache.retain(|_, v| v.is_some());
        assert_eq!(cache.len(), 1);
        assert_eq!(
            pending.await.unwrap(),
            2,
            "a forgotten load still answers its waiters"
        );
        assert_eq!(cache.peek(&2), None);
    }
}
