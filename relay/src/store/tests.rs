//! The store's tests: durability across crashes, round trips, queue order, attempts, history,
//! pruning, refusal of bad files, group commit, and a throughput benchmark (ignored by default).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferry_protocol::HeaderList;
use rusqlite::Connection;

use super::*;

fn session(id: &str, kind: SessionKind) -> SessionRecord {
    SessionRecord {
        id: id.to_owned(),
        owner: [7; 32],
        resume_digest: [9; 32],
        kind,
        offline: OfflinePolicy::Queue,
        respond: RespondMode::Pass,
        created_at: 1_000,
        last_seen_at: 2_000,
    }
}

fn headers(pairs: &[(&str, &[u8])]) -> HeaderList {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_vec()))
        .collect()
}

fn request(session: &str, target: &str, state: RequestState) -> NewRequest {
    NewRequest::new(
        session,
        now_ms(),
        "POST",
        target,
        headers(&[("content-type", b"application/json")]),
        Bytes::from(format!("{{\"target\":\"{target}\"}}")),
        state,
    )
}

fn response(status: u16, body: &'static [u8]) -> Response {
    Response {
        status,
        headers: headers(&[
            ("content-type", b"text/plain"),
            ("x-dup", b"1"),
            ("x-dup", b"2"),
        ]),
        body: Bytes::from_static(body),
        body_len: body.len() as u64,
        duration: Duration::from_millis(12),
    }
}

async fn open(dir: &Path) -> Store {
    Store::open(dir, StoreOptions::default()).await.unwrap()
}

async fn open_with_one_session(dir: &Path) -> Store {
    let store = open(dir).await;
    store
        .upsert_session(session("s1", SessionKind::Named))
        .await
        .unwrap();
    store
}

async fn open_with_two_sessions(dir: &Path) -> Store {
    let store = open_with_one_session(dir).await;
    store
        .upsert_session(session("s2", SessionKind::Named))
        .await
        .unwrap();
    store
}

fn copy_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in [DB_FILE.to_owned(), format!("{DB_FILE}-wal")] {
        let source = from.join(&name);
        if source.exists() {
            std::fs::copy(&source, to.join(&name)).unwrap();
        }
    }
}

#[tokio::test]
async fn open_creates_the_directory_and_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested/data");
    let store = open(&dir).await;
    assert_eq!(store.path(), dir.join("ferry.db"));
    drop(store);
    let conn = Connection::open(dir.join("ferry.db")).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(page_size, 16384, "history rows are written to 16 KiB pages");
    let vacuum: i64 = conn
        .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
        .unwrap();
    assert_eq!(vacuum, 2, "incremental auto-vacuum");
}

#[tokio::test]
async fn sessions_and_queue_survive_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    let store = open(&live).await;
    let mut named = session("stripe-dev", SessionKind::Named);
    named.respond = RespondMode::Now {
        status: Some(200),
        body: Some(Bytes::from_static(b"ok")),
    };
    let mut random = session("9hRk2wq4TfGm0xYzAb3c_Q", SessionKind::Random);
    random.offline = OfflinePolicy::Reject;
    random.respond = RespondMode::Deadline { millis: 8000 };
    random.resume_digest = [3; 32];
    random.created_at = 1_500;
    store.upsert_session(named.clone()).await.unwrap();
    store.upsert_session(random.clone()).await.unwrap();
    // Upsert keeps created_at and replaces the rest.
    let mut touched = named.clone();
    touched.created_at = 5;
    touched.last_seen_at = 9_999;
    store.upsert_session(touched).await.unwrap();
    named.last_seen_at = 9_999;

    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            store
                .record_request(request(
                    "stripe-dev",
                    &format!("/q/{i}"),
                    RequestState::Queued,
                ))
                .await
                .unwrap(),
        );
    }
    let delivering = store
        .record_request(request("stripe-dev", "/mid", RequestState::Delivering))
        .await
        .unwrap();
    let attempt = store.start_attempt(delivering).await.unwrap();
    assert_eq!(attempt, 1);

    // Crash image 1: the files as they are on disk right now, with the store still running.
    let image = tmp.path().join("image");
    copy_files(&live, &image);
    // Crash image 2: the store is dropped without any shutdown call and its files reopened.
    drop(store);

    for dir in [&image, &live] {
        let store = open(dir).await;
        let sessions = store.load_sessions().await.unwrap();
        assert_eq!(
            sessions,
            vec![named.clone(), random.clone()],
            "{}",
            dir.display()
        );
        let queued = store.queued("stripe-dev", 100).await.unwrap();
        let queued_ids: Vec<RequestId> = queued.iter().map(|q| q.id).collect();
        // The request interrupted mid-delivery is queued again, in its arrival position.
        let mut expected = ids.clone();
        expected.push(delivering);
        assert_eq!(queued_ids, expected);
        assert_eq!(queued[2].target, "/q/2");
        assert_eq!(&queued[2].body[..], b"{\"target\":\"/q/2\"}");
        let record = store.get(delivering).await.unwrap().unwrap();
        assert_eq!(record.summary.state, RequestState::Queued);
        assert_eq!(record.attempt_log[0].outcome, AttemptOutcome::Interrupted);
        assert!(record.attempt_log[0].finished_at.is_some());
        // New ids still sort after the old ones.
        let newer = store
            .record_request(request("stripe-dev", "/after", RequestState::Queued))
            .await
            .unwrap();
        assert!(newer > delivering);
        store.close().await;
    }
}

