/* SPDX-License-Identifier: Apache-2.0 */
/*
 * VXLAN in the program (tunnel mode with CONFIG flag MESHD_CONFIG_F_TUNNEL_PROGRAM): the sender
 * encapsulates the endpoint's frame itself and hands it straight to the underlay device, the
 * receiver decapsulates on the uplink's tc ingress (from-netdev). That skips, per packet, the
 * VXLAN device's transmit (its route lookup for the metadata dst, the output hooks of the
 * outer packet) and receive (IP input, the UDP socket lookup, the device's GRO cell queue).
 *
 * The wire format is the kernel VXLAN device's, so a node encapsulating here and one using the
 * device talk to each other: outer IPv4 from node_ip to the tunnel endpoint, TTL 64, no DF,
 * ECN copied from the inner header as ip_tunnel_ecn_encap() does, UDP from a port hashed from
 * the inner flow in the node's default ephemeral range (udp_flow_src_port() of a device
 * without a port range) to the VXLAN port with a zero checksum (the device's IPv4 default), the
 * VXLAN header with only the I flag and the identity as VNI, and the endpoint's frame as it
 * came (its Ethernet header included, as the device carries it).
 *
 * Whatever the program cannot do as the device would goes to the device, which stays in place
 * (and keeps the VXLAN port's socket): a packet the FIB says does not fit the route's MTU once
 * encapsulated (the device fragments the outer packet, as before; bpf_fib_lookup knows the
 * device's MTU, a path MTU learned from ICMP and a locked route MTU, but not a route's plain
 * `mtu` metric, which the device's output path honours), no route or a lookup the FIB
 * refuses, a GSO packet that is not TCP, and a packet bpf_skb_adjust_room refuses to grow
 * (already encapsulated, say). On receive, anything but a plain VXLAN packet for this node
 * (outer IP options or fragments, other VXLAN flags, an inner frame that is not IPv4) passes to
 * the stack and the device, as before.
 */
#ifndef MESHD_VXLAN_H
#define MESHD_VXLAN_H

#include "maps.h"
#include "parse.h"
#include "world.h" /* AF_INET */

#define VXLAN_HLEN 8
/* The I flag (RFC 7348): the VNI is valid. The device refuses any other flag bit. */
#define VXLAN_FLAG_VNI 0x08000000
/* Outer IPv4 (no options) + UDP + VXLAN + the inner Ethernet header. */
#define VXLAN_ENCAP_LEN (20 + 8 + VXLAN_HLEN + ETH_HLEN)
/* The device's default source port range: the node's default ephemeral range, max + 1. */
#define VXLAN_SPORT_MIN 32768
#define VXLAN_SPORT_END 61000
#define VXLAN_TTL 64

#define INET_ECN_MASK 3
#define INET_ECN_ECT_0 2
#define INET_ECN_CE 3

/* What vxlan_encap returns when the device has to take the packet (left untouched). */
#define VXLAN_VIA_DEVICE 0

struct vxlan_outer {
	struct iphdr ip;
	struct udphdr udp;
	__be32 flags;
	__be32 vni;
};

/* Everything in-program encapsulation writes, in wire order, the outer IPv4 header 4-byte
 * aligned for its checksum. */
struct vxlan_headers {
	__u8 pad[2];
	__u8 eth[ETH_HLEN];
	struct vxlan_outer outer;
	__u8 inner_eth[ETH_HLEN];
	__u8 pad2[2];
};

/*
 * Encapsulates the endpoint's frame (Ethernet + IPv4 at offset 0) towards remote_node (network
 * byte order) with VNI vni, from node_ip on UDP port (network byte order), and redirects it to
 * the underlay device the FIB names. Returns the TC action (> 0), VXLAN_VIA_DEVICE when the
 * device has to do it (the packet is untouched), or a drop reason once the packet was changed.
 * A global function: the verifier checks it once for every caller, in a frame of its own,
 * which has to fit beside from-endpoint's (512 bytes together): the FIB request and the
 * headers share their bytes.
 */
