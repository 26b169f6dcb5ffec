// SPDX-License-Identifier: Apache-2.0
/*
 * from-overlay: tc ingress on the node's VXLAN device (external / collect-metadata mode), i.e.
 * every packet another node tunnelled to us. The VNI carries the sender's identity; it is only
 * believed if the outer source is a known node of the cluster the identity belongs to (or it
 * is `world`, a client from outside a node forwards to a public endpoint's backend). Then
 * ingress policy and delivery straight into the endpoint's namespace. Replies of service
 * connections (a client here, its backend on another node) get their frontend source back
 * before delivery (lib/lb.h).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/policy.h"
#include "lib/lb.h"
#include "lib/deliver.h"
#include "lib/exit.h"

/* outer_src: network byte order; vni: the sender's identity. */
static __always_inline int handle_from_overlay(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 outer_src,
					       __u32 vni)
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
	__u32 revision = cfg->policy_revision;

	__u64 now = ct_now();
	ctx->now = now;
	struct ct_value *entry = 0;
	int ct = ct_lookup(skb, ctx, l3_off, now, &entry, 0);
	if (ct == CT_NEW || (ct == CT_ESTABLISHED && entry && entry->policy_revision != revision)) {
		ret = policy_check(ctx->dst_identity, vni, ctx, MESHD_DIR_INGRESS);
		if (ret < 0)
			return ret;
		if (ct == CT_NEW)
			ct_create(ctx, now, revision);
		else if (entry)
			entry->policy_revision = revision;
	}
	ret = lb_reverse_ct(skb, ctx, l3_off, ct, entry);
	if (ret < 0)
		return ret;

	ret = rewrite_macs(skb, dst);
	if (ret < 0)
		return ret;
	/* eth_type_trans on the VXLAN device compared the inner MAC with the device's own, so the
	 * packet may be marked for another host; the endpoint's stack would drop it. */
	if (bpf_skb_change_type(skb, PACKET_HOST) < 0)
		return MESHD_DROP_WRITE_ERROR;
	/* Straight into the endpoint's namespace, skipping the veth's transmit path and backlog. */
	ctx->action = bpf_redirect_peer(dst->ifindex, 0);
	return MESHD_FWD_LOCAL;
}

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_INGRESS};
	struct bpf_tunnel_key key = {};
	int ret;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		ret = MESHD_DROP_NO_TUNNEL_KEY;
	else
		ret = handle_from_overlay(skb, &ctx, bpf_htonl(key.remote_ipv4), key.tunnel_id);
	return finish(skb, &ctx, ret);
}

/*
 * Test-run entry point, never attached: BPF_PROG_RUN packets carry no tunnel metadata, so this
 * variant takes the outer source (network byte order) from skb->cb[0] and the VNI from cb[1].
 */
SEC("classifier")
int from_overlay_probe(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_INGRESS};
	int ret = handle_from_overlay(skb, &ctx, skb->cb[0], skb->cb[1]);
	return finish(skb, &ctx, ret);
}

char LICENSE[] SEC("license") = "GPL";
