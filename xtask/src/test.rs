//! `cargo xtask test`: everything CI runs, in order, stopping at the first failing step.

use anyhow::Result;
use clap::Args;

use crate::{cargo, setup, step};

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
    println!("==> all steps passed");
    Ok(())
}
