/* SPDX-License-Identifier: Apache-2.0 */
/* Handing a packet to a local endpoint. */
#ifndef MESHD_DELIVER_H
#define MESHD_DELIVER_H

#include "maps.h"

/* Rewrites the Ethernet header to gateway -> endpoint, as if the node had routed the packet. */
static __always_inline int rewrite_macs(struct __sk_buff *skb, const struct endpoint_value *ep)
{
	__u8 macs[12];
	__builtin_memcpy(macs, ep->mac, 6);
	__builtin_memcpy(macs + 6, ep->node_mac, 6);
	if (bpf_skb_store_bytes(skb, 0, macs, sizeof(macs), 0) < 0)
		return MESHD_DROP_WRITE_ERROR;
	return 0;
}

#endif
