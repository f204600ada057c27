/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Map layouts shared by the kernel programs (intercept.bpf.c) and the node agent.
 *
 * Keep in sync with gateway/src/ebpf/maps.rs: every struct here has a #[repr(C)] mirror there,
 * and `cargo test -p gateway ebpf::maps` compares sizes and field offsets against the values
 * that layout.c prints from this very header (build.rs compiles and runs it).
 *
 * Conventions:
 *   - IP addresses are 16 bytes in network byte order; an IPv4 address is stored IPv4-mapped
 *     (::ffff:a.b.c.d) so one layout, one trie and one lookup serve both families.
 *   - Ports are __be16, network byte order (as in struct sockaddr_in).
 *   - Padding is spelled out and always zero: map keys are compared byte for byte.
 *   - A map whose layout changes gets a new name (dbgw_foo -> dbgw_foo_v2): pinned maps survive
 *     agent upgrades, and the loader would otherwise reuse an old map with the wrong layout.
 *   - Map names are at most 15 characters (BPF_OBJ_NAME_LEN - 1) and start with "dbgw_".
 */
#ifndef DBGW_MAPS_H
#define DBGW_MAPS_H

#include <linux/types.h>

/* Sizes of the maps. The LRU maps hold one entry per intercepted connection that is not closed
 * yet; LRU eviction bounds them if a close is ever missed. DBGW_MAX_CONNS is only the object's
 * default: the agent sizes dbgw_by_cookie, dbgw_by_addr and dbgw_cg_conns from its
 * configuration (interception.max_connections) when it loads them. */
#define DBGW_MAX_CONNS 65536
#define DBGW_MAX_PORTS 64
#define DBGW_MAX_CIDRS 1024

/* dbgw_config.flags bits. */
#define DBGW_F_SERVING   (1U << 0) /* the agent listens and accepts redirected connections */
#define DBGW_F_FAIL_OPEN (1U << 1) /* when not serving: let connections go direct (else EPERM) */
#define DBGW_F_AGENT_V6  (1U << 2) /* agent_ip6/agent_port6 are set: native IPv6 is redirected */

/* The one entry (index 0) of dbgw_config. Written by the agent, read by every hook. */
struct dbgw_config {
	__be32 agent_ip4;        /* 0: agent IPv4 address, network byte order (do not change) */
	__be16 agent_port4;      /* 4: agent port for IPv4 and IPv4-mapped destinations, network order */
	__be16 agent_port6;      /* 6: agent port for native IPv6 destinations, network order */
	__u8   agent_ip6[16];    /* 8: agent IPv6 address, network order; valid if DBGW_F_AGENT_V6 */
	__u64  agent_cgroup_id;  /* 24: cgroup v2 id (inode) of the agent; 0 = none. Host order */
	__u32  agent_mark;       /* 32: SO_MARK the agent puts on its sockets; 0 = none. Host order */
	__u32  flags;            /* 36: DBGW_F_* bits, host order */
};                           /* 40 bytes */

/* Key of dbgw_ports: a destination port intercepted for any address. Value: __u32, 1. */
struct dbgw_port_key {
	__be16 port;             /* 0: destination port, network byte order */
};                           /* 2 bytes */

/* Key of dbgw_cidrs (LPM trie). The matched bits are port first, then address, so one prefix
 * covers "this exact port and the first N bits of the address":
 *   prefixlen = 16 + 96 + v4_prefix   for IPv4 (address stored IPv4-mapped)
 *   prefixlen = 16 + v6_prefix        for IPv6
 * Lookups use prefixlen = 144 (all of port and address). Value: __u32, 1. */
struct dbgw_cidr_key {
	__u32  prefixlen;        /* 0: bits of port+addr that must match, host order (LPM header) */
	__be16 port;             /* 4: destination port, network byte order */
	__u8   addr[16];         /* 6: destination address, network order, IPv4-mapped for IPv4 */
	__u8   pad[2];           /* 22: zero; beyond every prefix */
};                           /* 24 bytes */

/* What the agent learns about an intercepted connection: value of dbgw_by_cookie and
 * dbgw_by_addr. */
struct dbgw_orig_dst {
	__u8   ip[16];           /* 0: original destination, network order, IPv4-mapped for IPv4 */
	__be16 port;             /* 16: original destination port, network byte order */
	__u16  family;           /* 18: AF_INET or AF_INET6: the family of the client's socket, host order */
	__u32  tgid;             /* 20: process id (tgid) that called connect(), host order */
	__u32  tid;              /* 24: thread id that called connect(), host order */
	__u32  pad;              /* 28: zero */
	__u64  cgroup_id;        /* 32: cgroup v2 id of the connecting task, host order */
	__u64  netns_cookie;     /* 40: network namespace cookie of the socket, host order */
	__u64  sock_cookie;      /* 48: socket cookie, host order (to delete only our own entry) */
};                           /* 56 bytes */

/* Key of dbgw_by_addr: the client's end of the TCP connection as the agent sees it in
 * accept()/getpeername(). */
struct dbgw_sock_key {
	__u8   ip[16];           /* 0: client local address, network order, IPv4-mapped for IPv4 */
	__be16 port;             /* 16: client local port, network byte order */
	__u16  pad;              /* 18: zero */
};                           /* 20 bytes */

/* Value of dbgw_limits (one entry, index 0), written by the agent. */
struct dbgw_limits {
	__u32  conns_per_cgroup; /* 0: open intercepted connections one cgroup may hold; 0 = no limit. Host order */
	__u32  pad;              /* 4: zero */
};                           /* 8 bytes */

#if defined(__bpf__)
#include <bpf/bpf_helpers.h>

/* Every map is pinned by name under the agent's pin directory (aya: default_map_pin_directory),
 * so an agent restart reopens them with their contents instead of creating new ones. */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dbgw_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, DBGW_MAX_PORTS);
	__type(key, struct dbgw_port_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, DBGW_MAX_CIDRS);
	__type(key, struct dbgw_cidr_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_cidrs SEC(".maps");

/* Socket cookie -> original destination. Written by connect4/6, read by sockops and by
 * getpeername4/6, deleted when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DBGW_MAX_CONNS);
	__type(key, __u64);
	__type(value, struct dbgw_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_by_cookie SEC(".maps");

/* Client {local ip, local port} -> original destination. Written by sockops once the local
 * port is known, read by the agent after accept(), deleted when the socket closes. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DBGW_MAX_CONNS);
	__type(key, struct dbgw_sock_key);
	__type(value, struct dbgw_orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_by_addr SEC(".maps");

/* Connections one cgroup has open: cgroup id -> count of its records in dbgw_by_cookie. The
 * per-cgroup budget (dbgw_limits) is checked against it, so one pod's connects can never evict
 * the other pods' records. Incremented by connect4/6 with each new record, decremented when the
 * record goes (sockops on close, or sock_release for a socket that never connected). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, DBGW_MAX_CONNS);
	__type(key, __u64);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_cg_conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dbgw_limits);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_limits SEC(".maps");

/* Connects refused because their cgroup held its budget (index 0), per CPU; the agent sums
 * them into gateway_node_intercept_refusals_total. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} dbgw_refused SEC(".maps");

#endif /* __bpf__ */

#endif /* DBGW_MAPS_H */