__attribute__((noinline)) int vxlan_encap(struct __sk_buff *skb, __u32 remote_node, __u32 vni, __u32 node_ip,
					  __u32 port)
{
	/* The inner IPv4 header up to its protocol: IHL, TOS, protocol. */
	__u8 l3[10];
	if (bpf_skb_load_bytes(skb, ETH_HLEN, l3, sizeof(l3)) < 0)
		return VXLAN_VIA_DEVICE;
	__u32 inner_len = skb->len - ETH_HLEN;
	if (inner_len + VXLAN_ENCAP_LEN > 0xffff)
		return VXLAN_VIA_DEVICE;
	/* What one outer packet on the wire measures, for the route's MTU: a GSO packet leaves
	 * as segments of gso_size behind its headers. */
	__u32 wire_len = inner_len + VXLAN_ENCAP_LEN;
	if (skb->gso_size) {
		if (l3[9] != IPPROTO_TCP)
			return VXLAN_VIA_DEVICE;
		__u32 ihl = (l3[0] & 0x0f) * 4;
		__u8 doff;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + ihl + 12, &doff, 1) < 0)
			return VXLAN_VIA_DEVICE;
		wire_len = VXLAN_ENCAP_LEN + ihl + (doff >> 4) * 4 + skb->gso_size;
	}

	union {
		struct bpf_fib_lookup fib;
		struct vxlan_headers h;
	} u;
	__builtin_memset(&u, 0, sizeof(u));
	u.fib.family = AF_INET;
	u.fib.l4_protocol = IPPROTO_UDP;
	u.fib.tot_len = wire_len;
	u.fib.ifindex = skb->ingress_ifindex;
	u.fib.ipv4_src = node_ip;
	u.fib.ipv4_dst = remote_node;
	long route = bpf_fib_lookup(skb, &u.fib, sizeof(u.fib), 0);
	/* FRAG_NEEDED: the device fragments the outer packet (no DF), as it always did. */
	if (route != BPF_FIB_LKUP_RET_SUCCESS && route != BPF_FIB_LKUP_RET_NO_NEIGH)
		return VXLAN_VIA_DEVICE;
	__u32 ifindex = u.fib.ifindex;
	__u8 macs[2 * ETH_ALEN];
	__builtin_memcpy(macs, u.fib.dmac, ETH_ALEN);
	__builtin_memcpy(macs + ETH_ALEN, u.fib.smac, ETH_ALEN);

	/* The flow hash of the inner packet, taken before the outer headers exist. */
	__u32 hash = bpf_get_hash_recalc(skb);
	hash ^= hash << 16;
	__u16 sport = (((__u64)hash * (VXLAN_SPORT_END - VXLAN_SPORT_MIN)) >> 32) + VXLAN_SPORT_MIN;

	/* The outer headers' room, after the Ethernet header (which stays at the front, to be
	 * copied inside), with the inner headers recorded for GSO and checksum offload.
	 * FIXED_GSO: the endpoint's MTU already leaves VXLAN's room, so its segments keep their
	 * size. */
	__u64 flags = BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN);
	if (bpf_skb_adjust_room(skb, VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, flags) < 0)
		return VXLAN_VIA_DEVICE;

	__builtin_memset(&u, 0, sizeof(u));
	struct vxlan_headers *h = &u.h;
	if (bpf_skb_load_bytes(skb, 0, h->inner_eth, ETH_HLEN) < 0)
		return MESHD_DROP_WRITE_ERROR;
	__builtin_memcpy(h->eth, macs, sizeof(macs));
	h->eth[12] = ETH_P_IP >> 8;
	h->eth[13] = ETH_P_IP & 0xff;
	struct iphdr *ip = &h->outer.ip;
	ip->version = 4;
	ip->ihl = 5;
	__u8 ecn = l3[1] & INET_ECN_MASK;
	ip->tos = ecn == INET_ECN_CE ? INET_ECN_ECT_0 : ecn;
	ip->tot_len = bpf_htons(inner_len + VXLAN_ENCAP_LEN);
	ip->id = bpf_get_prandom_u32();
	ip->ttl = VXLAN_TTL;
	ip->protocol = IPPROTO_UDP;
	ip->saddr = node_ip;
	ip->daddr = remote_node;
	ip->check = csum_fold_s64(bpf_csum_diff(0, 0, (__be32 *)ip, sizeof(*ip), 0));
	h->outer.udp.source = bpf_htons(sport);
	h->outer.udp.dest = port;
	h->outer.udp.len = bpf_htons(inner_len + VXLAN_ENCAP_LEN - sizeof(struct iphdr));
	h->outer.flags = bpf_htonl(VXLAN_FLAG_VNI);
	h->outer.vni = bpf_htonl(vni << 8);
	/* All 64 bytes in one write: outer Ethernet, the outer headers, the inner Ethernet. */
	if (bpf_skb_store_bytes(skb, 0, h->eth, ETH_HLEN + VXLAN_ENCAP_LEN, 0) < 0)
		return MESHD_DROP_WRITE_ERROR;

	/* Not resolved yet: the kernel resolves the route's next hop for the outer packet. */
	if (route == BPF_FIB_LKUP_RET_NO_NEIGH)
		return bpf_redirect_neigh(ifindex, 0, 0, 0);
	return bpf_redirect(ifindex, 0);
}

/*
 * The receive side, on the uplink: if the packet is plain VXLAN for this node (outer
 * destination node_ip, no IP options, not a fragment, the configured port, only the I flag,
 * an IPv4 frame inside), takes the outer headers off and returns 1 with the outer source
 * (network byte order) and the VNI; 0 leaves the packet untouched for the stack (and the
 * device, which handles everything else as before).
 */
static __always_inline int vxlan_decap(struct __sk_buff *skb, const struct datapath_config *cfg, __u32 *outer_src,
				       __u32 *vni)
{
	struct vxlan_outer outer;
	__be16 inner_proto;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &outer, sizeof(outer)) < 0 ||
	    bpf_skb_load_bytes(skb, VXLAN_ENCAP_LEN + 12, &inner_proto, sizeof(inner_proto)) < 0)
		return 0;
	if (outer.ip.ihl != 5 || outer.ip.protocol != IPPROTO_UDP || outer.ip.daddr != cfg->node_ip ||
	    outer.udp.dest != cfg->tunnel_port || (outer.ip.frag_off & bpf_htons(IP_MORE_FRAGMENTS | IP_OFFSET_MASK)) ||
	    outer.flags != bpf_htonl(VXLAN_FLAG_VNI) || (outer.vni & bpf_htonl(0xff)) ||
	    inner_proto != bpf_htons(ETH_P_IP))
		return 0;
	/* No DECAP_L4 flag on this kernel: a GSO packet keeps its tunnel GSO bits, harmless for
	 * a packet delivered to a local socket. FIXED_GSO: its segments were the inner ones. */
	if (bpf_skb_adjust_room(skb, -VXLAN_ENCAP_LEN, BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_FIXED_GSO) < 0)
		return 0;
	*outer_src = outer.ip.saddr;
	*vni = bpf_ntohl(outer.vni) >> 8;
	return 1;
}

#endif
