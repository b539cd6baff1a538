//! Tests of the end-to-end harness itself (origin, stall proxy, helpers).

use std::time::Duration;

use bytes::Bytes;
use ferry_tests::{
    body_channel, body_digest, chunked_body, http_client, parse_head_response, parse_response,
    pattern, pattern_sha256_hex, raw_http, raw_http_to_eof, send, send_with, sha256_hex, try_send,
    Behaviour, FixedResponse, Origin, ReadGate, StallProxy,
};
use http::{Method, Request, StatusCode, Version};
use http_body_util::BodyExt;

const SHORT: Duration = Duration::from_millis(300);

#[tokio::test]
async fn echo_round_trip() {
    let origin = Origin::start(Behaviour::Echo).await;
    let body = Bytes::from_static(b"hello ferry");
    let (status, headers, got) = send(
        Method::POST,
        &origin.url("/a/b?x=1&y=%20"),
        &[
            ("x-dup", "one"),
            ("x-dup", "two"),
            ("content-type", "text/plain"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, body);
    assert_eq!(headers["x-body-sha256"], sha256_hex(&body).as_str());
    assert_eq!(headers["x-origin-method"], "POST");
    assert_eq!(headers["x-origin-uri"], "/a/b?x=1&y=%20");

    let rec = origin.next_request().await;
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.uri, "/a/b?x=1&y=%20");
    assert_eq!(rec.version, Version::HTTP_11);
    assert_eq!(rec.header_all("x-dup"), vec![&b"one"[..], &b"two"[..]]);
    assert_eq!(rec.header_str("content-type"), Some("text/plain"));
    assert_eq!(rec.body_len, body.len() as u64);
    assert_eq!(rec.body_sha256_hex, sha256_hex(&body));
    assert_eq!(rec.body.as_ref(), Some(&body));
    assert!(rec.body_complete);
    assert_eq!(origin.requests().len(), 1);
    assert!(origin.try_next_request().is_none());
}

#[tokio::test]
async fn echo_chunked_and_keep_alive() {
    let origin = Origin::start(Behaviour::Echo).await;
    let client = http_client();
    let chunks = vec![
        Bytes::from_static(b"ab"),
        Bytes::new(),
        Bytes::from_static(b"cde"),
    ];
    for _ in 0..2 {
        let (status, headers, got) = send_with(
            &client,
            Method::PUT,
            &origin.url("/c"),
            &[],
            chunked_body(chunks.clone()),
        )
        .await
        .unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&got[..], b"abcde");
        assert_eq!(headers["x-body-sha256"], sha256_hex(b"abcde").as_str());
    }
    let first = origin.next_request().await;
    let second = origin.next_request().await;
    assert_eq!(first.header_str("transfer-encoding"), Some("chunked"));
    assert!(first.header("content-length").is_none());
    assert_eq!(first.connection, second.connection, "keep-alive reused");
    assert_eq!(origin.connections(), 1);
}

#[tokio::test]
async fn echo_streams_large_bodies() {
    let origin = Origin::start(Behaviour::Echo).await;
    let (tx, body) = body_channel(2);
    let len: u64 = 8 * 1024 * 1024;
    tokio::spawn(async move {
        let mut off = 0u64;
        while off < len {
            let chunk = pattern(off, 100_000.min((len - off) as usize));
            off += chunk.len() as u64;
            if tx.send(Ok(chunk.into())).await.is_err() {
                return;
            }
        }
    });
    let req = Request::post(origin.url("/big")).body(body).unwrap();
    let resp = http_client().request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-origin-streamed"], "1");
    let (got_len, got_sha) = body_digest(resp.into_body()).await.unwrap();
    let rec = origin.next_request().await;
    assert_eq!(got_len, len);
    assert_eq!(rec.body_len, len);
    assert_eq!(got_sha, pattern_sha256_hex(len));
    assert_eq!(rec.body_sha256_hex, got_sha);
    assert!(rec.body.is_none(), "large bodies are not kept");
    assert!(rec.body_complete);
}

