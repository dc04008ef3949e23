//! Strict JSON for every document a reader or the signer takes from outside.
//!
//! serde_json keeps the last of two members with the same name (and a derived struct takes the
//! last value of a map twice over), so `{"sequence": 5, "sequence": 18446744073709551615}`
//! would mean one thing to us and another to any tool that keeps the first. Readers of signed
//! or untrusted JSON therefore refuse duplicate members anywhere in a document, compared after
//! unescaping (`"a"` and `"\u0061"` are the same name), before parsing it into a type.

use serde::de::{self, DeserializeOwned, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeSet;
use std::fmt;

/// Refuses a document with a duplicate object member at any depth (or that is not JSON).
/// Linear in the document's size; nesting is bounded by serde_json's recursion limit.
pub fn check_unique_members(bytes: &[u8]) -> Result<(), serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    UniqueMembers.deserialize(&mut deserializer)?;
    deserializer.end()
}

/// `serde_json::from_slice`, refusing duplicate members first.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, serde_json::Error> {
    check_unique_members(bytes)?;
    serde_json::from_slice(bytes)
}

/// Walks a value without building it, checking each object's member names.
struct UniqueMembers;

impl<'de> DeserializeSeed<'de> for UniqueMembers {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueMembers {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        while items.next_element_seed(UniqueMembers)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<(), A::Error> {
        let mut names = BTreeSet::new();
        while let Some(name) = members.next_key::<String>()? {
            if names.contains(&name) {
                return Err(de::Error::custom(format_args!("duplicate member {name:?}")));
            }
            members.next_value_seed(UniqueMembers)?;
            names.insert(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_refused_at_any_depth_and_after_unescaping() {
        for text in [
            r#"{"sequence": 5, "sequence": 18446744073709551615}"#,
            r#"{"a": [1, {"b": 1, "c": {"d": 1, "d": 2}}]}"#,
            r#"{"name": 1, "n\u0061me": 2}"#,
            r#"[{"x": null, "x": null}]"#,
        ] {
            let error = check_unique_members(text.as_bytes()).unwrap_err();
            assert!(
                error.to_string().contains("duplicate member"),
                "{text}: {error}"
            );
        }
    }

    #[test]
    fn distinct_members_and_every_kind_of_value_pass() {
        let text = r#"{"a": 1, "b": -1, "c": 1.5, "d": "x", "e": true, "f": null,
                       "g": [{"a": 1}, {"a": 2}], "h": {"a": {"a": 1}}}"#;
        check_unique_members(text.as_bytes()).unwrap();
        let value: serde_json::Value = from_slice(text.as_bytes()).unwrap();
        assert_eq!(value["g"][1]["a"], 2);
        assert!(check_unique_members(b"{} trailing").is_err());
        assert!(check_unique_members(b"not json").is_err());
    }

    #[test]
    fn deep_nesting_is_bounded_not_a_stack_overflow() {
        let deep = "[".repeat(100_000);
        assert!(check_unique_members(deep.as_bytes()).is_err());
    }
}
