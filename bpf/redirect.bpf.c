// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Isthmus transparent-mode redirect (issue #7 item 5).
 *
 * Attached to one cgroup v2 by the node agent (node-agent/src/redirect.rs), these programs send
 * TCP connects aimed at a global-service VIP to the agent's listener instead:
 *
 *   cgroup/connect4, cgroup/connect6  rewrite VIP:port to the agent's address and remember the
 *                                     VIP under the socket cookie. connect6 also sees IPv4
 *                                     VIPs dialled as ::ffff:a.b.c.d from dual-stack sockets.
 *   sockops (TCP_CONNECT_CB)          the client's local address is known just before the SYN:
 *                                     record client ip:port -> VIP, which is what the agent can
 *                                     see on its accepted socket (the cookie is not).
 *   sockops (STATE_CB, TCP_CLOSE)     drop the cookie entry when the client socket closes.
 *   cgroup/getpeername4, getpeername6 give the application the VIP back as its peer.
 *
 * Every address is kept in IPv6 form, IPv4 as IPv4-mapped (::ffff:a.b.c.d), so one map serves
 * both families and a v4 VIP dialled from a v6 socket is the same key as from a v4 socket.
 *
 * Build with bpf/build.sh; the object is committed beside this file and embedded by aya.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

/* Return value of cgroup sock_addr and sockops programs: let the syscall go on. */
#define SK_PASS 1

/* An address and port, both in network byte order; IPv4 stored as ::ffff:a.b.c.d.
 * Mirrored by `BpfAddr` in node-agent/src/redirect.rs: keep the two in step. */
struct isthmus_addr {
	__u32 ip6[4];
	__u16 port;
	__u16 pad;
};

/* What connect4/6 remember about a redirected socket, keyed by its cookie. */
struct isthmus_conn {
	struct isthmus_addr vip; /* what the application dialled */
	__u32 via_ipv4;          /* 1 when the rewritten connect goes out over IPv4 */
};

/* VIP:port -> the agent's listener. Written by the agent as the catalog changes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct isthmus_addr);
	__type(value, struct isthmus_addr);
} isthmus_vips SEC(".maps");

/* Client socket cookie -> VIP, for getpeername and for sockops. Deleted at TCP_CLOSE; LRU for
 * the connects that fail before TCP_CONNECT_CB. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct isthmus_conn);
} isthmus_cookies SEC(".maps");

/* Client ip:port -> VIP, read by the agent with its accepted socket's peer address. Not deleted
 * at close: an orphaned client (write then close) reaches TCP_CLOSE as soon as the agent's kernel
 * acks its FIN, which can be before the agent accepts. A reused client ip:port overwrites its
 * entry at TCP_CONNECT_CB, before the SYN, so an old entry is never read for a new connection;
 * LRU bounds the rest. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct isthmus_addr);
	__type(value, struct isthmus_addr);
} isthmus_tuples SEC(".maps");

static __always_inline void set_v4mapped(struct isthmus_addr *a, __u32 ip4)
{
	a->ip6[0] = 0;
	a->ip6[1] = 0;
	a->ip6[2] = bpf_htonl(0x0000ffff);
	a->ip6[3] = ip4;
}

static __always_inline int is_v4mapped(const struct isthmus_addr *a)
{
	return a->ip6[0] == 0 && a->ip6[1] == 0 && a->ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline void remember(void *ctx, const struct isthmus_addr *vip, __u32 via_ipv4)
{
	struct isthmus_conn conn = { .vip = *vip, .via_ipv4 = via_ipv4 };
	__u64 cookie = bpf_get_socket_cookie(ctx);

	bpf_map_update_elem(&isthmus_cookies, &cookie, &conn, BPF_ANY);
}

SEC("cgroup/connect4")
int isthmus_conn4(struct bpf_sock_addr *ctx)
{
	struct isthmus_addr vip = {};
	struct isthmus_addr *agent;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	set_v4mapped(&vip, ctx->user_ip4);
	vip.port = (__u16)ctx->user_port;
	agent = bpf_map_lookup_elem(&isthmus_vips, &vip);
	/* An IPv4 socket can only be sent to an IPv4 agent; userspace refuses the other case. */
	if (!agent || !is_v4mapped(agent))
		return SK_PASS;
	remember(ctx, &vip, 1);
	/* The verifier only accepts full 32-bit stores to the context. */
	ctx->user_ip4 = agent->ip6[3];
	ctx->user_port = (__u32)agent->port;
	return SK_PASS;
}

