//! Decoding a [`ServerMessage`] straight from its input when its `type` comes first.
//!
//! serde's derived decoding of an internally tagged enum copies the whole message into a tree
//! of its own before looking for the tag, since the tag may come anywhere: for a delta carrying
//! a policy of a thousand rules that copy was a quarter of the agent's decoding time, and
//! thousands of allocations. Every encoder of ours writes the tag first (serde's derived
//! encoding does), so a welcome, a full map or a delta is decoded from the input as it comes;
//! any other message, or a tag that does not come first, goes through the derived decoding as
//! before, from a copy.

use std::borrow::Cow;

use serde::de::value::{CowStrDeserializer, MapAccessDeserializer};
use serde::de::{DeserializeSeed, Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ServerMessage;
use crate::netmap::{Netmap, NetmapDelta};

/// The key of the tag.
const TAG: &str = "type";

impl Serialize for ServerMessage {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The derived encoding (the inherent function `remote = "Self"` makes): tag first.
        ServerMessage::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for ServerMessage {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TagFirst)
    }
}

struct TagFirst;

impl<'de> Visitor<'de> for TagFirst {
    type Value = ServerMessage;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a server message (an object with a \"type\")")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ServerMessage, A::Error> {
        let mut copy = serde_json::Map::new();
        match map.next_key::<String>()? {
            Some(key) if key == TAG => {
                let tag: String = map.next_value()?;
                match tag.as_str() {
                    "welcome" => return rest(map).map(ServerMessage::Welcome),
                    "full_map" => return rest::<Netmap, _>(map).map(ServerMessage::FullMap),
                    "delta" => return rest::<NetmapDelta, _>(map).map(ServerMessage::Delta),
                    _ => {
                        copy.insert(key, serde_json::Value::String(tag));
                    }
                }
            }
            Some(key) => {
                let value = map.next_value()?;
                copy.insert(key, value);
            }
            None => {}
        }
        while let Some((key, value)) = map.next_entry::<String, serde_json::Value>()? {
            if copy.contains_key(&key) {
                // As the derived decoding: a key twice is an error, not the last one winning.
                return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
            }
            copy.insert(key, value);
        }
        // The derived decoding (the inherent function `remote = "Self"` makes).
        ServerMessage::deserialize(serde_json::Value::Object(copy)).map_err(A::Error::custom)
    }
}

/// The rest of the object, after its tag, as the variant's content; a second tag is an error
/// (as in the derived decoding), not a field the content ignores.
fn rest<'de, T: Deserialize<'de>, A: MapAccess<'de>>(map: A) -> Result<T, A::Error> {
    T::deserialize(MapAccessDeserializer::new(NoSecondTag(map)))
}

/// A map's entries, refusing the tag's key.
struct NoSecondTag<A>(A);

impl<'de, A: MapAccess<'de>> MapAccess<'de> for NoSecondTag<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        match self.0.next_key::<Key<'de>>()? {
            None => Ok(None),
            Some(Key(key)) if key == TAG => Err(A::Error::custom("duplicate field `type`")),
            Some(Key(key)) => seed
                .deserialize(CowStrDeserializer::<A::Error>::new(key))
                .map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.0.next_value_seed(seed)
    }

    fn size_hint(&self) -> Option<usize> {
        self.0.size_hint()
    }
}

/// A key, borrowed from the input where it can be.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(json: &str) -> Result<ServerMessage, serde_json::Error> {
        serde_json::from_str(json)
    }

    /// One message of every kind, as JSON with its tag first (as ours encode them).
    const MESSAGES: &[&str] = &[
        r#"{"type":"welcome","node_id":3,"name":"vm-a","network":"prod","network_cidr":"100.64.0.0/16","addresses":["100.64.0.3/32"],"coordinators":["198.18.0.1:7443"],"relay":true}"#,
        r#"{"type":"full_map","version":4,"peers":[],"workloads":[]}"#,
        r#"{"type":"delta","from_version":4,"to_version":5,"upsert":[],"remove":[7],"policy":{"set":{"version":2,"rules":[{"line":1,"from":["tag:web","node:vm-b"],"to":["workload:chat"],"ports":["tcp:5432","icmp"]}]}}}"#,
        r#"{"type":"refused","reason":"token used up"}"#,
        r#"{"type":"unavailable","reason":"database down"}"#,
        r#"{"type":"revoked","reason":"by admin"}"#,
        r#"{"type":"lease","seq":9,"lease_ms":1500,"version":5}"#,
        r#"{"type":"prepare","workload":"chat","generation":4}"#,
        r#"{"type":"claim_result","request":2,"generation":3}"#,
        r#"{"type":"rotate_key","grace_ms":2000}"#,
    ];

    #[test]
    fn every_kind_decodes_and_encodes_with_its_tag_first() {
        for json in MESSAGES {
            let msg = decode(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            let again = serde_json::to_string(&msg).unwrap();
            assert!(again.starts_with(r#"{"type":""#), "{again}");
            assert_eq!(decode(&again).unwrap(), msg, "{json}");
        }
        match decode(MESSAGES[2]).unwrap() {
            ServerMessage::Delta(d) => {
                assert_eq!((d.from_version, d.to_version, d.remove), (4, 5, vec![7]));
                assert!(d.policy.is_some());
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_tag_anywhere_else_decodes_the_same() {
        for json in MESSAGES {
            // The tag moved to the end: the derived decoding, from a copy.
            let body = json.strip_prefix('{').unwrap();
            let (tag, rest) = body.split_once(',').unwrap();
            let moved = format!("{{{},{tag}}}", rest.strip_suffix('}').unwrap());
            assert!(!moved.starts_with(r#"{"type""#), "{moved}");
            assert_eq!(decode(&moved).unwrap(), decode(json).unwrap(), "{moved}");
        }
    }

    #[test]
    fn fields_we_do_not_know_are_ignored_after_a_tag_first() {
        let later = r#"{"type":"delta","from_version":1,"to_version":2,"upsert":[],"remove":[],"from_the_future":{"a":[1]}}"#;
        assert!(matches!(decode(later), Ok(ServerMessage::Delta(_))));
    }

    #[test]
    fn a_tag_or_field_twice_is_an_error_as_in_the_derived_decoding() {
        for json in [
            r#"{"type":"delta","from_version":1,"type":"welcome","to_version":2}"#,
            r#"{"type":"lease","seq":1,"lease_ms":5,"version":1,"type":"welcome"}"#,
            r#"{"seq":1,"type":"lease","lease_ms":5,"version":1,"seq":2}"#,
        ] {
            let e = decode(json).unwrap_err();
            assert!(e.to_string().contains("duplicate field"), "{json}: {e}");
        }
    }

    #[test]
    fn bad_messages_are_errors() {
        for json in [
            "[]",
            "5",
            "{}",
            r#"{"type":"no_such_kind"}"#,
            r#"{"type":7,"from_version":1}"#,
            r#"{"type":"delta","from_version":"one","to_version":2}"#,
            r#"{"type":"delta","from_version":1,"to_version":2,"policy":{"set":{"version":1,"rules":[{"line":1,"from":["group:x"],"to":["*"],"ports":["*"]}]}}}"#,
            r#"{"type":"full_map","version":1,"peers":[]"#,
            r#"{"reason":"x"}"#,
        ] {
            assert!(decode(json).is_err(), "{json} decoded");
        }
    }
}
