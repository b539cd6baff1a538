use super::*;
use proptest::prelude::*;

/// Appends one chunk of a chunked body.
fn put_chunk(out: &mut BytesMut, data: &[u8]) {
    put_chunk_header(out, data.len());
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

fn list(entries: &[(&str, &[u8])]) -> HeaderList {
    entries.iter().copied().collect()
}

fn head(
    method: &str,
    headers: &HeaderList,
    has_body: bool,
) -> Result<(String, RequestFraming), String> {
    let mut out = BytesMut::new();
    let framing = write_request_head(
        &mut out,
        method,
        "/hooks/a?x=1",
        "localhost:3000",
        headers,
        has_body,
    )?;
    Ok((String::from_utf8_lossy(&out).into_owned(), framing))
}

#[test]
fn a_request_head_keeps_order_duplicates_case_and_value_bytes() {
    let headers = list(&[
        ("Stripe-Signature", b"t=1,v1=abc"),
        ("x-a", b"1"),
        ("host", b"abc.example"),
        ("X-B", b"\xffraw"),
        ("x-a", b"2"),
        ("connection", b"keep-alive"),
        ("Transfer-Encoding", b"chunked"),
        ("content-length", b"3"),
    ]);
    let mut out = BytesMut::new();
    let framing = write_request_head(
        &mut out,
        "POST",
        "/hooks/a?x=1",
        "localhost:3000",
        &headers,
        true,
    )
    .unwrap();
    assert_eq!(framing, RequestFraming::Length(3));
    assert_eq!(
        &out[..],
        &b"POST /hooks/a?x=1 HTTP/1.1\r\nhost: localhost:3000\r\nStripe-Signature: t=1,v1=abc\r\n\
x-a: 1\r\nX-B: \xffraw\r\nx-a: 2\r\ncontent-length: 3\r\n\r\n"[..]
    );
}

#[test]
fn a_body_of_unknown_length_goes_chunked() {
    let (text, framing) = head("POST", &list(&[("x", b"1")]), true).unwrap();
    assert_eq!(framing, RequestFraming::Chunked);
    assert!(
        text.ends_with("x: 1\r\ntransfer-encoding: chunked\r\n\r\n"),
        "{text}"
    );
    let (text, framing) = head("GET", &list(&[]), false).unwrap();
    assert_eq!(framing, RequestFraming::None);
    assert_eq!(
        text,
        "GET /hooks/a?x=1 HTTP/1.1\r\nhost: localhost:3000\r\n\r\n"
    );
    let (_, framing) = head("POST", &list(&[("content-length", b"0")]), false).unwrap();
    assert_eq!(framing, RequestFraming::None);
}

#[test]
fn request_heads_that_could_smuggle_anything_are_refused() {
    let cases: [(&str, HeaderList, bool, &str); 7] = [
        ("PO ST", list(&[]), false, "invalid method"),
        ("", list(&[]), false, "invalid method"),
        ("POST", list(&[("x y", b"1")]), false, "invalid header name"),
        (
            "POST",
            list(&[("x", b"1\r\nx-evil: 1")]),
            false,
            "invalid value for header x",
        ),
        (
            "POST",
            list(&[("x", b"a\0b")]),
            false,
            "invalid value for header x",
        ),
        (
            "POST",
            list(&[("content-length", b"3"), ("content-length", b"4")]),
            true,
            "conflicting",
        ),
        (
            "POST",
            list(&[("content-length", b"5")]),
            false,
            "without a body",
        ),
    ];
    for (method, headers, has_body, expected) in cases {
        let err = head(method, &headers, has_body).unwrap_err();
        assert!(err.contains(expected), "{method:?} {headers:?}: {err}");
    }
    for bad in [&b"-1"[..], b"1e3", b"", b" 3", b"99999999999999999999"] {
        let err = head("POST", &list(&[("content-length", bad)]), true).unwrap_err();
        assert!(err.contains("invalid content-length"), "{bad:?}: {err}");
    }
}

#[test]
fn token_bytes_are_those_of_rfc_9110() {
    let tchar = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    for b in 0..=255u8 {
        assert_eq!(is_token_byte(b), tchar(b), "{b:#04x}");
    }
}

#[test]
fn chunk_sizes_are_written_in_hex() {
    for (len, expected) in [
        (1, "1\r\n"),
        (15, "f\r\n"),
        (16, "10\r\n"),
        (4096, "1000\r\n"),
        (0xabcdef, "abcdef\r\n"),
    ] {
        let mut out = BytesMut::new();
        put_chunk_header(&mut out, len);
        assert_eq!(&out[..], expected.as_bytes());
    }
    let mut out = BytesMut::new();
    put_chunk(&mut out, b"hello");
    out.put_slice(LAST_CHUNK);
    assert_eq!(&out[..], b"5\r\nhello\r\n0\r\n\r\n");
}

fn parse(text: &[u8], head_request: bool) -> Result<Parsed, ResponseError> {
    parse_response_head(text, head_request)
}

fn final_head(text: &[u8]) -> (ResponseHead, usize) {
    match parse(text, false).unwrap() {
        Parsed::Final { head, len } => (head, len),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_response_head_is_parsed_in_order_with_names_lowered() {
    let text = b"HTTP/1.1 201 Created\r\nContent-Type: application/json\r\nSet-Cookie: a=1\r\n\
X-Raw: \xff\xfe\r\nset-cookie: b=2\r\nContent-Length: 2\r\n\r\n{}";
    let (head, len) = final_head(text);
    assert_eq!(len, text.len() - 2);
    assert_eq!(head.status, 201);
    assert_eq!(head.framing, ResponseFraming::Length(2));
    assert!(head.keep_alive);
    let got: Vec<(&str, &[u8])> = head.headers.iter().collect();
    assert_eq!(
        got,
        [
            ("content-type", &b"application/json"[..]),
            ("set-cookie", b"a=1"),
            ("x-raw", b"\xff\xfe"),
            ("set-cookie", b"b=2"),
            ("content-length", b"2"),
        ]
    );
}

#[test]
fn every_prefix_of_a_head_is_partial() {
    let text = b"HTTP/1.1 200 OK\r\nA: 1\r\nContent-Length: 0\r\n\r\n";
    for end in 0..text.len() {
        assert!(
            matches!(parse(&text[..end], false), Ok(Parsed::Partial)),
            "{end}"
        );
    }
    assert!(matches!(parse(text, false), Ok(Parsed::Final { .. })));
}

#[test]
fn interim_answers_are_skipped_and_switching_protocols_is_refused() {
    let text = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
    match parse(text, false).unwrap() {
        Parsed::Interim { len } => assert_eq!(len, 25),
        other => panic!("{other:?}"),
    }
    let err = parse(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
        false,
    )
    .unwrap_err();
    assert_eq!(err, ResponseError::SwitchedProtocols);
}

#[test]
fn the_body_is_framed_as_rfc_9112_says() {
    use ResponseFraming::*;
    let cases: [(&[u8], bool, ResponseFraming, bool); 11] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            false,
            Length(5),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\n",
            false,
            Length(5),
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            Chunked,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, Chunked\r\nContent-Length: 9\r\n\r\n",
            false,
            Chunked,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            false,
            UntilClose,
            false,
        ),
        (b"HTTP/1.1 200 OK\r\n\r\n", false, UntilClose, false),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            true,
            Empty,
            true,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", false, Empty, true),
        (
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n",
            false,
            Empty,
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n",
            false,
            Length(0),
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
            false,
            Length(1),
            false,
        ),
    ];
    for (text, head_request, framing, keep_alive) in cases {
        match parse(text, head_request).unwrap() {
            Parsed::Final { head, .. } => {
                assert_eq!(head.framing, framing, "{}", String::from_utf8_lossy(text));
                assert_eq!(
                    head.keep_alive,
                    keep_alive,
                    "{}",
                    String::from_utf8_lossy(text)
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn malformed_response_heads_are_named() {
    let cases: [(&[u8], ResponseError); 8] = [
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            ResponseError::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
            ResponseError::BadContentLength,
        ),
        (
            b"HTTP/1.1 200 OK\r\nBad Name: 1\r\n\r\n",
            ResponseError::Malformed("invalid header name"),
        ),
        (
            b"HTTP/1.1 2x0 OK\r\n\r\n",
            ResponseError::Malformed("invalid status"),
        ),
        (
            b"SPDY/3 200 OK\r\n\r\n",
            ResponseError::Malformed("not HTTP/1.x"),
        ),
        (
            b"HTTP/1.1 000 Zero\r\n\r\n",
            ResponseError::Malformed("invalid status code"),
        ),
        // A TLS alert (an HTTPS app given plain HTTP) and a TLS handshake record.
        (b"\x15\x03\x03\x00\x02\x02\x32", ResponseError::Tls),
        (
            b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
            ResponseError::Tls,
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            parse(text, false).unwrap_err(),
            expected,
            "{}",
            String::from_utf8_lossy(text)
        );
    }
}

#[test]
fn heads_beyond_the_limits_are_refused() {
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(
        parse(&many, false).unwrap_err(),
        ResponseError::TooManyHeaders
    );
    let mut endless = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    endless.resize(MAX_HEAD_BYTES, b'a');
    assert_eq!(
        parse(&endless, false).unwrap_err(),
        ResponseError::HeadTooLarge
    );
}

/// Feeds `wire` to a decoder in pieces of `step` bytes; returns the body and whether it ended.
fn decode_in_steps(wire: &[u8], step: usize, max: usize) -> Result<(Vec<u8>, bool), ResponseError> {
    let mut decoder = ChunkedDecoder::default();
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut fed = 0;
    loop {
        match decoder.decode(&mut buf, max)? {
            Chunk::Data(data) => {
                assert!(!data.is_empty() && data.len() <= max);
                body.extend_from_slice(&data);
            }
            Chunk::Done => return Ok((body, true)),
            Chunk::NeedMore if fed == wire.len() => return Ok((body, false)),
            Chunk::NeedMore => {
                let end = (fed + step).min(wire.len());
                buf.extend_from_slice(&wire[fed..end]);
                fed = end;
            }
        }
    }
}

#[test]
fn a_chunked_body_decodes_whatever_the_reads() {
    let wire =
        b"5;name=value\r\nhello\r\n1A \r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-trailer: 1\r\n\r\n";
    for step in [1, 2, 3, 7, wire.len()] {
        let (body, done) = decode_in_steps(wire, step, 1 << 20).unwrap();
        assert_eq!(&body[..], b"helloabcdefghijklmnopqrstuvwxyz", "{step}");
        assert!(done);
    }
    let (body, done) = decode_in_steps(&wire[..wire.len() - 2], 4, 3).unwrap();
    assert_eq!(body.len(), 31);
    assert!(!done, "no end without the blank line after trailers");
}

#[test]
fn broken_chunked_bodies_are_named() {
    let cases: [(&[u8], &str); 6] = [
        (b"x\r\n", "no chunk size"),
        (b"3\r\nabcX\r\n", "no line break after a chunk"),
        (b"3\nabc\r\n", "line not ended by CRLF"),
        (b"3 x\r\nabc\r\n", "invalid chunk size line"),
        (b"1000000000000000\r\n", "chunk size too large"),
        (b"3;\x01\r\nabc\r\n", "invalid chunk size line"),
    ];
    for (wire, expected) in cases {
        assert_eq!(
            decode_in_steps(wire, wire.len(), 64).unwrap_err(),
            ResponseError::BadChunk(expected),
            "{}",
            String::from_utf8_lossy(wire)
        );
    }
    let long = vec![b'1'; MAX_LINE + 1];
    assert_eq!(
        decode_in_steps(&long, long.len(), 64).unwrap_err(),
        ResponseError::BadChunk("line too long")
    );
    let mut trailers = b"0\r\n".to_vec();
    while trailers.len() <= MAX_TRAILER_BYTES * 2 {
        trailers.extend_from_slice(b"x-trailer: 0123456789012345678901234567890123456789\r\n");
    }
    assert_eq!(
        decode_in_steps(&trailers, 4096, 64).unwrap_err(),
        ResponseError::BadChunk("trailers too large")
    );
}

proptest! {
    #[test]
    fn what_is_chunked_decodes_to_itself(
        pieces in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
        step in 1usize..64,
        max in 1usize..128,
    ) {
        let mut wire = BytesMut::new();
        for piece in &pieces {
            put_chunk(&mut wire, piece);
        }
        wire.put_slice(LAST_CHUNK);
        let (body, done) = decode_in_steps(&wire, step, max).unwrap();
        prop_assert_eq!(body, pieces.concat());
        prop_assert!(done);
    }

    #[test]
    fn no_input_makes_the_parsers_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_response_head(&bytes, false);
        let _ = decode_in_steps(&bytes, 7, 16);
    }
}
