//! Issue 18, hardening of the node: identity from cgroups only under the kubelet's roots,
//! certificate fetching and cgroup walks off the data plane, bounded eBPF maps (items 1, 9, 10).
//! Each test is named after the item it proves and fails on the code before its fix.
//!
//! All three are privileged (root, cgroup v2, BPF): they skip without root, and fail when
//! `CI=true` and they cannot run. Items 1 and 9 run the whole stack with pods in network
//! namespaces and kubelet-shaped cgroups; item 10 loads the kernel programs alone on a cgroup
//! subtree and a network namespace of its own, as `ebpf.rs` does. Clients inside pods and
//! cgroups are this test binary re-executed as `helper`.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{metric, scrape, spec};
use gateway::ebpf::{self, InterceptConfig, Interception};
use gateway::harness::pods::{CgroupTree, Netns};
use gateway::harness::{PodSpec, Stack, TransparentSpec};

const HELPER_ENV: &str = "DBGW_HARDENING_HELPER";
const RESULT: &str = "DBGW_RESULT";
/// The unprivileged user of item 1's attack (no passwd entry is needed).
const ATTACKER: u32 = 1000;

fn privileged(what: &str) -> bool {
    gateway::harness::root_or_skip(what)
}

/// A transparent stack with these pods (namespace, name, service account).
fn stack_with(pods: &[(&str, &str, &str)], threads: usize) -> Stack {
    let mut spec = spec();
    spec.workloads.clear();
    spec.data_plane.threads = threads;
    spec.transparent = Some(TransparentSpec {
        pods: pods
            .iter()
            .map(|(ns, name, sa)| PodSpec::new(ns, name, sa))
            .collect(),
        host_identity: None,
        ipv6: false,
        join: false,
        ..TransparentSpec::default()
    });
    Stack::start(spec).expect("transparent stack")
}

fn conninfo(s: &Stack, user: &str) -> String {
    let k = s.kernel.as_ref().unwrap();
    format!(
        "host={} port=5432 user={user} dbname=app sslmode=disable connect_timeout=10",
        k.db_addr.ip()
    )
}

/// Kills and reaps a child still running when a check fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The helper's `DBGW_RESULT` line (libtest may print in front of it).
fn result_line(child: &mut Child) -> String {
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("helper output") == 0 {
            panic!("helper printed no {RESULT} line");
        }
        if let Some(at) = line.find(RESULT) {
            let found = line[at + RESULT.len()..].trim().to_owned();
            // Keep draining: libtest's closing lines must not hit a closed pipe.
            std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
            return found;
        }
    }
}

/// The helper as a command: `mode` and its arguments in the environment.
fn helper_command(program_prefix: Option<Command>, mode: &str) -> Command {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = match program_prefix {
        Some(c) => c,
        None => Command::new(&exe),
    };
    cmd.args(["helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, mode)
        .stdout(Stdio::piped());
    cmd
}

/// Not a test of its own: the client the tests start inside pods and cgroups. Modes (in
/// `DBGW_HARDENING_HELPER`):
/// - `burst <addr> <n> <user>`: `n` concurrent connections, each sends a startup packet and
///   reads to the end; prints how many got an `ErrorResponse` with SQLSTATE 28000;
/// - `probe <n> <conninfo>`: `n` sequential tokio-postgres sessions (`select 1`); prints the
///   slowest in milliseconds;
/// - `flood <addr> <n>`: `n` connects held open; prints how many succeeded and how many
///   failed with EPERM, then holds them until killed;
/// - `own-cgroup`: prints its `/proc/self/cgroup` entry and the cgroup the agent would
///   exempt as its own.
#[test]
fn helper() {
    let Ok(mode) = std::env::var(HELPER_ENV) else {
        return;
    };
    // The last argument of `probe` (a connection string) has spaces of its own.
    let parts = if mode.starts_with("probe ") { 3 } else { 4 };
    let args: Vec<&str> = mode.splitn(parts, ' ').collect();
    match args[..] {
        ["burst", addr, n, user] => burst(addr.parse().unwrap(), n.parse().unwrap(), user),
        ["probe", n, conninfo] => probe(n.parse().unwrap(), conninfo),
        ["flood", addr, n] => flood(addr.parse().unwrap(), n.parse().unwrap()),
        ["own-cgroup"] => own_cgroup(),
        _ => panic!("bad helper mode {mode:?}"),
    }
}

fn startup_packet(user: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in [("user", user), ("database", "app")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend_from_slice(&body);
    p
}

fn burst(addr: SocketAddr, n: usize, user: &str) {
    let packet = startup_packet(user);
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let packet = packet.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                s.write_all(&packet).ok()?;
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                Some(out.first() == Some(&b'E') && out.windows(7).any(|w| w == b"C28000\0"))
            })
        })
        .collect();
    let denied = threads
        .into_iter()
        .map(|t| t.join())
        .filter(|r| matches!(r, Ok(Some(true))))
        .count();
    println!("{RESULT} {denied}");
}