#[tokio::test]
async fn headers_with_raw_bytes_and_duplicates_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let sent = headers(&[
        ("X-Sig", b"a"),
        ("x-latin1", &[0x63, 0x61, 0x66, 0xe9]),
        ("X-Sig", b"b"),
        ("x-bin", &[0xff, 0x00, 0xfe]),
        ("X-Sig", b""),
    ]);
    let body = Bytes::from(vec![0u8, 159, 146, 150, 255]);
    let id = store
        .record_request(NewRequest::new(
            "s1",
            42,
            "PUT",
            "/a//b/%2F?x=1&x=2",
            sent.clone(),
            body.clone(),
            RequestState::Queued,
        ))
        .await
        .unwrap();
    let queued = store.queued("s1", 10).await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].headers, sent);
    assert_eq!(queued[0].body, body);
    assert_eq!(queued[0].target, "/a//b/%2F?x=1&x=2");
    assert_eq!(queued[0].method, "PUT");
    assert_eq!(queued[0].received_at, 42);

    let attempt = store.start_attempt(id).await.unwrap();
    let answer = response(201, b"\xffcreated");
    store
        .finish_attempt(id, attempt, Outcome::Delivered(answer.clone()))
        .await
        .unwrap();
    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.headers, sent);
    assert_eq!(record.body, body);
    let stored = record.response.unwrap();
    assert_eq!(stored.headers, answer.headers);
    assert_eq!(stored.body, answer.body);
    assert_eq!(stored.status, 201);
    assert!(!stored.body_truncated);
}

