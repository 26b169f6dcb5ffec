/* SPDX-License-Identifier: Apache-2.0 */
/*
 * from-endpoint's forwarding cache: an established connection's packets to a remote endpoint all
 * get the same answers from the sender's ENDPOINTS entry (anti-spoofing, identity), the
 * destination's ENDPOINTS miss and its IPCACHE entry (identity, the node it is behind), and from
 * policy (the verdict CT already caches). Those three hash lookups were about half of
 * from_endpoint's cost under BPF_PROG_RUN with 100k ipcache entries (BENCHMARKS.md); the CT entry
 * of the packet's direction keeps their answers (ct_value fwd_*), so the steady state is one CT
 * lookup and, in tunnel mode, the tunnel key (or the encapsulation, lib/vxlan.h). In native
 * routing mode the route itself is not cached: routes and neighbours change without the agent
 * (a router's routes, a neighbour's MAC), and only the FIB knows them, so a cached packet still
 * takes the FIB lookup (lib/native.h); nor is the underlay route of in-program encapsulation.
 *
 * Validity: the agent bumps CONFIG forward_revision after every ENDPOINTS, IPCACHE or CONFIG
 * change, so an answer is used only while none of the maps it came from has changed; policy
 * changes are caught by the entry's policy_revision as on the long path, so they still cut
 * established connections. The cache is filled by the long path (once per revision, not per
 * packet) and only for plain connections: no service translation, no hairpin, not closing.
 * Packets that change the connection's state (SYN, FIN, RST) and ICMP errors take the long
 * path. A reader racing a refill may combine answers of two adjacent revisions, like a packet
 * racing the agent's map writes would.
 */
#ifndef MESHD_FWD_CACHE_H
#define MESHD_FWD_CACHE_H

#include "maps.h"
#include "ct.h"
#include "native.h"
#include "tunnel.h"

#define CT_F_NOT_PLAIN (MESHD_CT_F_SERVICE | MESHD_CT_F_REV_NAT | MESHD_CT_F_CLOSING)

static __always_inline int fwd_cache_usable(const struct ct_value *v, const struct pkt_ctx *ctx)
{
	return !(v->flags & CT_F_NOT_PLAIN) && !v->nat_addr && !ctx->tcp_flags &&
	       !(ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type));
}

/*
 * Forwards the packet from the cache of its CT entry v (live or not: checked here) if the cache
 * holds a current answer: MESHD_FWD_TUNNEL, or what native_forward returns in native routing
 * mode (or a negative drop reason), 0 if the long path has to decide. The entry's age is taken
 * from the per-CPU clock cache (ct_now_cached), not the clock helper; ctx->now stays 0, so a
 * drop's event reads the clock itself (lib/exit.h).
 */
static __always_inline int fwd_cache_forward(struct __sk_buff *skb, struct pkt_ctx *ctx, struct ct_value *v,
					     const struct datapath_config *cfg, __u32 l3_off)
{
	int native = cfg->flags & MESHD_CONFIG_F_NATIVE;
	if (!v->fwd_tunnel_endpoint || v->fwd_revision != cfg->forward_revision ||
	    v->fwd_ifindex != skb->ingress_ifindex || !fwd_cache_usable(v, ctx) || (!native && !cfg->vxlan_ifindex))
		return 0;
	/* The first direction's verdict is current (replies ride on it). */
	if (!(v->flags & MESHD_CT_F_REPLY) && v->policy_revision != cfg->policy_revision)
		return 0;
	__u64 now = ct_now_cached();
	if (!ct_alive_proto(ctx->proto, v, now))
		return 0;
	if ((__s64)(now - v->last_seen_ns) > (__s64)CT_REFRESH_NS)
		v->last_seen_ns = now;
	ctx->src_identity = v->fwd_src_identity;
	ctx->dst_identity = v->fwd_dst_identity;
	if (native)
		return native_forward(skb, ctx, l3_off);
	return tunnel_redirect(skb, ctx, cfg, v->fwd_tunnel_endpoint, v->fwd_src_identity);
}

/* After the long path sent a packet of live entry v to a remote endpoint (tunnelled, or routed
 * natively) behind node tunnel_endpoint: records its answers, if they are not what v holds
 * already (an entry is written once per revision, not per packet). */
static __always_inline void fwd_cache_fill(struct __sk_buff *skb, const struct pkt_ctx *ctx, struct ct_value *v,
					   const struct datapath_config *cfg, __u32 tunnel_endpoint)
{
	if (!fwd_cache_usable(v, ctx))
		return;
	__u32 revision = cfg->forward_revision;
	__u32 ifindex = skb->ingress_ifindex;
	if (v->fwd_revision == revision && v->fwd_ifindex == ifindex && v->fwd_src_identity == ctx->src_identity &&
	    v->fwd_dst_identity == ctx->dst_identity && v->fwd_tunnel_endpoint == tunnel_endpoint)
		return;
	v->fwd_ifindex = ifindex;
	v->fwd_src_identity = ctx->src_identity;
	v->fwd_dst_identity = ctx->dst_identity;
	v->fwd_tunnel_endpoint = tunnel_endpoint;
	/* The revision last, so that a reader matching it finds the answers (ordered stores on
	 * x86; elsewhere see the race note above). */
	asm volatile("" ::: "memory");
	v->fwd_revision = revision;
}

#endif
