/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Direct server return for public frontends (see DSR in meshd_abi.h), both ends of it in
 * from-netdev:
 * - the entry node (dsr_forward): a connection from outside balanced to a backend on another
 *   node keeps the client's address; its first packet (TCP SYN; every UDP datagram) carries
 *   the frontend in the DSR option, inserted after the fixed IPv4 header;
 * - the backend's node (dsr_take_option): takes the option out before delivery and hands the
 *   frontend to conntrack, which keeps it in the connection's entries exactly as for a
 *   frontend of its own (ct_create; a tuple known with another frontend is a new connection,
 *   see ingress_verdict in deliver.h), so from-endpoint's
 *   lb_reverse gives the replies the frontend as source and world routing takes them straight
 *   to the client. No map of its own: the CT entries are per connection already, live exactly
 *   as long as the connection, are looked up by the reply path anyway (no extra lookup per
 *   reply), and ICMP errors about the connection get the frontend back too (lb_reverse_icmp).
 *
 * The option is taken out rather than left for the endpoint: its stack would ignore an unknown
 * option, but every packet with options takes the slow path of IP input, and the endpoint
 * should see what the client sent.
 *
 * Known gaps (DSR's own): an ICMP error a router on the way sends about a reply, or the client
 * sends about one, goes to the frontend's address (the entry node), which knows nothing of the
 * reply.
 */
#ifndef MESHD_DSR_H
#define MESHD_DSR_H

#include <stddef.h>

#include "maps.h"
#include "ct.h"
#include "lb.h"
#include "world.h"
#include "native.h"

/* The option in 4-byte words of the header length. */
#define DSR_OPT_WORDS (MESHD_DSR_OPT_LEN / 4)
#define IP_MAX_IHL 15
#define IP_DF 0x4000
#define IP_FRAG_OFF_OFF offsetof(struct iphdr, frag_off)
/* The ICMP error's IP header: internetwork control precedence, as the kernel's own. */
#define ICMP_ERROR_TOS 0xc0
#define ICMP_FRAG_NEEDED_CODE 4

_Static_assert(sizeof(struct dsr_option) == MESHD_DSR_OPT_LEN, "the option is 8 bytes on the wire");

/* Does a connection of this protocol to a remote backend go DSR on this node? */
static __always_inline int dsr_enabled(const struct datapath_config *cfg, __u8 proto)
{
	if (!(cfg->flags & MESHD_CONFIG_F_NATIVE))
		return 0;
	if (proto == IPPROTO_TCP)
		return cfg->flags & MESHD_CONFIG_F_DSR_TCP;
	if (proto == IPPROTO_UDP)
		return cfg->flags & MESHD_CONFIG_F_DSR_UDP;
	return 0;
}

/* The entry node: the connection just created for ctx goes DSR for its whole life
 * (MESHD_CT_F_DSR on its entry), whatever the mode becomes. */
static __always_inline void dsr_mark_connection(const struct pkt_ctx *ctx, __u64 now)
{
	struct ct_value *entry = ct_find(ctx, now);
	if (entry)
		entry->flags |= MESHD_CT_F_DSR;
}

/* Does this packet carry the option? A TCP connection's SYN (a retransmitted one too: the
 * first may be lost), every UDP datagram with its header (a later fragment belongs to the
 * first's). */
static __always_inline int dsr_carries_option(const struct pkt_ctx *ctx)
{
	if (!ctx->l4_off)
		return 0;
	return ctx->proto == IPPROTO_UDP || (ctx->proto == IPPROTO_TCP && (ctx->tcp_flags & TCP_FLAG_SYN));
}

/*
 * Changes the header's first word (version/ihl, tos, tot_len) by words 4-byte words and the
 * IP checksum by the option's bytes coming (words > 0) or going: the grown or shrunk room of
 * bpf_skb_adjust_room lies right after the fixed header, where the option is (or goes).
 */
static __always_inline int dsr_fix_header(struct __sk_buff *skb, __u32 l3_off, const __u8 old[4], int words,
					  const struct dsr_option *opt)
{
	__u8 now[4];
	__builtin_memcpy(now, old, sizeof(now));
	now[0] = (old[0] & 0xf0) | ((old[0] + words) & 0x0f);
	__u16 tot_len = ((__u16)old[2] << 8 | old[3]) + words * 4;
	now[2] = tot_len >> 8;
	now[3] = tot_len & 0xff;
	__u32 from, to;
	__builtin_memcpy(&from, old, sizeof(from));
	__builtin_memcpy(&to, now, sizeof(to));
	__s64 opt_sum = words > 0 ? bpf_csum_diff(0, 0, (__be32 *)opt, sizeof(*opt), 0)
				  : bpf_csum_diff((__be32 *)opt, sizeof(*opt), 0, 0, 0);
	if (opt_sum < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, from, to, sizeof(to)) < 0 ||
	    bpf_l3_csum_replace(skb, l3_off + IP_CSUM_OFF, 0, opt_sum, 0) < 0 ||
	    bpf_skb_store_bytes(skb, l3_off, now, sizeof(now), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

/* Inserts the option naming ctx's frontend (svc_addr:svc_port) after the fixed IPv4 header,
 * before any option the client sent. Returns 0 or a drop reason. */
static __always_inline int dsr_insert_option(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off)
{
	/* Clients' IP options are filtered on most of the internet; a header with more than 52
	 * bytes of them has no room for ours. */
	if (ctx->ihl > IP_MAX_IHL - DSR_OPT_WORDS)
		return MESHD_DROP_INVALID_PACKET;
	__u8 old[4];
	if (bpf_skb_load_bytes(skb, l3_off, old, sizeof(old)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	/* Flags 0: only a CHECKSUM_UNNECESSARY verdict is reset (the receiver checks again); a
	 * local sender's CHECKSUM_PARTIAL keeps its offsets, which count from the L4 header that
	 * does not move. */
	if (bpf_skb_adjust_room(skb, MESHD_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	struct dsr_option opt = {
		.kind = MESHD_DSR_OPT_TYPE, .len = MESHD_DSR_OPT_LEN, .port = ctx->svc_port, .addr = ctx->svc_addr};
	if (bpf_skb_store_bytes(skb, l3_off + sizeof(struct iphdr), &opt, sizeof(opt), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	int ret = dsr_fix_header(skb, l3_off, old, DSR_OPT_WORDS, &opt);
	if (ret < 0)
		return ret;
	ctx->ihl += DSR_OPT_WORDS;
	if (ctx->l4_off)
		ctx->l4_off += MESHD_DSR_OPT_LEN;
	return 0;
}

/*
 * On the backend's node, a packet for a local endpoint: if the option follows its fixed
 * header, takes it out (checksum fixed) and, for the header-bearing packet of a TCP/UDP
 * connection, sets ctx's frontend to the one it names for conntrack to keep. Returns 1 if the
 * option was there, 0 if not, or a drop reason.
 */
static __always_inline int dsr_take_option(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off)
{
	if (ctx->ihl < 5 + DSR_OPT_WORDS)
		return 0;
	struct dsr_option opt;
	if (bpf_skb_load_bytes(skb, l3_off + sizeof(struct iphdr), &opt, sizeof(opt)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (opt.kind != MESHD_DSR_OPT_TYPE || opt.len != MESHD_DSR_OPT_LEN)
		return 0;
	__u8 old[4];
	if (bpf_skb_load_bytes(skb, l3_off, old, sizeof(old)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	if (bpf_skb_adjust_room(skb, -MESHD_DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	int ret = dsr_fix_header(skb, l3_off, old, -DSR_OPT_WORDS, &opt);
	if (ret < 0)
		return ret;
	ctx->ihl -= DSR_OPT_WORDS;
	if (ctx->l4_off) {
		ctx->l4_off -= MESHD_DSR_OPT_LEN;
		if ((ctx->proto == IPPROTO_TCP || ctx->proto == IPPROTO_UDP) && opt.addr && opt.port) {
			ctx->svc_addr = opt.addr;
			ctx->svc_port = opt.port;
		}
	}
	return 1;
}

/*
 * Replaces the packet in ctx (DNATed to a backend: client -> backend, option not inserted) by
 * ICMP fragmentation needed from node_ip to its client, next-hop MTU mtu - the option, quoting
 * the packet as the client sent it (the frontend as destination, so its kernel finds the
 * socket; the base header and the first 8 bytes of L4, which hold the ports and TCP's
 * sequence number), sent back out of the device it came in by to the hop it came from.
 * Returns MESHD_FWD_FRAG_NEEDED (ctx->action set) or a drop reason. A global function: its
 * 70 bytes of frame are built on a stack frame of its own.
 */
__attribute__((noinline)) int dsr_frag_needed(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u32 mtu,
					      __u32 node_ip)
{
	if (!ctx)
		return MESHD_DROP_INVALID_PACKET;
	struct ethhdr eth;
	struct iphdr quoted;
	__u8 l4[8];
	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0 ||
	    bpf_skb_load_bytes(skb, l3_off, &quoted, sizeof(quoted)) < 0 ||
	    bpf_skb_load_bytes(skb, ctx->l4_off, l4, sizeof(l4)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	/* Back to what the client sent: the frontend as destination, the base header only (the
	 * client's kernel finds the L4 header by ihl). */
	quoted.ihl = 5;
	quoted.daddr = ctx->svc_addr;
	quoted.check = 0;
	quoted.check = csum_fold_s64(bpf_csum_diff(0, 0, (__be32 *)&quoted, sizeof(quoted), 0));
	__builtin_memcpy(l4 + L4_DPORT_OFF, &ctx->svc_port, sizeof(ctx->svc_port));

	struct icmphdr icmp = {.type = ICMP_DEST_UNREACH, .code = ICMP_FRAG_NEEDED_CODE};
	icmp.un.frag.mtu = bpf_htons(mtu - MESHD_DSR_OPT_LEN);
	__s64 sum = bpf_csum_diff(0, 0, (__be32 *)&icmp, sizeof(icmp), 0);
	sum = bpf_csum_diff(0, 0, (__be32 *)&quoted, sizeof(quoted), sum);
	sum = bpf_csum_diff(0, 0, (__be32 *)l4, sizeof(l4), sum);
	icmp.checksum = csum_fold_s64(sum);

	__u16 tot_len = sizeof(struct iphdr) + sizeof(icmp) + sizeof(quoted) + sizeof(l4);
	struct iphdr ip = {.version = 4,
			   .ihl = 5,
			   .tos = ICMP_ERROR_TOS,
			   .tot_len = bpf_htons(tot_len),
			   .ttl = 64,
			   .protocol = IPPROTO_ICMP,
			   .saddr = node_ip,
			   .daddr = ctx->saddr};
	ip.check = csum_fold_s64(bpf_csum_diff(0, 0, (__be32 *)&ip, sizeof(ip), 0));

	/* To the hop the packet came from: swap the MACs. */
	__u8 macs[12];
	__builtin_memcpy(macs, eth.h_source, 6);
	__builtin_memcpy(macs + 6, eth.h_dest, 6);

	__u32 icmp_off = l3_off + sizeof(ip);
	__u32 quote_off = icmp_off + sizeof(icmp);
	if (bpf_skb_change_tail(skb, l3_off + tot_len, 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0 ||
	    bpf_skb_store_bytes(skb, l3_off, &ip, sizeof(ip), 0) < 0 ||
	    bpf_skb_store_bytes(skb, icmp_off, &icmp, sizeof(icmp), 0) < 0 ||
	    bpf_skb_store_bytes(skb, quote_off, &quoted, sizeof(quoted), 0) < 0 ||
	    bpf_skb_store_bytes(skb, quote_off + sizeof(quoted), l4, sizeof(l4), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	ctx->action = bpf_redirect(skb->ingress_ifindex, 0);
	return MESHD_FWD_FRAG_NEEDED;
}

/*
 * The entry node's end (from public_to_remote; ctx: client -> backend, DNATed, conntrack
 * done): routes the packet to the backend's node as native routing does, with the option when
 * it carries one (dsr_carries_option), checked against the egress MTU with the option in.
 * Returns MESHD_FWD_NATIVE, MESHD_FWD_STACK, MESHD_FWD_FRAG_NEEDED (ctx->action set) or a drop
 * reason.
 */
static __always_inline int dsr_forward(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
				       const struct datapath_config *cfg)
{
	if (!dsr_carries_option(ctx))
		return native_forward(skb, ctx, l3_off);
	struct world_hop hop = {.extra_len = MESHD_DSR_OPT_LEN};
	int route = world_route(skb, ctx, l3_off, &hop);
	if (route < 0)
		return route;
	if (route == WORLD_VIA_STACK && hop.mtu) {
		__u16 frag_off;
		if (bpf_skb_load_bytes(skb, l3_off + IP_FRAG_OFF_OFF, &frag_off, sizeof(frag_off)) < 0)
			return MESHD_DROP_INVALID_PACKET;
		/* With DF the sender has to hear the MTU it can use with the option in; without,
		 * the stack fragments (every fragment keeps the option: it has the copied bit). */
		if (frag_off & bpf_htons(IP_DF))
			return dsr_frag_needed(skb, ctx, l3_off, hop.mtu, cfg->node_ip);
	}
	int ret = dsr_insert_option(skb, ctx, l3_off);
	if (ret < 0)
		return ret;
	if (route == WORLD_HOST || route == WORLD_VIA_STACK) {
		ctx->action = TC_ACT_OK;
		return MESHD_FWD_STACK;
	}
	ret = world_forward(skb, ctx, l3_off, &hop, route);
	return ret == MESHD_FWD_WORLD ? MESHD_FWD_NATIVE : ret;
}

#endif
