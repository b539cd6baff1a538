//! Drops, stalls, takeovers and version mismatches: the tunnel notices, says so and recovers.

use std::time::Duration;

use ferry_client::{ClientError, Event};
use ferry_tests::*;
use futures_util::StreamExt;
use http::Method;

fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).expect("JSON body")
}

/// A relay, a stall proxy in front of it, and an origin.
async fn setup(behaviour: Behaviour, heartbeat: Duration) -> (TestRelay, StallProxy, Origin) {
    let relay = TestRelay::start_with(|c| c.heartbeat_timeout = heartbeat).await;
    let proxy = StallProxy::start(relay.addr).await;
    let origin = Origin::start(behaviour).await;
    (relay, proxy, origin)
}

fn via_proxy(
    proxy: &StallProxy,
    origin: &Origin,
    heartbeat: Duration,
) -> ferry_client::ClientConfig {
    let mut config = client_config(
        &format!("http://{}", proxy.addr()),
        &origin.addr().to_string(),
    );
    config.heartbeat_timeout = heartbeat;
    config
}

#[tokio::test]
async fn a_dropped_connection_reconnects_to_the_same_random_url() {
    let (_relay, proxy, origin) = setup(Behaviour::Echo, Duration::from_secs(30)).await;
    let mut client = TestClient::start(via_proxy(&proxy, &origin, Duration::from_secs(30))).await;
    let url = client.url.clone();
    assert_eq!(client.session.len(), 22, "a random 128-bit id");
    proxy.cut();
    let reason = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            Event::Reconnecting { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(!reason.is_empty());
    let again = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            Event::Online { url } => Some(url.clone()),
            _ => None,
        })
        .await;
    assert_eq!(again, url, "same URL after reconnecting");
    let (status, _, body) = send(Method::POST, &format!("{url}/after"), &[], "still here").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"still here");
}

#[tokio::test]
async fn a_request_in_flight_when_the_tunnel_drops_fails_fast_with_502() {
    let (_relay, proxy, origin) = setup(Behaviour::Hang, Duration::from_secs(30)).await;
    let client = TestClient::start(via_proxy(&proxy, &origin, Duration::from_secs(30))).await;
    let url = format!("{}/slow", client.url);
    let caller = tokio::spawn(async move { send(Method::POST, &url, &[], "{}").await });
    origin.next_request().await; // the request is at the app, waiting
    proxy.cut();
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(5), caller)
        .await
        .expect("the caller is answered promptly, not after the 30 s timeout")
        .unwrap();
    assert_eq!(status, 502);
    assert_eq!(json(&body)["error"], "client disconnected");
}

