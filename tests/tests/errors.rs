//! Every way a webhook can fail gets a status that fits and a body that names the problem.

use std::time::Duration;

use bytes::Bytes;
use ferry_tests::*;
use http::Method;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("JSON error body, got {:?}", String::from_utf8_lossy(body)))
}

#[tokio::test]
async fn unknown_session_is_404() {
    let relay = TestRelay::start().await;
    let (status, _, body) = send(
        Method::POST,
        &format!("{}/no-such-session/hook", relay.url()),
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, 404);
    let body = json(&body);
    assert_eq!(body["error"], "unknown session");
    assert!(body["detail"].as_str().unwrap().contains("no-such-session"));
}

#[tokio::test]
async fn relay_paths_are_never_routed_to_sessions() {
    let relay = TestRelay::start().await;
    let (status, _, body) = send(
        Method::GET,
        &format!("{}/_ferry/health", relay.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(json(&body)["status"], "ok");
    let (status, _, _) = send(
        Method::POST,
        &format!("{}/_ferry/anything", relay.url()),
        &[],
        "{}",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _, body) = send(
        Method::GET,
        &format!("{}/_ferry/v1/connect", relay.url()),
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 401, "the tunnel endpoint wants a token first");
    assert!(json(&body)["detail"].as_str().unwrap().contains("Bearer"));
    let (status, _, body) = send(
        Method::GET,
        &format!("{}/_ferry/v1/connect", relay.url()),
        &[("authorization", "Bearer nope")],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(json(&body)["error"], "unauthorized");
    let bearer = format!("Bearer {TOKEN}");
    let (status, headers, body) = send(
        Method::GET,
        &format!("{}/_ferry/v1/connect", relay.url()),
        &[("authorization", &bearer)],
        Bytes::new(),
    )
    .await;
    assert_eq!(status, 426, "a plain request with a good token");
    assert_eq!(headers["upgrade"], "websocket");
    assert!(json(&body)["detail"]
        .as_str()
        .unwrap()
        .contains("ferry listen"));
    let old_websocket = format!(
        "GET /_ferry/v1/connect HTTP/1.1\r\nhost: r\r\nauthorization: {bearer}\r\n\
         connection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 8\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-protocol: ferry.v1\r\n\r\n"
    );
    let response = parse_response(&raw_http(relay.addr, old_websocket.as_bytes()).await).unwrap();
    assert_eq!(response.status, 426);
    assert_eq!(response.header("sec-websocket-version"), Some(&b"13"[..]));
    let no_protocol = old_websocket
        .replace("sec-websocket-version: 8", "sec-websocket-version: 13")
        .replace("sec-websocket-protocol: ferry.v1\r\n", "");
    let response = parse_response(&raw_http(relay.addr, no_protocol.as_bytes()).await).unwrap();
    assert_eq!(response.status, 400);
    let detail = json(&response.body)["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains("no Ferry protocol"), "{detail}");
}

#[tokio::test]
async fn a_known_session_without_a_client_is_503_with_retry_after() {
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = TestRelay::start().await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    config.name = Some("gone-away".into());
    let client = TestClient::start(config).await;
    let url = client.url.clone();
    client.stop().await;
    // The relay learns of the goodbye asynchronously: a request racing it may still see the
    // tunnel closing (502). Every request round trip gives it that chance; 503 must follow.
    let mut answer = None;
    for _ in 0..100 {
        let (status, headers, body) = send(Method::POST, &format!("{url}/hook"), &[], "{}").await;
        if status != 502 {
            answer = Some((status, headers, body));
            break;
        }
    }
    let (status, headers, body) = answer.expect("the relay noticed the client left");
    assert_eq!(status, 503);
    assert!(headers.get("retry-after").is_some());
    assert_eq!(json(&body)["error"], "no client connected");
}

#[tokio::test]
async fn a_client_that_does_not_answer_in_time_is_504() {
    let origin = Origin::start(Behaviour::Hang).await;
    let relay = TestRelay::start_with(|c| c.timeout = Duration::from_millis(300)).await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let (status, _, body) = send(Method::POST, &format!("{}/slow", client.url), &[], "{}").await;
    assert_eq!(status, 504);
    assert_eq!(json(&body)["error"], "client timeout");
}

#[tokio::test]
async fn the_clients_own_timeout_answers_504_naming_the_target() {
    let origin = Origin::start(Behaviour::Hang).await;
    let relay = TestRelay::start().await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    config.timeout = Duration::from_millis(300);
    let mut client = TestClient::start(config).await;
    let (status, _, body) = send(Method::POST, &format!("{}/slow", client.url), &[], "{}").await;
    assert_eq!(status, 504);
    let body = json(&body);
    assert!(body["detail"]
        .as_str()
        .unwrap()
        .contains(&origin.addr().to_string()));
    let event = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            ferry_client::Event::Request(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(event.status, 504);
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_without_reading_it() {
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = TestRelay::start_with(|c| c.max_body = 1000).await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    // Declared length over the limit: refused from the head, before any body byte is sent.
    let head = format!(
        "POST /{}/big HTTP/1.1\r\nhost: r\r\ncontent-length: 5000000\r\n\r\n",
        client.session
    );
    let response = parse_response(&raw_http(relay.addr, head.as_bytes()).await).unwrap();
    assert_eq!(response.status, 413);
    assert_eq!(json(&response.body)["error"], "body too large");
    // Chunked, no declared length: cut off once it passes the limit.
    let chunks = vec![Bytes::from(vec![b'a'; 600]), Bytes::from(vec![b'b'; 600])];
    let (status, _, body) = try_send(
        Method::POST,
        &format!("{}/big", client.url),
        &[],
        chunked_body(chunks),
    )
    .await
    .unwrap();
    assert_eq!(status, 413);
    assert_eq!(json(&body)["error"], "body too large");
    // At the limit is fine.
    let (status, _, _) = send(
        Method::POST,
        &format!("{}/ok", client.url),
        &[],
        vec![b'c'; 1000],
    )
    .await;
    assert_eq!(status, 200);
}

/// Bad input on a raw socket: a status that fits, a JSON body naming the problem, the
/// connection closed after it, and the relay carrying on.
#[tokio::test]
async fn malformed_requests_get_a_fitting_status_and_a_body_naming_the_problem() {
    let (relay, origin) = (
        TestRelay::start().await,
        Origin::start(Behaviour::Echo).await,
    );
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let session = &client.session;
    let long_line = format!(
        "GET /{session}/{} HTTP/1.1\r\nhost: r\r\n\r\n",
        "a".repeat(70_000)
    );
    let long_head = format!(
        "GET /{session}/ HTTP/1.1\r\nhost: r\r\nx-big: {}\r\n\r\n",
        "a".repeat(70_000)
    );
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), 400, "request line"),
        (format!("GET /{session}/ HTTP/1.1\r\nhost: r\r\nbad header line\r\n\r\n").into_bytes(), 400, "header line"),
        (format!("POST /{session}/ HTTP/1.1\r\nhost: r\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab").into_bytes(), 400, "Content-Length"),
        (format!("POST /{session}/ HTTP/1.1\r\nhost: r\r\ncontent-length: -5\r\n\r\n").into_bytes(), 400, "Content-Length"),
        (format!("GET /{session}/ HTTP/1.1\r\nhost: r\r\nx-a: a\0b\r\n\r\n").into_bytes(), 400, "header value"),
        (format!("GET /{session}/ HTTP/2.0\r\nhost: r\r\n\r\n").into_bytes(), 505, "HTTP/1.1"),
        (format!("POST /{session}/ HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi").into_bytes(), 400, "Host"),
        (format!("POST /{session}/ HTTP/1.1\r\nhost: a\r\nhost: b\r\ncontent-length: 2\r\n\r\nhi").into_bytes(), 400, "Host"),
        // Requests hyper reads (chunked, HTTP/1.0) keep to the same rule for `Host`.
        (format!("POST /{session}/ HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n").into_bytes(), 400, "Host"),
        (format!("POST /{session}/ HTTP/1.0\r\nhost: a\r\nhost: b\r\ncontent-length: 2\r\n\r\nhi").into_bytes(), 400, "Host"),
        (
            format!("POST /{session}/ HTTP/1.1\r\nhost: r\r\ntransfer-encoding: gzip\r\n\r\n")
                .into_bytes(),
            400,
            "Transfer-Encoding",
        ),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(), 400, "TLS"),
        (long_line.into_bytes(), 414, "64 KiB"),
        (long_head.into_bytes(), 431, "64 KiB"),
    ];
    for (input, status, words) in cases {
        let raw = raw_http(relay.addr, &input).await;
        let shown = String::from_utf8_lossy(&input[..input.len().min(80)]).into_owned();
        let response = parse_response(&raw)
            .unwrap_or_else(|| panic!("{shown:?} -> {:?}", String::from_utf8_lossy(&raw)));
        assert_eq!(response.status, status, "{shown:?}");
        let body = json(&response.body);
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(words), "{shown:?} -> {detail}");
        assert!(!body["error"].as_str().unwrap().is_empty());
    }
    assert!(
        origin.requests().is_empty(),
        "nothing refused reached the app"
    );
    let (status, _, _) = send(Method::POST, &format!("{}/after", client.url), &[], "{}").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_local_app_that_is_down_gives_502_naming_target_and_cause() {
    let down = Origin::refusing_addr();
    let relay = TestRelay::start().await;
    let mut client = TestClient::start(client_config(&relay.url(), &down.to_string())).await;
    let (status, _, body) = send(Method::POST, &format!("{}/hook", client.url), &[], "{}").await;
    assert_eq!(status, 502);
    let body = json(&body);
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(&down.to_string()), "{detail}");
    assert!(detail.to_lowercase().contains("refused"), "{detail}");
    let event = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            ferry_client::Event::Request(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(event.status, 502);
    assert!(event.error.unwrap().contains("refused"));
}

#[tokio::test]
async fn an_app_that_drops_the_connection_gives_502() {
    let (relay, origin) = (
        TestRelay::start().await,
        Origin::start(Behaviour::Close).await,
    );
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let (status, _, body) = send(Method::POST, &format!("{}/hook", client.url), &[], "{}").await;
    assert_eq!(status, 502);
    assert_eq!(json(&body)["error"], "local app unreachable");
}

#[tokio::test]
async fn a_malformed_or_cut_short_body_is_400_naming_the_fault_and_the_tunnel_carries_on() {
    let (relay, origin) = (
        TestRelay::start().await,
        Origin::start(Behaviour::Echo).await,
    );
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let head = |framing: &str| {
        format!(
            "POST /{}/hook HTTP/1.1\r\nhost: r\r\n{framing}\r\n\r\n",
            client.session
        )
    };
    let chunked = head("transfer-encoding: chunked");
    let cases = [
        (
            format!("{chunked}5\r\nhello\r\nzz\r\n"),
            "malformed chunked body",
        ),
        (
            format!("{chunked}zz\r\nabc\r\n0\r\n\r\n"),
            "malformed chunked body",
        ),
        (
            format!("{chunked}ffffffffffffffffffff\r\n"),
            "malformed chunked body",
        ),
        (
            format!("{chunked}3\r\nabcXX0\r\n\r\n"),
            "malformed chunked body",
        ),
        // A body longer than the relay reads whole, so hyper streams it; the caller stops
        // sending (and closes its side) a few bytes in.
        (
            format!("{}abc", head("content-length: 1000000")),
            "closed before the whole body arrived",
        ),
    ];
    for (input, words) in cases {
        // Everything is sent, then the caller's side of the connection closed.
        let mut caller = tokio::net::TcpStream::connect(relay.addr).await.unwrap();
        caller.write_all(input.as_bytes()).await.unwrap();
        caller.shutdown().await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(WAIT_TIMEOUT, caller.read_to_end(&mut raw))
            .await
            .expect("an answer, then the close")
            .unwrap();
        let shown = &input[input.len().saturating_sub(40)..];
        let response = parse_response(&raw)
            .unwrap_or_else(|| panic!("{shown:?} -> {:?}", String::from_utf8_lossy(&raw)));
        assert_eq!(response.status, 400, "{shown:?}");
        let body = json(&response.body);
        assert_eq!(body["error"], "bad request body");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(words), "{shown:?} -> {detail}");
    }
    let (status, _, _) = send(Method::POST, &format!("{}/after", client.url), &[], "{}").await;
    assert_eq!(status, 200);
}
