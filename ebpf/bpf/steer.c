// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Traffic steering for nodeagent.
 *
 * cgroup/connect4, cgroup/connect6: a TCP connect() to an intercepted
 *   destination (IP:port, else IP with any port) is rewritten to the proxy;
 *   the destination the workload dialled is remembered by socket cookie.
 * sockops: when such a connection is established, the original destination is
 *   also stored under the client's address and port, which is the peer address
 *   the proxy sees on the accepted socket; both entries are deleted when the
 *   socket reaches TCP_CLOSE (state callback), so nothing leaks.
 * cgroup/getpeername4, cgroup/getpeername6: the workload sees the address it
 *   dialled, not the proxy's.
 *
 * All addresses in maps are 16-byte IPv6 addresses in network byte order, IPv4
 * as IPv4-mapped IPv6 (::ffff:a.b.c.d); all ports are in host byte order.
 *
 * Minimum kernel 5.8 (getpeername hooks 5.8, bpf_get_netns_cookie in sock_addr
 * programs 5.7, bpf_link for cgroups 5.7).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define SOCK_STREAM 1
#define AF_INET 2
#define AF_INET6 10

char __license[] SEC("license") = "Dual BSD/GPL";

struct addr_port {
	__u32 addr[4];
	__u16 port;
	__u16 pad;
};

/* Value of orig_by_cookie and orig_by_client: the destination the workload
 * dialled. family is 4 when the dialled address was IPv4 (plain or mapped). */
struct orig_dst {
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 pad;
};


struct target {
	__u32 addr[4];
	__u16 port;
	__u8 valid;
	__u8 pad;
};

struct config {
	/* Netns cookie of the host network namespace: sockets there go to the
	 * proxy's loopback listener; sockets elsewhere go to pod. */
	__u64 host_netns_cookie;
	/* Sockets with this SO_MARK (the proxy's upstream connections) are
	 * never steered; 0 disables the check. */
	__u32 skip_mark;
	__u32 enabled;
	struct target proxy4; /* IPv4-mapped */
	struct target proxy6;
	struct target pod; /* IPv4-mapped or IPv6 */
};

/* Indices into counters; mirrored in counters.go. */
enum counter {
	COUNTER_REDIRECT_IPV4 = 0,
	COUNTER_REDIRECT_IPV6,
	COUNTER_POD_UNSTEERED,
	COUNTER_SKIPPED_MARK,
	COUNTER_ERRORS,
	COUNTER_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct addr_port);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} intercepts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} steer_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_cookie SEC(".maps");

/* Keyed by the client's address and port: the accepted socket's peer. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct addr_port);
	__type(value, struct orig_dst);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} orig_by_client SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		*v += 1;
}

static __always_inline int is_v4mapped(const __u32 a[4])
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int intercepted(const __u32 a[4], __u16 port)
{
	struct addr_port k = {};

	k.addr[0] = a[0];
	k.addr[1] = a[1];
	k.addr[2] = a[2];
	k.addr[3] = a[3];
	k.port = port;
	if (bpf_map_lookup_elem(&intercepts, &k))
		return 1;
	k.port = 0;
	return bpf_map_lookup_elem(&intercepts, &k) != NULL;
}

static __always_inline struct config *load_config(void)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&steer_config, &zero);

	if (!cfg || !cfg->enabled)
		return NULL;
	return cfg;
}

static __always_inline int skip_marked(struct bpf_sock_addr *ctx, const struct config *cfg)
{
	struct bpf_sock *sk = ctx->sk;

	if (!cfg->skip_mark || !sk)
		return 0;
	if (sk->mark != cfg->skip_mark)
		return 0;
	count(COUNTER_SKIPPED_MARK);
	return 1;
}

static __always_inline int remember(struct bpf_sock_addr *ctx, const struct orig_dst *o)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);

	if (bpf_map_update_elem(&orig_by_cookie, &cookie, o, BPF_ANY)) {
		count(COUNTER_ERRORS);
		return 0;
	}
	return 1;
}

SEC("cgroup/connect4")
int steer_connect4(struct bpf_sock_addr *ctx)
{
	struct config *cfg;
	struct orig_dst o = {};
	const struct target *t;

	if (ctx->type != SOCK_STREAM)
		return 1;
	cfg = load_config();
	if (!cfg)
		return 1;

	o.addr[2] = bpf_htonl(0x0000ffff);
	o.addr[3] = ctx->user_ip4;
	o.port = bpf_ntohs((__u16)ctx->user_port);
	o.family = 4;
	if (!intercepted(o.addr, o.port))
		return 1;
	if (skip_marked(ctx, cfg))
		return 1;

	if (bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie) {
		t = &cfg->proxy4;
		if (!t->valid) {
			count(COUNTER_ERRORS);
			return 1;
		}
	} else {
		t = &cfg->pod;
		if (!t->valid || !is_v4mapped(t->addr)) {
			count(COUNTER_POD_UNSTEERED);
			return 1;
		}
	}
	if (!remember(ctx, &o))
		return 1;
	ctx->user_ip4 = t->addr[3];
	ctx->user_port = bpf_htons(t->port);
	count(COUNTER_REDIRECT_IPV4);
	return 1;
}

SEC("cgroup/connect6")
int steer_connect6(struct bpf_sock_addr *ctx)
{
	struct config *cfg;
	struct orig_dst o = {};
	const struct target *t;
	int mapped;

	if (ctx->type != SOCK_STREAM)
		return 1;
	cfg = load_config();
	if (!cfg)
		return 1;

	o.addr[0] = ctx->user_ip6[0];
	o.addr[1] = ctx->user_ip6[1];
	o.addr[2] = ctx->user_ip6[2];
	o.addr[3] = ctx->user_ip6[3];
	o.port = bpf_ntohs((__u16)ctx->user_port);
	mapped = is_v4mapped(o.addr);
	o.family = mapped ? 4 : 6;
	if (!intercepted(o.addr, o.port))
		return 1;
	if (skip_marked(ctx, cfg))
		return 1;

	if (bpf_get_netns_cookie(ctx) == cfg->host_netns_cookie) {
		/* A dual-stack socket dialling an IPv4-mapped address goes to
		 * the IPv4 listener; a real IPv6 destination prefers the IPv6
		 * listener. */
		if (mapped || !cfg->proxy6.valid)
			t = &cfg->proxy4;
		else
			t = &cfg->proxy6;
		if (!t->valid) {
			count(COUNTER_ERRORS);
			return 1;
		}
	} else {
		t = &cfg->pod;
		if (!t->valid) {
			count(COUNTER_POD_UNSTEERED);
			return 1;
		}
	}
	if (!remember(ctx, &o))
		return 1;
	ctx->user_ip6[0] = t->addr[0];
	ctx->user_ip6[1] = t->addr[1];
	ctx->user_ip6[2] = t->addr[2];
	ctx->user_ip6[3] = t->addr[3];
	ctx->user_port = bpf_htons(t->port);
	count(mapped ? COUNTER_REDIRECT_IPV4 : COUNTER_REDIRECT_IPV6);
	return 1;
}

