//! SIGINT/SIGTERM on the relay: stop accepting, finish what is in flight, exit cleanly.

use std::time::Duration;

use ferry_tests::*;
use http::Method;

#[tokio::test]
async fn in_flight_exchanges_finish_before_the_relay_exits() {
    let gate = ReadGate::new();
    let origin = Origin::start(Behaviour::SlowReader(gate.clone())).await;
    let mut relay = TestRelay::start().await;
    let addr = relay.addr;
    let mut client =
        TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let url = format!("{}/slow", client.url);
    let body = pattern(0, 200_000);
    let expected = sha256_hex(&body);
    let caller = tokio::spawn(async move { send(Method::POST, &url, &[], body).await });
    gate.allow(1);
    gate.wait_bytes_read(1).await; // the exchange is in flight at the app

    relay.signal_shutdown();
    gate.open(); // the app finishes after the signal
    let (status, headers, _) = caller.await.unwrap();
    assert_eq!(status, 200, "the in-flight exchange completed");
    assert_eq!(
        headers.get("x-body-sha256").unwrap().to_str().unwrap(),
        expected
    );
    relay.join().await.expect("the relay exits cleanly");

    // It no longer accepts, and the client was told and went back to reconnecting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let reason = client
        .wait_for(WAIT_TIMEOUT, |e| match e {
            ferry_client::Event::Reconnecting { reason, .. } => Some(reason.clone()),
            _ => None,
        })
        .await;
    assert!(reason.contains("shutting down"), "{reason}");
}

#[tokio::test]
async fn an_exchange_that_outlives_the_grace_period_does_not_hold_the_relay() {
    let origin = Origin::start(Behaviour::Hang).await;
    let mut relay = TestRelay::start_with(|c| c.grace = Duration::from_millis(200)).await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let url = format!("{}/forever", client.url);
    let _caller =
        tokio::spawn(async move { try_send(Method::POST, &url, &[], full_body("{}")).await });
    origin.next_request().await;
    relay.signal_shutdown();
    tokio::time::timeout(Duration::from_secs(5), relay.join())
        .await
        .expect("the grace period bounds shutdown")
        .unwrap();
}
