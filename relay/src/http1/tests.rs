use bytes::{Bytes, BytesMut};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt as _;
use tokio::io::AsyncReadExt as _;

use super::request::{take_request, Plain, Taken, MAX_HEADERS, MAX_WHOLE_BODY};
use super::response::{chunk_size_line_for_tests, encode_head, write, Framing};
use super::{Refusal, Rewind, WireHeaders};
use crate::caller::CallerHeaders;
use crate::reply;

fn take(input: &[u8]) -> (Taken, BytesMut) {
    let mut buf = BytesMut::from(input);
    let taken = take_request(&mut buf);
    (taken, buf)
}

fn plain(input: &[u8]) -> (Plain, BytesMut) {
    match take(input) {
        (Taken::Request(plain), rest) => (*plain, rest),
        (other, _) => panic!("{other:?} for {:?}", String::from_utf8_lossy(input)),
    }
}

async fn body_bytes(plain: Plain) -> Bytes {
    plain.request.body.collect().await.unwrap().to_bytes()
}

fn wire(plain: &Plain) -> &WireHeaders {
    match &plain.request.head.headers {
        CallerHeaders::Wire(wire) => wire,
        CallerHeaders::Map { .. } => panic!("a head this path read keeps its wire lines"),
    }
}

#[tokio::test]
async fn a_webhook_is_taken_whole_and_what_follows_stays() {
    let input = b"POST /s1/hook?x=1 HTTP/1.1\r\nHost: relay\r\nX-Sig: t=1,v1=ab\r\n\
        Content-Length: 5\r\nX-Dup: a\r\nx-raw: \xff\xfe\r\nX-Dup: b\r\n\r\nhelloGET /next";
    let (plain, rest) = plain(input);
    assert_eq!(&rest[..], b"GET /next");
    assert!(!plain.close);
    let head = &plain.request.head;
    assert_eq!(head.method, Method::POST);
    assert_eq!(head.target.as_str(), "/s1/hook?x=1");
    assert_eq!(head.version, http::Version::HTTP_11);
    let lines: Vec<(&str, &[u8])> = wire(&plain)
        .iter()
        .map(|(name, value)| (std::str::from_utf8(name).unwrap(), value))
        .collect();
    let expected: [(&str, &[u8]); 6] = [
        ("Host", b"relay"),
        ("X-Sig", b"t=1,v1=ab"),
        ("Content-Length", b"5"),
        ("X-Dup", b"a"),
        ("x-raw", b"\xff\xfe"),
        ("X-Dup", b"b"),
    ];
    assert_eq!(lines, expected, "order, case, duplicates and bytes as sent");
    assert_eq!(head.headers.content_length(), Some(5));
    assert_eq!(body_bytes(plain).await, "hello");
}

