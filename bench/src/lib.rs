//! Shared pieces of Ferry's benchmark binaries (see `bench/run.sh` and issue 3).
//!
//! - [`PatternBody`]: a body of N bytes of a fixed pattern, generated on the fly without
//!   buffering, used by `bench-origin` for downloads and by `bench-stream` for uploads.
//! - [`parse_size`]: sizes such as `5M` or `1G` on the command line.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Size of each chunk a [`PatternBody`] yields.
pub const CHUNK: usize = 64 * 1024;

/// The byte at offset `i` within each chunk of a pattern body.
pub fn pattern_byte(i: usize) -> u8 {
    b'a' + (i % 26) as u8
}

/// A body of exactly `len` bytes of a fixed pattern, yielded in [`CHUNK`]-sized frames that
/// all share one allocation (cloning [`Bytes`] is a reference-count bump, not a copy).
#[derive(Debug)]
pub struct PatternBody {
    chunk: Bytes,
    remaining: u64,
}

impl PatternBody {
    /// A body of `len` bytes.
    pub fn new(len: u64) -> Self {
        let chunk: Vec<u8> = (0..CHUNK).map(pattern_byte).collect();
        PatternBody {
            chunk: Bytes::from(chunk),
            remaining: len,
        }
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(CHUNK as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Parses a byte count: a plain number, or one with a `K`, `M` or `G` suffix (powers of 1024).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 1024, 5M or 1G"))?;
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown unit in '{text}'; use K, M or G")),
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("'{text}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("5M"), Ok(5 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1T").is_err());
    }

    #[tokio::test]
    async fn pattern_body_has_exact_length_and_pattern() {
        let len = 3 * CHUNK as u64 + 17;
        let bytes = PatternBody::new(len).collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len() as u64, len);
        assert!(bytes
            .iter()
            .enumerate()
            .all(|(i, b)| *b == pattern_byte(i % CHUNK)));
        assert_eq!(PatternBody::new(0).size_hint().exact(), Some(0));
    }
}
