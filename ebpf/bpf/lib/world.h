/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Destinations outside the mesh (see "Leaving the mesh" in meshd_abi.h): classified and routed
 * by the node's FIB. from-endpoint routes world-bound packets itself instead of handing them to
 * the node's input path: after masquerade their source is the node's own address, which the
 * input path would drop as a martian (and strict rp_filter would judge by the endpoint's veth).
 */
#ifndef MESHD_WORLD_H
#define MESHD_WORLD_H

#include <stddef.h>

#include "maps.h"
#include "nat.h"

#ifndef AF_INET
#define AF_INET 2
#endif

#define IP_TTL_OFF offsetof(struct iphdr, ttl)

/* What the FIB said about a destination without endpoint or ipcache entry. */
#define WORLD_ROUTED 0    /* forwarded by the node: hop holds the egress device and MACs */
#define WORLD_NO_NEIGH 1  /* forwarded, but the next hop's MAC is not resolved yet */
#define WORLD_VIA_STACK 2 /* forwarded, but the node's stack has to (MTU, TTL): no masquerade */
#define WORLD_HOST 3      /* one of the node's own addresses */
/* or'ed into world_egress's mode: the packet must keep its source (no masquerade) */
#define WORLD_KEEP_SOURCE 0x100

/* The part of a FIB answer forwarding needs (struct bpf_fib_lookup is 64 bytes of stack). */
struct world_hop {
	__u32 ifindex;
	__u32 nexthop; /* network byte order */
	__u8 dmac[6];
	__u8 smac[6];
	/* in: bytes the caller will add to the packet before forwarding it (the DSR option,
	 * lib/dsr.h), for the MTU check; out: the egress MTU when the FIB said the packet would
	 * not fit it (WORLD_VIA_STACK), 0 otherwise */
	__u32 extra_len;
	__u32 mtu;
};

/*
 * Looks up the route of the packet in ctx as the node would forward it from the endpoint's
 * veth. Returns WORLD_* (hop filled for WORLD_ROUTED and WORLD_NO_NEIGH) or
 * MESHD_DROP_UNKNOWN_DEST when the node has no route for it. This and world_egress are global
 * functions: the verifier checks each once, not once per path of from-endpoint that reaches
 * it, and each has its own stack frame (from-endpoint's stack limit is 512 bytes in all).
 */
__attribute__((noinline)) int world_route(struct __sk_buff *skb, const struct pkt_ctx *ctx, __u32 l3_off,
					  struct world_hop *hop)
{
	if (!ctx || !hop)
		return MESHD_DROP_INVALID_PACKET;
	__u8 ttl;
	if (bpf_skb_load_bytes(skb, l3_off + IP_TTL_OFF, &ttl, 1) < 0)
		return MESHD_DROP_INVALID_PACKET;
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.l4_protocol = ctx->proto;
	/* A GSO packet (TCP from the endpoint's stack, up to 64 KiB) leaves as segments of its
	 * gso_size: with tot_len 0 the kernel judges it by is_skb_forwardable(), which knows that,
	 * instead of refusing its total length as bigger than the MTU (which sent every bulk
	 * transfer's first bursts through the stack, unmasqueraded). */
	fib.tot_len = skb->gso_segs > 1 ? 0 : skb->len - l3_off + hop->extra_len;
	fib.ifindex = skb->ingress_ifindex;
	fib.ipv4_src = ctx->saddr;
	fib.ipv4_dst = ctx->daddr;
	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	int route;
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		route = WORLD_ROUTED;
		break;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		route = WORLD_NO_NEIGH;
		break;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		/* Local (or broadcast/multicast): the node's own business. */
		return WORLD_HOST;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		/* Bigger than the egress MTU: the stack fragments it or, with DF, tells the sender
		 * (or the caller does, lib/dsr.h). The lookup left the MTU in mtu_result. */
		hop->mtu = fib.mtu_result;
		return WORLD_VIA_STACK;
	default:
		return MESHD_DROP_UNKNOWN_DEST;
	}
	/* The last hop's TTL: the stack sends the time-exceeded error. */
	if (ttl <= 1)
		return WORLD_VIA_STACK;
	hop->ifindex = fib.ifindex;
	/* With a gateway, the lookup put it in ipv4_dst. */
	hop->nexthop = fib.ipv4_dst;
	__builtin_memcpy(hop->dmac, fib.dmac, 6);
	__builtin_memcpy(hop->smac, fib.smac, 6);
	return route;
}

