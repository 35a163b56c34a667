//! Change feeds over plain HTTP: server-sent events and long-poll on `GET /api/changes`
//! (also under `/realtime/v1`), and broadcast topics as server-sent events on
//! `GET /api/broadcast`.
//!
//! ```text
//!  GET /api/changes?schema&table&event&filter&select&apikey [&snapshot] [&offset | Last-Event-ID]
//!    token (401) ─ privileged role (403) ─ fd budget (429) ─ join rate (429)
//!    binding checked like a postgres_changes join entry (catalog, privileges, filter)
//!    hub.subscribe(Framing::Data, FeedOutbox)  → live floor F (changes after F queue)
//!    resume P:   History (P, F] ─ match ─ RLS as the caller (wal::checks) ─ render ─▶ first
//!    snapshot:   rows as the caller, aligned by transaction visibility ─▶ first (see snapshot)
//!    then the outbox: text/event-stream (sse) or one JSON answer (longpoll)
//! ```
//!
//! Invariants:
//! - The response starts only once the feed is subscribed: every change committed after
//!   its headers arrive is delivered.
//! - Resuming from P delivers every matching change after P exactly once: those up to F from
//!   the history, judged now with the same filter, privileges and row-level security as the
//!   live stream (default deny), and those after F from the hub; a P the history no longer
//!   covers is refused with 409 (`ResyncRequired`), never served with a gap.
//! - A feed holds a connection slot (`--max-connections`) for its lifetime and counts as a
//!   join for the per-client join rate.

// Refusals are finished HTTP responses, returned once per request: their size is no cost.
#![allow(clippy::result_large_err)]

pub mod history;
pub mod longpoll;
pub mod outbox;
pub mod snapshot;
pub mod sse;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use walcast_core::hub::{Access, ChannelTarget, Framing, Identity};
use walcast_core::payload::render_data_visible;
use walcast_core::subscription::Binding;
use walcast_core::Position;
use walcast_protocol::PostgresBinding;

use crate::authz::rls::{PolicyCache, RlsDeletes};
use crate::authz::roles::refusal_message;
use crate::http::{bearer, ClientAddr, HttpState};
use crate::metrics;
use crate::realtime::changes::build_bindings;
use crate::realtime::limiter::client_key;
use crate::state::{now_unix, AppState, SocketGuard};
use history::History;
use outbox::FeedOutbox;

/// Default bound of the change history (`--history-bytes`).
pub const DEFAULT_HISTORY_BYTES: usize = 64 << 20;
/// Longest a long-poll waits for a change.
pub const LONG_POLL_WAIT: Duration = Duration::from_secs(20);

/// Process-wide state of the feeds.
pub struct Feeds {
    pub history: History,
    rls_deletes: Mutex<RlsDeletes>,
}

impl Default for Feeds {
    fn default() -> Self {
        Feeds {
            history: History::new(DEFAULT_HISTORY_BYTES),
            rls_deletes: Mutex::new(RlsDeletes::default()),
        }
    }
}

impl Feeds {
    /// What replayed DELETEs that policies cannot judge become (as for the live stream).
    pub fn set_rls_deletes(&self, d: RlsDeletes) {
        *self.rls_deletes.lock().unwrap_or_else(|p| p.into_inner()) = d;
    }

