/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Native routing (CONFIG flag MESHD_CONFIG_F_NATIVE): a packet for an endpoint of another node
 * leaves unencapsulated, as the node's own forwarding would route it (the agent's
 * `<pod CIDR> via <node IP>` routes, a router's, or the default route), with its addresses
 * untouched: the receiving node takes the sender's identity from its ipcache by source address.
 * The FIB answer comes from the same lookup world traffic uses (lib/world.h), straight to the
 * uplink, skipping the node's stack; where the FIB says the stack has to (bigger than the egress
 * MTU: the stack answers "fragmentation needed"; last hop of the TTL; a local address), it does.
 */
#ifndef MESHD_NATIVE_H
#define MESHD_NATIVE_H

#include "world.h"

/* Returns MESHD_FWD_NATIVE, MESHD_FWD_STACK (ctx->action set) or a drop reason. */
static __always_inline int native_forward(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 l3_off)
{
	int ret = world_route_forward(skb, ctx, l3_off);
	return ret == MESHD_FWD_WORLD ? MESHD_FWD_NATIVE : ret;
}

#endif