#[tokio::test]
async fn queue_is_in_arrival_order_and_honours_backoff() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_two_sessions(tmp.path()).await;
    let mut ids = Vec::new();
    for i in 0..20 {
        // Same received_at for all: order must come from arrival, not the clock.
        let mut req = request("s1", &format!("/{i}"), RequestState::Queued);
        req.received_at = 1;
        ids.push(store.record_request(req).await.unwrap());
        store
            .record_request(request("s2", "/other", RequestState::Queued))
            .await
            .unwrap();
    }
    let queued: Vec<RequestId> = store
        .queued("s1", 100)
        .await
        .unwrap()
        .iter()
        .map(|q| q.id)
        .collect();
    assert_eq!(queued, ids);
    assert_eq!(store.queued("s1", 3).await.unwrap().len(), 3);
    assert_eq!(store.next_due("s1").await.unwrap(), Some(1));

    // ids[0] delivered, ids[1] retried in an hour, ids[2] retried at once.
    let a = store.start_attempt(ids[0]).await.unwrap();
    store
        .finish_attempt(ids[0], a, Outcome::Delivered(response(200, b"ok")))
        .await
        .unwrap();
    let a = store.start_attempt(ids[1]).await.unwrap();
    let later = now_ms() + 3_600_000;
    let state = store
        .finish_attempt(
            ids[1],
            a,
            Outcome::Error {
                error: "connection refused".into(),
                retry_at: Some(later),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Queued);
    let a = store.start_attempt(ids[2]).await.unwrap();
    // While delivering it is not in the queue.
    assert_eq!(store.queued("s1", 1).await.unwrap()[0].id, ids[3]);
    let state = store
        .finish_attempt(
            ids[2],
            a,
            Outcome::Rejected {
                response: response(503, b"busy"),
                retry_at: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Queued);
    let queued = store.queued("s1", 100).await.unwrap();
    assert_eq!(queued[0].id, ids[2]);
    assert_eq!(queued[0].attempts, 1);
    assert_eq!(queued.len(), 18);
    assert!(!queued.iter().any(|q| q.id == ids[0] || q.id == ids[1]));
    let record = store.get(ids[1]).await.unwrap().unwrap();
    assert_eq!(record.summary.next_attempt_at, later);
}

#[tokio::test]
async fn attempts_and_replays_are_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let id = store
        .record_request(request("s1", "/hook", RequestState::Delivering))
        .await
        .unwrap();

    let first = store.start_attempt(id).await.unwrap();
    let state = store
        .finish_attempt(
            id,
            first,
            Outcome::Error {
                error: "app down".into(),
                retry_at: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Queued);
    let second = store.start_attempt(id).await.unwrap();
    let state = store
        .finish_attempt(
            id,
            second,
            Outcome::Rejected {
                response: response(500, b"boom"),
                retry_at: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Failed, "parked");
    // Finishing twice is refused.
    let again = store
        .finish_attempt(id, second, Outcome::Delivered(response(200, b"")))
        .await;
    assert!(
        matches!(again, Err(StoreError::UnknownAttempt { attempt: 2, .. })),
        "{again:?}"
    );

    // A replay of the parked request that works delivers it.
    let replay = store.start_replay(id).await.unwrap();
    assert_eq!(replay, 3);
    let state = store
        .finish_attempt(id, replay, Outcome::Delivered(response(200, b"fine")))
        .await
        .unwrap();
    assert_eq!(state, RequestState::Delivered);
    // A failing replay of a delivered request leaves it delivered, with its response.
    let replay2 = store.start_replay(id).await.unwrap();
    let state = store
        .finish_attempt(
            id,
            replay2,
            Outcome::Error {
                error: "client gone".into(),
                retry_at: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Delivered);

    let record = store.get(id).await.unwrap().unwrap();
    assert_eq!(record.summary.state, RequestState::Delivered);
    assert_eq!(record.summary.attempts, 2, "deliveries only");
    assert_eq!(record.summary.status, Some(200));
    assert_eq!(record.summary.duration_ms, Some(12));
    assert!(record.summary.delivered_at.is_some());
    assert_eq!(&record.response.unwrap().body[..], b"fine");
    let log: Vec<_> = record
        .attempt_log
        .iter()
        .map(|a| {
            (
                a.number,
                a.replay,
                a.replay_of,
                a.outcome,
                a.status,
                a.error.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        log,
        vec![
            (
                1,
                false,
                None,
                AttemptOutcome::Retry,
                None,
                Some("app down")
            ),
            (2, false, None, AttemptOutcome::Failed, Some(500), None),
            (3, true, Some(2), AttemptOutcome::Delivered, Some(200), None),
            (
                4,
                true,
                Some(3),
                AttemptOutcome::Failed,
                None,
                Some("client gone")
            ),
        ]
    );
    assert!(record
        .attempt_log
        .iter()
        .all(|a| a.finished_at >= Some(a.started_at)));

    // mark_failed / mark_delivered settle open attempts.
    let other = store
        .record_request(request("s1", "/other", RequestState::Queued))
        .await
        .unwrap();
    store.start_attempt(other).await.unwrap();
    store.mark_failed(other, "gave up").await.unwrap();
    let record = store.get(other).await.unwrap().unwrap();
    assert_eq!(record.summary.state, RequestState::Failed);
    assert_eq!(record.attempt_log[0].outcome, AttemptOutcome::Failed);
    assert_eq!(record.attempt_log[0].error.as_deref(), Some("gave up"));
    store.mark_delivered(other).await.unwrap();
    assert_eq!(
        store.get(other).await.unwrap().unwrap().summary.state,
        RequestState::Delivered
    );

    // Unknown ids.
    let missing: RequestId = "01ARZ3NDEKTSV4RRFFQ69G5FAV".parse().unwrap();
    assert!(matches!(
        store.start_attempt(missing).await,
        Err(StoreError::UnknownRequest(_))
    ));
    assert!(matches!(
        store.mark_delivered(missing).await,
        Err(StoreError::UnknownRequest(_))
    ));
    assert_eq!(store.get(missing).await.unwrap(), None);
}

#[tokio::test]
async fn provider_retries_are_marked_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_two_sessions(tmp.path()).await;
    let github = |session: &str| {
        NewRequest::new(
            session,
            now_ms(),
            "POST",
            "/github",
            headers(&[
                ("X-GitHub-Delivery", b"72d3162e"),
                ("X-GitHub-Event", b"push"),
            ]),
            Bytes::from_static(b"{}"),
            RequestState::Queued,
        )
    };
    let first = store.record_request(github("s1")).await.unwrap();
    let retry = store.record_request(github("s1")).await.unwrap();
    let retry2 = store.record_request(github("s1")).await.unwrap();
    let elsewhere = store.record_request(github("s2")).await.unwrap();
    let summary = |id| {
        let store = store.clone();
        async move { store.get(id).await.unwrap().unwrap().summary }
    };
    assert_eq!(summary(first).await.duplicate_of, None);
    assert_eq!(summary(retry).await.duplicate_of, Some(first));
    assert_eq!(summary(retry2).await.duplicate_of, Some(first));
    assert_eq!(summary(elsewhere).await.duplicate_of, None, "other session");
    assert_eq!(
        summary(first).await.provider,
        Some(ProviderId {
            provider: "github".into(),
            id: "72d3162e".into()
        })
    );
    assert_eq!(
        store.find_by_provider_id("s1", "72d3162e").await.unwrap(),
        Some(first)
    );
    assert_eq!(
        store.find_by_provider_id("s2", "72d3162e").await.unwrap(),
        Some(elsewhere)
    );
    assert_eq!(store.find_by_provider_id("s1", "nope").await.unwrap(), None);
    // The queue still holds all of them: skipping duplicates is the caller's choice.
    assert_eq!(
        store.queued("s1", 10).await.unwrap()[1].duplicate_of,
        Some(first)
    );
}

/// What `list_filters_and_pages` sent: id, index, method, target, status.
type Sent = (RequestId, i64, &'static str, String, u16);

#[tokio::test]
async fn list_filters_and_pages() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_two_sessions(tmp.path()).await;
    store
        .record_request(request("s2", "/webhooks/x", RequestState::Queued))
        .await
        .unwrap();
    let mut all: Vec<Sent> = Vec::new();
    for i in 0..30i64 {
        let method = if i % 3 == 0 { "GET" } else { "POST" };
        let target = if i % 2 == 0 {
            format!("/webhooks/stripe?n={i}")
        } else {
            format!("/github/{i}")
        };
        let mut req = request("s1", &target, RequestState::Delivering);
        req.method = method.into();
        req.received_at = 1_000 + i * 10;
        let id = store.record_request(req).await.unwrap();
        let status = [200u16, 404, 500, 503, 201][(i % 5) as usize];
        let a = store.start_attempt(id).await.unwrap();
        let outcome = if status < 500 {
            Outcome::Delivered(response(status, b""))
        } else {
            Outcome::Rejected {
                response: response(status, b""),
                retry_at: None,
            }
        };
        store.finish_attempt(id, a, outcome).await.unwrap();
        all.push((id, i, method, target, status));
    }
    let ids = |page: &ListPage| page.requests.iter().map(|r| r.id).collect::<Vec<_>>();
    let expect = |f: &dyn Fn(&Sent) -> bool| {
        all.iter()
            .rev()
            .filter(|r| f(r))
            .map(|r| r.0)
            .collect::<Vec<_>>()
    };
    let list = |filter: ListFilter| {
        let store = store.clone();
        async move { store.list("s1", &filter, Page::first(1000)).await.unwrap() }
    };

    let everything = list(ListFilter::default()).await;
    assert_eq!(
        ids(&everything),
        expect(&|_| true),
        "newest first, own session only"
    );
    assert_eq!(everything.next, None);
    let five_xx = ListFilter {
        status: Some("5xx".parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(ids(&list(five_xx).await), expect(&|r| r.4 >= 500));
    let exact = ListFilter {
        status: Some("404".parse().unwrap()),
        ..Default::default()
    };
    assert_eq!(ids(&list(exact).await), expect(&|r| r.4 == 404));
    let get = ListFilter {
        method: Some("GET".into()),
        ..Default::default()
    };
    assert_eq!(ids(&list(get).await), expect(&|r| r.2 == "GET"));
    let prefix = ListFilter {
        path_prefix: Some("/webhooks/".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(&list(prefix).await),
        expect(&|r| r.3.starts_with("/webhooks/"))
    );
    let range = ListFilter {
        since: Some(1_050),
        until: Some(1_150),
        ..Default::default()
    };
    assert_eq!(ids(&list(range).await), expect(&|r| (5..15).contains(&r.1)));
    let failed = ListFilter {
        state: Some(RequestState::Failed),
        ..Default::default()
    };
    assert_eq!(ids(&list(failed).await), expect(&|r| r.4 >= 500));
    let combined = ListFilter {
        status: Some(StatusFilter::Class(2)),
        method: Some("POST".into()),
        path_prefix: Some("/github".into()),
        ..Default::default()
    };
    assert_eq!(
        ids(&list(combined).await),
        expect(&|r| r.4 < 300 && r.2 == "POST" && r.3.starts_with("/github"))
    );
    let none = ListFilter {
        path_prefix: Some("/nothing".into()),
        ..Default::default()
    };
    assert!(list(none).await.requests.is_empty());

    // Paging: 7 at a time covers everything once, in order.
    let mut seen = Vec::new();
    let mut page = Page::first(7);
    loop {
        let got = store
            .list("s1", &ListFilter::default(), page)
            .await
            .unwrap();
        assert!(got.requests.len() <= 7);
        seen.extend(ids(&got));
        match got.next {
            Some(next) => page.before = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, expect(&|_| true));
    // Summaries carry what a history table shows.
    let newest = &everything.requests[0];
    assert_eq!(
        (newest.method.as_str(), newest.status, newest.attempts),
        ("POST", Some(201), 1)
    );
    assert_eq!(newest.duration_ms, Some(12));

    assert!("6xx".parse::<StatusFilter>().is_err());
    assert!("20".parse::<StatusFilter>().is_err());
    assert_eq!("5XX".parse::<StatusFilter>(), Ok(StatusFilter::Class(5)));
}

#[tokio::test]
async fn prune_by_age_and_size_keeps_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let day = 86_400_000i64;
    // Ids are made at the real time: "now" is 20 days ahead, and requests claim to have
    // arrived later than their ids were made (which the store never does) so that both
    // orders of time are exercised.
    let now = now_ms() + 20 * day;
    let record = |received_at: i64, state: RequestState, size: usize| {
        let store = store.clone();
        async move {
            let mut req = request("s1", "/p", state);
            req.received_at = received_at;
            req.body = Bytes::from(vec![b'x'; size]);
            let id = store.record_request(req).await.unwrap();
            if state == RequestState::Delivering {
                let a = store.start_attempt(id).await.unwrap();
                store
                    .finish_attempt(id, a, Outcome::Delivered(response(200, b"ok")))
                    .await
                    .unwrap();
            }
            id
        }
    };
    let old_delivered = record(now - 10 * day, RequestState::Delivering, 100).await;
    let old_queued = record(now - 10 * day, RequestState::Queued, 100).await;
    let recent_delivered: Vec<RequestId> = {
        let mut ids = Vec::new();
        for i in 0..5 {
            ids.push(record(now - day + i, RequestState::Delivering, 1000).await);
        }
        ids
    };
    let recent_queued = record(now - day, RequestState::Queued, 5000).await;

    let report = store
        .prune(now, Duration::from_millis(7 * day as u64), None)
        .await
        .unwrap();
    assert_eq!((report.by_age, report.by_size), (2, 0));
    assert!(store.get(old_delivered).await.unwrap().is_none());
    assert!(
        store.get(old_queued).await.unwrap().is_none(),
        "older than the retention"
    );
    assert!(store.get(recent_queued).await.unwrap().is_some());

    // The byte count matches what is stored.
    let total = store.stored_bytes().await.unwrap();
    assert_eq!(report.stored_bytes, total);
    let conn = Connection::open(store.path()).unwrap();
    let sum: u64 = conn
        .query_row(
            "SELECT SUM(length(headers) + length(body) + COALESCE(length(response_headers), 0)
                        + COALESCE(length(response_body), 0)) FROM requests",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(total, sum);

    // Over the byte limit: oldest delivered go first, just enough of them.
    let size_of = |id: RequestId| -> u64 {
        conn.query_row(
            "SELECT stored_bytes FROM requests WHERE id = ?1",
            [id.to_string()],
            |r| r.get(0),
        )
        .unwrap()
    };
    let limit = total - size_of(recent_delivered[0]) - size_of(recent_delivered[1]);
    let report = store
        .prune(now, Duration::from_millis(7 * day as u64), Some(limit))
        .await
        .unwrap();
    assert_eq!((report.by_age, report.by_size), (0, 2), "{report:?}");
    assert!(report.stored_bytes <= limit);
    assert!(store.get(recent_delivered[0]).await.unwrap().is_none());
    assert!(store.get(recent_delivered[1]).await.unwrap().is_none());
    assert!(store.get(recent_delivered[2]).await.unwrap().is_some());

    // Even a limit of zero never removes queued requests.
    let report = store
        .prune(now, Duration::from_millis(7 * day as u64), Some(0))
        .await
        .unwrap();
    assert_eq!(report.by_size, 3);
    let left = store
        .list("s1", &ListFilter::default(), Page::default())
        .await
        .unwrap();
    assert_eq!(left.requests.len(), 1);
    assert_eq!(left.requests[0].id, recent_queued);
    assert_eq!(left.requests[0].state, RequestState::Queued);
    // Attempts went with their requests.
    let attempts: i64 = conn
        .query_row("SELECT count(*) FROM attempts", [], |r| r.get(0))
        .unwrap();
    assert_eq!(attempts, 0);
}

#[tokio::test]
async fn large_bodies_are_cut_in_history_but_kept_in_the_queue() {
    let tmp = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        record_max_body: 8,
        ..Default::default()
    };
    let store = Store::open(tmp.path(), options).await.unwrap();
    store
        .upsert_session(session("s1", SessionKind::Named))
        .await
        .unwrap();
    let mut req = request("s1", "/big", RequestState::Queued);
    req.body = Bytes::from_static(b"0123456789abcdef");
    req.body_len = 16;
    let queued = store.record_request(req.clone()).await.unwrap();
    req.state = RequestState::Delivering;
    let live = store.record_request(req).await.unwrap();

    let full = store.get(queued).await.unwrap().unwrap();
    assert_eq!(
        (&full.body[..], full.summary.body_truncated),
        (&b"0123456789abcdef"[..], false)
    );
    let cut = store.get(live).await.unwrap().unwrap();
    assert_eq!(
        (
            &cut.body[..],
            cut.summary.body_truncated,
            cut.summary.body_len
        ),
        (&b"01234567"[..], true, 16)
    );

    // A cut request cannot go back to the queue, nor be replayed.
    let a = store.start_attempt(live).await.unwrap();
    let state = store
        .finish_attempt(
            live,
            a,
            Outcome::Rejected {
                response: response(500, b"a long error body"),
                retry_at: Some(0),
            },
        )
        .await
        .unwrap();
    assert_eq!(state, RequestState::Failed);
    let record = store.get(live).await.unwrap().unwrap();
    let stored = record.response.unwrap();
    assert_eq!(
        (&stored.body[..], stored.body_len, stored.body_truncated),
        (&b"a long e"[..], 17, true)
    );
    assert!(record.attempt_log[0]
        .error
        .as_deref()
        .unwrap()
        .contains("too large"));
    assert!(matches!(
        store.start_replay(live).await,
        Err(StoreError::Incomplete(_))
    ));
}

#[tokio::test]
async fn a_failing_command_does_not_spoil_its_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        let session = if i % 10 == 0 { "ghost" } else { "s1" };
        tasks.push(tokio::spawn(async move {
            store
                .record_request(request(session, "/x", RequestState::Queued))
                .await
        }));
    }
    let mut ok = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match task.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::UnknownSession(s)) => assert_eq!((s.as_str(), i % 10), ("ghost", 0)),
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(ok, 180);
    assert_eq!(store.queued("s1", 1000).await.unwrap().len(), 180);
    // Deleting the session takes its requests with it.
    assert!(store.delete_session("s1").await.unwrap());
    assert!(!store.delete_session("s1").await.unwrap());
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
    assert!(store.load_sessions().await.unwrap().is_empty());
}

#[tokio::test]
async fn closed_store_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let clone = store.clone();
    store.close().await;
    let result = clone
        .record_request(request("s1", "/", RequestState::Queued))
        .await;
    assert!(matches!(result, Err(StoreError::Closed)), "{result:?}");
    // Closing folded the WAL into the database file.
    let wal = std::fs::metadata(tmp.path().join("ferry.db-wal"))
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(wal, 0);
    drop(clone);
    let store = open(tmp.path()).await;
    assert_eq!(store.load_sessions().await.unwrap().len(), 1);
}

#[tokio::test]
async fn garbage_in_the_database_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("ferry.db");
    let garbage = b"this is not SQLite at all, just some bytes that happen to be here".repeat(100);
    std::fs::write(&path, &garbage).unwrap();
    let err = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains(&path.display().to_string()), "{message}");
    assert!(message.contains("move it"), "{message}");
    // Nothing was written over it.
    assert_eq!(std::fs::read(&path).unwrap(), garbage);
}