    pub(crate) fn rls_deletes(&self) -> RlsDeletes {
        *self.rls_deletes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The feed routes (merged into the main router).
pub fn routes() -> Router<HttpState> {
    let mut r = Router::new();
    for prefix in ["", "/realtime/v1"] {
        r = r
            .route(&format!("{prefix}/api/changes"), get(changes))
            .route(&format!("{prefix}/api/broadcast"), get(sse::broadcast));
    }
    r
}

/// A JSON error answer `{"error": …}`.
pub fn refuse(status: StatusCode, reason: &'static str, message: &str) -> Response {
    metrics::feed_refused(reason);
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn bad_request(message: &str) -> Response {
    refuse(StatusCode::BAD_REQUEST, "bad_request", message)
}

/// Does the client ask for server-sent events?
fn wants_sse(headers: &HeaderMap) -> bool {
    headers
        .get_all(axum::http::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("text/event-stream"))
}

/// The token: `Authorization: Bearer`, else an `apikey` header, else the `apikey` query
/// parameter (`EventSource` cannot set headers).
fn token_of<'a>(headers: &'a HeaderMap, params: &'a HashMap<String, String>) -> Option<&'a str> {
    bearer(headers)
        .or_else(|| headers.get("apikey").and_then(|v| v.to_str().ok()))
        .or_else(|| params.get("apikey").map(String::as_str))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn flag(params: &HashMap<String, String>, name: &str) -> Result<bool, Response> {
    match params.get(name).map(String::as_str) {
        None | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") | Some("") => Ok(true),
        Some(_) => Err(bad_request(&format!("{name} must be true or false"))),
    }
}

/// A parsed `/api/changes` request.
pub struct ChangeRequest {
    entry: PostgresBinding,
    /// Resume after this position (`Last-Event-ID`, `last_event_id` or `offset`).
    pub resume: Option<Position>,
    pub snapshot: bool,
    /// How long a long-poll waits.
    pub wait: Duration,
}

impl ChangeRequest {
    fn parse(
        params: &HashMap<String, String>,
        headers: &HeaderMap,
        sse: bool,
    ) -> Result<ChangeRequest, Response> {
        let event = params.get("event").map(String::as_str).unwrap_or("*");
        if !["*", "INSERT", "UPDATE", "DELETE"]
            .iter()
            .any(|e| e.eq_ignore_ascii_case(event))
        {
            return Err(bad_request(
                "event must be INSERT, UPDATE, DELETE or * (the default)",
            ));
        }
        let schema = params.get("schema").filter(|s| !s.is_empty());
        let table = params.get("table").filter(|s| !s.is_empty());
        if schema.is_none() && table.is_none() {
            return Err(bad_request("give at least `schema` or `table`"));
        }
        let select: Option<Vec<String>> = params.get("select").map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect()
        });
        let mut object = serde_json::Map::new();
        object.insert("event".into(), event.to_ascii_uppercase().into());
        if let Some(s) = schema {
            object.insert("schema".into(), s.as_str().into());
        }
        if let Some(t) = table {
            object.insert("table".into(), t.as_str().into());
        }
        if let Some(f) = params.get("filter").filter(|f| !f.is_empty()) {
            object.insert("filter".into(), f.as_str().into());
        }
        if let Some(cols) = &select {
            object.insert("select".into(), cols.clone().into());
        }
        let raw =
            serde_json::value::RawValue::from_string(serde_json::Value::Object(object).to_string())
                .map_err(|_| bad_request("unreadable parameters"))?;
        let entry = PostgresBinding {
            raw,
            event: Some(event.to_ascii_uppercase()),
            schema: schema.cloned(),
            table: table.cloned(),
            filter: params.get("filter").filter(|f| !f.is_empty()).cloned(),
            select,
        };
        let resume_text = if sse {
            headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .filter(|v| !v.trim().is_empty())
                .or_else(|| params.get("last_event_id").cloned())
        } else {
            params.get("offset").cloned()
        };
        let resume = match resume_text {
            None => None,
            Some(t) => Some(Position::parse(t.trim()).map_err(|e| {
                bad_request(&format!(
                    "{e} ({} {t:?})",
                    if sse { "Last-Event-ID" } else { "offset" }
                ))
            })?),
        };
        let live = flag(params, "live")?;
        let wait = match params.get("timeout_ms") {
            None if live => LONG_POLL_WAIT,
            None => Duration::ZERO,
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) => Duration::from_millis(ms).min(LONG_POLL_WAIT),
                Err(_) => return Err(bad_request("timeout_ms must be a number of milliseconds")),
            },
        };
        Ok(ChangeRequest {
            entry,
            resume,
            snapshot: flag(params, "snapshot")? && resume.is_none(),
            wait,
        })
    }
}

/// A caller whose token passed: who it acts as, and what it holds while the feed is open.
pub struct Caller {
    pub identity: Arc<Identity>,
    pub client: Arc<str>,
    /// Token expiry (seconds since the epoch): the feed ends then.
    pub exp: i64,
    pub slot: SocketGuard,
}

/// Token, role, connection slot and join rate, in that order (as a WebSocket upgrade and
/// join check them).
pub async fn admit(
    s: &HttpState,
    addr: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    params: &HashMap<String, String>,
) -> Result<Caller, Response> {
    let app = &s.app;
    if app.shutting_down.load(std::sync::atomic::Ordering::Acquire) {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    let Some(token) = token_of(headers, params) else {
        return Err(refuse(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "API key is missing",
        ));
    };
    let claims = match app.jwt.verify(token, now_unix()) {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = ?e.to_string(), "refusing a feed");
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                e.upgrade_message(),
            ));
        }
    };
    let privilege = match app.token_roles.privilege(&app.sql, &claims.role).await {
        Ok(p) => p,
        Err(_) => app.token_roles.cached_privilege(&claims.role),
    };
    if let Some(why) = privilege {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "privileged_role",
            &refusal_message(&claims.role, why),
        ));
    }
    let Some(slot) = app.try_socket_slot() else {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "max_connections",
            "Too many connected users",
        ));
    };
    let client = client_key(claims.sub.as_deref(), addr);
    if app
        .join_limits
        .check(&client, std::time::Instant::now(), 1)
        .is_err()
        || !app.cluster_join_share(&client, 1)
    {
        return Err(refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "rate",
            "Too many joins per second",
        ));
    }
    Ok(Caller {
        identity: Arc::new(crate::authz::private::identity_of(&claims)),
        client,
        exp: claims.exp,
        slot,
    })
}

