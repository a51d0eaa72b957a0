//! Strict JSON: a `serde_json::Value` read in one pass that notices an object with the same
//! key twice, at any depth. serde_json keeps the last of two equal keys without a word, and
//! another JSON reader (a proxy, a client's own check) may keep the first, so the two would
//! act on different requests; a client frame with a duplicate key is refused instead.
//!
//! The check rides along the parse that builds the value (one map insert that finds the key
//! taken), rather than a second pass over the text. Parsing goes on after a duplicate so the
//! frame's `id` can still be read for the error reply.

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Number, Value};
use std::fmt;

/// The first duplicate key found: the key, and the key of the value it sits in (an array's
/// key for an object inside an array), `None` at the top level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    pub key: String,
    pub parent: Option<String>,
}

impl fmt::Display for Duplicate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.parent {
            Some(parent) => write!(f, "duplicate key `{}` in `{parent}`", self.key),
            None => write!(f, "duplicate key `{}`", self.key),
        }
    }
}

/// Parses `text` as JSON; the value is complete even when a duplicate was found (the later
/// of two equal keys is dropped), so the caller can still read the frame's `id`.
pub(crate) fn parse(text: &str) -> Result<(Value, Option<Duplicate>), serde_json::Error> {
    let mut duplicate = None;
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Strict {
        duplicate: &mut duplicate,
        parent: None,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok((value, duplicate))
}

/// Builds one value; `parent` is the key this value was found under.
struct Strict<'a> {
    duplicate: &'a mut Option<Duplicate>,
    parent: Option<&'a str>,
}

impl<'de> DeserializeSeed<'de> for Strict<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text has no NaN or infinity; the fallback is never taken.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element_seed(Strict {
            duplicate: &mut *self.duplicate,
            parent: self.parent,
        })? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(Strict {
                duplicate: &mut *self.duplicate,
                parent: Some(&key),
            })?;
            match object.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(value);
                }
                Entry::Occupied(taken) => {
                    if self.duplicate.is_none() {
                        *self.duplicate = Some(Duplicate {
                            key: taken.key().clone(),
                            parent: self.parent.map(str::to_owned),
                        });
                    }
                }
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn duplicate(text: &str) -> Option<String> {
        parse(text).unwrap().1.map(|d| d.to_string())
    }

    #[test]
    fn test_strict_parse_builds_the_same_value_as_serde_json() {
        let text = r#"{"a":[1,-2,3.5,"s\u00e9",true,null,{"b":{}}],"c":{"d":[]},"e":18446744073709551615}"#;
        let (value, dup) = parse(text).unwrap();
        assert_eq!(value, serde_json::from_str::<Value>(text).unwrap());
        assert_eq!(dup, None);
        assert_eq!(parse("[]").unwrap().0, json!([]));
    }

    #[test]
    fn test_strict_parse_finds_duplicate_keys_at_any_depth() {
        assert_eq!(
            duplicate(r#"{"id":1,"id":2}"#).as_deref(),
            Some("duplicate key `id`")
        );
        assert_eq!(
            duplicate(r#"{"dataset":{"name":"a","name":"b"}}"#).as_deref(),
            Some("duplicate key `name` in `dataset`")
        );
        assert_eq!(
            duplicate(r#"{"patches":[{"key":"a"},{"key":"a","key":"b"}]}"#).as_deref(),
            Some("duplicate key `key` in `patches`")
        );
        // Equal after unescaping is equal.
        assert_eq!(
            duplicate(r#"{"x":{"y":[[{"k":1,"\u006b":2}]]}}"#).as_deref(),
            Some("duplicate key `k` in `y`")
        );
        // The same key in sibling objects is not a duplicate; neither is a key that differs
        // only in case.
        assert_eq!(duplicate(r#"{"a":{"k":1},"b":{"k":1},"K":1,"k":1}"#), None);
    }

    #[test]
    fn test_strict_parse_keeps_the_first_of_two_equal_keys_and_reads_on() {
        let (value, dup) = parse(r#"{"id":"first","x":1,"x":2,"id":"second"}"#).unwrap();
        assert_eq!(value, json!({"id": "first", "x": 1}));
        assert_eq!(dup.map(|d| d.key).as_deref(), Some("x"));
    }

    #[test]
    fn test_strict_parse_refuses_what_serde_json_refuses() {
        for text in ["{not json", "{\"a\":1} x", "", "[1,]", &"[".repeat(200)] {
            assert!(parse(text).is_err(), "{text}");
        }
    }
}