SEC("cgroup/getpeername4")
int steer_getpeername4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);

	if (!o || o->family != 4)
		return 1;
	ctx->user_ip4 = o->addr[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

SEC("cgroup/getpeername6")
int steer_getpeername6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct orig_dst *o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);

	if (!o)
		return 1;
	ctx->user_ip6[0] = o->addr[0];
	ctx->user_ip6[1] = o->addr[1];
	ctx->user_ip6[2] = o->addr[2];
	ctx->user_ip6[3] = o->addr[3];
	ctx->user_port = bpf_htons(o->port);
	return 1;
}

/* The client end of the connection. Every context field is read
 * unconditionally and the family picks between values: otherwise clang selects
 * between two context fields through a computed pointer, which the verifier
 * rejects for context accesses. */
static __always_inline void sock_client(const struct bpf_sock_ops *skops, struct addr_port *k)
{
	__u32 family = skops->family;
	__u32 local4 = skops->local_ip4;
	__u32 local6[4];
	int v4;

	local6[0] = skops->local_ip6[0];
	local6[1] = skops->local_ip6[1];
	local6[2] = skops->local_ip6[2];
	local6[3] = skops->local_ip6[3];
	/* Pin each value in a register so the loads cannot become one load
	 * through a selected pointer. */
	asm volatile("" : "+r"(local4), "+r"(local6[3]));
	asm volatile("" : "+r"(local6[0]), "+r"(local6[1]), "+r"(local6[2]));
	v4 = family == AF_INET;

	k->addr[0] = v4 ? 0 : local6[0];
	k->addr[1] = v4 ? 0 : local6[1];
	k->addr[2] = v4 ? bpf_htonl(0x0000ffff) : local6[2];
	k->addr[3] = v4 ? local4 : local6[3];
	k->port = (__u16)skops->local_port;
}

SEC("sockops")
int steer_sockops(struct bpf_sock_ops *skops)
{
	struct addr_port k = {};
	struct orig_dst *o;
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		/* Ask for the state callback on steered sockets only, so that
		 * both entries go away however the connection ends. */
		cookie = bpf_get_socket_cookie(skops);
		if (bpf_map_lookup_elem(&orig_by_cookie, &cookie))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
								 BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		cookie = bpf_get_socket_cookie(skops);
		o = bpf_map_lookup_elem(&orig_by_cookie, &cookie);
		if (!o)
			break;
		sock_client(skops, &k);
		if (bpf_map_update_elem(&orig_by_client, &k, o, BPF_ANY))
			count(COUNTER_ERRORS);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] != BPF_TCP_CLOSE)
			break;
		cookie = bpf_get_socket_cookie(skops);
		if (bpf_map_delete_elem(&orig_by_cookie, &cookie))
			break;
		sock_client(skops, &k);
		bpf_map_delete_elem(&orig_by_client, &k);
		break;
	}
	return 1;
}
