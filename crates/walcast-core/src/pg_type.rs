//! Type catalog: what each column type OID means for JSON rendering.
//!
//! pgoutput describes a column only by its type OID (Relation message, §3.3 of the
//! replication reference). For built-in types (OID < 10000) that is enough: the catalog is
//! fixed and [`TypeRegistry::new`] knows all of it through `postgres-types`. User types
//! (enums, domains, composites, arrays of those, extension types) get a Type message with
//! nothing but namespace and name, so their shape has to be looked up in `pg_type` on an
//! ordinary SQL connection:
//!
//! ```text
//! Relation(col type OIDs) ──▶ registry.unresolved(oids) ──▶ [oid, …]
//!                                                            │ RESOLVE_TYPES_SQL ($1::oid[])
//!                                   registry.ingest(TypeRow) ◀┘ one row per type, dependencies included
//! ```
//!
//! The lookup is recursive in SQL (element, base and field types of the requested types come
//! back in the same round trip), and `unresolved` is recursive over what is already known, so
//! calling `unresolved` again after ingesting yields an empty list; a caller that loops until
//! it does is correct even when a type changes between the two steps.
//!
//! Invariants:
//! - A built-in entry is never replaced by [`TypeRegistry::ingest`]: the built-in mapping
//!   carries `to_jsonb`'s own categories (number, bool, date...), which `pg_type` columns
//!   alone cannot express. [`TypeRegistry::insert`] replaces anything, on purpose.
//! - `oid` (26) and the other OID-like integer types are [`TypeKind::Text`], not
//!   [`TypeKind::Int`]: `to_jsonb(26::oid)` is the string `"26"` (Postgres only treats
//!   int2/int4/int8/float4/float8/numeric as JSON numbers).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use postgres_types::{Kind, Type};

/// A Postgres object identifier (`pg_type.oid`).
pub type Oid = u32;

/// OIDs below this belong to the built-in catalog (`FirstGenbkiObjectId`); pgoutput sends a
/// Type message for every column type at or above it.
pub const FIRST_USER_OID: Oid = 10_000;

/// How a type's text output turns into JSON. Mirrors the categories of Postgres's
/// `json_categorize_type`, plus the structured kinds whose text must be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TypeKind {
    /// `bool`: `t`/`f` → `true`/`false`.
    Bool,
    /// `int2`, `int4`, `int8`: JSON number, digits verbatim.
    Int,
    /// `numeric`: JSON number with its exact text (scale kept); NaN/±Infinity as strings.
    Numeric,
    /// `float4`, `float8`: JSON number written the way jsonb's numeric prints it (no
    /// exponent, no negative zero); NaN/±Infinity as strings.
    Float,
    /// `json`: embedded verbatim (whitespace and duplicate keys kept) after validation.
    Json,
    /// `jsonb`: embedded after validation.
    Jsonb,
    /// `bytea`: its `\x…` hex text as a string.
    Bytea,
    /// `date`: ISO text as a string.
    Date,
    /// `timestamp`: ISO 8601 with `T`.
    Timestamp,
    /// `timestamptz`: ISO 8601 with `T` and a `±HH:MM` offset.
    Timestamptz,
    /// Everything whose `to_jsonb` is its text output as a JSON string.
    Text,
    /// A user enum: the label as a string.
    Enum,
    /// A domain: converted as its base type.
    Domain { base: Oid },
    /// A composite type: a JSON object of its (non-dropped) attributes, in attnum order.
    Composite { fields: Vec<(String, Oid)> },
    /// An array type: a JSON array (nested for multi-dimensional values). `delimiter` is the
    /// element type's `typdelim` (`;` for `box`, `,` for everything else built in).
    Array { element: Oid, delimiter: u8 },
    /// A range or multirange: its text as a string (`subtype` kept for callers that care).
    Range { subtype: Oid },
    /// A pseudo-type or a type we could not classify: rendered as a string.
    Unknown,
}

/// One entry of the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeInfo {
    pub oid: Oid,
    /// `pg_type.typname`, e.g. `int4`, `_int4`, `timestamptz`, or a user enum's `mood`.
    pub name: String,
    pub kind: TypeKind,
}