fn probe(n: usize, conninfo: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let slowest = rt.block_on(async {
        let mut slowest = Duration::ZERO;
        for _ in 0..n {
            let t0 = Instant::now();
            let (client, conn) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            let task = tokio::spawn(conn);
            client.simple_query("select 1").await.unwrap();
            slowest = slowest.max(t0.elapsed());
            drop(client);
            let _ = task.await;
        }
        slowest
    });
    println!("{RESULT} {}", slowest.as_millis());
}

fn flood(addr: SocketAddr, n: usize) {
    let mut held = Vec::new();
    let (mut eperm, mut other) = (0, 0);
    for _ in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => held.push(s),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => eperm += 1,
            Err(_) => other += 1,
        }
    }
    println!("{RESULT} {} {eperm} {other}", held.len());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

fn own_cgroup() {
    let line = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let entry = line.lines().find(|l| l.starts_with("0::")).unwrap();
    let own = gateway::identity::cgroup::current_cgroup().unwrap();
    println!("{RESULT} {entry} {}", own.display());
}

// ------------------------------------------------------------------------------------------
// Item 1

/// Runs `sh -c script` as [`ATTACKER`] (uid and gid), started in cgroup `start_in` (which
/// root has given to the attacker), in the host's network namespace, with `CONN` set.
fn as_attacker(start_in: &Path, script: &str, conn: &str) -> Output {
    let procs = File::options()
        .write(true)
        .open(start_in.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let fd = procs.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .env("CONN", conn)
        .env("HOME", "/tmp")
        .current_dir("/");
    // SAFETY: between fork and exec only write(2), setgroups(2), setgid(2) and setuid(2)
    // run: async-signal-safe, no allocation. The cgroup move comes first, while still root.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(ATTACKER) != 0
                || libc::setuid(ATTACKER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("run the attacker");
    drop(procs);
    out
}

/// Gives a cgroup directory to the attacker, the way systemd delegates `user@UID.service`.
fn delegate(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for f in [
        "",
        "cgroup.procs",
        "cgroup.threads",
        "cgroup.subtree_control",
    ] {
        std::os::unix::fs::chown(dir.join(f), Some(ATTACKER), Some(ATTACKER)).unwrap();
    }
}

/// A non-root user with a delegated cgroup subtree builds the victim pod's kubelet-shaped
/// path, moves itself there and connects: the node refuses it (before the fix it got the
/// victim's identity and database user). Also a directory below the kubelet root that is
/// not root's (a delegation inside kubepods) carries no pod identity.
#[test]
fn hardening_01_delegated_cgroup_cannot_take_pod_identity() {
    if !privileged("item 1 (non-root user in a delegated cgroup)") {
        return;
    }
    let s = stack_with(&[("team-a", "api-0", "api")], 1);
    let k = s.kernel.as_ref().unwrap();
    let victim = &k.pods[0];
    let conn = conninfo(&s, "api");
    // The victim itself gets in: the stack works and this is the identity at stake.
    let o = victim
        .command("psql")
        .args([&conn, "-XAtc", "select current_user"])
        .output()
        .unwrap();
    assert_eq!(common::stdout(&o), "api");

    let uid_ = victim.uid.replace('-', "_");
    let pod_path = format!(
        "kubepods-burstable-pod{uid_}.slice/cri-containerd-{}.scope",
        victim.container_id
    );
    let script = "mkdir -p \"$D\" && echo $$ > \"$D/cgroup.procs\" && exec psql \"$CONN\" -XAtc 'select current_user'";

    // 1. user@1000.service, outside the kubelet's root.
    let service = k
        .tree
        .root
        .join("user.slice/user-1000.slice/user@1000.service");
    delegate(&service);
    let target = service.join("app.slice").join(&pod_path);
    let o = as_attacker(
        &service,
        &format!("D={}; {script}", target.display()),
        &conn,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "the attacker got in as: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(target.is_dir(), "the attacker's cgroup was not made: {err}");
    assert!(
        err.contains("cannot identify the workload")
            && err.contains("outside the kubelet's cgroup roots"),
        "{err}"
    );

    // 2. Inside the kubelet's root, through a directory the attacker owns.
    let qos = k
        .tree
        .root
        .join(gateway::harness::pods::KUBEPODS_SLICE)
        .join("kubepods-besteffort.slice");
    delegate(&qos);
    let target = qos.join(pod_path.replace("burstable", "besteffort"));
    let o = as_attacker(&qos, &format!("D={}; {script}", target.display()), &conn);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the attacker got in through kubepods");
    assert!(
        err.contains("cannot identify the workload") && err.contains("not root"),
        "{err}"
    );
}

// ------------------------------------------------------------------------------------------
// Item 9

/// A TCP relay that holds each new connection `delay` before connecting it to `to`: the CA
/// service, answering late.
fn slow_relay(to: SocketAddr, delay: Duration) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let Ok(up) = TcpStream::connect(to) else {
                    return;
                };
                let (mut c2, mut up2) = (c.try_clone().unwrap(), up.try_clone().unwrap());
                let t = std::thread::spawn(move || std::io::copy(&mut c2, &mut up2));
                let (mut c, mut up) = (c, up);
                let _ = std::io::copy(&mut up, &mut c);
                let _ = c.shutdown(std::net::Shutdown::Both);
                let _ = t.join();
            });
        }
    });
    addr
}

