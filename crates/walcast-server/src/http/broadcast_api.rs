//! REST broadcast: `POST /api/broadcast` (batch) and
//! `POST /api/broadcast/{topic}/events/{event}` (single), also under `/realtime/v1`.
//!
//! ```text
//!  request ─▶ token (Authorization: Bearer, else apikey) ─▶ verify ─▶ 401 {"message":"Unauthorized"}
//!          ─▶ content type ─▶ 415          (single: JSON or octet-stream; batch: JSON)
//!          ─▶ validate, payload size ─▶ 422 {"errors":{…}}   (body over the frame limit: 413)
//!          ─▶ rate window ─▶ 429 {"message":…}
//!          ─▶ private topic? write check ─▶ batch: skip the message; single: 403
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
//! - Every response carries `access-control-allow-origin: *`; `OPTIONS` answers preflights.

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
use crate::http::HttpState;
use crate::realtime::broadcast::{can_write, Extension};
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

fn with_cors(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    resp
}

async fn preflight() -> Response {
    let mut resp = with_cors(StatusCode::NO_CONTENT.into_response());
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
    with_cors((status, Json(json!({ "message": text }))).into_response())
}

fn unprocessable(field: &str, text: &str) -> Response {
    with_cors(
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "errors": { field: [text] } })),
        )
            .into_response(),
    )
}

fn accepted() -> Response {
    with_cors(StatusCode::ACCEPTED.into_response())
}

const PAYLOAD_TOO_LARGE: &str = "Payload size exceeds tenant limit";

/// `Authorization: Bearer <jwt>`, else `apikey: <jwt>`, verified.
/// A refusal: status and `message` text.
type Refusal = (StatusCode, &'static str);

fn refuse((status, text): Refusal) -> Response {
    message(status, text)
}

fn authenticate(s: &HttpState, headers: &HeaderMap) -> Result<Claims, Refusal> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        })
        .filter(|t| !t.is_empty());
    let apikey = headers
        .get("apikey")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let Some(token) = bearer.or(apikey) else {
        return Err((StatusCode::UNAUTHORIZED, "Unauthorized"));
    };
    s.app.jwt.verify(token, now_unix()).map_err(|e| {
        tracing::debug!(error = %e, "refusing a REST broadcast");
        (StatusCode::UNAUTHORIZED, "Unauthorized")
    })
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

/// Take `n` messages from the REST rate window, or the 429 to answer.
fn rate(s: &HttpState, n: usize) -> Result<(), Refusal> {
    let limit = u64::from(s.app.limits.broadcast.rest_messages_per_second);
    if n as u64 > limit {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            "Too many messages to broadcast, please reduce the batch size",
        ));
    }
    if !s.app.rest_rate.try_take(n as u64, limit) {
        return Err((
            StatusCode::TOO_MANY_REQUESTS,
            "You have exceeded your rate limit",
        ));
    }
    Ok(())
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

async fn batch(State(s): State<HttpState>, headers: HeaderMap, body: Bytes) -> Response {
    let claims = match authenticate(&s, &headers) {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    if content_type(&headers).is_some_and(|ct| ct != "application/json") {
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
    if let Err(r) = rate(&s, batch.messages.len()) {
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
        let stats = s
            .app
            .topics
            .publish(&TopicKey::new(topic, m.private), &Body::Map(map), None);
        crate::metrics::broadcast("http", stats.delivered);
    }
    accepted()
}

async fn single(
    State(s): State<HttpState>,
    Path((topic, event)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let claims = match authenticate(&s, &headers) {
        Ok(c) => c,
        Err(r) => return refuse(r),
    };
    let encoding = match content_type(&headers).as_deref() {
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
    if let Err(r) = rate(&s, 1) {
        return refuse(r);
    }
    let private = query
        .get("private")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let topic = topic.strip_prefix("realtime:").unwrap_or(&topic);
    if private && !can_write(&s.app, &claims, topic, Extension::Broadcast).await {
        return message(StatusCode::FORBIDDEN, "Unauthorized");
    }
    let body = Body::User(UserBroadcast {
        event,
        encoding,
        meta: None,
        payload: body,
    });
    let stats = s
        .app
        .topics
        .publish(&TopicKey::new(topic, private), &body, None);
    crate::metrics::broadcast("http", stats.delivered);
    accepted()
}
