/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Connection tracking: just enough state to let replies and related ICMP errors of allowed
 * connections through without a policy lookup, and to skip re-checking policy for established
 * connections while the policy has not changed. Entries live in an LRU map, so an idle flood
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

/* Refreshing last_seen on every packet would make every CPU write the same cache line: an
 * established connection's entries are written at most once per interval (and when their
 * state changes: closing, reopening, a new policy verdict). */
#define CT_REFRESH_NS 1000000000ull

/* Conntrack's clock. The coarse clock (CLOCK_MONOTONIC_COARSE, a tick behind at most) is
 * plenty for lifetimes of seconds and hours, and skips the clock-source read of
 * bpf_ktime_get_ns(), which was about an eighth of from_endpoint's cost under BPF_PROG_RUN
 * (read_tsc in a perf profile on the 2-vCPU EPYC VM, BENCHMARKS.md). */
static __always_inline __u64 ct_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/*
 * The established fast path's clock (lib/fwd_cache.h): conntrack's coarse clock as this CPU first
 * read it in the current jiffy. bpf_jiffies64() is a plain load (the verifier inlines it on
 * 64-bit JITs) and so is the per-CPU array lookup, so a packet no longer calls the clock helper;
 * a CPU calls it once per tick. The coarse clock moves only when the tick advances jiffies and
 * then timekeeping, so the cached value is the clock's, except when the read that filled it raced
 * a tick (jiffies moved, timekeeping not yet): then it keeps the previous tick's value until the
 * next one, at most two ticks behind instead of one. Lifetimes are 60 s and more (the fast path
 * takes no closing entry), the refresh interval a second. Where a program can be preempted on its
 * CPU (BPF_PROG_RUN, PREEMPT_RT; not tc in softirq otherwise), one preempted between reading
 * the clock and writing the cache can leave a value as old as that preemption under the current
 * jiffies: entries then look younger by as much (a refresh or an expiry seen that much later).
 */
static __always_inline __u64 ct_now_cached(void)
{
	__u32 zero = 0;
	__u64 jiffies = bpf_jiffies64();
	struct ct_clock *c = bpf_map_lookup_elem(&CT_CLOCK, &zero);
	if (!c)
		return ct_now();
	if (c->jiffies != jiffies) {
		c->now_ns = ct_now();
		/* The value before its key, so that a reader preempting this one mid-way finds an
		 * old key rather than an old value under the current one. */
		asm volatile("" ::: "memory");
		c->jiffies = jiffies;
	}
	return c->now_ns;
}

static __always_inline int ct_alive_proto(__u8 proto, const struct ct_value *v, __u64 now)
{
	__u64 lifetime = MESHD_CT_LIFETIME_OTHER_NS;
	if (proto == IPPROTO_TCP)
		lifetime = (v->flags & MESHD_CT_F_CLOSING) ? MESHD_CT_LIFETIME_CLOSING_NS : MESHD_CT_LIFETIME_TCP_NS;
	/* Signed: a stamp from the fine clock (an entry written from user space) may be up to a
	 * tick ahead of the coarse now; that entry is alive, not 584 years old. */
	return (__s64)(now - v->last_seen_ns) < (__s64)lifetime;
}

static __always_inline int ct_alive(const struct ct_key *key, const struct ct_value *v, __u64 now)
{
	return ct_alive_proto(key->proto, v, now);
}

static __always_inline void ct_reverse(const struct ct_key *k, struct ct_key *r)
{
	r->saddr = k->daddr;
	r->daddr = k->saddr;
	r->sport = k->dport;
	r->dport = k->sport;
	r->proto = k->proto;
}

/* FIN/RST closes both directions; SYN on a closing tuple reopens it (port reuse). */
static __always_inline void ct_touch(struct ct_key *key, struct ct_value *v, struct pkt_ctx *ctx, __u64 now)
{
	if (ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) {
		v->flags |= MESHD_CT_F_CLOSING;
		v->last_seen_ns = now;
		struct ct_key rkey = {};
		ct_reverse(key, &rkey);
		struct ct_value *r = bpf_map_lookup_elem(&CT, &rkey);
		if (r)
			r->flags |= MESHD_CT_F_CLOSING;
		return;
	}
	if ((ctx->tcp_flags & TCP_FLAG_SYN) && (v->flags & MESHD_CT_F_CLOSING))
		v->flags &= ~MESHD_CT_F_CLOSING;
	if ((__s64)(now - v->last_seen_ns) > (__s64)CT_REFRESH_NS)
		v->last_seen_ns = now;
}

