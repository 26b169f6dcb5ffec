/* SPDX-License-Identifier: Apache-2.0 */
/* Encapsulation towards another node (tunnel mode). */
#ifndef MESHD_TUNNEL_H
#define MESHD_TUNNEL_H

#include "maps.h"
#include "vxlan.h"

/* Sends the packet to remote_node (network byte order) with VNI vni (the identity the receiver
 * applies policy to): encapsulated here and handed to the underlay (lib/vxlan.h) when CONFIG
 * says so and the program can, otherwise through the VXLAN device (external mode), which takes
 * the outer destination and the VNI from the tunnel key. Returns MESHD_FWD_TUNNEL (ctx->action
 * set) or a drop reason. */
static __always_inline int tunnel_redirect(struct __sk_buff *skb, struct pkt_ctx *ctx,
					   const struct datapath_config *cfg, __u32 remote_node, __u32 vni)
{
	ctx->tunnel_remote = bpf_ntohl(remote_node);
	if (cfg->flags & MESHD_CONFIG_F_TUNNEL_PROGRAM) {
		int action = vxlan_encap(skb, remote_node, vni, cfg->node_ip, cfg->tunnel_port);
		if (action < 0)
			return action;
		if (action != VXLAN_VIA_DEVICE) {
			ctx->action = action;
			return MESHD_FWD_TUNNEL;
		}
	}
	if (!cfg->vxlan_ifindex)
		return MESHD_DROP_NO_CONFIG;
	struct bpf_tunnel_key key = {};
	key.remote_ipv4 = ctx->tunnel_remote;
	key.tunnel_id = vni;
	key.tunnel_ttl = VXLAN_TTL;
	/* Zero outer UDP checksum, as the kernel's own VXLAN does by default for IPv4. */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return MESHD_DROP_WRITE_ERROR;
	ctx->action = bpf_redirect(cfg->vxlan_ifindex, 0);
	return MESHD_FWD_TUNNEL;
}

#endif
