//! `bench-origin`: a minimal, fast HTTP/1.1 origin for the benchmark.
//!
//! - `GET /download/N` streams N bytes of a fixed pattern (`5M`, `1G` suffixes work), never
//!   buffering the whole body.
//! - Any other request has its body read fully, counting bytes without storing them, and is
//!   answered `200 {"ok":true,"bytes":N}`.
//!
//! Keep-alive is on and the runtime is multi-threaded, so the origin is never the bottleneck.
//! Prints `listening on ADDR` on stdout once it accepts connections.

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use clap::Parser;
use ferry_bench::{parse_size, PatternBody};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Command line.
#[derive(Parser)]
#[command(about = "Minimal fast HTTP/1.1 origin for Ferry's benchmark")]
struct Args {
    /// Address to listen on, e.g. 127.0.0.1:0 for any free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
}

type OriginBody = Either<Full<Bytes>, PatternBody>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen).await?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                eprintln!("accept: {err}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(tcp), service_fn(handle));
            let _ = conn.await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<OriginBody>, Infallible> {
    if req.method() == Method::GET {
        if let Some(size) = req.uri().path().strip_prefix("/download/") {
            return Ok(match parse_size(size) {
                Ok(len) => Response::builder()
                    .header(header::CONTENT_TYPE, "application/octet-stream")
                    .header(header::CONTENT_LENGTH, len)
                    .body(Either::Right(PatternBody::new(len)))
                    .expect("valid response"),
                Err(err) => reply(StatusCode::BAD_REQUEST, format!("{{\"error\":{err:?}}}")),
            });
        }
    }
    let mut body = req.into_body();
    let mut bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(err) => {
                let msg = format!("{{\"error\":{:?}}}", err.to_string());
                return Ok(reply(StatusCode::BAD_REQUEST, msg));
            }
        }
    }
    Ok(reply(
        StatusCode::OK,
        format!("{{\"ok\":true,\"bytes\":{bytes}}}"),
    ))
}

fn reply(status: StatusCode, json: String) -> Response<OriginBody> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Either::Left(Full::new(Bytes::from(json))))
        .expect("valid response")
}
