//! The run: every scenario of [`SCENARIOS`] over every path, scenario by scenario, so that
//! the paths of one scenario are measured minutes apart at most (a shared machine's load
//! drifts).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::client::{self, Percentiles};
use crate::env::{DataPath, Env};
use crate::pgbench;
use crate::plan::{Kind, Measurement, Plan, SCENARIOS, Scenario};
use crate::{RunOptions, cpu, report};

pub async fn run(opts: RunOptions) -> Result<()> {
    let mut plan = if opts.quick {
        Plan {
            quick: true,
            warmup_s: 1,
            measure_s: 2,
            copy_bytes: 64 << 20,
            pgbench_scale: 1,
            idle_connections: 500,
            idle_hold_s: 2,
            threads: opts.threads,
        }
    } else {
        Plan {
            quick: false,
            warmup_s: 5,
            measure_s: 30,
            copy_bytes: 1 << 30,
            pgbench_scale: 10,
            idle_connections: 10_000,
            idle_hold_s: 600,
            threads: opts.threads,
        }
    };
    plan.measure_s = opts.measure_s.unwrap_or(plan.measure_s);
    plan.warmup_s = opts.warmup_s.unwrap_or(plan.warmup_s);
    plan.idle_connections = opts.idle_connections.unwrap_or(plan.idle_connections);
    let fits = crate::echo::max_relayed_connections();
    if plan.idle_connections > fits {
        eprintln!(
            "bench: the open-files limit ({}) lets a tunnel process relay {fits} connections \
             (two sockets each); the idle scenario opens {fits}, not {}",
            crate::echo::open_files_limit(),
            plan.idle_connections
        );
        plan.idle_connections = fits;
    }
    plan.idle_hold_s = opts.idle_hold_s.unwrap_or(plan.idle_hold_s);
    for o in &opts.only {
        ensure!(
            SCENARIOS.iter().any(|s| s.name == o),
            "unknown scenario {o:?}; known: {}",
            SCENARIOS
                .iter()
                .map(|s| s.name)
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let me = std::env::current_exe()?;
    let gateway_bin = match &opts.gateway_bin {
        Some(p) => p.clone(),
        None => me.with_file_name("gateway"),
    };
    ensure!(
        gateway_bin.is_file(),
        "no gateway binary at {} (build it: cargo build -p gateway, or pass --gateway-bin)",
        gateway_bin.display()
    );
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("failed to create {}", opts.out.display()))?;
    let started = std::time::Instant::now();
    eprintln!("bench: starting PostgreSQL, gateway, stunnel and haproxy ({plan:?})");
    let env = Env::start(
        &gateway_bin,
        !opts.no_transparent,
        plan.pgbench_scale,
        plan.threads,
    )?;
    eprintln!(
        "bench: paths {} (set up in {:.1}s)",
        env.paths
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        started.elapsed().as_secs_f64()
    );
    let mut results = Vec::new();
    for s in SCENARIOS
        .iter()
        .filter(|s| opts.only.is_empty() || opts.only.iter().any(|o| o == s.name))
    {
        for p in env.paths.iter().filter(|p| p.runs(s.name)) {
            let t = std::time::Instant::now();
            let m = measure(&env, p, s, &plan, &me)
                .await
                .with_context(|| format!("scenario {} over {}", s.name, p.name))?;
            eprintln!(
                "bench: {:<17} {:<13} {} ({:.1}s)",
                s.name,
                p.name,
                report::headline(&m),
                t.elapsed().as_secs_f64()
            );
            results.push(m);
        }
    }
    let r = report::Report::new(&plan, &env, results)?;
    r.write(&opts.out)?;
    // Every figure the report claims was measured must be a real, positive number.
    r.check()?;
    eprintln!(
        "bench: wrote {}/report.json and report.md in {:.0}s",
        opts.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn measure(
    env: &Env,
    p: &DataPath,
    s: &Scenario,
    plan: &Plan,
    me: &Path,
) -> Result<Measurement> {
    let tunnel = p.tunnel_pids.clone();
    let cpu = || cpu::total(&tunnel);
    let mut f = BTreeMap::new();
    let mut note = None;
    let tunnel_cpu = match s.kind {
        Kind::Pgbench(w) => {
            let dir = env.work_dir.join(format!("{}-{}", s.name, p.name));
            let (o, cpu_s) =
                pgbench::run(env, p, w, plan.warmup_s, plan.measure_s, &dir, cpu).await?;
            let _ = std::fs::remove_dir_all(&dir);
            f.insert("transactions".into(), o.transactions as f64);
            f.insert("tps".into(), o.tps);
            latency(&mut f, "latency", &Percentiles::of(&o.latency_us));
            if let Some(ms) = o.connect_ms {
                f.insert("pgbench_connect_ms".into(), ms);
            }
            per_tx(&mut f, p, cpu_s, o.transactions);
            cpu_s
        }
        Kind::Client(kind) => {
            let run = run_client(env, p, kind, &[], plan, me, &tunnel).await?;
            let r = &run.report;
            let cpu_s = run.cpu_since("WARM")?;
            match kind {
                client::Kind::Latency | client::Kind::Connect => {
                    let what = if kind == client::Kind::Connect {
                        "setup"
                    } else {
                        "latency"
                    };
                    f.insert("transactions".into(), r.count as f64);
                    f.insert("tps".into(), r.count as f64 / r.seconds);
                    if let Some(l) = &r.latency_us {
                        latency(&mut f, what, l);
                    }
                    per_tx(&mut f, p, cpu_s, r.count);
                }
                client::Kind::CopyOut | client::Kind::CopyIn => {
                    f.insert("bytes".into(), r.bytes as f64);
                    f.insert("elapsed_s".into(), r.seconds);
                    f.insert("mb_per_s".into(), r.bytes as f64 / r.seconds / 1e6);
                    if !p.tunnel_pids.is_empty() {
                        f.insert(
                            "cpu_s_per_gb".into(),
                            cpu_s / (r.bytes as f64 / (1u64 << 30) as f64),
                        );
                    }
                }
                client::Kind::RoundTrip | client::Kind::Idle => {
                    bail!("{kind:?} is not a PostgreSQL client kind")
                }
            }
            cpu_s
        }
        Kind::RoundTrip(size) => {
            let size = size.to_string();
            let run = run_client(
                env,
                p,
                client::Kind::RoundTrip,
                &["--size", &size],
                plan,
                me,
                &tunnel,
            )
            .await?;
            let r = &run.report;
            let cpu_s = run.cpu_since("WARM")?;
            f.insert("transactions".into(), r.count as f64);
            f.insert("tps".into(), r.count as f64 / r.seconds);
            if let Some(l) = &r.latency_us {
                latency(&mut f, "rtt", l);
            }
            per_tx(&mut f, p, cpu_s, r.count);
            cpu_s
        }
        Kind::Idle => {
            let count = plan.idle_connections.to_string();
            // The gateway holds for the growth target's window; the other paths for as long
            // as any other scenario (their RSS per connection is the comparison).
            let hold = if p.name == "gateway" {
                plan.idle_hold_s
            } else {
                plan.measure_s
            };
            let before_kib = cpu::rss_kib(&tunnel)?;
            let run = run_client(
                env,
                p,
                client::Kind::Idle,
                &["--count", &count, "--hold", &hold.to_string()],
                plan,
                me,
                &tunnel,
            )
            .await?;
            let n = run.report.count as f64;
            // The gateway must hold them all; a peer's own limit is reported, not fatal.
            if let Some(why) = &run.report.limit {
                ensure!(
                    !p.name.starts_with("gateway"),
                    "{} opened {} of {} connections: {why}",
                    p.name,
                    run.report.count,
                    plan.idle_connections
                );
                note = Some(format!(
                    "{} held {} of {} idle connections, then refused more: {why}",
                    p.name, run.report.count, plan.idle_connections
                ));
            }
            f.insert("connections".into(), n);
            f.insert("open_s".into(), run.report.seconds);
            f.insert("hold_s".into(), hold as f64);
            let opened = run.mark("OPENED")?;
            let held = run.mark("HELD")?;
            if !p.tunnel_pids.is_empty() {
                // Growth of the tunnel processes from before the first connection.
                let per_conn = |kib: u64| kib.saturating_sub(before_kib) as f64 / n;
                f.insert("rss_kib_per_conn".into(), per_conn(opened.rss_kib));
                f.insert("rss_end_kib_per_conn".into(), per_conn(held.rss_kib));
                let open_cpu = opened.cpu_s - run.mark("START")?.cpu_s;
                f.insert("cpu_s_per_1000_conn".into(), open_cpu / n * 1000.0);
            }
            held.cpu_s - opened.cpu_s
        }
    };
    // An idle hold may use no measurable CPU at all (10 ms ticks): not a figure there.
    if !p.tunnel_pids.is_empty() && !matches!(s.kind, Kind::Idle) {
        f.insert("tunnel_cpu_s".into(), tunnel_cpu);
    }
    Ok(Measurement {
        path: p.name.clone(),
        scenario: s.name.into(),
        figures: f,
        note,
    })
}

fn latency(f: &mut BTreeMap<String, f64>, what: &str, l: &Percentiles) {
    f.insert(format!("{what}_p50_us"), l.p50);
    f.insert(format!("{what}_p99_us"), l.p99);
    f.insert(format!("{what}_p999_us"), l.p999);
    f.insert(format!("{what}_max_us"), l.max);
}

fn per_tx(f: &mut BTreeMap<String, f64>, p: &DataPath, cpu_s: f64, count: u64) {
    if !p.tunnel_pids.is_empty() && count > 0 {
        f.insert("cpu_s_per_1000_tx".into(), cpu_s / count as f64 * 1000.0);
    }
}

/// CPU and memory of the tunnel processes when the client printed a marker line.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    pub cpu_s: f64,
    pub rss_kib: u64,
}

/// What one `bench client` run gave: its report, and the tunnels' state at each marker
/// (`START` before the client, `WARM`, `OPENED`, `HELD`, and `END` at the report line).
pub struct ClientRun {
    pub report: client::Report,
    marks: Vec<(String, Mark)>,
}

impl ClientRun {
    pub fn mark(&self, name: &str) -> Result<Mark> {
        self.marks
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, m)| *m)
            .with_context(|| format!("the client printed no {name}"))
    }

    /// Tunnel CPU seconds from marker `name` to the report.
    pub fn cpu_since(&self, name: &str) -> Result<f64> {
        Ok(self.mark("END")?.cpu_s - self.mark(name)?.cpu_s)
    }
}

