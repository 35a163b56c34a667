//! HTTP surface: WebSocket upgrades (with the connection token checked before anything
//! else), REST broadcast ([`broadcast_api`]), health and readiness, metrics; the accept loop
//! ([`listener`]).

pub mod broadcast_api;
pub mod listener;

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use walcast_protocol::Vsn;

use crate::auth::JwtError;
use crate::authz::roles::refusal_message;
use crate::metrics;
use crate::realtime::limiter::client_key;
use crate::realtime::socket::{self, Connection};
use crate::state::{now_unix, AppState};

/// The client's address as the accept loop saw it (absent when a request did not come
/// through it, e.g. in router tests).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|ConnectInfo(a)| a.ip()),
        ))
    }
}

#[derive(Clone)]
pub struct HttpState {
    pub app: Arc<AppState>,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub prometheus: Option<PrometheusHandle>,
    /// Bearer token required on /metrics, when set.
    pub metrics_token: Option<Arc<str>>,
    /// Where new sockets start (`crate::realtime::intake`); `None`: where they were upgraded.
    pub intake: Option<tokio::runtime::Handle>,
}

pub fn router(state: HttpState) -> Router {
    let max_body = state.app.limits.max_frame_bytes;
    Router::new()
        .merge(crate::http::broadcast_api::routes(max_body))
        .merge(crate::feed::routes())
        .route("/socket/websocket", get(websocket))
        .route("/realtime/v1/websocket", get(websocket))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_page))
        .with_state(state)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<HttpState>) -> Response {
    use crate::state::Readiness;
    if s.app
        .shutting_down
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n",
        )
            .into_response();
    }
    // Cluster mode adds a line; a Redis outage alone keeps 200 (the node still serves its
    // own sockets, and draining every node at once on a Redis blip would be worse).
    let cluster = s
        .app
        .cluster_node
        .as_ref()
        .map(|n| format!("{}\n", n.status_line()))
        .unwrap_or_default();
    let reason = match s.app.health.get() {
        Readiness::Streaming if s.app.is_streaming() => {
            // Cluster mode: which role this node has (a follower that receives the
            // cluster's change stream is ready too), and the cluster line.
            let role = crate::cluster::changes::role()
                .map(|role| format!("role: {role}\n"))
                .unwrap_or_default();
            return (StatusCode::OK, format!("ready\n{role}{cluster}")).into_response();
        }
        Readiness::Streaming => "replication stream lost: reconnecting".to_owned(),
        Readiness::Starting(why) => format!("starting: {why}"),
        Readiness::Lost(why) => format!("replication stream lost: {why}; reconnecting"),
        Readiness::Stopped(why) => format!("replication stopped: {why}"),
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        format!("not ready: {reason}\n{cluster}"),
    )
        .into_response()
}

/// Do two secrets match? Compared as SHA-256 digests, without an early exit: neither the
/// length of the configured token nor how much of a guess was right shows in the timing.
fn secret_eq(given: &[u8], want: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(given), Sha256::digest(want));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The token of an `Authorization: Bearer <token>` header; the scheme is case-insensitive
/// (RFC 9110).
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    let token = rest.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

async fn metrics_page(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    if let Some(want) = &s.metrics_token {
        let given = bearer(&headers).unwrap_or("");
        if !secret_eq(given.as_bytes(), want.as_bytes()) {
            return (StatusCode::UNAUTHORIZED, "metrics need a bearer token\n").into_response();
        }
    }
    // In cluster mode only the streamer streams the slot.
    metrics::replication_streaming(
        s.app.is_streaming() && crate::cluster::changes::role() != Some("follower"),
    );
    match &s.prometheus {
        Some(h) => h.render().into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are disabled\n").into_response(),
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn websocket(
    State(s): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limits = &s.app.limits;
    let vsn = match Vsn::from_query(params.get("vsn").map(String::as_str)) {
        Ok(v) => v,
        Err(e) => {
            metrics::upgrade_refused("vsn");
            tokio::time::sleep(limits.connect_error_backoff).await;
            return refuse(StatusCode::BAD_REQUEST, &e.to_string());
        }
    };
    if let (Some(allowed), Some(origin)) = (&limits.allowed_origins, headers.get("origin")) {
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        // Exact matches only: no wildcards, `null` and `file://` origins are never allowed.
        if !allowed.iter().any(|a| a == origin) {
            metrics::upgrade_refused("origin");
            return refuse(StatusCode::FORBIDDEN, "Origin not allowed");
        }
    }
    let session_id = match params.get("session_id") {
        None => None,
        Some(id) if crate::realtime::resume::valid_session_id(id) => {
            Some(Arc::<str>::from(id.as_str()))
        }
        Some(_) => {
            metrics::upgrade_refused("session_id");
            return refuse(
                StatusCode::BAD_REQUEST,
                "session_id must be 8 to 128 URL-safe characters (letters, digits, '-', '_', '.', '~')",
            );
        }
    };
    let Some(slot) = s.app.try_socket_slot() else {
        metrics::upgrade_refused("max_connections");
        tokio::time::sleep(limits.connect_error_backoff).await;
        return refuse(StatusCode::TOO_MANY_REQUESTS, "Too many connected users");
    };
    // The gateway's header wins over the query parameter, as in Supabase.
    let token = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| params.get("apikey").cloned())
        .filter(|t| !t.trim().is_empty());
    let verified = match &token {
        None => Err(JwtError::Missing),
        Some(t) => s.app.jwt.verify(t, now_unix()),
    };
    // The claims themselves are not kept: every join verifies its own token again (the
    // connection token may expire), and an idle socket should not carry a copy.
    let (token, claims) = match (token, verified) {
        (Some(t), Ok(c)) => (t, c),
        (_, Err(e)) => {
            metrics::upgrade_refused(e.label());
            tracing::debug!(error = ?e.to_string(), "refusing websocket upgrade");
            tokio::time::sleep(limits.connect_error_backoff).await;
            return refuse(StatusCode::UNAUTHORIZED, e.upgrade_message());
        }
        (None, Ok(_)) => return refuse(StatusCode::UNAUTHORIZED, "API key is missing"),
    };
    // A privileged role is refused here when known; joins check it again in any case.
    let privilege = match s.app.token_roles.privilege(&s.app.sql, &claims.role).await {
        Ok(p) => p,
        Err(_) => s.app.token_roles.cached_privilege(&claims.role),
    };
    if let Some(why) = privilege {
        metrics::upgrade_refused("privileged_role");
        tokio::time::sleep(limits.connect_error_backoff).await;
        return refuse(StatusCode::FORBIDDEN, &refusal_message(&claims.role, why));
    }
    let client = client_key(claims.sub.as_deref(), addr);
    drop(claims);
    let app = s.app.clone();
    let shutdown = s.shutdown.clone();
    let intake = s.intake.clone();
    upgrade
        .read_buffer_size(1024)
        .write_buffer_size(64 * 1024)
        .max_write_buffer_size(16 * 1024 * 1024)
        .max_message_size(limits.max_frame_bytes)
        .max_frame_size(limits.max_frame_bytes)
        .on_upgrade(move |ws| async move {
            let conn = Connection {
                vsn,
                token: token.into(),
                client,
                slot,
                session_id,
            };
            let socket = socket::run(ws, app, conn, shutdown);
            match intake {
                Some(intake) => drop(intake.spawn(socket)),
                None => socket.await,
            }
        })
}
