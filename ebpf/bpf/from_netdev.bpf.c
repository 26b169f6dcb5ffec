// SPDX-License-Identifier: Apache-2.0
/*
 * from-netdev: tc ingress on the node's uplink, i.e. every packet the node receives from its
 * underlay. First the reverse translation of masquerade (lib/nat.h): a reply to node_ip that
 * belongs to a masqueraded flow, or an ICMP error about one, gets its endpoint back. Then a
 * packet for a local endpoint (a translated reply, or traffic routed to the endpoint's own
 * address when masquerade is off) gets the source identity from the ipcache (`world` when it
 * has none), conntrack and ingress policy, and is delivered straight into the endpoint's
 * namespace. In native routing mode this is how every packet of a remote endpoint arrives (its
 * source address is its identity: the underlay must be trusted), and replies of service
 * connections get their frontend back as in from-overlay. In tunnel mode a bare packet claiming a
 * remote endpoint's address is `world` (only the tunnel vouches for an endpoint), and so is one
 * claiming a local endpoint's address in either mode. Everything else
 * is the node's own business and passes untouched and uncounted: this program must never cost
 * the node its own traffic (ARP, IPv6, VXLAN, its connections).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/policy.h"
#include "lib/nat.h"
#include "lib/deliver.h"
#include "lib/exit.h"

/* The handler's "not ours": pass to the stack without counting. */
#define NETDEV_PASS 0

static __always_inline int handle_from_netdev(struct __sk_buff *skb, struct pkt_ctx *ctx)
{
	__u32 l3_off = 0;
	int ret = parse_packet(skb, ctx, &l3_off);
	if (ret < 0 || ret == PARSE_ARP)
		return NETDEV_PASS;

	__u32 zero = 0;
	struct datapath_config *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	if (!cfg)
		return NETDEV_PASS;
	__u64 now = ct_now();
	if (ctx->daddr == cfg->node_ip) {
		ret = nat_reverse(skb, ctx, l3_off, now);
		if (ret <= 0)
			return ret;
	}

	struct endpoint_key dkey = {.addr = ctx->daddr};
	struct endpoint_value *dst = bpf_map_lookup_elem(&ENDPOINTS, &dkey);
	if (!dst)
		return NETDEV_PASS;
	ctx->dst_identity = dst->identity;
	struct ipcache_value *src = ipcache_lookup(ctx->saddr);
	ctx->src_identity = src ? src->identity : MESHD_IDENTITY_WORLD;
	/* In tunnel mode an endpoint behind another node speaks only through the tunnel, where
	 * the VNI carries its identity: a bare packet on the underlay claiming its address is
	 * anyone's, so it is `world`. Node addresses and CIDR identities (no tunnel endpoint) are
	 * what the underlay itself carries, and keep theirs. */
	if (src && src->tunnel_endpoint && !(cfg->flags & MESHD_CONFIG_F_NATIVE))
		ctx->src_identity = MESHD_IDENTITY_WORLD;
	/* Nor does a local endpoint ever speak from the underlay, in either mode. */
	struct endpoint_key skey = {.addr = ctx->saddr};
	if (bpf_map_lookup_elem(&ENDPOINTS, &skey))
		ctx->src_identity = MESHD_IDENTITY_WORLD;

	__u32 revision = cfg->policy_revision;
	struct ct_value *entry = 0;
	int ct = ct_lookup(skb, ctx, l3_off, now, &entry, 0);
	if (ct == CT_NEW || (ct == CT_ESTABLISHED && entry && entry->policy_revision != revision)) {
		ret = policy_check(ctx->dst_identity, ctx->src_identity, ctx, MESHD_DIR_INGRESS);
		if (ret < 0)
			return ret;
		if (ct == CT_NEW)
			ct_create(ctx, now, revision);
		else if (entry)
			entry->policy_revision = revision;
	}
	/* Native routing: replies of service connections (a client here, its backend on another
	 * node) get their frontend source back, as from-overlay gives it in tunnel mode. */
	ret = lb_reverse_ct(skb, ctx, l3_off, ct, entry);
	if (ret < 0)
		return ret;

	ret = rewrite_macs(skb, dst);
	if (ret < 0)
		return ret;
	/* Straight into the endpoint's namespace, as from-overlay delivers. */
	ctx->action = bpf_redirect_peer(dst->ifindex, 0);
	return MESHD_FWD_LOCAL;
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_INGRESS};
	int ret = handle_from_netdev(skb, &ctx);
	if (ret == NETDEV_PASS)
		return TC_ACT_OK;
	return finish(skb, &ctx, ret);
}

char LICENSE[] SEC("license") = "GPL";
