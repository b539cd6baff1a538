//! Header handling at the relay's HTTP edge: hop-by-hop removal and forwarding headers.

use std::net::SocketAddr;

use ferry_protocol::HeaderList;
use http::{HeaderMap, HeaderName, HeaderValue};

/// Headers that describe one connection rather than the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// Whether `name` must not be forwarded, given the names listed in the message's `Connection`.
fn is_hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || listed.iter().any(|l| l == name.as_str())
}

/// Names listed in `Connection` headers, lowercased.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

/// Forwarding context for the request's headers.
pub(crate) struct Forwarded<'a> {
    /// The caller's address.
    pub(crate) peer: SocketAddr,
    /// `http` or `https`: how callers reach the relay.
    pub(crate) proto: &'a str,
    /// The host the caller asked for.
    pub(crate) host: Option<&'a [u8]>,
    /// The session prefix stripped from the path (`/stripe-dev`).
    pub(crate) prefix: &'a str,
}

/// The request headers sent to the client: end-to-end ones plus `X-Forwarded-*`.
///
/// `X-Forwarded-For` gets the caller's address appended to any value it already had;
/// `X-Forwarded-Proto`, `-Host` and `-Prefix` are set by the relay, replacing the caller's.
pub(crate) fn request_headers(headers: &HeaderMap, fwd: &Forwarded<'_>) -> HeaderList {
    let listed = connection_listed(headers);
    let mut list = HeaderList::with_capacity(headers.len() + 4);
    let mut prior_for: Vec<u8> = Vec::new();
    for (name, value) in headers {
        if is_hop_by_hop(name, &listed) {
            continue;
        }
        match name.as_str() {
            "x-forwarded-for" => {
                if !prior_for.is_empty() {
                    prior_for.extend_from_slice(b", ");
                }
                prior_for.extend_from_slice(value.as_bytes());
            }
            "x-forwarded-proto" | "x-forwarded-host" | "x-forwarded-prefix" => {}
            _ => list.push(name.as_str(), value.as_bytes()),
        }
    }
    let ip = fwd.peer.ip().to_string();
    if !prior_for.is_empty() {
        prior_for.extend_from_slice(b", ");
    }
    prior_for.extend_from_slice(ip.as_bytes());
    list.push("x-forwarded-for", prior_for);
    list.push("x-forwarded-proto", fwd.proto);
    if let Some(host) = fwd.host {
        list.push("x-forwarded-host", host);
    }
    list.push("x-forwarded-prefix", fwd.prefix);
    list
}

/// Builds a response header map from the client's list; `Err` names the first bad entry.
pub(crate) fn to_header_map(list: &HeaderList) -> Result<HeaderMap, String> {
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list.iter_shared() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        map.append(name, value);
    }
    let listed = connection_listed(&map);
    let hop: Vec<HeaderName> = map
        .keys()
        .filter(|n| is_hop_by_hop(n, &listed))
        .cloned()
        .collect();
    for name in hop {
        map.remove(name);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_keeps_the_rest() {
        let mut headers = HeaderMap::new();
        headers.append("connection", HeaderValue::from_static("close, x-secret"));
        headers.append("x-secret", HeaderValue::from_static("1"));
        headers.append("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.append("x-dup", HeaderValue::from_static("a"));
        headers.append("x-dup", HeaderValue::from_static("b"));
        headers.append("x-raw", HeaderValue::from_bytes(&[0xff, b'z']).unwrap());
        headers.append("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        headers.append("x-forwarded-proto", HeaderValue::from_static("gopher"));
        let fwd = Forwarded {
            peer: "127.0.0.1:9".parse().unwrap(),
            proto: "https",
            host: Some(b"relay.example"),
            prefix: "/s1",
        };
        let list = request_headers(&headers, &fwd);
        let got: Vec<(&str, &[u8])> = list.iter().collect();
        assert_eq!(
            got,
            vec![
                ("x-dup", &b"a"[..]),
                ("x-dup", b"b"),
                ("x-raw", &[0xff, b'z']),
                ("x-forwarded-for", b"10.0.0.1, 127.0.0.1"),
                ("x-forwarded-proto", b"https"),
                ("x-forwarded-host", b"relay.example"),
                ("x-forwarded-prefix", b"/s1"),
            ]
        );
    }

    #[test]
    fn response_headers_are_validated() {
        let ok: HeaderList = [("x-a", "1"), ("transfer-encoding", "chunked"), ("x-a", "2")]
            .into_iter()
            .collect();
        let map = to_header_map(&ok).unwrap();
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert!(map.get("transfer-encoding").is_none());
        let bad: HeaderList = [("x-a", "line\r\nbreak")].into_iter().collect();
        assert!(to_header_map(&bad).is_err());
        let bad_name: HeaderList = [("bad name", "v")].into_iter().collect();
        assert!(to_header_map(&bad_name).is_err());
    }
}