#[tokio::test]
async fn damaged_pages_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    for i in 0..300 {
        let mut req = request("s1", &format!("/{i}"), RequestState::Queued);
        req.body = Bytes::from(vec![b'a'; 2000]);
        store.record_request(req).await.unwrap();
    }
    store.close().await;
    drop(store);
    let path = tmp.path().join("ferry.db");
    let mut bytes = std::fs::read(&path).unwrap();
    let page = 4096;
    assert!(bytes.len() > 40 * page);
    // Scribble over the b-tree pages in the middle of the file (keeping the header page).
    for b in &mut bytes[8 * page..30 * page] {
        *b = 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let err = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("ferry.db"), "{err}");
}

#[tokio::test]
async fn a_foreign_database_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let conn = Connection::open(tmp.path().join("ferry.db")).unwrap();
    conn.execute_batch(
        "CREATE TABLE photos (id INTEGER PRIMARY KEY); INSERT INTO photos VALUES (1);",
    )
    .unwrap();
    drop(conn);
    let err = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains("no Ferry schema version"), "{err}");
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    open_with_one_session(tmp.path()).await.close().await;
    let conn = Connection::open(tmp.path().join("ferry.db")).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Store::open(tmp.path(), StoreOptions::default())
        .await
        .unwrap_err();
    match &err {
        StoreError::NewerSchema {
            found, supported, ..
        } => {
            assert_eq!((*found, *supported), (99, SCHEMA_VERSION));
        }
        other => panic!("{other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("schema version 99") && message.contains("ferry.db"),
        "{message}"
    );
}

