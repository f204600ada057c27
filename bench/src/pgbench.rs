//! pgbench runs: a warm-up run that is thrown away, then the measured run with `-l`
//! (per-transaction latencies, read into an hdrhistogram).

use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, ensure};
use hdrhistogram::Histogram;

use crate::env::{DataPath, Env};

/// What pgbench runs.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    /// `-S` (select-only) or TPC-B.
    pub select_only: bool,
    pub clients: u32,
    /// `-C`: a new connection per transaction.
    pub connect_per_tx: bool,
}

/// The figures of one measured pgbench run.
pub struct Outcome {
    pub transactions: u64,
    pub tps: f64,
    /// pgbench's "average connection time" (with `-C`) or "initial connection time".
    pub connect_ms: Option<f64>,
    pub latency_us: Histogram<u64>,
}

/// One pgbench process for `seconds`; `log_prefix` turns on `-l`.
async fn pgbench(
    env: &Env,
    path: &DataPath,
    w: Workload,
    seconds: u32,
    log_prefix: Option<&Path>,
) -> Result<String> {
    let mut cmd = env.command(path, &env.stack.pg.bin_dir.join("pgbench"));
    cmd.args(["-n", "-h", &path.host, "-p", &path.port.to_string()])
        .args(["-U", crate::env::USER])
        .args(["-c", &w.clients.to_string()])
        // Both cores; pgbench caps threads at the client count.
        .args(["-j", &w.clients.min(2).to_string()])
        .args(["-T", &seconds.to_string()])
        .envs(path.libpq_env());
    if w.select_only {
        cmd.arg("-S");
    }
    if w.connect_per_tx {
        cmd.arg("-C");
    }
    if let Some(prefix) = log_prefix {
        cmd.arg("-l")
            .arg(format!("--log-prefix={}", prefix.display()));
    }
    cmd.arg(crate::env::DATABASE);
    let out = tokio::process::Command::from(cmd)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .context("failed to run pgbench")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "pgbench over {} failed ({}): {}{}",
        path.name,
        out.status,
        stdout.trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
    Ok(stdout)
}

/// Warm-up, then the measured run; `cpu` is sampled around the measured run only.
pub async fn run(
    env: &Env,
    path: &DataPath,
    w: Workload,
    warmup: u32,
    seconds: u32,
    log_dir: &Path,
    mut cpu: impl FnMut() -> Result<f64>,
) -> Result<(Outcome, f64)> {
    pgbench(env, path, w, warmup, None).await?;
    std::fs::create_dir_all(log_dir)?;
    let prefix = log_dir.join("pgbench");
    let cpu0 = cpu()?;
    let stdout = pgbench(env, path, w, seconds, Some(&prefix)).await?;
    let cpu_s = cpu()? - cpu0;
    let field = |key: &str| -> Option<f64> {
        stdout.lines().find_map(|l| {
            l.trim()
                .strip_prefix(key)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
    };
    let transactions = field("number of transactions actually processed:")
        .with_context(|| format!("no transaction count in pgbench output:\n{stdout}"))?
        as u64;
    let tps = field("tps =").with_context(|| format!("no tps in pgbench output:\n{stdout}"))?;
    let connect_ms =
        field("average connection time =").or_else(|| field("initial connection time ="));
    let mut latency_us = Histogram::<u64>::new(3)?;
    for entry in std::fs::read_dir(log_dir)? {
        let file = entry?.path();
        let text = std::fs::read_to_string(&file)?;
        for line in text.lines() {
            // client_id transaction_no time script_no time_epoch time_us
            if let Some(us) = line.split_whitespace().nth(2).and_then(|t| t.parse().ok()) {
                latency_us.record(us)?;
            }
        }
        // Logs of a long run are large; the histogram holds what we need.
        std::fs::remove_file(&file)?;
    }
    Ok((
        Outcome {
            transactions,
            tps,
            connect_ms,
            latency_us,
        },
        cpu_s,
    ))
}
