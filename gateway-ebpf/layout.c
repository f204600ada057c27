// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Prints the size of every struct in maps.h and the offset of every field, one
 * "<struct>[.<field>] <bytes>" per line. gateway/build.rs compiles this for the host and runs it;
 * the layout tests in gateway/src/ebpf/maps.rs compare the #[repr(C)] mirrors against its output.
 *
 * The host compiler stands in for the BPF target: both are LP64 and little-endian here, and
 * every field in maps.h is a fixed-width type with natural alignment, so the layouts agree.
 * It also prints the few uapi constants that gateway/src/ebpf/pins.rs uses through raw bpf(2)
 * calls, so that a typo there fails a test instead of a syscall.
 * Keep in sync with maps.h: every struct and field listed.
 */
#include <stddef.h>
#include <stdio.h>

#include <linux/bpf.h>

#include "maps.h"

#define SIZE(s) printf("%s %zu\n", #s, sizeof(struct s))
#define OFF(s, f) printf("%s.%s %zu\n", #s, #f, offsetof(struct s, f))

int main(void)
{
	SIZE(dbgw_config);
	OFF(dbgw_config, agent_ip4);
	OFF(dbgw_config, agent_port4);
	OFF(dbgw_config, agent_port6);
	OFF(dbgw_config, agent_ip6);
	OFF(dbgw_config, agent_cgroup_id);
	OFF(dbgw_config, agent_mark);
	OFF(dbgw_config, flags);

	SIZE(dbgw_port_key);
	OFF(dbgw_port_key, port);

	SIZE(dbgw_cidr_key);
	OFF(dbgw_cidr_key, prefixlen);
	OFF(dbgw_cidr_key, port);
	OFF(dbgw_cidr_key, addr);
	OFF(dbgw_cidr_key, pad);

	SIZE(dbgw_orig_dst);
	OFF(dbgw_orig_dst, ip);
	OFF(dbgw_orig_dst, port);
	OFF(dbgw_orig_dst, family);
	OFF(dbgw_orig_dst, tgid);
	OFF(dbgw_orig_dst, tid);
	OFF(dbgw_orig_dst, pad);
	OFF(dbgw_orig_dst, cgroup_id);
	OFF(dbgw_orig_dst, netns_cookie);
	OFF(dbgw_orig_dst, sock_cookie);

	SIZE(dbgw_limits);
	OFF(dbgw_limits, conns_per_cgroup);
	OFF(dbgw_limits, pad);

	SIZE(dbgw_sock_key);
	OFF(dbgw_sock_key, ip);
	OFF(dbgw_sock_key, port);
	OFF(dbgw_sock_key, pad);

	printf("DBGW_F_SERVING %u\n", DBGW_F_SERVING);
	printf("DBGW_F_FAIL_OPEN %u\n", DBGW_F_FAIL_OPEN);
	printf("DBGW_F_AGENT_V6 %u\n", DBGW_F_AGENT_V6);

	/* uapi constants the loader uses through raw bpf(2) calls (gateway/src/ebpf/pins.rs). */
	printf("BPF_OBJ_GET %u\n", BPF_OBJ_GET);
	printf("BPF_OBJ_GET_INFO_BY_FD %u\n", BPF_OBJ_GET_INFO_BY_FD);
	printf("BPF_LINK_DETACH %u\n", BPF_LINK_DETACH);
	printf("BPF_LINK_TYPE_CGROUP %u\n", BPF_LINK_TYPE_CGROUP);
	printf("BPF_CGROUP_SOCK_OPS %u\n", BPF_CGROUP_SOCK_OPS);
	printf("BPF_CGROUP_INET4_CONNECT %u\n", BPF_CGROUP_INET4_CONNECT);
	printf("BPF_CGROUP_INET6_CONNECT %u\n", BPF_CGROUP_INET6_CONNECT);
	printf("BPF_CGROUP_INET4_GETPEERNAME %u\n", BPF_CGROUP_INET4_GETPEERNAME);
	printf("BPF_CGROUP_INET6_GETPEERNAME %u\n", BPF_CGROUP_INET6_GETPEERNAME);
	printf("BPF_CGROUP_INET_SOCK_RELEASE %u\n", BPF_CGROUP_INET_SOCK_RELEASE);
	printf("bpf_link_info %zu\n", sizeof(struct bpf_link_info));
	printf("bpf_link_info.type %zu\n", offsetof(struct bpf_link_info, type));
	printf("bpf_link_info.cgroup.cgroup_id %zu\n", offsetof(struct bpf_link_info, cgroup.cgroup_id));
	printf("bpf_link_info.cgroup.attach_type %zu\n", offsetof(struct bpf_link_info, cgroup.attach_type));
	return 0;
}
