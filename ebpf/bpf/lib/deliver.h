/* SPDX-License-Identifier: Apache-2.0 */
/* Handing a packet to a local endpoint: its ingress verdict, then the packet itself. */
#ifndef MESHD_DELIVER_H
#define MESHD_DELIVER_H

#include "maps.h"
#include "ct.h"
#include "policy.h"
#include "lb.h"

/* Rewrites the Ethernet header to gateway -> endpoint, as if the node had routed the packet. */
static __always_inline int rewrite_macs(struct __sk_buff *skb, const struct endpoint_value *ep)
{
	__u8 macs[12];
	__builtin_memcpy(macs, ep->mac, 6);
	__builtin_memcpy(macs + 6, ep->node_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

/* Connection tracking and ingress policy for a packet from `peer` to the local endpoint
 * ctx->dst_identity. Replies and related errors ride on their connection's verdict; the first
 * direction is checked when the connection is new and once again after every policy change
 * (the entry then carries `revision`), so a change cuts established connections too. The CT
 * verdict (*entry: the connection's entry, for delivery) or a drop reason. */
static __always_inline int ingress_verdict(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now,
					   __u32 revision, __u32 peer, struct ct_value **entry)
{
	int ct = ct_lookup(skb, ctx, l3_off, now, entry, 0);
	struct ct_value *e = *entry;
	/* The same tuple as an earlier connection through another frontend (a client's source
	 * port used again, through another node's node port or this node's own, while the first
	 * connection's closed entries live on): a new connection, whose entries must name the
	 * frontend its replies leave from, or every reply leaves from the old one and the client
	 * never hears back. A packet naming no frontend (svc_addr 0: the rest of a DSR connection
	 * after its SYN) says nothing. As from-endpoint does for its own clients. */
	if (ct == CT_ESTABLISHED && e && ctx->svc_addr &&
	    (e->nat_addr != ctx->svc_addr || e->nat_port != ctx->svc_port))
		ct = CT_NEW;
	if (ct == CT_NEW || (ct == CT_ESTABLISHED && e && e->policy_revision != revision)) {
		int ret = policy_check(ctx->dst_identity, peer, ctx, MESHD_DIR_INGRESS);
		if (ret < 0)
			return ret;
		if (ct == CT_NEW)
			ct_create(ctx, now, revision);
		else if (e)
			e->policy_revision = revision;
	}
	return ct;
}

/* Delivers a packet that passed ingress_verdict (ct, entry) to the local endpoint dst: a reply
 * of a service connection (a client here, its backend on another node) gets its frontend source
 * back (lib/lb.h), the MACs become gateway -> endpoint, and the packet goes straight into the
 * endpoint's namespace, skipping the veth's transmit path and backlog. `retype`: the packet may
 * carry a packet type that is not PACKET_HOST (see overlay_deliver). */
static __always_inline int deliver_to_endpoint(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, int ct,
					       struct ct_value *entry, const struct endpoint_value *dst, int retype)
{
	int ret = lb_reverse_ct(skb, ctx, l3_off, ct, entry);
	if (ret < 0)
		return ret;
	ret = rewrite_macs(skb, dst);
	if (ret < 0)
		return ret;
	if (retype && bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return MESHD_DROP_WRITE_ERROR;
	ctx->action = bpf_redirect_peer(dst->ifindex, 0);
	return MESHD_FWD_LOCAL;
}

#endif
