//! Command line of the `ferry` binary.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// ferry: receive webhooks on your laptop through a Ferry relay.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Forward the session's webhooks to a local app and relay its responses.
    Listen(ListenArgs),
    /// List the session's recorded requests, newest first (or export them with --export).
    History(HistoryArgs),
    /// Show one recorded request in full: head, body, response and attempts.
    Show(ShowArgs),
    /// Deliver a recorded request again to the connected client.
    Replay(ShowArgs),
}

/// Options every history command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayArgs {
    /// Relay base URL, e.g. https://relay.example.com.
    #[arg(long, env = "FERRY_RELAY")]
    pub relay: String,

    /// Also trust the certificates in this PEM file for an https:// relay (a self-signed or
    /// private-CA certificate).
    #[arg(long, env = "FERRY_RELAY_CA", value_name = "FILE")]
    pub relay_ca: Option<PathBuf>,

    /// Token the relay accepts (the session owner's).
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: String,

    /// The session: its name (as given to `listen --name`) or random id.
    #[arg(long, visible_alias = "name", env = "FERRY_SESSION")]
    pub session: String,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `ferry history` options.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// Relay, token, session.
    #[command(flatten)]
    pub relay: RelayArgs,

    /// Only this status (404) or class (5xx).
    #[arg(long)]
    pub status: Option<String>,

    /// Only this method (POST).
    #[arg(long)]
    pub method: Option<String>,

    /// Only paths starting with this (/webhooks/).
    #[arg(long)]
    pub path: Option<String>,

    /// Only requests received within this long ago (1h, 30m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,

    /// At most this many requests (newest first); with --export, all are exported by default.
    #[arg(long)]
    pub limit: Option<usize>,

    /// Write the requests in full to FILE: HAR if it ends in .har, NDJSON otherwise (one
    /// record per line, raw bodies as base64).
    #[arg(long, value_name = "FILE")]
    pub export: Option<PathBuf>,
}

/// `ferry show` / `ferry replay` options.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The request's id, as `ferry history` lists it.
    pub id: String,

    /// Relay, token, session.
    #[command(flatten)]
    pub relay: RelayArgs,
}

/// `ferry listen` options.
#[derive(Debug, clap::Args)]
pub struct ListenArgs {
    /// Where to forward: a port (3000), host:port, or a URL with a path prefix
    /// (http://localhost:3000/webhooks).
    pub target: String,

    /// Relay base URL, e.g. https://relay.example.com.
    #[arg(long, env = "FERRY_RELAY")]
    pub relay: String,

    /// Also trust the certificates in this PEM file for an https:// relay (a self-signed or
    /// private-CA certificate).
    #[arg(long, env = "FERRY_RELAY_CA", value_name = "FILE")]
    pub relay_ca: Option<PathBuf>,

    /// Token the relay accepts.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Ask for a stable session name (lowercase letters, digits, dashes; 3–63 chars).
    #[arg(long)]
    pub name: Option<String>,

    /// How long the local app may take to answer before the caller gets 504 [default: 30s;
    /// 15m with --respond-now, to leave time at a breakpoint].
    #[arg(long, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,

    /// Declare the tunnel dead when nothing arrives for this long, then reconnect.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Print JSON lines (first a "ready" event with the URL, then one per request).
    #[arg(long)]
    pub json: bool,

    /// While this client is away, the relay queues requests (answering 202) or rejects them
    /// (503 with Retry-After, so providers that retry will retry). Stored with the session.
    #[arg(long, value_enum, default_value = "queue")]
    pub offline: OfflineArg,

    /// Answer every request at once (202 with the queued id, or --respond-status and
    /// --respond-body) and deliver it to the app through the relay's queue: for stepping
    /// through a handler in a debugger while the provider is already answered.
    #[arg(long, conflicts_with = "deadline")]
    pub respond_now: bool,

    /// With --respond-now: the status to answer with (200-599; default 202).
    #[arg(long, requires = "respond_now", value_parser = clap::value_parser!(u16).range(200..=599))]
    pub respond_status: Option<u16>,

    /// With --respond-now: the body to answer with (default {"queued":true,"id":"..."}).
    #[arg(long, requires = "respond_now")]
    pub respond_body: Option<String>,

    /// Relay the app's real response if it answers within this long (e.g. 8s); otherwise the
    /// relay answers 202 at the deadline, the request carries on to the app and its real
    /// result is recorded in history. Slack gives 3s, Shopify 5s, GitHub 10s.
    #[arg(long, value_parser = parse_deadline)]
    pub deadline: Option<Duration>,

    /// Where delivered request ids are remembered, so a redelivery is never passed to the app
    /// twice. Default: $XDG_STATE_HOME/ferry or ~/.local/state/ferry.
    #[arg(long, env = "FERRY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

fn parse_deadline(text: &str) -> Result<Duration, String> {
    let deadline = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if deadline.is_zero() {
        return Err("the deadline must be longer than 0s (e.g. 8s)".into());
    }
    Ok(deadline)
}

/// The app's time to answer when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// ... and with `--respond-now`, where nobody waits on the answer but a user at a breakpoint.
const RESPOND_NOW_TIMEOUT: Duration = Duration::from_secs(15 * 60);

impl ListenArgs {
    /// How long the local app may take to answer.
    pub fn app_timeout(&self) -> Duration {
        self.timeout.unwrap_or(if self.respond_now {
            RESPOND_NOW_TIMEOUT
        } else {
            DEFAULT_TIMEOUT
        })
    }

    /// The answer mode these options ask for; `None` is the relay's default (`pass`).
    pub fn respond_policy(&self) -> Option<ferry_protocol::RespondPolicy> {
        if self.respond_now {
            return Some(ferry_protocol::RespondPolicy::Now {
                status: self.respond_status,
                body: self.respond_body.clone(),
            });
        }
        self.deadline
            .map(|deadline| ferry_protocol::RespondPolicy::Deadline {
                millis: u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX),
            })
    }
}

/// `--offline` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OfflineArg {
    /// Queue durably and answer 202; deliver when the client is back.
    Queue,
    /// Answer 503 with Retry-After.
    Reject,
}

impl From<OfflineArg> for ferry_protocol::OfflinePolicy {
    fn from(arg: OfflineArg) -> Self {
        match arg {
            OfflineArg::Queue => ferry_protocol::OfflinePolicy::Queue,
            OfflineArg::Reject => ferry_protocol::OfflinePolicy::Reject,
        }
    }
}
