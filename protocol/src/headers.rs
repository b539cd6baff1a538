//! Header lists that keep order, duplicates and exact value bytes.

use base64::Engine as _;
use std::fmt;

use serde::de::{Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a header list could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderListError {
    /// A header name was empty.
    #[error("empty header name")]
    EmptyName,
}

/// An ordered list of `(name, value)` pairs.
///
/// Repeated names stay as separate entries in their original order, and values are raw bytes, so
/// values that are not UTF-8 survive the trip. On the wire a list is a JSON array of
/// `[name, value]` pairs; `value` is a string when it is valid UTF-8 and `{"b64": "..."}`
/// otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderList {
    entries: Vec<(String, Vec<u8>)>,
}

impl HeaderList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list with room for `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        HeaderList {
            entries: Vec::with_capacity(capacity),
        }
    }

    /// Appends one entry.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.entries.push((name.into(), value.into()));
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The first value of `name` (compared case-insensitively).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl<N: Into<String>, V: Into<Vec<u8>>> FromIterator<(N, V)> for HeaderList {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        HeaderList {
            entries: iter
                .into_iter()
                .map(|(n, v)| (n.into(), v.into()))
                .collect(),
        }
    }
}

/// A header value on the wire: a string when it is UTF-8, `{"b64": ...}` otherwise.
#[derive(Serialize)]
#[serde(untagged)]
enum WireValue<'a> {
    Text(&'a str),
    Binary { b64: String },
}

impl Serialize for HeaderList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.entries.iter().map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => WireValue::Text(text),
                Err(_) => WireValue::Binary {
                    b64: base64::engine::general_purpose::STANDARD.encode(value),
                },
            };
            (name.as_str(), value)
        }))
    }
}

impl<'de> Deserialize<'de> for HeaderList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(ListVisitor)
    }
}

/// Reads `[[name, value], ...]` straight into a list, without an intermediate tree.
struct ListVisitor;

impl<'de> Visitor<'de> for ListVisitor {
    type Value = HeaderList;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of [name, value] pairs")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<HeaderList, A::Error> {
        let mut list = HeaderList::with_capacity(seq.size_hint().unwrap_or(8).min(128));
        while let Some(Pair(name, value)) = seq.next_element()? {
            list.entries.push((name, value));
        }
        Ok(list)
    }
}

struct Pair(String, Vec<u8>);

impl<'de> Deserialize<'de> for Pair {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PairVisitor)
    }
}

struct PairVisitor;

impl<'de> Visitor<'de> for PairVisitor {
    type Value = Pair;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a [name, value] pair")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pair, A::Error> {
        let name: String = seq
            .next_element()?
            .ok_or_else(|| A::Error::invalid_length(0, &self))?;
        if name.is_empty() {
            return Err(A::Error::custom(HeaderListError::EmptyName));
        }
        let ValueBytes(value) = seq
            .next_element()?
            .ok_or_else(|| A::Error::invalid_length(1, &self))?;
        if seq.next_element::<IgnoredAny>()?.is_some() {
            return Err(A::Error::invalid_length(3, &self));
        }
        Ok(Pair(name, value))
    }
}

struct ValueBytes(Vec<u8>);

impl<'de> Deserialize<'de> for ValueBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = ValueBytes;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a header value: a string or {"b64": "..."}"#)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ValueBytes, E> {
        Ok(ValueBytes(text.as_bytes().to_vec()))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<ValueBytes, E> {
        Ok(ValueBytes(text.into_bytes()))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueBytes, A::Error> {
        let mut value = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key != "b64" || value.is_some() {
                return Err(A::Error::custom(format!(
                    "unexpected key {key:?} in header value"
                )));
            }
            let b64: std::borrow::Cow<'de, str> = map.next_value()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| A::Error::custom(format!("bad base64 in header value: {e}")))?;
            value = Some(bytes);
        }
        value
            .map(ValueBytes)
            .ok_or_else(|| A::Error::custom("header value object without b64"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keeps_duplicates_order_and_bytes() {
        let list: HeaderList = [
            ("x-a", b"1".to_vec()),
            ("x-b", vec![0xff, 0xfe, b'a']),
            ("x-a", b"2".to_vec()),
            ("x-c", "caf\u{e9}".as_bytes().to_vec()),
        ]
        .into_iter()
        .collect();
        let json = serde_json::to_string(&list).unwrap();
        assert_eq!(
            json,
            r#"[["x-a","1"],["x-b",{"b64":"//5h"}],["x-a","2"],["x-c","café"]]"#
        );
        let back: HeaderList = serde_json::from_str(&json).unwrap();
        assert_eq!(back, list);
        assert_eq!(back.get("X-A"), Some(&b"1"[..]));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(serde_json::from_str::<HeaderList>(r#"[["","v"]]"#).is_err());
        assert!(serde_json::from_str::<HeaderList>(r#"[["a",{"b64":"!!"}]]"#).is_err());
        assert!(serde_json::from_str::<HeaderList>(r#"[["a"]]"#).is_err());
        assert!(serde_json::from_str::<HeaderList>(r#"{"a":"b"}"#).is_err());
    }

    proptest! {
        #[test]
        fn round_trips(entries in proptest::collection::vec(("[a-zA-Z0-9-]{1,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..12)) {
            let list: HeaderList = entries.into_iter().collect();
            let json = serde_json::to_string(&list).unwrap();
            let back: HeaderList = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, list);
        }
    }
}
