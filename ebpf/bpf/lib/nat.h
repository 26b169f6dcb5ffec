/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Masquerade (see NAT in meshd_abi.h): world-bound flows of local endpoints leave with the
 * node's address and a port of the CONFIG range (from-endpoint, nat_masquerade); their replies
 * and the ICMP errors about them get the endpoint back on the uplink (from-netdev,
 * nat_reverse). A mapping lives exactly as long as its connection's CT entry.
 */
#ifndef MESHD_NAT_H
#define MESHD_NAT_H

#include "maps.h"
#include "ct.h"
#include "lb.h"

/* Is the connection of the endpoint's tuple still alive in CT? */
static __always_inline int nat_conn_alive(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport, __u8 proto, __u64 now)
{
	struct ct_key k = {.saddr = saddr, .daddr = daddr, .sport = sport, .dport = dport, .proto = proto};
	struct ct_value *v = bpf_map_lookup_elem(&CT, &k);
	return v && ct_alive(&k, v, now);
}

/* Does the reverse entry rev (keyed rkey: remote -> node_ip:nat_port) belong to a live
 * connection? Its endpoint's tuple is (rev addr:port -> rkey's source). */
static __always_inline int nat_reverse_alive(const struct nat_key *rkey, const struct nat_value *rev, __u64 now)
{
	return nat_conn_alive(rev->addr, rkey->saddr, rev->port, rkey->sport, rkey->proto, now);
}

static __always_inline int nat_excluded(__u32 daddr)
{
	struct no_masq_key key = {.prefixlen = 32, .addr = daddr};
	return bpf_map_lookup_elem(&NO_MASQ, &key) != 0;
}

/* State of one port claim, shared with the bpf_loop callback. */
struct nat_claim {
	struct nat_key rkey;
	struct nat_value rev;
	__u64 now;
	__u32 min;
	__u32 size;
	__u32 start;
	int port; /* the claimed port (network byte order), or MESHD_DROP_NAT_NO_PORT */
};

/* One try of nat_claim_port, on port min + (start + i) % size: 1 (stop) when claimed. */
static long nat_claim_try(__u32 i, void *data)
{
	struct nat_claim *c = data;
	__u32 off = c->start + i;
	if (off >= c->size)
		off -= c->size;
	__u16 port = bpf_htons((__u16)(c->min + off));
	c->rkey.dport = port;
	/* NOEXIST: of two CPUs claiming one free port, one wins. */
	if (bpf_map_update_elem(&NAT, &c->rkey, &c->rev, BPF_NOEXIST) == 0) {
		c->port = port;
		return 1;
	}
	struct nat_value *cur = bpf_map_lookup_elem(&NAT, &c->rkey);
	if (!cur)
		return 0;
	if (cur->addr == c->rev.addr && cur->port == c->rev.port) {
		c->port = port; /* this flow's own (its forward entry was lost) */
		return 1;
	}
	if (!nat_reverse_alive(&c->rkey, cur, c->now)) {
		bpf_map_update_elem(&NAT, &c->rkey, &c->rev, BPF_ANY);
		c->port = port;
		return 1;
	}
	return 0;
}

/*
 * Claims a NAT port for the endpoint's flow in ctx: the endpoint's own port if it lies in the
 * range and is free, otherwise the first free one of at most MESHD_NAT_RETRIES ports tried in
 * order from a random start. A port is free for this flow when no reverse entry has its
 * (remote, node_ip, port) tuple, or the entry's connection is gone. Writes the reverse entry
 * and returns the port (network byte order) or MESHD_DROP_NAT_NO_PORT. The tries run under
 * bpf_loop: unrolled, or as a bounded loop, they multiplied from-endpoint's verifier states
 * past its limits (minutes of verification, then a refusal).
 */
static __always_inline int nat_claim_port(const struct pkt_ctx *ctx, const struct datapath_config *cfg, __u64 now)
{
	__u32 min = cfg->nat_port_min;
	__u32 max = cfg->nat_port_max;
	if (!min || max < min)
		return MESHD_DROP_NAT_NO_PORT;
	struct nat_claim c = {
		.rkey = {.saddr = ctx->daddr, .daddr = cfg->node_ip, .sport = ctx->dport, .proto = ctx->proto},
		.rev = {.addr = ctx->saddr, .port = ctx->sport},
		.now = now,
		.min = min,
		.size = max - min + 1,
		.port = MESHD_DROP_NAT_NO_PORT,
	};
	__u32 want = bpf_ntohs(ctx->sport);
	c.start = (want >= min && want <= max) ? want - min : bpf_get_prandom_u32() % c.size;
	__u32 tries = c.size < MESHD_NAT_RETRIES ? c.size : MESHD_NAT_RETRIES;
	bpf_loop(tries, nat_claim_try, &c, 0);
	return c.port;
}

