//! `ferry history`, `ferry show`, `ferry replay` and `--export` as a user runs them, against a
//! relay with a store.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use bytes::Bytes;
use ferry_relay::auth::sha256;
use ferry_relay::store::{
    now_ms, NewRequest, OfflinePolicy, Outcome, RequestId, RequestState, RespondMode, Response,
    SessionKind, SessionRecord, Store,
};

const TOKEN: &str = "cli-token";
const SESSION: &str = "cli-history";

struct Relay {
    url: String,
    ids: Vec<RequestId>,
    _dir: tempfile::TempDir,
    _runtime: tokio::runtime::Runtime,
}

/// A relay with a store holding two requests of [`SESSION`].
fn start_relay() -> Relay {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (url, ids) = runtime.block_on(async {
        let store = Store::open(dir.path(), Default::default()).await.unwrap();
        store
            .upsert_session(SessionRecord {
                id: SESSION.into(),
                owner: sha256(TOKEN.as_bytes()),
                resume_digest: [0; 32],
                kind: SessionKind::Named,
                offline: OfflinePolicy::Queue,
                respond: RespondMode::Pass,
                created_at: now_ms(),
                last_seen_at: now_ms(),
            })
            .await
            .unwrap();
        let mut ids = Vec::new();
        for (target, body, status) in [
            (
                "/webhooks/stripe",
                &br#"{"id":"evt_42","type":"charge.succeeded"}"#[..],
                200,
            ),
            ("/webhooks/bin", &b"\xff\xfe\x00raw"[..], 500),
        ] {
            let request = NewRequest::new(
                SESSION,
                now_ms(),
                "POST",
                target,
                [("content-type", "application/json")].into_iter().collect(),
                Bytes::copy_from_slice(body),
                RequestState::Delivering,
            );
            let id = store.record_request(request).await.unwrap();
            let attempt = store.start_attempt(id).await.unwrap();
            let response = Response {
                status,
                headers: [("content-type", "text/plain")].into_iter().collect(),
                body: Bytes::from_static(b"app says hi"),
                body_len: 11,
                duration: Duration::from_millis(7),
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
            ids.push(id);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut config =
            ferry_relay::RelayConfig::new(&url, vec![TOKEN.into(), "cli-other".into()]);
        config.store = Some(store);
        tokio::spawn(ferry_relay::run(listener, config, std::future::pending()));
        (url, ids)
    });
    Relay {
        url,
        ids,
        _dir: dir,
        _runtime: runtime,
    }
}

fn ferry(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(args)
        .env_remove("FERRY_RELAY")
        .env_remove("FERRY_TOKEN")
        .env_remove("FERRY_SESSION")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn history_show_export_and_errors() {
    let relay = start_relay();
    let common = [
        "--relay",
        &relay.url,
        "--token",
        TOKEN,
        "--session",
        SESSION,
    ];
    let (first, second) = (relay.ids[0].to_string(), relay.ids[1].to_string());

    let out = ferry(&[&["history", "--json"][..], &common].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<&str> = page["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [second.as_str(), first.as_str()]);

    let out = ferry(&[&["history", "--status", "5xx"][..], &common].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(
        table.contains(&second) && !table.contains(&first),
        "{table}"
    );
    assert!(
        table.contains("/webhooks/bin") && table.contains("500"),
        "{table}"
    );

    let out = ferry(&[&["show", &first][..], &common].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.starts_with("POST /webhooks/stripe"), "{shown}");
    assert!(shown.contains("content-type: application/json"), "{shown}");
    assert!(
        shown.contains("\"type\": \"charge.succeeded\""),
        "JSON pretty-printed: {shown}"
    );
    assert!(shown.contains("response 200"), "{shown}");
    assert!(shown.contains("app says hi"), "{shown}");

    let out = ferry(&[&["show", &second][..], &common].concat());
    assert!(
        text(&out.stdout).contains("binary data"),
        "{}",
        text(&out.stdout)
    );

    let out = ferry(&[&["show", &first, "--json"][..], &common].concat());
    let full: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(full["id"], first.as_str());
    assert_eq!(full["response"]["status"], 200);

    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("out.ndjson");
    let out = ferry(
        &[
            &["history", "--export", ndjson.to_str().unwrap()][..],
            &common,
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&ndjson)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert!(lines.iter().all(|l| l["body_b64"].is_string()));
    let har = dir.path().join("out.har");
    let out = ferry(&[&["history", "--export", har.to_str().unwrap()][..], &common].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let har: serde_json::Value = serde_json::from_slice(&std::fs::read(&har).unwrap()).unwrap();
    let entries = har["log"]["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(
        entries[1]["request"]["url"],
        format!("{}/{SESSION}/webhooks/stripe", relay.url)
    );
    assert_eq!(entries[1]["response"]["status"], 200);

    // Errors: clear messages, non-zero exit.
    let out = ferry(&[
        "history",
        "--relay",
        &relay.url,
        "--token",
        "wrong",
        "--session",
        SESSION,
    ]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("401"), "{}", text(&out.stderr));
    let out = ferry(&[&["show", "01ARZ3NDEKTSV4RRFFQ69G5FAV"][..], &common].concat());
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = ferry(&[&["replay", &first][..], &common].concat());
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no ferry client"),
        "{}",
        text(&out.stderr)
    );
}

/// A running `ferry listen`, killed when dropped.
struct Listen(Child);

impl Drop for Listen {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn replay_reaches_the_listening_app() {
    let relay = start_relay();
    let port = common::start_origin(
        b"HTTP/1.1 202 Accepted\r\ncontent-length: 8\r\nconnection: close\r\n\r\nreplayed",
    )
    .to_string();
    let state = tempfile::tempdir().unwrap();
    let mut child = Listen(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args([
                "listen", &port, "--relay", &relay.url, "--token", TOKEN, "--name", SESSION,
                "--json",
            ])
            .arg("--state-dir")
            .arg(state.path())
            .env_remove("FERRY_RELAY")
            .env_remove("FERRY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let ready = lines.next().unwrap().unwrap();
    assert!(ready.contains("\"event\":\"ready\""), "{ready}");
    let id = relay.ids[0].to_string();
    let out = ferry(&[
        "replay",
        &id,
        "--json",
        "--relay",
        &relay.url,
        "--token",
        TOKEN,
        "--session",
        SESSION,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["replayed"], true);
    assert_eq!(done["status"], 202);
    assert_eq!(done["attempt"], 2);
    let event: serde_json::Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(event["event"], "request");
    assert_eq!(event["delivery_id"], format!("{id}.r2"));
    assert_eq!(event["status"], 202);
}
