//! Lanes: a relay serving its connections on several threads asks a session's client for one
//! more connection (a lane) when callers arrive on a thread that has none of the session's, and
//! then carries those callers' requests through that lane. A lane needs the session's lane key
//! and token, must land on a thread that has none, and ends with the session's connection. The
//! real client opens lanes when asked, every webhook still crosses byte for byte, and the relay
//! still shuts down.

use ferry_protocol::{
    BinaryMessage, Control, DataFrame, ErrorCode, HeaderList, LaneJoin, ResponseHead,
    PROTOCOL_VERSION, SUBPROTOCOL,
};
use ferry_tests::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Tunnel = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Callers tried before giving up on one landing on the other thread. The kernel picks a
/// listening socket per connection by a hash of its addresses: 64 connections all landing on
/// one of two threads has a chance of 2^-63.
const TRIES: usize = 64;

fn hello(name: Option<&str>, lane: Option<LaneJoin>) -> Control {
    Control::Hello {
        version: PROTOCOL_VERSION,
        agent: "hand-written/0".into(),
        name: name.map(str::to_owned),
        resume: None,
        offline: None,
        respond: None,
        window: None,
        binary_control: None,
        lanes: Some(true),
        lane,
    }
}

/// Opens a WebSocket to the relay's tunnel endpoint with `token`, sends `hello` and returns
/// the socket and the relay's first answer.
async fn open(relay: &TestRelay, token: &str, hello: Control) -> (Tunnel, Control) {
    let request = relay.tunnel_request(token, SUBPROTOCOL);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ws.send(Message::text(hello.encode())).await.unwrap();
    let answer = read_control(&mut ws).await.expect("an answer to the hello");
    (ws, answer)
}

/// The next control message, or `None` once the relay closed the connection.
async fn read_control(ws: &mut Tunnel) -> Option<Control> {
    loop {
        let msg = tokio::time::timeout(WAIT_TIMEOUT, ws.next())
            .await
            .expect("a message in time");
        match msg {
            None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
            Some(Ok(Message::Text(text))) => return Some(Control::decode(text.as_str()).unwrap()),
            Some(Ok(Message::Binary(bytes))) => match BinaryMessage::decode(bytes).unwrap() {
                BinaryMessage::Control(control) => return Some(control),
                BinaryMessage::Data(frame) => panic!("unexpected data frame {frame:?}"),
            },
            Some(Ok(_)) => continue,
        }
    }
}

/// Answers the request whose head is `head` (no body) with 200 and `body`.
async fn answer(ws: &mut Tunnel, stream: u32, body: &[u8]) {
    let head = Control::ResponseHead(ResponseHead {
        stream,
        status: 200,
        headers: HeaderList::new(),
        has_body: true,
    });
    ws.send(Message::text(head.encode())).await.unwrap();
    ws.send(Message::Binary(DataFrame::encode(stream, true, body)))
        .await
        .unwrap();
}

