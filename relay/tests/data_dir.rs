//! The `ferry-relay` binary refuses to start over a store it cannot use, with a clear message.

use std::process::Command;

#[test]
fn a_corrupt_database_stops_the_relay_with_a_clear_message() {
    let data = tempfile::TempDir::new().unwrap();
    std::fs::write(data.path().join("ferry.db"), vec![0x5a; 8192]).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0", "--token", "some-token"])
        .arg("--data-dir")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ferry.db"), "{stderr}");
    assert!(stderr.contains("damaged"), "{stderr}");
    assert!(!stderr.contains("connect a client"), "{stderr}");
    // The damaged file is left as it was.
    assert_eq!(
        std::fs::read(data.path().join("ferry.db")).unwrap(),
        vec![0x5a; 8192]
    );
}

#[test]
fn a_data_dir_that_is_a_file_stops_the_relay_with_a_clear_message() {
    let data = tempfile::TempDir::new().unwrap();
    let file = data.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_ferry-relay"))
        .args(["--listen", "127.0.0.1:0", "--token", "some-token"])
        .arg("--data-dir")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--data-dir"), "{stderr}");
}
