/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Delivery of a packet another node tunnelled to us, after its outer headers are gone: by the
 * VXLAN device (from-overlay, the tunnel key) or by the program on the uplink (from-netdev,
 * lib/vxlan.h). The VNI carries the sender's identity; it is only believed if the outer source
 * is a known node of the cluster the identity belongs to (or it is `world`, a client from
 * outside a node forwards to a public endpoint's backend). Then ingress policy and delivery
 * straight into the endpoint's namespace. Replies of service connections (a client here, its
 * backend on another node) get their frontend source back before delivery (lib/lb.h).
 */
#ifndef MESHD_OVERLAY_H
#define MESHD_OVERLAY_H

#include "maps.h"
#include "parse.h"
#include "ct.h"
#include "policy.h"
#include "lb.h"
#include "deliver.h"

/* outer_src: network byte order; vni: the sender's identity. */
static __always_inline int overlay_deliver(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 outer_src, __u32 vni)
{
	ctx->src_identity = vni;
	struct node_key nkey = {.addr = outer_src};
	struct node_value *node = bpf_map_lookup_elem(&NODES, &nkey);
	if (!node)
		return MESHD_DROP_UNKNOWN_NODE;
	/* `world` is how a node forwards a client from outside the mesh to a backend here (a
	 * public endpoint, from-netdev): any known node may claim it. That grants nothing: the
	 * same node gets `world` for a bare packet on the underlay (from-netdev) anyway. */
	if (identity_cluster(vni) != node->cluster_id && vni != MESHD_IDENTITY_WORLD)
		return MESHD_DROP_INVALID_IDENTITY;

	__u32 l3_off = 0;
	int ret = parse_packet(skb, ctx, &l3_off);
	if (ret < 0)
		return ret;
	if (ret == PARSE_ARP)
		return MESHD_DROP_UNSUPPORTED_L3; /* senders resolve nothing across the overlay */

	struct endpoint_key dkey = {.addr = ctx->daddr};
	struct endpoint_value *dst = bpf_map_lookup_elem(&ENDPOINTS, &dkey);
	if (!dst)
		return MESHD_DROP_UNKNOWN_DEST;
	ctx->dst_identity = dst->identity;

	__u32 zero = 0;
	struct datapath_config *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	if (!cfg)
		return MESHD_DROP_NO_CONFIG;

	__u64 now = ct_now();
	ctx->now = now;
	struct ct_value *entry = 0;
	int ct = ingress_verdict(skb, ctx, l3_off, now, cfg->policy_revision, vni, &entry);
	if (ct < 0)
		return ct;
	/* eth_type_trans on the VXLAN device compared the inner MAC with the device's own, so the
	 * packet may be marked for another host; the endpoint's stack would drop it. (Decapsulated
	 * on the uplink, it carries the outer frame's type, which was for this host.) */
	return deliver_to_endpoint(skb, ctx, l3_off, ct, entry, dst, 1);
}

#endif
