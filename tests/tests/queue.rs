//! The offline queue (issue 4): requests for a session with no client are stored durably and
//! answered 202, then delivered in order when a client connects; sessions survive restarts.

use std::path::Path;
use std::time::Duration;

use ferry_protocol::OfflinePolicy as ClientOffline;
use ferry_relay::store::{
    now_ms, OfflinePolicy, RequestState, SessionKind, SessionRecord, Store, StoreOptions,
};
use ferry_tests::{client_config, send, Behaviour, KillableRelay, Origin, TestClient, TOKEN};
use http::{Method, StatusCode};
use tempfile::TempDir;

/// Stores a named session owned by [`TOKEN`] in `dir`, as a client claiming it would have.
async fn seed_session(dir: &Path, name: &str, offline: OfflinePolicy) {
    let store = Store::open(dir, StoreOptions::default())
        .await
        .expect("open store");
    store
        .upsert_session(SessionRecord {
            id: name.to_owned(),
            owner: ferry_relay::auth::sha256(TOKEN.as_bytes()),
            resume_digest: [0; 32],
            kind: SessionKind::Named,
            offline,
            respond: Default::default(),
            created_at: now_ms(),
            last_seen_at: now_ms(),
        })
        .await
        .expect("store session");
    store.close().await;
}

/// POSTs `body` to `url` and expects `202 {"queued":true,"id":...}`; returns the id.
async fn post_queued(url: &str, body: &str) -> String {
    let (status, headers, reply) =
        send(Method::POST, url, &[("x-test", body)], body.to_owned()).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "{}",
        String::from_utf8_lossy(&reply)
    );
    assert_eq!(headers["content-type"], "application/json");
    let json: serde_json::Value = serde_json::from_slice(&reply).expect("json");
    assert_eq!(json["queued"], true);
    json["id"].as_str().expect("id").to_owned()
}

fn named_client(relay: &str, origin: &Origin, name: &str) -> ferry_client::ClientConfig {
    let mut config = client_config(relay, &origin.url(""));
    config.name = Some(name.to_owned());
    config
}

#[tokio::test]
async fn offline_requests_are_queued_then_delivered_in_order_exactly_once() {
    let dir = TempDir::new().unwrap();
    seed_session(dir.path(), "queued", OfflinePolicy::Queue).await;
    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let origin = Origin::start(Behaviour::Echo).await;
    let url = format!("{}/queued/hook", relay.url());

    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(post_queued(&format!("{url}?n={i}"), &format!("event {i}")).await);
    }
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, ids, "ids are unique and sortable by arrival");
    assert_eq!(origin.request_count(), 0);

    let _client = TestClient::start(named_client(&relay.url(), &origin, "queued")).await;
    for (i, id) in ids.iter().enumerate() {
        let got = origin.next_request().await;
        assert_eq!(got.method, "POST");
        assert_eq!(got.uri, format!("/hook?n={i}"));
        assert_eq!(got.body.as_deref(), Some(format!("event {i}").as_bytes()));
        assert_eq!(
            got.header_str("x-test"),
            Some(format!("event {i}").as_str())
        );
        assert_eq!(got.header_str("ferry-delivery-id"), Some(id.as_str()));
        let age: u64 = got
            .header_str("ferry-delivery-age")
            .expect("age header")
            .parse()
            .expect("age in seconds");
        assert!(age < 60, "age {age}");
    }
    // Once the backlog is gone requests pass through again (or, if the relay has not yet
    // noticed, queue behind nothing); either way the app sees this one next, once.
    let (status, _, _) = send(Method::POST, &format!("{url}?n=last"), &[], "last").await;
    assert!(
        status == StatusCode::OK || status == StatusCode::ACCEPTED,
        "{status}"
    );
    let got = origin.next_request().await;
    assert_eq!(got.uri, "/hook?n=last", "no request delivered twice");
    assert_eq!(origin.request_count(), 21);
    relay.kill().await;
}

