//! Who may see what: row-level security and privileges for postgres_changes ([`rls`]), the
//! `realtime.messages` policies that guard private channels ([`private`]), and which token
//! roles clients may use at all ([`roles`]).

pub mod private;
pub mod rls;
pub mod roles;
pub mod shape;
