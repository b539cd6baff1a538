//! The `ferry-relay` binary as an operator runs it: defaults, printed token, SIGTERM.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

#[test]
fn without_tokens_it_generates_one_prints_a_client_command_and_stops_on_sigterm() {
    let data = tempfile::TempDir::new().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0"])
        .env("FERRY_DATA_DIR", data.path())
        .env_remove("FERRY_TOKENS")
        .env_remove("FERRY_LISTEN")
        .env_remove("FERRY_PUBLIC_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ferry-relay");
    // Killed when dropped, so a failing assertion leaves no relay running.
    struct Guard(std::process::Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut guard = Guard(child);
    let child = &mut guard.0;
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut addr = None;
    let mut token = None;
    let mut command = None;
    while command.is_none() {
        let line = rx.recv_timeout(WAIT).expect("start-up output");
        if let Some(rest) = line.strip_prefix("ferry-relay listening on http://") {
            addr = Some(rest.trim().to_owned());
        }
        if line.contains("generated token") {
            token = Some(rx.recv_timeout(WAIT).unwrap().trim().to_owned());
        }
        if line.trim_start().starts_with("ferry listen") {
            command = Some(line);
        }
    }
    let addr = addr.expect("listening line");
    let token = token.expect("a generated token");
    assert!(token.len() >= 40, "a strong token: {token}");
    assert!(command.unwrap().contains(&format!("--token {token}")));

    // It serves: health answers 200.
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        stream,
        "GET /_ferry/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    // SIGTERM: drains and exits 0.
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + WAIT;
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20)); // polling a child process
    };
    assert!(exit.success(), "exit status {exit}");
}

#[test]
fn bad_flags_exit_nonzero_with_a_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0", "--max-body", "lots"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--max-body"), "{stderr}");

    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--public-url",
            "relay.example.com",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--public-url must start with http"),
        "{stderr}"
    );

    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0", "--workers", "0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--workers"), "{stderr}");
}