/// A caller's bodiless POST to `session` on a connection of its own.
fn call(relay: &TestRelay, session: &str) -> JoinHandle<Vec<u8>> {
    let addr = relay.addr;
    let request = format!(
        "POST /{session}/hook HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tokio::spawn(async move { raw_http(addr, request.as_bytes()).await })
}

/// Answers `caller`'s request (on `stream` of `tunnel`) with `text`, and checks the caller got
/// exactly that.
async fn answer_caller(tunnel: &mut Tunnel, stream: u32, caller: JoinHandle<Vec<u8>>, text: &str) {
    answer(tunnel, stream, text.as_bytes()).await;
    assert_eq!(body_of(&caller.await.unwrap()), text.as_bytes());
}

fn body_of(raw: &[u8]) -> Vec<u8> {
    let response = parse_response(raw).expect("a complete response");
    assert_eq!(response.status, 200, "{:?}", String::from_utf8_lossy(raw));
    response.body
}

/// Sends callers on connections of their own, answering each from `main`, until one lands on
/// the other thread and the relay asks for a lane (it still carries that request through the
/// main connection).
async fn call_until_asked(relay: &TestRelay, main: &mut Tunnel, session: &str) {
    for i in 0..TRIES {
        let caller = call(relay, session);
        let mut asked = false;
        let head = loop {
            match read_control(main).await.expect("main connection open") {
                Control::OpenLane {} => asked = true,
                Control::RequestHead(head) => break head,
                other => panic!("unexpected {other:?}"),
            }
        };
        answer_caller(main, head.stream, caller, &format!("main {i}")).await;
        if asked {
            return;
        }
    }
    panic!("no caller made the relay ask for a lane");
}

/// Opens lanes with `key` until one lands on the thread without the session; one that lands
/// on the main connection's thread is told to try another connection.
async fn join_lane(relay: &TestRelay, session: &str, key: &str) -> Tunnel {
    for _ in 0..TRIES {
        let join = LaneJoin {
            session: session.to_owned(),
            key: key.to_owned(),
        };
        match open(relay, TOKEN, hello(None, Some(join))).await {
            (lane, Control::Welcome { session: s, .. }) => {
                assert_eq!(s, session);
                return lane;
            }
            (_, Control::Error { code, message }) => {
                assert_eq!(code, ErrorCode::LaneTaken, "{message}");
            }
            (_, other) => panic!("unexpected answer to a lane's hello: {other:?}"),
        }
    }
    panic!("no lane landed on the other thread");
}

/// Waits until the relay has closed `tunnel`, failing on any request sent through it.
async fn until_closed(tunnel: &mut Tunnel) {
    while let Some(control) = read_control(tunnel).await {
        assert!(!matches!(control, Control::RequestHead(_)), "{control:?}");
    }
}

/// A hand-written client's session on a two-thread relay: its main connection and lane key.
async fn laned_session(relay: &TestRelay, name: &str) -> (Tunnel, String, String) {
    let (main, welcome) = open(relay, TOKEN, hello(Some(name), None)).await;
    let Control::Welcome {
        session, lane_key, ..
    } = welcome
    else {
        panic!("expected a welcome, got {welcome:?}");
    };
    (
        main,
        session,
        lane_key.expect("a relay on two threads offers lanes"),
    )
}

#[tokio::test]
async fn a_relay_on_two_threads_asks_for_a_lane_and_carries_that_threads_callers_through_it() {
    let relay = TestRelay::start_threads(2, |_| {}).await;
    let (mut main, session, key) = laned_session(&relay, "laned").await;
    call_until_asked(&relay, &mut main, &session).await;
    let mut lane = join_lane(&relay, &session, &key).await;

    // Callers until one arrives through the lane: it is answered from there.
    let mut through_lane = false;
    for i in 0..TRIES {
        let caller = call(&relay, &session);
        let (tunnel, head) = tokio::select! {
            control = read_control(&mut main) => (&mut main, control),
            control = read_control(&mut lane) => {
                through_lane = true;
                (&mut lane, control)
            }
        };
        let Some(Control::RequestHead(head)) = head else {
            panic!("expected a request head, got {head:?}");
        };
        answer_caller(tunnel, head.stream, caller, &format!("answer {i}")).await;
        if through_lane {
            break;
        }
    }
    assert!(through_lane, "no request came through the lane");

    // The lane ends with the session's connection.
    main.close(None).await.unwrap();
    until_closed(&mut lane).await;
}

#[tokio::test]
async fn a_lane_that_ends_is_asked_for_again() {
    let relay = TestRelay::start_threads(2, |_| {}).await;
    let (mut main, session, key) = laned_session(&relay, "relaned").await;
    call_until_asked(&relay, &mut main, &session).await;
    let mut lane = join_lane(&relay, &session, &key).await;
    lane.close(None).await.unwrap();
    until_closed(&mut lane).await;
    // The session carries on over its main connection, and the thread gets a lane again.
    call_until_asked(&relay, &mut main, &session).await;
    join_lane(&relay, &session, &key).await;
}

#[tokio::test]
async fn a_lane_needs_the_sessions_key_and_token() {
    let relay = TestRelay::start_threads(2, |_| {}).await;
    let (_main, welcome) = open(&relay, TOKEN, hello(Some("guarded"), None)).await;
    let Control::Welcome {
        session, lane_key, ..
    } = welcome
    else {
        panic!("expected a welcome, got {welcome:?}");
    };
    let key = lane_key.expect("lanes offered");
    let cases = [
        (TOKEN, session.clone(), "not-the-key".to_owned()),
        ("other-token", session.clone(), key.clone()),
        (TOKEN, "no-such-session".to_owned(), key.clone()),
    ];
    for (token, session, key) in cases {
        let (_, answer) = open(&relay, token, hello(None, Some(LaneJoin { session, key }))).await;
        let Control::Error { code, message } = answer else {
            panic!("a lane with a wrong key, token or session was welcomed: {answer:?}");
        };
        assert_eq!(code, ErrorCode::LaneRefused, "{message}");
    }
}

#[tokio::test]
async fn a_relay_on_one_thread_offers_no_lanes() {
    let relay = TestRelay::start().await;
    let (_main, welcome) = open(&relay, TOKEN, hello(Some("single"), None)).await;
    assert!(
        matches!(welcome, Control::Welcome { lane_key: None, .. }),
        "{welcome:?}"
    );
    // With no key offered, no key joins a lane.
    let join = LaneJoin {
        session: "single".into(),
        key: String::new(),
    };
    let (_, answer) = open(&relay, TOKEN, hello(None, Some(join))).await;
    assert!(
        matches!(
            answer,
            Control::Error {
                code: ErrorCode::LaneRefused,
                ..
            }
        ),
        "{answer:?}"
    );
}

#[tokio::test]
async fn the_client_opens_a_lane_when_asked_and_webhooks_cross_byte_for_byte() {
    let relay_stats = Arc::new(ferry_mux::MuxStats::default());
    let stats = relay_stats.clone();
    let relay = TestRelay::start_threads(2, move |config| config.stats = stats).await;
    let origin = Origin::start(Behaviour::Echo).await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    config.name = Some("laned-client".into());
    let _client = TestClient::start(config).await;
    assert_eq!(relay_stats.connections(), 1);

    // Fresh connections land on both threads; the relay asks for a lane and the client opens
    // it. Every webhook, before and after, comes back exactly as sent.
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + WAIT_TIMEOUT;
    while relay_stats.connections() < 2 || sent < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client opened no lane ({} connections)",
            relay_stats.connections()
        );
        let body = format!("{{\"event\":{sent},\"caf\u{e9}\":\"\u{1F680}\"}}");
        let request = format!(
            "POST /laned-client/hook HTTP/1.1\r\nHost: relay\r\nX-Signature: t=1,v1={sent}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let raw = raw_http(relay.addr, request.as_bytes()).await;
        assert_eq!(body_of(&raw), body.as_bytes());
        sent += 1;
    }
    assert_eq!(relay_stats.connections(), 2, "one lane, not more");

    // A relay on several threads, with a lane on each, still shuts down in time.
    relay
        .shutdown()
        .await
        .expect("the relay shuts down cleanly");
}
