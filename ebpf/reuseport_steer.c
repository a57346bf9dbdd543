// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * Reuseport steering: picks the worker socket that owns a QUIC datagram.
 *
 * Mirrors dataplane/src/cid.rs `owner_of`: a server-issued connection ID
 * carries the owning worker's index in its first byte; a client-chosen DCID
 * (first Initials) routes by its own first byte, which is random, so every
 * packet of one handshake reaches the same worker and the connection then
 * lives there. Anything this program cannot parse falls back to the
 * kernel's 4-tuple hash (SK_PASS without a selection); the workers' handoff
 * queue keeps such packets correct.
 *
 * RFC 9000 §17.2: long header, DCID length at byte 5, DCID from byte 6.
 * RFC 9000 §17.3: short header, DCID (our fixed length) from byte 1.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define UDP_HEADER_LEN 8
#define CID_LEN 8
#define WORKERS_MAX 256

/* Per-reason counters, in this order (dataplane/src/steering.rs). */
enum reason {
	STEER_SHORT = 0,      /* short header: routed by our CID */
	STEER_LONG = 1,       /* long header: routed by the DCID */
	STEER_TRUNCATED = 2,  /* too short to carry the field: kernel hash */
	STEER_NOT_QUIC = 3,   /* fixed bit clear: kernel hash */
	STEER_LOAD_FAIL = 4,  /* could not read the header: kernel hash */
	STEER_NO_SOCKET = 5,  /* worker slot empty or gone: kernel hash */
	STEER_REASONS = 6,
};

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, WORKERS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} workers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_REASONS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

/* Set by the loader before load. */
volatile const __u32 worker_count = 1;

static __always_inline int count(__u32 reason)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &reason);

	if (value)
		*value += 1;
	/* Never SK_DROP: unparsable traffic is the kernel's and the workers' to judge. */
	return SK_PASS;
}

SEC("sk_reuseport")
int steer_to_owner(struct sk_reuseport_md *ctx)
{
	__u8 header[6 + 1];
	__u32 payload_len, field, key, workers_n, reason;

	if (ctx->len < UDP_HEADER_LEN + 1 + CID_LEN)
		return count(STEER_TRUNCATED);
	payload_len = ctx->len - UDP_HEADER_LEN;
	if (bpf_skb_load_bytes(ctx, UDP_HEADER_LEN, header, sizeof(header)))
		return count(STEER_LOAD_FAIL);

	if (header[0] & 0x80) {
		__u32 dcid_len = header[5];

		if (dcid_len == 0) {
			field = 0;
		} else {
			if (payload_len < 6 + dcid_len)
				return count(STEER_TRUNCATED);
			field = header[6];
		}
		reason = STEER_LONG;
	} else {
		if (!(header[0] & 0x40))
			return count(STEER_NOT_QUIC);
		field = header[1];
		reason = STEER_SHORT;
	}

	workers_n = worker_count;
	if (workers_n == 0)
		workers_n = 1;
	key = field % workers_n;
	if (bpf_sk_select_reuseport(ctx, &workers, &key, 0))
		return count(STEER_NO_SOCKET);
	return count(reason);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
