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
 * claiming a local endpoint's address in either mode.
 *
 * Public endpoints (see SERVICES in meshd_abi.h): a connection from outside to a NodePort on
 * this node's IP or to an external / load balancer IP is load-balanced here (lib/lb.h), its
 * choice kept in conntrack. A backend on this node gets it DNATed only, the client's address
 * kept (ingress policy sees `world`, or the client's CIDR identity), and its replies get the
 * frontend back in from-endpoint. A backend elsewhere (externalTrafficPolicy Cluster) gets it
 * DNATed and SNATed to this node's IP and a port of the masquerade range (the NAT map, so the
 * port is unique per backend tuple), through the tunnel with the `world` identity or by the
 * native route: its replies come back to this node's IP, where nat_reverse gives them the
 * client back and the connection's reply entry the frontend as source, and they are routed
 * out to the client (public_reply). With DSR (CONFIG_F_DSR_*, native routing, lib/dsr.h) it is
 * DNATed only and carries its frontend in an IPv4 option to the backend's node, which takes the
 * option out here and answers the client itself. In tunnel mode with in-program VXLAN
 * (MESHD_CONFIG_F_TUNNEL_PROGRAM), a VXLAN packet for this node is decapsulated here and
 * delivered as from-overlay would (lib/vxlan.h, lib/overlay.h). Everything else is the node's
 * own business and passes untouched and uncounted: this program must never cost the node its
 * own traffic (ARP, IPv6, the VXLAN the device handles, its connections, the health check node
 * ports the agent serves).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/policy.h"
#include "lib/lb.h"
#include "lib/nat.h"
#include "lib/native.h"
#include "lib/dsr.h"
#include "lib/tunnel.h"
#include "lib/overlay.h"
#include "lib/deliver.h"
#include "lib/exit.h"

/* The handler's "not ours": pass to the stack without counting. */
#define NETDEV_PASS 0

/*
 * A connection from outside DNATed to a backend on another node (ctx: client -> backend): SNAT
 * to node_ip so the replies come back here (the backend's node would route them to the client
 * directly, which knows no backend), then the tunnel (VNI `world`: the backend's node applies
 * its ingress policy to an outside client) or the native route. The connection's CT entries
 * are written here: they keep the NAT port's claim alive and hold the frontend for its replies.
 */
static __always_inline int public_to_remote(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off,
					    const struct datapath_config *cfg, __u64 now)
{
	struct ipcache_value *remote = ipcache_lookup(ctx->daddr);
	/* A backend with no node to reach it by (its endpoint just left this node, say) */
	if (!remote || !remote->tunnel_endpoint || remote->tunnel_endpoint == cfg->node_ip)
		return MESHD_DROP_UNKNOWN_DEST;
	ctx->src_identity = MESHD_IDENTITY_WORLD;
	ctx->dst_identity = remote->identity;
	struct ct_value *entry = 0;
	int ct = ct_lookup(skb, ctx, l3_off, now, &entry, 0);
	/* DSR (lib/dsr.h): the client's address stays, the backend's node answers it directly. A
	 * connection keeps the mode it started with. */
	int dsr;
	if (ct == CT_NEW) {
		ct_create(ctx, now, cfg->policy_revision);
		dsr = dsr_enabled(cfg, ctx->proto);
		if (dsr)
			dsr_mark_connection(ctx, now);
	} else {
		dsr = entry && (entry->flags & MESHD_CT_F_DSR) && (cfg->flags & MESHD_CONFIG_F_NATIVE);
	}
	if (dsr)
		return dsr_forward(skb, ctx, l3_off, cfg);
	int ret = nat_masquerade(skb, ctx, l3_off, cfg, now);
	if (ret < 0)
		return ret;
	if (cfg->flags & MESHD_CONFIG_F_NATIVE)
		return native_forward(skb, ctx, l3_off);
	return tunnel_redirect(skb, ctx, cfg, remote->tunnel_endpoint, MESHD_IDENTITY_WORLD);
}

/*
 * A reply from a remote backend that nat_reverse gave its outside client back as destination
 * (ctx: backend -> client), or an ICMP error about the connection: the frontend the client
 * connected to becomes its source (the reply's CT entry holds it), and it is routed out to
 * the client as the node's forwarding would. No CT reply entry: a masquerade mapping whose
 * client is outside the mesh but no connection of ours, nothing to deliver it to.
 */
static __always_inline int public_reply(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off, __u64 now)
{
	struct ct_value *entry = 0;
	int ct = ct_lookup(skb, ctx, l3_off, now, &entry, 0);
	if (!entry || (ct == CT_REPLY && !(entry->flags & MESHD_CT_F_REV_NAT)) || (ct != CT_REPLY && ct != CT_RELATED))
		return MESHD_DROP_UNKNOWN_DEST;
	int ret = lb_reverse_ct(skb, ctx, l3_off, ct, entry);
	if (ret < 0)
		return ret;
	ctx->dst_identity = MESHD_IDENTITY_WORLD;
	return world_route_forward(skb, ctx, l3_off);
}

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
	/* Tunnel mode with in-program VXLAN (lib/vxlan.h): a packet another node tunnelled to us
	 * loses its outer headers here and goes the way from-overlay sends the device's. */
	__u32 outer_src, vni;
	if ((cfg->flags & MESHD_CONFIG_F_TUNNEL_PROGRAM) && ctx->proto == IPPROTO_UDP && ctx->daddr == cfg->node_ip &&
	    ctx->dport == cfg->tunnel_port && vxlan_decap(skb, cfg, &outer_src, &vni)) {
		/* Nothing learned from the outer headers may stay: the inner ones are parsed anew. */
		__builtin_memset(ctx, 0, sizeof(*ctx));
		ctx->direction = MESHD_DIR_INGRESS;
		return overlay_deliver(skb, ctx, outer_src, vni);
	}
	__u64 now = ct_now();
	ctx->now = now;
	int translated = 0;
	if (ctx->daddr == cfg->node_ip) {
		translated = nat_reverse(skb, ctx, l3_off, now);
		if (translated < 0)
			return translated;
	}
	/* A reply of a masqueraded flow is never a new public connection, whatever its port. */
	int public = 0;
	if (!translated) {
		public = lb_translate_public(skb, ctx, l3_off, now);
		if (public < 0)
			return public;
	}

	struct endpoint_key dkey = {.addr = ctx->daddr};
	struct endpoint_value *dst = bpf_map_lookup_elem(&ENDPOINTS, &dkey);
	if (!dst) {
		if (public)
			return public_to_remote(skb, ctx, l3_off, cfg, now);
		if (translated)
			return public_reply(skb, ctx, l3_off, now);
		/* Neither translation applied: the stack's, uncounted. */
		return NETDEV_PASS;
	}
	ctx->dst_identity = dst->identity;
	/* Native routing: a connection another node balanced here by DSR names its frontend in
	 * the option of its first packet; conntrack keeps it for the replies (lib/dsr.h). */
	if (cfg->flags & MESHD_CONFIG_F_NATIVE) {
		int dsr = dsr_take_option(skb, ctx, l3_off);
		if (dsr < 0)
			return dsr;
	}
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

	struct ct_value *entry = 0;
	int ct = ingress_verdict(skb, ctx, l3_off, now, cfg->policy_revision, ctx->src_identity, &entry);
	if (ct < 0)
		return ct;
	/* Native routing: replies of service connections (a client here, its backend on another
	 * node) get their frontend source back, as from-overlay gives it in tunnel mode. */
	return deliver_to_endpoint(skb, ctx, l3_off, ct, entry, dst, 0);
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
