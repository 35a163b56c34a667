//! REST broadcast: `POST /api/broadcast` (batch) and
//! `POST /api/broadcast/{topic}/events/{event}` (single), also under `/realtime/v1`.
//!
//! ```text
//!  request ─▶ token (Authorization: Bearer, else apikey) ─▶ verify ─▶ 401 {"message":"Unauthorized"}
//!          ─▶ content type ─▶ 415          (single: JSON or octet-stream; batch: JSON)
//!          ─▶ validate, payload size ─▶ 422 {"errors":{…}}   (body over the frame limit: 413)
//!          ─▶ rate window ─▶ 429 {"message":…}
//!          ─▶ private topic? write check ─▶ batch: skip the message; single: 403
//!          ─▶ single with persist=true / persist[ttl]=N (private only, else 422): store the
//!             row as the caller (INSERT policies: 403) ─▶ delivered with meta {"id"}
//!          ─▶ Topics::publish ─▶ 202, empty body
//! ```
//!
//! What subscribers get: batch messages are relayed as text `broadcast` frames with
//! `{"type":"broadcast","event":E,"payload":P[,"meta":{"id":…}]}`; the single endpoint's
//! JSON body goes out as a kind 4 frame to vsn 2.0.0 sockets and converted text to vsn 1.0.0
//! ones, an octet-stream body as a binary kind 4 frame (vsn 2.0.0 only).
//!
//! Invariants:
//! - A private topic is written to only after the same write check the WebSocket path uses
//!   ([`crate::realtime::broadcast::can_write`]); HTTP is never a way around it.
//! - Rates are per client (token `sub`, else address) under a server-wide ceiling: one
//!   caller's batch never uses up the others' budget.
//! - CORS follows `--allowed-origins`: any origin (`*`) when unset, else the request's origin
//!   when it is listed and no `access-control-allow-origin` at all when it is not.
//!   `OPTIONS` answers preflights the same way.

use std::collections::HashMap;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use walcast_core::broadcast::{Body, TopicKey, UserBroadcast};
use walcast_protocol::{outbound, PayloadEncoding};

use crate::auth::Claims;
use crate::authz::roles::refusal_message;
use crate::http::{bearer, ClientAddr, HttpState};
use crate::realtime::broadcast::{can_write, Extension};
use crate::realtime::limiter::{client_key, Refused};
use crate::realtime::stored::StoreRefused;
use crate::state::now_unix;

/// The broadcast routes (merged into the main router).
pub fn routes(max_body_bytes: usize) -> Router<HttpState> {
    let mut r = Router::new();
    for prefix in ["", "/realtime/v1"] {
        r = r
            .route(
                &format!("{prefix}/api/broadcast"),
                post(batch).options(preflight),
            )
            .route(
                &format!("{prefix}/api/broadcast/{{topic}}/events/{{event}}"),
                post(single).options(preflight),
            );
    }
    r.layer(DefaultBodyLimit::max(max_body_bytes))
}

/// The `access-control-allow-origin` a response gets, decided once per request.
#[derive(Clone)]
enum Cors {
    Any,
    Origin(HeaderValue),
    Nothing,
}

impl Cors {
    fn of(s: &HttpState, headers: &HeaderMap) -> Cors {
        let Some(allowed) = &s.app.limits.allowed_origins else {
            return Cors::Any;
        };
        match headers.get(header::ORIGIN) {
            Some(origin) => {
                let text = origin.to_str().unwrap_or("").trim_end_matches('/');
                if allowed.iter().any(|a| a == text) {
                    Cors::Origin(origin.clone())
                } else {
                    Cors::Nothing
                }
            }
            None => Cors::Nothing,
        }
    }

    fn apply(&self, mut resp: Response) -> Response {
        let h = resp.headers_mut();
        match self {
            Cors::Any => {
                h.insert(
                    header::ACCESS_CONTROL_ALLOW_ORIGIN,
                    HeaderValue::from_static("*"),
                );
            }
            Cors::Origin(o) => {
                h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
                h.insert(header::VARY, HeaderValue::from_static("origin"));
            }
            Cors::Nothing => {
                h.insert(header::VARY, HeaderValue::from_static("origin"));
            }
        }
        resp
    }
}

async fn preflight(State(s): State<HttpState>, headers: HeaderMap) -> Response {
    let mut resp = Cors::of(&s, &headers).apply(StatusCode::NO_CONTENT.into_response());
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, apikey, content-type, x-client-info"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    resp
}

