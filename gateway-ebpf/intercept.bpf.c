// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * db-gateway interception: steer TCP connections to PostgreSQL to the node agent.
 *
 *   cgroup/connect4, cgroup/connect6   record the original destination by socket cookie and
 *                                      rewrite the destination to the agent
 *   sockops                            once the client's local port is known, publish the
 *                                      record by {local ip, local port} for the agent
 *   cgroup/getpeername4, getpeername6  show the application the address it asked for
 *   cgroup/sock_release                forget the record of a socket that never connected
 *
 * The hooks are thin: each one calls a __ worker and maps its verdict to the return value the
 * attach point expects. Map layouts live in maps.h (keep in sync with gateway/src/ebpf/maps.rs).
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/socket.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "maps.h"

/* Return values of cgroup/connect*: proceed with the (possibly rewritten) connect, or fail it
 * with EPERM. */
#define SYS_PROCEED 1
#define SYS_REJECT  0

/* linux/socket.h only has AF_* under __KERNEL__ in some header versions. */
#ifndef AF_INET
#define AF_INET  2
#endif /* AF_INET */
#ifndef AF_INET6
#define AF_INET6 10
#endif /* AF_INET6 */
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif /* SOCK_STREAM */

/*
 * Context fields such as user_ip6[] and local_ip6[] are arrays of __u32 that the verifier only
 * lets us access 4 bytes at a time, while clang happily merges two neighbouring loads into one
 * 8-byte load ("invalid bpf_context access off=48 size=8"). A volatile access keeps each one a
 * separate 4-byte instruction.
 */
#define CTX_U32(field) (*(volatile __u32 *)&(field))

/* Verdicts of the connect workers. */
enum dbgw_verdict {
	DBGW_PASS,     /* not ours: leave the connect alone */
	DBGW_REDIRECT, /* recorded and rewritten to the agent */
	DBGW_REJECT,   /* ours, but the agent is not serving and the fail mode is closed */
};

static __always_inline void __ip_v4_mapped(__u8 ip[16], __be32 v4)
{
	__builtin_memset(ip, 0, 10);
	ip[10] = 0xff;
	ip[11] = 0xff;
	__builtin_memcpy(&ip[12], &v4, 4);
}

static __always_inline int __ip6_is_v4_mapped(const __u32 w[4])
{
	return w[0] == 0 && w[1] == 0 && w[2] == bpf_htonl(0x0000ffff);
}

static __always_inline const struct dbgw_config *__config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&dbgw_config, &zero);
}

/* Is {ip, port} a database destination we intercept? First the any-address port list (the
 * common case, one hash lookup), then the CIDR+port trie. */
static __always_inline int __dst_matches(const __u8 ip[16], __be16 port)
{
	struct dbgw_port_key pk = { .port = port };
	struct dbgw_cidr_key ck = {};

	if (bpf_map_lookup_elem(&dbgw_ports, &pk))
		return 1;
	ck.prefixlen = 16 + 128;
	ck.port = port;
	__builtin_memcpy(ck.addr, ip, 16);
	return bpf_map_lookup_elem(&dbgw_cidrs, &ck) != NULL;
}

/*
 * The agent's own sockets are never redirected, or the agent could not reach anything on port
 * 5432 itself (its upstream dial, health checks, a co-located database). Two independent ways to
 * recognise it, either is enough:
 *   - its cgroup: the agent runs in its own cgroup (a DaemonSet pod's container), whose id is
 *     configured. bpf_get_current_cgroup_id() is the cgroup of the task calling connect(), which
 *     for a normal process is the cgroup its sockets belong to.
 *   - SO_MARK: the agent marks its sockets, which also covers an agent sharing a cgroup with
 *     other processes (e.g. run by hand on a bare host).
 * A zero id or mark in the config means "not configured" and matches nothing.
 */
static __always_inline int __is_agent(struct bpf_sock_addr *ctx, const struct dbgw_config *cfg)
{
	struct bpf_sock *sk = ctx->sk;

	if (cfg->agent_cgroup_id && bpf_get_current_cgroup_id() == cfg->agent_cgroup_id)
		return 1;
	if (cfg->agent_mark && sk && sk->mark == cfg->agent_mark)
		return 1;
	return 0;
}

/*
 * Per-cgroup budget. dbgw_by_cookie and dbgw_by_addr are LRU maps shared by every pod: without
 * a budget one pod opening connections in a loop evicts the other pods' records, whose
 * connections the agent then refuses (it cannot tell who they are). So each cgroup may hold at
 * most dbgw_limits.conns_per_cgroup records; its next connect fails with EPERM (and is counted
 * in dbgw_refused), while every other cgroup connects as before.
 */