#[tokio::test]
async fn an_unusable_data_dir_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DataDir { .. }), "{err:?}");
    assert!(err.to_string().contains("plain-file"), "{err}");
    let below = file.join("data");
    let err = Store::open(&below, StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::DataDir { .. }), "{err:?}");
    // A WAL without its database means data went missing: refuse rather than start empty.
    let dir = tmp.path().join("lost");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("ferry.db-wal"), b"wal").unwrap();
    let err = Store::open(&dir, StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_under_concurrency() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let before = store.stats();
    let tasks: Vec<_> = (0..2000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut req = request("s1", &format!("/{i}"), RequestState::Queued);
                req.body = Bytes::from(vec![b'b'; 1024]);
                store.record_request(req).await.unwrap()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for task in tasks {
        ids.push(task.await.unwrap());
    }
    let stats = store.stats();
    let transactions = stats.transactions - before.transactions;
    let commands = stats.commands - before.commands;
    println!(
        "group commit: {commands} commands in {transactions} transactions ({:.1} per commit)",
        commands as f64 / transactions as f64
    );
    assert_eq!(commands, 2000);
    assert!(
        transactions < 2000,
        "{transactions} transactions: no batching"
    );
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2000);
    // All durable: visible from a fresh process-like open of a crash image.
    let image = tmp.path().join("image");
    copy_files(tmp.path(), &image);
    let reopened = open(&image).await;
    assert_eq!(reopened.queued("s1", 5000).await.unwrap().len(), 2000);
}

