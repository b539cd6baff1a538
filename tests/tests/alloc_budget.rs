//! A regression guard for the per-request cost that does not depend on timing: heap
//! allocations per forwarded webhook, counted across relay, client, local app and caller (all
//! in this process). A change that makes the hot path allocate much more fails here.

use std::alloc::System;

use bytes::Bytes;
use ferry_tests::*;
use http::Method;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// What relay and client may add per 1 KiB webhook, history included. Measured at 160
/// allocations (about 40 KB) when this guard was written without the store, 190 (43 KB) with it,
/// 164 with history blocks, 123 since header lists keep their entries in shared buffers
/// (docs/BENCHMARKS.md, finding 20) and 115 since the client keeps its own connections to the
/// app (finding 23), 111 with heads in binary form (finding 25), 100 without per-request strings
/// for forwarding headers or a counting closure (finding 26), 91 with the client's own HTTP/1
/// to the app (finding 29), 86–87 with the relay's own HTTP/1 path for plain webhooks (finding
/// 34); the budget leaves headroom for noise from pooled connections, not for a new copy, task
/// or buffer per request.
const BUDGET_PER_REQUEST: u64 = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_webhook_stays_within_its_allocation_budget() {
    let origin = Origin::start(Behaviour::fixed(200, r#"{"ok":true}"#)).await;
    // With the store, as the relay runs by default: history is part of the per-request cost.
    let data = tempfile::tempdir().unwrap();
    let store = ferry_relay::store::Store::open(data.path(), Default::default())
        .await
        .unwrap();
    let relay = TestRelay::start_with(|config| config.store = Some(store)).await;
    let client = TestClient::start(client_config(&relay.url(), &origin.addr().to_string())).await;
    let http = http_client();
    let url = format!("{}/hook", client.url);
    let body = Bytes::from(vec![b'x'; 1024]);
    let headers = [
        ("content-type", "application/json"),
        ("x-github-delivery", "72d3162e-cc78-11e3-81ab-4c9367dc0958"),
        (
            "x-hub-signature-256",
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
        ),
    ];
    const N: u64 = 400;
    let measure = |url: String| {
        let http = http.clone();
        let body = body.clone();
        async move {
            for _ in 0..50 {
                send_with(&http, Method::POST, &url, &headers, full_body(body.clone()))
                    .await
                    .unwrap();
            }
            let region = Region::new(GLOBAL);
            for _ in 0..N {
                let (status, _, _) =
                    send_with(&http, Method::POST, &url, &headers, full_body(body.clone()))
                        .await
                        .unwrap();
                assert_eq!(status, 200);
            }
            let change = region.change();
            (
                (change.allocations + change.reallocations) as u64 / N,
                change.bytes_allocated as u64 / N,
            )
        }
    };
    // The caller and the local app alone, then the same through the tunnel: the difference is
    // what relay and client add.
    let (direct, direct_bytes) = measure(origin.url("/hook")).await;
    let (tunnel, tunnel_bytes) = measure(url.clone()).await;
    let per_request = tunnel.saturating_sub(direct);
    let bytes_per_request = tunnel_bytes.saturating_sub(direct_bytes);
    println!("direct: {direct} allocations / {direct_bytes} bytes; tunnel adds {per_request} allocations / {bytes_per_request} bytes per request");
    assert!(
        per_request <= BUDGET_PER_REQUEST,
        "{per_request} allocations per request, budget {BUDGET_PER_REQUEST}"
    );
}
