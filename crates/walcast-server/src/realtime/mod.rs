//! The realtime side of a WebSocket: the sans-I/O [`session`] (channels, joins, tokens,
//! limits) and its driver, one task per connection ([`socket`]) with its bounded send queue
//! ([`outbox`]); the database work a session asks for ([`authorize`], postgres_changes join
//! checks in [`changes`]); broadcast and presence rules ([`broadcast`]); rate limits
//! ([`limiter`]); stored broadcasts and their replay at join ([`stored`]).

pub mod authorize;
pub mod broadcast;
pub mod changes;
pub mod channel;
pub mod intake;
pub mod limiter;
pub mod outbox;
pub mod resume;
pub mod session;
pub mod session_store;
pub mod socket;
pub mod stored;
