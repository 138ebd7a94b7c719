//! JSON objects only where a request body holds a struct. serde's derived `Deserialize` of
//! a struct also takes a JSON array and fills the fields in order, so `[3, 60]` created a
//! queue with 3 partitions and a 60 s ack timeout, and `["fanout"]` an exchange. [`Object`]
//! (and [`deserialize_each`] for a list field) reads a struct from a JSON object and
//! refuses anything else ("expected a JSON object"), at no extra cost: the fields are read
//! by the same deserializer as before, so a `RawValue` field keeps its exact text.
//!
//! Only for JSON bodies: the same structs may also travel in a format without field names
//! (Raft entries), where a struct is a sequence.

use std::fmt;
use std::marker::PhantomData;

use axum::http::StatusCode;
use serde::de::value::MapAccessDeserializer;
use serde::de::{Deserialize, DeserializeOwned, Deserializer, MapAccess, Visitor};

use super::error::ApiError;

/// A request body that must be a JSON object, as `T`; else 400 `invalid_json`.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice::<Object<T>>(body)
        .map(|o| o.0)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", e.to_string()))
}

/// A `T` that was given as a JSON object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object<T>(pub T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserialize(deserializer).map(Object)
    }
}

/// Reads a `T` from a JSON object only (for `#[serde(deserialize_with = ...)]`).
pub fn deserialize<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    deserializer.deserialize_map(ObjectVisitor(PhantomData))
}

/// Reads each element of a list as [`deserialize`] does (for `#[serde(deserialize_with)]`).
pub fn deserialize_each<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    let objects: Vec<Object<T>> = Vec::deserialize(deserializer)?;
    Ok(objects.into_iter().map(|o| o.0).collect())
}

struct ObjectVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(MapAccessDeserializer::new(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Pair {
        a: u32,
        #[serde(default)]
        b: Option<Box<serde_json::value::RawValue>>,
    }

    /// An object is read as the derive reads it (unknown fields refused, raw values kept
    /// byte for byte); an array, which the derive alone would take field by field, and
    /// any other JSON value are refused.
    #[test]
    fn only_objects_become_structs() {
        let Object(pair) =
            serde_json::from_str::<Object<Pair>>(r#"{"a":1,"b": {"x" : 1}}"#).expect("an object");
        assert_eq!(pair.a, 1);
        assert_eq!(
            pair.b.map(|b| b.get().to_string()).as_deref(),
            Some(r#"{"x" : 1}"#)
        );
        assert!(
            serde_json::from_str::<Pair>("[1]").is_ok(),
            "the derive takes arrays"
        );
        for bad in ["[1]", "[]", "1", "\"a\"", "null", r#"{"a":1,"c":2}"#] {
            let refused = serde_json::from_str::<Object<Pair>>(bad);
            assert!(refused.is_err(), "{bad} was read as {refused:?}");
        }
        let err = serde_json::from_str::<Object<Pair>>("[1]").unwrap_err();
        assert!(err.to_string().contains("expected a JSON object"), "{err}");
    }
}
