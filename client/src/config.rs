//! Command line of the `ferry` binary.

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

    /// Token the relay accepts.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: String,

    /// Ask for a stable session name (lowercase letters, digits, dashes; 3–63 chars).
    #[arg(long)]
    pub name: Option<String>,

    /// How long the local app may take to answer before the caller gets 504.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// Declare the tunnel dead when nothing arrives for this long, then reconnect.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_timeout: Duration,

    /// Print JSON lines (first a "ready" event with the URL, then one per request).
    #[arg(long)]
    pub json: bool,
}
