/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking: just enough state to let replies and related ICMP errors of allowed
 * connections through without a policy lookup. Entries live in an LRU map, so an idle flood
 * evicts the oldest connections instead of failing inserts; lifetimes bound how long a stale
 * entry can still admit a "reply".
 */
#ifndef MESHD_CT_H
#define MESHD_CT_H

#include "maps.h"
#include "parse.h"

#define CT_NEW 0
#define CT_ESTABLISHED 1
#define CT_REPLY 2
#define CT_RELATED 3

/* Refreshing last_seen on every packet would make every CPU write the same cache line. */
#define CT_REFRESH_NS 1000000000ull

static __always_inline int ct_alive(const struct ct_key *key, const struct ct_value *v, __u64 now)
{
	__u64 lifetime = MESHD_CT_LIFETIME_OTHER_NS;
	if (key->proto == IPPROTO_TCP)
		lifetime = (v->flags & MESHD_CT_F_CLOSING) ? MESHD_CT_LIFETIME_CLOSING_NS : MESHD_CT_LIFETIME_TCP_NS;
	return now - v->last_seen_ns < lifetime;
}

static __always_inline void ct_touch(struct ct_value *v, struct pkt_ctx *ctx, __u64 now, __u32 extra_flags)
{
	__u32 flags = v->flags | extra_flags;
	if (ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		flags |= MESHD_CT_F_CLOSING;
	else if (ctx->tcp_flags & TCP_FLAG_SYN)
		flags &= ~MESHD_CT_F_CLOSING; /* a new connection reusing the tuple */
	if (flags != v->flags)
		v->flags = flags;
	if (now - v->last_seen_ns > CT_REFRESH_NS || flags & MESHD_CT_F_CLOSING)
		v->last_seen_ns = now;
}

static __always_inline int ct_lookup(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now)
{
	struct ct_key fwd = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	struct ct_key rev = {
		.saddr = ctx->daddr, .daddr = ctx->saddr, .sport = ctx->dport, .dport = ctx->sport, .proto = ctx->proto};
	struct ct_value *v;

	v = bpf_map_lookup_elem(&CT, &rev);
	if (v && ct_alive(&rev, v, now)) {
		ct_touch(v, ctx, now, MESHD_CT_F_SEEN_REPLY);
		return CT_REPLY;
	}
	v = bpf_map_lookup_elem(&CT, &fwd);
	if (v && ct_alive(&fwd, v, now)) {
		ct_touch(v, ctx, now, 0);
		return CT_ESTABLISHED;
	}
	if (ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type)) {
		struct ct_key inner = {};
		if (parse_icmp_inner(skb, l3_off, &inner) < 0)
			return CT_NEW;
		v = bpf_map_lookup_elem(&CT, &inner);
		if (v && ct_alive(&inner, v, now))
			return CT_RELATED;
		struct ct_key inner_rev = {.saddr = inner.daddr,
					   .daddr = inner.saddr,
					   .sport = inner.dport,
					   .dport = inner.sport,
					   .proto = inner.proto};
		v = bpf_map_lookup_elem(&CT, &inner_rev);
		if (v && ct_alive(&inner_rev, v, now))
			return CT_RELATED;
	}
	return CT_NEW;
}

static __always_inline void ct_create(struct pkt_ctx *ctx, __u64 now)
{
	/* ICMP errors never open a connection. */
	if (ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type))
		return;
	struct ct_key fwd = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	struct ct_value v = {.last_seen_ns = now};
	if (ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
		v.flags |= MESHD_CT_F_CLOSING;
	bpf_map_update_elem(&CT, &fwd, &v, BPF_ANY);
}

#endif
