//! Header handling at the relay's HTTP edge: hop-by-hop removal and forwarding headers.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use ferry_protocol::HeaderList;
use http::{HeaderMap, HeaderName, HeaderValue};

/// The comma-separated names in `Connection` header `values`, lowercased (nothing is allocated
/// when there are none).
fn listed_names<'a>(values: impl Iterator<Item = &'a [u8]>) -> Vec<String> {
    values
        .filter_map(|value| std::str::from_utf8(value).ok())
        .flat_map(|value| value.split(','))
        .map(|name| name.trim().to_ascii_lowercase())
        .filter(|name| !name.is_empty())
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
    /// The session whose prefix was stripped from the path (`stripe-dev` for `/stripe-dev`).
    pub(crate) session: &'a str,
}

/// [`request_header_list`] of a `HeaderMap` (the tests' way in).
#[cfg(test)]
pub(crate) fn request_headers(headers: &HeaderMap, fwd: &Forwarded<'_>) -> HeaderList {
    request_header_list(
        || {
            headers
                .iter()
                .map(|(n, v)| (n.as_str().as_bytes(), v.as_bytes()))
        },
        headers.len(),
        fwd,
    )
}

/// The request headers sent to the client, from the `count` header lines `pairs` yields:
/// end-to-end ones plus `X-Forwarded-*`. Names are compared case-insensitively and lowered on
/// the way, as hyper lowers them (a name that is not ASCII, which no HTTP parser lets through,
/// is left out).
///
/// `X-Forwarded-For` gets the caller's address appended to any value it already had;
/// `X-Forwarded-Proto`, `-Host` and `-Prefix` are set by the relay, replacing the caller's.
pub(crate) fn request_header_list<'a, I>(
    pairs: impl Fn() -> I,
    count: usize,
    fwd: &Forwarded<'_>,
) -> HeaderList
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    let listed = listed_names(pairs().filter_map(|(name, value)| {
        (name.len() == 10 && name.eq_ignore_ascii_case(b"connection")).then_some(value)
    }));
    let mut list = HeaderList::with_capacity(count + 4);
    let mut prior_for: Vec<u8> = Vec::new();
    for (name, value) in pairs() {
        match role(name) {
            Role::HopByHop | Role::SetByRelay => {}
            Role::ForwardedFor => {
                if !prior_for.is_empty() {
                    prior_for.extend_from_slice(b", ");
                }
                prior_for.extend_from_slice(value);
            }
            Role::EndToEnd => {
                if !listed
                    .iter()
                    .any(|l| l.as_bytes().eq_ignore_ascii_case(name))
                {
                    list.push_ascii_lowercased(name, value);
                }
            }
        }
    }
    let mut buffer = [0u8; 64];
    let ip = ip_text(fwd.peer.ip(), &mut buffer);
    let separator: &[u8] = if prior_for.is_empty() { b"" } else { b", " };
    list.push_joined("x-forwarded-for", &[&prior_for, separator, ip]);
    list.push("x-forwarded-proto", fwd.proto);
    if let Some(host) = fwd.host {
        list.push("x-forwarded-host", host);
    }
    list.push_joined("x-forwarded-prefix", &[b"/", fwd.session.as_bytes()]);
    list
}

/// What a request header is to the relay.
#[derive(Debug, PartialEq, Eq)]
enum Role {
    /// One of [`ferry_protocol::HOP_BY_HOP`]: never forwarded.
    HopByHop,
    /// `X-Forwarded-For`: the caller's address is appended.
    ForwardedFor,
    /// `X-Forwarded-Proto`, `-Host` or `-Prefix`: the relay's value replaces the caller's.
    SetByRelay,
    /// Forwarded as it came (unless `Connection` lists it).
    EndToEnd,
}

/// `name`'s [`Role`], in any case: one comparison for most names, found by length.
fn role(name: &[u8]) -> Role {
    let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
    match name.len() {
        2 if is("te") => Role::HopByHop,
        7 if is("upgrade") => Role::HopByHop,
        10 if is("connection") || is("keep-alive") => Role::HopByHop,
        15 if is("x-forwarded-for") => Role::ForwardedFor,
        16 if is("proxy-connection") => Role::HopByHop,
        16 if is("x-forwarded-host") => Role::SetByRelay,
        17 if is("transfer-encoding") => Role::HopByHop,
        17 if is("x-forwarded-proto") => Role::SetByRelay,
        18 if is("x-forwarded-prefix") => Role::SetByRelay,
        _ => Role::EndToEnd,
    }
}

