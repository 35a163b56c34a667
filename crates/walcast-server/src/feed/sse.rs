//! Server-sent events: the body of a feed's `text/event-stream` response.
//!
//! ```text
//!  retry: 3000                                   once, first
//!  [event: snapshot / data: {row}]… event: snapshot_end / id: E     (snapshot=true)
//!  [event: change / id: <position> / data: {data object}]…          replayed, then live
//!  : keepalive                                   every 15 s without anything else
//!  event: system / data: {…}                     notices about the change stream
//! ```
//!
//! Invariants:
//! - The body is a stream polled by the connection itself (no task per feed): when the
//!   client goes, the body and with it the [`Feed`] are dropped, which unsubscribes it.
//! - Every `change` event carries its position as `id`, so `EventSource` resumes after the
//!   last one it received. The stream ends (and the client reconnects and resumes) when the
//!   feed's outbox overflowed, its binding was stopped, its token expired or the server
//!   shuts down.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use walcast_core::broadcast::{JoinOptions, Member, TopicKey};
use walcast_core::Position;
use walcast_protocol::Vsn;

use super::outbox::{FeedOutbox, Item, Overflowed};
use super::{admit, aligned, refuse, ChangeRequest, Event, Feed};
use crate::http::{ClientAddr, HttpState};
use crate::metrics;

/// Longest the stream stays silent: a comment line keeps proxies from closing it.
pub const KEEPALIVE: Duration = Duration::from_secs(15);
/// Reconnection delay suggested to `EventSource`, in milliseconds.
const RETRY_MS: u32 = 3000;

fn change_event(at: Position, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 60);
    out.extend_from_slice(b"event: change\nid: ");
    out.extend_from_slice(&at.to_array());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn named_event(event: &str, id: Option<Position>, data: &str) -> Bytes {
    let mut out = format!("event: {event}\n");
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    // JSON rendered by walcast has no raw line breaks; split anyway so no text can end the
    // field early.
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    Bytes::from(out)
}

/// What produces the events after the prelude.
enum Source {
    Changes {
        feed: Feed,
        /// The snapshot is still to be read and aligned.
        snapshot: bool,
    },
    Broadcast {
        guard: BroadcastGuard,
    },
}

