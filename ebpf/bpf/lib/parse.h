/* SPDX-License-Identifier: Apache-2.0 */
/* Header parsing into struct pkt_ctx. */
#ifndef MESHD_PARSE_H
#define MESHD_PARSE_H

#include "common.h"
#include "maps.h"

#define PARSE_IPV4 0
#define PARSE_ARP 1

#define IP_MORE_FRAGMENTS 0x2000
#define IP_OFFSET_MASK 0x1fff

/* Bytes of headers we read directly: Ethernet, IPv4 with options, and the first 8 bytes of L4
 * (enough for ports, TCP flags are at offset 13 so TCP asks for 14). */
#define PARSE_MAX_HDR (ETH_HLEN + 60 + 20)

static __always_inline int parse_packet(struct __sk_buff *skb, struct pkt_ctx *ctx, __u32 *l3_off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return MESHD_DROP_INVALID_PACKET;
	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return MESHD_DROP_UNSUPPORTED_L3;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end) {
		/* Headers may sit in paged data (e.g. after GRO); make them linear once. */
		if (bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr) + 20) < 0)
			return MESHD_DROP_INVALID_PACKET;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data + ETH_HLEN;
		if ((void *)(ip + 1) > data_end)
			return MESHD_DROP_INVALID_PACKET;
	}
	__u32 ihl = ip->ihl * 4;
	if (ihl < sizeof(struct iphdr))
		return MESHD_DROP_INVALID_PACKET;

	ctx->saddr = ip->saddr;
	ctx->daddr = ip->daddr;
	ctx->proto = ip->protocol;
	ctx->ihl = ip->ihl;
	*l3_off = ETH_HLEN;

	__u16 frag_off = bpf_ntohs(ip->frag_off);
	struct frag_key fkey = {.saddr = ip->saddr, .daddr = ip->daddr, .id = ip->id, .proto = ip->protocol};
	if (frag_off & IP_OFFSET_MASK) {
		/* No L4 header here: take the ports the first fragment recorded. */
		struct frag_value *fv = bpf_map_lookup_elem(&FRAGS, &fkey);
		if (!fv)
			return MESHD_DROP_FRAG_NOT_FOUND;
		ctx->sport = fv->sport;
		ctx->dport = fv->dport;
		return PARSE_IPV4;
	}
	int more_fragments = frag_off & IP_MORE_FRAGMENTS;

	__u32 l4_off = ETH_HLEN + ihl;
	__u8 proto = ip->protocol;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
		return PARSE_IPV4;
	__u32 need = proto == IPPROTO_TCP ? 14 : 8;
	if (data + l4_off + need > data_end) {
		if (bpf_skb_pull_data(skb, l4_off + need) < 0)
			return MESHD_DROP_INVALID_PACKET;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	/* ihl is 4 bits, so l4_off <= ETH_HLEN + 60: the verifier sees a bounded offset. */
	__u8 *l4 = data + l4_off;
	if ((void *)(l4 + 8) > data_end)
		return MESHD_DROP_INVALID_PACKET;
	ctx->l4_off = l4_off;

	if (proto == IPPROTO_ICMP) {
		struct icmphdr *icmp = (void *)l4;
		ctx->icmp_type = icmp->type;
		/* Echo: the identifier plays the role of a port; the reply reverses it. */
		if (icmp->type == ICMP_ECHO) {
			ctx->sport = icmp->un.echo.id;
			ctx->dport = 0;
		} else if (icmp->type == ICMP_ECHOREPLY) {
			ctx->sport = 0;
			ctx->dport = icmp->un.echo.id;
		}
	} else {
		ctx->sport = *(__u16 *)l4;
		ctx->dport = *(__u16 *)(l4 + 2);
		if (proto == IPPROTO_TCP) {
			if ((void *)(l4 + 14) > data_end)
				return MESHD_DROP_INVALID_PACKET;
			ctx->tcp_flags = l4[13] & (TCP_FLAG_FIN | TCP_FLAG_SYN | TCP_FLAG_RST);
		}
	}
	if (more_fragments) {
		struct frag_value fv = {.sport = ctx->sport, .dport = ctx->dport};
		bpf_map_update_elem(&FRAGS, &fkey, &fv, BPF_ANY);
	}
	return PARSE_IPV4;
}

/* Is this ICMP type an error that embeds the offending packet's headers? */
static __always_inline int icmp_is_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED || type == ICMP_PARAMETERPROB ||
	       type == ICMP_SOURCE_QUENCH;
}

/* Reads the tuple of the packet embedded in an ICMP error (as the original sender sent it). */
static __always_inline int parse_icmp_inner(struct __sk_buff *skb, __u32 l3_off, struct ct_key *inner)
{
	__u8 ihl_byte;
	if (bpf_skb_load_bytes(skb, l3_off, &ihl_byte, 1) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u32 icmp_off = l3_off + (ihl_byte & 0x0f) * 4;
	__u32 inner_ip_off = icmp_off + sizeof(struct icmphdr);
	struct iphdr inner_ip;
	if (bpf_skb_load_bytes(skb, inner_ip_off, &inner_ip, sizeof(inner_ip)) < 0)
		return MESHD_DROP_INVALID_PACKET;
	__u32 inner_ihl = inner_ip.ihl * 4;
	if (inner_ihl < sizeof(struct iphdr) || inner_ihl > 60)
		return MESHD_DROP_INVALID_PACKET;
	__u16 ports[2] = {0, 0};
	if (inner_ip.protocol == IPPROTO_TCP || inner_ip.protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, inner_ip_off + inner_ihl, ports, sizeof(ports)) < 0)
			return MESHD_DROP_INVALID_PACKET;
	} else if (inner_ip.protocol == IPPROTO_ICMP) {
		struct icmphdr inner_icmp;
		if (bpf_skb_load_bytes(skb, inner_ip_off + inner_ihl, &inner_icmp, sizeof(inner_icmp)) < 0)
			return MESHD_DROP_INVALID_PACKET;
		if (inner_icmp.type == ICMP_ECHO)
			ports[0] = inner_icmp.un.echo.id;
		else if (inner_icmp.type == ICMP_ECHOREPLY)
			ports[1] = inner_icmp.un.echo.id;
	}
	inner->saddr = inner_ip.saddr;
	inner->daddr = inner_ip.daddr;
	inner->sport = ports[0];
	inner->dport = ports[1];
	inner->proto = inner_ip.protocol;
	return 0;
}

#endif
