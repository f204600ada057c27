//! The comparison tunnels: an stunnel client/server pair and an HAProxy client/server pair,
//! each with mutual TLS 1.3 and ECDSA P-256 certificates from the same CA as the gateway.
//!
//! Each end is its own process (as it would be on two machines), so CPU is summed over both.
//! A port clash (another process took the port between our probe and the peer's bind) is
//! retried on fresh ports.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use gateway::harness::{free_port, is_root, stop_children};
use gateway::pki::{self, CertificateAuthority, LeafSpec, SpiffeId};

/// How often a pair is started on fresh ports after a bind failure.
const PORT_ATTEMPTS: u32 = 5;
/// How long a peer may take to listen.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// (certificate PEM, key PEM) for the server end and the client end.
pub struct Pair {
    pub server: (String, String),
    pub client: (String, String),
}

impl Pair {
    /// A server certificate for `localhost`/127.0.0.1 and a client certificate for the
    /// workload `client` (ECDSA P-256, from the workload CA), valid for a day.
    pub fn issue(ca: &CertificateAuthority, client: &SpiffeId) -> Result<Self> {
        let day = Duration::from_secs(24 * 3600);
        let server = ca.issue(
            &LeafSpec::server(vec!["localhost".into()], vec!["127.0.0.1".parse()?]),
            day,
        )?;
        let client = ca.issue(&LeafSpec::workload(client), day)?;
        Ok(Self { server, client })
    }
}

/// The certificate files both peers use.
pub struct Certs {
    ca: PathBuf,
    server_crt: PathBuf,
    server_key: PathBuf,
    client_crt: PathBuf,
    client_key: PathBuf,
    /// HAProxy wants certificate and key in one file.
    server_pem: PathBuf,
    client_pem: PathBuf,
}

impl Certs {
    pub fn write(dir: &Path, ca: &CertificateAuthority, pair: &Pair) -> Result<Self> {
        let f = |n: &str| dir.join(n);
        let c = Self {
            ca: f("peer-ca.crt"),
            server_crt: f("peer-server.crt"),
            server_key: f("peer-server.key"),
            client_crt: f("peer-client.crt"),
            client_key: f("peer-client.key"),
            server_pem: f("peer-server.pem"),
            client_pem: f("peer-client.pem"),
        };
        pki::write_public(&c.ca, ca.cert_pem())?;
        pki::write_public(&c.server_crt, &pair.server.0)?;
        pki::write_secret(&c.server_key, &pair.server.1)?;
        pki::write_public(&c.client_crt, &pair.client.0)?;
        pki::write_secret(&c.client_key, &pair.client.1)?;
        pki::write_secret(
            &c.server_pem,
            &format!("{}{}", pair.server.0, pair.server.1),
        )?;
        pki::write_secret(
            &c.client_pem,
            &format!("{}{}", pair.client.0, pair.client.1),
        )?;
        Ok(c)
    }
}

/// A running pair; dropping it stops both processes.
pub struct Peer {
    /// Where clients connect (the client end's plain-TCP listeners), one per target in the
    /// order given.
    pub addrs: Vec<SocketAddr>,
    children: Vec<Child>,
}

impl Peer {
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        stop_children(&mut self.children, Duration::from_secs(3));
    }
}

/// Finds `program` on PATH or in the sbin directories; as root, installs `package` with
/// apt-get when missing; otherwise fails naming the package.
pub fn require(program: &str, package: &str) -> Result<PathBuf> {
    if let Some(p) = find(program) {
        return Ok(p);
    }
    if is_root() {
        eprintln!("bench: {program} missing, installing the Debian package {package}");
        let ok = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        if ok && let Some(p) = find(program) {
            return Ok(p);
        }
    }
    bail!(
        "{program} not found and could not be installed: install the Debian package {package} \
         (apt-get install {package}, or run cargo xtask setup as root)"
    )
}

