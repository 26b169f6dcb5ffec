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
 * An ICMP error about a client's packet to a backend (port unreachable, fragmentation needed)
 * is translated back too (lb_reverse_icmp), so the client's socket hears of it. Errors the
 * client sends about a backend's reply, and errors within hairpin connections, are not.
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
	if (ctx->l4_off) {
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

/*
 * If the packet goes to a service frontend: finds or picks its connection's backend and DNATs
 * the packet to it. Afterwards ctx holds the backend as destination and ctx->svc_* the frontend
 * (ct_create records it for the reverse NAT). Returns 0 or a negative drop reason.
 */
static __always_inline int lb_translate(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now)
{
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP)
		return 0;
	struct service_key skey = {.addr = ctx->daddr, .port = ctx->dport, .proto = ctx->proto};
	struct service_value *svc = bpf_map_lookup_elem(&SERVICES, &skey);
	if (!svc)
		return 0;

	struct ct_key ckey = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	struct ct_value *conn = bpf_map_lookup_elem(&CT, &ckey);
	__u32 backend_addr;
	__u16 backend_port;
	__u8 closing_now = ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST);
	/* A SYN on a closed connection's tuple (client port reuse) is a new connection: it gets a
	 * fresh choice among the backends of now, not the old connection's backend. */
	if (conn && (conn->flags & MESHD_CT_F_SERVICE) && ct_alive(&ckey, conn, now) &&
	    !((ctx->tcp_flags & TCP_FLAG_SYN) && (conn->flags & MESHD_CT_F_CLOSING))) {
		backend_addr = conn->nat_addr;
		backend_port = conn->nat_port;
		if (closing_now) {
			conn->flags |= MESHD_CT_F_CLOSING;
			conn->last_seen_ns = now;
		} else if (now - conn->last_seen_ns > CT_REFRESH_NS) {
			conn->last_seen_ns = now;
		}
	} else {
		/* A later fragment whose first fragment made no choice: nothing to follow. */
		if (!ctx->l4_off)
			return MESHD_DROP_FRAG_NOT_FOUND;
		__u32 count = svc->count;
		if (count == 0)
			return MESHD_DROP_NO_SERVICE_BACKEND;
		struct backend_key bkey = {.frontend = skey, .slot = bpf_get_prandom_u32() % count};
		struct backend_value *backend = bpf_map_lookup_elem(&BACKENDS, &bkey);
		if (!backend)
			return MESHD_DROP_NO_SERVICE_BACKEND;
		backend_addr = backend->addr;
		backend_port = backend->port;
		struct ct_value v = {.last_seen_ns = now,
				     .flags = MESHD_CT_F_SERVICE | (closing_now ? MESHD_CT_F_CLOSING : 0),
				     .nat_addr = backend_addr,
				     .nat_port = backend_port};
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

/*
 * An ICMP error about a packet of a service connection (ct CT_RELATED, entry = the CT entry of
 * the embedded packet's direction, client -> backend): the embedded destination goes back from
 * the backend to the frontend the client sent to, since the client's kernel matches the error to
 * a socket by it; and when the backend itself sent the error, its source becomes the frontend.
 * The ICMP checksum follows each changed word; the embedded IP header's checksum is fixed; the
 * embedded TCP/UDP checksum is left stale, as no receiver checks the checksum of a quoted
 * packet (it is often cut short anyway).
 */
static __always_inline int lb_reverse_icmp(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					   const struct ct_value *entry)
{
	if (!entry || !entry->nat_addr || (entry->flags & (MESHD_CT_F_REPLY | MESHD_CT_F_SERVICE)))
		return 0;
	__u8 ihl_byte;
	if (bpf_skb_load_bytes(skb, l3_off, &ihl_byte, 1) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u32 icmp_off = l3_off + (ihl_byte & 0x0f) * 4;
	__u32 icmp_csum_off = icmp_off + offsetof(struct icmphdr, checksum);
	__u32 inner_off = icmp_off + sizeof(struct icmphdr);
	struct iphdr inner;
	if (bpf_skb_load_bytes(skb, inner_off, &inner, sizeof(inner)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (inner.protocol != IPPROTO_TCP && inner.protocol != IPPROTO_UDP)
		return 0;
	__u32 inner_dport_off = inner_off + inner.ihl * 4 + L4_DPORT_OFF;
	__u16 backend_port;
	if (bpf_skb_load_bytes(skb, inner_dport_off, &backend_port, sizeof(backend_port)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u32 backend_addr = inner.daddr;
	__u32 frontend_addr = entry->nat_addr;
	__u16 frontend_port = entry->nat_port;

	/* Embedded destination address, and the embedded header checksum that covers it. */
	__u16 old_inner_csum = inner.check;
	if (bpf_l3_csum_replace(skb, inner_off + IP_CSUM_OFF, backend_addr, frontend_addr, sizeof(frontend_addr)) < 0)
		return MESHD_DROP_WRITE_ERROR;
	__u16 new_inner_csum;
	if (bpf_skb_load_bytes(skb, inner_off + IP_CSUM_OFF, &new_inner_csum, sizeof(new_inner_csum)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (bpf_skb_store_bytes(skb, inner_off + IP_DADDR_OFF, &frontend_addr, sizeof(frontend_addr), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (bpf_skb_store_bytes(skb, inner_dport_off, &frontend_port, sizeof(frontend_port), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	/* The ICMP checksum covers all three words (no pseudo-header). */
	if (bpf_l4_csum_replace(skb, icmp_csum_off, backend_addr, frontend_addr, sizeof(frontend_addr)) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum_off, old_inner_csum, new_inner_csum, sizeof(new_inner_csum)) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum_off, backend_port, frontend_port, sizeof(frontend_port)) < 0)
		return MESHD_DROP_WRITE_ERROR;

	/* A router on the way keeps its own address as the source. */
	if (ctx->saddr == backend_addr) {
		if (bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, ctx->saddr, frontend_addr, sizeof(frontend_addr)) < 0)
			return MESHD_DROP_WRITE_ERROR;
		if (bpf_skb_store_bytes(skb, l3_off + IP_SADDR_OFF, &frontend_addr, sizeof(frontend_addr), 0) < 0)
			return MESHD_DROP_WRITE_ERROR;
		ctx->saddr = frontend_addr;
	}
	return 0;
}

#endif
