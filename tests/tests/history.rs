//! The relay's history API: list with filters and pages, show in full, replay through the
//! connected client, and who may see what.

use bytes::Bytes;
use ferry_protocol::HeaderList;
use ferry_relay::auth::sha256;
use ferry_relay::store::{
    now_ms, NewRequest, OfflinePolicy, Outcome, RequestId, RequestState, RespondMode, Response,
    SessionKind, SessionRecord, Store,
};
use ferry_tests::{client_config, send, Behaviour, Origin, TestClient, TestRelay, TOKEN};
use http::{Method, StatusCode};
use serde_json::Value;

const SESSION: &str = "hist-test";
const OTHER: &str = "other-owners";

fn session(id: &str, token: &str) -> SessionRecord {
    SessionRecord {
        id: id.into(),
        owner: sha256(token.as_bytes()),
        resume_digest: [0; 32],
        kind: SessionKind::Named,
        offline: OfflinePolicy::Queue,
        respond: RespondMode::Pass,
        created_at: now_ms(),
        last_seen_at: now_ms(),
    }
}

async fn record(
    store: &Store,
    session: &str,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
    status: u16,
) -> RequestId {
    let headers: HeaderList = headers.iter().copied().collect();
    let request = NewRequest::new(
        session,
        now_ms(),
        method,
        target,
        headers,
        Bytes::from_static(body),
        RequestState::Delivering,
    );
    let id = store.record_request(request).await.unwrap();
    let attempt = store.start_attempt(id).await.unwrap();
    let body = Bytes::from(format!("answer {status}"));
    let response = Response {
        status,
        headers: [("content-type", "text/plain")].into_iter().collect(),
        body_len: body.len() as u64,
        body,
        duration: std::time::Duration::from_millis(12),
    };
    let outcome = if status < 500 {
        Outcome::Delivered(response)
    } else {
        Outcome::Rejected {
            response,
            retry_at: None,
        }
    };
    store.finish_attempt(id, attempt, outcome).await.unwrap();
    id
}

async fn api(
    relay: &TestRelay,
    method: Method,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    let url = format!("{}/_ferry/v1/sessions/{path}", relay.url());
    let (status, _, body) = send(method, &url, &headers, Bytes::new()).await;
    let value =
        serde_json::from_slice(&body).unwrap_or_else(|_| panic!("not JSON from {url}: {body:?}"));
    (status, value)
}

