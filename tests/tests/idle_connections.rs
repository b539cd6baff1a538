//! A connection that carries nothing is not kept for ever: an HTTP/2 connection with no
//! traffic, or an exchange that stalls midway, is closed after [`ferry_relay::IDLE_TIMEOUT`],
//! while a connection that keeps sending (pings here) stays. Idle HTTP/1 keep-alive
//! connections close at the head timeout (the relay's `http1` tests). The clock is paused: it
//! jumps ahead whenever every task waits.

use std::time::Duration;

use ferry_tests::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;

const PREFACE_AND_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0";
const PING: &[u8] = b"\0\0\x08\x06\0\0\0\0\0ferry-ok";

/// Reads HTTP/2 frames until a PING acknowledgement.
async fn read_until_ping_ack(caller: &mut TcpStream) {
    loop {
        let mut header = [0u8; 9];
        caller.read_exact(&mut header).await.expect("a frame");
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        caller.read_exact(&mut payload).await.expect("its payload");
        if header[3] == 0x6 && header[4] & 0x1 == 0x1 {
            assert_eq!(payload, b"ferry-ok");
            return;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_is_closed_once_nothing_has_moved_for_the_idle_timeout() {
    let relay = TestRelay::start().await;
    let mut caller = TcpStream::connect(relay.addr).await.unwrap();
    caller.write_all(PREFACE_AND_SETTINGS).await.unwrap();

    // Something every two minutes, for well over the idle timeout: still served.
    let started = Instant::now();
    while started.elapsed() < ferry_relay::IDLE_TIMEOUT * 2 {
        tokio::time::sleep(Duration::from_secs(120)).await;
        caller.write_all(PING).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), read_until_ping_ack(&mut caller))
            .await
            .expect("a connection with traffic is served");
    }

    // Then nothing: closed at the idle timeout.
    let quiet = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(3600), caller.read_to_end(&mut rest))
        .await
        .expect("the idle connection was still open after an hour")
        .ok();
    assert!(
        quiet.elapsed() >= ferry_relay::IDLE_TIMEOUT,
        "{:?}",
        quiet.elapsed()
    );
    assert!(quiet.elapsed() <= ferry_relay::IDLE_TIMEOUT * 5 / 4 + Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_stalls_midway_does_not_hold_the_callers_connection_for_ever() {
    // An app that sends a head and 10 bytes of a 100-byte body, then nothing, never closing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.unwrap();
                assert!(n > 0);
                seen.extend_from_slice(&buf[..n]);
            }
            tcp.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                .await
                .unwrap();
            held.push(tcp);
        }
    });
    let relay = TestRelay::start().await;
    let client = TestClient::start(client_config(&relay.url(), &app)).await;

    let mut caller = TcpStream::connect(relay.addr).await.unwrap();
    let request = format!("GET /{}/slow HTTP/1.1\r\nHost: r\r\n\r\n", client.session);
    caller.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.ends_with(b"0123456789") {
        let n = tokio::time::timeout(Duration::from_secs(10), caller.read(&mut buf))
            .await
            .expect("the first part of the answer")
            .unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let stalled = Instant::now();
    let rest = tokio::time::timeout(Duration::from_secs(3600), caller.read(&mut buf))
        .await
        .expect("the stalled exchange still held the connection after an hour");
    assert!(matches!(rest, Ok(0) | Err(_)), "{rest:?}");
    assert!(
        stalled.elapsed() >= ferry_relay::IDLE_TIMEOUT,
        "{:?}",
        stalled.elapsed()
    );
}
