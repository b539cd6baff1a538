//! Header lists that keep order, duplicates and exact value bytes.

use base64::Engine as _;
use std::borrow::Cow;

use bytes::Bytes;
use std::fmt;

use serde::de::{Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1): never
/// carried to the next hop, in either direction. The names a message lists in `Connection` are
/// hop-by-hop too.
pub const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` (in any case) is one of [`HOP_BY_HOP`].
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.iter().any(|hop| name.eq_ignore_ascii_case(hop))
}

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
///
/// Names and values are kept back to back in two buffers, with where each entry ends: a list
/// costs three allocations however many entries it has, rather than two per entry (a webhook's
/// head crosses the tunnel as several lists, finding 20 in docs/BENCHMARKS.md).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HeaderList {
    /// Every entry's name, back to back.
    names: String,
    /// Every entry's value, back to back.
    values: Vec<u8>,
    /// Per entry, where its name ends in `names` and its value in `values`.
    ends: Vec<(usize, usize)>,
}

impl HeaderList {
    /// An empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty list with room for `capacity` entries.
    pub fn with_capacity(capacity: usize) -> Self {
        HeaderList {
            names: String::with_capacity(capacity * 16),
            values: Vec::with_capacity(capacity * 32),
            ends: Vec::with_capacity(capacity),
        }
    }

    /// Appends one entry (copying it: no allocation of its own).
    pub fn push(&mut self, name: impl AsRef<str>, value: impl AsRef<[u8]>) {
        self.push_joined(name, &[value.as_ref()]);
    }

    /// Appends one entry whose value is `parts` back to back (no buffer of its own to join them).
    pub fn push_joined(&mut self, name: impl AsRef<str>, parts: &[&[u8]]) {
        self.names.push_str(name.as_ref());
        for part in parts {
            self.values.extend_from_slice(part);
        }
        self.ends.push((self.names.len(), self.values.len()));
    }

    /// Appends one entry with its name in lower case, as hyper and HTTP/2 spell names (they are
    /// case-insensitive), without a buffer of its own for the lowered name.
    pub fn push_lowercased(&mut self, name: &str, value: &[u8]) {
        let start = self.names.len();
        self.names.push_str(name);
        self.names[start..].make_ascii_lowercase();
        self.values.extend_from_slice(value);
        self.ends.push((self.names.len(), self.values.len()));
    }

    /// Appends one entry whose name is ASCII (as an HTTP/1 parser leaves a header name), lowered
    /// on the way, like [`push_lowercased`](Self::push_lowercased) but from bytes. A name that
    /// is not ASCII is refused: `false`, and nothing is added.
    pub fn push_ascii_lowercased(&mut self, name: &[u8], value: &[u8]) -> bool {
        if !name.is_ascii() {
            return false;
        }
        self.names
            .extend(name.iter().map(|b| char::from(b.to_ascii_lowercase())));
        self.values.extend_from_slice(value);
        self.ends.push((self.names.len(), self.values.len()));
        true
    }

    /// The entries, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        let mut start = (0, 0);
        self.ends.iter().map(move |&(name_end, value_end)| {
            let entry = (
                &self.names[start.0..name_end],
                &self.values[start.1..value_end],
            );
            start = (name_end, value_end);
            entry
        })
    }

    /// The entries, in order, each value a slice of one shared copy of all of them: building
    /// `http::HeaderValue`s from these (`from_maybe_shared`) allocates once for the whole list
    /// instead of once per value.
    pub fn iter_shared(&self) -> impl Iterator<Item = (&str, Bytes)> {
        let values = Bytes::copy_from_slice(&self.values);
        let mut start = (0, 0);
        self.ends.iter().map(move |&(name_end, value_end)| {
            let entry = (
                &self.names[start.0..name_end],
                values.slice(start.1..value_end),
            );
            start = (name_end, value_end);
            entry
        })
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether the list has no entries.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Every name back to back, every value back to back, and where each entry ends in both.
    pub(crate) fn parts(&self) -> (&str, &[u8], &[(usize, usize)]) {
        (&self.names, &self.values, &self.ends)
    }

    /// A list from [`parts`](Self::parts); the caller has checked that the ends rise, stay
    /// within both buffers and fall on character boundaries of `names`.
    pub(crate) fn from_parts(names: String, values: Vec<u8>, ends: Vec<(usize, usize)>) -> Self {
        HeaderList {
            names,
            values,
            ends,
        }
    }

    /// The first value of `name` (compared case-insensitively).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }
}

impl fmt::Debug for HeaderList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(name, value)| (name, String::from_utf8_lossy(value))),
            )
            .finish()
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> FromIterator<(N, V)> for HeaderList {
    fn from_iter<T: IntoIterator<Item = (N, V)>>(iter: T) -> Self {
        let iter = iter.into_iter();
        let mut list = HeaderList::with_capacity(iter.size_hint().0);
        for (name, value) in iter {
            list.push(name, value);
        }
        list
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
        serializer.collect_seq(self.iter().map(|(name, value)| {
            let value = match std::str::from_utf8(value) {
                Ok(text) => WireValue::Text(text),
                Err(_) => WireValue::Binary {
                    b64: base64::engine::general_purpose::STANDARD.encode(value),
                },
            };
            (name, value)
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
            list.push(name, value);
        }
        Ok(list)
    }
}

/// One `[name, value]` pair, borrowed from the input where it has no escapes.
struct Pair<'de>(Cow<'de, str>, Cow<'de, [u8]>);

impl<'de> Deserialize<'de> for Pair<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_seq(PairVisitor)
    }
}

struct PairVisitor;

impl<'de> Visitor<'de> for PairVisitor {
    type Value = Pair<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a [name, value] pair")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Pair<'de>, A::Error> {
        let Name(name) = seq
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

/// A header name (serde's own `Cow<str>` always copies).
struct Name<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(NameVisitor)
    }
}

struct NameVisitor;

impl<'de> Visitor<'de> for NameVisitor {
    type Value = Name<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a header name")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Name<'de>, E> {
        Ok(Name(Cow::Borrowed(text)))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Name<'de>, E> {
        Ok(Name(Cow::Owned(text.to_owned())))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Name<'de>, E> {
        Ok(Name(Cow::Owned(text)))
    }
}

struct ValueBytes<'de>(Cow<'de, [u8]>);

impl<'de> Deserialize<'de> for ValueBytes<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = ValueBytes<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(r#"a header value: a string or {"b64": "..."}"#)
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<ValueBytes<'de>, E> {
        Ok(ValueBytes(Cow::Borrowed(text.as_bytes())))
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<ValueBytes<'de>, E> {
        Ok(ValueBytes(Cow::Owned(text.as_bytes().to_vec())))
    }

    fn visit_string<E: serde::de::Error>(self, text: String) -> Result<ValueBytes<'de>, E> {
        Ok(ValueBytes(Cow::Owned(text.into_bytes())))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ValueBytes<'de>, A::Error> {
        let mut value = None;
        while let Some(Name(key)) = map.next_key::<Name<'de>>()? {
            if key != "b64" || value.is_some() {
                return Err(A::Error::custom(format!(
                    "unexpected key {key:?} in header value"
                )));
            }
            let Name(b64) = map.next_value()?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| A::Error::custom(format!("bad base64 in header value: {e}")))?;
            value = Some(bytes);
        }
        value
            .map(|bytes| ValueBytes(Cow::Owned(bytes)))
            .ok_or_else(|| A::Error::custom("header value object without b64"))
    }
}

/// Lists of up to 5 entries with names matching the regex `names` and values of any bytes, for
/// property tests of the encodings.
#[cfg(test)]
pub(crate) fn arb_headers(
    names: &'static str,
) -> impl proptest::strategy::Strategy<Value = HeaderList> {
    use proptest::prelude::*;
    proptest::collection::vec((names, proptest::collection::vec(any::<u8>(), 0..16)), 0..6)
        .prop_map(|v| v.into_iter().collect())
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
    fn ascii_names_from_bytes_are_lowered_and_others_refused() {
        let mut list = HeaderList::new();
        assert!(list.push_ascii_lowercased(b"X-GitHub-Event", b"push"));
        assert!(!list.push_ascii_lowercased(b"caf\xc3\xa9", b"x"));
        assert!(list.push_ascii_lowercased(b"host", b"\xffraw"));
        let got: Vec<(&str, &[u8])> = list.iter().collect();
        assert_eq!(
            got,
            [("x-github-event", &b"push"[..]), ("host", b"\xffraw")]
        );
    }

    #[test]
    fn a_joined_value_is_one_entry() {
        let mut list = HeaderList::new();
        list.push("a", "1");
        list.push_joined("b", &[b"/", b"s1", b""]);
        list.push_joined("c", &[]);
        let got: Vec<(&str, &[u8])> = list.iter().collect();
        assert_eq!(got, [("a", &b"1"[..]), ("b", b"/s1"), ("c", b"")]);
    }

    #[test]
    fn hop_by_hop_names_match_in_any_case() {
        for name in [
            "Connection",
            "TE",
            "transfer-encoding",
            "Upgrade",
            "keep-alive",
        ] {
            assert!(is_hop_by_hop(name), "{name}");
        }
        for name in ["content-length", "tea", "x-upgrade", ""] {
            assert!(!is_hop_by_hop(name), "{name}");
        }
    }

    #[test]
    fn a_lowercased_entry_lowers_only_its_own_name() {
        let mut list = HeaderList::new();
        list.push("X-Keep", "V");
        list.push_lowercased("Content-Type", b"Text/Plain");
        list.push_lowercased("x-already", b"\xff");
        let got: Vec<(&str, &[u8])> = list.iter().collect();
        assert_eq!(
            got,
            [
                ("X-Keep", &b"V"[..]),
                ("content-type", b"Text/Plain"),
                ("x-already", b"\xff")
            ]
        );
    }

    #[test]
    fn shared_values_are_the_same_entries() {
        let list: HeaderList = [("a", &b"1"[..]), ("b", b""), ("a", b"\xff22")]
            .into_iter()
            .collect();
        let shared: Vec<(String, Vec<u8>)> = list
            .iter_shared()
            .map(|(n, v)| (n.to_owned(), v.to_vec()))
            .collect();
        let plain: Vec<(String, Vec<u8>)> = list
            .iter()
            .map(|(n, v)| (n.to_owned(), v.to_vec()))
            .collect();
        assert_eq!(shared, plain);
        assert_eq!(list.len(), 3);
        assert_eq!(
            format!("{list:?}"),
            "[(\"a\", \"1\"), (\"b\", \"\"), (\"a\", \"\u{fffd}22\")]"
        );
    }

    #[test]
    fn escaped_and_plain_json_decode_alike() {
        let plain: HeaderList = serde_json::from_str(r#"[["x-a","va"]]"#).unwrap();
        let escaped: HeaderList = serde_json::from_str(r#"[["x-\u0061","v\u0061"]]"#).unwrap();
        assert_eq!(plain, escaped);
        let from_reader: HeaderList = serde_json::from_reader(&br#"[["x-a","va"]]"#[..]).unwrap();
        assert_eq!(plain, from_reader);
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
