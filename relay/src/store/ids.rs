//! Request ids: ULIDs, so that sorting ids sorts requests by arrival.

use std::fmt;
use std::str::FromStr;

use ulid::Ulid;

/// A recorded request's id: a ULID (26 characters of Crockford base32).
///
/// Ids are handed out by the store's writer in the order requests are recorded, strictly
/// increasing even within one millisecond, so ordering by id is ordering by arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(Ulid);

impl RequestId {
    /// The id's timestamp: when it was generated, in Unix milliseconds.
    pub fn timestamp_ms(&self) -> u64 {
        self.0.timestamp_ms()
    }

    /// The underlying ULID.
    pub fn ulid(&self) -> Ulid {
        self.0
    }
}

impl From<Ulid> for RequestId {
    fn from(ulid: Ulid) -> Self {
        RequestId(ulid)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

/// Why a string is not a request id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a request id (expected 26 characters of Crockford base32): {0:?}")]
pub struct BadRequestId(pub String);

impl FromStr for RequestId {
    type Err = BadRequestId;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ulid::from_string(text)
            .map(RequestId)
            .map_err(|_| BadRequestId(text.to_owned()))
    }
}

/// Generates strictly increasing ids, even if the clock stands still or steps back.
#[derive(Debug, Default)]
pub(crate) struct IdGenerator {
    last: Option<Ulid>,
}

impl IdGenerator {
    /// A generator whose ids all sort after `floor` (the newest id already stored).
    pub(crate) fn after(floor: Option<RequestId>) -> Self {
        IdGenerator {
            last: floor.map(|id| id.0),
        }
    }

    /// The next id.
    pub(crate) fn next_id(&mut self) -> RequestId {
        let fresh = Ulid::generate();
        let id = match self.last {
            // `increment` only fails at the very end of the id space, 10,000 years from now.
            Some(last) if fresh <= last => last.increment().unwrap_or(fresh),
            _ => fresh,
        };
        self.last = Some(id);
        RequestId(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strictly_increasing_and_round_trips() {
        let far_future = RequestId(Ulid::from_parts(u64::MAX >> 16, 5));
        let mut ids = IdGenerator::after(Some(far_future));
        let a = ids.next_id();
        let b = ids.next_id();
        assert!(far_future < a && a < b);
        let mut ids = IdGenerator::default();
        let many: Vec<RequestId> = (0..1000).map(|_| ids.next_id()).collect();
        assert!(many.windows(2).all(|w| w[0] < w[1]));
        let text = many[7].to_string();
        assert_eq!(text.len(), 26);
        assert_eq!(text.parse::<RequestId>().unwrap(), many[7]);
        assert!("nope".parse::<RequestId>().is_err());
    }
}
