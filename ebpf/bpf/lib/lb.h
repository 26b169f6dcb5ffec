/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Service load-balancing (see SERVICES in meshd_abi.h): a connection to a frontend gets one
 * backend, kept in a MESHD_CT_F_SERVICE conntrack entry keyed by the frontend tuple; its packets
 * are DNATed to that backend, and its replies get the frontend back as their source (reverse
 * NAT) from the reply's CT entry.
 *
 * Known gaps: the translation happens per packet below the client's socket, so the client's
 * kernel does not know its VIP connection is to the backend's address: a client connecting to
 * both the VIP and a backend directly may pick the same source port for both, and after DNAT the
 * two share one 4-tuple (Cilium avoids this with connect-time socket load-balancing).
 *
 * A connection keeps its backend while the frontend lists it, and also after, as long as the
 * backend lives (one taken out of the service but still running, not ready say, finishes its
 * connections, as with Kubernetes' conntrack). One whose backend is gone (deleted) is not sent
 * into the void: its next packet gets a fresh pick among the backends of now (lb_backend_kept),
 * whose kernel answers a segment of a connection it does not know with a reset, so the client
 * hears of it at once; a UDP flow simply moves. Only a frontend left without any backend drops.
 *
 * An ICMP error about a client's packet to a backend (port unreachable, fragmentation needed)
 * is translated back too (lb_reverse_icmp), so the client's socket hears of it, and one the
 * client sends about a backend's reply goes to that backend (lb_translate_icmp). Errors within
 * hairpin connections are not translated.
 *
 * A client chosen as its own backend (hairpin) is also SNATed, to MESHD_SERVICE_LOOPBACK_ADDR
 * (see meshd_abi.h); lb_reverse undoes both translations on the replies.
 */
#ifndef MESHD_LB_H
#define MESHD_LB_H

#include <stddef.h>

#include "maps.h"
#include "ct.h"

#define IP_CSUM_OFF offsetof(struct iphdr, check)
#define IP_SADDR_OFF offsetof(struct iphdr, saddr)
#define IP_DADDR_OFF offsetof(struct iphdr, daddr)
/* Ports sit at the same offsets in TCP and UDP headers. */
#define L4_SPORT_OFF 0
#define L4_DPORT_OFF 2

#define SERVICE_LOOPBACK bpf_htonl(MESHD_SERVICE_LOOPBACK_ADDR)

/* The source of a hairpin connection's packets after SNAT, the destination of its replies. */
static __always_inline int is_service_loopback(__u32 addr)
{
	return addr == SERVICE_LOOPBACK;
}

/*
 * Rewrites the address at l3_off + addr_off from old_addr to new_addr and, when the L4 header is
 * in this packet, the port at l4_off + port_off, fixing the IPv4 header checksum and the TCP/UDP
 * checksum (whose pseudo-header covers the addresses). bpf_l4_csum_replace copes with
 * CHECKSUM_PARTIAL packets (what a local socket hands to a veth): there only the pseudo-header
 * part is in the checksum field, and the port change is left to whoever completes it. A UDP
 * checksum of 0 (none) stays 0 (BPF_F_MARK_MANGLED_0). Later fragments carry no L4 header: the
 * first fragment's checksum update covers the whole datagram.
 */
static __always_inline int nat_rewrite(struct __sk_buff *skb, const struct pkt_ctx *ctx, __u32 l3_off,
				       __u32 addr_off, __u32 old_addr, __u32 new_addr, __u32 port_off,
				       __u16 old_port, __u16 new_port)
{
	if (ctx->l4_off && ctx->proto == IPPROTO_ICMP) {
		/* Echo (masquerade, nat.h): the identifier plays the port, whatever port_off says;
		 * the ICMP checksum has no pseudo-header, so only the identifier enters it. */
		if (old_port != new_port) {
			__u32 csum_off = ctx->l4_off + offsetof(struct icmphdr, checksum);
			if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, sizeof(new_port)) < 0 ||
			    bpf_skb_store_bytes(skb, ctx->l4_off + offsetof(struct icmphdr, un.echo.id), &new_port,
						sizeof(new_port), 0) < 0)
				return MESHD_DROP_WRITE_ERROR;
		}
	} else if (ctx->l4_off) {
		__u32 csum_off;
		__u64 mangled0 = 0;
		if (ctx->proto == IPPROTO_TCP) {
			csum_off = ctx->l4_off + offsetof(struct tcphdr, check);
		} else {
			csum_off = ctx->l4_off + offsetof(struct udphdr, check);
			mangled0 = BPF_F_MARK_MANGLED_0;
		}
		if (bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					BPF_F_PSEUDO_HDR | mangled0 | sizeof(new_addr)) < 0)
			return MESHD_DROP_WRITE_ERROR;
		if (old_port != new_port) {
			if (bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled0 | sizeof(new_port)) < 0)
				return MESHD_DROP_WRITE_ERROR;
			if (bpf_skb_store_bytes(skb, ctx->l4_off + port_off, &new_port, sizeof(new_port), 0) < 0)
				return MESHD_DROP_WRITE_ERROR;
		}
	}
	if (bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (bpf_skb_store_bytes(skb, l3_off + addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

/* Slots lb_backend_kept looks through for a connection's backend once its slot changed. */
#define LB_BACKEND_SCAN 64

/* Whether addr is still somewhere: an endpoint of this node, or behind another node. */
static __always_inline int lb_backend_exists(__u32 addr)
{
	struct endpoint_key ekey = {.addr = addr};
	if (bpf_map_lookup_elem(&ENDPOINTS, &ekey))
		return 1;
	struct ipcache_value *remote = ipcache_lookup(addr);
	return remote && remote->tunnel_endpoint;
}

/*
 * Whether conn (a MESHD_CT_F_SERVICE entry of frontend skey) keeps its backend: while the
 * frontend lists it, or else while it exists (see the top of this file). The slot it was last
 * seen in is looked at first (one lookup: the common case); after the frontend's backends
 * changed it is looked for among the first LB_BACKEND_SCAN slots, and its new slot remembered.
 * A frontend with more backends than that keeps its connections: a backend is taken from under
 * a connection only when it is known to be gone.
 */
static __always_inline int lb_backend_kept(const struct service_key *skey, const struct service_value *svc,
					   struct ct_value *conn)
{
	/* Slots from count on may still hold backends of before (nothing has to clear them). */
	__u32 count = svc->count;
	struct backend_key bkey = {.frontend = *skey, .slot = conn->backend_slot};
	struct backend_value *b = bkey.slot < count ? bpf_map_lookup_elem(&BACKENDS, &bkey) : 0;
	if (b && b->addr == conn->nat_addr && b->port == conn->nat_port)
		return 1;
	if (count > LB_BACKEND_SCAN)
		return 1;
	for (__u32 slot = 0; slot < LB_BACKEND_SCAN; slot++) {
		if (slot >= count)
			break;
		bkey.slot = slot;
		b = bpf_map_lookup_elem(&BACKENDS, &bkey);
		if (b && b->addr == conn->nat_addr && b->port == conn->nat_port) {
			conn->backend_slot = slot;
			return 1;
		}
	}
	return lb_backend_exists(conn->nat_addr);
}

/*
 * DNATs the packet in ctx, sent to frontend skey (svc its SERVICES value), to its connection's
 * backend: the one conn (the live CT entry of the packet's tuple as sent, ct_find; 0 if none)
 * recorded, or a fresh pick for a new connection. Afterwards ctx holds the backend as
 * destination and ctx->svc_* the frontend (ct_create records it for the reverse NAT). Returns 0
 * or a negative drop reason.
 */
static __always_inline int lb_dnat(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now,
				   struct ct_value *conn, const struct service_key *skey,
				   const struct service_value *svc)
{
	struct ct_key ckey = {};
	ct_key_of(ctx, &ckey);
	__u32 backend_addr;
	__u16 backend_port;
	__u8 closing_now = ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST);
	/* A SYN on a closed connection's tuple (client port reuse) is a new connection: it gets a
	 * fresh choice among the backends of now, not the old connection's backend; and so does a
	 * connection whose backend is gone (see the top of this file). */
	if (conn && (conn->flags & MESHD_CT_F_SERVICE) &&
	    !((ctx->tcp_flags & TCP_FLAG_SYN) && (conn->flags & MESHD_CT_F_CLOSING)) &&
	    lb_backend_kept(skey, svc, conn)) {
		backend_addr = conn->nat_addr;
		backend_port = conn->nat_port;
		if (closing_now) {
			conn->flags |= MESHD_CT_F_CLOSING;
			conn->last_seen_ns = now;
		} else if ((__s64)(now - conn->last_seen_ns) > (__s64)CT_REFRESH_NS) {
			conn->last_seen_ns = now;
		}
	} else {
		/* A later fragment whose first fragment made no choice: nothing to follow. */
		if (!ctx->l4_off)
			return MESHD_DROP_FRAG_NOT_FOUND;
		__u32 count = svc->count;
		/* externalTrafficPolicy Local: no backend on this node is its own reason, so an
		 * operator tells a load balancer sending to the wrong node from an empty service. */
		if (count == 0)
			return (svc->flags & MESHD_SERVICE_F_LOCAL) ? MESHD_DROP_NO_LOCAL_BACKEND
								     : MESHD_DROP_NO_SERVICE_BACKEND;
		struct backend_key bkey = {.frontend = *skey, .slot = bpf_get_prandom_u32() % count};
		struct backend_value *backend = bpf_map_lookup_elem(&BACKENDS, &bkey);
		if (!backend)
			return MESHD_DROP_NO_SERVICE_BACKEND;
		backend_addr = backend->addr;
		backend_port = backend->port;
		struct ct_value v = {.last_seen_ns = now,
				     .flags = MESHD_CT_F_SERVICE | (closing_now ? MESHD_CT_F_CLOSING : 0),
				     .nat_addr = backend_addr,
				     .nat_port = backend_port,
				     .backend_slot = bkey.slot};
		bpf_map_update_elem(&CT, &ckey, &v, BPF_ANY);
	}

	int ret = nat_rewrite(skb, ctx, l3_off, IP_DADDR_OFF, ctx->daddr, backend_addr, L4_DPORT_OFF, ctx->dport,
			      backend_port);
	if (ret < 0)
		return ret;
	ctx->svc_addr = ctx->daddr;
	ctx->svc_port = ctx->dport;
	ctx->daddr = backend_addr;
	ctx->dport = backend_port;

	/* Hairpin: the client is its own backend (see meshd_abi.h). The port stays: the client's
	 * kernel made (address, port) unique among its connections, and the loopback address
	 * stands for this one client only. */
	if (backend_addr == ctx->saddr) {
		ret = nat_rewrite(skb, ctx, l3_off, IP_SADDR_OFF, ctx->saddr, SERVICE_LOOPBACK, L4_SPORT_OFF,
				  ctx->sport, ctx->sport);
		if (ret < 0)
			return ret;
		ctx->saddr = SERVICE_LOOPBACK;
	}
	return 0;
}

/*
 * If the packet goes to a service frontend: finds or picks its connection's backend and DNATs
 * the packet to it (lb_dnat). conn is the live CT entry of the packet's tuple as sent
 * (ct_find), 0 if none. Returns 0 or a negative drop reason.
 */
static __always_inline int lb_translate(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now,
					struct ct_value *conn)
{
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return 0;
	struct service_key skey = {.addr = ctx->daddr, .port = ctx->dport, .proto = ctx->proto};
	struct service_value *svc = bpf_map_lookup_elem(&SERVICES, &skey);
	if (!svc)
		return 0;
	return lb_dnat(skb, ctx, l3_off, now, conn, &skey, svc);
}

/*
 * On the uplink (from-netdev): the same for public frontends only (NodePort on this node's IP,
 * external and load balancer IPs; see meshd_abi.h). A VIP is the mesh's own address: a packet
 * from outside claiming one is not load-balanced. Returns 1 if DNATed, 0 if the packet is not
 * for a public frontend, or a negative drop reason.
 */
static __always_inline int lb_translate_public(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					       __u64 now)
{
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return 0;
	struct service_key skey = {.addr = ctx->daddr, .port = ctx->dport, .proto = ctx->proto};
	struct service_value *svc = bpf_map_lookup_elem(&SERVICES, &skey);
	if (!svc || !(svc->flags & (MESHD_SERVICE_F_NODE_PORT | MESHD_SERVICE_F_EXTERNAL_IP)))
		return 0;
	int ret = lb_dnat(skb, ctx, l3_off, now, ct_find(ctx, now), &skey, svc);
	return ret < 0 ? ret : 1;
}

/* A reply of a service connection (its CT entry has MESHD_CT_F_REV_NAT): the source goes back
 * from the backend to the frontend the client connected to, and a hairpin reply's destination
 * from the service loopback address to the client, which is its sender. */
static __always_inline int lb_reverse(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
				      const struct ct_value *entry)
{
	if (!entry || !(entry->flags & MESHD_CT_F_REV_NAT))
		return 0;
	int ret;
	if (is_service_loopback(ctx->daddr)) {
		ret = nat_rewrite(skb, ctx, l3_off, IP_DADDR_OFF, ctx->daddr, ctx->saddr, L4_DPORT_OFF, ctx->dport,
				  ctx->dport);
		if (ret < 0)
			return ret;
		ctx->daddr = ctx->saddr;
	}
	__u32 addr = entry->nat_addr;
	__u16 port = entry->nat_port;
	ret = nat_rewrite(skb, ctx, l3_off, IP_SADDR_OFF, ctx->saddr, addr, L4_SPORT_OFF, ctx->sport, port);
	if (ret < 0)
		return ret;
	ctx->saddr = addr;
	ctx->sport = port;
	return 0;
}

/* The packet an ICMP error quotes: where it sits in the skb, and its addresses and ports. */
struct icmp_quote {
	__u32 icmp_csum_off;
	__u32 ip_off;
	__u32 ports_off; /* its TCP/UDP source port; the destination port follows */
	struct iphdr ip;
	__u16 sport; /* network byte order */
	__u16 dport;
};

/* 0 with *q filled for a quoted TCP/UDP packet or ICMP echo request (its identifier as sport,
 * ports_off pointing at it), 1 for anything else, < 0 on a short packet. */
static __always_inline int icmp_quote_load(struct __sk_buff *skb, __u32 l3_off, struct icmp_quote *q)
{
	__u8 ihl_byte;
	if (bpf_skb_load_bytes(skb, l3_off, &ihl_byte, 1) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u32 icmp_off = l3_off + (ihl_byte & 0x0f) * 4;
	q->icmp_csum_off = icmp_off + offsetof(struct icmphdr, checksum);
	q->ip_off = icmp_off + sizeof(struct icmphdr);
	if (bpf_skb_load_bytes(skb, q->ip_off, &q->ip, sizeof(q->ip)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (q->ip.protocol == IPPROTO_ICMP) {
		struct icmphdr inner;
		if (bpf_skb_load_bytes(skb, q->ip_off + q->ip.ihl * 4, &inner, sizeof(inner)) < 0)
			return MESHD_DROP_INVALID_PACKET;
		if (inner.type != ICMP_ECHO)
			return 1;
		q->ports_off = q->ip_off + q->ip.ihl * 4 + offsetof(struct icmphdr, un.echo.id);
		q->sport = inner.un.echo.id;
		q->dport = 0;
		return 0;
	}
	if (q->ip.protocol != IPPROTO_TCP && q->ip.protocol != IPPROTO_UDP)
		return 1;
	q->ports_off = q->ip_off + q->ip.ihl * 4;
	__u16 ports[2];
	if (bpf_skb_load_bytes(skb, q->ports_off, ports, sizeof(ports)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	q->sport = ports[0];
	q->dport = ports[1];
	return 0;
}

/*
 * Rewrites one side of the quoted packet (addr_off IP_SADDR_OFF or IP_DADDR_OFF, port_off
 * L4_SPORT_OFF or L4_DPORT_OFF): its address, its IP header checksum and its port, and the
 * ICMP checksum (no pseudo-header) by each changed word. The quoted TCP/UDP checksum is left
 * stale: no receiver checks the checksum of a quoted packet (often cut short anyway).
 */
static __always_inline int icmp_quote_rewrite(struct __sk_buff *skb, const struct icmp_quote *q, __u32 addr_off,
					      __u32 old_addr, __u32 new_addr, __u32 port_off, __u16 old_port,
					      __u16 new_port)
{
	__u16 old_csum = q->ip.check;
	if (bpf_l3_csum_replace(skb, q->ip_off + IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
		return MESHD_DROP_WRITE_ERROR;
	__u16 new_csum;
	if (bpf_skb_load_bytes(skb, q->ip_off + IP_CSUM_OFF, &new_csum, sizeof(new_csum)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (bpf_skb_store_bytes(skb, q->ip_off + addr_off, &new_addr, sizeof(new_addr), 0) < 0 ||
	    bpf_skb_store_bytes(skb, q->ports_off + port_off, &new_port, sizeof(new_port), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (bpf_l4_csum_replace(skb, q->icmp_csum_off, old_addr, new_addr, sizeof(new_addr)) < 0 ||
	    bpf_l4_csum_replace(skb, q->icmp_csum_off, old_csum, new_csum, sizeof(new_csum)) < 0 ||
	    bpf_l4_csum_replace(skb, q->icmp_csum_off, old_port, new_port, sizeof(new_port)) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

/* The outer address of an ICMP error: only the IP header checksum covers it. */
static __always_inline int icmp_outer_rewrite(struct __sk_buff *skb, __u32 l3_off, __u32 addr_off, __u32 old_addr,
					      __u32 new_addr)
{
	if (bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0 ||
	    bpf_skb_store_bytes(skb, l3_off + addr_off, &new_addr, sizeof(new_addr), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

/*
 * An ICMP error about a client's packet to a backend (ct CT_RELATED, entry = the CT entry of the
 * quoted packet's direction, client -> backend): the quoted destination goes back from the
 * backend to the frontend the client sent to, since the client's kernel matches the error to a
 * socket by it; and when the backend itself sent the error, its source becomes the frontend (a
 * router on the way keeps its own).
 */
static __always_inline int lb_reverse_icmp(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					   const struct ct_value *entry)
{
	if (!entry || !entry->nat_addr || (entry->flags & (MESHD_CT_F_REPLY | MESHD_CT_F_SERVICE)))
		return 0;
	struct icmp_quote q;
	int ret = icmp_quote_load(skb, l3_off, &q);
	if (ret != 0)
		return ret < 0 ? ret : 0;
	__u32 backend_addr = q.ip.daddr;
	ret = icmp_quote_rewrite(skb, &q, IP_DADDR_OFF, backend_addr, entry->nat_addr, L4_DPORT_OFF, q.dport,
				 entry->nat_port);
	if (ret < 0)
		return ret;
	if (ctx->saddr == backend_addr) {
		ret = icmp_outer_rewrite(skb, l3_off, IP_SADDR_OFF, ctx->saddr, entry->nat_addr);
		if (ret < 0)
			return ret;
		ctx->saddr = entry->nat_addr;
	}
	return 0;
}

/*
 * The other way: an ICMP error a client sends about a reply it got from a frontend (quoting
 * frontend -> client, e.g. port unreachable for a UDP reply to a closed socket) goes to that
 * connection's backend, quoting the backend, as if the client had talked to it directly. Runs
 * before forwarding looks at the destination, like lb_translate. Not for hairpin connections.
 */
static __always_inline int lb_translate_icmp(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off)
{
	if (ctx->proto != IPPROTO_ICMP || !icmp_is_error(ctx->icmp_type))
		return 0;
	struct icmp_quote q;
	int ret = icmp_quote_load(skb, l3_off, &q);
	if (ret != 0)
		return ret < 0 ? ret : 0;
	if (q.ip.saddr != ctx->daddr)
		return 0;
	struct service_key skey = {.addr = q.ip.saddr, .port = q.sport, .proto = q.ip.protocol};
	if (!bpf_map_lookup_elem(&SERVICES, &skey))
		return 0;
	/* The connection's frontend entry, keyed as the client sent: client -> frontend. */
	struct ct_key ckey = {
		.saddr = q.ip.daddr, .daddr = q.ip.saddr, .sport = q.dport, .dport = q.sport, .proto = q.ip.protocol};
	struct ct_value *conn = bpf_map_lookup_elem(&CT, &ckey);
	if (!conn || !(conn->flags & MESHD_CT_F_SERVICE) || conn->nat_addr == ctx->saddr)
		return 0;
	__u32 backend_addr = conn->nat_addr;
	ret = icmp_quote_rewrite(skb, &q, IP_SADDR_OFF, q.ip.saddr, backend_addr, L4_SPORT_OFF, q.sport,
				 conn->nat_port);
	if (ret < 0)
		return ret;
	ret = icmp_outer_rewrite(skb, l3_off, IP_DADDR_OFF, ctx->daddr, backend_addr);
	if (ret < 0)
		return ret;
	ctx->daddr = backend_addr;
	return 0;
}

/* On delivery to an endpoint, by the connection's CT verdict ct (entry: its CT entry): a reply
 * of a service connection gets its frontend back (lb_reverse), an ICMP error about one its
 * quoted frontend (lb_reverse_icmp). 0 or a drop reason. */
static __always_inline int lb_reverse_ct(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, int ct,
					 const struct ct_value *entry)
{
	if (ct == CT_REPLY)
		return lb_reverse(skb, ctx, l3_off, entry);
	if (ct == CT_RELATED)
		return lb_reverse_icmp(skb, ctx, l3_off, entry);
	return 0;
}

#endif