/// 200 concurrent connects from a brand-new pod while the CA takes 2 s to answer: one CA
/// request for the new identity (single flight; before the fix one per connection), one
/// cgroup walk, all 200 served, and another pod's sessions on the same (only) data-plane
/// thread keep their latency meanwhile.
#[test]
fn hardening_09_new_pod_burst_with_slow_ca_keeps_other_pods_latency() {
    if !privileged("item 9 (burst from a new pod, slow CA)") {
        return;
    }
    let mut s = stack_with(&[("team-a", "api-0", "api"), ("intruder", "x-0", "x")], 1);
    s.ca_addr = slow_relay(s.ca_addr, Duration::from_secs(2));
    s.kill_node();
    s.start_node().expect("node behind the slow CA");
    let k = s.kernel.as_ref().unwrap();
    let (old, new) = (&k.pods[0], &k.pods[1]);
    // The old pod's certificate is cached (its first session waits for the slow CA).
    let conn = conninfo(&s, "api");
    let o = old
        .command("psql")
        .args([&conn, "-XAtc", "select 1"])
        .output()
        .unwrap();
    assert_eq!(common::stdout(&o), "1");
    let before = scrape(s.node_admin);
    let fetched = metric(&before, "gateway_node_certificates_fetched_total").unwrap();
    let walks = metric(&before, "gateway_node_cgroup_walks_total").expect("walks metric");

    // The new pod: policy denies `intruder`, so each connection takes the node's whole path
    // (identity, certificate, tunnel, preamble) and ends at the proxy, without a server
    // session of its own.
    let exe = std::env::current_exe().unwrap();
    let t0 = Instant::now();
    let mut burst = ChildGuard(
        helper_command(
            Some(new.command(exe.to_str().unwrap())),
            &format!("burst {} 200 x", k.db_addr),
        )
        .spawn()
        .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut probe = ChildGuard(
        helper_command(
            Some(old.command(exe.to_str().unwrap())),
            &format!("probe 10 {conn}"),
        )
        .spawn()
        .unwrap(),
    );
    let slowest: u64 = result_line(&mut probe.0).parse().unwrap();
    eprintln!(
        "the other pod's sessions were done {:?} after the burst began",
        t0.elapsed()
    );
    let denied: usize = result_line(&mut burst.0).parse().unwrap();
    assert_eq!(
        denied, 200,
        "every burst connection reached the proxy's verdict"
    );
    assert!(
        slowest < 1000,
        "another pod's session took {slowest} ms during the burst"
    );
    let after = scrape(s.node_admin);
    assert_eq!(
        metric(&after, "gateway_node_certificates_fetched_total").unwrap() - fetched,
        1.0,
        "one CA request for the new pod's identity"
    );
    let walked = metric(&after, "gateway_node_cgroup_walks_total").unwrap() - walks;
    assert!(walked <= 2.0, "{walked} cgroup walks for one new pod");
}

// ------------------------------------------------------------------------------------------
// Item 10

/// A cgroup subtree with two cgroups, a network namespace whose portless bridges hold the
/// "database" and agent addresses, and the kernel programs attached to the subtree; all
/// removed on drop.
struct KernelEnv {
    netns: String,
    pin_dir: PathBuf,
    tree: CgroupTree,
    _netns: Netns,
}

impl Drop for KernelEnv {
    fn drop(&mut self) {
        if let Err(e) = ebpf::uninstall(&self.pin_dir) {
            eprintln!("cleanup: uninstall {}: {e}", self.pin_dir.display());
        }
    }
}

const AGENT: &str = "169.254.77.1:15432";

fn ip(args: &[&str]) {
    gateway::harness::pods::run("ip", args).expect("ip");
}

/// Binds a listener inside the namespace (a short-lived thread enters it for the bind).
fn listen_in(netns: &str, addr: SocketAddr) -> TcpListener {
    let ns = File::open(format!("/run/netns/{netns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd; affects only this short-lived thread.
        assert_eq!(
            unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let l = TcpListener::bind(addr).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .unwrap()
}

/// The helper in `cgroup` and the namespace (cgroup first: a socket belongs to the cgroup
/// of the process that makes it).
fn helper_in(env: &KernelEnv, cgroup: &Path, mode: &str) -> ChildGuard {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .unwrap();
    let ns = File::open(format!("/run/netns/{}", env.netns)).unwrap();
    let (procs_fd, ns_fd) = (procs.as_raw_fd(), ns.as_raw_fd());
    let mut cmd = helper_command(None, mode);
    // SAFETY: only write(2) and setns(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1
                || libc::setns(ns_fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop((procs, ns));
    ChildGuard(child)
}

/// One cgroup opens connections until its budget is spent: its next connects fail with
/// EPERM, counted; another cgroup still connects and its record is there for the agent;
/// the maps have the configured size; and the budget comes back when the flooder closes.
#[test]
fn hardening_10_flooding_cgroup_does_not_evict_other_pods() {
    let missing = if !gateway::harness::is_root() {
        Some("not root".to_owned())
    } else {
        ebpf::ensure_bpffs(Path::new(ebpf::BPFFS_ROOT))
            .err()
            .map(|e| e.to_string())
    };
    if !gateway::harness::can_run_privileged("item 10 (eBPF budget)", missing) {
        return;
    }
    let tag = format!("dbgw-test-h10-{}", std::process::id());
    let cgroup2 = gateway::identity::cgroup::cgroup2_mount().unwrap();
    let env = KernelEnv {
        netns: tag.clone(),
        pin_dir: Path::new(ebpf::BPFFS_ROOT).join(&tag),
        tree: CgroupTree::create(&cgroup2, &tag).unwrap(),
        _netns: Netns::create(&tag).unwrap(),
    };
    let flooder = env.tree.mkdir("flood").unwrap();
    let calm = env.tree.mkdir("calm").unwrap();
    let db: SocketAddr = "10.79.0.7:5432".parse().unwrap();
    let ns = env.netns.as_str();
    ip(&["-n", ns, "link", "set", "lo", "up"]);
    for (dev, a) in [("dbgwdb0", "10.79.0.7/32"), ("dbgwag0", "169.254.77.1/32")] {
        ip(&["-n", ns, "link", "add", dev, "type", "bridge"]);
        ip(&["-n", ns, "addr", "add", a, "dev", dev]);
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    let agent = listen_in(ns, AGENT.parse().unwrap());
    let budget = 8;
    let cfg = InterceptConfig {
        max_connections: 256,
        connections_per_cgroup: budget,
        ..InterceptConfig::new(AGENT.parse().unwrap())
    };
    let mut i = Interception::install_or_adopt(&env.tree.root, &env.pin_dir, &cfg).unwrap();
    i.set_serving(true).unwrap();
    // Sized from the configuration, not the object's 65 536.
    for m in ebpf::maps::CONNECTION_MAPS {
        let info = aya::maps::MapInfo::from_pin(env.pin_dir.join(m)).unwrap();
        assert_eq!(info.max_entries(), 256, "{m}");
    }

    let mut flood = helper_in(&env, &flooder, &format!("flood {db} 20"));
    let line = result_line(&mut flood.0);
    assert_eq!(line, format!("{budget} 12 0"), "held, EPERM, other");
    assert_eq!(i.refused_total().unwrap(), 12);

    // Another cgroup still connects, and the agent finds its record.
    let mut c = helper_in(&env, &calm, &format!("flood {db} 1"));
    assert_eq!(result_line(&mut c.0), "1 0 0");
    let calm_id = gateway::identity::cgroup::id_of(&calm).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut found = false;
    while !found && Instant::now() < deadline {
        match agent.accept() {
            Ok((_, peer)) => {
                let rec = i
                    .lookup(peer)
                    .unwrap()
                    .expect("every accepted peer has a record");
                found = rec.cgroup_id == calm_id;
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    assert!(found, "the calm cgroup's connection or record is missing");

    // The flooder's connections close: its budget comes back.
    drop(flood);
    let mut again = helper_in(&env, &flooder, &format!("flood {db} 1"));
    assert_eq!(result_line(&mut again.0), "1 0 0");
    assert_eq!(i.refused_total().unwrap(), 12);
}

// ------------------------------------------------------------------------------------------
// The agent's own cgroup in a private cgroup namespace (issue 22)

/// The DaemonSet's agent runs in a private cgroup namespace, where `/proc/self/cgroup` says
/// `0::/`: the cgroup it exempts from interception must still be its own (found through
/// `cgroup.procs`), not the hierarchy's root (before the fix: the root, so its own
/// connections were intercepted and every process in the root cgroup was not).
#[test]
fn agent_in_a_private_cgroup_namespace_exempts_its_own_cgroup() {
    if !privileged("the agent's own cgroup in a private cgroup namespace") {
        return;
    }
    let cgroup2 = gateway::identity::cgroup::cgroup2_mount().unwrap();
    let tree = CgroupTree::create(&cgroup2, &format!("dbgw-ownns-{}", std::process::id())).unwrap();
    let agent = tree.mkdir("agent.scope").unwrap();
    let procs = File::options()
        .write(true)
        .open(agent.join("cgroup.procs"))
        .unwrap();
    let fd = procs.as_raw_fd();
    let mut cmd = helper_command(None, "own-cgroup");
    // SAFETY: between fork and exec only write(2) and unshare(2) run: async-signal-safe, no
    // allocation. The move comes first, so the new namespace's root is `agent.scope`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(fd, b"0".as_ptr().cast(), 1) != 1
                || libc::unshare(libc::CLONE_NEWCGROUP) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(procs);
    let line = result_line(&mut child);
    assert!(child.wait().unwrap().success());
    let (entry, own) = line.split_once(' ').unwrap();
    assert_eq!(
        entry, "0::/",
        "the helper is not in a private cgroup namespace"
    );
    assert_eq!(PathBuf::from(own), agent);
}
