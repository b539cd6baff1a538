//! A `202` means the request is on disk: a relay process killed with SIGKILL right after
//! answering loses nothing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use ferry_relay::auth::sha256;
use ferry_relay::store::{
    now_ms, OfflinePolicy, RequestState, SessionKind, SessionRecord, Store, StoreOptions,
};

const TOKEN: &str = "sigkill-test-token";

#[test]
fn a_request_answered_202_survives_sigkill_of_the_relay() {
    let data = tempfile::TempDir::new().unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // A named session whose client is away.
    runtime.block_on(async {
        let store = Store::open(data.path(), StoreOptions::default())
            .await
            .unwrap();
        store
            .upsert_session(SessionRecord {
                id: "crash-me".into(),
                owner: sha256(TOKEN.as_bytes()),
                resume_digest: [0; 32],
                kind: SessionKind::Named,
                offline: OfflinePolicy::Queue,
                respond: Default::default(),
                created_at: now_ms(),
                last_seen_at: now_ms(),
            })
            .await
            .unwrap();
        store.close().await;
    });

    let mut relay = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0", "--token", TOKEN])
        .arg("--data-dir")
        .arg(data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Readiness: the line naming the address it listens on.
    let mut stderr = BufReader::new(relay.stderr.take().unwrap());
    let addr = loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the relay exited");
        if let Some(rest) = line.trim().strip_prefix("ferry-relay listening on http://") {
            break rest.to_owned();
        }
    };
    let mut conn = TcpStream::connect(&addr).unwrap();
    conn.write_all(
        b"POST /crash-me/pay HTTP/1.1\r\nHost: relay\r\nContent-Length: 6\r\nConnection: close\r\n\r\ncharge",
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");

    relay.kill().unwrap(); // SIGKILL: no shutdown, no final checkpoint
    relay.wait().unwrap();

    runtime.block_on(async {
        let store = Store::open(data.path(), StoreOptions::default())
            .await
            .unwrap();
        let page = store
            .list("crash-me", &Default::default(), Default::default())
            .await
            .unwrap();
        assert_eq!(page.requests.len(), 1, "{:?}", page.requests);
        let queued = &page.requests[0];
        assert_eq!(queued.state, RequestState::Queued);
        assert!(answer.contains(&queued.id.to_string()), "{answer}");
        let record = store.get(queued.id).await.unwrap().unwrap();
        assert_eq!(&record.body[..], b"charge");
        store.close().await;
    });
}