static __always_inline int __over_budget(__u64 cgroup_id)
{
	__u32 zero = 0;
	const struct dbgw_limits *lim = bpf_map_lookup_elem(&dbgw_limits, &zero);
	const __u32 *open;
	__u64 *refused;

	if (!lim || !lim->conns_per_cgroup)
		return 0;
	open = bpf_map_lookup_elem(&dbgw_cg_conns, &cgroup_id);
	if (!open || *open < lim->conns_per_cgroup)
		return 0;
	refused = bpf_map_lookup_elem(&dbgw_refused, &zero);
	if (refused)
		*refused += 1; /* per-CPU value: no other CPU writes it */
	return 1;
}

/* One more record for cgroup_id. Two CPUs may insert the first one at once: the loser adds. */
static __always_inline void __count_conn(__u64 cgroup_id)
{
	__u32 one = 1;
	__u32 *open = bpf_map_lookup_elem(&dbgw_cg_conns, &cgroup_id);

	if (open) {
		__sync_fetch_and_add(open, 1);
		return;
	}
	if (bpf_map_update_elem(&dbgw_cg_conns, &cgroup_id, &one, BPF_NOEXIST)) {
		open = bpf_map_lookup_elem(&dbgw_cg_conns, &cgroup_id);
		if (open)
			__sync_fetch_and_add(open, 1);
	}
}

/*
 * Deletes the record of a socket and gives its cgroup's budget back. Only the caller whose
 * delete succeeds decrements, so sockops (on close) and sock_release (socket gone) never both
 * do.
 */
static __always_inline void __forget_cookie(__u64 cookie)
{
	const struct dbgw_orig_dst *orig = bpf_map_lookup_elem(&dbgw_by_cookie, &cookie);
	__u64 cgroup_id;
	__u32 *open;

	if (!orig)
		return;
	cgroup_id = orig->cgroup_id;
	if (bpf_map_delete_elem(&dbgw_by_cookie, &cookie))
		return;
	open = bpf_map_lookup_elem(&dbgw_cg_conns, &cgroup_id);
	/* Adding 0xffffffff is subtracting 1: clang's BPF v1 target has no atomic sub, only add. */
	if (open && *open > 0)
		__sync_fetch_and_add(open, (__u32)-1);
}

/*
 * Common part of connect4/connect6 once the destination is known as 16 bytes. Returns the
 * verdict; on DBGW_REDIRECT the caller rewrites the destination.
 */
static __always_inline enum dbgw_verdict
__sock_xlate_fwd(struct bpf_sock_addr *ctx, const struct dbgw_config *cfg, const __u8 ip[16],
		 __be16 port)
{
	struct dbgw_orig_dst orig = {};
	__u64 pid_tgid, cookie;
	int known;

	/*
	 * Only TCP. A UDP socket can connect() to port 5432 too (a DNS-ish client, a QUIC probe);
	 * the agent only speaks TCP, so redirecting it would just break it.
	 */
	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return DBGW_PASS;
	if (__is_agent(ctx, cfg))
		return DBGW_PASS;
	if (!__dst_matches(ip, port))
		return DBGW_PASS;

	/*
	 * Fail mode. While the agent is not serving (starting, upgrading, crashed), a redirected
	 * connection would be refused anyway. Fail open lets it go straight to the database (no
	 * gateway identity, the database's own auth applies); fail closed refuses it at once with
	 * EPERM, which clients report immediately instead of after a TCP timeout.
	 */
	if (!(cfg->flags & DBGW_F_SERVING))
		return (cfg->flags & DBGW_F_FAIL_OPEN) ? DBGW_PASS : DBGW_REJECT;

	orig.cgroup_id = bpf_get_current_cgroup_id();
	cookie = bpf_get_socket_cookie(ctx);
	/*
	 * A socket that connects again (after a failed attempt) keeps its one record and its one
	 * place in the budget; a new one must fit in its cgroup's budget.
	 */
	known = bpf_map_lookup_elem(&dbgw_by_cookie, &cookie) != NULL;
	if (!known && __over_budget(orig.cgroup_id))
		return DBGW_REJECT;

	__builtin_memcpy(orig.ip, ip, 16);
	orig.port = port;
	orig.family = ctx->family;
	pid_tgid = bpf_get_current_pid_tgid();
	orig.tgid = pid_tgid >> 32;
	orig.tid = (__u32)pid_tgid;
	orig.netns_cookie = bpf_get_netns_cookie(ctx);
	orig.sock_cookie = cookie;

	/*
	 * Without the record the agent cannot tell who is calling and would refuse the connection
	 * after accepting it; apply the fail mode now instead, which says it sooner and clearer.
	 * (An LRU map evicts rather than fills up, so this is about ENOMEM, not a full map.)
	 */
	if (bpf_map_update_elem(&dbgw_by_cookie, &cookie, &orig, BPF_ANY))
		return (cfg->flags & DBGW_F_FAIL_OPEN) ? DBGW_PASS : DBGW_REJECT;
	if (!known)
		__count_conn(orig.cgroup_id);
	return DBGW_REDIRECT;
}

