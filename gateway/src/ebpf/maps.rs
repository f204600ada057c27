//! `#[repr(C)]` mirrors of the map keys and values in `gateway-ebpf/maps.h`.
//!
//! Keep in sync with `gateway-ebpf/maps.h`: the C header is the source of truth. The tests at
//! the bottom compare every size and field offset here with what `gateway-ebpf/layout.c`
//! prints from the header (build.rs compiles and runs it).
//!
//! Byte order: addresses are 16 bytes in network order, IPv4 stored IPv4-mapped
//! (`::ffff:a.b.c.d`); ports are network order (`u16::to_be`), held in a `u16` whose in-memory
//! bytes are the wire bytes; ids, cookies, marks and flags are host order.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use aya::maps::lpm_trie::Key;

/// Pinned map names (also the file names under the pin directory). A map whose layout changes
/// gets a new name (`dbgw_foo_v2`), never a new layout under the old name.
pub const MAP_CONFIG: &str = "dbgw_config";
pub const MAP_PORTS: &str = "dbgw_ports";
pub const MAP_CIDRS: &str = "dbgw_cidrs";
pub const MAP_BY_COOKIE: &str = "dbgw_by_cookie";
pub const MAP_BY_ADDR: &str = "dbgw_by_addr";
/// Open records per cgroup id (the per-cgroup budget's count).
pub const MAP_CG_CONNS: &str = "dbgw_cg_conns";
/// `struct dbgw_limits`, entry 0.
pub const MAP_LIMITS: &str = "dbgw_limits";
/// Connects refused over budget, per CPU, entry 0.
pub const MAP_REFUSED: &str = "dbgw_refused";
/// Every map of the object, in the order they are reopened.
pub const ALL_MAPS: [&str; 8] = [
    MAP_CONFIG,
    MAP_PORTS,
    MAP_CIDRS,
    MAP_BY_COOKIE,
    MAP_BY_ADDR,
    MAP_CG_CONNS,
    MAP_LIMITS,
    MAP_REFUSED,
];
/// The maps sized by `max_connections` (one entry per open intercepted connection, or per
/// cgroup holding one).
pub const CONNECTION_MAPS: [&str; 3] = [MAP_BY_COOKIE, MAP_BY_ADDR, MAP_CG_CONNS];

/// `DBGW_MAX_PORTS` / `DBGW_MAX_CIDRS` in maps.h: capacity of the intercept table.
pub const MAX_PORTS: usize = 64;
pub const MAX_CIDRS: usize = 1024;

/// `DBGW_F_SERVING`: the agent accepts redirected connections.
pub const FLAG_SERVING: u32 = 1 << 0;
/// `DBGW_F_FAIL_OPEN`: while not serving, connections go direct instead of failing with EPERM.
pub const FLAG_FAIL_OPEN: u32 = 1 << 1;
/// `DBGW_F_AGENT_V6`: `agent_ip6`/`agent_port6` are valid; native IPv6 is redirected.
pub const FLAG_AGENT_V6: u32 = 1 << 2;

/// Bits of the port in a CIDR key, before the address (`struct dbgw_cidr_key`).
pub const CIDR_PORT_BITS: u32 = 16;
/// Bits of the `::ffff:0:0/96` prefix in front of an IPv4 address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// `struct dbgw_config`: entry 0 of `dbgw_config`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Agent IPv4 address, network order (in-memory bytes are the octets).
    pub agent_ip4: u32,
    /// Agent port for IPv4 and IPv4-mapped destinations, network order.
    pub agent_port4: u16,
    /// Agent port for native IPv6 destinations, network order.
    pub agent_port6: u16,
    /// Agent IPv6 address, network order; valid with [`FLAG_AGENT_V6`].
    pub agent_ip6: [u8; 16],
    /// cgroup v2 id (inode number) of the agent; 0 = none. Host order.
    pub agent_cgroup_id: u64,
    /// SO_MARK of the agent's own sockets; 0 = none. Host order.
    pub agent_mark: u32,
    /// `FLAG_*` bits, host order.
    pub flags: u32,
}

/// `struct dbgw_port_key`: key of `dbgw_ports` (value: `u32` 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Destination port, network order.
    pub port: u16,
}

