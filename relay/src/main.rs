//! `ferry-relay`: parses the command line and runs the relay until SIGINT or SIGTERM.

use anyhow::Context as _;
use clap::Parser as _;
use ferry_relay::store::{Store, StoreOptions};
use ferry_relay::{registry::random_string, Args, RelayConfig};
use tracing_subscriber::EnvFilter;

// mimalloc: per-request allocations (heads, frames, tasks) are small and short-lived, and
// glibc malloc showed up high in the profile (see docs/BENCHMARKS.md, findings 3 and 37).
#[global_allocator]
static GLOBAL: ferry_alloc::MiMalloc = ferry_alloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // This thread serves the first listening socket; `run_threads` starts one thread for each
    // other one. Single-threaded runtimes: a connection stays on the thread that accepted it,
    // and requests cross threads only where a session has no lane on the caller's thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run(args))
}

/// One thread per core (see docs/DESIGN.md, "Lanes"): threads do not share work, so an idle
/// one costs nothing, and under load each serves its share of the callers with a lane of
/// their session.
fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().min(ferry_relay::lanes::MAX_THREADS))
        .unwrap_or(1)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let tokens: Vec<String> = args
        .tokens
        .iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    let generated = tokens.is_empty();
    let tokens = if generated {
        vec![random_string(32)]
    } else {
        tokens
    };
    let threads = args.workers.map_or_else(default_workers, usize::from);
    let listeners = ferry_relay::lanes::bind(args.listen, threads).with_context(|| {
        format!(
            "cannot listen on {} (is the port in use? try --listen)",
            args.listen
        )
    })?;
    let local = listeners[0].local_addr()?;
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let public_url = args.public_url.clone().unwrap_or_else(|| {
        let host = if local.ip().is_unspecified() {
            format!("localhost:{}", local.port())
        } else {
            local.to_string()
        };
        format!("{scheme}://{host}")
    });
    if !public_url.starts_with("http://") && !public_url.starts_with("https://") {
        anyhow::bail!("--public-url must start with http:// or https:// (got '{public_url}')");
    }
    let mut config = RelayConfig::new(&public_url, tokens.clone());
    config.timeout = args.timeout;
    config.max_body = args.max_body;
    config.heartbeat_timeout = args.heartbeat_timeout;
    config.grace = args.grace;
    config.retention = args.retention;
    config.retention_max_bytes = args.retention_max_bytes;
    config.max_attempts = args.max_attempts;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(ferry_relay::tls::server_config(cert, key)?);
    }
    config.record_max_body =
        usize::try_from(args.record_max_body.unwrap_or(args.max_body)).unwrap_or(usize::MAX);
    config.record_buffer = usize::try_from(args.record_buffer).unwrap_or(usize::MAX);
    let options = StoreOptions {
        record_max_body: config.record_max_body,
        ..StoreOptions::default()
    };
    let store = Store::open(&args.data_dir, options)
        .await
        .context("cannot open the relay's store")?;
    config.store = Some(store);

    let shutdown = shutdown_signal();
    eprintln!("ferry-relay listening on {scheme}://{local}");
    eprintln!("public URL: {}", config.public_url);
    if generated {
        eprintln!("generated token (pass --token or FERRY_TOKENS to choose your own):");
        eprintln!("  {}", tokens[0]);
    }
    eprintln!("connect a client with:");
    eprintln!(
        "  ferry listen 3000 --relay {} --token {}",
        config.public_url,
        if generated {
            tokens[0].as_str()
        } else {
            "<token>"
        }
    );
    ferry_relay::run_threads(listeners, config, shutdown).await?;
    Ok(())
}

/// Installs the relay's SIGTERM and SIGINT handlers now, and returns what completes when either
/// signal comes. Installed before the relay says it is listening: a signal sent as soon as it
/// has said so must stop it gracefully, not kill it (the default action), which happened when
/// the handlers were only installed once the accept loop first polled this.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                _ => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