/// Durable accepts per second: 1 KiB requests recorded as queued from many concurrent tasks
/// for about 3 s. Run with
/// `cargo test -p ferry-relay --release --lib store::tests::bench_durable_accepts -- --ignored --nocapture`
/// (`FERRY_BENCH_CONCURRENCY` sets the number of concurrent callers, default 512).
#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_durable_accepts() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // On the project's disk, not a RAM-backed /tmp, so that fsync is real.
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(base).unwrap();
    runtime.block_on(async {
        let store = open_with_one_session(tmp.path()).await;
        let concurrency: usize = std::env::var("FERRY_BENCH_CONCURRENCY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512);
        let deadline = Instant::now() + Duration::from_secs(3);
        let body = Bytes::from(vec![b'x'; 1024]);
        let head = headers(&[
            ("host", b"relay.example.com"),
            ("user-agent", b"GitHub-Hookshot/abc123"),
            ("content-type", b"application/json"),
            ("x-github-event", b"push"),
            (
                "x-hub-signature-256",
                b"sha256=0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab",
            ),
        ]);
        let start = Instant::now();
        let before = store.stats();
        let accepted = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (store, body, head, accepted) =
                    (store.clone(), body.clone(), head.clone(), accepted.clone());
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let req = NewRequest::new(
                            "s1",
                            now_ms(),
                            "POST",
                            "/github",
                            head.clone(),
                            body.clone(),
                            RequestState::Queued,
                        );
                        store.record_request(req).await.unwrap();
                        accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let elapsed = start.elapsed().as_secs_f64();
        let stats = store.stats();
        let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
        let transactions = stats.transactions - before.transactions;
        println!(
            "durable accepts: {accepted} in {elapsed:.2} s = {:.0}/s; {transactions} commits, \
             average batch {:.1}; {concurrency} concurrent callers, 1 KiB bodies, synchronous=FULL",
            accepted as f64 / elapsed,
            (stats.commands - before.commands) as f64 / transactions as f64,
        );
        // One caller at a time: the latency of a single durable commit.
        let start = Instant::now();
        let mut n = 0u32;
        while start.elapsed() < Duration::from_secs(1) {
            let req = NewRequest::new(
                "s1",
                now_ms(),
                "POST",
                "/github",
                head.clone(),
                body.clone(),
                RequestState::Queued,
            );
            store.record_request(req).await.unwrap();
            n += 1;
        }
        println!(
            "single caller: {n} sequential durable accepts in 1 s ({:.2} ms per commit)",
            1000.0 / f64::from(n)
        );
    });
}

#[test]
#[ignore = "benchmark; run explicitly"]
fn bench_history_records() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    std::fs::create_dir_all(&base).unwrap();
    let tmp = tempfile::tempdir_in(base).unwrap();
    runtime.block_on(async {
        let store = open_with_one_session(tmp.path()).await;
        let body = Bytes::from(vec![b'x'; 1024]);
        let head = headers(&[
            ("host", b"relay.example.com"),
            ("user-agent", b"GitHub-Hookshot/abc123"),
            ("content-type", b"application/json"),
            ("x-github-event", b"push"),
            ("x-github-delivery", b"72d3162e-cc78-11e3-81ab-4c9367dc0958"),
            (
                "x-hub-signature-256",
                b"sha256=0123456789abcdef0123456789abcdef0123456789abcdef0123456789ab",
            ),
        ]);
        let per_batch: u32 = std::env::var("FERRY_BENCH_BATCH")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1000);
        let batches = 40_000 / per_batch;
        let start = Instant::now();
        for _ in 0..batches {
            let exchanges = (0..per_batch)
                .map(|_| {
                    let req = NewRequest::new(
                        "s1",
                        now_ms(),
                        "POST",
                        "/github",
                        head.clone(),
                        body.clone(),
                        RequestState::Delivering,
                    );
                    let response = Response {
                        status: 200,
                        headers: headers(&[("content-type", b"text/plain")]),
                        body: Bytes::from_static(b"ok"),
                        body_len: 2,
                        duration: Duration::from_millis(1),
                    };
                    (req, Outcome::Delivered(response))
                })
                .collect();
            for result in store.record_exchanges(exchanges).await.unwrap() {
                result.unwrap();
            }
        }
        let elapsed = start.elapsed().as_secs_f64();
        let n = f64::from(batches * per_batch);
        println!(
            "history: {n} exchanges in {elapsed:.2} s = {:.0}/s, {:.1} µs each (batches of {per_batch}, 1 KiB bodies)",
            n / elapsed,
            elapsed * 1e6 / n
        );
    });
}

