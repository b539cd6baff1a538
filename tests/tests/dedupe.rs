//! The client never hands one delivery id to the local app twice, even across restarts: driven
//! by a minimal fake relay that sends the same delivery twice.

use std::time::Duration;

use bytes::Bytes;
use ferry_client::{ClientConfig, Event, Target, DUPLICATE_HEADER};
use ferry_protocol::{
    Control, DataFrame, Delivery, HeaderList, HttpVersion, OfflinePolicy, RequestHead,
    ResponseHead, SUBPROTOCOL,
};
use ferry_tests::{Behaviour, Origin, TestClient, WAIT_TIMEOUT};
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const SESSION: &str = "dedupe-test";

/// One accepted tunnel connection of the fake relay.
struct Tunnel {
    ws: WebSocketStream<TcpStream>,
    offline: Option<OfflinePolicy>,
}

/// Accepts a client, reads its hello and welcomes it.
#[allow(clippy::result_large_err)] // the handshake callback's signature is tungstenite's
async fn accept(listener: &TcpListener) -> Tunnel {
    let (tcp, _) = tokio::time::timeout(WAIT_TIMEOUT, listener.accept())
        .await
        .expect("client connects in time")
        .expect("accept");
    let callback = |_req: &Request, mut response: Response| {
        response.headers_mut().insert(
            "sec-websocket-protocol",
            http::HeaderValue::from_static(SUBPROTOCOL),
        );
        Ok(response)
    };
    let mut ws = tokio_tungstenite::accept_hdr_async(tcp, callback)
        .await
        .expect("websocket handshake");
    let hello = next_control(&mut ws).await;
    let Control::Hello { offline, name, .. } = hello else {
        panic!("expected hello, got {hello:?}");
    };
    assert_eq!(name.as_deref(), Some(SESSION));
    let welcome = Control::Welcome {
        session: SESSION.into(),
        url: format!("http://fake/{SESSION}"),
        resume_secret: "secret".into(),
        agent: "fake-relay".into(),
        // Like a relay from before window negotiation: the client assumes the default window,
        // and (no binary_control either) sends its heads as JSON, which `deliver` reads.
        window: None,
        binary_control: None,
        lane_key: None,
    };
    ws.send(Message::text(welcome.encode())).await.unwrap();
    Tunnel { ws, offline }
}

async fn next_control(ws: &mut WebSocketStream<TcpStream>) -> Control {
    loop {
        let msg = tokio::time::timeout(WAIT_TIMEOUT, ws.next())
            .await
            .expect("message in time")
            .expect("connection open")
            .expect("message");
        if let Message::Text(text) = msg {
            return Control::decode(text.as_str()).expect("valid control");
        }
    }
}