fn message(status: StatusCode, text: &str) -> Response {
    (status, Json(json!({ "message": text }))).into_response()
}

fn unprocessable(field: &str, text: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({ "errors": { field: [text] } })),
    )
        .into_response()
}

fn accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

const PAYLOAD_TOO_LARGE: &str = "Payload size exceeds tenant limit";

/// A refusal: status and `message` text.
type Refusal = (StatusCode, std::borrow::Cow<'static, str>);

fn refuse((status, text): Refusal) -> Response {
    message(status, &text)
}

/// `Authorization: Bearer <jwt>`, else `apikey: <jwt>`, verified; privileged token roles are
/// refused as on the WebSocket.
async fn authenticate(s: &HttpState, headers: &HeaderMap) -> Result<Claims, Refusal> {
    let unauthorized = || (StatusCode::UNAUTHORIZED, "Unauthorized".into());
    let apikey = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = bearer(headers).or(apikey) else {
        return Err(unauthorized());
    };
    let claims = s.app.jwt.verify(token, now_unix()).map_err(|e| {
        tracing::debug!(error = ?e.to_string(), "refusing a REST broadcast");
        unauthorized()
    })?;
    let privilege = match s.app.token_roles.privilege(&s.app.sql, &claims.role).await {
        Ok(p) => p,
        Err(_) => s.app.token_roles.cached_privilege(&claims.role),
    };
    if let Some(why) = privilege {
        return Err((
            StatusCode::FORBIDDEN,
            refusal_message(&claims.role, why).into(),
        ));
    }
    Ok(claims)
}

fn content_type(headers: &HeaderMap) -> Option<String> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(
        ct.split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase(),
    )
}

/// Take `n` messages from the caller's share (and the server-wide ceiling), or the 429.
fn rate(s: &HttpState, client: &std::sync::Arc<str>, n: usize) -> Result<(), Refusal> {
    let limits = &s.app.rest_limits;
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    if n > limits.per_client() {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            "Too many messages to broadcast, please reduce the batch size".into(),
        ));
    }
    match limits.check(client, std::time::Instant::now(), n) {
        // Cluster mode: the client's share counts its broadcasts on every node.
        Ok(()) if !s.app.cluster_http_broadcast_share(client, n) => Err((
            StatusCode::TOO_MANY_REQUESTS,
            "You have exceeded your rate limit".into(),
        )),
        Ok(()) => Ok(()),
        Err(Refused::Client | Refused::Server) => Err((
            StatusCode::TOO_MANY_REQUESTS,
            "You have exceeded your rate limit".into(),
        )),
    }
}

fn client_of(claims: &Claims, addr: Option<std::net::IpAddr>) -> std::sync::Arc<str> {
    client_key(claims.sub.as_deref(), addr)
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    messages: Vec<BatchMessage<'a>>,
}

#[derive(Deserialize)]
struct BatchMessage<'a> {
    topic: String,
    event: String,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    id: Option<String>,
}

async fn batch(
    State(s): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cors = Cors::of(&s, &headers);
    cors.apply(batch_inner(&s, addr, &headers, body).await)
}

