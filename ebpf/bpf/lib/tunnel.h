/* SPDX-License-Identifier: Apache-2.0 */
/* Encapsulation towards another node (tunnel mode). */
#ifndef MESHD_TUNNEL_H
#define MESHD_TUNNEL_H

#include "maps.h"

/* Hands the packet to the VXLAN device (external mode), which takes the outer destination
 * (remote_node, network byte order) and the VNI (the identity the receiver applies policy to)
 * from the tunnel key. Returns MESHD_FWD_TUNNEL (ctx->action set) or a drop reason. */
static __always_inline int tunnel_redirect(struct __sk_buff *skb, struct pkt_ctx *ctx,
					   const struct datapath_config *cfg, __u32 remote_node, __u32 vni)
{
	if (!cfg->vxlan_ifindex)
		return MESHD_DROP_NO_CONFIG;
	struct bpf_tunnel_key key = {};
	key.remote_ipv4 = bpf_ntohl(remote_node);
	ctx->tunnel_remote = key.remote_ipv4;
	key.tunnel_id = vni;
	key.tunnel_ttl = 64;
	/* Zero outer UDP checksum, as the kernel's own VXLAN does by default for IPv4. */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return MESHD_DROP_WRITE_ERROR;
	ctx->action = bpf_redirect(cfg->vxlan_ifindex, 0);
	return MESHD_FWD_TUNNEL;
}

#endif
