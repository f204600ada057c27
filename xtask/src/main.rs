//! `cargo xtask <command>`: the project's developer and CI entry points.
//!
//! One module per subcommand, each an `Options` struct and a `run` function. Every external
//! command's failure names the command and its exit status.

mod bench;
mod demo;
mod deny;
mod deploy;
mod setup;
mod test;

use std::path::PathBuf;
use std::process::Command as Process;

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "db-gateway development tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the system packages the project needs (Debian 12), when missing.
    Setup(setup::Options),
    /// Run everything CI runs: setup, rustfmt, clippy, cargo deny, the test suite, the quick bench.
    Test(test::Options),
    /// Build the gateway and run `gateway up`: local PostgreSQL + CA + proxy + node agent.
    Demo(demo::Options),
    /// `cargo deny check`: advisories, licences, sources (also a step of `test`).
    Deny,
    /// Render the kustomize manifests under deploy/, validate them (kubernetes-validate,
    /// pinned images, resources, probes) and load their configs with `gateway config check`.
    DeployCheck,
    /// Load benchmark: gateway vs direct vs stunnel and HAProxy mTLS pairs (`bench/`).
    Bench(bench::Options),
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(&opts),
        Command::Test(opts) => test::run(&opts),
        Command::Demo(opts) => demo::run(opts),
        Command::Deny => deny::run(),
        Command::DeployCheck => deploy::run(),
        Command::Bench(opts) => bench::run(&opts),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> Result<PathBuf> {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(PathBuf::from)
        .with_context(|| format!("{} has no parent directory", manifest_dir.display()))
}

/// `cargo` as the one running us (`$CARGO`), so toolchain overrides carry over.
fn cargo() -> Process {
    let mut p = Process::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    // A CI checkout is built once: incremental caches would only fill the disk (they were
    // 30 GB of a 75 GB target directory, and a CI run once died of a full disk).
    if std::env::var_os("CI").is_some() && std::env::var_os("CARGO_INCREMENTAL").is_none() {
        p.env("CARGO_INCREMENTAL", "0");
    }
    p
}

/// Runs one named step in the workspace root, printing a header first.
fn step(name: &str, cmd: &mut Process) -> Result<()> {
    println!("==> {name}: {}", display(cmd));
    let status = cmd
        .current_dir(workspace_root()?)
        .status()
        .with_context(|| format!("step {name} failed: cannot run {}", display(cmd)))?;
    ensure!(status.success(), "step {name} failed: {status}");
    Ok(())
}

/// A command line for humans.
fn display(cmd: &Process) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Installs the pinned PyPI package `spec` into `dir` (never into the system's Python), as
/// step `install <what>`. Debian's Python is "externally managed" and refuses even a
/// `--target` install without `--break-system-packages`; a directory of ours is not the
/// system's, so that retry is safe.
fn pip_install(what: &str, spec: &str, dir: &std::path::Path) -> Result<()> {
    let pip = |extra: &[&str]| {
        let mut c = Process::new("python3");
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--upgrade",
            "--target",
        ])
        .arg(dir)
        .args(extra)
        .arg(spec);
        c
    };
    let name = format!("install {what}");
    if step(&name, &mut pip(&[])).is_err() {
        step(&name, &mut pip(&["--break-system-packages"]))?;
    }
    Ok(())
}

/// The cargo target directory: `$CARGO_TARGET_DIR` (relative to the workspace) or
/// `target/`.
fn target_dir(root: &std::path::Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
}
