/* SPDX-License-Identifier: Apache-2.0 */
/* The single exit of every program: count the reason, report drops and new connections, return
 * the TC action. */
#ifndef MESHD_EXIT_H
#define MESHD_EXIT_H

#include "maps.h"

#define EVENT_WINDOW_NS 1000000000ull

/* Whether this CPU may send one more event at `now` (EVENT_LIMIT); a refusal is counted as
 * lost. A per-CPU window needs no atomics: each CPU's budget is its own. */
static __always_inline int event_budget_take(const struct event_limit *limit, struct event_budget *budget, __u64 now)
{
	if (!limit || !limit->rate || !budget)
		return 1;
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

/* What one event takes in EVENTS: the record and the ring buffer's 8-byte header, rounded up
 * to 8 bytes as the kernel does. */
#define EVENT_RING_BYTES ((sizeof(struct flow_event) + 8 + 7) & ~7ull)

/* The reader is not woken per event: in a VM, bpf_ringbuf_submit's wakeup (an irq_work, a
 * self-IPI) cost the packet about 8 us whenever the reader had caught up, which is every
 * event at a low connection rate (BENCHMARKS.md, flow events). The agent polls EVENTS on a
 * short timer instead (crates/agent/src/monitor.rs), and is woken only by the event that fills
 * the ring past half: a flood is read at once rather than lost. Only the event that crosses
 * the mark wakes, so a reader that stays behind does not make every event pay. */
static __always_inline __u64 event_wakeup_flags(void)
{
	__u64 unread = bpf_ringbuf_query(&EVENTS, BPF_RB_AVAIL_DATA);
	if (unread >= MESHD_EVENTS_BYTES / 2 && unread < MESHD_EVENTS_BYTES / 2 + EVENT_RING_BYTES)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct pkt_ctx *ctx, __u32 type, int reason,
				       const struct event_limit *limit)
{
	/* One clock read for the budget and the timestamp, none if conntrack read it already:
	 * each read of the coarse clock cost about 20 ns, the fine one (bpf_ktime_get_ns, the
	 * record's stamp before) as much, for a stamp finer than a flow's report needs. */
	__u64 now = ctx->now ? ctx->now : bpf_ktime_get_coarse_ns();
	__u32 zero = 0;
	struct event_budget *budget = bpf_map_lookup_elem(&EVENT_BUDGET, &zero);
	if (!event_budget_take(limit, budget, now))
		return;
	struct flow_event *ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
	if (!ev) {
		/* the reader is behind: the packet is still counted in METRICS */
		if (budget)
			budget->lost++;
		return;
	}
	ev->timestamp_ns = now;
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
	bpf_ringbuf_submit(ev, event_wakeup_flags());
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