fn ids(page: &Value) -> Vec<String> {
    page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn list_show_replay_and_auth() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Default::default()).await.unwrap();
    store.upsert_session(session(SESSION, TOKEN)).await.unwrap();
    store
        .upsert_session(session(OTHER, "other-token"))
        .await
        .unwrap();
    let a = record(
        &store,
        SESSION,
        "POST",
        "/webhooks/stripe?x=1",
        &[
            ("content-type", "application/json"),
            ("x-github-delivery", "gh-1"),
        ],
        br#"{"id":"evt_1"}"#,
        200,
    )
    .await;
    let b = record(&store, SESSION, "GET", "/health", &[], b"", 404).await;
    let c = record(
        &store,
        SESSION,
        "POST",
        "/webhooks/fail",
        &[],
        b"\xff\x00bin",
        503,
    )
    .await;
    let d = record(&store, OTHER, "POST", "/x", &[], b"theirs", 200).await;
    let relay = TestRelay::start_with(|config| config.store = Some(store.clone())).await;
    let base = format!("{SESSION}/requests");

    // Listing: newest first, every field there.
    let (status, page) = api(&relay, Method::GET, &base, Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert_eq!(ids(&page), [c.to_string(), b.to_string(), a.to_string()]);
    assert_eq!(page["next"], Value::Null);
    let first = &page["requests"][2];
    assert_eq!(first["method"], "POST");
    assert_eq!(first["target"], "/webhooks/stripe?x=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["state"], "delivered");
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["provider"], "github");
    assert_eq!(first["provider_id"], "gh-1");
    assert!(first["received_at_ms"].as_i64().unwrap() > 0);
    assert_eq!(page["requests"][0]["state"], "failed");

    // Filters and pages.
    for (query, expected) in [
        ("status=5xx", vec![c]),
        ("status=404", vec![b]),
        ("method=post", vec![c, a]),
        ("path=%2Fwebhooks%2F", vec![c, a]),
        ("state=failed", vec![c]),
        ("since=0&until=1", vec![]),
    ] {
        let (status, page) =
            api(&relay, Method::GET, &format!("{base}?{query}"), Some(TOKEN)).await;
        assert_eq!(status, StatusCode::OK, "{query}: {page}");
        let expected: Vec<String> = expected.iter().map(ToString::to_string).collect();
        assert_eq!(ids(&page), expected, "{query}");
    }
    let (_, page) = api(&relay, Method::GET, &format!("{base}?limit=2"), Some(TOKEN)).await;
    assert_eq!(ids(&page), [c.to_string(), b.to_string()]);
    let next = page["next"].as_str().unwrap().to_owned();
    let (_, page) = api(
        &relay,
        Method::GET,
        &format!("{base}?limit=2&before={next}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(ids(&page), [a.to_string()]);
    let (status, err) = api(
        &relay,
        Method::GET,
        &format!("{base}?status=abc"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");

    // Show: head, body, response, attempts.
    let (status, full) = api(&relay, Method::GET, &format!("{base}/{a}"), Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{full}");
    let b64 = B64;
    assert_eq!(
        b64.decode(full["body_b64"].as_str().unwrap()).unwrap(),
        br#"{"id":"evt_1"}"#
    );
    assert_eq!(full["body_len"], 14);
    assert_eq!(full["body_truncated"], false);
    assert_eq!(
        full["headers"][0],
        serde_json::json!(["content-type", "application/json"])
    );
    assert_eq!(full["response"]["status"], 200);
    assert_eq!(
        b64.decode(full["response"]["body_b64"].as_str().unwrap())
            .unwrap(),
        b"answer 200"
    );
    assert_eq!(full["attempt_log"].as_array().unwrap().len(), 1);
    assert_eq!(full["attempt_log"][0]["outcome"], "delivered");
    let (_, binary) = api(&relay, Method::GET, &format!("{base}/{c}"), Some(TOKEN)).await;
    assert_eq!(
        b64.decode(binary["body_b64"].as_str().unwrap()).unwrap(),
        b"\xff\x00bin"
    );

    // Unknown, foreign and malformed ids are all 404.
    for id in [
        d.to_string(),
        "nope".to_owned(),
        "01ARZ3NDEKTSV4RRFFQ69G5FAV".to_owned(),
    ] {
        let (status, err) = api(&relay, Method::GET, &format!("{base}/{id}"), Some(TOKEN)).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{id}: {err}");
        assert_eq!(err["error"], "unknown request");
    }

    // Auth: no token / unknown token 401; someone else's session looks missing.
    let (status, err) = api(&relay, Method::GET, &base, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{err}");
    let (status, _) = api(&relay, Method::GET, &base, Some("wrong-token")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, err) = api(&relay, Method::GET, &base, Some("other-token")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    let (status, _) = api(
        &relay,
        Method::GET,
        &format!("{SESSION}/requests/{a}"),
        Some("other-token"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, page) = api(
        &relay,
        Method::GET,
        &format!("{OTHER}/requests"),
        Some("other-token"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ids(&page), [d.to_string()]);
    let (status, _) = api(&relay, Method::GET, "nobody-here/requests", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api(
        &relay,
        Method::GET,
        &format!("{base}/{a}/replay"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);

    // Replay with no client: 409.
    let (status, err) = api(
        &relay,
        Method::POST,
        &format!("{base}/{a}/replay"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["detail"].as_str().unwrap().contains("no ferry client"),
        "{err}"
    );

    // Replay through a connected client reaches the app, twice if asked twice.
    let origin = Origin::start(Behaviour::fixed(201, "again")).await;
    let state = tempfile::tempdir().unwrap();
    let mut config = client_config(&relay.url(), &origin.url("/"));
    config.name = Some(SESSION.into());
    config.state_dir = Some(state.path().to_owned());
    let client = TestClient::start(config).await;
    for attempt in [2, 3] {
        let (status, done) = api(
            &relay,
            Method::POST,
            &format!("{base}/{a}/replay"),
            Some(TOKEN),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{done}");
        assert_eq!(done["replayed"], true);
        assert_eq!(done["id"], a.to_string());
        assert_eq!(done["attempt"], attempt);
        assert_eq!(done["status"], 201);
        let seen = origin.next_request().await;
        assert_eq!(seen.method, "POST");
        assert_eq!(seen.uri, "/webhooks/stripe?x=1");
        assert_eq!(
            seen.header_str("ferry-replay-of"),
            Some(a.to_string().as_str())
        );
    }
    assert_eq!(origin.request_count(), 2);
    let (_, full) = api(&relay, Method::GET, &format!("{base}/{a}"), Some(TOKEN)).await;
    let log = full["attempt_log"].as_array().unwrap();
    assert_eq!(log.len(), 3, "{full}");
    assert_eq!(log[1]["replay"], true);
    assert_eq!(log[1]["replay_of"], 1);
    assert_eq!(log[2]["status"], 201);
    client.stop().await;
}

/// Standard base64 decoding, enough for these tests.
struct B64;

impl B64 {
    fn decode(&self, text: &str) -> Result<Vec<u8>, String> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = Vec::new();
        let mut acc = 0u32;
        let mut bits = 0;
        for c in text.bytes().filter(|c| *c != b'=') {
            let v = ALPHABET.iter().position(|a| *a == c).ok_or("bad base64")? as u32;
            acc = (acc << 6) | v;
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }
}

#[tokio::test]
async fn without_a_store_history_is_unavailable() {
    let relay = TestRelay::start().await;
    let origin = Origin::start(Behaviour::fixed(200, "ok")).await;
    let mut config = client_config(&relay.url(), &origin.url("/"));
    config.name = Some(SESSION.into());
    config.state_dir = None;
    let client = TestClient::start(config).await;
    let (status, err) = api(
        &relay,
        Method::GET,
        &format!("{SESSION}/requests"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{err}");
    client.stop().await;
}

/// Requests passed straight through a live tunnel (recorded in history blocks, not rows) are
/// listed, shown and replayed through the API like any other.
#[tokio::test]
async fn passed_through_requests_are_listed_shown_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), Default::default()).await.unwrap();
    let relay = TestRelay::start_with({
        let store = store.clone();
        move |config| config.store = Some(store)
    })
    .await;
    let origin = Origin::start(Behaviour::fixed(200, "got it")).await;
    let mut config = client_config(&relay.url(), &origin.url("/"));
    config.name = Some("live-hist".into());
    let client = TestClient::start(config).await;
    let bodies: [&[u8]; 3] = [br#"{"n":1}"#, b"\xff\x00raw", br#"{"n":3}"#];
    for (n, body) in bodies.iter().enumerate() {
        let url = format!("{}/hook/{n}", client.url);
        let (status, _, answer) = send(
            Method::POST,
            &url,
            &[("x-github-delivery", "same-delivery")],
            Bytes::from_static(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&answer[..], b"got it");
    }
    // History is written in the background: wait for all three.
    let listed = ferry_tests::wait_for_store(&store, "three recorded requests", || async {
        let page = store
            .list("live-hist", &Default::default(), Default::default())
            .await
            .unwrap();
        (page.requests.len() == 3).then_some(page.requests)
    })
    .await;
    let (status, page) = api(&relay, Method::GET, "live-hist/requests", Some(TOKEN)).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    let expected: Vec<String> = listed.iter().map(|r| r.id.to_string()).collect();
    assert_eq!(ids(&page), expected);
    let targets: Vec<&str> = page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["target"].as_str().unwrap())
        .collect();
    assert_eq!(targets, ["/hook/2", "/hook/1", "/hook/0"], "newest first");
    let first = &expected[2];
    let retry = &expected[1];

    // Shown in full: the body byte for byte, the app's answer, one delivered attempt; the
    // provider's second delivery of the same id is marked a duplicate of the first.
    let (status, full) = api(
        &relay,
        Method::GET,
        &format!("live-hist/requests/{retry}"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{full}");
    assert_eq!(
        B64.decode(full["body_b64"].as_str().unwrap()).unwrap(),
        bodies[1]
    );
    assert_eq!(full["response"]["status"], 200, "{full}");
    assert_eq!(full["duplicate_of"], first.as_str(), "{full}");
    assert_eq!(full["attempt_log"].as_array().unwrap().len(), 1, "{full}");

    // Replayed through the connected client: the app sees the same body again.
    let (status, done) = api(
        &relay,
        Method::POST,
        &format!("live-hist/requests/{first}/replay"),
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["attempt"], 2, "{done}");
    for _ in 0..3 {
        origin.next_request().await;
    }
    let replayed = origin.next_request().await;
    assert_eq!(replayed.uri, "/hook/0");
    assert_eq!(replayed.header_str("ferry-replay-of"), Some(first.as_str()));
    assert_eq!(replayed.body.as_deref(), Some(bodies[0]));
    let (_, after) = api(&relay, Method::GET, "live-hist/requests", Some(TOKEN)).await;
    assert_eq!(ids(&after), expected, "still listed once each");
    client.stop().await;
}
