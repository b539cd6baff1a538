//! Plain webhooks are served by the relay's own HTTP/1 path (relay/src/http1): on kept-alive
//! connections, beside requests hyper takes over, with the caller's hang-up still cancelling.

use ferry_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

async fn tunnel(behaviour: Behaviour) -> (TestRelay, TestClient, Origin) {
    let origin = Origin::start(behaviour).await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    (relay, client, origin)
}

/// Reads one answer framed by `Content-Length` from `stream`, keeping what follows in `pending`.
async fn next_answer(stream: &mut TcpStream, pending: &mut Vec<u8>) -> RawResponse {
    let work = async {
        loop {
            if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|line| line.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                // Interim answers (`100 Continue`) have no body.
                let length = if head.starts_with("http/1.1 1") {
                    0
                } else {
                    length
                };
                if pending.len() >= end + 4 + length {
                    let response = parse_response(&pending[..end + 4 + length]).unwrap();
                    pending.drain(..end + 4 + length);
                    if response.status >= 200 {
                        return response;
                    }
                    continue;
                }
            }
            let mut buf = [0u8; 16 * 1024];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before an answer: {:?}",
                String::from_utf8_lossy(pending)
            );
            pending.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT_TIMEOUT, work)
        .await
        .expect("an answer in time")
}

#[tokio::test]
async fn webhooks_on_a_kept_alive_connection_arrive_exactly_with_hyper_taking_over_midway() {
    let (relay, client, origin) = tunnel(Behaviour::Echo).await;
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    let mut pending = Vec::new();
    let session = &client.session;
    let bodies = [
        &b"{\"id\":\"evt_1\"}"[..],
        b"",
        &[0xff, 0x00, b'\r', b'\n', 0xfe],
    ];
    for (i, body) in bodies.iter().enumerate() {
        let head = format!(
            "POST /{session}/hook/{i}?q=1 HTTP/1.1\r\nHost: relay\r\nStripe-Signature: t=1,v1=a{i}\r\n\
             X-Dup: 1\r\nContent-Length: {}\r\nX-Dup: 2\r\nX-Dup: 3\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(body).await.unwrap();
        let answer = next_answer(&mut stream, &mut pending).await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.body, *body, "echoed");
        let seen = origin.next_request().await;
        assert_eq!(seen.uri, format!("/hook/{i}?q=1"));
        assert_eq!(
            seen.header("stripe-signature").unwrap(),
            format!("t=1,v1=a{i}").as_bytes()
        );
        assert_eq!(seen.header_all("x-dup"), [b"1", b"2", b"3"]);
        assert_eq!(seen.body.as_deref(), Some(*body));
        assert_eq!(seen.connection, 0, "one connection to the app");
    }
    // `Expect` is hyper's to answer; the connection goes on with it.
    let head = format!(
        "POST /{session}/expect HTTP/1.1\r\nHost: relay\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"after").await.unwrap();
    let answer = next_answer(&mut stream, &mut pending).await;
    assert_eq!(
        (answer.status, answer.body.as_slice()),
        (200, &b"after"[..])
    );
    // And once hyper has it, it serves plain webhooks too.
    let head =
        format!("POST /{session}/last HTTP/1.1\r\nHost: relay\r\nContent-Length: 4\r\n\r\nlast");
    stream.write_all(head.as_bytes()).await.unwrap();
    let answer = next_answer(&mut stream, &mut pending).await;
    assert_eq!((answer.status, answer.body.as_slice()), (200, &b"last"[..]));
}

/// An app that answers one request `200` and hands over its head as it came off the wire.
async fn raw_app() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 8192];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the app's connection closed mid-head");
            seen.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
        // Held open until the client is done with it.
        let _ = tcp.read(&mut buf).await;
    });
    (addr, rx)
}

#[tokio::test]
async fn header_lines_reach_the_app_in_the_order_they_were_sent() {
    let (app, head) = raw_app().await;
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app.to_string())).await;
    let request = format!(
        "GET /{}/order HTTP/1.1\r\nHost: relay\r\nX-A: 1\r\nX-B: 2\r\nX-A: 3\r\nX-C: \r\nx-b: 4\r\n\r\n",
        client.session
    );
    let answer = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
    assert_eq!(answer.status, 200);
    let head = head.await.unwrap();
    let lines: Vec<&str> = head
        .lines()
        .filter(|line| {
            line.starts_with("x-a:") || line.starts_with("x-b:") || line.starts_with("x-c:")
        })
        .collect();
    assert_eq!(
        lines,
        ["x-a: 1", "x-b: 2", "x-a: 3", "x-c: ", "x-b: 4"],
        "{head}"
    );
}

#[tokio::test]
async fn an_answer_of_unknown_length_is_relayed_chunked_and_whole() {
    let len = 300_000;
    let (relay, client, _origin) = tunnel(Behaviour::LargeBody { len, chunked: true }).await;
    let request = format!(
        "POST /{}/big HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\n\r\n{{}}",
        client.session
    );
    let answer = parse_response(&raw_http(relay.addr, request.as_bytes()).await).unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("transfer-encoding"), Some(&b"chunked"[..]));
    assert_eq!(answer.body, pattern(0, len as usize));
}

#[tokio::test]
async fn a_caller_that_hangs_up_cancels_its_exchange() {
    let (relay, mut client, origin) = tunnel(Behaviour::Hang).await;
    let mut stream = TcpStream::connect(relay.addr).await.unwrap();
    let request = format!(
        "POST /{}/slow HTTP/1.1\r\nHost: relay\r\nContent-Length: 2\r\n\r\n{{}}",
        client.session
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    assert_eq!(origin.next_request().await.uri, "/slow");
    drop(stream);
    let event = client
        .wait_for(WAIT_TIMEOUT, |event| match event {
            ferry_client::Event::Request(request) => Some(request.clone()),
            _ => None,
        })
        .await;
    let error = event.error.expect("an error");
    assert!(error.contains("cancelled"), "{error}");
}
