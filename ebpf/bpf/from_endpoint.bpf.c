// SPDX-License-Identifier: Apache-2.0
/*
 * from-endpoint: tc ingress on the host side of every endpoint veth, i.e. every packet an
 * endpoint sends. Anti-spoofing, conntrack, egress policy (and the destination's ingress policy
 * for local delivery), then local delivery or VXLAN encapsulation with the sender's identity as
 * VNI. Service load-balancing (lib/lb.h) comes first: a packet to a service frontend is DNATed
 * to its connection's backend before anything else looks at it, so policy, conntrack and
 * forwarding are about the backend; replies of service connections to an endpoint of this node
 * from a backend of this node, and ICMP errors about their requests, get their frontend back
 * here, and a client load-balanced to itself is SNATed (hairpin, see lb.h). A destination
 * outside the mesh is `world` (or `host`) by the node's FIB, masqueraded unless configured
 * otherwise, and routed out by this program (lib/world.h, lib/nat.h). In native routing mode a
 * remote endpoint is reached the same way, unencapsulated and unmasqueraded (lib/native.h).
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/policy.h"
#include "lib/lb.h"
#include "lib/world.h"
#include "lib/native.h"
#include "lib/tunnel.h"
#include "lib/fwd_cache.h"
#include "lib/deliver.h"
#include "lib/exit.h"

static __always_inline int handle_from_endpoint(struct __sk_buff *skb, struct pkt_ctx *ctx)
{
	__u32 l3_off = 0;
	int ret = parse_packet(skb, ctx, &l3_off);
	if (ret < 0)
		return ret;
	if (ret == PARSE_ARP) {
		/* The endpoint resolves its gateway with a static neighbour entry, so its ARP is
		 * answers to the node (which routes to it by a /32): the node's business, as long as
		 * the endpoint speaks for its own address only (ARP sender IP at offset 28). */
		struct endpoint_key akey = {};
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 14, &akey.addr, sizeof(akey.addr)) < 0)
			return MESHD_DROP_INVALID_PACKET;
		ctx->saddr = akey.addr;
		struct endpoint_value *sender = bpf_map_lookup_elem(&ENDPOINTS, &akey);
		if (!sender || sender->ifindex != skb->ingress_ifindex)
			return MESHD_DROP_INVALID_SOURCE;
		ctx->action = TC_ACT_OK;
		return MESHD_FWD_STACK;
	}

	/* Conntrack on the tuple as sent comes first. The common case, an established tunnelled
	 * connection, is forwarded from its entry's cache (lib/fwd_cache.h). Otherwise a live
	 * connection that is not a service connection (nor a SYN reusing its tuple) went to no
	 * frontend when it started, so it skips the SERVICES lookup, and its entry is the one
	 * ct_lookup would find (no DNAT). A frontend added for an address and port in use takes
	 * new connections only. */
	__u32 zero = 0;
	struct datapath_config *cfg = bpf_map_lookup_elem(&CONFIG, &zero);
	struct ct_value *conn = ct_entry(ctx);
	if (conn && cfg) {
		ret = fwd_cache_forward(skb, ctx, conn, cfg, l3_off);
		if (ret)
			return ret;
	}
	/* The long path reads the clock itself (the fast path's cached value is good enough for
	 * an age, not for a new entry's stamp or an event's). */
	__u64 now = ct_now();
	ctx->now = now;
	if (conn && !ct_alive_proto(ctx->proto, conn, now))
		conn = 0;

	struct endpoint_key skey = {.addr = ctx->saddr};
	struct endpoint_value *src = bpf_map_lookup_elem(&ENDPOINTS, &skey);
	if (!src || src->ifindex != skb->ingress_ifindex)
		return MESHD_DROP_INVALID_SOURCE;
	__u32 src_identity = src->identity;
	ctx->src_identity = src_identity;

	struct ct_value *plain = 0;
	if (conn && !(conn->flags & MESHD_CT_F_SERVICE) && !(ctx->tcp_flags & TCP_FLAG_SYN) &&
	    !(ctx->proto == IPPROTO_ICMP && icmp_is_error(ctx->icmp_type))) {
		plain = conn;
	} else {
		ret = lb_translate(skb, ctx, l3_off, now, conn);
		if (ret < 0)
			return ret;
		ret = lb_translate_icmp(skb, ctx, l3_off);
		if (ret < 0)
			return ret;
	}

	/* Hairpin (lb.h): the SNATed request goes to the client itself, and a reply to the service
	 * loopback address goes back to its sender. Either way source and destination are one
	 * endpoint, which policy does not stand between. */
	int hairpin = is_service_loopback(ctx->saddr);
	int hairpin_reply = is_service_loopback(ctx->daddr);
	struct endpoint_key dkey = {.addr = hairpin_reply ? ctx->saddr : ctx->daddr};
	struct endpoint_value *dst = bpf_map_lookup_elem(&ENDPOINTS, &dkey);
	struct ipcache_value *remote = 0;
	struct world_hop hop = {};
	int world = -1; /* WORLD_* for a destination outside the mesh */
	if (dst) {
		ctx->dst_identity = dst->identity;
	} else {
		remote = ipcache_lookup(ctx->daddr);
		/* No entry, or a prefix a policy names (a local-scope identity): outside the mesh.
		 * It leaves like `world`, under the prefix's identity when it has one. */
		if (remote && !(remote->identity & MESHD_IDENTITY_LOCAL_SCOPE)) {
			ctx->dst_identity = remote->identity;
		} else {
			if (!cfg || !(cfg->flags & MESHD_CONFIG_F_WORLD) || hairpin_reply)
				return MESHD_DROP_UNKNOWN_DEST;
			world = world_route(skb, ctx, l3_off, &hop);
			if (world < 0)
				return world;
			if (world == WORLD_HOST)
				ctx->dst_identity = MESHD_IDENTITY_HOST;
			else
				ctx->dst_identity = remote ? remote->identity : MESHD_IDENTITY_WORLD;
			remote = 0;
		}
	}

	if (!cfg)
		return MESHD_DROP_NO_CONFIG;
	__u32 revision = cfg->policy_revision;

	struct ct_value *entry = 0;
	int ct = ct_lookup(skb, ctx, l3_off, now, &entry, plain);
	/* The same tuple as an earlier connection that went through another frontend (or none):
	 * a new connection, whose CT entries must say how to reverse-NAT its replies. */
	if (ct == CT_ESTABLISHED && entry && (entry->nat_addr != ctx->svc_addr || entry->nat_port != ctx->svc_port))
		ct = CT_NEW;
	if (ct == CT_REPLY) {
		ret = lb_reverse(skb, ctx, l3_off, entry);
		if (ret < 0)
			return ret;
	} else if (hairpin_reply) {
		/* To the loopback address but no reply of a hairpin connection of this sender's
		 * (errors within one are not translated either): nobody to deliver it to. */
		return MESHD_DROP_UNKNOWN_DEST;
	} else if (ct == CT_RELATED) {
		ret = lb_reverse_icmp(skb, ctx, l3_off, entry);
		if (ret < 0)
			return ret;
	}
	/* Replies and related errors ride on their connection's verdict; the first direction is
	 * re-checked once after every policy change, so a change cuts established connections too. */
	if (ct == CT_NEW || (ct == CT_ESTABLISHED && entry && entry->policy_revision != revision)) {
		ret = hairpin ? 0 : policy_check(src_identity, ctx->dst_identity, ctx, MESHD_DIR_EGRESS);
		if (ret < 0)
			return ret;
		if (dst && !hairpin) {
			ctx->direction = MESHD_DIR_INGRESS;
			ret = policy_check(ctx->dst_identity, src_identity, ctx, MESHD_DIR_INGRESS);
			if (ret < 0)
				return ret;
			ctx->direction = MESHD_DIR_EGRESS;
		}
		if (ct == CT_NEW)
			ct_create(ctx, now, revision);
		else if (entry)
			entry->policy_revision = revision;
	}

	if (dst) {
		ret = rewrite_macs(skb, dst);
		if (ret < 0)
			return ret;
		/* Egress of the peer's host veth: veth_xmit hands it to the endpoint's namespace. */
		ctx->action = bpf_redirect(dst->ifindex, 0);
		return MESHD_FWD_LOCAL;
	}
	if (world == WORLD_HOST || world == WORLD_VIA_STACK) {
		ctx->action = TC_ACT_OK;
		return MESHD_FWD_STACK;
	}
	/* Replies of connections that started outside (and errors about them) keep their
	 * source: their peer knows the endpoint's own address. */
	if (world >= 0)
		return world_egress(skb, ctx, &hop, l3_off,
				    world | (ct == CT_REPLY || ct == CT_RELATED ? WORLD_KEEP_SOURCE : 0));
	if (!remote->tunnel_endpoint) {
		ctx->action = TC_ACT_OK;
		return MESHD_FWD_STACK;
	}

	/* The merged view lists this node's endpoints with this node as tunnel endpoint too; one
	 * that is not in ENDPOINTS (any more) is gone, not somewhere to tunnel to. */
	if (remote->tunnel_endpoint == cfg->node_ip)
		return MESHD_DROP_UNKNOWN_DEST;
	/* A new connection's entries were written by ct_create: its next packet fills them. */
	int cacheable = entry && (ct == CT_ESTABLISHED || ct == CT_REPLY) && !hairpin;
	if (cfg->flags & MESHD_CONFIG_F_NATIVE) {
		ret = native_forward(skb, ctx, l3_off);
		if (ret == MESHD_FWD_NATIVE && cacheable)
			fwd_cache_fill(skb, ctx, entry, cfg, remote->tunnel_endpoint);
		return ret;
	}
	ret = tunnel_redirect(skb, ctx, cfg, remote->tunnel_endpoint, src_identity);
	if (ret == MESHD_FWD_TUNNEL && cacheable)
		fwd_cache_fill(skb, ctx, entry, cfg, remote->tunnel_endpoint);
	return ret;
}

SEC("classifier")
int from_endpoint(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_EGRESS};
	int ret = handle_from_endpoint(skb, &ctx);
	return finish(skb, &ctx, ret);
}

/*
 * Test-run entry point, never attached: BPF_PROG_RUN cannot show the tunnel key the program
 * set, so this variant returns it in skb->cb[0] (remote IPv4, host byte order), cb[1] (VNI)
 * and cb[2] (TTL), which the test reads from the output context.
 */
SEC("classifier")
int from_endpoint_probe(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_EGRESS};
	int ret = handle_from_endpoint(skb, &ctx);
	if (ret == MESHD_FWD_TUNNEL) {
		struct bpf_tunnel_key key = {};
		/* Read back from the skb what the kernel will use; the remote address of a TX key
		 * is not readable that way (get_tunnel_key reports the source), so it comes from
		 * what the handler passed to bpf_skb_set_tunnel_key. */
		if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) == 0) {
			skb->cb[0] = ctx.tunnel_remote;
			skb->cb[1] = key.tunnel_id;
			skb->cb[2] = key.tunnel_ttl;
		}
	}
	return finish(skb, &ctx, ret);
}

char LICENSE[] SEC("license") = "GPL";
