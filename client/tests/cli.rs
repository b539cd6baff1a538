//! The `ferry` binary as a user runs it: exit codes, messages, JSON lines, SIGKILL.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

/// A relay running in a background runtime of this test process.
struct Relay {
    url: String,
    _runtime: tokio::runtime::Runtime,
}

fn start_relay() -> Relay {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let config = ferry_relay::RelayConfig::new(&url, vec!["cli-token".into(), "cli-other".into()]);
    runtime.spawn(ferry_relay::run(listener, config, std::future::pending()));
    Relay {
        url,
        _runtime: runtime,
    }
}

/// Lines of a child's stream, read on a thread.
fn lines(reader: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A running `ferry`, killed when dropped so a failing test leaves no process behind.
struct Ferry(Child);

impl std::ops::Deref for Ferry {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Ferry {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ferry(args: &[&str]) -> Ferry {
    Ferry(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .env_remove("FERRY_RELAY")
            .env_remove("FERRY_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run ferry"),
    )
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ferry did not exit in time"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling a child process, not synchronising
    }
}

fn get(url: &str) -> String {
    // A bare HTTP/1.1 GET with std only.
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn wrong_token_exits_nonzero_with_a_clear_message() {
    let relay = start_relay();
    let mut child = ferry(&["listen", "3000", "--relay", &relay.url, "--token", "wrong"]);
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let stderr: Vec<String> = lines(child.stderr.take().unwrap()).iter().collect();
    let text = stderr.join("\n");
    assert!(text.contains("refused the token"), "{text}");
    assert!(text.contains("FERRY_TOKEN"), "says what to do: {text}");
}

#[test]
fn bad_arguments_exit_nonzero_naming_the_problem() {
    let mut child = ferry(&[
        "listen",
        "not a target",
        "--relay",
        "http://127.0.0.1:9",
        "--token",
        "t",
    ]);
    let status = wait_exit(&mut child);
    assert!(!status.success());
    let text: Vec<String> = lines(child.stderr.take().unwrap()).iter().collect();
    assert!(text.join("\n").contains("invalid target"), "{text:?}");

    let mut child = ferry(&[
        "listen",
        "3000",
        "--relay",
        "http://127.0.0.1:9",
        "--token",
        "t",
        "--name",
        "No_Caps",
    ]);
    assert!(!wait_exit(&mut child).success());
    let text: Vec<String> = lines(child.stderr.take().unwrap()).iter().collect();
    assert!(text.join("\n").contains("invalid --name"), "{text:?}");

    // A --relay-ca file that cannot be read is named, with the cause, before any connection.
    for command in ["listen", "history"] {
        let mut args = vec![command];
        if command == "listen" {
            args.push("3000");
        } else {
            args.extend(["--session", "s"]);
        }
        args.extend([
            "--relay",
            "https://127.0.0.1:9",
            "--token",
            "t",
            "--relay-ca",
            "/nonexistent/ca.pem",
        ]);
        let mut child = ferry(&args);
        assert!(!wait_exit(&mut child).success());
        let text = lines(child.stderr.take().unwrap())
            .iter()
            .collect::<Vec<_>>()
            .join("\n");
        assert!(text.contains("--relay-ca"), "{command}: {text}");
        assert!(
            text.contains("cannot read /nonexistent/ca.pem"),
            "{command}: {text}"
        );
    }
}

#[test]
fn answer_mode_options_are_checked() {
    let cases: [(&[&str], &str); 4] = [
        (&["--respond-status", "200"], "--respond-now"),
        (
            &["--respond-now", "--deadline", "8s"],
            "cannot be used with",
        ),
        (&["--deadline", "0s"], "longer than 0s"),
        (&["--respond-now", "--respond-status", "99"], "200..=599"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![
            "listen",
            "3000",
            "--relay",
            "http://127.0.0.1:9",
            "--token",
            "t",
        ];
        args.extend_from_slice(extra);
        let mut child = ferry(&args);
        assert!(!wait_exit(&mut child).success(), "{extra:?}");
        let text: Vec<String> = lines(child.stderr.take().unwrap()).iter().collect();
        assert!(text.join("\n").contains(expected), "{extra:?}: {text:?}");
    }
}

#[test]
fn unreachable_relay_is_retried_and_reported_on_each_attempt() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let mut child = ferry(&["listen", "3000", "--relay", &url, "--token", "t"]);
    let out = lines(child.stdout.take().unwrap());
    let mut attempts = Vec::new();
    while attempts.len() < 3 {
        let line = out.recv_timeout(WAIT).expect("a line per attempt");
        if line.contains("reconnecting (attempt") {
            attempts.push(line);
        }
    }
    assert!(attempts[0].contains("attempt 1"), "{attempts:?}");
    assert!(attempts[2].contains("attempt 3"), "{attempts:?}");
    assert!(child.try_wait().unwrap().is_none(), "still retrying");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn json_lines_start_with_ready_and_a_sigkilled_name_is_taken_over() {
    let relay = start_relay();
    let port = common::start_origin(
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )
    .to_string();
    let args = [
        "listen",
        &port,
        "--relay",
        &relay.url,
        "--token",
        "cli-token",
        "--name",
        "cli-json",
        "--json",
    ];
    let mut first = ferry(&args);
    let out = lines(first.stdout.take().unwrap());
    let ready: serde_json::Value = serde_json::from_str(&out.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(ready["event"], "ready");
    let url = ready["url"].as_str().unwrap().to_owned();
    assert_eq!(url, format!("{}/cli-json", relay.url));

    let response = get(&format!("{url}/hook?x=1"));
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.ends_with("hello"), "{response}");
    let event: serde_json::Value = serde_json::from_str(&out.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(event["event"], "request");
    assert_eq!(event["method"], "GET");
    assert_eq!(event["path"], "/hook?x=1");
    assert_eq!(event["status"], 200);
    assert_eq!(event["response_bytes"], 5);
    assert!(event["duration_ms"].as_f64().is_some());

    // SIGKILL: no goodbye. The same token asking again takes the name over at once.
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = ferry(&args);
    let out = lines(second.stdout.take().unwrap());
    let ready: serde_json::Value = serde_json::from_str(&out.recv_timeout(WAIT).unwrap()).unwrap();
    assert_eq!(ready["event"], "ready");
    assert_eq!(ready["url"], url.as_str());
    assert!(get(&format!("{url}/again")).starts_with("HTTP/1.1 200"));

    // Another token cannot have the name.
    let mut thief = ferry(&[
        "listen",
        &port,
        "--relay",
        &relay.url,
        "--token",
        "cli-other",
        "--name",
        "cli-json",
    ]);
    assert!(!wait_exit(&mut thief).success());
    let text: Vec<String> = lines(thief.stderr.take().unwrap()).iter().collect();
    assert!(
        text.join("\n").contains("belongs to another token"),
        "{text:?}"
    );
    second.kill().unwrap();
    second.wait().unwrap();
}
