//! The encoding of history blocks: many passed-through exchanges in one BLOB.
//!
//! A request passed straight through is final the moment its exchange ends: nothing updates it
//! again unless the user replays it. Writing such exchanges many to a row (one row per batch
//! and session, see `blocks`) costs SQLite one insert per batch instead of one per request,
//! three B-tree inserts and 24 bound columns each (docs/BENCHMARKS.md, finding 17).
//!
//! Layout: a version byte (`1`), then records. A record is `length: u32 BE` (of what follows),
//! the part the writer sets (`id`: 16 bytes, `duplicate flag: u8` + `duplicate_of`: 16 bytes,
//! `delivered_at: i64 BE`, `i64::MIN` for none), then the part encoded as soon as the exchange
//! ends ([`encode_tail`]). Integers are big-endian; `bytes` is `u32 BE` length + bytes; an
//! optional string is a flag byte then `bytes`. Header lists are kept in `codec`'s encoding,
//! the same BLOB as a `requests` row holds, so a record moves to a row without re-encoding.

use std::ops::Range;

use bytes::Bytes;

use super::codec::encode_headers;
use super::ids::RequestId;
use super::provider::ProviderId;
use super::records::{NewRequest, Outcome, RequestState};

/// The block format written by this build.
const VERSION: u8 = 1;

/// Bytes of a record's writer-set part.
const WRITER_PART: usize = 16 + 1 + 16 + 8;

/// No `delivered_at`.
const NO_TIME: i64 = i64::MIN;

/// A passed-through exchange encoded for a history block, waiting for the writer.
#[derive(Debug)]
pub(crate) struct EncodedExchange {
    /// The session it was sent to.
    pub(crate) session_id: String,
    /// The provider's delivery id, looked up by the writer to mark duplicates.
    pub(crate) provider_id: Option<String>,
    /// Whether the app answered and the request is delivered (otherwise it failed).
    pub(crate) delivered: bool,
    /// Header and body bytes kept, for the store's byte count.
    pub(crate) stored: usize,
    /// The record's part that the writer does not set.
    pub(crate) tail: Vec<u8>,
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Bodies are cut at the record limit, which is far below 4 GiB; headers are bounded by
    // the HTTP layer.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

fn put_opt_str(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(text) => {
            out.push(1);
            put_bytes(out, text.as_bytes());
        }
        None => out.push(0),
    }
}

impl EncodedExchange {
    /// Encodes `request` (passed straight through) and how its exchange ended, keeping at most
    /// `max_body` bytes of each body.
    pub(crate) fn new(request: NewRequest, outcome: Outcome, max_body: usize) -> Self {
        encode_tail(request, outcome, max_body)
    }
}

/// See [`EncodedExchange::new`].
fn encode_tail(request: NewRequest, outcome: Outcome, max_body: usize) -> EncodedExchange {
    // Only `Delivered` delivers: `Rejected` carried a response but failed.
    let delivered = matches!(outcome, Outcome::Delivered(_));
    let (response, error) = match outcome {
        Outcome::Delivered(response) | Outcome::Rejected { response, .. } => (Some(response), None),
        Outcome::Error { error, .. } => (None, Some(error)),
    };
    let headers = encode_headers(&request.headers);
    let keep = request.body.len().min(max_body);
    let body_len = request.body_len.max(request.body.len() as u64);
    let response_headers = response.as_ref().map(|r| encode_headers(&r.headers));
    let response_keep = response.as_ref().map_or(0, |r| r.body.len().min(max_body));
    let stored =
        headers.len() + keep + response_headers.as_ref().map_or(0, Vec::len) + response_keep;
    let mut tail = Vec::with_capacity(
        80 + request.method.len()
            + request.target.len()
            + error.as_ref().map_or(0, String::len)
            + stored
            + request
                .provider
                .as_ref()
                .map_or(0, |p| p.provider.len() + p.id.len()),
    );
    tail.extend_from_slice(&request.received_at.to_be_bytes());
    tail.push(u8::from(!delivered));
    tail.extend_from_slice(&body_len.to_be_bytes());
    tail.push(u8::from((keep as u64) < body_len));
    match &response {
        Some(r) => {
            let full = r.body_len.max(r.body.len() as u64);
            tail.extend_from_slice(&r.status.to_be_bytes());
            let duration = u64::try_from(r.duration.as_millis()).unwrap_or(u64::MAX - 1);
            tail.extend_from_slice(&duration.min(u64::MAX - 1).to_be_bytes());
            tail.extend_from_slice(&full.to_be_bytes());
            tail.push(u8::from((response_keep as u64) < full));
        }
        None => {
            tail.extend_from_slice(&0u16.to_be_bytes());
            tail.extend_from_slice(&u64::MAX.to_be_bytes());
            tail.extend_from_slice(&0u64.to_be_bytes());
            tail.push(0);
        }
    }
    put_bytes(&mut tail, request.method.as_bytes());
    put_bytes(&mut tail, request.target.as_bytes());
    put_opt_str(
        &mut tail,
        request.provider.as_ref().map(|p| p.provider.as_str()),
    );
    put_opt_str(&mut tail, request.provider.as_ref().map(|p| p.id.as_str()));
    put_opt_str(&mut tail, error.as_deref());
    put_bytes(&mut tail, &headers);
    put_bytes(&mut tail, &request.body[..keep]);
    match (&response, &response_headers) {
        (Some(r), Some(h)) => {
            tail.push(1);
            put_bytes(&mut tail, h);
            put_bytes(&mut tail, &r.body[..response_keep]);
        }
        _ => tail.push(0),
    }
    EncodedExchange {
        session_id: request.session_id,
        provider_id: request.provider.map(|p| p.id),
        delivered,
        stored,
        tail,
    }
}