/*
 * Masquerades a packet of a local endpoint to world (ctx: the endpoint's tuple, kept as it is
 * for metrics and events). A flow with a live mapping keeps it; a new one claims a port. The
 * packet's source address and port (ICMP echo: identifier) become node_ip and the NAT port,
 * checksums fixed. Returns 0 or a negative drop reason.
 */
static __always_inline int nat_masquerade(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					  const struct datapath_config *cfg, __u64 now)
{
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP &&
	    !(ctx->proto == IPPROTO_ICMP && ctx->icmp_type == ICMP_ECHO))
		return 0; /* only what a port or identifier can tell apart; the rest leaves as sent */
	struct nat_key fkey = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	struct nat_value *fwd = bpf_map_lookup_elem(&NAT, &fkey);
	__u16 port = 0;
	int mapped = 0;
	if (fwd && fwd->addr == cfg->node_ip) {
		port = fwd->port;
		struct nat_key rkey = {
			.saddr = ctx->daddr, .daddr = cfg->node_ip, .sport = ctx->dport, .dport = port, .proto = ctx->proto};
		struct nat_value *rev = bpf_map_lookup_elem(&NAT, &rkey);
		if (!rev) {
			/* The LRU evicted the reverse half alone: without it replies go nowhere. */
			struct nat_value mine = {.addr = ctx->saddr, .port = ctx->sport};
			mapped = bpf_map_update_elem(&NAT, &rkey, &mine, BPF_NOEXIST) == 0;
		} else {
			/* After this flow's connection expired, another flow may have taken the port. */
			mapped = rev->addr == ctx->saddr && rev->port == ctx->sport;
		}
	}
	if (!mapped) {
		/* A later fragment without its first one's mapping has no port to follow. */
		if (!ctx->l4_off)
			return MESHD_DROP_FRAG_NOT_FOUND;
		int claimed = nat_claim_port(ctx, cfg, now);
		if (claimed < 0)
			return claimed;
		port = (__u16)claimed;
		struct nat_value v = {.addr = cfg->node_ip, .port = port};
		bpf_map_update_elem(&NAT, &fkey, &v, BPF_ANY);
	}
	return nat_rewrite(skb, ctx, l3_off, IP_SADDR_OFF, ctx->saddr, cfg->node_ip, L4_SPORT_OFF, ctx->sport, port);
}

/*
 * On the uplink, for a packet to node_ip: if it is a reply of a masqueraded flow (or an ICMP
 * error about one), gives it the endpoint back as destination (an error: also inside the
 * quoted packet), checksums fixed, and updates ctx. Returns 1 if translated, 0 if the packet is
 * the node's own business, < 0 to drop.
 */
static __always_inline int nat_reverse(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now)
{
	if (ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type)) {
		struct icmp_quote q;
		int ret = icmp_quote_load(skb, l3_off, &q);
		if (ret != 0)
			return ret < 0 ? ret : 0;
		/* The quoted packet went node_ip:nat_port -> remote: its replies' tuple is the key. */
		struct nat_key rkey = {
			.saddr = q.ip.daddr, .daddr = q.ip.saddr, .sport = q.dport, .dport = q.sport, .proto = q.ip.protocol};
		struct nat_value *rev = bpf_map_lookup_elem(&NAT, &rkey);
		if (!rev || !nat_reverse_alive(&rkey, rev, now))
			return 0;
		__u32 addr = rev->addr;
		__u16 port = rev->port;
		ret = icmp_quote_rewrite(skb, &q, IP_SADDR_OFF, q.ip.saddr, addr, L4_SPORT_OFF, q.sport, port);
		if (ret < 0)
			return ret;
		ret = icmp_outer_rewrite(skb, l3_off, IP_DADDR_OFF, ctx->daddr, addr);
		if (ret < 0)
			return ret;
		ctx->daddr = addr;
		return 1;
	}
	if (ctx->proto != IPPROTO_TCP && ctx->proto != IPPROTO_UDP &&
	    !(ctx->proto == IPPROTO_ICMP && ctx->icmp_type == ICMP_ECHOREPLY))
		return 0;
	struct nat_key rkey = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	struct nat_value *rev = bpf_map_lookup_elem(&NAT, &rkey);
	if (!rev || !nat_reverse_alive(&rkey, rev, now))
		return 0;
	__u32 addr = rev->addr;
	__u16 port = rev->port;
	int ret = nat_rewrite(skb, ctx, l3_off, IP_DADDR_OFF, ctx->daddr, addr, L4_DPORT_OFF, ctx->dport, port);
	if (ret < 0)
		return ret;
	ctx->daddr = addr;
	ctx->dport = port;
	return 1;
}

#endif
