//! `bench`: the db-gateway load harness (issue 5).
//!
//! Starts everything locally (PostgreSQL, the gateway proxy and node agent, an stunnel pair
//! and an HAProxy pair with mTLS), runs every scenario over every path in one run, side by
//! side, and writes `report.json` and `report.md`. See `bench/README.md`.
//!
//! `bench client …` is the harness's own client (COPY, 1-row latency loop, connection
//! set-up); the orchestrator runs it as a child process so that it can run inside a pod's
//! network namespace and cgroup like pgbench does.

mod client;
mod cpu;
mod echo;
mod env;
mod peers;
mod pgbench;
mod plan;
mod report;
mod scenario;

use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::{Parser, Subcommand};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(name = "bench", about = "db-gateway load harness")]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunOptions,
}

#[derive(clap::Args, Clone, Debug)]
pub struct RunOptions {
    /// A few seconds per path and scenario (proves the harness works; figures are noisy).
    #[arg(long)]
    pub quick: bool,
    /// Where `report.json` and `report.md` go.
    #[arg(long, default_value = "target/bench")]
    pub out: PathBuf,
    /// The `gateway` binary (default: next to this one).
    #[arg(long, env = "BENCH_GATEWAY_BIN")]
    pub gateway_bin: Option<PathBuf>,
    /// Skip the eBPF-intercepted pod path even when running as root.
    #[arg(long)]
    pub no_transparent: bool,
    /// Override the measured seconds per path and scenario (quick 2, full 30).
    #[arg(long)]
    pub measure_s: Option<u32>,
    /// Override the warm-up seconds (quick 1, full 5).
    #[arg(long)]
    pub warmup_s: Option<u32>,
    /// Override the idle scenario's connection count (quick 500, full 10000).
    #[arg(long)]
    pub idle_connections: Option<usize>,
    /// Override how long the gateway paths hold the idle connections (quick 2, full 600).
    #[arg(long)]
    pub idle_hold_s: Option<u32>,
    /// Only these scenarios (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Threads of each tunnel process: the node agent's `data_plane.threads`, the proxy's
    /// `threads` and each HAProxy's `nbthread` (stunnel runs a thread per connection).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: u16,
}

#[derive(Subcommand)]
enum Command {
    /// The harness's own client; prints `WARM` after warm-up and one JSON line at the end.
    Client(client::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Client(opts)) => client::main(opts),
        None => orchestrate(cli.run),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Runs the benchmark; on SIGINT or SIGTERM the run is dropped, which stops every process
/// it started and removes its directories (all cleanup lives in `Drop`).
fn orchestrate(opts: RunOptions) -> Result<()> {
    echo::raise_open_files_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Registered before any work, so a signal during a blocking start-up step is kept
        // and acted on at the next await.
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = scenario::run(opts) => r,
            _ = int.recv() => Err(anyhow!("interrupted (SIGINT); stopped every process and removed the temporary directories")),
            _ = term.recv() => Err(anyhow!("terminated (SIGTERM); stopped every process and removed the temporary directories")),
        }
    })
}