/// `ip` as text, written into `buffer`: no string of its own per request. IPv4 is written
/// digit by digit (`std`'s formatting machinery cost more than the rest of the header list).
fn ip_text(ip: IpAddr, buffer: &mut [u8; 64]) -> &[u8] {
    let len = match ip {
        IpAddr::V4(v4) => {
            let mut len = 0;
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    buffer[len] = b'.';
                    len += 1;
                }
                if octet >= 100 {
                    buffer[len] = b'0' + octet / 100;
                    len += 1;
                }
                if octet >= 10 {
                    buffer[len] = b'0' + octet / 10 % 10;
                    len += 1;
                }
                buffer[len] = b'0' + octet % 10;
                len += 1;
            }
            len
        }
        IpAddr::V6(v6) => {
            let mut cursor = std::io::Cursor::new(&mut buffer[..]);
            // An IPv6 address takes at most 45 bytes as text, so the write always fits.
            let _ = write!(cursor, "{v6}");
            cursor.position() as usize
        }
    };
    &buffer[..len]
}

/// Builds a response header map from the client's list, hop-by-hop headers left out; `Err`
/// names the first bad entry.
pub(crate) fn to_header_map(list: &HeaderList) -> Result<HeaderMap, String> {
    // The names `Connection` lists, read off the list first so that nothing is added only to
    // be taken out again.
    let listed = listed_names(
        list.iter()
            .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
            .map(|(_, value)| value),
    );
    let mut map = HeaderMap::with_capacity(list.len());
    for (name, value) in list.iter_shared() {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("invalid header name {name:?}"))?;
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        if role(name.as_str().as_bytes()) != Role::HopByHop
            && !listed.iter().any(|l| l == name.as_str())
        {
            map.append(name, value);
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::HOP_BY_HOP;

    #[test]
    fn every_hop_by_hop_name_has_that_role_in_any_case() {
        for name in HOP_BY_HOP {
            assert_eq!(role(name.as_bytes()), Role::HopByHop, "{name}");
            assert_eq!(
                role(name.to_ascii_uppercase().as_bytes()),
                Role::HopByHop,
                "{name}"
            );
        }
        assert_eq!(role(b"X-Forwarded-For"), Role::ForwardedFor);
        for name in [
            "x-forwarded-proto",
            "X-Forwarded-Host",
            "x-forwarded-PREFIX",
        ] {
            assert_eq!(role(name.as_bytes()), Role::SetByRelay, "{name}");
        }
        for name in [
            "x-forwarded-port",
            "tee",
            "connections",
            "stripe-signature",
            "",
        ] {
            assert_eq!(role(name.as_bytes()), Role::EndToEnd, "{name}");
        }
    }

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
            session: "s1",
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
    fn the_callers_address_is_appended_whatever_its_family() {
        for octet in 0..=255u8 {
            let ip = IpAddr::from([octet, 9, 99, 199]);
            let mut buffer = [0u8; 64];
            assert_eq!(ip_text(ip, &mut buffer), ip.to_string().as_bytes());
        }
        let headers = HeaderMap::new();
        for (peer, expected) in [
            ("192.0.2.7:1", &b"192.0.2.7"[..]),
            ("0.10.100.255:1", b"0.10.100.255"),
            ("[::ffff:10.0.0.1]:1", b"::ffff:10.0.0.1"),
            ("[2001:db8::1]:1", b"2001:db8::1"),
            (
                "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:1",
                b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ),
        ] {
            let fwd = Forwarded {
                peer: peer.parse().unwrap(),
                proto: "http",
                host: None,
                session: "abc",
            };
            let list = request_headers(&headers, &fwd);
            assert_eq!(list.get("x-forwarded-for"), Some(expected));
            assert_eq!(list.get("x-forwarded-prefix"), Some(&b"/abc"[..]));
        }
    }

    #[test]
    fn response_headers_are_validated() {
        let ok: HeaderList = [
            ("x-a", "1"),
            ("transfer-encoding", "chunked"),
            ("Connection", "close, X-Secret"),
            ("x-secret", "s"),
            ("x-a", "2"),
        ]
        .into_iter()
        .collect();
        let map = to_header_map(&ok).unwrap();
        assert_eq!(map.get_all("x-a").iter().count(), 2);
        assert!(map.get("transfer-encoding").is_none());
        assert!(map.get("connection").is_none());
        assert!(map.get("x-secret").is_none(), "named by Connection");
        assert_eq!(map.len(), 2);
        let bad: HeaderList = [("x-a", "line\r\nbreak")].into_iter().collect();
        assert!(to_header_map(&bad).is_err());
        let bad_name: HeaderList = [("bad name", "v")].into_iter().collect();
        assert!(to_header_map(&bad_name).is_err());
    }
}
