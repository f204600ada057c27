//! What to intercept and what the kernel reports back: [`InterceptConfig`] (checked, and
//! encoded as the value of the `dbgw_config` map) and [`OrigDst`] (decoded from the records
//! the hooks keep per connection).

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::maps::{self, Config, OrigDstValue, cidr_key, ip_from16};
use super::{DEFAULT_CONNECTIONS_PER_CGROUP, DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, EbpfError};

/// What to intercept and where to send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterceptConfig {
    /// The agent's IPv4 listen address (e.g. 169.254.77.1:15432): IPv4 and IPv4-mapped
    /// destinations are redirected here.
    pub agent_v4: SocketAddrV4,
    /// The agent's IPv6 listen address; without one, native IPv6 destinations go direct.
    pub agent_v6: Option<SocketAddrV6>,
    /// Destination ports intercepted for any address.
    pub ports: Vec<u16>,
    /// Extra `(network, prefix length, port)` rules.
    pub cidrs: Vec<(IpAddr, u8, u16)>,
    /// cgroup v2 id of the agent (see [`super::cgroup_id`]); its connections are never
    /// redirected. 0 = none.
    pub agent_cgroup_id: u64,
    /// SO_MARK the agent sets on its own sockets, also never redirected. 0 = none.
    pub agent_mark: u32,
    /// While not serving: true lets connections go direct, false fails them with EPERM.
    pub fail_open: bool,
    /// Entries of each connection map (`maps::CONNECTION_MAPS`), set when they are made.
    pub max_connections: u32,
    /// Open intercepted connections one cgroup may hold; its next connect fails with EPERM
    /// (0 = no limit).
    pub connections_per_cgroup: u32,
}

impl InterceptConfig {
    /// Intercepts port 5432 to `agent_v4`, fail closed, no agent exemptions.
    pub fn new(agent_v4: SocketAddrV4) -> Self {
        Self {
            agent_v4,
            agent_v6: None,
            ports: vec![DEFAULT_PORT],
            cidrs: Vec::new(),
            agent_cgroup_id: 0,
            agent_mark: 0,
            fail_open: false,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connections_per_cgroup: DEFAULT_CONNECTIONS_PER_CGROUP,
        }
    }

    pub(super) fn validate(&self) -> Result<(), EbpfError> {
        let bad = |m: String| Err(EbpfError::Config(m));
        if self.agent_v4.ip().is_unspecified() || self.agent_v4.port() == 0 {
            return bad(format!(
                "agent address {} needs an address and a port",
                self.agent_v4
            ));
        }
        if let Some(v6) = self.agent_v6
            && (v6.ip().is_unspecified() || v6.port() == 0)
        {
            return bad(format!("agent address {v6} needs an address and a port"));
        }
        if self.ports.len() > maps::MAX_PORTS {
            return bad(format!(
                "{} ports, at most {}",
                self.ports.len(),
                maps::MAX_PORTS
            ));
        }
        if self.cidrs.len() > maps::MAX_CIDRS {
            return bad(format!(
                "{} CIDR rules, at most {}",
                self.cidrs.len(),
                maps::MAX_CIDRS
            ));
        }
        if self.max_connections == 0 {
            return bad("max_connections must be more than 0".into());
        }
        if self.connections_per_cgroup > self.max_connections {
            return bad(format!(
                "connections_per_cgroup {} is above max_connections {}",
                self.connections_per_cgroup, self.max_connections
            ));
        }
        if self.ports.contains(&0) || self.cidrs.iter().any(|c| c.2 == 0) {
            return bad("port 0 cannot be intercepted".into());
        }
        for &(ip, prefix, port) in &self.cidrs {
            cidr_key(ip, prefix, port).map_err(|e| EbpfError::Config(e.to_string()))?;
        }
        Ok(())
    }

    pub(super) fn to_map(&self, serving: bool) -> Config {
        let mut flags = 0;
        if serving {
            flags |= maps::FLAG_SERVING;
        }
        if self.fail_open {
            flags |= maps::FLAG_FAIL_OPEN;
        }
        let (agent_ip6, agent_port6) = match self.agent_v6 {
            Some(v6) => {
                flags |= maps::FLAG_AGENT_V6;
                (v6.ip().octets(), v6.port().to_be())
            }
            None => ([0; 16], 0),
        };
        Config {
            agent_ip4: Config::ip4(*self.agent_v4.ip()),
            agent_port4: self.agent_v4.port().to_be(),
            agent_port6,
            agent_ip6,
            agent_cgroup_id: self.agent_cgroup_id,
            agent_mark: self.agent_mark,
            flags,
        }
    }
}

/// What the kernel recorded about an intercepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrigDst {
    /// The destination the application asked for (IPv4-mapped addresses come back as IPv4).
    pub dst: SocketAddr,
    /// cgroup v2 id of the task that called `connect()`.
    pub cgroup_id: u64,
    /// Process id (tgid) of that task.
    pub pid: u32,
    /// Network namespace cookie of the client socket.
    pub netns_cookie: u64,
}

impl From<OrigDstValue> for OrigDst {
    fn from(v: OrigDstValue) -> Self {
        Self {
            dst: SocketAddr::new(ip_from16(v.ip), u16::from_be(v.port)),
            cgroup_id: v.cgroup_id,
            pid: v.tgid,
            netns_cookie: v.netns_cookie,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ebpf::maps::ip16;

    #[test]
    fn config_is_validated_and_encoded() {
        let mut cfg = InterceptConfig::new("169.254.77.1:15432".parse().unwrap());
        cfg.validate().unwrap();
        let m = cfg.to_map(true);
        assert_eq!(m.agent_ip4.to_ne_bytes(), [169, 254, 77, 1]);
        assert_eq!(m.agent_port4.to_ne_bytes(), 15432u16.to_be_bytes());
        assert_eq!(m.flags, maps::FLAG_SERVING);
        cfg.fail_open = true;
        cfg.agent_v6 = Some("[fd00::1]:15432".parse().unwrap());
        let m = cfg.to_map(false);
        assert_eq!(m.flags, maps::FLAG_FAIL_OPEN | maps::FLAG_AGENT_V6);
        assert_eq!(m.agent_ip6[15], 1);

        cfg.cidrs.push(("10.0.0.0".parse().unwrap(), 40, 5432));
        assert!(matches!(cfg.validate(), Err(EbpfError::Config(_))));
        cfg.cidrs.clear();
        cfg.ports.push(0);
        assert!(matches!(cfg.validate(), Err(EbpfError::Config(_))));
        let bad = InterceptConfig::new("0.0.0.0:15432".parse().unwrap());
        assert!(matches!(bad.validate(), Err(EbpfError::Config(_))));
    }

    #[test]
    fn orig_dst_decodes_v4_mapped() {
        let v = OrigDstValue {
            ip: ip16("10.0.3.7".parse().unwrap()),
            port: 5432u16.to_be(),
            tgid: 42,
            cgroup_id: 7,
            ..Default::default()
        };
        let o = OrigDst::from(v);
        assert_eq!(o.dst, "10.0.3.7:5432".parse().unwrap());
        assert_eq!((o.pid, o.cgroup_id), (42, 7));
    }
}