/// Runs `bench client` where the path's clients run, sampling the tunnels at every marker.
async fn run_client(
    env: &Env,
    p: &DataPath,
    kind: client::Kind,
    extra: &[&str],
    plan: &Plan,
    me: &Path,
    tunnel: &[u32],
) -> Result<ClientRun> {
    let sample = || -> Result<Mark> {
        Ok(Mark {
            cpu_s: cpu::total(tunnel)?,
            rss_kib: cpu::rss_kib(tunnel)?,
        })
    };
    let kind_arg = match kind {
        client::Kind::CopyOut => "copy-out",
        client::Kind::CopyIn => "copy-in",
        client::Kind::Latency => "latency",
        client::Kind::Connect => "connect",
        client::Kind::RoundTrip => "round-trip",
        client::Kind::Idle => "idle",
    };
    let mut cmd = env.command(p, me);
    cmd.args(["client", kind_arg, "--conn", &p.conn_string()])
        .args(p.client_tls_args())
        .args(["--addr", &p.tcp_addr])
        .args(["--warmup", &plan.warmup_s.to_string()])
        .args(["--seconds", &plan.measure_s.to_string()])
        .args(["--bytes", &plan.copy_bytes.to_string()])
        .args(extra);
    let mut marks = vec![("START".to_owned(), sample()?)];
    let mut child = tokio::process::Command::from(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("failed to start bench client")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let mut report = None;
    while let Some(line) = lines.next_line().await? {
        if let Ok(r) = serde_json::from_str::<client::Report>(&line) {
            marks.push(("END".into(), sample()?));
            report = Some(r);
        } else if let Some(name) = line.split_whitespace().next() {
            marks.push((name.to_owned(), sample()?));
        }
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        bail!(
            "bench client {kind_arg} over {} failed ({}): {}",
            p.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
    }
    Ok(ClientRun {
        report: report.context("bench client printed no report")?,
        marks,
    })
}
