/* SPDX-License-Identifier: Apache-2.0 */
/* The single exit of every program: count the reason, report drops and new connections, return
 * the TC action. */
#ifndef MESHD_EXIT_H
#define MESHD_EXIT_H

#include "maps.h"

#define EVENT_WINDOW_NS 1000000000ull

/* Whether this CPU may send one more event now (EVENT_LIMIT); a refusal is counted as lost. A
 * per-CPU window needs no atomics: each CPU's budget is its own. */
static __always_inline int event_budget_take(const struct event_limit *limit, struct event_budget *budget)
{
	if (!limit || !limit->rate || !budget)
		return 1;
	__u64 now = bpf_ktime_get_coarse_ns();
	if (now - budget->window_ns >= EVENT_WINDOW_NS) {
		budget->window_ns = now;
		budget->used = 0;
	}
	if (budget->used >= limit->rate) {
		budget->lost++;
		return 0;
	}
	budget->used++;
	return 1;
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct pkt_ctx *ctx, __u32 type, int reason,
				       const struct event_limit *limit)
{
	__u32 zero = 0;
	struct event_budget *budget = bpf_map_lookup_elem(&EVENT_BUDGET, &zero);
	if (!event_budget_take(limit, budget))
		return;
	struct flow_event *ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
	if (!ev) {
		/* the reader is behind: the packet is still counted in METRICS */
		if (budget)
			budget->lost++;
		return;
	}
	ev->timestamp_ns = bpf_ktime_get_ns();
	ev->event_type = type;
	ev->src_identity = ctx->src_identity;
	ev->dst_identity = ctx->dst_identity;
	ev->saddr = ctx->saddr;
	ev->daddr = ctx->daddr;
	ev->sport = bpf_ntohs(ctx->sport);
	ev->dport = bpf_ntohs(ctx->dport);
	ev->proto = ctx->proto;
	ev->direction = ctx->direction;
	ev->reason = reason;
	ev->ifindex = skb->ingress_ifindex;
	ev->svc_addr = ctx->svc_addr;
	ev->svc_port = bpf_ntohs(ctx->svc_port);
	ev->pad = 0;
	ev->pad2 = 0;
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline int finish(struct __sk_buff *skb, const struct pkt_ctx *ctx, int ret)
{
	__u32 reason = ret < 0 ? -ret : ret;
	__u32 idx = (ctx->direction & 1) * MESHD_REASONS + (reason & (MESHD_REASONS - 1));
	struct metrics_value *m = bpf_map_lookup_elem(&METRICS, &idx);
	if (m) {
		m->packets++;
		m->bytes += skb->len;
	}
	/* Only drops and the first packet of a connection look at EVENT_LIMIT: the established
	 * path pays nothing for events. */
	if (ret < 0 || ctx->ct_created) {
		__u32 zero = 0;
		struct event_limit *limit = bpf_map_lookup_elem(&EVENT_LIMIT, &zero);
		if (ret < 0)
			emit_event(skb, ctx, MESHD_EVENT_DROP, ret, limit);
		else if (limit && (limit->flags & MESHD_EVENT_LIMIT_F_FLOWS))
			emit_event(skb, ctx, MESHD_EVENT_FLOW, ret, limit);
	}
	if (ret < 0)
		return TC_ACT_SHOT;
	return ctx->action;
}

#endif
