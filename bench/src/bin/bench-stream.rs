//! `bench-stream`: one large body through a URL, timed.
//!
//! - `bench-stream upload --url URL --bytes 1G` POSTs a body of that many bytes, generated on
//!   the fly, and checks the origin's `{"ok":true,"bytes":N}` answer counted all of them.
//! - `bench-stream download --url URL --bytes 1G` GETs the URL (e.g. `.../download/1G`) and
//!   checks the byte count.
//!
//! Prints one line: `upload bytes=N seconds=S mib_per_s=R` (or `download ...`). Exits non-zero
//! on a wrong status or byte count.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use ferry_bench::{parse_size, PatternBody};
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Command line.
#[derive(Parser)]
#[command(about = "Time one large request or response body through a URL")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

/// Which direction to stream.
#[derive(Subcommand)]
enum Mode {
    /// POST a body of `--bytes` bytes to `--url`.
    Upload {
        /// Where to send it (plain http://).
        #[arg(long)]
        url: Uri,
        /// Body size: 1048576, 512M, 1G…
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
    },
    /// GET `--url` and expect a body of `--bytes` bytes.
    Download {
        /// What to fetch (plain http://).
        #[arg(long)]
        url: Uri,
        /// Expected body size.
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse().mode).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bench-stream: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one transfer; returns the result line.
async fn run(mode: Mode) -> anyhow::Result<String> {
    let (name, url, expected, upload) = match mode {
        Mode::Upload { url, bytes } => ("upload", url, bytes, true),
        Mode::Download { url, bytes } => ("download", url, bytes, false),
    };
    let authority = url.authority().context("the URL needs a host")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let tcp = TcpStream::connect((authority.host(), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);

    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let builder = Request::builder()
        .uri(path)
        .header(header::HOST, authority.as_str());
    let request = if upload {
        builder
            .method(Method::POST)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, expected)
            .body(Either::Left(PatternBody::new(expected)))?
    } else {
        builder
            .method(Method::GET)
            .body(Either::Right(Empty::<Bytes>::new()))?
    };

    let start = Instant::now();
    let response = sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut received: u64 = 0;
    let mut answer = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            received += data.len() as u64;
            if upload && answer.len() < 4096 {
                answer.extend_from_slice(data);
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();

    if status != StatusCode::OK {
        bail!(
            "{name}: status {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    if upload {
        let want = format!("\"bytes\":{expected}");
        if !String::from_utf8_lossy(&answer).contains(&want) {
            bail!(
                "upload: origin did not count {expected} bytes: {}",
                String::from_utf8_lossy(&answer)
            );
        }
    } else if received != expected {
        bail!("download: received {received} bytes, expected {expected}");
    }
    let mib_per_s = expected as f64 / (1024.0 * 1024.0) / seconds;
    Ok(format!(
        "{name} bytes={expected} seconds={seconds:.3} mib_per_s={mib_per_s:.1}"
    ))
}
