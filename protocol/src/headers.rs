//! Header lists that keep order, duplicates and exact value bytes.

use base64::Engine as _;
use serde::de::Error as _;
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

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum WireValue<'a> {
    Text(#[serde(borrow)] std::borrow::Cow<'a, str>),
    Binary { b64: String },
}

impl Serialize for HeaderList {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.entries.iter().map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => WireValue::Text(text.into()),
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
        let wire: Vec<(String, WireValue<'_>)> = Vec::deserialize(deserializer)?;
        let mut list = HeaderList::with_capacity(wire.len());
        for (name, value) in wire {
            if name.is_empty() {
                return Err(D::Error::custom(HeaderListError::EmptyName));
            }
            let value = match value {
                WireValue::Text(text) => text.into_owned().into_bytes(),
                WireValue::Binary { b64 } => base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| D::Error::custom(format!("header {name}: bad base64: {e}")))?,
            };
            list.entries.push((name, value));
        }
        Ok(list)
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