static __always_inline enum dbgw_verdict __sock4_xlate_fwd(struct bpf_sock_addr *ctx)
{
	const struct dbgw_config *cfg = __config();
	enum dbgw_verdict verdict;
	__u8 ip[16];

	if (!cfg)
		return DBGW_PASS;
	__ip_v4_mapped(ip, ctx->user_ip4);
	verdict = __sock_xlate_fwd(ctx, cfg, ip, (__be16)ctx->user_port);
	if (verdict == DBGW_REDIRECT) {
		ctx->user_ip4 = cfg->agent_ip4;
		ctx->user_port = cfg->agent_port4;
	}
	return verdict;
}

static __always_inline enum dbgw_verdict __sock6_xlate_fwd(struct bpf_sock_addr *ctx)
{
	const struct dbgw_config *cfg = __config();
	enum dbgw_verdict verdict;
	__u32 w[4];
	int mapped;

	if (!cfg)
		return DBGW_PASS;
	w[0] = CTX_U32(ctx->user_ip6[0]);
	w[1] = CTX_U32(ctx->user_ip6[1]);
	w[2] = CTX_U32(ctx->user_ip6[2]);
	w[3] = CTX_U32(ctx->user_ip6[3]);
	mapped = __ip6_is_v4_mapped(w);

	/*
	 * A native IPv6 destination can only be redirected to an IPv6 agent address: without one
	 * configured, leave it alone (and record nothing) rather than fail it. An IPv4-mapped
	 * destination on an AF_INET6 socket (dual-stack clients such as Java) is IPv4 on the wire
	 * and goes to ::ffff:<agent IPv4>.
	 */
	if (!mapped && !(cfg->flags & DBGW_F_AGENT_V6))
		return DBGW_PASS;

	verdict = __sock_xlate_fwd(ctx, cfg, (const __u8 *)w, (__be16)ctx->user_port);
	if (verdict != DBGW_REDIRECT)
		return verdict;
	if (mapped) {
		CTX_U32(ctx->user_ip6[0]) = 0;
		CTX_U32(ctx->user_ip6[1]) = 0;
		CTX_U32(ctx->user_ip6[2]) = bpf_htonl(0x0000ffff);
		CTX_U32(ctx->user_ip6[3]) = cfg->agent_ip4;
		ctx->user_port = cfg->agent_port4;
	} else {
		__builtin_memcpy(w, cfg->agent_ip6, 16);
		CTX_U32(ctx->user_ip6[0]) = w[0];
		CTX_U32(ctx->user_ip6[1]) = w[1];
		CTX_U32(ctx->user_ip6[2]) = w[2];
		CTX_U32(ctx->user_ip6[3]) = w[3];
		ctx->user_port = cfg->agent_port6;
	}
	return verdict;
}

SEC("cgroup/connect4")
int dbgw_connect4(struct bpf_sock_addr *ctx)
{
	return __sock4_xlate_fwd(ctx) == DBGW_REJECT ? SYS_REJECT : SYS_PROCEED;
}

SEC("cgroup/connect6")
int dbgw_connect6(struct bpf_sock_addr *ctx)
{
	return __sock6_xlate_fwd(ctx) == DBGW_REJECT ? SYS_REJECT : SYS_PROCEED;
}

/*
 * getpeername: the application asked for 10.0.3.7:5432 and must keep seeing that address
 * (libpq prints it, drivers compare it, TLS hostname logic may use it), not the agent's.
 * The kernel requires these programs to return 1.
 */
static __always_inline void __sock4_rev_xlate(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	const struct dbgw_orig_dst *orig = bpf_map_lookup_elem(&dbgw_by_cookie, &cookie);
	__be32 v4;

	if (!orig)
		return;
	__builtin_memcpy(&v4, &orig->ip[12], 4);
	ctx->user_ip4 = v4;
	ctx->user_port = orig->port;
}