struct Stream {
    source: Source,
    pending: VecDeque<Bytes>,
    done: bool,
    keepalive: std::pin::Pin<Box<tokio::time::Sleep>>,
    expires: tokio::time::Instant,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl Stream {
    fn outbox(&self) -> Arc<FeedOutbox> {
        match &self.source {
            Source::Changes { feed, .. } => feed.outbox.clone(),
            Source::Broadcast { guard } => guard.outbox.clone(),
        }
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(b) = self.pending.pop_front() {
                self.keepalive
                    .as_mut()
                    .reset(tokio::time::Instant::now() + KEEPALIVE);
                return Some(b);
            }
            if self.done {
                return None;
            }
            if let Source::Changes { feed, snapshot } = &mut self.source {
                if *snapshot {
                    *snapshot = false;
                    match aligned(feed).await {
                        Ok((snap, end)) => {
                            metrics::feed_events("snapshot", snap.rows.len() as u64);
                            for row in &snap.rows {
                                self.pending.push_back(named_event("snapshot", None, row));
                            }
                            self.pending.push_back(named_event(
                                "snapshot_end",
                                Some(end),
                                &serde_json::json!({ "position": end.to_string() }).to_string(),
                            ));
                        }
                        Err(resp) => {
                            let status = resp.status();
                            self.pending.push_back(named_event(
                                "error",
                                None,
                                &serde_json::json!({
                                    "error": format!("snapshot failed ({status})")
                                })
                                .to_string(),
                            ));
                            self.done = true;
                        }
                    }
                    continue;
                }
            }
            let outbox = self.outbox();
            tokio::select! {
                _ = outbox.ready() => self.drain(),
                _ = self.keepalive.as_mut() => {
                    self.pending.push_back(Bytes::from_static(b": keepalive\n\n"));
                }
                _ = tokio::time::sleep_until(self.expires) => {
                    self.pending.push_back(named_event("error", None, r#"{"error":"the token expired"}"#));
                    self.done = true;
                }
                _ = self.shutdown.changed() => self.done = true,
            }
        }
    }

    fn drain(&mut self) {
        let items = match self.outbox().take() {
            Ok(items) => items,
            Err(Overflowed) => {
                // Too far behind: end the stream; the client resumes from its last id.
                metrics::feed_overflowed();
                self.done = true;
                return;
            }
        };
        let mut changes = 0u64;
        let mut broadcasts = 0u64;
        for item in items {
            match (&self.source, item) {
                (Source::Changes { .. }, Item::Change { at, data, .. }) => {
                    changes += 1;
                    self.pending.push_back(change_event(at, &data));
                }
                (Source::Changes { .. }, Item::Other(payload)) => {
                    self.pending.push_back(named_event(
                        "system",
                        None,
                        &String::from_utf8_lossy(&payload),
                    ));
                }
                (
                    Source::Broadcast { .. },
                    Item::Other(frame) | Item::Change { data: frame, .. },
                ) => {
                    if let Some(data) = broadcast_data(&frame) {
                        broadcasts += 1;
                        self.pending
                            .push_back(named_event("broadcast", None, &data));
                    }
                }
            }
        }
        metrics::feed_events("change", changes);
        metrics::feed_events("broadcast", broadcasts);
        if let Source::Changes { feed, .. } = &self.source {
            if !feed.subscribed() {
                // The binding was stopped (its system error is queued above).
                self.done = true;
            }
        }
    }
}

/// `{"event", "payload"}` of a vsn 1.0.0 broadcast push.
fn broadcast_data(frame: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(frame).ok()?;
    if v.get("event")?.as_str()? != "broadcast" {
        return None;
    }
    let p = v.get("payload")?;
    Some(
        serde_json::json!({
            "event": p.get("event").cloned().unwrap_or(serde_json::Value::Null),
            "payload": p.get("payload").cloned().unwrap_or(serde_json::Value::Null),
        })
        .to_string(),
    )
}

fn respond(stream: Stream) -> Response {
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        s.next().await.map(|b| (Ok::<Bytes, Infallible>(b), s))
    });
    let mut resp = Response::new(Body::from_stream(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers responses unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

fn expiry(exp: i64) -> tokio::time::Instant {
    let left = exp.saturating_sub(crate::state::now_unix()).max(0) as u64;
    tokio::time::Instant::now() + Duration::from_secs(left)
}

fn prelude() -> VecDeque<Bytes> {
    VecDeque::from([Bytes::from(format!("retry: {RETRY_MS}\n\n"))])
}

/// The event stream of a change feed (already subscribed; `replay` goes first).
pub fn changes(
    feed: Feed,
    req: ChangeRequest,
    replay: Vec<Event>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Response {
    let mut pending = prelude();
    metrics::feed_events("change", replay.len() as u64);
    for (at, data) in &replay {
        pending.push_back(change_event(*at, data));
    }
    let expires = expiry(feed.caller.exp);
    respond(Stream {
        source: Source::Changes {
            feed,
            snapshot: req.snapshot,
        },
        pending,
        done: false,
        keepalive: Box::pin(tokio::time::sleep(KEEPALIVE)),
        expires,
        shutdown,
    })
}

/// A broadcast feed's topic membership, left when the stream ends.
struct BroadcastGuard {
    app: Arc<crate::state::AppState>,
    key: TopicKey,
    id: u64,
    outbox: Arc<FeedOutbox>,
    _caller: super::Caller,
}

impl Drop for BroadcastGuard {
    fn drop(&mut self) {
        self.app.topics.leave(&self.key, self.id);
        self.outbox.close();
        metrics::feed_closed("broadcast");
    }
}

/// `GET /api/broadcast?topic=T[&private=true]` with `Accept: text/event-stream`.
pub async fn broadcast(
    State(s): State<HttpState>,
    ClientAddr(addr): ClientAddr,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    if !super::wants_sse(&headers) {
        return refuse(
            StatusCode::NOT_ACCEPTABLE,
            "bad_request",
            "GET /api/broadcast is a server-sent event stream: send Accept: text/event-stream (POST sends messages)",
        );
    }
    let Some(name) = params.get("topic").filter(|t| !t.is_empty()).cloned() else {
        return refuse(StatusCode::BAD_REQUEST, "bad_request", "topic is required");
    };
    let private = match super::flag(&params, "private") {
        Ok(p) => p,
        Err(resp) => return resp,
    };
    let app = &s.app;
    if !private && app.limits.private_only {
        return refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            "PrivateOnly: This project only allows private channels",
        );
    }
    let caller = match admit(&s, addr, &headers, &params).await {
        Ok(c) => c,
        Err(resp) => return resp,
    };
    if private {
        use crate::authz::private::read_perms;
        match read_perms(app, &caller.identity, &name, false).await {
            Ok(p) if p.broadcast_read => {}
            Ok(_) | Err(crate::authz::rls::AuthzError::Failed { .. }) => {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "forbidden",
                    &crate::authz::private::unauthorized_read(&name),
                )
            }
            Err(crate::authz::rls::AuthzError::Unavailable(_)) => {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    crate::realtime::authorize::DB_UNAVAILABLE,
                )
            }
        }
    }
    let key = TopicKey::new(&name, private);
    let outbox = Arc::new(FeedOutbox::new(
        app.limits.socket_send_queue_bytes,
        Position::ZERO,
    ));
    let id = app.next_subscriber_id();
    let member = Member {
        outbox: outbox.clone(),
        vsn: Vsn::V1,
        broadcast: true,
        presence: false,
        replayed: None,
    };
    let max =
        (app.limits.max_members_per_channel > 0).then_some(app.limits.max_members_per_channel);
    let opts = JoinOptions {
        max_members: max,
        ..JoinOptions::default()
    };
    if app.topics.join(&key, id, member, opts, || ()).is_err() {
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "member_limit",
            "Too many members in this channel",
        );
    }
    metrics::feed_opened("broadcast");
    let expires = expiry(caller.exp);
    respond(Stream {
        source: Source::Broadcast {
            guard: BroadcastGuard {
                app: app.clone(),
                key,
                id,
                outbox,
                _caller: caller,
            },
        },
        pending: prelude(),
        done: false,
        keepalive: Box::pin(tokio::time::sleep(KEEPALIVE)),
        expires,
        shutdown: s.shutdown.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use walcast_pgoutput::Lsn;

    #[test]
    fn events_are_framed_for_event_source() {
        let e = change_event(Position::new(Lsn(0x10), 2), br#"{"a":1}"#);
        assert_eq!(
            &e[..],
            b"event: change\nid: 000000000000001000000002\ndata: {\"a\":1}\n\n"
        );
        let e = named_event("snapshot_end", Some(Position::ZERO), "x\ny");
        assert_eq!(
            &e[..],
            b"event: snapshot_end\nid: 000000000000000000000000\ndata: x\ndata: y\n\n"
        );
        let b = broadcast_data(
            br#"{"topic":"realtime:t","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":{"x":1}},"ref":null}"#,
        );
        assert_eq!(b.as_deref(), Some(r#"{"event":"e","payload":{"x":1}}"#));
    }
}