/// A new, empty block.
pub(crate) fn new_block(capacity: usize) -> Vec<u8> {
    let mut block = Vec::with_capacity(capacity + 1);
    block.push(VERSION);
    block
}

/// Appends a record to `block`: the writer's part, then `tail`.
pub(crate) fn push_record(
    block: &mut Vec<u8>,
    id: RequestId,
    duplicate_of: Option<RequestId>,
    delivered_at: Option<i64>,
    tail: &[u8],
) {
    let len = u32::try_from(WRITER_PART + tail.len()).unwrap_or(u32::MAX);
    block.extend_from_slice(&len.to_be_bytes());
    block.extend_from_slice(&u128::from(id.ulid()).to_be_bytes());
    block.push(u8::from(duplicate_of.is_some()));
    block.extend_from_slice(
        &duplicate_of
            .map_or(0, |d| u128::from(d.ulid()))
            .to_be_bytes(),
    );
    block.extend_from_slice(&delivered_at.unwrap_or(NO_TIME).to_be_bytes());
    block.extend_from_slice(tail);
}

/// One record of a block, decoded. Bodies and header lists are slices of the block's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BlockEntry {
    pub(crate) id: RequestId,
    pub(crate) duplicate_of: Option<RequestId>,
    pub(crate) delivered_at: Option<i64>,
    pub(crate) received_at: i64,
    pub(crate) state: RequestState,
    pub(crate) body_len: u64,
    pub(crate) body_truncated: bool,
    pub(crate) status: Option<u16>,
    pub(crate) duration_ms: Option<u64>,
    pub(crate) response_body_len: u64,
    pub(crate) response_body_truncated: bool,
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) provider: Option<ProviderId>,
    pub(crate) error: Option<String>,
    /// The request's header list, encoded as in `codec`.
    pub(crate) headers: Bytes,
    pub(crate) body: Bytes,
    /// The response's encoded header list and body.
    pub(crate) response: Option<(Bytes, Bytes)>,
    /// Where the whole record lies in the block.
    pub(crate) span: Range<usize>,
}

impl BlockEntry {
    /// Header and body bytes kept, as counted in the store's byte total.
    pub(crate) fn stored(&self) -> usize {
        self.headers.len()
            + self.body.len()
            + self.response.as_ref().map_or(0, |(h, b)| h.len() + b.len())
    }
}

/// Reads a block's fields in order.
struct Reader<'a> {
    block: &'a Bytes,
    at: usize,
    end: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<Range<usize>> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.end)?;
        let range = self.at..end;
        self.at = end;
        Some(range)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let range = self.take(N)?;
        self.block[range].try_into().ok()
    }

    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|[b]| b)
    }

    fn flag(&mut self) -> Option<bool> {
        match self.u8()? {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        }
    }

    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }

    fn i64(&mut self) -> Option<i64> {
        self.array().map(i64::from_be_bytes)
    }

    fn id(&mut self) -> Option<RequestId> {
        self.array()
            .map(|b| RequestId::from(ulid::Ulid::from(u128::from_be_bytes(b))))
    }

    fn bytes(&mut self) -> Option<Bytes> {
        let len = self.u32()? as usize;
        let range = self.take(len)?;
        Some(self.block.slice(range))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        let range = self.take(len)?;
        String::from_utf8(self.block[range].to_vec()).ok()
    }

    fn opt_string(&mut self) -> Option<Option<String>> {
        if self.flag()? {
            self.string().map(Some)
        } else {
            Some(None)
        }
    }
}