/* Forwards a packet world_route found a route for, as the node's forwarding would: TTL
 * decremented, then out of the egress device to the next hop. */
static __always_inline int world_forward(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					 const struct world_hop *hop, int route)
{
	/* TTL and protocol share a 16-bit word of the header checksum. */
	__u16 old_word;
	if (bpf_skb_load_bytes(skb, l3_off + IP_TTL_OFF, &old_word, sizeof(old_word)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u16 new_word = old_word;
	((__u8 *)&new_word)[0] = ((__u8 *)&old_word)[0] - 1;
	if (bpf_l3_csum_replace(skb, l3_off + offsetof(struct iphdr, check), old_word, new_word, sizeof(new_word)) <
		    0 ||
	    bpf_skb_store_bytes(skb, l3_off + IP_TTL_OFF, &new_word, sizeof(new_word), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (route == WORLD_NO_NEIGH) {
		struct bpf_redir_neigh nh = {.nh_family = AF_INET, .ipv4_nh = hop->nexthop};
		ctx->action = bpf_redirect_neigh(hop->ifindex, &nh, sizeof(nh), 0);
		return MESHD_FWD_WORLD;
	}
	__u8 macs[12];
	__builtin_memcpy(macs, hop->dmac, 6);
	__builtin_memcpy(macs + 6, hop->smac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	ctx->action = bpf_redirect(hop->ifindex, 0);
	return MESHD_FWD_WORLD;
}

/* Routes the packet in ctx as the node's forwarding would, its addresses as they are: where
 * the FIB says the stack has to (a local address, bigger than the egress MTU, the TTL's last
 * hop), it does. Returns MESHD_FWD_WORLD, MESHD_FWD_STACK (ctx->action set) or a drop reason. */
static __always_inline int world_route_forward(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off)
{
	struct world_hop hop = {};
	int route = world_route(skb, ctx, l3_off, &hop);
	if (route < 0)
		return route;
	if (route == WORLD_HOST || route == WORLD_VIA_STACK) {
		ctx->action = TC_ACT_OK;
		return MESHD_FWD_STACK;
	}
	return world_forward(skb, ctx, l3_off, &hop, route);
}

/*
 * The tail of from-endpoint for a routed world destination: masquerade (unless switched off,
 * the destination is in NO_MASQ, or the packet is a reply of, or an error about, a connection
 * that started outside: WORLD_KEEP_SOURCE in mode), then forwarding (route: mode's low byte).
 * Returns MESHD_FWD_WORLD or a drop reason.
 */
__attribute__((noinline)) int world_egress(struct __sk_buff *skb, struct pkt_ctx *ctx, const struct world_hop *hop,
					   __u32 l3_off, __u32 mode)
{
	if (!ctx || !hop)
		return MESHD_DROP_INVALID_PACKET;
	__u32 zero = 0;
	struct datapath_config *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	if (!cfg)
		return MESHD_DROP_NO_CONFIG;
	if ((cfg->flags & MESHD_CONFIG_F_MASQUERADE) && !(mode & WORLD_KEEP_SOURCE) && !nat_excluded(ctx->daddr)) {
		int ret = nat_masquerade(skb, ctx, l3_off, cfg, ct_now());
		if (ret < 0)
			return ret;
	}
	return world_forward(skb, ctx, l3_off, hop, mode & 0xff);
}

#endif