/// A `pg_type` row as returned by [`RESOLVE_TYPES_SQL`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeRow {
    pub oid: Oid,
    pub name: String,
    /// `typtype`: `b` base, `c` composite, `d` domain, `e` enum, `m` multirange,
    /// `p` pseudo, `r` range.
    pub typtype: u8,
    /// `typcategory`: `A` marks an array type (with `element` set).
    pub category: u8,
    /// `typelem`, 0 when none.
    pub element: Oid,
    /// The delimiter used between elements of this array type's values (the element type's
    /// `typdelim`), or the type's own `typdelim` for non-arrays.
    pub delimiter: u8,
    /// `typbasetype` (domains), 0 when none.
    pub base: Oid,
    /// `pg_range.rngsubtype` for ranges and multiranges.
    pub range_subtype: Option<Oid>,
    /// Composite attributes in attnum order, dropped ones excluded.
    pub fields: Vec<(String, Oid)>,
}

/// Resolves user types. Bind one parameter, an `oid[]` of the types wanted; the result has
/// one row per wanted type *and* per user type they depend on (array elements, domain bases,
/// composite fields, recursively), so one round trip normally resolves everything.
///
/// Columns, in order, with the Rust type `tokio-postgres` reads them as:
///
/// | # | column | SQL type | Rust | [`TypeRow`] field |
/// |---|---|---|---|---|
/// | 0 | `oid` | oid | `u32` | `oid` |
/// | 1 | `typname` | text | `String` | `name` |
/// | 2 | `typtype` | "char" | `i8` (as `u8`) | `typtype` |
/// | 3 | `typcategory` | "char" | `i8` (as `u8`) | `category` |
/// | 4 | `typelem` | oid | `u32` | `element` |
/// | 5 | `typdelim` | "char" | `i8` (as `u8`) | `delimiter` |
/// | 6 | `typbasetype` | oid | `u32` | `base` |
/// | 7 | `typrelid` | oid | `u32` | (composites only, informational) |
/// | 8 | `rngsubtype` | oid, nullable | `Option<u32>` | `range_subtype` |
/// | 9 | `field_names` | text[] | `Vec<String>` | `fields` (zip with 10) |
/// | 10 | `field_types` | oid[] | `Vec<u32>` | `fields` |
///
/// OIDs that do not exist (a type dropped meanwhile) are simply absent from the result.
pub const RESOLVE_TYPES_SQL: &str = "\
WITH RECURSIVE wanted(oid) AS (
    SELECT w.oid FROM pg_catalog.unnest($1::pg_catalog.oid[]) AS w(oid)
  UNION
    SELECT dep.oid
    FROM wanted
    JOIN pg_catalog.pg_type t ON t.oid = wanted.oid
    CROSS JOIN LATERAL (
        SELECT t.typelem WHERE t.typcategory = 'A'
      UNION ALL
        SELECT t.typbasetype WHERE t.typtype = 'd'
      UNION ALL
        SELECT a.atttypid
        FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
    ) AS dep(oid)
    WHERE dep.oid >= 10000
)
SELECT
    t.oid,
    t.typname::pg_catalog.text AS typname,
    t.typtype,
    t.typcategory,
    t.typelem,
    COALESCE(e.typdelim, t.typdelim) AS typdelim,
    t.typbasetype,
    t.typrelid,
    r.rngsubtype,
    ARRAY(
        SELECT a.attname::pg_catalog.text
        FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
    ) AS field_names,
    ARRAY(
        SELECT a.atttypid
        FROM pg_catalog.pg_attribute a
        WHERE t.typtype = 'c' AND a.attrelid = t.typrelid AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY a.attnum
    ) AS field_types
FROM (SELECT DISTINCT wanted.oid FROM wanted) AS w
JOIN pg_catalog.pg_type t ON t.oid = w.oid
LEFT JOIN pg_catalog.pg_type e ON t.typcategory = 'A' AND e.oid = t.typelem
LEFT JOIN pg_catalog.pg_range r ON r.rngtypid = t.oid OR r.rngmultitypid = t.oid
ORDER BY t.oid";

/// Lookups run for every column of every change; OIDs are small, well-spread integers, so a
/// multiplicative hash beats SipHash and needs no HashDoS resistance (keys come from the
/// catalog, not from clients).
#[derive(Default)]
struct OidHasher(u64);

