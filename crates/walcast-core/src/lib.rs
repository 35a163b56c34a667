//! Change model, to_jsonb-compatible values, filters, subscription index and fan-out hub.

pub mod broadcast;
pub mod change;
pub mod filter;
pub mod hub;
pub mod payload;
pub mod pg_type;
pub mod position;
pub mod presence;
pub mod subscription;
pub mod value;

pub use pg_type::{Oid, TypeInfo, TypeKind, TypeRegistry, TypeRow, RESOLVE_TYPES_SQL};
pub use position::{Position, PositionError};
pub use value::{to_json_string, write_json, write_json_string, ValueError};