/// Sends one request with delivery `id` on `stream` and returns the client's response.
async fn deliver(
    tunnel: &mut Tunnel,
    stream: u32,
    id: &str,
    age: Duration,
) -> (ResponseHead, Bytes) {
    let body = br#"{"id":"evt_1","type":"charge.succeeded"}"#;
    let mut headers = HeaderList::new();
    headers.push("content-type", "application/json");
    headers.push("content-length", body.len().to_string());
    let received_at_ms = i64::try_from(
        (std::time::SystemTime::now() - age)
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let head = Control::RequestHead(RequestHead {
        stream,
        method: "POST".into(),
        target: "/hook".into(),
        version: HttpVersion::Http11,
        headers,
        has_body: true,
        delivery: Some(Delivery {
            id: id.into(),
            received_at_ms,
            attempt: 2,
            queued: true,
        }),
    });
    tunnel.ws.send(Message::text(head.encode())).await.unwrap();
    tunnel
        .ws
        .send(Message::binary(DataFrame::encode(stream, true, body)))
        .await
        .unwrap();
    let mut head = None;
    let mut collected = Vec::new();
    loop {
        let msg = tokio::time::timeout(WAIT_TIMEOUT, tunnel.ws.next())
            .await
            .expect("response in time")
            .expect("connection open")
            .expect("message");
        match msg {
            Message::Text(text) => match Control::decode(text.as_str()).unwrap() {
                Control::ResponseHead(h) if h.stream == stream => {
                    let has_body = h.has_body;
                    head = Some(h);
                    if !has_body {
                        break;
                    }
                }
                _ => {}
            },
            Message::Binary(bytes) => {
                let frame = DataFrame::decode(bytes).unwrap();
                if frame.stream == stream {
                    collected.extend_from_slice(&frame.payload);
                    if frame.end {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    (head.expect("response head"), Bytes::from(collected))
}

fn header<'a>(head: &'a ResponseHead, name: &str) -> Option<&'a [u8]> {
    head.headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn config(relay: &str, origin: &Origin, state: &std::path::Path) -> ClientConfig {
    let mut config =
        ClientConfig::new(relay, "any-token", Target::parse(&origin.url("/")).unwrap());
    config.name = Some(SESSION.into());
    config.state_dir = Some(state.to_owned());
    config.max_backoff = Duration::from_millis(300);
    config
}

async fn request_event(client: &mut TestClient) -> ferry_client::RequestEvent {
    client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            Event::Request(r) => Some(r.clone()),
            _ => None,
        })
        .await
}

#[tokio::test]
async fn a_delivery_id_reaches_the_app_once_even_after_a_restart() {
    let origin = Origin::start(Behaviour::fixed(200, "charged")).await;
    let state = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = format!("http://{}", listener.local_addr().unwrap());

    // First client: the delivery reaches the app, late (7 minutes old).
    let mut cfg = config(&relay, &origin, state.path());
    cfg.offline = Some(OfflinePolicy::Reject);
    let mut client = TestClient::spawn(cfg);
    let mut tunnel = accept(&listener).await;
    assert_eq!(
        tunnel.offline,
        Some(OfflinePolicy::Reject),
        "--offline travels in hello"
    );
    let (head, body) = deliver(
        &mut tunnel,
        1,
        "01JDEDUPE0000000000000000A",
        Duration::from_secs(7 * 60),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(&body[..], b"charged");
    assert!(header(&head, DUPLICATE_HEADER).is_none());
    assert_eq!(origin.request_count(), 1);
    let event = request_event(&mut client).await;
    assert_eq!(
        event.delivery_id.as_deref(),
        Some("01JDEDUPE0000000000000000A")
    );
    assert_eq!(event.attempt, Some(2));
    assert!(event.age_ms.unwrap() >= 7 * 60 * 1000);
    assert!(!event.duplicate);
    assert!(event.late_warning().unwrap().contains("delivered 7m late"));

    // The acknowledgement is "lost": the client goes away and a fresh one gets the same id.
    client.stop().await;
    drop(tunnel);
    let mut client = TestClient::spawn(config(&relay, &origin, state.path()));
    let mut tunnel = accept(&listener).await;
    assert_eq!(tunnel.offline, None);
    let (head, body) = deliver(
        &mut tunnel,
        1,
        "01JDEDUPE0000000000000000A",
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(head.status, 200);
    assert_eq!(header(&head, DUPLICATE_HEADER), Some(&b"1"[..]));
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"duplicate": true, "id": "01JDEDUPE0000000000000000A"})
    );
    let event = request_event(&mut client).await;
    assert!(event.duplicate);
    assert_eq!(event.late_warning(), None);
    assert_eq!(origin.request_count(), 1, "the app saw the id only once");

    // A replay carries its own delivery id and does reach the app.
    let (head, _) = deliver(
        &mut tunnel,
        3,
        "01JDEDUPE0000000000000000A.r3",
        Duration::from_secs(1),
    )
    .await;
    assert_eq!(head.status, 200);
    assert!(header(&head, DUPLICATE_HEADER).is_none());
    assert_eq!(origin.request_count(), 2);
    client.stop().await;
}

#[tokio::test]
async fn a_failed_delivery_may_come_again() {
    let origin = Origin::start(Behaviour::fixed(500, "boom")).await;
    let state = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = format!("http://{}", listener.local_addr().unwrap());
    let mut client = TestClient::spawn(config(&relay, &origin, state.path()));
    let mut tunnel = accept(&listener).await;
    let (head, _) = deliver(&mut tunnel, 1, "01JDEDUPE0000000000000000B", Duration::ZERO).await;
    assert_eq!(head.status, 500);
    let (head, _) = deliver(&mut tunnel, 3, "01JDEDUPE0000000000000000B", Duration::ZERO).await;
    assert_eq!(
        head.status, 500,
        "a 5xx is not remembered: the relay's retry reaches the app"
    );
    assert!(header(&head, DUPLICATE_HEADER).is_none());
    assert_eq!(origin.request_count(), 2);
    let _ = request_event(&mut client).await;
    client.stop().await;
}

/// The issue's proof: the client is killed after the local app answered a queued request but
/// before the relay heard back. The relay delivers it again; the app does not see it twice.
#[tokio::test]
async fn a_lost_acknowledgement_does_not_reach_the_app_twice() {
    use ferry_relay::store::{now_ms, RequestState, SessionKind, SessionRecord, Store};
    use ferry_tests::{client_config, send, ReadGate, StallProxy, TestRelay, TOKEN};

    let data = tempfile::tempdir().unwrap();
    let store = Store::open(data.path(), Default::default()).await.unwrap();
    store
        .upsert_session(SessionRecord {
            id: "lost-ack".into(),
            owner: ferry_relay::auth::sha256(TOKEN.as_bytes()),
            resume_digest: [0; 32],
            kind: SessionKind::Named,
            offline: Default::default(),
            respond: Default::default(),
            created_at: now_ms(),
            last_seen_at: now_ms(),
        })
        .await
        .unwrap();
    let relay = TestRelay::start_with({
        let store = store.clone();
        move |config| {
            config.store = Some(store);
            config.heartbeat_timeout = Duration::from_secs(1);
        }
    })
    .await;

    // Queued while no client is connected.
    let (status, _, reply) = send(
        http::Method::POST,
        &format!("{}/lost-ack/charge", relay.url()),
        &[],
        "charge me once",
    )
    .await;
    assert_eq!(status, http::StatusCode::ACCEPTED, "{reply:?}");
    let id: serde_json::Value = serde_json::from_slice(&reply).unwrap();
    let id = id["id"].as_str().unwrap().to_owned();

    // The app holds its answer until the tunnel to the relay is stalled.
    let gate = ReadGate::new();
    let (arrived_tx, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let origin = Origin::start(Behaviour::route({
        let gate = gate.clone();
        move |_| {
            let _ = arrived_tx.send(());
            Behaviour::SlowReader(gate.clone())
        }
    }))
    .await;
    let proxy = StallProxy::start(relay.addr).await;
    let state = tempfile::tempdir().unwrap();
    let named = |relay_url: &str| {
        let mut config = client_config(relay_url, &origin.url("/"));
        config.name = Some("lost-ack".into());
        config.state_dir = Some(state.path().to_owned());
        config
    };
    let mut first = TestClient::start(named(&format!("http://{}", proxy.addr()))).await;
    tokio::time::timeout(WAIT_TIMEOUT, arrived.recv())
        .await
        .expect("the queued request reaches the app")
        .unwrap();
    proxy.stall();
    gate.open();
    let event = request_event(&mut first).await;
    assert_eq!(event.status, 200);
    assert_eq!(event.delivery_id.as_deref(), Some(id.as_str()));
    first.kill(); // the answer never reached the relay

    // A new client gets the redelivery and answers it without calling the app.
    let mut second = TestClient::start(named(&relay.url())).await;
    let event = request_event(&mut second).await;
    assert!(event.duplicate, "{event:?}");
    assert_eq!(event.delivery_id.as_deref(), Some(id.as_str()));
    assert!(event.attempt.unwrap() >= 2);
    assert_eq!(origin.request_count(), 1, "the app saw the request once");
    // The relay records the outcome just after the client answered.
    ferry_tests::wait_for_store(&store, "the redelivery marked delivered", || async {
        let record = store.get(id.parse().unwrap()).await.unwrap().unwrap();
        (record.summary.state == RequestState::Delivered).then_some(())
    })
    .await;
    second.stop().await;
}
