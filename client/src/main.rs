//! `ferry`: parses the command line, runs the client and prints its events.

use std::process::ExitCode;

use clap::Parser as _;
use ferry_client::{run, Cli, ClientConfig, Command, Console, Target};
use tracing_subscriber::EnvFilter;

/// Console events queued for the printer thread; a full queue slows the tunnel down rather
/// than losing lines.
const EVENT_QUEUE: usize = 1024;

/// The printer's pause after each batch: lines appear at most this late, and at 1,024 per
/// pause the printer keeps up with ~100,000 requests a second.
const PRINT_PAUSE: std::time::Duration = std::time::Duration::from_millis(10);

/// The printer's buffer for a batch of lines (it grows for a larger batch, and shrinks back).
const PRINT_BUFFER: usize = 64 * 1024;

// mimalloc: per-request allocations (heads, frames, tasks) are small and short-lived, and
// glibc malloc showed up high in the profile (see docs/BENCHMARKS.md, findings 3 and 37).
#[global_allocator]
static GLOBAL: ferry_alloc::MiMalloc = ferry_alloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // One thread: the client serves one local app, and on a busy laptop a second worker only
    // adds wake-ups between threads (measured: twice the CPU per request at low load, and
    // +45 µs p50 latency). File writes go to tokio's blocking pool.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn main_async(cli: Cli) -> Result<(), String> {
    let args = match cli.command {
        Command::Listen(args) => args,
        other => return ferry_client::run_command(other).await,
    };
    let target = Target::parse(&args.target).map_err(|e| e.to_string())?;
    if let Some(name) = &args.name {
        ferry_protocol::validate_session_name(name)
            .map_err(|e| format!("invalid --name '{name}': {e}"))?;
    }
    ferry_client::connect_url(&args.relay).map_err(|e| format!("invalid --relay: {e}"))?;
    let mut config = ClientConfig::new(&args.relay, &args.token, target);
    config.respond = args.respond_policy();
    config.timeout = args.app_timeout();
    config.name = args.name;
    config.relay_ca = args.relay_ca;
    config.heartbeat_timeout = args.heartbeat_timeout;
    config.offline = Some(args.offline.into());
    config.state_dir = Some(
        args.state_dir
            .unwrap_or_else(ferry_client::dedupe::default_state_dir),
    );

    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let mut console = Console::new(args.json);
    // The console is written from a thread of its own: a terminal or pipe that stops reading
    // blocks only it, never the (single-threaded) tunnel.
    let printer = std::thread::spawn(move || {
        use std::io::Write as _;
        // One buffer for every batch: lines are rendered straight into it.
        let mut out = Vec::with_capacity(PRINT_BUFFER);
        // One write and flush per batch of queued events, not per request; and a short pause
        // after each, so that under steady traffic the tunnel's thread does not wake this one
        // for every request (a wake-up costs more than printing the line).
        while let Some(first) = events_rx.blocking_recv() {
            let mut next = Some(first);
            let mut taken = 0;
            while let Some(event) = next.take() {
                if let Some(line) = console.render_into(&event, &mut out) {
                    eprintln!("{line}");
                }
                taken += 1;
                if taken < EVENT_QUEUE {
                    next = events_rx.try_recv().ok();
                }
            }
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&out);
            let _ = stdout.flush();
            drop(stdout);
            out.clear();
            // A batch of unusually long lines does not keep its memory.
            out.shrink_to(PRINT_BUFFER);
            std::thread::sleep(PRINT_PAUSE);
        }
    });
    let result = run(config, events_tx, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    // `run` has dropped the events' sender: the printer finishes what is queued and ends (a
    // console that stopped reading is not waited for long).
    let joined = tokio::task::spawn_blocking(move || printer.join());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), joined).await;
    result.map_err(|e| e.to_string())
}
