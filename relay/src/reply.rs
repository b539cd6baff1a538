//! The relay's own answers: short JSON error bodies and the body type of every response.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use ferry_mux::TunnelBody;

/// Body of every relay response: a small buffered one, or a stream from the client.
pub(crate) type RelayBody = Either<Full<Bytes>, TunnelBody>;

/// A `{"error": ..., "detail": ...}` response.
pub(crate) fn error(status: StatusCode, error: &str, detail: &str) -> Response<RelayBody> {
    let body = serde_json::json!({ "error": error, "detail": detail }).to_string();
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// A small JSON response.
pub(crate) fn json(status: StatusCode, value: serde_json::Value) -> Response<RelayBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(value.to_string()))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An empty body.
pub(crate) fn empty() -> RelayBody {
    Either::Left(Full::new(Bytes::new()))
}

/// A small buffered body.
pub(crate) fn full(bytes: Bytes) -> RelayBody {
    Either::Left(Full::new(bytes))
}