impl Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = (u64::from(n) ^ self.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type OidMap<V> = HashMap<Oid, V, BuildHasherDefault<OidHasher>>;

/// Type OID → [`TypeInfo`]: every built-in type from the start, user types as they are
/// resolved.
#[derive(Debug, Clone)]
pub struct TypeRegistry {
    types: OidMap<TypeInfo>,
}

impl Default for TypeRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl TypeRegistry {
    /// A registry that knows every built-in type `postgres-types` knows.
    pub fn new() -> Self {
        let mut types = OidMap::default();
        for oid in 0..FIRST_USER_OID {
            if let Some(ty) = Type::from_oid(oid) {
                types.insert(
                    oid,
                    TypeInfo {
                        oid,
                        name: ty.name().to_owned(),
                        kind: builtin_kind(&ty),
                    },
                );
            }
        }
        Self { types }
    }

    pub fn get(&self, oid: Oid) -> Option<&TypeInfo> {
        self.types.get(&oid)
    }

    /// Adds or replaces an entry (user types resolved elsewhere, or tests).
    pub fn insert(&mut self, info: TypeInfo) {
        self.types.insert(info.oid, info);
    }

    /// Adds a type from a [`RESOLVE_TYPES_SQL`] row. Rows for built-in types already known
    /// are ignored (see the module invariants).
    pub fn ingest(&mut self, row: TypeRow) {
        if row.oid < FIRST_USER_OID && self.types.contains_key(&row.oid) {
            return;
        }
        let kind = match row.typtype {
            // Arrays are base types in pg_type; typcategory 'A' with an element tells them
            // apart from base types that merely support subscripting (point, name).
            b'b' if row.category == b'A' && row.element != 0 => TypeKind::Array {
                element: row.element,
                delimiter: row.delimiter,
            },
            // User base types (citext, hstore, geometry, ...) render as their text; see the
            // value module for the parity caveat about types with a cast to json.
            b'b' => TypeKind::Text,
            b'c' => TypeKind::Composite { fields: row.fields },
            b'd' if row.base != 0 => TypeKind::Domain { base: row.base },
            b'e' => TypeKind::Enum,
            b'r' | b'm' => TypeKind::Range {
                subtype: row.range_subtype.unwrap_or(0),
            },
            _ => TypeKind::Unknown,
        };
        self.types.insert(
            row.oid,
            TypeInfo {
                oid: row.oid,
                name: row.name,
                kind,
            },
        );
    }

    /// The OIDs among `oids`, and among the element/base/field types of those already known
    /// (recursively), that are not in the registry yet: what to pass to
    /// [`RESOLVE_TYPES_SQL`]. Each OID appears once, in discovery order.
    pub fn unresolved(&self, oids: impl IntoIterator<Item = Oid>) -> Vec<Oid> {
        let mut missing = Vec::new();
        let mut seen: OidMap<()> = OidMap::default();
        let mut stack: Vec<Oid> = oids.into_iter().collect();
        stack.reverse();
        while let Some(oid) = stack.pop() {
            // OID 0 is "no type" (e.g. an unset typelem), never something to look up.
            if oid == 0 || seen.insert(oid, ()).is_some() {
                continue;
            }
            let Some(info) = self.types.get(&oid) else {
                missing.push(oid);
                continue;
            };
            // Pushed in reverse so dependencies are visited in declaration order.
            match &info.kind {
                TypeKind::Domain { base } => stack.push(*base),
                TypeKind::Array { element, .. } => stack.push(*element),
                TypeKind::Composite { fields } => {
                    stack.extend(fields.iter().rev().map(|(_, oid)| *oid));
                }
                _ => {}
            }
        }
        missing
    }

    /// Number of known types.
    pub fn len(&self) -> usize {
        self.types.len()
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }
}

fn builtin_kind(ty: &Type) -> TypeKind {
    match ty.kind() {
        Kind::Array(element) => TypeKind::Array {
            element: element.oid(),
            // array_out uses the element type's typdelim; box is the only built-in whose
            // delimiter is not ',' (its text contains commas).
            delimiter: if *element == Type::BOX { b';' } else { b',' },
        },
        Kind::Range(subtype) | Kind::Multirange(subtype) => TypeKind::Range {
            subtype: subtype.oid(),
        },
        Kind::Domain(base) => TypeKind::Domain { base: base.oid() },
        Kind::Composite(fields) => TypeKind::Composite {
            fields: fields
                .iter()
                .map(|f| (f.name().to_owned(), f.type_().oid()))
                .collect(),
        },
        Kind::Enum(_) => TypeKind::Enum,
        Kind::Pseudo => TypeKind::Unknown,
        // Kind is non_exhaustive; Simple and anything newer fall through to the name-based
        // categories below.
        _ => match *ty {
            Type::BOOL => TypeKind::Bool,
            Type::INT2 | Type::INT4 | Type::INT8 => TypeKind::Int,
            Type::NUMERIC => TypeKind::Numeric,
            Type::FLOAT4 | Type::FLOAT8 => TypeKind::Float,
            Type::JSON => TypeKind::Json,
            Type::JSONB => TypeKind::Jsonb,
            Type::BYTEA => TypeKind::Bytea,
            Type::DATE => TypeKind::Date,
            Type::TIMESTAMP => TypeKind::Timestamp,
            Type::TIMESTAMPTZ => TypeKind::Timestamptz,
            _ => TypeKind::Text,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(reg: &TypeRegistry, oid: Oid) -> &TypeKind {
        &reg.get(oid).expect("built-in type is known").kind
    }

    #[test]
    fn builtins_have_to_jsonb_categories() {
        let reg = TypeRegistry::new();
        assert!(reg.len() > 150, "only {} built-ins", reg.len());
        assert_eq!(kind(&reg, 16), &TypeKind::Bool);
        for oid in [20, 21, 23] {
            assert_eq!(kind(&reg, oid), &TypeKind::Int, "oid {oid}");
        }
        // to_jsonb(26::oid) is "26": oid is not a JSON number.
        assert_eq!(kind(&reg, 26), &TypeKind::Text);
        assert_eq!(kind(&reg, 1700), &TypeKind::Numeric);
        assert_eq!(kind(&reg, 700), &TypeKind::Float);
        assert_eq!(kind(&reg, 701), &TypeKind::Float);
        assert_eq!(kind(&reg, 114), &TypeKind::Json);
        assert_eq!(kind(&reg, 3802), &TypeKind::Jsonb);
        assert_eq!(kind(&reg, 17), &TypeKind::Bytea);
        assert_eq!(kind(&reg, 1082), &TypeKind::Date);
        assert_eq!(kind(&reg, 1114), &TypeKind::Timestamp);
        assert_eq!(kind(&reg, 1184), &TypeKind::Timestamptz);
        for oid in [
            25, 1043, 1042, 19, 18, 2950, 1083, 1266, 1186, 790, 869, 650, 600,
        ] {
            assert_eq!(kind(&reg, oid), &TypeKind::Text, "oid {oid}");
        }
        assert_eq!(kind(&reg, 3904), &TypeKind::Range { subtype: 23 });
        assert_eq!(
            kind(&reg, 2249),
            &TypeKind::Unknown,
            "record is a pseudo-type"
        );
    }

    #[test]
    fn builtin_names_are_typnames() {
        let reg = TypeRegistry::new();
        assert_eq!(reg.get(23).map(|t| t.name.as_str()), Some("int4"));
        assert_eq!(reg.get(1007).map(|t| t.name.as_str()), Some("_int4"));
        assert_eq!(reg.get(1184).map(|t| t.name.as_str()), Some("timestamptz"));
        assert_eq!(reg.get(18).map(|t| t.name.as_str()), Some("char"));
    }

    #[test]
    fn builtin_arrays_and_box_delimiter() {
        let reg = TypeRegistry::new();
        assert_eq!(
            kind(&reg, 1007),
            &TypeKind::Array {
                element: 23,
                delimiter: b','
            }
        );
        assert_eq!(
            kind(&reg, 3807),
            &TypeKind::Array {
                element: 3802,
                delimiter: b','
            }
        );
        assert_eq!(
            kind(&reg, 1020),
            &TypeKind::Array {
                element: 603,
                delimiter: b';'
            }
        );
        // The box type itself is not an array even though it has a typelem.
        assert_eq!(kind(&reg, 603), &TypeKind::Text);
    }

    #[test]
    fn user_oids_are_unknown_until_resolved() {
        let reg = TypeRegistry::new();
        assert!(reg.get(16_385).is_none());
        assert_eq!(reg.unresolved([23, 16_385, 0, 16_385, 25]), vec![16_385]);
    }

    fn row(oid: Oid, name: &str, typtype: u8) -> TypeRow {
        TypeRow {
            oid,
            name: name.to_owned(),
            typtype,
            category: b'U',
            element: 0,
            delimiter: b',',
            base: 0,
            range_subtype: None,
            fields: Vec::new(),
        }
    }

    #[test]
    fn ingest_maps_typtype() {
        let mut reg = TypeRegistry::new();
        reg.ingest(row(20_000, "mood", b'e'));
        reg.ingest(TypeRow {
            base: 23,
            ..row(20_001, "posint", b'd')
        });
        reg.ingest(TypeRow {
            fields: vec![("a".into(), 23), ("m".into(), 20_000)],
            ..row(20_002, "pair", b'c')
        });
        reg.ingest(TypeRow {
            category: b'A',
            element: 20_002,
            ..row(20_003, "_pair", b'b')
        });
        reg.ingest(TypeRow {
            range_subtype: Some(1700),
            ..row(20_004, "numr", b'r')
        });
        reg.ingest(TypeRow {
            range_subtype: Some(1700),
            ..row(20_005, "nummr", b'm')
        });
        reg.ingest(row(20_006, "citext", b'b'));
        reg.ingest(row(20_007, "weird", b'p'));
        reg.ingest(TypeRow {
            delimiter: b'|',
            category: b'A',
            element: 20_006,
            ..row(20_008, "_citext", b'b')
        });

        assert_eq!(kind(&reg, 20_000), &TypeKind::Enum);
        assert_eq!(kind(&reg, 20_001), &TypeKind::Domain { base: 23 });
        assert_eq!(
            kind(&reg, 20_002),
            &TypeKind::Composite {
                fields: vec![("a".into(), 23), ("m".into(), 20_000)]
            }
        );
        assert_eq!(
            kind(&reg, 20_003),
            &TypeKind::Array {
                element: 20_002,
                delimiter: b','
            }
        );
        assert_eq!(kind(&reg, 20_004), &TypeKind::Range { subtype: 1700 });
        assert_eq!(kind(&reg, 20_005), &TypeKind::Range { subtype: 1700 });
        assert_eq!(kind(&reg, 20_006), &TypeKind::Text);
        assert_eq!(kind(&reg, 20_007), &TypeKind::Unknown);
        assert_eq!(
            kind(&reg, 20_008),
            &TypeKind::Array {
                element: 20_006,
                delimiter: b'|'
            }
        );
        assert_eq!(reg.get(20_000).map(|t| t.name.as_str()), Some("mood"));
    }

    #[test]
    fn ingest_never_downgrades_builtins() {
        let mut reg = TypeRegistry::new();
        reg.ingest(row(23, "int4", b'b'));
        assert_eq!(kind(&reg, 23), &TypeKind::Int);
        // insert is the explicit override.
        reg.insert(TypeInfo {
            oid: 23,
            name: "int4".into(),
            kind: TypeKind::Text,
        });
        assert_eq!(kind(&reg, 23), &TypeKind::Text);
    }

    #[test]
    fn unresolved_follows_known_dependencies() {
        let mut reg = TypeRegistry::new();
        // _pair → pair → (int4, mood, _tag); mood and _tag unknown; domain → unknown base.
        reg.ingest(TypeRow {
            category: b'A',
            element: 30_001,
            ..row(30_000, "_pair", b'b')
        });
        reg.ingest(TypeRow {
            fields: vec![("a".into(), 23), ("m".into(), 30_002), ("t".into(), 30_003)],
            ..row(30_001, "pair", b'c')
        });
        reg.ingest(TypeRow {
            base: 30_004,
            ..row(30_005, "dom", b'd')
        });
        assert_eq!(
            reg.unresolved([30_000, 30_005, 30_002]),
            vec![30_002, 30_003, 30_004]
        );
        reg.ingest(row(30_002, "mood", b'e'));
        reg.ingest(row(30_003, "_tag", b'b'));
        reg.ingest(row(30_004, "base", b'b'));
        assert!(reg.unresolved([30_000, 30_005]).is_empty());
    }

    #[test]
    fn unresolved_survives_cycles() {
        let mut reg = TypeRegistry::new();
        reg.insert(TypeInfo {
            oid: 40_000,
            name: "a".into(),
            kind: TypeKind::Domain { base: 40_001 },
        });
        reg.insert(TypeInfo {
            oid: 40_001,
            name: "b".into(),
            kind: TypeKind::Composite {
                fields: vec![("x".into(), 40_000), ("y".into(), 40_002)],
            },
        });
        assert_eq!(reg.unresolved([40_000]), vec![40_002]);
    }
}