static __always_inline void __sock6_rev_xlate(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	const struct dbgw_orig_dst *orig = bpf_map_lookup_elem(&dbgw_by_cookie, &cookie);
	__u32 w[4];

	if (!orig)
		return;
	/* IPv4 destinations are stored IPv4-mapped, which is exactly what an AF_INET6 socket
	 * connected to an IPv4 address reports. */
	__builtin_memcpy(w, orig->ip, 16);
	CTX_U32(ctx->user_ip6[0]) = w[0];
	CTX_U32(ctx->user_ip6[1]) = w[1];
	CTX_U32(ctx->user_ip6[2]) = w[2];
	CTX_U32(ctx->user_ip6[3]) = w[3];
	ctx->user_port = orig->port;
}

SEC("cgroup/getpeername4")
int dbgw_getpeername4(struct bpf_sock_addr *ctx)
{
	__sock4_rev_xlate(ctx);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int dbgw_getpeername6(struct bpf_sock_addr *ctx)
{
	__sock6_rev_xlate(ctx);
	return SYS_PROCEED;
}

/*
 * sockops. connect() records by socket cookie because the client's local port is not chosen
 * yet at that point; the agent only knows the accepted peer address {client ip, client port}.
 * TCP_CONNECT_CB runs after the local port is bound and before the SYN leaves, so the entry is
 * in place before the agent can possibly accept(). ACTIVE_ESTABLISHED_CB publishes again
 * (idempotent) in case the first update lost a race with an LRU eviction.
 */
static __always_inline int __sock_key(struct bpf_sock_ops *skops, struct dbgw_sock_key *key)
{
	__u32 w[4];

	if (skops->family == AF_INET) {
		__ip_v4_mapped(key->ip, skops->local_ip4);
	} else if (skops->family == AF_INET6) {
		/* A dual-stack socket talking IPv4 already reports ::ffff:a.b.c.d here. */
		w[0] = CTX_U32(skops->local_ip6[0]);
		w[1] = CTX_U32(skops->local_ip6[1]);
		w[2] = CTX_U32(skops->local_ip6[2]);
		w[3] = CTX_U32(skops->local_ip6[3]);
		__builtin_memcpy(key->ip, w, 16);
	} else {
		return -1;
	}
	/* local_port is in host byte order in struct bpf_sock_ops (remote_port is not). */
	key->port = bpf_htons((__u16)skops->local_port);
	return 0;
}

static __always_inline void __sockops_publish(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	const struct dbgw_orig_dst *orig = bpf_map_lookup_elem(&dbgw_by_cookie, &cookie);
	struct dbgw_sock_key key = {};

	if (!orig)
		return; /* not an intercepted connection */
	if (__sock_key(skops, &key))
		return;
	bpf_map_update_elem(&dbgw_by_addr, &key, orig, BPF_ANY);
	/* Ask for state-change callbacks so both entries go away when the socket closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/*
 * On close, drop both entries. The address entry is only deleted if it still belongs to this
 * socket: with tcp_tw_reuse another socket can take the same local port and publish before
 * this one's final state change arrives.
 */
static __always_inline void __sockops_forget(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	const struct dbgw_orig_dst *orig;
	struct dbgw_sock_key key = {};

	if (!__sock_key(skops, &key)) {
		orig = bpf_map_lookup_elem(&dbgw_by_addr, &key);
		if (orig && orig->sock_cookie == cookie)
			bpf_map_delete_elem(&dbgw_by_addr, &key);
	}
	__forget_cookie(cookie);
}

SEC("sockops")
int dbgw_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		__sockops_publish(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		/* args[0] is the old state, args[1] the new one. */
		if (skops->args[1] == BPF_TCP_CLOSE)
			__sockops_forget(skops);
		break;
	default:
		break;
	}
	return 1;
}

/*
 * sock_release: every socket's last hook. A socket whose connect was redirected but that never
 * reached TCP_CONNECT_CB (the connect failed early, the socket was closed before) gets no
 * sockops callback, and its record would hold a place in its cgroup's budget until LRU
 * eviction; here it goes. For a socket sockops already forgot this finds nothing.
 */
SEC("cgroup/sock_release")
int dbgw_sock_release(struct bpf_sock *sk)
{
	__forget_cookie(bpf_get_socket_cookie(sk));
	return 1;
}

/* GPL-compatible: bpf_get_netns_cookie and the sockops helpers are GPL-only. */
char _license[] SEC("license") = "Dual BSD/GPL";
