//! The kernel side of a transparent [`Stack`](super::Stack) (root only): pods in network
//! namespaces and kubelet-shaped cgroups ([`super::pods`]), the database's and the agent's
//! addresses on portless bridges, and the inventory and certificates the CA service and
//! the node use. Names and addresses are unique per stack, so stacks run in parallel.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use super::pods;
use super::spec::{
    AGENT_PORT, CA_SERVER_NAME, DEMO_TRUST_DOMAIN, INVENTORY, NODE_CERT, NODE_KEY, NODE_NAME,
    TransparentSpec,
};
use crate::ebpf::DEFAULT_PORT;
use crate::identity::inventory::InventoryFile;
use crate::pki::{self, CertificateAuthority, LeafSpec};
use crate::pod::HostIdentity;

/// The kernel side of a transparent stack. Field order is drop order: pods (namespaces,
/// veths), then the cgroup tree, then the address bridges.
pub struct Kernel {
    /// The database's "original address" pods dial (held by a bridge, nothing listens).
    pub db_addr: SocketAddr,
    /// Where interception redirects to (the node agent listens here).
    pub agent_addr: SocketAddr,
    /// The database's IPv6 address (with [`TransparentSpec::ipv6`]).
    pub db_addr_v6: Option<SocketAddr>,
    pub agent_addr_v6: Option<SocketAddr>,
    /// The bridge the node agent creates to hold `agent_addr`.
    pub agent_interface: String,
    pub pin_dir: PathBuf,
    /// The kubelet cgroup root of the stack's pods (`/dbgw-up-N/kubepods.slice`), as
    /// `/proc/<pid>/cgroup` shows it: the node accepts pod segments only under it.
    pub kubelet_root: String,
    pub pods: Vec<pods::Pod>,
    /// A cgroup in the attached subtree that is not a pod: "a process outside any pod".
    pub outside: PathBuf,
    pub tree: pods::CgroupTree,
    _bridges: Vec<pods::Link>,
}

impl Kernel {
    /// Pods, cgroups and address bridges unique to this stack, the inventory listing the
    /// pods, and the CA service's and node's certificates, all written to `dir`.
    pub fn create(
        dir: &Path,
        t: &TransparentSpec,
        workload_ca: &CertificateAuthority,
    ) -> Result<Self> {
        let idx = pods::unique_index();
        let (a, b) = ((idx / 250 % 250) as u8, (idx % 250 + 1) as u8);
        let db_ip = std::net::Ipv4Addr::new(10, 200, a, b);
        let agent_ip = std::net::Ipv4Addr::new(169, 254, a, b);
        // The agent creates its own address holder (`agent_interface`); the guard only
        // makes sure it goes away with the stack.
        let bridges = vec![
            pods::address_holder(&format!("dbgwd{idx}"), db_ip)?,
            pods::Link(format!("dbgwa{idx}")),
        ];
        let (hi, lo) = ((idx >> 16) as u16, idx as u16);
        let v6 = t.ipv6.then(|| {
            (
                std::net::Ipv6Addr::new(0xfd00, 0xdb, 0, 0, 0, 0, hi, lo),
                std::net::Ipv6Addr::new(0xfd00, 0xa9, 0, 0, 0, 0, hi, lo),
            )
        });
        if let Some((db6, _)) = v6 {
            pods::run(
                "ip",
                &[
                    "-6",
                    "addr",
                    "add",
                    &format!("{db6}/128"),
                    "dev",
                    &format!("dbgwd{idx}"),
                    "nodad",
                ],
            )?;
        }
        let cgroup2 = crate::identity::cgroup::cgroup2_mount()?;
        let tree_name = format!("dbgw-up-{idx}");
        let tree = pods::CgroupTree::create(&cgroup2, &tree_name)?;
        let outside = tree.mkdir("system.slice/outside.service")?;
        let mut made = Vec::new();
        let mut inventory = InventoryFile {
            host: t.host_identity.as_ref().map(|(ns, sa)| HostIdentity {
                namespace: ns.clone(),
                service_account: sa.clone(),
            }),
            ..InventoryFile::default()
        };
        for (k, p) in t.pods.iter().enumerate() {
            let pod = pods::Pod::create(
                &tree,
                idx * 100 + k as u32,
                p.host_network,
                &format!("dbgw{idx}p{k}"),
                &format!("dbgw{idx}v{k}"),
                std::net::Ipv4Addr::new(10, 201 + k as u8, a, b),
            )?;
            if let (Some((db6, agent6)), false) = (v6, p.host_network) {
                pod.add_ipv6(
                    std::net::Ipv6Addr::new(0xfd00, 0x10 + k as u16, 0, 0, 0, 0, hi, lo),
                    &[db6, agent6],
                )?;
            }
            if !p.unlisted {
                inventory.pods.push(crate::pod::Pod {
                    uid: pod.uid.clone(),
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    service_account: p.service_account.clone(),
                    node: NODE_NAME.into(),
                    labels: Default::default(),
                    host_network: p.host_network,
                    containers: None,
                });
            }
            made.push(pod);
        }
        std::fs::write(dir.join(INVENTORY), serde_norway::to_string(&inventory)?)?;

        let day = Duration::from_secs(24 * 3600);
        let (c, k) =
            workload_ca.issue(&LeafSpec::server(vec![CA_SERVER_NAME.into()], vec![]), day)?;
        pki::write_public(&dir.join("ca-server.crt"), &c)?;
        pki::write_secret(&dir.join("ca-server.key"), &k)?;
        let (c, k) = workload_ca.issue(&LeafSpec::node(DEMO_TRUST_DOMAIN, NODE_NAME), day)?;
        pki::write_public(&dir.join(NODE_CERT), &c)?;
        pki::write_secret(&dir.join(NODE_KEY), &k)?;
        Ok(Kernel {
            db_addr: SocketAddr::from((db_ip, DEFAULT_PORT)),
            agent_addr: SocketAddr::from((agent_ip, AGENT_PORT)),
            db_addr_v6: v6.map(|(db6, _)| SocketAddr::from((db6, DEFAULT_PORT))),
            agent_addr_v6: v6.map(|(_, agent6)| SocketAddr::from((agent6, AGENT_PORT))),
            agent_interface: format!("dbgwa{idx}"),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/dbgw-up-{idx}")),
            kubelet_root: format!("/{tree_name}/{}", pods::KUBEPODS_SLICE),
            pods: made,
            outside,
            tree,
            _bridges: bridges,
        })
    }

    /// A command prefix that runs a program in the `outside` cgroup (host network).
    pub fn outside_command(&self, program: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.outside.display()
            ))
            .arg("outside")
            .arg(program);
        c
    }
}
