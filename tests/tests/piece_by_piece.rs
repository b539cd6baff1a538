//! Bodies stream through the tunnel piece by piece, both ways: an answer the app writes in parts
//! (server-sent events, a progress log) reaches the caller part by part while the app still holds
//! the rest, and a request body the caller sends in parts reaches the app the same way. Each test
//! holds the sender back until the receiver has seen the first part, so a tunnel that waited for
//! a whole body would hang (and the test fail at its deadline) instead of passing.

use std::time::Duration;

use ferry_tests::*;
use http_body_util::BodyExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Longest wait for a part that should come: a failure, not a synchronisation.
const DEADLINE: Duration = Duration::from_secs(10);

/// The answer's head and its first event; the second event and the end come when released.
const EVENTS_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n";
const FIRST_EVENT: &[u8] = b"data: first\n\n";
const SECOND_EVENT: &[u8] = b"data: second\n\n";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Reads from `tcp` into `seen` until `needle` is in it.
async fn read_until(tcp: &mut TcpStream, seen: &mut Vec<u8>, needle: &[u8]) {
    let wait = async {
        let mut buf = [0u8; 4096];
        while !contains(seen, needle) {
            let n = tcp.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed before {:?} came; had {:?}",
                String::from_utf8_lossy(needle),
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    };
    if tokio::time::timeout(DEADLINE, wait).await.is_err() {
        panic!(
            "{:?} did not come; had {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(seen)
        );
    }
}

/// An app that answers every request with [`EVENTS_HEAD`] and [`FIRST_EVENT`], then writes
/// [`SECOND_EVENT`] and the end of the answer once the test sends on the returned channel.
async fn event_app() -> (String, mpsc::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (release, mut released) = mpsc::channel::<()>(4);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut seen = Vec::new();
            read_until(&mut tcp, &mut seen, b"\r\n\r\n").await;
            let mut first = EVENTS_HEAD.to_vec();
            first.extend_from_slice(format!("{:x}\r\n", FIRST_EVENT.len()).as_bytes());
            first.extend_from_slice(FIRST_EVENT);
            first.extend_from_slice(b"\r\n");
            tcp.write_all(&first).await.unwrap();
            if released.recv().await.is_none() {
                return;
            }
            let mut rest = format!("{:x}\r\n", SECOND_EVENT.len()).into_bytes();
            rest.extend_from_slice(SECOND_EVENT);
            rest.extend_from_slice(b"\r\n0\r\n\r\n");
            tcp.write_all(&rest).await.unwrap();
            // Held open until the client is done with it.
            let _ = tcp.read(&mut [0u8; 64]).await;
        }
    });
    (addr, release)
}

#[tokio::test]
async fn an_answer_the_app_streams_reaches_an_http1_caller_piece_by_piece() {
    let (app, release) = event_app().await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app)).await;

    let mut caller = TcpStream::connect(relay.addr).await.unwrap();
    let request = format!(
        "GET /{}/events HTTP/1.1\r\nHost: relay.test\r\nAccept: text/event-stream\r\n\r\n",
        client.session
    );
    caller.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    read_until(&mut caller, &mut seen, FIRST_EVENT).await;
    let head = parse_head_response(&seen).expect("an answer's head");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some(&b"text/event-stream"[..]));
    assert!(!contains(&seen, SECOND_EVENT));

    release.send(()).await.unwrap();
    read_until(&mut caller, &mut seen, SECOND_EVENT).await;
    read_until(&mut caller, &mut seen, b"\r\n0\r\n\r\n").await;
}

#[tokio::test]
async fn an_answer_the_app_streams_reaches_an_http2_caller_piece_by_piece() {
    let (app, release) = event_app().await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app)).await;

    let http2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<TestBody>();
    let request = http::Request::get(format!("{}/events", client.url))
        .body(empty_body())
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, http2.request(request))
        .await
        .expect("the head came")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut seen = Vec::new();
    while !contains(&seen, FIRST_EVENT) {
        let frame = tokio::time::timeout(DEADLINE, body.frame())
            .await
            .expect("the first event came")
            .expect("the body goes on")
            .unwrap();
        seen.extend_from_slice(frame.data_ref().expect("data"));
    }
    assert!(!contains(&seen, SECOND_EVENT));

    release.send(()).await.unwrap();
    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the rest came")
        .unwrap()
        .to_bytes();
    seen.extend_from_slice(&rest);
    assert_eq!(seen, [FIRST_EVENT, SECOND_EVENT].concat());
}

#[tokio::test]
async fn a_request_body_the_caller_streams_reaches_the_app_piece_by_piece() {
    // The app tells the test when it has read the first piece, then answers once the body ends.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap().to_string();
    let (first_seen, mut first_seen_rx) = mpsc::channel::<Vec<u8>>(1);
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        read_until(&mut tcp, &mut seen, b"first-piece").await;
        first_seen.send(seen.clone()).await.unwrap();
        read_until(&mut tcp, &mut seen, b"second-piece").await;
        read_until(&mut tcp, &mut seen, b"\r\n0\r\n\r\n").await;
        tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nall read")
            .await
            .unwrap();
        let _ = tcp.read(&mut [0u8; 64]).await;
    });
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app)).await;

    let mut caller = TcpStream::connect(relay.addr).await.unwrap();
    let head = format!(
        "POST /{}/upload HTTP/1.1\r\nHost: relay.test\r\nTransfer-Encoding: chunked\r\n\r\n",
        client.session
    );
    caller.write_all(head.as_bytes()).await.unwrap();
    caller.write_all(b"b\r\nfirst-piece\r\n").await.unwrap();
    let at_app = tokio::time::timeout(DEADLINE, first_seen_rx.recv())
        .await
        .expect("the first piece reached the app before the rest was sent")
        .unwrap();
    assert!(contains(&at_app, b"POST /upload HTTP/1.1\r\n"));
    assert!(!contains(&at_app, b"second-piece"));

    caller
        .write_all(b"c\r\nsecond-piece\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    read_until(&mut caller, &mut seen, b"all read").await;
    assert_eq!(parse_head_response(&seen).unwrap().status, 200);
}
