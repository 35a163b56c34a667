//! Who may see what: row-level security and privileges for postgres_changes ([`rls`]), and
//! the `realtime.messages` policies that guard private channels ([`private`]).

pub mod private;
pub mod rls;
