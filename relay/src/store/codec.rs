//! The BLOB encoding of header lists: order, duplicates and raw value bytes all survive.
//!
//! Layout: a version byte (`1`), then for each entry `name length: u32 BE`, `name bytes`,
//! `value length: u32 BE`, `value bytes`. Binary rather than JSON so that values that are not
//! UTF-8 need no escaping and no base64.

use ferry_protocol::HeaderList;

const VERSION: u8 = 1;

/// Encodes `headers` for storage.
pub(crate) fn encode_headers(headers: &HeaderList) -> Vec<u8> {
    let size = 1 + headers
        .iter()
        .map(|(n, v)| 8 + n.len() + v.len())
        .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.push(VERSION);
    for (name, value) in headers.iter() {
        put(&mut out, name.as_bytes());
        put(&mut out, value);
    }
    out
}

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    // Header names and values are bounded far below 4 GiB by the HTTP layer.
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&bytes[..len as usize]);
}

/// Decodes a BLOB written by [`encode_headers`]; `None` if it is malformed.
pub(crate) fn decode_headers(mut blob: &[u8]) -> Option<HeaderList> {
    let (&version, rest) = blob.split_first()?;
    if version != VERSION {
        return None;
    }
    blob = rest;
    let mut headers = HeaderList::new();
    while !blob.is_empty() {
        let name = take(&mut blob)?;
        let value = take(&mut blob)?;
        headers.push(std::str::from_utf8(name).ok()?, value);
    }
    Some(headers)
}

fn take<'a>(blob: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = blob.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if rest.len() < len {
        return None;
    }
    let (bytes, rest) = rest.split_at(len);
    *blob = rest;
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bytes_duplicates_and_order() {
        let headers: HeaderList = [
            ("X-A", b"1".to_vec()),
            ("x-bin", vec![0xff, 0x00, 0xfe, b'a']),
            ("X-A", b"2".to_vec()),
            ("empty", Vec::new()),
        ]
        .into_iter()
        .collect();
        let blob = encode_headers(&headers);
        assert_eq!(decode_headers(&blob), Some(headers));
        assert_eq!(
            decode_headers(&encode_headers(&HeaderList::new())),
            Some(HeaderList::new())
        );
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(decode_headers(&[]), None);
        assert_eq!(decode_headers(&[2]), None);
        assert_eq!(decode_headers(&[1, 0, 0, 0, 5, b'a']), None);
        assert_eq!(decode_headers(&[1, 0, 0, 0, 1, 0xff, 0, 0, 0, 0]), None);
    }
}