static __always_inline void ct_key_of(const struct pkt_ctx *ctx, struct ct_key *key)
{
	key->saddr = ctx->saddr;
	key->daddr = ctx->daddr;
	key->sport = ctx->sport;
	key->dport = ctx->dport;
	key->proto = ctx->proto;
}

/* The entry of the packet's tuple as it stands in ctx, live or not, or 0. */
static __always_inline struct ct_value *ct_entry(const struct pkt_ctx *ctx)
{
	struct ct_key key = {};
	ct_key_of(ctx, &key);
	return bpf_map_lookup_elem(&CT, &key);
}

/* The live entry of the packet's tuple as it stands in ctx, or 0. */
static __always_inline struct ct_value *ct_find(const struct pkt_ctx *ctx, __u64 now)
{
	struct ct_value *v = ct_entry(ctx);
	return v && ct_alive_proto(ctx->proto, v, now) ? v : 0;
}

/* Classifies the packet; *entry is the connection's entry: for CT_ESTABLISHED to record a fresh
 * policy verdict in, for CT_REPLY to reverse-NAT by, for CT_RELATED (an ICMP error) the entry of
 * the embedded packet's direction. One lookup in the steady state, none when the caller already
 * found the live entry of this very tuple (found, from ct_find; 0 = look it up here). */
static __always_inline int ct_lookup(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now,
				     struct ct_value **entry, struct ct_value *found)
{
	struct ct_key key = {};
	ct_key_of(ctx, &key);
	struct ct_value *v = found;
	if (!v) {
		v = bpf_map_lookup_elem(&CT, &key);
		if (v && !ct_alive(&key, v, now))
			v = 0;
	}
	if (v) {
		ct_touch(&key, v, ctx, now);
		*entry = v;
		return (v->flags & MESHD_CT_F_REPLY) ? CT_REPLY : CT_ESTABLISHED;
	}

	/* The LRU may have evicted (or lifetimes expired) only the reply half of a live
	 * connection: recreate it from the original half. */
	struct ct_key rkey = {};
	ct_reverse(&key, &rkey);
	v = bpf_map_lookup_elem(&CT, &rkey);
	if (v && !(v->flags & (MESHD_CT_F_REPLY | MESHD_CT_F_SERVICE)) && ct_alive(&rkey, v, now)) {
		/* The original half of a service connection knows the frontend to reverse-NAT to. */
		struct ct_value reply = {.last_seen_ns = now,
					 .flags = MESHD_CT_F_REPLY | (v->nat_addr ? MESHD_CT_F_REV_NAT : 0),
					 .nat_addr = v->nat_addr,
					 .nat_port = v->nat_port};
		bpf_map_update_elem(&CT, &key, &reply, BPF_ANY);
		*entry = bpf_map_lookup_elem(&CT, &key);
		return CT_REPLY;
	}

	if (ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type)) {
		struct ct_key inner = {};
		if (parse_icmp_inner(skb, l3_off, &inner) < 0)
			return CT_NEW;
		v = bpf_map_lookup_elem(&CT, &inner);
		if (v && ct_alive(&inner, v, now)) {
			*entry = v;
			return CT_RELATED;
		}
	}
	return CT_NEW;
}

static __always_inline void ct_create(struct pkt_ctx *ctx, __u64 now, __u32 policy_revision)
{
	/* ICMP errors never open a connection. */
	if (ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type))
		return;
	struct ct_key key = {
		.saddr = ctx->saddr, .daddr = ctx->daddr, .sport = ctx->sport, .dport = ctx->dport, .proto = ctx->proto};
	__u32 closing = (ctx->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST)) ? MESHD_CT_F_CLOSING : 0;
	/* A service connection (DNATed, see lb.h): both halves remember the frontend, and the
	 * reply half turns the source of replies back into it. */
	struct ct_value v = {.last_seen_ns = now,
			     .flags = closing,
			     .policy_revision = policy_revision,
			     .nat_addr = ctx->svc_addr,
			     .nat_port = ctx->svc_port};
	bpf_map_update_elem(&CT, &key, &v, BPF_ANY);
	struct ct_key rkey = {};
	ct_reverse(&key, &rkey);
	struct ct_value r = {.last_seen_ns = now,
			     .flags = MESHD_CT_F_REPLY | closing | (ctx->svc_addr ? MESHD_CT_F_REV_NAT : 0),
			     .nat_addr = ctx->svc_addr,
			     .nat_port = ctx->svc_port};
	bpf_map_update_elem(&CT, &rkey, &r, BPF_ANY);
	ctx->ct_created = 1;
}

#endif