/// Decodes every record of `block`; `None` if it is malformed.
pub(crate) fn decode_block(block: &Bytes) -> Option<Vec<BlockEntry>> {
    let (&version, _) = block.split_first()?;
    if version != VERSION {
        return None;
    }
    let mut entries = Vec::new();
    let mut at = 1;
    while at < block.len() {
        let mut outer = Reader {
            block,
            at,
            end: block.len(),
        };
        let len = outer.u32()? as usize;
        let body = outer.take(len)?;
        let mut r = Reader {
            block,
            at: body.start,
            end: body.end,
        };
        let entry = decode_record(&mut r, at..body.end)?;
        if r.at != body.end {
            return None;
        }
        entries.push(entry);
        at = body.end;
    }
    Some(entries)
}

fn decode_record(r: &mut Reader<'_>, span: Range<usize>) -> Option<BlockEntry> {
    let id = r.id()?;
    let duplicate = r.flag()?;
    let duplicate_of = r.id()?;
    let delivered_at = Some(r.i64()?).filter(|&t| t != NO_TIME);
    let received_at = r.i64()?;
    let state = match r.u8()? {
        0 => RequestState::Delivered,
        1 => RequestState::Failed,
        _ => return None,
    };
    let body_len = r.u64()?;
    let body_truncated = r.flag()?;
    let status = Some(r.u16()?).filter(|&s| s != 0);
    let duration_ms = Some(r.u64()?).filter(|&d| d != u64::MAX);
    let response_body_len = r.u64()?;
    let response_body_truncated = r.flag()?;
    let method = r.string()?;
    let target = r.string()?;
    let provider_name = r.opt_string()?;
    let provider_id = r.opt_string()?;
    let error = r.opt_string()?;
    let headers = r.bytes()?;
    let body = r.bytes()?;
    let response = if r.flag()? {
        Some((r.bytes()?, r.bytes()?))
    } else {
        None
    };
    let provider = match (provider_name, provider_id) {
        (Some(provider), Some(id)) => Some(ProviderId { provider, id }),
        _ => None,
    };
    Some(BlockEntry {
        id,
        duplicate_of: duplicate.then_some(duplicate_of),
        delivered_at,
        received_at,
        state,
        body_len,
        body_truncated,
        status,
        duration_ms,
        response_body_len,
        response_body_truncated,
        method,
        target,
        provider,
        error,
        headers,
        body,
        response,
        span,
    })
}

