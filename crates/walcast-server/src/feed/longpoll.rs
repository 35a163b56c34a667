//! Long-poll: one JSON answer per request, for clients that cannot hold a stream open.
//!
//! ```text
//!  ?offset=P          {"position": last, "changes": [{"position", …data}…]}  at once when
//!                     changes after P exist, else after up to `timeout_ms` / 20 s (live=true)
//!  ?snapshot=true     {"position": E, "rows": [record…]}   aligned like the SSE snapshot
//!  neither            {"position": now, "changes": []}     a place to start from
//! ```
//!
//! Invariant: the `position` answered is where the next request continues (pass it as
//! `offset`): nothing after it was left out of this answer, nothing up to it is repeated.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use walcast_core::Position;

use super::outbox::Item;
use super::{aligned, refuse, ChangeRequest, Event, Feed};
use crate::metrics;

fn json(body: String) -> Response {
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// `{"position":"…",` followed by the rest of the data object.
fn entry(at: Position, data: &Bytes, out: &mut String) {
    out.push_str("{\"position\":\"");
    out.push_str(&at.to_string());
    out.push('"');
    let text = String::from_utf8_lossy(data);
    match text.strip_prefix('{') {
        Some(rest) if rest.trim_start() != "}" => {
            out.push(',');
            out.push_str(rest);
        }
        _ => out.push('}'),
    }
}

fn changes_answer(position: Position, events: &[Event]) -> Response {
    let mut out = format!("{{\"position\":\"{position}\",\"changes\":[");
    for (i, (at, data)) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        entry(*at, data, &mut out);
    }
    out.push_str("]}");
    metrics::feed_events("change", events.len() as u64);
    json(out)
}

/// Answer a long-poll on an open feed (`replay`: the changes after the offset up to the
/// feed's floor).
pub async fn answer(
    feed: Feed,
    req: ChangeRequest,
    replay: Vec<Event>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Response {
    if req.snapshot {
        return match aligned(&feed).await {
            Ok((snap, end)) => {
                metrics::feed_events("snapshot", snap.rows.len() as u64);
                let body = format!(
                    "{{\"position\":\"{end}\",\"rows\":[{}]}}",
                    snap.records.join(",")
                );
                json(body)
            }
            Err(resp) => resp,
        };
    }
    let Some(offset) = req.resume else {
        return changes_answer(feed.floor, &[]);
    };
    if let Some((last, _)) = replay.last() {
        return changes_answer(*last, &replay);
    }
    let deadline = tokio::time::Instant::now() + req.wait;
    let mut events: Vec<Event> = Vec::new();
    loop {
        match feed.outbox.take() {
            Ok(items) => {
                for item in items {
                    if let Item::Change { at, data, .. } = item {
                        events.push((at, data));
                    }
                }
            }
            Err(_) => {
                // More arrived than the outbox holds: what was queued is gone, so answer
                // nothing new; the client asks again from the same offset (history).
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "overflow",
                    "too many changes at once; ask again from the same offset",
                );
            }
        }
        if let Some((last, _)) = events.last() {
            return changes_answer(*last, &events);
        }
        if !feed.subscribed() {
            return refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the subscription was stopped: its token may no longer read these changes",
            );
        }
        tokio::select! {
            _ = feed.outbox.ready() => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = shutdown.changed() => break,
        }
    }
    // Nothing after the offset up to the floor (replayed) nor since: continue from the
    // later of the two.
    changes_answer(offset.max(feed.floor), &[])
}
