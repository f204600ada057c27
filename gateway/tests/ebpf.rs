//! The kernel path for real: programs from gateway-ebpf attached to a cgroup this test makes,
//! clients in that cgroup inside a network namespace this test makes.
//!
//! Needs root (CAP_BPF, CAP_SYS_ADMIN, CAP_NET_ADMIN), cgroup v2 and `ip`. Without them it
//! skips with a message, except under `CI=true`, where it fails.
//!
//! Every address used (the "database" 10.77.x.7 and the agent's 169.254.77.1) lives on a
//! bridge with no ports inside the test's own network namespace, so a failed interception can
//! never send a packet anywhere. Clients are this test binary re-executed as `child_helper`:
//! it joins the test cgroup (before it creates any socket) and the namespace between fork and
//! exec, connects, and prints one `DBGW_RESULT` line.

use std::{
    fs::File,
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use gateway::ebpf::{self, InterceptConfig, Interception};
use gateway::harness::pods::{CgroupTree, Netns};

const AGENT: &str = "169.254.77.1:15432";
const AGENT6: &str = "[fd00:dbf::1]:15432";
const DB6: &str = "[fd00:db::7]:5432";
const AGENT_MARK: u32 = 0x6462_7777;
const CHILD_ENV: &str = "DBGW_CHILD";
const RESULT: &str = "DBGW_RESULT";
const WAIT: Duration = Duration::from_secs(10);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Everything the test made, removed on drop (also when the test fails half-way): the pins
/// by `Drop`, then the cgroups (processes left inside are killed) and the namespace by the
/// harness's guards.
struct Env {
    netns: String,
    cgroup: PathBuf,
    pin_dir: PathBuf,
    _cgroups: CgroupTree,
    _netns: Netns,
}

impl Env {
    fn pod(&self) -> PathBuf {
        self.cgroup.join("pod")
    }
    fn agent(&self) -> PathBuf {
        self.cgroup.join("agent")
    }
    fn netns_file(&self) -> File {
        File::open(format!("/run/netns/{}", self.netns)).expect("open netns")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Err(e) = ebpf::uninstall(&self.pin_dir) {
            eprintln!("cleanup: uninstall {}: {e}", self.pin_dir.display());
        }
    }
}

/// Kills and reaps a client that is still running when a check fails.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed: {status}");
}

/// Why this test cannot run here, if it cannot.
fn missing_privileges() -> Option<String> {
    if !gateway::harness::is_root() {
        return Some("not root".into());
    }
    if let Err(e) = gateway::identity::cgroup::cgroup2_mount() {
        return Some(e.to_string());
    }
    if let Err(e) = ebpf::ensure_bpffs(Path::new(ebpf::BPFFS_ROOT)) {
        return Some(e.to_string());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("no `ip` command (iproute2)".into());
    }
    None
}

fn setup() -> Option<(Env, Addrs)> {
    if !gateway::harness::can_run_privileged(
        "the eBPF test (needs root, cgroup v2, bpffs, iproute2)",
        missing_privileges(),
    ) {
        return None;
    }
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tag = format!("dbgw-test-{pid}-{n}");
    let cgroups = CgroupTree::create(&gateway::identity::cgroup::cgroup2_mount().unwrap(), &tag)
        .expect("test cgroup");
    let env = Env {
        netns: tag.clone(),
        cgroup: cgroups.root.clone(),
        pin_dir: Path::new(ebpf::BPFFS_ROOT).join(&tag),
        _netns: Netns::create(&tag).expect("test namespace"),
        _cgroups: cgroups,
    };
    std::fs::create_dir(env.pod()).expect("create pod cgroup");
    std::fs::create_dir(env.agent()).expect("create agent cgroup");

    // The database and the agent each on a bridge with no ports, in the test's namespace.
    let third = (pid % 200) as u8;
    let addrs = Addrs {
        db: format!("10.77.{third}.7").parse().unwrap(),
        db_cidr: format!("10.78.{third}.9").parse().unwrap(),
    };
    let ns = env.netns.as_str();
    ip(&["-n", ns, "link", "set", "lo", "up"]);
    for (dev, addrs) in [
        (
            "dbgwdb0",
            vec![format!("{}/32", addrs.db), format!("{}/32", addrs.db_cidr)],
        ),
        ("dbgwag0", vec!["169.254.77.1/32".to_string()]),
    ] {
        ip(&["-n", ns, "link", "add", dev, "type", "bridge"]);
        for a in &addrs {
            ip(&["-n", ns, "addr", "add", a, "dev", dev]);
        }
        ip(&["-n", ns, "link", "set", dev, "up"]);
    }
    // IPv6 from the ULA range, `nodad` so the addresses are usable at once.
    for (dev, a) in [
        ("dbgwdb0", "fd00:db::7/128"),
        ("dbgwag0", "fd00:dbf::1/128"),
    ] {
        ip(&["-n", ns, "addr", "add", a, "dev", dev, "nodad"]);
    }
    Some((env, addrs))
}

struct Addrs {
    db: std::net::Ipv4Addr,
    db_cidr: std::net::Ipv4Addr,
}