fn find(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// An stunnel pair with one service per target (each its own port pair).
pub fn stunnel_pair(dir: &Path, certs: &Certs, targets: &[SocketAddr]) -> Result<Peer> {
    let bin = require("stunnel4", "stunnel4")?;
    start_pair("stunnel", targets.len(), &mut free_port, |fronts, backs| {
        let common = |log: &str| {
            format!(
                "foreground = yes\npid =\nsyslog = no\ndebug = 4\noutput = {}\n\
                 socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n",
                dir.join(log).display()
            )
        };
        let mut server = common("stunnel-server.log");
        let mut client = common("stunnel-client.log");
        for (i, target) in targets.iter().enumerate() {
            let (front, back) = (fronts[i], backs[i]);
            writeln!(
                server,
                "[svc{i}]\naccept = {back}\nconnect = {target}\ncert = {}\nkey = {}\nCAfile = {}\n\
                 verifyChain = yes\nrequireCert = yes\nsslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3",
                certs.server_crt.display(),
                certs.server_key.display(),
                certs.ca.display()
            )?;
            writeln!(
                client,
                "[svc{i}]\nclient = yes\naccept = {front}\nconnect = {back}\ncert = {}\nkey = {}\n\
                 CAfile = {}\nverifyChain = yes\ncheckHost = localhost\n\
                 sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3",
                certs.client_crt.display(),
                certs.client_key.display(),
                certs.ca.display()
            )?;
        }
        write_pair(dir, "stunnel", "conf", [server, client], |cfg| {
            let mut c = Command::new(&bin);
            c.arg(cfg);
            c
        })
    })
}

/// An HAProxy pair with one frontend/backend per target.
pub fn haproxy_pair(
    dir: &Path,
    certs: &Certs,
    targets: &[SocketAddr],
    threads: u16,
) -> Result<Peer> {
    haproxy_pair_on(dir, certs, targets, threads, &mut free_port)
}

fn haproxy_pair_on(
    dir: &Path,
    certs: &Certs,
    targets: &[SocketAddr],
    threads: u16,
    ports: &mut dyn FnMut() -> Result<u16>,
) -> Result<Peer> {
    let bin = require("haproxy", "haproxy")?;
    start_pair("haproxy", targets.len(), ports, |fronts, backs| {
        // As many connections as the open-files limit allows (HAProxy checks maxconn
        // against it at start and needs two descriptors per connection).
        let maxconn = crate::echo::max_relayed_connections();
        let common = format!(
            "global\n  maxconn {maxconn}\n  nbthread {threads}\n\
             defaults\n  mode tcp\n  maxconn {maxconn}\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        );
        let mut server = common.clone();
        let mut client = common;
        for (i, target) in targets.iter().enumerate() {
            let (front, back) = (fronts[i], backs[i]);
            writeln!(
                server,
                "frontend tls_in{i}\n  bind {back} ssl crt {} ca-file {} verify required ssl-min-ver TLSv1.3\n  \
                 default_backend plain{i}\nbackend plain{i}\n  server s{i} {target}",
                certs.server_pem.display(),
                certs.ca.display()
            )?;
            writeln!(
                client,
                "frontend plain_in{i}\n  bind {front}\n  default_backend tls_out{i}\nbackend tls_out{i}\n  \
                 server peer{i} {back} ssl crt {} ca-file {} verify required verifyhost localhost sni str(localhost) ssl-min-ver TLSv1.3",
                certs.client_pem.display(),
                certs.ca.display()
            )?;
        }
        write_pair(dir, "haproxy", "cfg", [server, client], |cfg| {
            let mut c = Command::new(&bin);
            c.arg("-db").arg("-f").arg(cfg);
            c
        })
    })
}

/// Writes the server's and the client's configuration (`<what>-server.<ext>`,
/// `<what>-client.<ext>` in `dir`) and returns the command `command` makes for each, with the
/// log it writes (`<what>-server.log`, `<what>-client.log`).
fn write_pair(
    dir: &Path,
    what: &str,
    ext: &str,
    [server, client]: [String; 2],
    command: impl Fn(&Path) -> Command,
) -> Result<[(Command, PathBuf); 2]> {
    let side = |side: &str, text: String| -> Result<(Command, PathBuf)> {
        let cfg = dir.join(format!("{what}-{side}.{ext}"));
        std::fs::write(&cfg, text)?;
        Ok((command(&cfg), dir.join(format!("{what}-{side}.log"))))
    };
    Ok([side("server", server)?, side("client", client)?])
}

/// Starts a pair on fresh ports from `ports`: `make(fronts, backs)` (`n` of each) writes
/// both configurations and returns (server command, its log) and (client command, its log).
fn start_pair(
    what: &str,
    n: usize,
    ports: &mut dyn FnMut() -> Result<u16>,
    make: impl Fn(&[SocketAddr], &[SocketAddr]) -> Result<[(Command, PathBuf); 2]>,
) -> Result<Peer> {
    let mut last = String::new();
    let mut fresh = || -> Result<Vec<SocketAddr>> {
        (0..n)
            .map(|_| Ok(SocketAddr::from(([127, 0, 0, 1], ports()?))))
            .collect()
    };
    for _ in 0..PORT_ATTEMPTS {
        let fronts = fresh()?;
        let backs = fresh()?;
        let [server, client] = make(&fronts, &backs)?;
        let mut peer = Peer {
            addrs: fronts.clone(),
            children: Vec::new(),
        };
        let mut ok = true;
        // Every listener of an end must be up (each is a fresh port that may clash).
        for ((mut cmd, log), addrs) in [(server, &backs), (client, &fronts)] {
            let out = std::fs::File::create(&log)?;
            let child = cmd
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("failed to start {what}"))?;
            peer.children.push(child);
            for &addr in addrs {
                if let Err(e) =
                    wait_listening(peer.children.last_mut().expect("pushed"), addr, &log)
                {
                    last = format!("{e:#}");
                    ok = false;
                    break;
                }
            }
            if !ok {
                break;
            }
        }
        if ok {
            return Ok(peer);
        }
        if !last.contains("in use") && !last.contains("bind") {
            bail!("{what} did not start: {last}");
        }
        // Dropping `peer` stops what did start; try other ports.
    }
    bail!("{what} could not bind free ports in {PORT_ATTEMPTS} attempts: {last}")
}

fn wait_listening(child: &mut Child, addr: SocketAddr, log: &Path) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if listens(child.id(), addr) {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "exited ({status}) before listening on {addr}; {} says:\n{}",
                log.display(),
                std::fs::read_to_string(log).unwrap_or_default().trim_end()
            );
        }
        if Instant::now() > deadline {
            bail!("not listening on {addr} after {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` holds a listening TCP socket on `addr` (an IPv4 address in this
/// network namespace). A connect probe cannot tell: it also succeeds when another process
/// holds the port and the peer is about to fail its bind.
fn listens(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(v4) = addr else {
        return false;
    };
    // /proc/net/tcp writes the address as the in-memory u32 in hex, the port big-endian.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(v4.ip().octets()),
        v4.port()
    );
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Fields: sl, local, remote, state (0A = LISTEN), …, inode (10th).
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn a_missing_program_is_named_with_its_package() {
        let e = require("dbgw-no-such-program", "dbgw-no-such-package")
            .expect_err("a program that exists nowhere");
        let msg = format!("{e:#}");
        assert!(msg.contains("dbgw-no-such-program"), "{msg}");
        assert!(
            msg.contains("apt-get install dbgw-no-such-package"),
            "{msg}"
        );
    }

    #[test]
    fn listens_tells_our_listener_from_another_process() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(listens(std::process::id(), addr));
        // PID 1 never holds our socket.
        assert!(!listens(1, addr));
        drop(l);
        assert!(!listens(std::process::id(), addr));
    }

    /// The client end's first port is taken by another listener (this test): the pair
    /// must notice that HAProxy failed to bind (a connect would succeed against our
    /// listener), stop the server end it already started, and come up on fresh ports.
    #[test]
    fn haproxy_pair_retries_a_port_clash_on_fresh_ports() {
        if require("haproxy", "haproxy").is_err() && !gateway::harness::in_ci() {
            eprintln!("skipped: haproxy is not installed (cargo xtask setup installs it)");
            return;
        }
        let dir = std::env::temp_dir().join(format!("dbgw-bench-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_dir = dir.join("ca");
        pki::init_ca(&ca_dir, gateway::harness::DEMO_TRUST_DOMAIN).unwrap();
        let ca = CertificateAuthority::load(
            &ca_dir.join(pki::WORKLOAD_CA_CERT),
            &ca_dir.join(pki::WORKLOAD_CA_KEY),
        )
        .unwrap();
        let certs = Certs::write(
            &dir,
            &ca,
            &Pair::issue(
                &ca,
                &SpiffeId::new(gateway::harness::DEMO_TRUST_DOMAIN, "bench", "bench"),
            )
            .unwrap(),
        )
        .unwrap();

        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_port = taken.local_addr().unwrap().port();
        let mut handed = Vec::new();
        let mut ports = || -> Result<u16> {
            // The first port asked for is the client end's front: the taken one.
            let p = if handed.is_empty() {
                taken_port
            } else {
                free_port()?
            };
            handed.push(p);
            Ok(p)
        };
        let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let result = haproxy_pair_on(&dir, &certs, &[target], 1, &mut ports);
        let peer = result.unwrap_or_else(|e| panic!("{e:#}"));
        // Two attempts, each asking for a front and a back port.
        assert_eq!(handed.len(), 4, "ports handed out: {handed:?}");
        assert_ne!(peer.addrs[0].port(), taken_port);
        assert_eq!(peer.children.len(), 2);
        assert!(listens(peer.children[1].id(), peer.addrs[0]));
        let log = std::fs::read_to_string(dir.join("haproxy-client.log")).unwrap_or_default();
        let pids = peer.pids();
        drop(peer);
        for pid in pids {
            assert!(
                !std::path::Path::new(&format!("/proc/{pid}")).exists(),
                "haproxy {pid} still running after the pair was dropped; client log:\n{log}"
            );
        }
        drop(taken);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
