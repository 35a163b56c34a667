//! The realtime side of a WebSocket: one task per connection ([`socket`]) with its bounded
//! send queue ([`outbox`]), postgres_changes join checks ([`changes`]), and broadcast and
//! presence rules ([`broadcast`]).

pub mod broadcast;
pub mod changes;
pub mod outbox;
pub mod socket;