/// Binds a listener inside the test's namespace (a thread enters it just for the bind; the
/// socket stays in the namespace it was made in).
fn listen_in(env: &Env, addr: SocketAddr) -> TcpListener {
    let ns = env.netns_file();
    std::thread::spawn(move || {
        // SAFETY: setns on a namespace fd; affects only this short-lived thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let l = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        l.set_nonblocking(true).unwrap();
        l
    })
    .join()
    .expect("listener thread")
}

/// A client that connects to `dst` from `cgroup`, inside the namespace.
fn client(env: &Env, cgroup: &Path, dst: SocketAddr, mark: u32) -> ChildGuard {
    let procs = File::options()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .expect("open cgroup.procs");
    let ns = env.netns_file();
    let (procs_fd, ns_fd) = (procs.as_raw_fd(), ns.as_raw_fd());
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["child_helper", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{dst} {mark}"))
        .stdout(Stdio::piped());
    // SAFETY: between fork and exec only write(2) and setns(2) run: async-signal-safe, no
    // allocation. The cgroup move comes first: a socket belongs to the cgroup of the process
    // that creates it, and the namespace is entered before any socket exists.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setns(ns_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().expect("spawn client");
    drop((procs, ns));
    ChildGuard(child)
}

/// What the client saw.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// Connected: its local address and what getpeername() returned.
    Connected { local: SocketAddr, peer: SocketAddr },
    /// connect() failed with this errno.
    Failed(i32),
}

fn outcome(child: &mut ChildGuard) -> Outcome {
    let mut out = BufReader::new(child.0.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        if out.read_line(&mut line).expect("client output") == 0 {
            panic!("client printed no {RESULT} line");
        }
        // libtest prints "test child_helper ... " in front of it on the same line.
        let Some(at) = line.find(RESULT) else {
            continue;
        };
        let f: Vec<&str> = line[at + RESULT.len()..].split_whitespace().collect();
        let seen = match f[..] {
            ["ok", local, peer] => Outcome::Connected {
                local: local.parse().unwrap(),
                peer: peer.parse().unwrap(),
            },
            ["err", errno] => Outcome::Failed(errno.parse().unwrap()),
            _ => panic!("bad client line {line:?}"),
        };
        // Keep draining: libtest's own closing lines must not hit a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        return seen;
    }
}

fn accept_within(l: &TcpListener) -> (TcpStream, SocketAddr) {
    let deadline = Instant::now() + WAIT;
    loop {
        match l.accept() {
            Ok(c) => return c,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("nothing arrived at {:?}: {e}", l.local_addr()),
        }
    }
}

fn assert_idle(listeners: &[&TcpListener]) {
    for l in listeners {
        if let Ok((_, from)) = l.accept() {
            panic!("unexpected connection from {from} at {:?}", l.local_addr());
        }
    }
}

struct Listeners {
    agent: TcpListener,
    agent6: TcpListener,
    db: TcpListener,
    db_5433: TcpListener,
}

impl Listeners {
    fn all(&self) -> [&TcpListener; 4] {
        [&self.agent, &self.agent6, &self.db, &self.db_5433]
    }
}

/// Connects from `cgroup` to `dst`, expects the connection at `at`; returns what the client
/// saw and the peer address `at` accepted from. `check` runs while the connection is open.
fn expect_at(
    env: &Env,
    ls: &Listeners,
    cgroup: &Path,
    dst: SocketAddr,
    mark: u32,
    at: &TcpListener,
    check: impl FnOnce(SocketAddr),
) -> Outcome {
    let mut child = client(env, cgroup, dst, mark);
    let (stream, from) = accept_within(at);
    let seen = outcome(&mut child);
    check(from);
    drop(stream);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "client failed: {status}");
    assert_idle(&ls.all());
    seen
}

fn expect_failure(env: &Env, ls: &Listeners, cgroup: &Path, dst: SocketAddr) -> i32 {
    let mut child = client(env, cgroup, dst, 0);
    let seen = outcome(&mut child);
    let status = child.0.wait().unwrap();
    assert!(status.success(), "client failed: {status}");
    assert_idle(&ls.all());
    match seen {
        Outcome::Failed(errno) => errno,
        other => panic!("connect to {dst} should have failed, got {other:?}"),
    }
}