#[tokio::test]
async fn a_stalled_connection_is_noticed_by_both_sides_and_recovers() {
    let heartbeat = Duration::from_millis(800);
    let (_relay, proxy, origin) = setup(Behaviour::Echo, heartbeat).await;
    let mut client = TestClient::start(via_proxy(&proxy, &origin, heartbeat)).await;
    let url = client.url.clone();
    proxy.stall(); // bytes stop; nothing is closed

    // The client notices by itself.
    let reason = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            Event::Reconnecting { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("heartbeat"), "{reason}");

    // The relay notices too: a webhook now fails fast instead of waiting on a dead tunnel.
    let (status, _, _) = tokio::time::timeout(
        Duration::from_secs(5),
        send(Method::POST, &format!("{url}/x"), &[], "{}"),
    )
    .await
    .expect("the relay must not keep a dead tunnel");
    assert!(status == 503 || status == 502, "{status}");

    proxy.resume();
    let again = client
        .wait_for(Duration::from_secs(20), |e| match e {
            Event::Online { url } => Some(url.clone()),
            _ => None,
        })
        .await;
    assert_eq!(again, url);
    let (status, _, _) = send(Method::POST, &format!("{url}/y"), &[], "{}").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_owner_takes_a_name_back_at_once_from_a_dead_connection() {
    let heartbeat = Duration::from_secs(30);
    let (relay, proxy, old_origin) = setup(Behaviour::fixed(200, "old"), heartbeat).await;
    let mut config = via_proxy(&proxy, &old_origin, heartbeat);
    config.name = Some("stripe-dev".into());
    let old = TestClient::start(config).await;
    proxy.stall(); // the laptop slept: the old connection looks alive to the relay

    let new_origin = Origin::start(Behaviour::fixed(200, "new")).await;
    let mut config = client_config(&relay.url(), &new_origin.addr().to_string());
    config.name = Some("stripe-dev".into());
    let new = tokio::time::timeout(Duration::from_secs(5), TestClient::start(config))
        .await
        .expect("takeover is immediate, not after a heartbeat timeout");
    assert_eq!(
        new.url, old.url,
        "same name, same URL; no random name instead"
    );
    let (status, _, body) = send(Method::POST, &format!("{}/hook", new.url), &[], "{}").await;
    assert_eq!(status, 200);
    assert_eq!(&body[..], b"new");
}

#[tokio::test]
async fn a_client_taken_over_by_its_owner_stops_instead_of_fighting() {
    let relay = TestRelay::start().await;
    let origin = Origin::start(Behaviour::Echo).await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    config.name = Some("shared-name".into());
    let first = TestClient::start(config.clone()).await;
    let _second = TestClient::start(config).await;
    match first.finished().await {
        Err(ClientError::TakenOver(message)) => assert!(message.contains("took over"), "{message}"),
        other => panic!("expected a takeover error, got {other:?}"),
    }
}

#[tokio::test]
async fn another_token_cannot_have_a_claimed_name() {
    let relay = TestRelay::start().await;
    let origin = Origin::start(Behaviour::Echo).await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    config.name = Some("mine-only".into());
    let _owner = TestClient::start(config.clone()).await;
    config.token = "other-token".into();
    let thief = TestClient::spawn(config);
    match thief.finished().await {
        Err(ClientError::Refused(message)) => {
            assert!(message.contains("belongs to another token"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_wrong_token_is_refused_without_a_retry_loop() {
    let relay = TestRelay::start().await;
    let mut config = client_config(&relay.url(), "3000");
    config.token = "wrong".into();
    match TestClient::spawn(config).finished().await {
        Err(ClientError::Refused(message)) => assert!(message.contains("401"), "{message}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn a_client_of_another_protocol_version_gets_a_clear_refusal() {
    let relay = TestRelay::start().await;
    let request = relay.tunnel_request(TOKEN, "ferry.v2");
    match tokio_tungstenite::connect_async(request).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400);
            let body = json(response.body().as_deref().unwrap());
            let detail = body["detail"].as_str().unwrap();
            assert!(
                detail.contains("ferry.v2") && detail.contains("ferry.v1"),
                "{detail}"
            );
        }
        other => panic!("expected an HTTP refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_relay_of_another_protocol_version_is_reported_by_the_client() {
    // A stand-in relay that speaks only ferry.v2 and refuses as the real one would.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let service = hyper::service::service_fn(|_req| async {
            let body = r#"{"error":"protocol version mismatch","detail":"client speaks protocol ferry.v1, this relay speaks ferry.v2; install the same Ferry version on both sides"}"#;
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(400)
                    .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                    .unwrap(),
            )
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .await;
    });
    let config = client_config(&format!("http://{addr}"), "3000");
    match TestClient::spawn(config).finished().await {
        Err(ClientError::Refused(message)) => {
            assert!(
                message.contains("ferry.v2") && message.contains("same Ferry version"),
                "{message}"
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn the_relay_says_why_it_closes_a_tunnel_that_breaks_the_protocol() {
    let relay = TestRelay::start().await;
    let request = relay.tunnel_request(TOKEN, "ferry.v1");
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        "{\"type\":\"bogus\"}",
    ))
    .await
    .unwrap();
    let mut said = String::new();
    while let Some(Ok(msg)) = ws.next().await {
        if let tokio_tungstenite::tungstenite::Message::Text(text) = msg {
            said.push_str(text.as_str());
        }
    }
    assert!(said.contains("hello"), "told what was expected: {said}");
}
