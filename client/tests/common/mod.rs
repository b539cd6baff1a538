//! Helpers shared by the client's CLI tests.

use std::io::{Read, Write};
use std::net::TcpListener;

/// A local app (std only, a thread per connection) answering every request with `response`,
/// a complete HTTP/1.1 response. Returns its port on 127.0.0.1.
pub(crate) fn start_origin(response: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut seen = Vec::new();
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(response);
            });
        }
    });
    port
}
