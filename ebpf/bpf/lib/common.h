/* SPDX-License-Identifier: Apache-2.0 */
/* Includes and small helpers shared by every meshd program. */
#ifndef MESHD_COMMON_H
#define MESHD_COMMON_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include "icmp.h" /* not <linux/icmp.h>: see icmp.h */
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "meshd_abi.h"

#ifndef __always_inline
#define __always_inline inline __attribute__((always_inline))
#endif

#define PACKET_HOST 0

/* Everything a program learned about the packet, for policy, CT, metrics and drop events. */
struct pkt_ctx {
	__u32 saddr; /* network byte order */
	__u32 daddr;
	__u16 sport; /* network byte order */
	__u16 dport;
	__u8 proto;
	__u8 direction; /* MESHD_DIR_* of the decision being made (for metrics and events) */
	__u8 tcp_flags; /* FIN/SYN/RST bits of a TCP header, 0 otherwise */
	__u8 icmp_type;
	__u32 src_identity;
	__u32 dst_identity;
	int action;           /* TC_ACT_* to return when the handler forwards */
	__u32 tunnel_remote; /* host byte order, as passed to bpf_skb_set_tunnel_key */
	__u32 l4_off;        /* offset of the TCP/UDP/ICMP header; 0 if none here (later fragment) */
	__u32 svc_addr;      /* service frontend the packet was sent to (DNATed away), 0 if none */
	__u16 svc_port;      /* network byte order */
	__u8 ct_created;     /* this packet opened a connection (ct_create): a flow event */
	__u8 ihl;            /* IPv4 header length in 4-byte words (options: more than 5) */
	__u64 now;           /* ct_now() if conntrack read it, else 0: events reuse it (lib/exit.h) */
};

#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04

/* One's complement sum folded to 16 bits and inverted: an Internet checksum. */
static __always_inline __u16 csum_fold_s64(__s64 sum)
{
	__u32 s = (__u32)sum;
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)~s;
}

static __always_inline int identity_cluster(__u32 identity)
{
	return (identity >> MESHD_IDENTITY_CLUSTER_SHIFT) & MESHD_IDENTITY_CLUSTER_MASK;
}

#endif
