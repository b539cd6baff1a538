//! `bench-idle`: holds N idle Ferry tunnels open against a relay, for the memory scenario.
//!
//! Each tunnel is opened the way a real client opens one: a WebSocket to
//! `/_ferry/v1/connect` with `Authorization: Bearer TOKEN` and the `ferry.v1` subprotocol, a
//! `hello`, then a `welcome`. The socket then runs under [`ferry_mux::Mux`] with a handler that
//! does nothing, so heartbeats flow both ways exactly as with `ferry`.
//!
//! Prints `connected N` on stdout once all N are up, then holds them until stdin reaches EOF
//! (unless `--ignore-stdin`) or SIGTERM/SIGINT arrives. Tunnels that close meanwhile are
//! reported on stderr. Needs about N file descriptors: raise `ulimit -n` first.

use std::io::{Read, Write};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use ferry_mux::{ControlHandler, Mux, MuxConfig, MuxHandle, MuxIo, Side, WsMessage};
use ferry_protocol::{Control, CONNECT_PATH, PROTOCOL_VERSION, SUBPROTOCOL};
use futures_util::stream::FuturesUnordered;
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue};
use tokio::signal::unix::{signal, SignalKind};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

/// Command line.
#[derive(Parser)]
#[command(about = "Hold N idle Ferry tunnels open against a relay")]
struct Args {
    /// The relay's base URL, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    relay: String,
    /// A token the relay accepts.
    #[arg(long)]
    token: String,
    /// How many tunnels to open.
    #[arg(long)]
    count: usize,
    /// How many handshakes may be in progress at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Hold the tunnels until a signal only; stdin is not watched (for background use).
    #[arg(long)]
    ignore_stdin: bool,
}

/// Ignores every control message: an idle tunnel never gets requests.
struct Idle;

impl ControlHandler for Idle {
    fn on_control(&self, _mux: &MuxHandle, _msg: Control) {}
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let base = args.relay.trim_end_matches('/');
    let url = match base.split_once("://") {
        Some(("http", rest)) => format!("ws://{rest}{CONNECT_PATH}"),
        Some(("https", rest)) => format!("wss://{rest}{CONNECT_PATH}"),
        _ => bail!("--relay must be an http:// or https:// URL"),
    };

    let mut opening = futures_util::stream::iter(0..args.count)
        .map(|i| {
            let (url, token) = (url.clone(), args.token.clone());
            async move {
                open(&url, &token)
                    .await
                    .with_context(|| format!("tunnel {i}"))
            }
        })
        .buffer_unordered(args.concurrency.max(1));
    let mut handles = Vec::with_capacity(args.count);
    let mut tasks = FuturesUnordered::new();
    while let Some(opened) = opening.next().await {
        let (handle, task) = opened?;
        handles.push(handle);
        tasks.push(task);
    }
    println!("connected {}", handles.len());
    std::io::stdout().flush()?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (eof_tx, mut stdin_eof) = tokio::sync::oneshot::channel::<()>();
    // With --ignore-stdin the sender is kept, so the receiver never fires.
    let _hold = if args.ignore_stdin {
        Some(eof_tx)
    } else {
        // A plain thread: tokio's stdin would need another feature for one blocking read loop.
        std::thread::spawn(move || {
            let mut sink = [0u8; 1024];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            let _ = eof_tx.send(());
        });
        None
    };
    let mut live = handles.len();
    loop {
        tokio::select! {
            _ = &mut stdin_eof => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(ended) = tasks.next() => {
                live -= 1;
                let reason = ended.unwrap_or_else(|e| e.to_string());
                eprintln!("tunnel closed ({live} left): {reason}");
            }
        }
    }
    for handle in &handles {
        handle.close("bench-idle exiting");
    }
    Ok(())
}

/// Opens one tunnel: WebSocket handshake, hello, welcome, then the mux.
async fn open(
    url: &str,
    token: &str,
) -> anyhow::Result<(MuxHandle, tokio::task::JoinHandle<String>)> {
    let mut request = url.into_client_request()?;
    let headers = request.headers_mut();
    headers.insert(
        header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(SUBPROTOCOL),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let uri = request.uri();
    let host = uri
        .host()
        .ok_or_else(|| anyhow!("no host in {uri}"))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        request,
        MuxIo::new(tcp, Side::Client),
        Some(config),
    )
    .await?;
    let hello = Control::Hello {
        version: PROTOCOL_VERSION,
        agent: concat!("ferry-bench/", env!("CARGO_PKG_VERSION")).to_owned(),
        name: None,
        resume: None,
        offline: None,
        respond: None,
        window: Some(ferry_protocol::flow::STREAM_WINDOW),
        binary_control: None,
        // As `ferry listen` says: an idle client is never asked to open a lane.
        lanes: Some(true),
        lane: None,
    };
    ws.send(Message::text(hello.encode())).await?;
    let welcome = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.get_mut().read_message().await? {
                Some(WsMessage::Ping | WsMessage::Pong) => continue,
                Some(msg) => match msg.as_text() {
                    Some(text) => return Ok(Control::decode(text)?),
                    None => bail!("unexpected message before welcome: {msg:?}"),
                },
                None => bail!("relay closed the connection before welcome"),
            }
        }
    })
    .await
    .map_err(|_| anyhow!("no welcome within 30s"))??;
    match welcome {
        Control::Welcome { .. } => Ok(Mux::spawn(ws, MuxConfig::default(), Idle)),
        other => bail!("expected welcome, got {other:?}"),
    }
}
