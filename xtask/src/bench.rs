//! `cargo xtask bench [--quick]`: installs what the harness needs, builds the gateway and the
//! harness, and runs `bench` (report in `target/bench/report.{json,md}`).
//!
//! The full run uses the release profile (the figures are the product's). `--quick` only
//! proves that every path and scenario works, so it uses the dev profile, whose dependencies
//! (rustls, ring, tokio) are built at opt-level 3 and already there for the tests.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::{cargo, setup, step, workspace_root};

#[derive(Args)]
pub struct Options {
    /// A few seconds per path and scenario (under 3 minutes in all).
    #[arg(long)]
    pub quick: bool,
    /// Where the report goes.
    #[arg(long, default_value = DEFAULT_OUT)]
    pub out: PathBuf,
    /// More arguments for `bench` (e.g. `--only select-8,copy-in`, `--no-transparent`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            quick: false,
            out: PathBuf::from(DEFAULT_OUT),
            args: Vec::new(),
        }
    }
}

const DEFAULT_OUT: &str = "target/bench";

pub fn run(opts: &Options) -> Result<()> {
    setup::run(&setup::Options::default())?;
    let profile: &[&str] = if opts.quick { &[] } else { &["--release"] };
    // Both binaries: bench runs the gateway binary that sits next to it.
    step(
        "build",
        cargo()
            .args(["build", "-p", "gateway", "-p", "bench"])
            .args(profile),
    )?;
    let out = workspace_root()?.join(&opts.out);
    let mut cmd = cargo();
    cmd.args(["run", "-q", "-p", "bench"])
        .args(profile)
        .arg("--")
        .arg("--out")
        .arg(&out);
    if opts.quick {
        cmd.arg("--quick");
    }
    cmd.args(&opts.args);
    step("bench", &mut cmd)
}
