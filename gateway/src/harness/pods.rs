//! Demo and test "pods" on one Linux host: a network namespace with a veth pair (or the
//! host network), and a cgroup shaped like the kubelet's systemd-driver layout
//! `…/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
//! cri-containerd-<id>.scope`, under a subtree of the cgroup v2 root that belongs to one
//! run. Every name is unique per run and everything is removed on drop, also on failure.
//!
//! Addresses: the database's "original address" and the agent's link-local address are
//! held by bridges with no ports, so nothing a pod sends can leave the machine; pods reach
//! them through their veth (the host end answers ARP for everything, like Calico).

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The kubelet's cgroup root (systemd driver) inside a [`CgroupTree`]: pods go below it.
pub const KUBEPODS_SLICE: &str = "kubepods.slice";

/// A number unique to this process and call, for kernel object names (≤ 15 characters).
pub fn unique_index() -> u32 {
    (std::process::id() % 1000) * 100 + NEXT.fetch_add(1, Ordering::SeqCst) % 100
}

pub fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("failed to run {cmd} (package iproute2)"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A network interface deleted on drop.
pub struct Link(pub String);

impl Drop for Link {
    fn drop(&mut self) {
        let _ = run("ip", &["link", "del", &self.0]);
    }
}

/// A network namespace deleted on drop.
pub struct Netns(pub String);

impl Netns {
    /// `ip netns add <name>`, deleted again when the guard drops.
    pub fn create(name: &str) -> Result<Self> {
        run("ip", &["netns", "add", name])?;
        Ok(Self(name.to_owned()))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// A bridge with no ports holding one address: a local destination nothing can leave for.
pub fn address_holder(name: &str, addr: Ipv4Addr) -> Result<Link> {
    run("ip", &["link", "add", name, "type", "bridge"])?;
    let link = Link(name.to_owned());
    run("ip", &["addr", "add", &format!("{addr}/32"), "dev", name])?;
    run("ip", &["link", "set", name, "up"])?;
    Ok(link)
}

/// A cgroup directory tree removed on drop (processes still inside are killed first).
pub struct CgroupTree {
    pub root: PathBuf,
}

impl CgroupTree {
    pub fn create(cgroup2: &Path, name: &str) -> Result<Self> {
        let root = cgroup2.join(name);
        std::fs::create_dir_all(&root)
            .with_context(|| format!("failed to create cgroup {}", root.display()))?;
        Ok(Self { root })
    }

    pub fn mkdir(&self, rel: &str) -> Result<PathBuf> {
        let p = self.root.join(rel);
        std::fs::create_dir_all(&p)
            .with_context(|| format!("failed to create cgroup {}", p.display()))?;
        Ok(p)
    }
}

fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path());
            }
        }
    }
    // cgroup.kill (5.14+) ends every process below; rmdir needs an empty cgroup.
    let _ = std::fs::write(dir.join("cgroup.kill"), "1");
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

impl Drop for CgroupTree {
    fn drop(&mut self) {
        remove_cgroup(&self.root);
    }
}

/// One pod: its cgroup (container scope), its UID and container id, and its network.
pub struct Pod {
    pub uid: String,
    pub container_id: String,
    pub cgroup: PathBuf,
    /// `None` for a host-network pod.
    pub netns: Option<Netns>,
    pub ip: Option<Ipv4Addr>,
    _veth: Option<Link>,
}