/// `block` without the record at `span` (from a [`BlockEntry`]).
pub(crate) fn without(block: &[u8], span: Range<usize>) -> Vec<u8> {
    let mut rest = Vec::with_capacity(block.len() - span.len());
    rest.extend_from_slice(&block[..span.start]);
    rest.extend_from_slice(&block[span.end..]);
    rest
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_protocol::HeaderList;

    use super::*;
    use crate::store::codec::decode_headers;
    use crate::store::records::Response;

    fn headers(pairs: &[(&str, &[u8])]) -> HeaderList {
        pairs.iter().map(|(n, v)| (*n, v.to_vec())).collect()
    }

    fn request(body: &'static [u8]) -> NewRequest {
        NewRequest::new(
            "s1",
            1_700_000_000_000,
            "POST",
            "/hooks?a=1",
            headers(&[
                ("X-GitHub-Delivery", b"d-1"),
                ("x-bin", &[0xff, 0, b'a']),
                ("X-GitHub-Delivery", b"d-2"),
            ]),
            Bytes::from_static(body),
            RequestState::Delivering,
        )
    }

    fn id(n: u128) -> RequestId {
        RequestId::from(ulid::Ulid::from(n))
    }

    #[test]
    fn records_round_trip_byte_for_byte() {
        let delivered = encode_tail(
            request(b"{\"a\":1}"),
            Outcome::Delivered(Response {
                status: 201,
                headers: headers(&[("content-type", b"text/plain")]),
                body: Bytes::from_static(b"made"),
                body_len: 4,
                duration: Duration::from_millis(7),
            }),
            1024,
        );
        assert!(delivered.delivered);
        assert_eq!(delivered.provider_id.as_deref(), Some("d-1"));
        let failed = encode_tail(
            request(b"0123456789"),
            Outcome::Error {
                error: "connection refused".into(),
                retry_at: None,
            },
            4,
        );
        assert!(!failed.delivered);

        let mut block = new_block(0);
        push_record(
            &mut block,
            id(7),
            None,
            Some(1_700_000_000_009),
            &delivered.tail,
        );
        push_record(&mut block, id(8), Some(id(7)), None, &failed.tail);
        let block = Bytes::from(block);
        let entries = decode_block(&block).expect("decodes");
        assert_eq!(entries.len(), 2);

        let first = &entries[0];
        assert_eq!((first.id, first.duplicate_of), (id(7), None));
        assert_eq!(first.delivered_at, Some(1_700_000_000_009));
        assert_eq!(first.received_at, 1_700_000_000_000);
        assert_eq!(first.state, RequestState::Delivered);
        assert_eq!(
            (first.method.as_str(), first.target.as_str()),
            ("POST", "/hooks?a=1")
        );
        assert_eq!(
            decode_headers(&first.headers),
            Some(request(b"").headers),
            "order, duplicates and raw bytes survive"
        );
        assert_eq!(&first.body[..], b"{\"a\":1}");
        assert_eq!((first.body_len, first.body_truncated), (7, false));
        assert_eq!(first.status, Some(201));
        assert_eq!(first.duration_ms, Some(7));
        let (response_headers, response_body) = first.response.clone().expect("a response");
        assert_eq!(
            decode_headers(&response_headers),
            Some(headers(&[("content-type", b"text/plain")]))
        );
        assert_eq!(&response_body[..], b"made");
        assert_eq!(first.provider.as_ref().map(|p| p.id.as_str()), Some("d-1"));
        assert_eq!(first.stored(), delivered.stored);

        let second = &entries[1];
        assert_eq!((second.id, second.duplicate_of), (id(8), Some(id(7))));
        assert_eq!(second.state, RequestState::Failed);
        assert_eq!(second.delivered_at, None);
        assert_eq!(
            (second.status, second.duration_ms, second.response.clone()),
            (None, None, None)
        );
        assert_eq!(second.error.as_deref(), Some("connection refused"));
        assert_eq!(&second.body[..], b"0123", "cut at the record limit");
        assert_eq!((second.body_len, second.body_truncated), (10, true));
        assert_eq!(second.stored(), failed.stored);

        // Taking the first record out leaves the second intact.
        let rest = Bytes::from(without(&block, first.span.clone()));
        let left = decode_block(&rest).expect("decodes");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].id, id(8));
        assert_eq!(left[0].error.as_deref(), Some("connection refused"));
    }

    #[test]
    fn a_rejected_answer_is_a_failed_exchange_with_its_response() {
        let rejected = encode_tail(
            request(b"x"),
            Outcome::Rejected {
                response: Response {
                    status: 500,
                    headers: HeaderList::new(),
                    body: Bytes::from_static(b"boom"),
                    body_len: 4,
                    duration: Duration::from_millis(1),
                },
                retry_at: None,
            },
            1024,
        );
        assert!(!rejected.delivered);
        let mut block = new_block(0);
        push_record(&mut block, id(1), None, None, &rejected.tail);
        let entries = decode_block(&Bytes::from(block)).expect("decodes");
        assert_eq!(entries[0].state, RequestState::Failed);
        assert_eq!(entries[0].status, Some(500));
    }

    #[test]
    fn malformed_blocks_are_refused_not_misread() {
        let tail = encode_tail(
            request(b"x"),
            Outcome::Error {
                error: "e".into(),
                retry_at: None,
            },
            1024,
        )
        .tail;
        let mut block = new_block(0);
        push_record(&mut block, id(1), None, None, &tail);
        assert!(decode_block(&Bytes::from(block.clone())).is_some());
        for cut in 2..block.len() {
            assert_eq!(
                decode_block(&Bytes::copy_from_slice(&block[..cut])),
                None,
                "cut at {cut}"
            );
        }
        assert_eq!(decode_block(&Bytes::new()), None);
        let mut wrong_version = block.clone();
        wrong_version[0] = 9;
        assert_eq!(decode_block(&Bytes::from(wrong_version)), None);
        assert_eq!(
            decode_block(&Bytes::from_static(&[VERSION])),
            Some(Vec::new())
        );
    }
}