/// The data part of `struct dbgw_cidr_key` (everything after `prefixlen`), the `K` of aya's
/// `lpm_trie::Key<K>`, which supplies the `u32` prefix length in front (packed, so the
/// whole key is the C struct byte for byte).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrKeyData {
    /// Destination port, network order.
    pub port: u16,
    /// Destination address, network order, IPv4-mapped for IPv4; bits past the prefix zero.
    pub addr: [u8; 16],
    /// Zero; beyond every prefix.
    pub pad: [u8; 2],
}

/// `struct dbgw_orig_dst`: value of `dbgw_by_cookie` and `dbgw_by_addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDstValue {
    /// Original destination address, network order, IPv4-mapped for IPv4.
    pub ip: [u8; 16],
    /// Original destination port, network order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`: family of the client's socket, host order.
    pub family: u16,
    /// Process id (tgid) that called `connect()`, host order.
    pub tgid: u32,
    /// Thread id that called `connect()`, host order.
    pub tid: u32,
    /// Zero.
    pub pad: u32,
    /// cgroup v2 id of the connecting task, host order.
    pub cgroup_id: u64,
    /// Network namespace cookie of the socket, host order.
    pub netns_cookie: u64,
    /// Socket cookie, host order.
    pub sock_cookie: u64,
}

/// `struct dbgw_limits`: entry 0 of `dbgw_limits`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Open intercepted connections one cgroup may hold; 0 = no limit. Host order.
    pub conns_per_cgroup: u32,
    /// Zero.
    pub pad: u32,
}

/// `struct dbgw_sock_key`: key of `dbgw_by_addr`, the client's end of the connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Client address, network order, IPv4-mapped for IPv4.
    pub ip: [u8; 16],
    /// Client port, network order.
    pub port: u16,
    /// Zero.
    pub pad: u16,
}

// SAFETY: all six are #[repr(C)], made only of integers and byte arrays, with every padding
// byte spelled out as a field, so any bit pattern is valid and no byte is uninitialised.
unsafe impl aya::Pod for Config {}
unsafe impl aya::Pod for PortKey {}
unsafe impl aya::Pod for CidrKeyData {}
unsafe impl aya::Pod for OrigDstValue {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for Limits {}

/// The 16-byte form the maps use: IPv4 becomes `::ffff:a.b.c.d`.
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`ip16`]: an IPv4-mapped address comes back as IPv4.
pub fn ip_from16(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

impl Config {
    /// `agent_ip4` from an address (network order in memory).
    pub fn ip4(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }
}

impl SockKey {
    /// The key sockops publishes for a client whose local address is `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            ip: ip16(addr.ip()),
            port: addr.port().to_be(),
            pad: 0,
        }
    }
}

/// Why a CIDR entry cannot go into the trie.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid intercept prefix {ip}/{prefix} (at most {max} bits for this family)")]
pub struct BadPrefix {
    pub ip: IpAddr,
    pub prefix: u8,
    pub max: u8,
}