async fn batch_inner(
    s: &HttpState,
    addr: Option<std::net::IpAddr>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match authenticate(s, headers).await {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    if content_type(headers).is_some_and(|ct| ct != "application/json") {
        return message(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type");
    }
    let batch: Batch<'_> = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => return unprocessable("messages", &e.to_string()),
    };
    let max = s.app.limits.broadcast.max_payload_bytes;
    for m in &batch.messages {
        if !m.payload.get().trim_start().starts_with('{') {
            return unprocessable("payload", "must be an object");
        }
        if m.payload.get().len() > max {
            return unprocessable("payload", PAYLOAD_TOO_LARGE);
        }
    }
    if let Err(r) = rate(s, &client_of(&claims, addr), batch.messages.len()) {
        return refuse(r);
    }
    let mut allowed: HashMap<String, bool> = HashMap::new();
    for m in &batch.messages {
        let topic = m.topic.strip_prefix("realtime:").unwrap_or(&m.topic);
        if m.private {
            let ok = match allowed.get(topic) {
                Some(ok) => *ok,
                None => {
                    let ok = can_write(&s.app, &claims, topic, Extension::Broadcast).await;
                    allowed.insert(topic.to_owned(), ok);
                    ok
                }
            };
            if !ok {
                // Denied topics are skipped; the request still succeeds.
                continue;
            }
        }
        let meta = m.id.as_deref().map(|id| {
            let mut meta = String::from("{\"id\":");
            walcast_core::write_json_string(id, &mut meta);
            meta.push('}');
            meta
        });
        let map = outbound::broadcast(&m.event, m.payload.get(), meta.as_deref());
        let key = TopicKey::new(topic, m.private);
        let body = Body::Map(map);
        let stats = s.app.topics.publish(&key, &body, None);
        s.app.relay_broadcast(&key, &body, None);
        crate::metrics::broadcast("http", stats.delivered);
    }
    accepted()
}

async fn single(
    State(s): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    Path((topic, event)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let cors = Cors::of(&s, &headers);
    cors.apply(single_inner(&s, addr, topic, event, query, &headers, body).await)
}

async fn single_inner(
    s: &HttpState,
    addr: Option<std::net::IpAddr>,
    topic: String,
    event: String,
    query: HashMap<String, String>,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match authenticate(s, headers).await {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    let encoding = match content_type(headers).as_deref() {
        Some("application/json") => PayloadEncoding::Json,
        Some("application/octet-stream") => PayloadEncoding::Binary,
        _ => return message(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type"),
    };
    if encoding == PayloadEncoding::Json && serde_json::from_slice::<&RawValue>(&body).is_err() {
        return unprocessable("payload", "must be valid JSON");
    }
    if body.len() > s.app.limits.broadcast.max_payload_bytes {
        return unprocessable("payload", PAYLOAD_TOO_LARGE);
    }
    if let Err(r) = rate(s, &client_of(&claims, addr), 1) {
        return refuse(r);
    }
    let private = query
        .get("private")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let persist = match persist_query(&query) {
        Ok(p) => p,
        Err(e) => return unprocessable("persist", e),
    };
    if persist.is_some() && !private {
        return unprocessable("persist", "can only be used on private channels");
    }
    let topic = topic.strip_prefix("realtime:").unwrap_or(&topic);
    if private && !can_write(&s.app, &claims, topic, Extension::Broadcast).await {
        return message(StatusCode::FORBIDDEN, "Unauthorized");
    }
    // A persisted message is stored first, as the caller (its INSERT policies decide), and
    // delivered live with its row's id; the row is marked so its WAL copy is not delivered.
    let id = match persist {
        None => None,
        Some(ttl_secs) => {
            let identity = crate::authz::private::identity_of(&claims);
            let (json, binary) = match encoding {
                PayloadEncoding::Json => (std::str::from_utf8(&body).ok(), None),
                PayloadEncoding::Binary => (None, Some(&body[..])),
            };
            let msg = crate::authz::private::ToStore {
                sub_topic: topic,
                event: &event,
                json,
                binary,
                ttl_secs,
            };
            match crate::realtime::authorize::store(&s.app, &identity, &msg).await {
                Ok(id) => {
                    crate::metrics::broadcast_stored("http", "stored");
                    Some(id)
                }
                Err(StoreRefused::Denied) => {
                    crate::metrics::broadcast_stored("http", "denied");
                    return message(StatusCode::FORBIDDEN, "Unauthorized");
                }
                Err(StoreRefused::Failed) => {
                    crate::metrics::broadcast_stored("http", "failed");
                    return message(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Realtime was unable to store the message",
                    );
                }
            }
        }
    };
    let body = Body::User(UserBroadcast {
        event,
        encoding,
        meta: id
            .as_deref()
            .map(|id| crate::realtime::broadcast::id_meta(id, false)),
        payload: body,
    });
    let key = TopicKey::new(topic, private);
    let stats = match &id {
        Some(id) => s.app.topics.publish_stored(&key, &body, id, None),
        None => s.app.topics.publish(&key, &body, None),
    };
    s.app.relay_broadcast(&key, &body, id.as_deref());
    crate::metrics::broadcast("http", stats.delivered);
    accepted()
}

/// `persist=true` (stored until the retention) or `persist[ttl]=<seconds>`; `Ok(None)`
/// when the message is not to be stored.
fn persist_query(query: &HashMap<String, String>) -> Result<Option<Option<i64>>, &'static str> {
    if let Some(ttl) = query.get("persist[ttl]") {
        return match ttl.parse::<i64>() {
            Ok(t) if t > 0 => Ok(Some(Some(t))),
            _ => Err("ttl must be a positive integer number of seconds"),
        };
    }
    match query.get("persist").map(|v| v.to_ascii_lowercase()) {
        None => Ok(None),
        Some(v) if v == "true" => Ok(Some(None)),
        Some(v) if v == "false" => Ok(None),
        Some(_) => Err("is invalid"),
    }
}