#[tokio::test]
async fn fixed_and_large_responses() {
    let origin = Origin::start(Behaviour::Fixed(
        FixedResponse::new(418, "teapot")
            .header("set-cookie", "a=1")
            .header("set-cookie", "b=2"),
    ))
    .await;
    let (status, headers, body) = send(Method::GET, &origin.url("/"), &[], "").await;
    assert_eq!(status.as_u16(), 418);
    assert_eq!(&body[..], b"teapot");
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);

    for chunked in [false, true] {
        let len = 3 * 1024 * 1024 + 7;
        origin.set_behaviour(Behaviour::LargeBody { len, chunked });
        let raw = raw_http(
            origin.addr(),
            b"GET /large HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        )
        .await;
        let resp = parse_response(&raw).expect("complete response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body.len() as u64, len);
        assert_eq!(sha256_hex(&resp.body), pattern_sha256_hex(len));
        assert_eq!(resp.header("content-length").is_none(), chunked);
    }

    let raw = raw_http(origin.addr(), b"HEAD /large HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let resp = parse_head_response(&raw).expect("complete HEAD response");
    assert_eq!(resp.status, 200);
    assert!(resp.body.is_empty());
}

#[tokio::test]
async fn slow_reader_applies_backpressure() {
    let gate = ReadGate::new();
    let origin = Origin::start(Behaviour::SlowReader(gate.clone())).await;
    let (tx, body) = body_channel(1);
    let url = origin.url("/upload");
    let request = tokio::spawn(async move { try_send(Method::POST, &url, &[], body).await });

    // Feed 64 MiB; with the gate closed the sender must block long before
    // the end (socket buffers are far smaller).
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let mut sent = 0usize;
    let blocked = loop {
        match tokio::time::timeout(SHORT, tx.send(Ok(chunk.clone()))).await {
            Ok(res) => res.unwrap(),
            Err(_) => break true,
        }
        sent += 1;
        if sent == 1024 {
            break false;
        }
    };
    assert!(blocked, "upload was never blocked by the slow reader");
    assert_eq!(gate.bytes_read(), 0);

    gate.allow(1);
    let first = gate.wait_bytes_read(1).await;
    assert!(first as usize <= sent * chunk.len());

    gate.open();
    let total = (sent + 1) * chunk.len();
    tx.send(Ok(chunk.clone())).await.unwrap();
    drop(tx);
    let (status, headers, _) = request.await.unwrap().unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-body-len"], total.to_string().as_str());
    assert_eq!(gate.bytes_read(), total as u64);
    assert_eq!(origin.next_request().await.body_len, total as u64);
}

#[tokio::test]
async fn hang_records_head_and_close_drops() {
    let origin = Origin::start(Behaviour::route(|parts| {
        if parts.uri.path() == "/hang" {
            Behaviour::Hang
        } else {
            Behaviour::Close
        }
    }))
    .await;
    let url = origin.url("/hang");
    let hung = tokio::spawn(async move { send(Method::POST, &url, &[], "abc").await });
    let rec = origin.next_request().await;
    assert_eq!(rec.uri, "/hang");
    assert!(!rec.body_complete);
    assert!(tokio::time::timeout(SHORT, hung).await.is_err());

    let err = try_send(
        Method::GET,
        &origin.url("/close"),
        &[],
        ferry_tests::empty_body(),
    )
    .await;
    assert!(err.is_err(), "closed connection must fail the request");
    assert_eq!(origin.next_request().await.uri, "/close");

    let raw = raw_http_to_eof(origin.addr(), b"GET /close HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(raw.is_empty());
}

#[tokio::test]
async fn stall_proxy_stalls_and_resumes() {
    let origin = Origin::start(Behaviour::Echo).await;
    let proxy = StallProxy::start(origin.addr()).await;
    let via_proxy = format!("http://{}/p", proxy.addr());

    let (status, _, body) = send(Method::POST, &via_proxy, &[], "one").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"one"[..]));
    proxy.wait_for_connections(1).await;
    assert!(proxy.bytes_up() > 0 && proxy.bytes_down() > 0);

    proxy.stall();
    let url = via_proxy.clone();
    let mut stalled = tokio::spawn(async move { send(Method::POST, &url, &[], "two").await });
    assert!(
        tokio::time::timeout(SHORT, &mut stalled).await.is_err(),
        "request through a stalled proxy completed"
    );
    proxy.wait_for_connections(2).await;
    assert_eq!(
        proxy.active_connections(),
        2,
        "stall must not close sockets"
    );
    // The origin itself is fine.
    let (status, _, body) = send(Method::POST, &origin.url("/d"), &[], "direct").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"direct"[..]));

    proxy.resume();
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), stalled)
        .await
        .expect("resumed request finishes")
        .unwrap();
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"two"[..]));
}

#[tokio::test]
async fn stall_proxy_cut_aborts_connections() {
    let origin = Origin::start(Behaviour::Hang).await;
    let proxy = StallProxy::start(origin.addr()).await;
    let url = format!("http://{}/", proxy.addr());
    let pending =
        tokio::spawn(
            async move { try_send(Method::GET, &url, &[], ferry_tests::empty_body()).await },
        );
    origin.next_request().await;
    proxy.cut();
    let res = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("cut ends the request")
        .unwrap();
    assert!(res.is_err());

    // New connections work after a cut.
    origin.set_behaviour(Behaviour::fixed(204, ""));
    let (status, _, _) = send(Method::GET, &format!("http://{}/", proxy.addr()), &[], "").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_eq!(proxy.connections(), 2);
}

#[tokio::test]
async fn refusing_addr_refuses() {
    let addr = Origin::refusing_addr();
    assert!(addr.ip().is_loopback());
    let err = tokio::net::TcpStream::connect(addr).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[tokio::test]
async fn dropping_origin_closes_connections() {
    let origin = Origin::start(Behaviour::Hang).await;
    let url = origin.url("/");
    let pending = tokio::spawn(async move {
        let req = Request::get(url).body(ferry_tests::empty_body()).unwrap();
        match http_client().request(req).await {
            Ok(resp) => resp
                .into_body()
                .collect()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    });
    origin.next_request().await;
    origin.shutdown().await;
    let res = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("shutdown ends the request")
        .unwrap();
    assert!(res.is_err());
}