#[test]
fn wire_lines_are_forwarded_as_hyper_read_ones_are_but_in_their_own_order() {
    let input = b"POST /s1/h HTTP/1.1\r\nHost: relay.example\r\nX-Forwarded-For: 10.0.0.1\r\n\
        Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nStripe-Signature: t=1,v1=a\r\n\
        Keep-Alive: timeout=5\r\nX-Forwarded-Proto: gopher\r\nX-Dup: a\r\nX-Other: o\r\nX-Dup: b\r\n\
        Content-Length: 0\r\n\r\n";
    let (plain, _) = plain(input);
    let peer = "192.0.2.7:1".parse().unwrap();
    let from_wire = plain.request.head.headers.forwarded(peer, "https", "s1");
    let mut map = http::HeaderMap::new();
    for (name, value) in wire(&plain).iter() {
        map.append(
            http::HeaderName::from_bytes(name).unwrap(),
            http::HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let from_map = CallerHeaders::Map {
        map,
        authority: None,
    }
    .forwarded(peer, "https", "s1");
    let names = |list: &ferry_protocol::HeaderList| -> Vec<String> {
        list.iter()
            .map(|(n, v)| format!("{n}: {}", String::from_utf8_lossy(v)))
            .collect()
    };
    let expected = [
        "host: relay.example",
        "stripe-signature: t=1,v1=a",
        "x-dup: a",
        "x-other: o",
        "x-dup: b",
        "content-length: 0",
        "x-forwarded-for: 10.0.0.1, 192.0.2.7",
        "x-forwarded-proto: https",
        "x-forwarded-host: relay.example",
        "x-forwarded-prefix: /s1",
    ];
    assert_eq!(names(&from_wire), expected);
    // hyper's map groups a name's values; everything else is the same.
    let mut grouped = names(&from_wire);
    grouped.swap(3, 4);
    assert_eq!(names(&from_map), grouped);
}

#[tokio::test]
async fn a_request_without_a_body_has_none() {
    let (get, rest) = plain(b"GET /s1/ HTTP/1.1\r\nhost: r\r\n\r\n");
    assert!(rest.is_empty());
    assert!(http_body::Body::is_end_stream(&get.request.body));
    let (post, _) = plain(b"POST /s1/ HTTP/1.1\r\nhost: r\r\ncontent-length: 0\r\n\r\n");
    assert!(http_body::Body::is_end_stream(&post.request.body));
}

#[test]
fn connection_close_is_noticed() {
    for value in ["close", "Close", "keep-alive, close", " foo ,CLOSE"] {
        let input = format!("GET /s1/ HTTP/1.1\r\nhost: r\r\nconnection: {value}\r\n\r\n");
        assert!(plain(input.as_bytes()).0.close, "{value}");
    }
    assert!(
        !plain(b"GET /s1/ HTTP/1.1\r\nhost: r\r\nconnection: keep-alive\r\n\r\n")
            .0
            .close
    );
}

#[test]
fn a_request_cut_short_waits_for_more() {
    let whole = b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 10\r\n\r\n0123456789";
    let head_len = whole.len() - 10;
    for cut in 0..whole.len() {
        let (taken, buf) = take(&whole[..cut]);
        match taken {
            Taken::Head => assert!(cut < head_len, "{cut}"),
            Taken::Body { total } => {
                assert!(cut >= head_len, "{cut}");
                assert_eq!(total, whole.len());
            }
            other => panic!("{other:?} at {cut}"),
        }
        assert_eq!(&buf[..], &whole[..cut], "the buffer is left as it was");
    }
}

#[test]
fn anything_but_a_plain_request_is_handed_to_hyper_untouched() {
    let long_body = format!(
        "POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: {}\r\n\r\n",
        MAX_WHOLE_BODY + 1
    );
    let cases: Vec<&[u8]> = vec![
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /s1/ HTTP/1.0\r\n\r\n",
        b"GET http://relay/s1/ HTTP/1.1\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
        b"CONNECT relay:443 HTTP/1.1\r\n\r\n",
        b"GET /_ferry/health HTTP/1.1\r\n\r\n",
        b"GET /_ferry HTTP/1.1\r\n\r\n",
        b"POST /_ferry/v1/api/s1/requests HTTP/1.1\r\n\r\n",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: gzip, Chunked\r\n\r\n0\r\n\r\n",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: chunked\r\ncontent-length: +1\r\n\r\n",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n",
        b"GET /s1/ HTTP/1.1\r\nhost: r\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        b"GET /s1/ HTTP/1.1\r\nhost: r\r\nupgrade: websocket\r\n\r\n",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\na",
        b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 1, 1\r\n\r\na",
        long_body.as_bytes(),
        b"GET /s1/ HTTP/1.1\r\nhost: r\r\nconnection: \xff\r\n\r\n",
    ];
    for input in cases {
        let (taken, buf) = take(input);
        assert!(
            matches!(taken, Taken::Handoff),
            "{taken:?} for {:?}",
            String::from_utf8_lossy(input)
        );
        assert_eq!(&buf[..], input, "the buffer is left as it was");
    }
}

#[test]
fn bad_input_is_refused_with_a_status_that_fits() {
    let many_headers = format!(
        "GET /s1/ HTTP/1.1\r\nhost: r\r\n{}\r\n",
        "x-h: 1\r\n".repeat(MAX_HEADERS)
    );
    let cases: Vec<(&[u8], u16, &str)> = vec![
        (
            b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: +1\r\n\r\na",
            400,
            "Content-Length",
        ),
        (
            b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 99999999999999999999\r\n\r\n",
            400,
            "Content-Length",
        ),
        (
            b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            400,
            "Content-Length",
        ),
        (
            b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: 1, 2\r\n\r\nab",
            400,
            "Content-Length",
        ),
        (
            b"POST /s1/h HTTP/1.1\r\nhost: r\r\ncontent-length: -1\r\n\r\n",
            400,
            "Content-Length",
        ),
        (b"POST /s1/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
        (b"POST /s1/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: chunked\r\ntransfer-encoding: gzip\r\n\r\n", 400, "Transfer-Encoding"),
        (many_headers.as_bytes(), 431, "100 header lines"),
        (
            b"GET /s1/ HTTP/1.1\r\nhost: r\r\nbad header line\r\n\r\n",
            400,
            "header line",
        ),
        (
            b"GET /s1/ HTTP/1.1\r\nhost: r\r\ncontent-length : 0\r\n\r\n",
            400,
            "header line",
        ),
        (
            b"GET /s1/ HTTP/1.1\r\nhost: r\r\nx-nul: a\0b\r\n\r\n",
            400,
            "header value",
        ),
        (
            b"GET /s1/ HTTP/1.1\r\nhost: r\r\nx-fold: a\r\n b\r\n\r\n",
            400,
            "folded",
        ),
        (b"G@T /s1/ HTTP/1.1\r\n\r\n", 400, "request line"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "request line"),
        (b"GET /s1/ HTTP/2.0\r\nhost: r\r\n\r\n", 505, "HTTP/1.1"),
        (b"GET /s1/ HTTP/3.0\r\nhost: r\r\n\r\n", 505, "HTTP/1.1"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400, "TLS"),
        (
            b"POST /s1/h HTTP/1.1\r\ncontent-length: 0\r\n\r\n",
            400,
            "must carry a Host",
        ),
        (
            b"GET /s1/ HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n",
            400,
            "only one Host",
        ),
    ];
    for (input, status, words) in cases {
        let (taken, buf) = take(input);
        let Taken::Refuse(refusal) = taken else {
            panic!("{taken:?} for {:?}", String::from_utf8_lossy(input));
        };
        assert_eq!(refusal.status.as_u16(), status, "{refusal:?}");
        assert!(refusal.detail.contains(words), "{refusal:?}");
        assert_eq!(&buf[..], input, "the buffer is left as it was");
    }
}

#[test]
fn the_start_of_an_http2_preface_waits_for_the_rest() {
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    for cut in 1..preface.len() {
        let (taken, _) = take(&preface[..cut]);
        assert!(matches!(taken, Taken::Head), "{taken:?} at {cut}");
    }
}

#[test]
fn a_head_too_long_is_refused_as_its_line_needs() {
    assert_eq!(Refusal::head_too_long(b"GET /aaaa").status.as_u16(), 414);
    assert_eq!(
        Refusal::head_too_long(b"GET / HTTP/1.1\r\nx: aaaa")
            .status
            .as_u16(),
        431
    );
}

#[test]
fn a_target_that_http_refuses_goes_back_into_the_buffer() {
    // httparse takes `{` in a target; `http`'s URI parser does not.
    let input =
        b"POST /s1/{x} HTTP/1.1\r\nhost: r\r\ncontent-length: 2\r\n\r\nhiGET /s1/ HTTP/1.1\r\n\r\n";
    let (taken, buf) = take(input);
    if let Taken::Request(plain) = &taken {
        // Should `http` ever accept it, it must be exactly the target sent.
        assert_eq!(plain.request.head.target.path(), "/s1/{x}");
        return;
    }
    assert!(matches!(taken, Taken::Handoff), "{taken:?}");
    assert_eq!(&buf[..], input);
}

fn head_of(
    response: &Response<reply::RelayBody>,
    method: &Method,
    close: bool,
) -> (String, Framing) {
    let mut out = Vec::new();
    let framing = encode_head(response, method, close, &mut out);
    (String::from_utf8(out).unwrap(), framing)
}

/// The head without its `date` line, which is checked separately.
fn without_date(head: &str) -> String {
    let date = head
        .lines()
        .find(|line| line.starts_with("date: "))
        .expect("a date header");
    let value = &date["date: ".len()..];
    assert!(httpdate::parse_http_date(value).is_ok(), "{value}");
    head.replace(&format!("{date}\r\n"), "")
}

#[test]
fn answers_are_framed_as_hyper_frames_them() {
    let mut json = reply::json(StatusCode::OK, serde_json::json!({"a": 1}));
    let (head, framing) = head_of(&json, &Method::POST, false);
    assert_eq!(
        without_date(&head),
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"
    );
    assert_eq!(framing, Framing::Length(7));
    // A length the handler set is sent as set; HEAD sends no body.
    json.headers_mut()
        .insert(http::header::CONTENT_LENGTH, "7".parse().unwrap());
    let (head, framing) = head_of(&json, &Method::HEAD, false);
    assert_eq!(
        without_date(&head),
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 7\r\n\r\n"
    );
    assert_eq!(framing, Framing::Empty);
    // No body: an explicit zero, except where a length may not be sent.
    let mut empty = Response::new(reply::empty());
    *empty.status_mut() = StatusCode::CREATED;
    let (head, framing) = head_of(&empty, &Method::POST, true);
    assert_eq!(
        without_date(&head),
        "HTTP/1.1 201 Created\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    );
    assert_eq!(framing, Framing::Empty);
    *empty.status_mut() = StatusCode::NO_CONTENT;
    let (head, _) = head_of(&empty, &Method::POST, false);
    assert_eq!(without_date(&head), "HTTP/1.1 204 No Content\r\n\r\n");
    let mut odd = reply::error(StatusCode::from_u16(599).unwrap(), "e", "d");
    odd.headers_mut().insert(
        http::header::DATE,
        "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
    );
    let (head, _) = head_of(&odd, &Method::GET, false);
    assert!(head.starts_with("HTTP/1.1 599 <none>\r\n"), "{head}");
    assert_eq!(head.matches("date: ").count(), 1, "{head}");
}

#[tokio::test]
async fn a_buffered_answer_goes_out_in_one_piece() {
    let response = reply::json(StatusCode::ACCEPTED, serde_json::json!({"queued": true}));
    let mut out = Vec::new();
    assert!(
        write(&mut out, response, &Method::POST, false, &mut Vec::new())
            .await
            .unwrap()
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 202 Accepted\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n{\"queued\":true}"), "{text}");
    let mut out = Vec::new();
    let response = reply::json(StatusCode::OK, serde_json::json!({}));
    assert!(
        !write(&mut out, response, &Method::HEAD, true, &mut Vec::new())
            .await
            .unwrap()
    );
    assert!(String::from_utf8(out).unwrap().ends_with("\r\n\r\n"));
}

#[test]
fn chunk_sizes_are_hex() {
    assert_eq!(chunk_size_line_for_tests(0), b"0\r\n");
    assert_eq!(chunk_size_line_for_tests(0x1a2b), b"1A2B\r\n");
    assert_eq!(
        chunk_size_line_for_tests(usize::MAX),
        format!("{:X}\r\n", usize::MAX).as_bytes()
    );
}

#[tokio::test]
async fn a_rewound_connection_reads_what_was_put_back_first() {
    let (mut near, far) = tokio::io::duplex(64);
    let mut rewound = Rewind::new(far, Bytes::from_static(b"put back, "));
    tokio::io::AsyncWriteExt::write_all(&mut near, b"then the rest")
        .await
        .unwrap();
    drop(near);
    let mut all = String::new();
    rewound.read_to_string(&mut all).await.unwrap();
    assert_eq!(all, "put back, then the rest");
}

mod serving {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

    use super::super::{serve, Served};
    use crate::registry::Registry;
    use crate::{Relay, RelayConfig};

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    fn relay() -> Arc<Relay> {
        let config = RelayConfig::new("http://relay.test", vec!["token".into()]);
        Arc::new(Relay::new(config, Registry::new(10), 1))
    }

    /// Serves the far end of a new in-memory connection; returns the near end.
    fn connect(
        relay: &Arc<Relay>,
    ) -> (DuplexStream, tokio::task::JoinHandle<Served<DuplexStream>>) {
        let (near, far) = tokio::io::duplex(64 * 1024);
        let relay = relay.clone();
        (
            near,
            tokio::spawn(async move { serve(far, &relay, PEER).await }),
        )
    }

    /// Reads one answer with a `content-length` off `near`: its head and body as text.
    async fn answer(near: &mut DuplexStream, pending: &mut Vec<u8>) -> (String, String) {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8(pending[..end + 4].to_vec()).unwrap();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                if pending.len() >= end + 4 + length {
                    let body = String::from_utf8(pending[end + 4..end + 4 + length].to_vec());
                    pending.drain(..end + 4 + length);
                    return (head, body.unwrap());
                }
            }
            let mut buf = [0u8; 4096];
            let n = near.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed mid-answer: {pending:?}");
            pending.extend_from_slice(&buf[..n]);
        }
    }

    fn handed_off(served: Served<DuplexStream>) -> bytes::Bytes {
        match served {
            Served::Handoff(rewind) => rewind.prefix().clone(),
            Served::Closed => panic!("closed, not handed to hyper"),
        }
    }

    #[tokio::test]
    async fn plain_requests_are_answered_here_in_order_on_one_connection() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(
            b"GET /first/a HTTP/1.1\r\nhost: r\r\n\r\n\
              POST /second/b HTTP/1.1\r\nhost: r\r\ncontent-length: 3\r\n\r\nabc",
        )
        .await
        .unwrap();
        let mut pending = Vec::new();
        for session in ["first", "second"] {
            let (head, body) = answer(&mut near, &mut pending).await;
            assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
            assert!(!head.contains("connection: close"), "{head}");
            assert!(body.contains(&format!("no session '{session}'")), "{body}");
        }
        near.write_all(b"DELETE /third HTTP/1.1\r\nhost: r\r\n\r\n")
            .await
            .unwrap();
        let (_, body) = answer(&mut near, &mut pending).await;
        assert!(body.contains("no session 'third'"), "{body}");
        drop(near);
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test]
    async fn a_request_that_comes_in_pieces_is_answered_once_whole() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        for piece in [
            &b"POST /pieces/h HTTP/1.1\r\nhost: r\r\ncont"[..],
            b"ent-length: 6\r\n\r\n",
            b"abc",
            b"def",
        ] {
            near.write_all(piece).await.unwrap();
            tokio::task::yield_now().await;
        }
        let (head, body) = answer(&mut near, &mut Vec::new()).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert!(body.contains("no session 'pieces'"), "{body}");
        drop(near);
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test]
    async fn requests_pipelined_before_the_caller_closes_its_side_are_answered() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(
            b"GET /one/ HTTP/1.1\r\nhost: r\r\n\r\nGET /two/ HTTP/1.1\r\nhost: r\r\n\r\n",
        )
        .await
        .unwrap();
        near.shutdown().await.unwrap();
        let mut pending = Vec::new();
        for session in ["one", "two"] {
            let (_, body) = answer(&mut near, &mut pending).await;
            assert!(body.contains(&format!("no session '{session}'")), "{body}");
        }
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test]
    async fn the_first_request_that_is_not_plain_goes_to_hyper_with_what_follows() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        let health = b"GET /_ferry/health HTTP/1.1\r\nhost: r\r\n\r\nGET /s/ HTTP/1.1\r\n\r\n";
        let mut input = b"GET /plain/ HTTP/1.1\r\nhost: r\r\n\r\n".to_vec();
        input.extend_from_slice(health);
        near.write_all(&input).await.unwrap();
        let (head, _) = answer(&mut near, &mut Vec::new()).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert_eq!(&handed_off(served.await.unwrap())[..], health);

        let (mut near, served) = connect(&relay);
        let chunked =
            b"POST /s/h HTTP/1.1\r\nhost: r\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
        near.write_all(chunked).await.unwrap();
        assert_eq!(&handed_off(served.await.unwrap())[..], chunked);
    }

    #[tokio::test]
    async fn connection_close_is_answered_and_honoured() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(
            b"GET /s/ HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\nGET /ignored/ HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
        let mut rest = Vec::new();
        let (head, _) = answer(&mut near, &mut rest).await;
        assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
        assert!(matches!(served.await.unwrap(), Served::Closed));
        near.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "nothing after the answer: {rest:?}");
    }

    #[tokio::test]
    async fn an_idle_connection_closes_when_the_relay_shuts_down() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(b"GET /s/ HTTP/1.1\r\nhost: r\r\n\r\n")
            .await
            .unwrap();
        answer(&mut near, &mut Vec::new()).await;
        relay.shutdown.cancel();
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_head_that_never_ends_times_out_without_an_answer() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(b"GET /s/ HTTP/1.1\r\nhost: r")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        assert!(matches!(served.await.unwrap(), Served::Closed));
        assert!(started.elapsed() >= super::super::HEAD_TIMEOUT);
        let mut rest = Vec::new();
        near.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// Sends `input` (more than the relay reads) and returns all it answers before closing.
    async fn refused(input: Vec<u8>) -> String {
        let relay = relay();
        let (near, served) = connect(&relay);
        let (mut reader, mut writer) = tokio::io::split(near);
        // The relay closes once it has answered, so this write may end in a broken pipe.
        let writing = tokio::spawn(async move { writer.write_all(&input).await });
        let mut answer = Vec::new();
        reader.read_to_end(&mut answer).await.unwrap();
        assert!(matches!(served.await.unwrap(), Served::Closed));
        let _ = writing.await.unwrap();
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn a_head_longer_than_the_limit_is_refused_and_the_connection_closed() {
        let mut input = b"GET /s/ HTTP/1.1\r\nhost: r\r\nx-big: ".to_vec();
        input.resize(super::super::MAX_HEAD + 10, b'a');
        let answer = refused(input).await;
        assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
        assert!(answer.contains("\r\nconnection: close\r\n"), "{answer}");
        assert!(answer.ends_with("\"detail\":\"the request line and headers may take at most 64 KiB\",\"error\":\"request head too large\"}"), "{answer}");

        let mut input = b"GET /s/".to_vec();
        input.resize(super::super::MAX_HEAD + 10, b'a');
        let answer = refused(input).await;
        assert!(answer.starts_with("HTTP/1.1 414 "), "{answer}");
        assert!(
            answer.contains("request line may take at most 64 KiB"),
            "{answer}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_arriving_is_answered_408() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(b"POST /s/h HTTP/1.1\r\nhost: r\r\ncontent-length: 10\r\n\r\nabc")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();
        let mut answer = Vec::new();
        tokio::time::timeout(
            super::super::HEAD_TIMEOUT * 3,
            near.read_to_end(&mut answer),
        )
        .await
        .expect("an answer, not a connection held open")
        .unwrap();
        assert!(started.elapsed() >= super::super::HEAD_TIMEOUT);
        let answer = String::from_utf8(answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer}");
        assert!(answer.contains("stopped arriving"), "{answer}");
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_body_that_keeps_coming_is_read_to_its_end() {
        let relay = relay();
        let (mut near, served) = connect(&relay);
        near.write_all(b"POST /slow/h HTTP/1.1\r\nhost: r\r\ncontent-length: 3\r\n\r\n")
            .await
            .unwrap();
        for byte in [b"a", b"b", b"c"] {
            tokio::time::sleep(super::super::HEAD_TIMEOUT / 2 + super::super::HEAD_TIMEOUT / 4)
                .await;
            near.write_all(byte).await.unwrap();
        }
        let (head, body) = answer(&mut near, &mut Vec::new()).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert!(body.contains("no session 'slow'"), "{body}");
        drop(near);
        assert!(matches!(served.await.unwrap(), Served::Closed));
    }

    #[tokio::test]
    async fn a_malformed_head_is_answered_with_what_is_wrong() {
        let answer = refused(b"GET /s/ HTTP/1.1\r\nhost: r\r\nx-nul: a\0b\r\n\r\n".to_vec()).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
        assert!(
            answer.contains("content-type: application/json"),
            "{answer}"
        );
        assert!(
            answer.contains("control characters are not allowed"),
            "{answer}"
        );
    }
}

#[tokio::test]
async fn a_rewound_connection_lets_go_of_what_it_put_back_once_read() {
    struct Owner(Vec<u8>, std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    impl Drop for Owner {
        fn drop(&mut self) {
            self.1.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prefix = Bytes::from_owner(Owner(b"GET / HTTP/1.1\r\n\r\n".to_vec(), dropped.clone()));
    let (_near, far) = tokio::io::duplex(64);
    let mut rewound = Rewind::new(far, prefix);
    let mut first = [0u8; 18];
    rewound.read_exact(&mut first).await.unwrap();
    // A tunnel lives for hours: the first read buffer must not live with it.
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
}

/// What `take_request` may do to a buffer: take a request off its front, or leave it as it was
/// (when it waits for more, hands the connection to hyper, or refuses it).
fn check_take(input: &[u8]) -> Result<(), proptest::test_runner::TestCaseError> {
    use proptest::prelude::*;
    let mut buf = BytesMut::from(input);
    match take_request(&mut buf) {
        Taken::Request(plain) => {
            let taken = input.len() - buf.len();
            prop_assert_eq!(&buf[..], &input[taken..], "only the front is taken");
            let body_len = http_body::Body::size_hint(&plain.request.body).exact();
            let declared = plain.request.head.headers.content_length().unwrap_or(0);
            prop_assert_eq!(
                body_len,
                Some(declared),
                "the body is all that was declared"
            );
            prop_assert!(plain.request.head.target.as_str().starts_with('/'));
        }
        Taken::Head | Taken::Handoff | Taken::Refuse(_) => prop_assert_eq!(&buf[..], input),
        Taken::Body { total } => {
            prop_assert_eq!(&buf[..], input);
            prop_assert!(total > input.len());
        }
    }
    Ok(())
}

proptest::proptest! {
    #[test]
    fn arbitrary_bytes_are_taken_whole_or_left_alone(
        input in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
    ) {
        check_take(&input)?;
    }

    #[test]
    fn a_request_with_any_bytes_changed_is_taken_whole_or_left_alone(
        at in proptest::collection::vec((0usize..120, proptest::prelude::any::<u8>()), 1..4),
        cut in 0usize..130,
    ) {
        let mut input = b"POST /s1/hook?a=1 HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\nX-A: b\r\n\
            Connection: close\r\n\r\nhelloGET /".to_vec();
        for (i, byte) in at {
            let i = i % input.len();
            input[i] = byte;
        }
        input.truncate(cut.min(input.len()));
        check_take(&input)?;
    }
}
