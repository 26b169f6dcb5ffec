// SPDX-License-Identifier: Apache-2.0
/*
 * from-overlay: tc ingress on the node's VXLAN device (external / collect-metadata mode), i.e.
 * every packet another node tunnelled to us that the program on the uplink did not decapsulate
 * itself (all of them unless CONFIG says MESHD_CONFIG_F_TUNNEL_PROGRAM, lib/vxlan.h): outer
 * source and VNI from the tunnel key, then lib/overlay.h.
 */
#include "lib/common.h"
#include "lib/maps.h"
#include "lib/overlay.h"
#include "lib/exit.h"

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct pkt_ctx ctx = {.direction = MESHD_DIR_INGRESS};
	struct bpf_tunnel_key key = {};
	int ret;
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		ret = MESHD_DROP_NO_TUNNEL_KEY;
	else
		ret = overlay_deliver(skb, &ctx, bpf_htonl(key.remote_ipv4), key.tunnel_id);
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
	int ret = overlay_deliver(skb, &ctx, skb->cb[0], skb->cb[1]);
	return finish(skb, &ctx, ret);
}

char LICENSE[] SEC("license") = "GPL";
