//! Answer modes (issue 4): `--respond-now` answers every caller at once and delivers through
//! the queue; `--deadline` relays the real answer when it comes in time, and otherwise answers
//! `202` at the deadline while the request carries on and its result is recorded.

use ferry_protocol::RespondPolicy;
use ferry_relay::store::{RequestState, RequestSummary, Store};
use ferry_tests::{client_config, send, Behaviour, Origin, ReadGate, TestClient, TestRelay};
use http::{Method, StatusCode};
use tempfile::TempDir;

async fn relay_with_store() -> (TempDir, Store, TestRelay) {
    let dir = TempDir::new().unwrap();
    let store = Store::open(dir.path(), Default::default()).await.unwrap();
    let relay = TestRelay::start_with({
        let store = store.clone();
        move |config| config.store = Some(store)
    })
    .await;
    (dir, store, relay)
}

async fn client(relay: &TestRelay, origin: &Origin, name: &str, mode: RespondPolicy) -> TestClient {
    let mut config = client_config(&relay.url(), &origin.url(""));
    config.name = Some(name.to_owned());
    config.respond = Some(mode);
    TestClient::start(config).await
}

/// Waits until the session's request to `target` is in `state` in the store.
async fn wait_for_state(
    store: &Store,
    session: &str,
    target: &str,
    state: RequestState,
) -> RequestSummary {
    let what = format!("{target} in state {state:?}");
    ferry_tests::wait_for_store(store, &what, || async {
        let page = store
            .list(session, &Default::default(), Default::default())
            .await
            .unwrap();
        page.requests
            .into_iter()
            .find(|r| r.target == target && r.state == state)
    })
    .await
}

#[tokio::test]
async fn respond_now_answers_at_once_and_delivers_through_the_queue() {
    let (_dir, store, relay) = relay_with_store().await;
    let gate = ReadGate::new();
    let origin = Origin::start(Behaviour::SlowReader(gate.clone())).await;
    let now = RespondPolicy::Now {
        status: None,
        body: None,
    };
    let client = client(&relay, &origin, "debugging", now).await;

    // The app cannot answer (its gate is closed), yet the caller has its answer.
    let (status, headers, body) =
        send(Method::POST, &format!("{}/hook", client.url), &[], "evt").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["queued"], true);
    let id = json["id"].as_str().unwrap().to_owned();
    assert_eq!(headers["ferry-queued-id"], id.as_str());

    gate.open();
    let got = origin.next_request().await;
    assert_eq!(got.uri, "/hook");
    assert_eq!(got.body.as_deref(), Some(&b"evt"[..]));
    assert_eq!(got.header_str("ferry-delivery-id"), Some(id.as_str()));
    let delivered = wait_for_state(&store, "debugging", "/hook", RequestState::Delivered).await;
    assert_eq!(delivered.id.to_string(), id);
    assert_eq!(delivered.status, Some(200));
    assert_eq!(origin.request_count(), 1, "delivered once");
}

#[tokio::test]
async fn respond_now_can_answer_with_the_users_status_and_body() {
    let (_dir, store, relay) = relay_with_store().await;
    let origin = Origin::start(Behaviour::fixed(500, "app is broken")).await;
    let now = RespondPolicy::Now {
        status: Some(200),
        body: Some(r#"{"ok":true}"#.to_owned()),
    };
    let client = client(&relay, &origin, "canned", now).await;
    let (status, headers, body) =
        send(Method::POST, &format!("{}/slack", client.url), &[], "cmd").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], br#"{"ok":true}"#);
    assert_eq!(headers["content-type"], "application/json");
    assert!(headers.contains_key("ferry-queued-id"));
    // The app still gets the request; its 500 is recorded and retried like any queued one.
    assert_eq!(origin.next_request().await.uri, "/slack");
    let summary = store
        .list("canned", &Default::default(), Default::default())
        .await
        .unwrap()
        .requests;
    assert_eq!(summary.len(), 1);
    drop(client);
}

#[tokio::test]
async fn deadline_relays_a_timely_answer_and_answers_202_for_a_late_one() {
    let (_dir, store, relay) = relay_with_store().await;
    let gate = ReadGate::new();
    let origin = Origin::start(Behaviour::route({
        let gate = gate.clone();
        move |parts| {
            if parts.uri.path() == "/slow" {
                Behaviour::SlowReader(gate.clone())
            } else {
                Behaviour::Echo
            }
        }
    }))
    .await;
    let deadline = RespondPolicy::Deadline { millis: 500 };
    let client = client(&relay, &origin, "deadline", deadline).await;

    let (status, _, body) = send(Method::POST, &format!("{}/fast", client.url), &[], "hi").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "an answer in time is relayed as it is"
    );
    assert_eq!(&body[..], b"hi");

    let (status, _, body) = send(Method::POST, &format!("{}/slow", client.url), &[], "late").await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(json["accepted"], true, "{json}");
    // The request carries on: once the app answers, its real result is in history.
    gate.open();
    let recorded = wait_for_state(&store, "deadline", "/slow", RequestState::Delivered).await;
    assert_eq!(recorded.status, Some(200));
    let record = store.get(recorded.id).await.unwrap().unwrap();
    assert_eq!(&record.body[..], b"late");
}
