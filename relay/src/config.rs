//! Command line and settings of the relay.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// ferry-relay: public end of the Ferry webhook tunnel.
///
/// Run with no flags to listen on 0.0.0.0:8080 with a freshly generated token.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080", env = "FERRY_LISTEN")]
    pub listen: SocketAddr,

    /// Public base URL of this relay, as providers will call it (e.g. https://hooks.example.com).
    /// Defaults to http://<listen address>.
    #[arg(long, env = "FERRY_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// A token clients may connect with; repeat for several. Also FERRY_TOKENS (comma-separated).
    /// With none, a strong random token is generated and printed.
    #[arg(
        long = "token",
        env = "FERRY_TOKENS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub tokens: Vec<String>,

    /// How long to wait for the client's answer before replying 504.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Largest request body accepted (bytes; suffixes K, M, G allowed); larger gets 413.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub max_body: u64,

    /// A tunnel that sends nothing for this long is declared dead.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// On SIGINT/SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub grace: Duration,

    /// PEM certificate chain, to serve HTTPS (with --tls-key).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key, to serve HTTPS (with --tls-cert).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Directory of the durable store (sessions, request history, offline queue).
    #[arg(long, default_value = "./ferry-data", env = "FERRY_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Largest body kept in history (bytes; K, M, G allowed). Defaults to --max-body. Queued
    /// requests always keep their whole body.
    #[arg(long, value_parser = parse_size)]
    pub record_max_body: Option<u64>,

    /// Memory for bodies on their way to history (K, M, G allowed). One body takes at most half
    /// of it; a body beyond keeps only its first 64 KiB (and cannot be replayed). Raise it to
    /// keep larger bodies whole (GitHub sends up to 25 MB).
    #[arg(long, default_value = "8M", value_parser = parse_size)]
    pub record_buffer: u64,

    /// How long recorded requests are kept.
    #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
    pub retention: Duration,

    /// Most bytes of history kept (K, M, G allowed); the oldest delivered and failed requests go
    /// first. Unlimited by default.
    #[arg(long, value_parser = parse_size)]
    pub retention_max_bytes: Option<u64>,

    /// Threads serving connections, each over its own listening socket on the port; a
    /// session's client opens a lane to each thread its callers arrive on. Default: one per
    /// CPU core.
    #[arg(long, env = "FERRY_WORKERS", value_parser = clap::value_parser!(u16).range(1..))]
    pub workers: Option<u16>,

    /// Delivery attempts of a queued request before it is parked as failed.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
}

/// Parses `32M`, `512K`, `1G` or a plain byte count.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((at, _)) => text.split_at(at),
        None => (text, ""),
    };
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size like 32M, 512K or 1048576"))?;
    let factor: u64 = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("unknown size unit in '{text}'; use K, M or G")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// Everything [`run`](crate::run) needs.
#[derive(Clone)]
pub struct RelayConfig {
    /// Public base URL, without a trailing slash.
    pub public_url: String,
    /// `http` or `https`: the scheme of `public_url`, sent as `X-Forwarded-Proto`.
    pub public_scheme: String,
    /// Accepted tokens.
    pub tokens: Vec<String>,
    /// How long to wait for a response head.
    pub timeout: Duration,
    /// Largest request body.
    pub max_body: u64,
    /// Heartbeat timeout of tunnels.
    pub heartbeat_timeout: Duration,
    /// Drain time on shutdown.
    pub grace: Duration,
    /// Most sessions kept.
    pub max_sessions: usize,
    /// Most TCP connections at once.
    pub max_connections: usize,
    /// TLS, if the listener serves HTTPS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Flow-control counters of every tunnel, for tests and benchmarks.
    pub stats: Arc<ferry_mux::MuxStats>,
    /// The durable store (sessions, request history, offline queue). `None` keeps everything in
    /// memory, as before issue 4; the binary always opens one under `--data-dir`.
    pub store: Option<crate::store::Store>,
    /// Bodies longer than this are cut in the history of passed-through requests
    /// (`--record-max-body`; the store cuts at its own limit too).
    pub record_max_body: usize,
    /// Memory for bodies on their way to history (`--record-buffer`).
    pub record_buffer: usize,
    /// Memory for the bodies of requests being read to be queued, all together (at least one
    /// `max_body`); a request that finds it spent is answered 503 with Retry-After.
    pub queue_memory: usize,
    /// How long recorded requests are kept (`--retention`).
    pub retention: Duration,
    /// Most bytes of history kept (`--retention-max-bytes`).
    pub retention_max_bytes: Option<u64>,
    /// How often the background pruning runs.
    pub prune_interval: Duration,
    /// Delivery attempts of a queued request before it is parked as failed (`--max-attempts`).
    pub max_attempts: u32,
    /// Wait before the first retry of a failed delivery; doubles on each further failure.
    pub retry_base: Duration,
    /// Longest wait between two delivery attempts.
    pub retry_max: Duration,
}

impl RelayConfig {
    /// Defaults for a relay reachable at `public_url` accepting `tokens`.
    pub fn new(public_url: &str, tokens: Vec<String>) -> Self {
        let public_url = public_url.trim_end_matches('/').to_owned();
        let public_scheme = if public_url.starts_with("https://") {
            "https"
        } else {
            "http"
        }
        .to_owned();
        RelayConfig {
            public_url,
            public_scheme,
            tokens,
            timeout: Duration::from_secs(30),
            max_body: 32 << 20,
            heartbeat_timeout: Duration::from_secs(30),
            grace: Duration::from_secs(10),
            max_sessions: 100_000,
            max_connections: 50_000,
            tls: None,
            stats: Arc::default(),
            store: None,
            record_max_body: 32 << 20,
            record_buffer: crate::record::DEFAULT_BUFFER,
            queue_memory: 64 * 1024 * 1024,
            retention: Duration::from_secs(7 * 24 * 3600),
            retention_max_bytes: None,
            prune_interval: Duration::from_secs(60),
            max_attempts: 10,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
    }
}