#[test]
fn intercepts_connects_in_cgroup_and_adopts_pins() {
    let Some((env, addrs)) = setup() else {
        return;
    };
    let db: SocketAddr = (addrs.db, 5432).into();
    let db_5433: SocketAddr = (addrs.db, 5433).into();
    let db_cidr: SocketAddr = (addrs.db_cidr, 6000).into();
    let db_6000: SocketAddr = (addrs.db, 6000).into();
    let ls = Listeners {
        agent: listen_in(&env, AGENT.parse().unwrap()),
        db: listen_in(&env, db),
        db_5433: listen_in(&env, db_5433),
        agent6: listen_in(&env, AGENT6.parse().unwrap()),
    };
    let pod_id = ebpf::cgroup_id(&env.pod()).unwrap();

    let mut cfg = InterceptConfig::new(AGENT.parse().unwrap());
    cfg.cidrs = vec![(addrs.db_cidr.into(), 24, 6000)];
    cfg.agent_cgroup_id = ebpf::cgroup_id(&env.agent()).unwrap();
    cfg.agent_mark = AGENT_MARK;
    cfg.agent_v6 = Some(AGENT6.parse().unwrap());
    let mut icpt = Interception::install_or_adopt(&env.cgroup, &env.pin_dir, &cfg).unwrap();
    assert!(!icpt.adopted());

    // Not serving yet, fail closed: refused at connect() with EPERM.
    assert_eq!(expect_failure(&env, &ls, &env.pod(), db), libc::EPERM);
    icpt.set_serving(true).unwrap();

    // Port 5432 lands on the agent; the agent learns the original destination and cgroup;
    // the application still sees the database as its peer.
    let redirected = |icpt: &Interception, dst: SocketAddr| {
        let mut found = None;
        let native_v6 = matches!(dst, SocketAddr::V6(v6) if v6.ip().to_ipv4_mapped().is_none());
        let agent = if native_v6 { &ls.agent6 } else { &ls.agent };
        let seen = expect_at(&env, &ls, &env.pod(), dst, 0, agent, |from| {
            found = icpt.lookup(from).unwrap();
        });
        let found = found.unwrap_or_else(|| panic!("no record for the connection to {dst}"));
        let want_dst = match dst {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(v4.into(), v6.port()),
                None => dst,
            },
            v4 => v4,
        };
        assert_eq!(found.dst, want_dst);
        assert_eq!(found.cgroup_id, pod_id);
        assert_ne!(found.pid, 0);
        assert_ne!(found.netns_cookie, 0);
        match seen {
            Outcome::Connected { peer, .. } => assert_eq!(peer, dst, "getpeername"),
            other => panic!("{other:?}"),
        }
    };
    redirected(&icpt, db);

    // An AF_INET6 socket connecting to the IPv4-mapped address is intercepted too.
    let mapped: SocketAddr = format!("[::ffff:{}]:5432", addrs.db).parse().unwrap();
    redirected(&icpt, mapped);

    // Native IPv6 goes to the agent's IPv6 address.
    redirected(&icpt, DB6.parse().unwrap());

    // The CIDR+port rule matches its network and port only.
    redirected(&icpt, db_cidr);
    assert_eq!(
        expect_failure(&env, &ls, &env.pod(), db_6000),
        libc::ECONNREFUSED
    );

    // Other ports go where they were going.
    let seen = expect_at(&env, &ls, &env.pod(), db_5433, 0, &ls.db_5433, |from| {
        assert_eq!(icpt.lookup(from).unwrap(), None);
    });
    assert!(matches!(seen, Outcome::Connected { peer, .. } if peer == db_5433));

    // The agent's own sockets, by cgroup and by SO_MARK, are never redirected.
    expect_at(&env, &ls, &env.agent(), db, 0, &ls.db, |_| {});
    expect_at(&env, &ls, &env.pod(), db, AGENT_MARK, &ls.db, |_| {});

    // A new agent process adopts the pinned installation (nothing detached in between) and
    // its config: fail open while not serving lets connections go direct.
    drop(icpt);
    cfg.fail_open = true;
    let mut icpt = Interception::install_or_adopt(&env.cgroup, &env.pin_dir, &cfg).unwrap();
    assert!(icpt.adopted());
    expect_at(&env, &ls, &env.pod(), db, 0, &ls.db, |_| {});
    icpt.set_serving(true).unwrap();
    redirected(&icpt, db);

    // Uninstall detaches everything and removes every pin.
    drop(icpt);
    ebpf::uninstall(&env.pin_dir).unwrap();
    assert!(!env.pin_dir.exists(), "pin dir left behind");
    expect_at(&env, &ls, &env.pod(), db, 0, &ls.db, |_| {});
}

/// Not a test: the client the test above runs in its cgroup (see the module docs).
#[test]
fn child_helper() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dst, mark) = spec.split_once(' ').expect("DBGW_CHILD=<addr> <mark>");
    let dst: SocketAddr = dst.parse().unwrap();
    let mark: u32 = mark.parse().unwrap();
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    if mark != 0 {
        sock.set_mark(mark).unwrap();
    }
    let mut out = std::io::stdout();
    match sock.connect_timeout(&dst.into(), WAIT) {
        Ok(()) => {
            let local = sock.local_addr().unwrap().as_socket().unwrap();
            let peer = sock.peer_addr().unwrap().as_socket().unwrap();
            writeln!(out, "{RESULT} ok {local} {peer}").unwrap();
            out.flush().unwrap();
            // Keep the connection open until the test has looked it up and closes it.
            let mut stream: TcpStream = sock.into();
            stream.set_read_timeout(Some(WAIT)).unwrap();
            let _ = stream.read(&mut [0u8; 1]);
        }
        Err(e) => {
            writeln!(out, "{RESULT} err {}", e.raw_os_error().unwrap_or(-1)).unwrap();
            out.flush().unwrap();
        }
    }
}
