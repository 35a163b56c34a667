//! Borrowed, lenient reading of JSON payload pieces.
//!
//! Payloads arrive as `&RawValue` slices of the frame text. Rather than building a full
//! `serde_json::Value` tree (which would also lose member order, and the server must echo
//! some objects verbatim), the decoders look at one object level at a time: the members
//! of an object as `(key, raw value)` pairs in wire order, and small typed readers that
//! report a mismatch instead of failing, so the join parser can fall back to defaults.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The members of one JSON object, in wire order, values left unparsed.
pub(crate) struct RawObject<'a> {
    members: Vec<(Cow<'a, str>, &'a RawValue)>,
}

impl<'a> RawObject<'a> {
    /// `None` when `raw` is not an object.
    pub(crate) fn parse(raw: &'a RawValue) -> Option<RawObject<'a>> {
        serde_json::from_str(raw.get()).ok()
    }

    /// The value of `key`; with duplicate keys the last one wins, as in Jason (the
    /// reference server's JSON parser), so both servers see the same value.
    pub(crate) fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.members
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }

    /// Like [`RawObject::get`], but JSON `null` counts as absent.
    pub(crate) fn get_non_null(&self, key: &str) -> Option<&'a RawValue> {
        self.get(key).filter(|v| !is_null(v))
    }

    pub(crate) fn members(&self) -> &[(Cow<'a, str>, &'a RawValue)] {
        &self.members
    }
}

impl<'de> Deserialize<'de> for RawObject<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = RawObject<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(16));
                while let Some(Key(k)) = map.next_key()? {
                    let v: &'de RawValue = map.next_value()?;
                    members.push((k, v));
                }
                Ok(RawObject { members })
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// An object key, borrowed from the frame unless it contained escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

pub(crate) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

pub(crate) fn is_object(raw: &RawValue) -> bool {
    raw.get().starts_with('{')
}

/// The JSON type of a raw value, for warnings (never the value itself: it may be a token).
pub(crate) fn kind(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// A JSON string; `Err` carries the actual JSON type.
pub(crate) fn string(raw: &RawValue) -> Result<String, &'static str> {
    serde_json::from_str(raw.get()).map_err(|_| kind(raw))
}

/// A JSON boolean, or the strings `"true"`/`"false"` in any case (Ecto's boolean cast).
pub(crate) fn boolish(raw: &RawValue) -> Result<bool, &'static str> {
    match raw.get() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => {
            let s: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| kind(raw))?;
            if s.eq_ignore_ascii_case("true") {
                Ok(true)
            } else if s.eq_ignore_ascii_case("false") {
                Ok(false)
            } else {
                Err("a string that is not a boolean")
            }
        }
    }
}

/// An integer, or a string of one (Ecto's integer cast accepts both).
pub(crate) fn integer(raw: &RawValue) -> Result<i64, &'static str> {
    if let Ok(n) = serde_json::from_str::<i64>(raw.get()) {
        return Ok(n);
    }
    let s: Cow<'_, str> = serde_json::from_str(raw.get()).map_err(|_| kind(raw))?;
    s.trim()
        .parse()
        .map_err(|_| "a string that is not an integer")
}

/// An array of raw values; `Err` carries the actual JSON type.
pub(crate) fn array(raw: &RawValue) -> Result<Vec<&RawValue>, &'static str> {
    serde_json::from_str(raw.get()).map_err(|_| kind(raw))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> &RawValue {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn object_members_keep_order_and_last_duplicate_wins() {
        let r = raw(r#"{"b":1,"a":{"x":[1]},"b":2,"\u0063":3}"#);
        let o = RawObject::parse(r).unwrap();
        let keys: Vec<&str> = o.members().iter().map(|(k, _)| k.as_ref()).collect();
        assert_eq!(keys, ["b", "a", "b", "c"]);
        assert_eq!(o.get("b").unwrap().get(), "2");
        assert_eq!(o.get("a").unwrap().get(), r#"{"x":[1]}"#);
        assert_eq!(o.get("c").unwrap().get(), "3");
        assert!(o.get("z").is_none());
        assert!(RawObject::parse(raw("[1]")).is_none());
        assert!(RawObject::parse(raw("null")).is_none());
    }

    #[test]
    fn typed_readers() {
        assert_eq!(boolish(raw("true")), Ok(true));
        assert_eq!(boolish(raw(r#""TRUE""#)), Ok(true));
        assert_eq!(boolish(raw(r#""False""#)), Ok(false));
        assert!(boolish(raw(r#""yes""#)).is_err());
        assert_eq!(boolish(raw("1")), Err("a number"));
        assert_eq!(integer(raw("1763407103911")), Ok(1_763_407_103_911));
        assert_eq!(integer(raw(r#""25""#)), Ok(25));
        assert!(integer(raw("1.5")).is_err());
        assert_eq!(string(raw(r#""a\"b""#)), Ok("a\"b".to_owned()));
        assert_eq!(string(raw("[]")), Err("an array"));
        assert_eq!(array(raw("[1, null]")).unwrap().len(), 2);
    }
}
