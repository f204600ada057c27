//! `cargo xtask test`: everything CI runs, in order, stopping at the first failing step; the
//! last step is `cargo xtask bench --quick`.

use anyhow::Result;
use clap::Args;

use crate::{bench, cargo, setup, step};

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
    step(
        "test",
        cargo().args(["test", "--workspace", "--no-fail-fast"]),
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