#[tokio::test]
async fn a_request_accepted_before_a_crash_is_delivered_after_restart() {
    let dir = TempDir::new().unwrap();
    seed_session(dir.path(), "crashy", OfflinePolicy::Queue).await;
    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let id = post_queued(&format!("{}/crashy/pay", relay.url()), "charge").await;
    relay.kill().await;

    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let origin = Origin::start(Behaviour::Echo).await;
    let _client = TestClient::start(named_client(&relay.url(), &origin, "crashy")).await;
    let got = origin.next_request().await;
    assert_eq!(got.uri, "/pay");
    assert_eq!(got.body.as_deref(), Some(&b"charge"[..]));
    assert_eq!(got.header_str("ferry-delivery-id"), Some(id.as_str()));
    relay.kill().await;
}

#[tokio::test]
async fn named_and_random_session_urls_survive_a_relay_restart() {
    let dir = TempDir::new().unwrap();
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let addr = relay.addr;
    let named = TestClient::start(named_client(&relay.url(), &origin, "stable")).await;
    let mut random = TestClient::start(client_config(&relay.url(), &origin.url(""))).await;
    let random_url = random.url.clone();
    named.kill();
    relay.kill().await;

    // Same data dir and port: the named session is known (its requests queue rather than 404)
    // and the random client resumes its session with its secret.
    let relay = KillableRelay::start_at(addr, dir.path(), |_| {}).await;
    let url = random
        .wait_for(Duration::from_secs(10), |event| match event {
            ferry_client::Event::Online { url } => Some(url.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        url, random_url,
        "the random URL is the same after the restart"
    );
    let (status, _, _) = send(Method::POST, &format!("{random_url}/r"), &[], "r").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(origin.next_request().await.uri, "/r");

    let id = post_queued(&format!("{}/stable/n", relay.url()), "n").await;
    let _named = TestClient::start(named_client(&relay.url(), &origin, "stable")).await;
    let got = origin.next_request().await;
    assert_eq!(got.uri, "/n");
    assert_eq!(got.header_str("ferry-delivery-id"), Some(id.as_str()));
    relay.kill().await;
}

#[tokio::test]
async fn a_session_that_opted_out_of_the_queue_gets_503_while_offline() {
    let dir = TempDir::new().unwrap();
    let origin = Origin::start(Behaviour::Echo).await;
    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let mut config = named_client(&relay.url(), &origin, "no-queue");
    config.offline = Some(ClientOffline::Reject);
    let client = TestClient::start(config).await;
    client.kill();
    relay.kill().await;

    let relay = KillableRelay::start(dir.path(), |_| {}).await;
    let (status, headers, _) = send(
        Method::POST,
        &format!("{}/no-queue/x", relay.url()),
        &[],
        "x",
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "5");
    relay.kill().await;
    assert_eq!(origin.request_count(), 0);
}

#[tokio::test]
async fn failing_deliveries_are_retried_then_parked_as_failed() {
    let dir = TempDir::new().unwrap();
    seed_session(dir.path(), "flaky", OfflinePolicy::Queue).await;
    let relay = KillableRelay::start(dir.path(), |config| {
        config.max_attempts = 3;
        config.retry_base = Duration::from_millis(20);
    })
    .await;
    let origin = Origin::start(Behaviour::fixed(500, "boom")).await;
    let first = post_queued(&format!("{}/flaky/a", relay.url()), "a").await;
    let second = post_queued(&format!("{}/flaky/b", relay.url()), "b").await;
    let _client = TestClient::start(named_client(&relay.url(), &origin, "flaky")).await;
    for _ in 0..3 {
        let got = origin.next_request().await;
        assert_eq!(
            got.uri, "/a",
            "the failing request is retried before the next one"
        );
        assert_eq!(got.header_str("ferry-delivery-id"), Some(first.as_str()));
    }
    origin.set_behaviour(Behaviour::Echo);
    let got = origin.next_request().await;
    assert_eq!(got.uri, "/b", "after its last attempt the first is parked");
    assert_eq!(got.header_str("ferry-delivery-id"), Some(second.as_str()));
    // The relay records an outcome before it goes on: once a third request reaches the app,
    // the second one's is on disk.
    let (status, _, _) = send(Method::POST, &format!("{}/flaky/c", relay.url()), &[], "c").await;
    assert!(
        status == StatusCode::OK || status == StatusCode::ACCEPTED,
        "{status}"
    );
    assert_eq!(origin.next_request().await.uri, "/c");
    relay.kill().await;

    let store = Store::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    let a = store.get(first.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(a.summary.state, RequestState::Failed);
    assert_eq!(a.summary.attempts, 3);
    assert_eq!(a.summary.status, Some(500));
    let b = store.get(second.parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(b.summary.state, RequestState::Delivered);
    assert_eq!(b.summary.status, Some(200));
    store.close().await;
}

#[tokio::test]
async fn a_corrupt_store_refuses_to_open_with_a_clear_message() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("ferry.db"), vec![0x5a; 8192]).unwrap();
    let err = Store::open(dir.path(), StoreOptions::default())
        .await
        .expect_err("a garbage database must not open");
    let message = err.to_string();
    assert!(message.contains("ferry.db"), "{message}");
    assert!(message.contains("damaged"), "{message}");
}

#[tokio::test]
async fn requests_passed_straight_through_are_recorded_with_their_response() {
    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    let relay = ferry_tests::TestRelay::start_with({
        let store = store.clone();
        move |config| config.store = Some(store)
    })
    .await;
    let origin = Origin::start(Behaviour::fixed(201, "made")).await;
    let client = TestClient::start(named_client(&relay.url(), &origin, "live")).await;
    let (status, _, body) =
        send(Method::POST, &format!("{}/x?y=1", client.url), &[], "hello").await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(&body[..], b"made");
    // Recording happens after the answer, in the background: wait for it to land.
    let summary = ferry_tests::wait_for_store(&store, "the delivered request", || async {
        let page = store
            .list("live", &Default::default(), Default::default())
            .await
            .unwrap();
        page.requests
            .into_iter()
            .find(|r| r.state == RequestState::Delivered)
    })
    .await;
    assert_eq!(summary.method, "POST");
    assert_eq!(summary.target, "/x?y=1");
    assert_eq!(summary.status, Some(201));
    let record = store.get(summary.id).await.unwrap().unwrap();
    assert_eq!(&record.body[..], b"hello");
    let response = record.response.expect("response");
    assert_eq!(&response.body[..], b"made");
    assert_eq!(record.attempt_log.len(), 1, "{:?}", record.attempt_log);
    let attempt = &record.attempt_log[0];
    assert_eq!((attempt.number, attempt.status), (1, Some(201)));
    assert_eq!(
        attempt.outcome,
        ferry_relay::store::AttemptOutcome::Delivered
    );
    relay.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_body_over_the_record_limit_is_recorded_in_part_with_its_full_length() {
    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default())
        .await
        .unwrap();
    let relay = ferry_tests::TestRelay::start_with({
        let store = store.clone();
        move |config| {
            config.store = Some(store);
            config.record_max_body = 16;
        }
    })
    .await;
    let origin = Origin::start(Behaviour::Echo).await;
    let client = TestClient::start(named_client(&relay.url(), &origin, "bigbody")).await;
    let body = "x".repeat(100);
    let (status, _, echoed) = send(
        Method::POST,
        &format!("{}/big", client.url),
        &[],
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed.len(), 100, "the caller gets all of it");
    let summary = ferry_tests::wait_for_store(&store, "the recorded request", || async {
        let page = store
            .list("bigbody", &Default::default(), Default::default())
            .await
            .unwrap();
        page.requests.into_iter().next()
    })
    .await;
    assert_eq!(summary.body_len, 100);
    assert!(summary.body_truncated);
    let record = store.get(summary.id).await.unwrap().unwrap();
    assert_eq!(record.body.len(), 16);
    let response = record.response.expect("response");
    assert_eq!(response.body.len(), 16);
    assert_eq!(response.body_len, 100);
    assert!(response.body_truncated);
    relay.shutdown().await.unwrap();
}
