//! An interrupted run stops every process it started and removes what it made: its
//! temporary directory and, as root, the pods' network namespaces, cgroups and BPF pins.
//!
//! Runs the real harness binary (`bench --quick --only rtt-1`) against the real gateway
//! binary next to it, and sends SIGINT while the gateway path is being measured.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use gateway::harness::is_root;

/// Every process below `root` in the process tree, with its start time (so that a pid
/// reused later is not taken for the same process).
fn descendants(root: u32) -> Vec<(u32, String)> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some((ppid, start)) = stat(pid) {
            parent_of.push((pid, ppid, start));
        }
    }
    let mut found = vec![];
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for &(pid, ppid, ref start) in &parent_of {
            if ppid == p {
                found.push((pid, start.clone()));
                frontier.push(pid);
            }
        }
    }
    found
}

/// (parent pid, start time) from `/proc/<pid>/stat`; `None` once the process is gone or a
/// zombie (it has stopped; only its exit status is left).
fn stat(pid: u32) -> Option<(u32, String)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields start after the last ')'.
    let f: Vec<&str> = s[s.rfind(')')? + 2..].split_whitespace().collect();
    if f[0] == "Z" {
        return None;
    }
    Some((f[1].parse().ok()?, f[19].to_owned()))
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Names in `dir` that start with `prefix`.
fn entries(dir: &Path, prefix: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// What a stack makes as root: network namespaces, links (veths and address bridges),
/// cgroups and BPF pins.
fn root_made() -> BTreeSet<String> {
    let mut made = BTreeSet::new();
    let netns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    for l in String::from_utf8_lossy(&netns.stdout).lines() {
        made.insert(format!(
            "netns {}",
            l.split_whitespace().next().unwrap_or("")
        ));
    }
    let links = Command::new("ip").args(["-br", "link"]).output().unwrap();
    for l in String::from_utf8_lossy(&links.stdout).lines() {
        made.insert(format!(
            "link {}",
            l.split_whitespace().next().unwrap_or("")
        ));
    }
    let cg = gateway::identity::cgroup::cgroup2_mount().unwrap();
    made.extend(
        entries(&cg, "dbgw-")
            .into_iter()
            .map(|n| format!("cgroup {n}")),
    );
    made.extend(
        entries(Path::new("/sys/fs/bpf"), "dbgw-")
            .into_iter()
            .map(|n| format!("bpf pin {n}")),
    );
    made
}

#[test]
fn sigint_mid_run_stops_every_process_and_removes_what_it_made() {
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_bench"));
    let gateway = bench.with_file_name("gateway");
    assert!(
        gateway.is_file(),
        "no gateway binary at {} (cargo test --workspace builds it; or cargo build -p gateway)",
        gateway.display()
    );
    let root = is_root();
    let before = if root { root_made() } else { BTreeSet::new() };
    let out = std::env::temp_dir().join(format!("dbgw-bench-interrupt-{}", std::process::id()));

    let mut cmd = Command::new(&bench);
    cmd.args(["--quick", "--only", "rtt-1", "--threads", "1", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if !root {
        cmd.arg("--no-transparent");
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();

    // Forward stderr lines; the first measured path means every process is up.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut seen = String::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                let measured = line.starts_with("bench: rtt-1") && line.contains(" direct ");
                seen.push_str(&line);
                seen.push('\n');
                if measured {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("bench ended before measuring rtt-1 over direct:\n{seen}")
            }
        }
        assert!(
            Instant::now() < deadline,
            "no rtt-1 measurement after 240 s:\n{seen}"
        );
    }
    // The gateway path is starting now: its client runs, the stack is complete.
    std::thread::sleep(Duration::from_millis(500));
    let running = descendants(pid);
    let stack_prefix = format!("db-gateway-up-{pid}-");
    let pg_prefix = format!("db-gateway-pg-{pid}-");
    for prefix in [&stack_prefix, &pg_prefix] {
        let dirs = entries(&std::env::temp_dir(), prefix);
        assert_eq!(
            dirs.len(),
            1,
            "one {prefix}* directory while running: {dirs:?}"
        );
    }
    let names: Vec<String> = running.iter().map(|(p, _)| cmdline(*p)).collect();
    for want in ["gateway proxy", "gateway node", "haproxy", "stunnel"] {
        assert!(
            names.iter().any(|n| n.contains(want)),
            "no {want} process below bench while running: {names:#?}"
        );
    }
    // Also by directory: a process that left our tree (a daemon) would still name it.
    let in_dirs = |p: &u32| {
        let c = cmdline(*p);
        c.contains(&stack_prefix) || c.contains(&pg_prefix)
    };
    let by_dir: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(in_dirs)
        .collect();
    assert!(
        by_dir.len() >= 4,
        "PostgreSQL and the tunnels run from the run's directories: {by_dir:?}"
    );

    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let exit_deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > exit_deadline {
            let _ = child.kill();
            panic!("bench still running 60 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = reader.join().unwrap();
    assert!(!status.success(), "an interrupted run must fail: {stderr}");
    assert!(
        stderr.contains("interrupted (SIGINT)"),
        "the error says why the run ended:\n{stderr}"
    );

    // Children are stopped, not orphaned: give init a moment to reap reparented ones.
    let gone_by = Instant::now() + Duration::from_secs(5);
    let left = loop {
        let left: Vec<String> = running
            .iter()
            .filter(|(p, start)| stat(*p).is_some_and(|(_, s)| &s == start))
            .map(|(p, _)| format!("{p}: {}", cmdline(*p)))
            .chain(
                by_dir
                    .iter()
                    .filter(|p| in_dirs(p))
                    .map(|p| format!("{p}: {}", cmdline(*p))),
            )
            .collect();
        if left.is_empty() || Instant::now() > gone_by {
            break left;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(left.is_empty(), "still running after SIGINT: {left:#?}");
    for prefix in [&stack_prefix, &pg_prefix] {
        let dirs = entries(&std::env::temp_dir(), prefix);
        assert!(dirs.is_empty(), "directory left behind: {dirs:?}");
    }
    if root {
        let after = root_made();
        let new: Vec<&String> = after.difference(&before).collect();
        assert!(
            new.is_empty(),
            "namespaces, cgroups or pins left behind: {new:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}
