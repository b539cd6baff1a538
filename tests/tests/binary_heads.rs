//! Heads in binary form: the relay sends them only to a client that asked, reads both forms, and
//! a webhook crosses byte for byte either way. Also: a hand-written client that breaks WebSocket
//! framing is told why its tunnel closes.

use bytes::Bytes;
use ferry_protocol::{
    BinaryMessage, Control, DataFrame, HeaderList, ResponseHead, PROTOCOL_VERSION, SUBPROTOCOL,
};
use ferry_tests::*;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Tunnel = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a tunnel for session `name` as a hand-written client; `binary_control` is what its
/// hello asks for. Returns the tunnel and what the welcome answered.
async fn open(
    relay: &TestRelay,
    name: &str,
    binary_control: Option<bool>,
) -> (Tunnel, Option<bool>) {
    let request = relay.tunnel_request(TOKEN, SUBPROTOCOL);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let hello = Control::Hello {
        version: PROTOCOL_VERSION,
        agent: "hand-written/0".into(),
        name: Some(name.into()),
        resume: None,
        offline: None,
        respond: None,
        window: None,
        binary_control,
        lanes: None,
        lane: None,
    };
    ws.send(Message::text(hello.encode())).await.unwrap();
    match next(&mut ws).await {
        Message::Text(text) => match Control::decode(text.as_str()).unwrap() {
            Control::Welcome { binary_control, .. } => (ws, binary_control),
            other => panic!("expected a welcome, got {other:?}"),
        },
        other => panic!("expected a welcome, got {other:?}"),
    }
}

async fn next(ws: &mut Tunnel) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT_TIMEOUT, ws.next())
            .await
            .expect("a message in time")
            .expect("tunnel open")
            .expect("a message");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}

/// Reads one request (head and body) off the tunnel; says whether its head came as binary.
async fn read_request(ws: &mut Tunnel) -> (ferry_protocol::RequestHead, bool, Vec<u8>) {
    let (head, binary) = match next(ws).await {
        Message::Text(text) => (Control::decode(text.as_str()).unwrap(), false),
        Message::Binary(bytes) => match BinaryMessage::decode(bytes).unwrap() {
            BinaryMessage::Control(control) => (control, true),
            BinaryMessage::Data(frame) => panic!("data before the head: {frame:?}"),
        },
        other => panic!("expected a request head, got {other:?}"),
    };
    let Control::RequestHead(head) = head else {
        panic!("expected a request head, got {head:?}");
    };
    let mut body = Vec::new();
    let mut ended = !head.has_body;
    while !ended {
        let Message::Binary(bytes) = next(ws).await else {
            panic!("expected a body frame");
        };
        let BinaryMessage::Data(frame) = BinaryMessage::decode(bytes).unwrap() else {
            panic!("expected a body frame");
        };
        body.extend_from_slice(&frame.payload);
        ended = frame.end;
    }
    (head, binary, body)
}

/// One webhook through a hand-written client whose hello asks for `binary_control`; its answer
/// goes back with its head in binary form when `answer_binary`.
async fn round_trip(binary_control: Option<bool>, answer_binary: bool) -> bool {
    let relay = TestRelay::start().await;
    let name = "heads-form";
    let (mut ws, agreed) = open(&relay, name, binary_control).await;
    assert_eq!(agreed, binary_control.filter(|asked| *asked));
    let url = format!("{}/{name}/hook?x=1", relay.url());
    let body = Bytes::from_static(b"{\"id\":\"evt_1\",\"caf\xc3\xa9\":1}");
    let caller = tokio::spawn(async move {
        send(
            Method::POST,
            &url,
            &[
                ("x-signature", "t=1,v1=abc"),
                ("x-dup", "1"),
                ("x-dup", "2"),
            ],
            body,
        )
        .await
    });
    let (head, binary, received) = read_request(&mut ws).await;
    assert_eq!(head.method, "POST");
    assert_eq!(head.target, "/hook?x=1");
    assert_eq!(head.headers.get("x-signature"), Some(&b"t=1,v1=abc"[..]));
    let dups: Vec<&[u8]> = head
        .headers
        .iter()
        .filter(|(name, _)| *name == "x-dup")
        .map(|(_, value)| value)
        .collect();
    assert_eq!(dups, [&b"1"[..], &b"2"[..]]);
    assert_eq!(received, b"{\"id\":\"evt_1\",\"caf\xc3\xa9\":1}");

    let mut headers = HeaderList::new();
    headers.push("content-type", "text/plain");
    headers.push("x-answer", b"\xff\xfe");
    let answer = Control::ResponseHead(ResponseHead {
        stream: head.stream,
        status: 201,
        headers,
        has_body: true,
    });
    let answer = if answer_binary {
        Message::Binary(answer.encode_binary().unwrap())
    } else {
        Message::text(answer.encode())
    };
    ws.send(answer).await.unwrap();
    ws.send(Message::Binary(DataFrame::encode(
        head.stream,
        true,
        b"made",
    )))
    .await
    .unwrap();
    let (status, headers, body) = caller.await.unwrap();
    assert_eq!(status, 201, "{body:?}");
    assert_eq!(headers.get("x-answer").unwrap().as_bytes(), b"\xff\xfe");
    assert_eq!(&body[..], b"made");
    binary
}

#[tokio::test]
async fn a_client_that_does_not_ask_gets_json_heads() {
    assert!(!round_trip(None, false).await);
    assert!(!round_trip(Some(false), false).await);
}

#[tokio::test]
async fn a_client_that_asks_gets_binary_heads_and_may_answer_in_either_form() {
    assert!(round_trip(Some(true), true).await);
    assert!(round_trip(Some(true), false).await);
}

#[tokio::test]
async fn a_frame_that_breaks_websocket_framing_closes_the_tunnel_with_the_reason() {
    use tokio::io::AsyncWriteExt;
    let relay = TestRelay::start().await;
    let (mut ws, _) = open(&relay, "unmasked", Some(true)).await;
    // A client must mask every frame (RFC 6455 §5.3): this one is not.
    ws.get_mut()
        .write_all(&[0x82, 0x03, 1, 2, 3])
        .await
        .unwrap();
    match next(&mut ws).await {
        Message::Close(Some(close)) => assert!(
            close.reason.contains("unmasked"),
            "the reason names the fault: {}",
            close.reason
        ),
        other => panic!("expected a close, got {other:?}"),
    }
    // The relay carries on: another tunnel for the same session is welcomed.
    let (_again, _) = open(&relay, "unmasked", Some(true)).await;
    let (status, _, _) = send(
        Method::GET,
        &format!("http://{}/_ferry/health", relay.addr),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200);
}