/// A passed-through exchange of `session` for history, with a GitHub delivery id if given.
fn exchange(
    session: &str,
    target: &str,
    delivery: Option<&'static [u8]>,
    outcome: Outcome,
) -> (NewRequest, Outcome) {
    let mut pairs: Vec<(&str, &[u8])> = vec![("content-type", b"application/json")];
    if let Some(delivery) = delivery {
        pairs.push(("X-GitHub-Delivery", delivery));
    }
    let request = NewRequest::new(
        session,
        now_ms(),
        "POST",
        target,
        headers(&pairs),
        Bytes::from(format!("{{\"target\":\"{target}\"}}")),
        RequestState::Delivering,
    );
    (request, outcome)
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// The stored bytes of every row and block, summed from the tables themselves.
fn stored_in_tables(conn: &Connection) -> u64 {
    let sum = |sql: &str| -> u64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
    sum("SELECT COALESCE(SUM(stored_bytes), 0) FROM requests")
        + sum("SELECT COALESCE(SUM(stored_bytes), 0) FROM history_blocks")
}

#[tokio::test]
async fn passed_through_exchanges_are_written_in_blocks_and_read_like_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_two_sessions(tmp.path()).await;
    let queued_first = store
        .record_request(request("s1", "/q/1", RequestState::Queued))
        .await
        .unwrap();
    let error = |text: &str| Outcome::Error {
        error: text.into(),
        retry_at: None,
    };
    let ids: Vec<RequestId> = store
        .record_exchanges(vec![
            exchange(
                "s1",
                "/a/1",
                Some(b"d1"),
                Outcome::Delivered(response(200, b"ok")),
            ),
            exchange(
                "s2",
                "/a/2",
                None,
                Outcome::Delivered(response(201, b"made")),
            ),
            exchange("s1", "/b/3", None, error("app down")),
            exchange(
                "s1",
                "/a/4",
                Some(b"d1"),
                Outcome::Rejected {
                    response: response(503, b"busy"),
                    retry_at: None,
                },
            ),
            exchange("nope", "/x", None, error("x")),
        ])
        .await
        .unwrap()
        .into_iter()
        .take(4)
        .map(Result::unwrap)
        .collect();
    let (e1, e2, e3, e4) = (ids[0], ids[1], ids[2], ids[3]);
    let queued_last = store
        .record_request(request("s1", "/q/2", RequestState::Queued))
        .await
        .unwrap();

    // One block per session of the batch; no row per exchange.
    let conn = Connection::open(store.path()).unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM history_blocks"), 2);
    assert_eq!(count(&conn, "SELECT count(*) FROM requests"), 2);
    let unknown = store
        .record_exchanges(vec![exchange("nope", "/x", None, error("x"))])
        .await
        .unwrap();
    assert!(matches!(&unknown[0], Err(StoreError::UnknownSession(s)) if s == "nope"));

    // Listing merges rows and blocks, newest first, across pages.
    let list = |filter: ListFilter, page: Page| {
        let store = store.clone();
        async move { store.list("s1", &filter, page).await.unwrap() }
    };
    let ids_of = |page: &ListPage| page.requests.iter().map(|r| r.id).collect::<Vec<_>>();
    let all = list(ListFilter::default(), Page::default()).await;
    assert_eq!(ids_of(&all), vec![queued_last, e4, e3, e1, queued_first]);
    assert_eq!(all.next, None);
    let mut pages = Vec::new();
    let mut page = Page::first(2);
    loop {
        let got = list(ListFilter::default(), page).await;
        pages.push(ids_of(&got));
        match got.next {
            Some(next) => page.before = Some(next),
            None => break,
        }
    }
    assert_eq!(
        pages,
        vec![vec![queued_last, e4], vec![e3, e1], vec![queued_first]]
    );
    let failed = ListFilter {
        state: Some(RequestState::Failed),
        ..ListFilter::default()
    };
    assert_eq!(ids_of(&list(failed, Page::default()).await), vec![e4, e3]);
    let five_xx = ListFilter {
        status: Some(StatusFilter::Class(5)),
        ..ListFilter::default()
    };
    assert_eq!(ids_of(&list(five_xx, Page::default()).await), vec![e4]);
    let prefix = ListFilter {
        path_prefix: Some("/a/".into()),
        ..ListFilter::default()
    };
    assert_eq!(ids_of(&list(prefix, Page::default()).await), vec![e4, e1]);
    let future = ListFilter {
        since: Some(now_ms() + 60_000),
        ..ListFilter::default()
    };
    assert!(list(future, Page::default()).await.requests.is_empty());

    // Shown in full like a row: head, body, response and the one attempt.
    let shown = store.get(e1).await.unwrap().unwrap();
    assert_eq!(shown.summary.session_id, "s1");
    assert_eq!(shown.summary.state, RequestState::Delivered);
    assert_eq!(&shown.body[..], b"{\"target\":\"/a/1\"}");
    assert_eq!(shown.headers.len(), 2);
    let shown_response = shown.response.clone().unwrap();
    assert_eq!(shown_response.status, 200);
    assert_eq!(shown_response.headers, response(200, b"").headers);
    assert_eq!(&shown_response.body[..], b"ok");
    assert_eq!(shown.attempt_log.len(), 1);
    assert_eq!(shown.attempt_log[0].outcome, AttemptOutcome::Delivered);
    let down = store.get(e3).await.unwrap().unwrap();
    assert_eq!(down.summary.state, RequestState::Failed);
    assert_eq!(down.response, None);
    assert_eq!(down.attempt_log[0].error.as_deref(), Some("app down"));

    // A provider's retry inside the batch is a duplicate, and so is one written later as a row.
    assert_eq!(down.summary.duplicate_of, None);
    let retried = store.get(e4).await.unwrap().unwrap();
    assert_eq!(retried.summary.duplicate_of, Some(e1));
    assert_eq!(retried.summary.status, Some(503));
    assert_eq!(
        store.find_by_provider_id("s1", "d1").await.unwrap(),
        Some(e1)
    );
    let mut later = request("s1", "/a/5", RequestState::Queued);
    later.provider = Some(ProviderId {
        provider: "github".into(),
        id: "d1".into(),
    });
    let later = store.record_request(later).await.unwrap();
    assert_eq!(
        store
            .get(later)
            .await
            .unwrap()
            .unwrap()
            .summary
            .duplicate_of,
        Some(e1)
    );

    // The byte count includes the blocks.
    assert_eq!(store.stored_bytes().await.unwrap(), stored_in_tables(&conn));

    // A replay takes the request out of its block into a row of its own, once.
    let replay = store.start_replay(e1).await.unwrap();
    assert_eq!(replay, 2);
    store
        .finish_attempt(e1, replay, Outcome::Delivered(response(202, b"again")))
        .await
        .unwrap();
    let replayed = store.get(e1).await.unwrap().unwrap();
    assert_eq!(replayed.attempt_log.len(), 2);
    assert_eq!(replayed.attempt_log[1].replay_of, Some(1));
    assert_eq!(replayed.attempt_log[1].status, Some(202));
    assert_eq!(replayed.summary.duplicate_of, None);
    assert_eq!(&replayed.body[..], b"{\"target\":\"/a/1\"}");
    assert_eq!(replayed.headers, shown.headers);
    assert_eq!(
        replayed.response.unwrap().status,
        200,
        "a delivered request keeps its first response"
    );
    assert_eq!(
        ids_of(&list(ListFilter::default(), Page::default()).await),
        vec![later, queued_last, e4, e3, e1, queued_first],
        "listed once"
    );
    assert_eq!(
        store.find_by_provider_id("s1", "d1").await.unwrap(),
        Some(e1)
    );
    assert_eq!(
        store.get(e4).await.unwrap().unwrap().summary.duplicate_of,
        Some(e1)
    );
    // Taking out a block's only request removes the block.
    store.start_replay(e2).await.unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM history_blocks"), 1);
    assert_eq!(store.stored_bytes().await.unwrap(), stored_in_tables(&conn));

    // After a restart, new ids still sort after every block's.
    store.close().await;
    drop(store);
    let store = open(tmp.path()).await;
    let newer = store
        .record_exchanges(vec![exchange("s1", "/c", None, error("x"))])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert!(newer > e4);

    // Pruning for size takes blocks too, oldest first, and never the queue.
    let report = store
        .prune(now_ms(), Duration::from_secs(3600), Some(0))
        .await
        .unwrap();
    assert_eq!(
        report.by_size, 5,
        "e1, e2 (rows since their replays), e3, e4, newer: {report:?}"
    );
    assert_eq!(count(&conn, "SELECT count(*) FROM history_blocks"), 0);
    assert_eq!(count(&conn, "SELECT count(*) FROM history_provider_ids"), 0);
    let left = store
        .list("s1", &ListFilter::default(), Page::default())
        .await
        .unwrap();
    assert_eq!(ids_of(&left), vec![later, queued_last, queued_first]);
    assert_eq!(store.get(e3).await.unwrap(), None);
}

