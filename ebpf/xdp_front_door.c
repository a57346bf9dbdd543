// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * The XDP front door on the server's NIC.
 *
 * - IPv4 to the server's UDP port: dropped (the server serves IPv6 only).
 * - IPv6 UDP to the server's port from a blocklisted source prefix (an LPM
 *   trie the server fills; the admission stage isolates peers with it):
 *   dropped.
 * - IPv6 UDP to the server's port otherwise: redirected to the AF_XDP socket
 *   of the receiving queue when the `xdp` backend registered one in `xsks`,
 *   else passed to the kernel (the `uring` and `socket` backends).
 * - Everything else (NDP, ICMPv6, other ports, IPv6 extension headers and
 *   fragments, which the kernel reassembles and the worker's kernel socket
 *   sees): passed to the kernel untouched.
 * Every decision is counted per reason in a per-CPU array.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Per-reason counters, in this order (dataplane/src/front_door.rs). */
enum reason {
	FD_PASS_OURS = 0,     /* IPv6 UDP to our port, source not blocked */
	FD_PASS_OTHER = 1,    /* not ours: other protocols, ports, NDP, ICMPv6 */
	FD_DROP_IPV4 = 2,     /* IPv4 UDP to our port */
	FD_DROP_BLOCKED = 3,  /* blocklisted IPv6 source to our port */
	FD_PASS_MALFORMED = 4,/* truncated headers: the kernel drops them */
	FD_REDIRECT_XSK = 5,  /* ours, redirected to the queue's AF_XDP socket */
	FD_REASONS = 6,
};

struct ipv6_prefix {
	__u32 prefixlen;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ipv6_prefix);
	__type(value, __u8);
} blocklist SEC(".maps");

/* AF_XDP sockets by receive queue index (filled by the `xdp` backend). */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FD_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Set by the loader before load (host byte order). */
volatile const __u16 server_port = 4433;

static __always_inline int count(__u32 reason, int action)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &reason);

	if (value)
		*value += 1;
	return action;
}

static __always_inline int ipv4(void *l3, void *end)
{
	struct iphdr *ip = l3;
	struct udphdr *udp;

	if ((void *)(ip + 1) > end)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	if (ip->protocol != IPPROTO_UDP)
		return count(FD_PASS_OTHER, XDP_PASS);
	if (ip->ihl < 5)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	udp = l3 + ip->ihl * 4;
	if ((void *)(udp + 1) > end)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	if (udp->dest != bpf_htons(server_port))
		return count(FD_PASS_OTHER, XDP_PASS);
	return count(FD_DROP_IPV4, XDP_DROP);
}

static __always_inline int ipv6(struct xdp_md *ctx, void *l3, void *end)
{
	struct ipv6hdr *ip6 = l3;
	struct udphdr *udp;
	struct ipv6_prefix key;

	if ((void *)(ip6 + 1) > end)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	/* Extension headers and fragments go to the kernel's full parser. */
	if (ip6->nexthdr != IPPROTO_UDP)
		return count(FD_PASS_OTHER, XDP_PASS);
	udp = (void *)(ip6 + 1);
	if ((void *)(udp + 1) > end)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	if (udp->dest != bpf_htons(server_port))
		return count(FD_PASS_OTHER, XDP_PASS);
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, &ip6->saddr, sizeof(key.addr));
	if (bpf_map_lookup_elem(&blocklist, &key))
		return count(FD_DROP_BLOCKED, XDP_DROP);
	/* With no socket at this queue's index the lower bits of the flags are
	 * the action: pass to the kernel. */
	if (bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS) == XDP_REDIRECT)
		return count(FD_REDIRECT_XSK, XDP_REDIRECT);
	return count(FD_PASS_OURS, XDP_PASS);
}

SEC("xdp")
int front_door(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end)
		return count(FD_PASS_MALFORMED, XDP_PASS);
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return ipv4(eth + 1, end);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ipv6(ctx, eth + 1, end);
	return count(FD_PASS_OTHER, XDP_PASS);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
