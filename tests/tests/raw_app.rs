//! Apps that answer in every way HTTP/1.1 allows, written byte by byte: whatever framing the
//! app picks, the caller gets its status, headers and body through the tunnel.

use bytes::Bytes;
use ferry_tests::*;
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The raw answer the app gives to a request for `path`.
fn answer_for(path: &str) -> &'static [u8] {
    match path {
        "/chunked" => {
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: dropped\r\n\r\n"
        }
        "/http10" => b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the app closes",
        "/continue" => {
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
        }
        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nX-Head: yes\r\n\r\n",
        "/headers" => {
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Mixed-Case: \xffraw\r\nset-cookie: b=2\r\n\
Content-Length: 0\r\n\r\n"
        }
        "/switch" => {
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        }
        "/broken" => b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part of it",
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    }
}

/// Serves one connection: reads each request head (and a `Content-Length` body), answers it,
/// and closes after an answer delimited by the close or cut short.
async fn serve(mut tcp: TcpStream) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let end = loop {
            if let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        };
        let head = String::from_utf8_lossy(&seen[..end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .map_or(0, |n| n.trim().parse().unwrap());
        while seen.len() < end + length {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        seen.drain(..end + length);
        let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
        if path == "/split" {
            // Head and body in two writes, as Python's http.server (and so Flask's and
            // Django's development servers) writes them; Nagle's algorithm is on.
            let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
            if tcp.write_all(head).await.is_err() || tcp.write_all(b"split").await.is_err() {
                return;
            }
            continue;
        }
        let answer = answer_for(&path);
        if tcp.write_all(answer).await.is_err() {
            return;
        }
        if matches!(path.as_str(), "/http10" | "/broken" | "/switch") {
            return; // the close ends (or cuts) the answer
        }
    }
}

async fn tunnel_to_raw_app() -> (TestRelay, TestClient) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(serve(tcp));
        }
    });
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &addr)).await;
    (relay, client)
}

#[tokio::test]
async fn every_framing_of_an_answer_comes_back_whole() {
    let (_relay, client) = tunnel_to_raw_app().await;
    let url = |path: &str| format!("{}{path}", client.url);

    let (status, headers, body) = send(Method::GET, &url("/chunked"), &[], Bytes::new()).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"hello, world"[..]));
    assert_eq!(headers["content-type"], "text/plain");
    assert!(
        headers.get("x-trailer").is_none(),
        "trailers are not carried"
    );

    let (status, _, body) = send(Method::GET, &url("/http10"), &[], Bytes::new()).await;
    assert_eq!(
        (status.as_u16(), &body[..]),
        (200, &b"until the app closes"[..])
    );

    let (status, _, body) = send(
        Method::POST,
        &url("/continue"),
        &[("content-type", "application/json")],
        Bytes::from_static(b"{\"a\":1}"),
    )
    .await;
    assert_eq!((status.as_u16(), &body[..]), (201, &b"ok"[..]));

    let (status, headers, body) = send(Method::HEAD, &url("/head"), &[], Bytes::new()).await;
    assert_eq!((status.as_u16(), body.len()), (200, 0));
    assert_eq!(headers["x-head"], "yes");
    assert_eq!(headers["content-length"], "1234");

    let (status, headers, _) = send(Method::GET, &url("/headers"), &[], Bytes::new()).await;
    assert_eq!(status, 200);
    let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(headers["x-mixed-case"].as_bytes(), b"\xffraw");

    // Each answer above went out on a connection the client could reuse, or on a new one
    // after a close: none of them failed the next.
    let (status, _, body) = send(Method::GET, &url("/chunked"), &[], Bytes::new()).await;
    assert_eq!((status.as_u16(), &body[..]), (200, &b"hello, world"[..]));
}

#[tokio::test]
async fn answers_ferry_cannot_pass_on_are_named() {
    let (_relay, client) = tunnel_to_raw_app().await;
    let (status, _, body) = send(
        Method::GET,
        &format!("{}/switch", client.url),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 502);
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("switched protocols"), "{text}");

    // An answer cut short: the caller's body breaks off instead of looking complete.
    let result = try_send(
        Method::GET,
        &format!("{}/broken", client.url),
        &[],
        empty_body(),
    )
    .await;
    match result {
        Err(_) => {}
        Ok((status, _, body)) => panic!("a cut answer looked whole: {status} {body:?}"),
    }
}

#[tokio::test]
async fn an_answer_written_in_two_writes_is_not_held_back_by_delayed_acknowledgements() {
    // The app holds its body back until its head is acknowledged (Nagle), and on a connection
    // kept alive the kernel delays that acknowledgement by 40 ms unless the client asks for it
    // at once: without that, nearly every one of these answers takes 40 ms or more.
    let (_relay, client) = tunnel_to_raw_app().await;
    let url = format!("{}/split", client.url);
    let mut held_back = 0;
    for _ in 0..20 {
        let started = std::time::Instant::now();
        let (status, _, body) = send(Method::GET, &url, &[], Bytes::new()).await;
        assert_eq!((status.as_u16(), &body[..]), (200, &b"split"[..]));
        if started.elapsed() >= std::time::Duration::from_millis(35) {
            held_back += 1;
        }
    }
    assert!(
        held_back <= 5,
        "{held_back} of 20 answers took 35 ms or more"
    );
}