impl Pod {
    /// Makes the pod's cgroup under `tree` and, unless `host_network`, a namespace `ns`
    /// with address `ip` behind host veth `host_if`.
    pub fn create(
        tree: &CgroupTree,
        index: u32,
        host_network: bool,
        ns: &str,
        host_if: &str,
        ip: Ipv4Addr,
    ) -> Result<Self> {
        let uid = format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            index,
            index % 0xffff,
            index % 0xfff,
            index % 0xfff,
            u64::from(index) * 7919
        );
        let container_id = format!("{:064x}", u128::from(index) * 0x9e37_79b9_7f4a_7c15 + 1);
        let slice_uid = uid.replace('-', "_");
        let cgroup = tree.mkdir(&format!(
            "{KUBEPODS_SLICE}/kubepods-burstable.slice/kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{container_id}.scope"
        ))?;
        if host_network {
            return Ok(Self {
                uid,
                container_id,
                cgroup,
                netns: None,
                ip: None,
                _veth: None,
            });
        }
        let netns = Netns::create(ns)?;
        run(
            "ip",
            &[
                "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        let veth = Link(host_if.to_owned());
        run("ip", &["link", "set", host_if, "up"])?;
        // The host end answers ARP for every address (the pod's gateway and beyond).
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{host_if}/proxy_arp"), "1")?;
        run("ip", &["route", "add", &format!("{ip}/32"), "dev", host_if])?;
        let in_ns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", ns, "ip"];
            a.extend_from_slice(args);
            run("ip", &a)
        };
        in_ns(&["link", "set", "lo", "up"])?;
        in_ns(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        in_ns(&["link", "set", "eth0", "up"])?;
        in_ns(&["route", "add", "default", "dev", "eth0"])?;
        Ok(Self {
            uid,
            container_id,
            cgroup,
            netns: Some(netns),
            ip: Some(ip),
            _veth: Some(veth),
        })
    }

    /// Gives a namespaced pod the IPv6 address `ip` and a default route through its veth;
    /// the host end answers neighbour solicitations for `targets` (proxy NDP), the IPv6
    /// twin of proxy ARP. `nodad`: the addresses are unique by construction.
    pub fn add_ipv6(&self, ip: std::net::Ipv6Addr, targets: &[std::net::Ipv6Addr]) -> Result<()> {
        let (Some(ns), Some(veth)) = (&self.netns, &self._veth) else {
            bail!("a host-network pod has the host's addresses");
        };
        let host_if = veth.0.as_str();
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{host_if}/proxy_ndp"), "1")?;
        // The kernel answers proxied solicitations only on interfaces that forward.
        std::fs::write(format!("/proc/sys/net/ipv6/conf/{host_if}/forwarding"), "1")?;
        for t in targets {
            run(
                "ip",
                &[
                    "-6",
                    "neigh",
                    "add",
                    "proxy",
                    &t.to_string(),
                    "dev",
                    host_if,
                ],
            )?;
        }
        run(
            "ip",
            &["-6", "route", "add", &format!("{ip}/128"), "dev", host_if],
        )?;
        let in_ns = |args: &[&str]| {
            let mut a = vec!["netns", "exec", ns.0.as_str(), "ip", "-6"];
            a.extend_from_slice(args);
            run("ip", &a)
        };
        in_ns(&["addr", "add", &format!("{ip}/128"), "dev", "eth0", "nodad"])?;
        in_ns(&["route", "add", "default", "dev", "eth0"])?;
        Ok(())
    }

    /// A command prefix that runs a program inside the pod: first into its cgroup (so the
    /// kernel attributes its sockets to the pod), then into its network namespace.
    /// `ip netns exec` would remount /sys, so `nsenter` is used instead.
    pub fn command_prefix(&self) -> Vec<String> {
        let procs = self.cgroup.join("cgroup.procs");
        let mut v = vec![
            "sh".to_owned(),
            "-c".to_owned(),
            format!("echo $$ > {} && exec \"$@\"", procs.display()),
            "pod".to_owned(),
        ];
        if let Some(ns) = &self.netns {
            v.push("nsenter".to_owned());
            v.push(format!("--net=/run/netns/{}", ns.0));
            v.push("--".to_owned());
        }
        v
    }

    pub fn command(&self, program: &str) -> Command {
        let prefix = self.command_prefix();
        let mut c = Command::new(&prefix[0]);
        c.args(&prefix[1..]).arg(program);
        c
    }
}