SEC("cgroup/connect6")
int isthmus_conn6(struct bpf_sock_addr *ctx)
{
	struct isthmus_addr vip = {};
	struct isthmus_addr *agent;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	/* ::ffff:a.b.c.d is looked up as is: it is the key of the IPv4 VIP a.b.c.d. */
	vip.ip6[0] = ctx->user_ip6[0];
	vip.ip6[1] = ctx->user_ip6[1];
	vip.ip6[2] = ctx->user_ip6[2];
	vip.ip6[3] = ctx->user_ip6[3];
	vip.port = (__u16)ctx->user_port;
	agent = bpf_map_lookup_elem(&isthmus_vips, &vip);
	if (!agent)
		return SK_PASS;
	/* An IPv4 agent is dialled as ::ffff:agent, which a dual-stack socket sends over IPv4. */
	remember(ctx, &vip, is_v4mapped(agent));
	ctx->user_ip6[0] = agent->ip6[0];
	ctx->user_ip6[1] = agent->ip6[1];
	ctx->user_ip6[2] = agent->ip6[2];
	ctx->user_ip6[3] = agent->ip6[3];
	ctx->user_port = (__u32)agent->port;
	return SK_PASS;
}

SEC("sockops")
int isthmus_sockops(struct bpf_sock_ops *skops)
{
	struct isthmus_addr client = {};
	struct isthmus_conn *conn;
	__u64 cookie;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		cookie = bpf_get_socket_cookie(skops);
		conn = bpf_map_lookup_elem(&isthmus_cookies, &cookie);
		if (!conn)
			return SK_PASS;
		/* A v6 socket sent to an IPv4 agent has its IPv4 source in local_ip4 at this point
		 * (tcp_v6_connect fills in the mapped v6 source only after tcp_v4_connect returns). */
		if (skops->family == AF_INET || conn->via_ipv4) {
			set_v4mapped(&client, skops->local_ip4);
		} else {
			client.ip6[0] = skops->local_ip6[0];
			client.ip6[1] = skops->local_ip6[1];
			client.ip6[2] = skops->local_ip6[2];
			client.ip6[3] = skops->local_ip6[3];
		}
		/* local_port is in host byte order, unlike every other port here. */
		client.port = bpf_htons((__u16)skops->local_port);
		bpf_map_update_elem(&isthmus_tuples, &client, &conn->vip, BPF_ANY);
		/* Only redirected sockets pay for state callbacks. */
		bpf_sock_ops_cb_flags_set(skops,
					  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
		return SK_PASS;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			cookie = bpf_get_socket_cookie(skops);
			bpf_map_delete_elem(&isthmus_cookies, &cookie);
		}
		return SK_PASS;
	default:
		return SK_PASS;
	}
}

SEC("cgroup/getpeername4")
int isthmus_peer4(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct isthmus_conn *conn = bpf_map_lookup_elem(&isthmus_cookies, &cookie);

	if (!conn || !is_v4mapped(&conn->vip))
		return SK_PASS;
	ctx->user_ip4 = conn->vip.ip6[3];
	ctx->user_port = (__u32)conn->vip.port;
	return SK_PASS;
}

SEC("cgroup/getpeername6")
int isthmus_peer6(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct isthmus_conn *conn = bpf_map_lookup_elem(&isthmus_cookies, &cookie);

	if (!conn)
		return SK_PASS;
	/* A v4 VIP dialled from a v6 socket comes back as ::ffff:a.b.c.d, as it was dialled. */
	ctx->user_ip6[0] = conn->vip.ip6[0];
	ctx->user_ip6[1] = conn->vip.ip6[1];
	ctx->user_ip6[2] = conn->vip.ip6[2];
	ctx->user_ip6[3] = conn->vip.ip6[3];
	ctx->user_port = (__u32)conn->vip.port;
	return SK_PASS;
}

/* GPL-compatible, as the kernel requires of programs that call GPL-only helpers. */
char LICENSE[] SEC("license") = "Dual BSD/GPL";
