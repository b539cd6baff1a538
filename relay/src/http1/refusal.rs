//! Bad input on the relay's own HTTP/1 path, and the answer it gets: a status that fits and a
//! short JSON body naming the problem (hyper, which refuses the same input, answers with its
//! status and an empty body). The connection is closed after the answer, as hyper closes it.

use http::{Response, StatusCode};

use crate::reply::{self, RelayBody};

/// Why a request is refused before it reaches any handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// The status it gets.
    pub(crate) status: StatusCode,
    /// A few words for the `error` field.
    pub(crate) error: &'static str,
    /// What was wrong and, where it helps, what to do: the `detail` field.
    pub(crate) detail: &'static str,
}

impl Refusal {
    const fn bad(detail: &'static str) -> Self {
        Refusal {
            status: StatusCode::BAD_REQUEST,
            error: "bad request",
            detail,
        }
    }

    /// The answer: `{"error": .., "detail": ..}` with the status.
    pub(crate) fn response(&self) -> Response<RelayBody> {
        reply::error(self.status, self.error, self.detail)
    }

    /// A head `httparse` could not read; `buf` is what was read of it.
    pub(crate) fn malformed(buf: &[u8], error: httparse::Error) -> Self {
        // A TLS record starts 0x16 0x03: a ClientHello sent to a plain-HTTP port.
        if buf.starts_with(&[0x16, 0x03]) {
            return Refusal::bad(
                "this is a TLS handshake, but this port serves plain HTTP: use an http:// URL, \
                 or start the relay with --tls-cert and --tls-key",
            );
        }
        match error {
            httparse::Error::TooManyHeaders => Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                error: "too many headers",
                detail: "a request may carry at most 100 header lines",
            },
            httparse::Error::Version if names_another_major_version(buf) => Refusal {
                status: StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                error: "HTTP version not supported",
                detail: "this relay speaks HTTP/1.0, HTTP/1.1 and HTTP/2",
            },
            httparse::Error::Version => {
                Refusal::bad("malformed request line: the version must be HTTP/1.1 or HTTP/1.0")
            }
            httparse::Error::Token => {
                Refusal::bad("malformed request line: expected METHOD /target HTTP/1.1")
            }
            httparse::Error::HeaderName => Refusal::bad(
                "malformed header line: expected `Name: value` (no space before the colon, no \
                 folded lines)",
            ),
            httparse::Error::HeaderValue => {
                Refusal::bad("malformed header value: control characters are not allowed")
            }
            httparse::Error::NewLine | httparse::Error::Status => {
                Refusal::bad("malformed request head: lines must end with CRLF")
            }
        }
    }

    /// A head longer than the relay reads (`buf` holds that much and no end of head).
    pub(crate) fn head_too_long(buf: &[u8]) -> Self {
        if buf.contains(&b'\n') {
            Refusal {
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                error: "request head too large",
                detail: "the request line and headers may take at most 64 KiB",
            }
        } else {
            Refusal {
                status: StatusCode::URI_TOO_LONG,
                error: "URI too long",
                detail: "the request line may take at most 64 KiB",
            }
        }
    }

    /// `Content-Length` that is not one decimal number, or several that differ.
    pub(crate) const BAD_LENGTH: Refusal = Refusal::bad(
        "invalid Content-Length: it must be a single decimal number of bytes (RFC 9110 §8.6)",
    );

    /// A `Transfer-Encoding` whose last coding is not `chunked`: the body's end is unknowable.
    pub(crate) const NOT_CHUNKED: Refusal = Refusal::bad(
        "invalid Transfer-Encoding: a request's last coding must be chunked (RFC 9112 §6.3)",
    );

    /// A body that stopped arriving.
    pub(crate) const BODY_STALLED: Refusal = Refusal {
        status: StatusCode::REQUEST_TIMEOUT,
        error: "request timeout",
        detail: "the request body stopped arriving: nothing came for 10 seconds",
    };

    /// An HTTP/1.1 request without `Host`.
    pub(crate) const NO_HOST: Refusal =
        Refusal::bad("an HTTP/1.1 request must carry a Host header (RFC 9112 §3.2)");

    /// A request with more than one `Host`.
    pub(crate) const HOSTS: Refusal =
        Refusal::bad("a request may carry only one Host header (RFC 9112 §3.2)");
}

/// Whether the request line ends in `HTTP/<digit>` with a major version other than 1.
fn names_another_major_version(buf: &[u8]) -> bool {
    let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    line.rsplit(|&b| b == b' ')
        .next()
        .and_then(|version| version.strip_prefix(b"HTTP/"))
        .and_then(|number| number.first())
        .is_some_and(|major| major.is_ascii_digit() && *major != b'1')
}

/// The `Host` rule of RFC 9112 §3.2 for a request of `version` carrying `hosts` Host lines.
pub(crate) fn host_rule(version: http::Version, hosts: usize) -> Option<Refusal> {
    match hosts {
        0 if version == http::Version::HTTP_11 => Some(Refusal::NO_HOST),
        0 | 1 => None,
        _ => Some(Refusal::HOSTS),
    }
}
