/* SPDX-License-Identifier: Apache-2.0 */
/* The single exit of every program: count the reason, report drops, return the TC action. */
#ifndef MESHD_EXIT_H
#define MESHD_EXIT_H

#include "maps.h"

static __always_inline void emit_drop_event(struct __sk_buff *skb, const struct pkt_ctx *ctx, int reason)
{
	struct drop_event *ev = bpf_ringbuf_reserve(&EVENTS, sizeof(*ev), 0);
	if (!ev)
		return; /* the reader is behind: the drop is still counted in METRICS */
	ev->timestamp_ns = bpf_ktime_get_ns();
	ev->event_type = MESHD_EVENT_DROP;
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
	ev->pad = 0;
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
	if (ret < 0) {
		emit_drop_event(skb, ctx, ret);
		return TC_ACT_SHOT;
	}
	return ctx->action;
}

#endif
