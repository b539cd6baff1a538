//! Bodies stream through in both directions with memory bounded by the flow-control window.

use std::sync::Arc;

use bytes::Bytes;
use ferry_mux::MuxStats;
use ferry_protocol::flow::STREAM_WINDOW;
use ferry_tests::*;
use http::Method;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_body_streams_both_ways_within_one_window() {
    const SIZE: usize = 256 * 1024 * 1024;
    const CHUNK: usize = 256 * 1024;
    let origin = Origin::start(Behaviour::Echo).await;
    let relay_stats = Arc::new(MuxStats::default());
    let relay = TestRelay::start_with({
        let stats = relay_stats.clone();
        move |c| {
            c.max_body = 512 * 1024 * 1024;
            c.stats = stats;
        }
    })
    .await;
    let mut config = client_config(&relay.url(), &origin.addr().to_string());
    let client_stats = config.stats.clone();
    config.timeout = std::time::Duration::from_secs(120);
    let client = TestClient::start(config).await;

    let (tx, body) = body_channel(4);
    let producer = tokio::spawn(async move {
        let mut offset = 0usize;
        while offset < SIZE {
            let chunk = Bytes::from(pattern(offset as u64, CHUNK));
            offset += CHUNK;
            if tx.send(Ok(chunk)).await.is_err() {
                return;
            }
        }
    });
    let request = http::Request::builder()
        .method(Method::POST)
        .uri(format!("{}/upload", client.url))
        .header("content-length", SIZE)
        .body(body)
        .unwrap();
    let response = http_client().request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let (len, digest) = body_digest(response.into_body().boxed()).await.unwrap();
    producer.await.unwrap();
    let seen = origin.next_request().await;
    assert_eq!(seen.body_len, SIZE as u64);
    assert_eq!(seen.body_sha256_hex, pattern_sha256_hex(SIZE as u64));
    assert_eq!(len, SIZE as u64, "echoed length");
    assert_eq!(digest, pattern_sha256_hex(SIZE as u64), "echoed bytes");

    // Nothing ever waited unconsumed beyond one window on either side.
    let window = STREAM_WINDOW as usize;
    assert!(
        client_stats.peak_buffered() <= window,
        "client buffered {}",
        client_stats.peak_buffered()
    );
    assert!(
        relay_stats.peak_buffered() <= window,
        "relay buffered {}",
        relay_stats.peak_buffered()
    );
    assert!(
        client_stats.frames_received() > (SIZE / (64 * 1024)) as u64,
        "the body went through the client"
    );
    assert!(
        relay_stats.frames_received() > (SIZE / (64 * 1024)) as u64,
        "the response went through the relay"
    );
}