/// An open change feed: subscribed to the hub until dropped.
pub struct Feed {
    pub app: Arc<AppState>,
    pub id: u64,
    pub outbox: Arc<FeedOutbox>,
    pub binding: Binding,
    pub caller: Caller,
    /// Changes after this position come from the hub; those up to it from the history.
    pub floor: Position,
    transport: &'static str,
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.app.hub.unsubscribe(self.id);
        self.outbox.close();
        metrics::feed_closed(self.transport);
    }
}

impl Feed {
    /// Still subscribed (its binding was not stopped by a failed authorization)?
    pub fn subscribed(&self) -> bool {
        self.app.hub.cursor(self.id).is_some()
    }
}

async fn changes(
    State(s): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let sse = wants_sse(&headers);
    let req = match ChangeRequest::parse(&params, &headers, sse) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let caller = match admit(&s, addr, &headers, &params).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    let transport = if sse { "sse" } else { "longpoll" };
    let feed = match open(&s.app, caller, &req, transport).await {
        Ok(f) => f,
        Err(resp) => return resp,
    };
    let replay = match req.resume {
        Some(after) => match replay(&feed, after).await {
            Ok(r) => r,
            Err(resp) => return resp,
        },
        None => Vec::new(),
    };
    if sse {
        sse::changes(feed, req, replay, s.shutdown.clone())
    } else {
        longpoll::answer(feed, req, replay, s.shutdown.clone()).await
    }
}

/// Check the binding as a join would, and subscribe.
async fn open(
    app: &Arc<AppState>,
    caller: Caller,
    req: &ChangeRequest,
    transport: &'static str,
) -> Result<Feed, Response> {
    let checked =
        build_bindings(app, &caller.identity.role, std::slice::from_ref(&req.entry)).await;
    let Some(binding) = checked.bindings.into_iter().next() else {
        let message = checked
            .errors
            .into_iter()
            .next()
            .unwrap_or_else(|| "the subscription was refused".into());
        let (status, reason) = if message.contains("unable to connect") {
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        } else if message.contains("permission denied") || message.contains("does not exist\"") {
            (StatusCode::FORBIDDEN, "forbidden")
        } else {
            (StatusCode::BAD_REQUEST, "bad_request")
        };
        return Err(refuse(status, reason, &message));
    };
    let outbox = Arc::new(FeedOutbox::new(
        app.limits.socket_send_queue_bytes,
        req.resume.unwrap_or(Position::ZERO),
    ));
    let id = app.next_subscriber_id();
    let target = ChannelTarget {
        outbox: outbox.clone(),
        framing: Framing::Data,
        topic: Arc::from("realtime:changes"),
        identity: caller.identity.clone(),
        after: None,
    };
    let hub = &app.hub;
    // Read under the lock that dispatch takes: exactly the changes after it reach the outbox.
    let floor = hub.subscribe(id, target, vec![binding.clone()], || hub.routed_through());
    metrics::feed_opened(transport);
    Ok(Feed {
        app: app.clone(),
        id,
        outbox,
        binding,
        caller,
        floor,
        transport,
    })
}

/// A change ready to send: its position and its `data` object.
pub type Event = (Position, Bytes);

