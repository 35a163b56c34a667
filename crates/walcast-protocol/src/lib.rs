//! Sans-IO Phoenix/Supabase Realtime frames (vsn 1.0.0 and 2.0.0).
//!
//! This crate owns the wire format between walcast and the official Supabase Realtime
//! clients: serializer negotiation, decoding of client frames into typed messages, and
//! cheap writers for server frames. It does no I/O, knows nothing about Postgres, sockets
//! or async runtimes, and never panics on input: every decoder returns a [`FrameError`]
//! whose [`FrameError::action`] tells the server whether to close, reply or ignore.
//!
//! # Frame formats
//!
//! ```text
//! vsn 1.0.0 (default)  text only, JSON objects
//!   in   {"topic":"realtime:room1","event":"phx_join","payload":{..},"ref":"1","join_ref":"1"}
//!   out  {"topic":"realtime:room1","event":"phx_reply","payload":{..},"ref":"1"}   (never join_ref)
//!
//! vsn 2.0.0            text frames are JSON arrays, plus two binary kinds
//!   text [join_ref, ref, topic, event, payload]      e.g. [null,"26","phoenix","heartbeat",{}]
//!
//!   kind 3 (in)  | 3 | jr_len | ref_len | topic_len | event_len | meta_len | enc |
//!                  join_ref | ref | topic | event | meta | payload (rest of frame)
//!   kind 4 (out) | 4 | topic_len | event_len | meta_len | enc |
//!                  topic | event | meta | payload (rest of frame)
//!   lengths: one byte each; enc: 0 binary, 1 JSON; meta: JSON object or empty
//! ```
//!
//! # Flow
//!
//! ```text
//! ?vsn=… ──Vsn::from_query──▶ Vsn
//! text frame ──decode_text──┐
//! binary frame ─decode_binary┴─▶ InboundFrame { join_ref, msg_ref, topic, event, payload: Inbound }
//!
//! change / broadcast, serialized once ──outbound::* payload builders──▶ payload JSON
//!   ──encode_push(vsn, join_ref, ref, topic, event, payload)──▶ frame text per (vsn, channel)
//!   ──encode_user_broadcast_binary──▶ kind 4 bytes (vsn 2.0.0 broadcast subscribers)
//! ```
//!
//! # Example
//!
//! ```
//! use walcast_protocol::{decode_text, encode_push, outbound, Inbound, Vsn};
//!
//! let vsn = Vsn::from_query(Some("2.0.0")).unwrap();
//! let frame = decode_text(vsn, r#"[null,"26","phoenix","heartbeat",{}]"#).unwrap();
//! assert!(matches!(frame.payload, Inbound::Heartbeat));
//! let reply = encode_push(
//!     vsn,
//!     frame.join_ref.as_deref(),
//!     frame.msg_ref.as_deref(),
//!     &frame.topic,
//!     outbound::event::PHX_REPLY,
//!     outbound::REPLY_OK_EMPTY,
//! );
//! assert_eq!(reply, r#"[null,"26","phoenix","phx_reply",{"status":"ok","response":{}}]"#);
//! ```
//!
//! Invariants kept here:
//! - Join bindings (`config.postgres_changes`) keep their raw text and are echoed verbatim,
//!   in order, with an integer `id` ([`join_reply_ok`]).
//! - Broadcast maps are relayed as sent (raw JSON), never rebuilt.
//! - No binary frame other than kind 4 is ever produced, and none is accepted on vsn 1.0.0.

#![warn(missing_docs)]

mod binary;
mod broadcast;
mod error;
mod escape;
mod inbound;
mod join;
mod lenient;
pub mod outbound;
mod presence;
mod vsn;

pub use binary::{KIND_USER_BROADCAST, KIND_USER_BROADCAST_PUSH};
pub use broadcast::{BinaryBroadcast, BroadcastPush, JsonBroadcast, PayloadEncoding};
pub use error::{FrameAction, FrameError, FrameRefs};
pub use inbound::{
    decode_binary, decode_binary_bytes, decode_binary_bytes_within, decode_text,
    decode_text_within, Inbound, InboundFrame,
};
pub use join::{
    BroadcastConfig, JoinConfig, JoinPayload, PostgresBinding, PostgresChangesOptions,
    PresenceConfig, ReplayConfig,
};
pub use outbound::{encode_push, encode_user_broadcast_binary, join_reply_ok};
pub use presence::{PresencePush, TRACK_PAYLOAD_NOT_A_MAP};
pub use vsn::{Vsn, VsnError};

/// Largest accepted frame, text or binary, in bytes (the reference server's WebSocket limit).
pub const MAX_FRAME_LEN: usize = 5_000_000;