#[tokio::test]
async fn blocks_are_pruned_by_age_and_go_with_their_session() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let ok = || Outcome::Delivered(response(200, b"ok"));
    let old = store
        .record_exchanges(vec![
            exchange("s1", "/1", Some(b"p1"), ok()),
            exchange("s1", "/2", None, ok()),
        ])
        .await
        .unwrap();
    let day = 86_400_000i64;
    // Nothing is older than a day yet.
    let report = store
        .prune(now_ms(), Duration::from_millis(day as u64), None)
        .await
        .unwrap();
    assert_eq!(report.by_age, 0);
    // A day from now, both are.
    let report = store
        .prune(now_ms() + 2 * day, Duration::from_millis(day as u64), None)
        .await
        .unwrap();
    assert_eq!(report.by_age, 2);
    assert_eq!(store.get(*old[0].as_ref().unwrap()).await.unwrap(), None);
    assert_eq!(store.stored_bytes().await.unwrap(), 0);

    store
        .record_exchanges(vec![exchange("s1", "/3", Some(b"p2"), ok())])
        .await
        .unwrap();
    assert!(store.delete_session("s1").await.unwrap());
    let conn = Connection::open(store.path()).unwrap();
    assert_eq!(count(&conn, "SELECT count(*) FROM history_blocks"), 0);
    assert_eq!(count(&conn, "SELECT count(*) FROM history_provider_ids"), 0);
    assert_eq!(store.stored_bytes().await.unwrap(), 0);
}

/// The block files in `data_dir`, by name.
fn block_file_names(data_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(data_dir.join(block_files::DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Records one delivered exchange of `s1` to `target` in a batch of its own (its own block).
async fn record_delivered(store: &Store, target: &str) -> RequestId {
    store
        .record_exchanges(vec![exchange(
            "s1",
            target,
            None,
            Outcome::Delivered(response(200, b"ok")),
        )])
        .await
        .unwrap()
        .remove(0)
        .unwrap()
}

#[tokio::test]
async fn history_blocks_keep_their_bytes_in_files_and_old_files_go_once_unused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let first = record_delivered(&store, "/1").await;
    let conn = Connection::open(store.path()).unwrap();
    // The row says where the block is; the database holds none of its bytes.
    assert_eq!(
        count(
            &conn,
            "SELECT count(*) FROM history_blocks WHERE length(data) = 0 AND file_no = 1"
        ),
        1
    );
    assert_eq!(block_file_names(tmp.path()), vec!["0000000001.blocks"]);
    let shown = store.get(first).await.unwrap().unwrap();
    assert_eq!(&shown.body[..], b"{\"target\":\"/1\"}");
    assert_eq!(&shown.response.unwrap().body[..], b"ok");

    // A reopened store writes a new file; the old one is read as before.
    store.close().await;
    drop(store);
    let store = open(tmp.path()).await;
    let second = record_delivered(&store, "/2").await;
    assert_eq!(
        block_file_names(tmp.path()),
        vec!["0000000001.blocks", "0000000002.blocks"]
    );
    let listed = store
        .list("s1", &ListFilter::default(), Page::default())
        .await
        .unwrap();
    let ids: Vec<RequestId> = listed.requests.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![second, first]);

    // Pruning the oldest block frees its file; the file being written stays.
    let report = store
        .prune(now_ms(), Duration::from_secs(3600), Some(1))
        .await
        .unwrap();
    assert_eq!(report.by_size, 2, "{report:?}");
    assert_eq!(block_file_names(tmp.path()), vec!["0000000002.blocks"]);
    assert_eq!(store.get(first).await.unwrap(), None);
}

#[tokio::test]
async fn a_block_whose_file_is_damaged_is_left_out_of_listings_and_named_when_shown() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_with_one_session(tmp.path()).await;
    let ids = [
        record_delivered(&store, "/old").await,
        record_delivered(&store, "/new").await,
    ];
    // Flip one byte of the first block, as a power cut or a bad disk might.
    let path = tmp.path().join(block_files::DIR).join("0000000001.blocks");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();

    let listed = store
        .list("s1", &ListFilter::default(), Page::default())
        .await
        .unwrap();
    let listed: Vec<RequestId> = listed.requests.iter().map(|r| r.id).collect();
    assert_eq!(listed, vec![ids[1]], "the readable block is still listed");
    match store.get(ids[0]).await {
        Err(StoreError::Files { detail, .. }) => assert!(detail.contains("checksum"), "{detail}"),
        other => panic!("expected a history file error, got {other:?}"),
    }
    assert!(store.get(ids[1]).await.unwrap().is_some());
}