/// The changes after `after` up to the feed's floor, from the history, as the feed's caller
/// may see them; 409 when the history no longer reaches back to `after`.
async fn replay(feed: &Feed, after: Position) -> Result<Vec<Event>, Response> {
    let app = &feed.app;
    let held = app
        .feeds
        .history
        .since(after, feed.floor)
        .map_err(|e| refuse(StatusCode::CONFLICT, "resync", &e.to_string()))?;
    let b = &feed.binding;
    let matching: Vec<(u64, Arc<walcast_core::change::Change>)> = held
        .into_iter()
        .filter(|c| {
            b.event.accepts(c.kind)
                && (b.schema == "*" || b.schema == *c.table.schema)
                && (b.table == "*" || b.table == *c.table.name)
                && b.filter.as_ref().is_none_or(|f| f.matches(c))
        })
        .enumerate()
        .map(|(i, c)| (i as u64, c))
        .collect();
    if matching.is_empty() {
        return Ok(Vec::new());
    }
    // The live stream's checks, as one batch for this identity (a policy cache of its own:
    // policies are compiled afresh for each replay).
    let work = crate::wal::checks::LaneWork {
        key: 0,
        identity: feed.caller.identity.clone(),
        items: matching.clone(),
    };
    let result = crate::wal::checks::run(
        app.authz.clone(),
        Arc::new(Mutex::new(PolicyCache::default())),
        vec![work],
        0,
        app.feeds.rls_deletes(),
    )
    .await;
    let mut verdicts: HashMap<u64, crate::wal::checks::ItemOutcome> = result
        .lanes
        .into_iter()
        .flat_map(|(_, outcomes, _)| outcomes)
        .collect();
    let config = app.hub.config();
    let mut out = Vec::new();
    for (seq, change) in matching {
        use crate::wal::checks::ItemOutcome;
        let access = match verdicts.remove(&seq) {
            Some(ItemOutcome::Decided(a)) => a,
            Some(ItemOutcome::Failed { code, .. }) => {
                return Err(refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &format!("Unable to authorize changes for this token: a row-level security check failed (SQLSTATE {code})"),
                ))
            }
            Some(ItemOutcome::Unavailable) | None => {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    crate::realtime::authorize::DB_UNAVAILABLE,
                ))
            }
        };
        let Access::Allow(vis) = access else {
            continue;
        };
        // A column the identity may no longer read must not decide or shape what it gets.
        if let Some(mask) = &vis.columns {
            let hidden = b.columns_read().any(|col| {
                change
                    .table
                    .columns
                    .iter()
                    .position(|c| &*c.name == col)
                    .is_none_or(|i| !mask.get(i).copied().unwrap_or(false))
            });
            if hidden {
                continue;
            }
        }
        let data = render_data_visible(&change, b.select.as_deref(), &vis, config);
        out.push((change.position(), Bytes::from(data)));
    }
    metrics::feed_replayed(out.len());
    Ok(out)
}

/// Read a snapshot and align the queued changes with it: returns the rows, the records and
/// the position the stream continues after. Retried when the visible and invisible queued
/// changes interleave in commit order (see [`snapshot`]).
pub async fn aligned(feed: &Feed) -> Result<(snapshot::Snapshot, Position), Response> {
    const ATTEMPTS: usize = 5;
    const DELIVERY_WAIT: Duration = Duration::from_secs(30);
    let app = &feed.app;
    for attempt in 1..=ATTEMPTS {
        let snap = snapshot::read(app, &feed.caller.identity, &feed.binding)
            .await
            .map_err(|e| {
                use snapshot::SnapshotError as E;
                let (status, reason) = match &e {
                    E::Wildcard => (StatusCode::BAD_REQUEST, "bad_request"),
                    E::NoTable | E::Refused(_) => (StatusCode::FORBIDDEN, "forbidden"),
                    E::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
                };
                refuse(status, reason, &e.to_string())
            })?;
        let unavailable = |what: &str| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                &format!("cannot align the snapshot with the change stream: {what}"),
            )
        };
        // Every transaction the snapshot saw committed before this WAL position.
        let lsn = {
            let client = app
                .sql
                .get()
                .await
                .map_err(|e| unavailable(&format!("{e:#}")))?;
            let lsn = crate::db::sql::wal_insert_lsn(&client)
                .await
                .map_err(|e| unavailable(&format!("{e:#}")))?;
            // A message after it, so an idle stream still reports having passed it.
            if let Err(e) = client
                .execute(
                    "SELECT pg_catalog.pg_logical_emit_message(false, 'walcast.feed', '')",
                    &[],
                )
                .await
            {
                tracing::debug!(error = ?e.to_string(), "cannot emit a logical message; waiting for the stream's keepalive");
            }
            lsn
        };
        if !app.health.wait_delivered(lsn, DELIVERY_WAIT).await {
            return Err(unavailable("the change stream did not catch up"));
        }
        let queued = feed.outbox.queued_changes().map_err(|_| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "overflow",
                "too many changes arrived during the snapshot; try again",
            )
        })?;
        let xids = &snap.xids;
        let snapshot::Alignment { end, interleaved } = snapshot::align(feed.floor, &queued, xids);
        if interleaved && attempt < ATTEMPTS {
            tracing::debug!(
                attempt,
                "snapshot visibility interleaves with commit order; reading it again"
            );
            continue;
        }
        if interleaved {
            tracing::warn!("snapshot visibility kept interleaving with commit order; streaming every change the snapshot did not see");
        }
        feed.outbox.remove_changes(|_, xid| xids.sees(xid));
        return Ok((snap, end));
    }
    Err(refuse(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "cannot align the snapshot with the change stream",
    ))
}