/// The `dbgw_cidrs` key matching `port` and the first `prefix` bits of `ip` (host bits are
/// cleared so the same rule always makes the same key).
pub fn cidr_key(ip: IpAddr, prefix: u8, port: u16) -> Result<Key<CidrKeyData>, BadPrefix> {
    let (max, lead) = match ip {
        IpAddr::V4(_) => (32u8, V4_MAPPED_PREFIX_BITS),
        IpAddr::V6(_) => (128u8, 0),
    };
    if prefix > max {
        return Err(BadPrefix { ip, prefix, max });
    }
    let addr_bits = lead + u32::from(prefix);
    let mut addr = ip16(ip);
    let mask = if addr_bits == 0 {
        0
    } else {
        u128::MAX << (128 - addr_bits)
    };
    addr = (u128::from_be_bytes(addr) & mask).to_be_bytes();
    let data = CidrKeyData {
        port: port.to_be(),
        addr,
        pad: [0; 2],
    };
    Ok(Key::new(CIDR_PORT_BITS + addr_bits, data))
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, mem::offset_of, mem::size_of};

    use super::*;

    /// `<struct>[.<field>] <n>` lines printed by gateway-ebpf/layout.c from maps.h.
    fn c_layout() -> HashMap<&'static str, usize> {
        include_str!(concat!(env!("OUT_DIR"), "/maps_layout.txt"))
            .lines()
            .map(|l| {
                let (k, v) = l.split_once(' ').expect("layout line");
                (k, v.parse().expect("layout number"))
            })
            .collect()
    }

    macro_rules! check {
        ($c:ident, $cname:literal, $ty:ty, [$($field:ident),+]) => {
            assert_eq!($c[$cname], size_of::<$ty>(), "size of {}", $cname);
            $(assert_eq!(
                $c[concat!($cname, ".", stringify!($field))],
                offset_of!($ty, $field),
                "offset of {}.{}", $cname, stringify!($field)
            );)+
        };
    }

    #[test]
    fn layouts_match_maps_h() {
        let c = c_layout();
        check!(
            c,
            "dbgw_config",
            Config,
            [
                agent_ip4,
                agent_port4,
                agent_port6,
                agent_ip6,
                agent_cgroup_id,
                agent_mark,
                flags
            ]
        );
        check!(c, "dbgw_port_key", PortKey, [port]);
        check!(
            c,
            "dbgw_orig_dst",
            OrigDstValue,
            [
                ip,
                port,
                family,
                tgid,
                tid,
                pad,
                cgroup_id,
                netns_cookie,
                sock_cookie
            ]
        );
        check!(c, "dbgw_sock_key", SockKey, [ip, port, pad]);
        check!(c, "dbgw_limits", Limits, [conns_per_cgroup, pad]);

        // The LPM key is aya's packed {u32 prefix_len, K} around CidrKeyData.
        assert_eq!(c["dbgw_cidr_key"], size_of::<Key<CidrKeyData>>());
        assert_eq!(c["dbgw_cidr_key.prefixlen"], 0);
        let data = size_of::<u32>();
        assert_eq!(
            c["dbgw_cidr_key.port"],
            data + offset_of!(CidrKeyData, port)
        );
        assert_eq!(
            c["dbgw_cidr_key.addr"],
            data + offset_of!(CidrKeyData, addr)
        );
        assert_eq!(c["dbgw_cidr_key.pad"], data + offset_of!(CidrKeyData, pad));

        assert_eq!(c["DBGW_F_SERVING"], FLAG_SERVING as usize);
        assert_eq!(c["DBGW_F_FAIL_OPEN"], FLAG_FAIL_OPEN as usize);
        assert_eq!(c["DBGW_F_AGENT_V6"], FLAG_AGENT_V6 as usize);
    }

    #[test]
    fn addresses_round_trip_v4_mapped() {
        let v4: IpAddr = "10.0.3.7".parse().unwrap();
        assert_eq!(ip16(v4)[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(ip16(v4)[12..], [10, 0, 3, 7]);
        assert_eq!(ip_from16(ip16(v4)), v4);
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(ip_from16(ip16(v6)), v6);
        assert_eq!(
            Config::ip4(Ipv4Addr::new(169, 254, 77, 1)).to_ne_bytes(),
            [169, 254, 77, 1]
        );
        let k = SockKey::new("10.1.2.3:40000".parse().unwrap());
        assert_eq!(k.port.to_ne_bytes(), 40000u16.to_be_bytes());
    }

    #[test]
    fn cidr_keys_cover_port_then_prefix() {
        let k = cidr_key("10.1.2.3".parse().unwrap(), 16, 5432).unwrap();
        assert_eq!(k.prefix_len(), 16 + 96 + 16);
        let d = k.data();
        assert_eq!(d.port.to_ne_bytes(), 5432u16.to_be_bytes());
        assert_eq!(d.addr[10..], [0xff, 0xff, 10, 1, 0, 0]);
        let k = cidr_key("fd00::1".parse().unwrap(), 0, 6432).unwrap();
        assert_eq!(k.prefix_len(), 16);
        assert_eq!(k.data().addr, [0; 16]);
        assert!(cidr_key("10.0.0.0".parse().unwrap(), 33, 5432).is_err());
        assert!(cidr_key("::".parse().unwrap(), 129, 5432).is_err());
    }
}
