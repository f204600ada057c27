//! `cargo xtask test`: everything CI runs, in order, stopping at the first failing step; the
//! last step is `cargo xtask bench --quick`.

use anyhow::{Context, Result, ensure};
use clap::Args;

use crate::{bench, cargo, setup, step, workspace_root};

#[derive(Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> Result<()> {
    setup::run(&setup::Options::default())?;
    // Children inherit our environment, so `CI` (which tests may read to skip or tighten
    // checks) passes through unchanged.
    if let Some(ci) = std::env::var_os("CI") {
        println!("CI={}", ci.to_string_lossy());
    }
    step("fmt", cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    crate::deploy::run()?;
    crate::deny::run()?;
    no_harness()?;
    rds_token_vectors()?;
    // tests/client_tls.rs runs another language's driver with TLS: psycopg with the libpq
    // (17 or later, for sslnegotiation=direct) of its binary wheel, from PyPI.
    let psycopg = workspace_root()?.join("target/xtask-psycopg");
    crate::pip_install("psycopg", PSYCOPG, &psycopg)?;
    step(
        "test",
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .env("DBGW_PSYCOPG", &psycopg),
    )?;
    // Proves the harness: every path and scenario runs and every figure is measured (the
    // harness asserts that; it never asserts a speed).
    bench::run(&bench::Options {
        quick: true,
        ..bench::Options::default()
    })?;
    println!("==> all steps passed");
    Ok(())
}

/// The pinned psycopg of `gateway/tests/client_tls.rs` (its binary wheel bundles libpq 18).
const PSYCOPG: &str = "psycopg[binary]==3.3.9";

/// The pinned botocore of `gateway/tests/vectors/rds_token.py`: the vectors the RDS IAM
/// tests compare against must be what botocore makes today, not what it made once.
const BOTOCORE: &str = "botocore==1.35.99";

/// Regenerates the RDS IAM token vectors with the pinned botocore (installed into
/// `target/`, never into the system's Python) and fails when they differ from the file.
fn rds_token_vectors() -> Result<()> {
    let root = workspace_root()?;
    let site = root.join("target/xtask-python");
    crate::pip_install("botocore", BOTOCORE, &site)?;
    let out = std::process::Command::new("python3")
        .arg(root.join("gateway/tests/vectors/rds_token.py"))
        .env("PYTHONPATH", &site)
        .output()
        .context("cannot run gateway/tests/vectors/rds_token.py")?;
    ensure!(
        out.status.success(),
        "rds_token.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = root.join("gateway/tests/vectors/rds_token.json");
    let want = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
    ensure!(
        out.stdout == want,
        "{} is not what {BOTOCORE} makes now; regenerate it with gateway/tests/vectors/rds_token.py",
        file.display()
    );
    println!(
        "==> rds token vectors: botocore agrees with {}",
        file.display()
    );
    Ok(())
}

/// The release image's build: `gateway` without the cargo feature `harness` must have no
/// `up` command and none of the harness's code (DESIGN.md: the demo and test harness sit
/// behind a default feature). Built in the same target directory, so the dependencies are
/// shared; the default build that `cargo test` makes next is cached separately.
fn no_harness() -> Result<()> {
    step(
        "clippy without harness",
        cargo().args([
            "clippy",
            "-p",
            "gateway",
            "--no-default-features",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    step(
        "build without harness",
        cargo().args(["build", "-p", "gateway", "--no-default-features"]),
    )?;
    let bin = workspace_root()?.join("target/debug/gateway");
    let help = std::process::Command::new(&bin)
        .arg("--help")
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let help = String::from_utf8_lossy(&help.stdout);
    ensure!(
        help.contains("proxy") && !help.lines().any(|l| l.trim_start().starts_with("up ")),
        "gateway without the harness feature still offers `up` (or its help is not what was expected):\n{help}"
    );
    // Legacy-mangled symbol paths name the module: `7gateway7harness`.
    let image = std::fs::read(&bin).with_context(|| format!("cannot read {}", bin.display()))?;
    let marker = b"7gateway7harness";
    ensure!(
        !image.windows(marker.len()).any(|w| w == marker),
        "{} (built without the harness feature) still contains gateway::harness code",
        bin.display()
    );
    println!("==> without harness: no `up` command, no gateway::harness symbols");
    Ok(())
}
