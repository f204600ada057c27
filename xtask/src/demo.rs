//! `cargo xtask demo`: builds the gateway and replaces this process with `gateway up`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Args;

use crate::{cargo, display, setup, step, workspace_root};

#[derive(Args)]
pub struct Options {
    /// Passed through to `gateway up`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<String>,
}

pub fn run(opts: Options) -> Result<()> {
    setup::run(&setup::Options::default())?;
    step("build", cargo().args(["build", "-p", "gateway"]))?;

    let root = workspace_root()?;
    // Honour CARGO_TARGET_DIR like cargo does; relative paths are relative to the workspace.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(PathBuf::from(dir)))
        .unwrap_or_else(|| root.join("target"));
    let mut cmd = Command::new(target_dir.join("debug").join("gateway"));
    cmd.arg("up").args(&opts.args).current_dir(&root);
    println!("==> demo: {}", display(&cmd));
    // exec, not spawn: the gateway takes over this process, so Ctrl-C and SIGTERM reach it
    // directly and it drains and cleans up itself, with no cargo or xtask in between.
    let err = cmd.exec();
    Err(err).with_context(|| format!("failed to exec {}", display(&cmd)))
}
