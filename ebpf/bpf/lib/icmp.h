/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The ICMPv4 header and the types the datapath reads (RFC 792).
 *
 * Defined here instead of taken from <linux/icmp.h>: that header includes <linux/if.h>, which
 * includes glibc's <sys/socket.h>. Under `-target bpf` glibc's headers see no x86_64 macro,
 * pick the 32-bit variant and need <gnu/stubs-32.h>, which a machine without the i386 libc
 * headers (most of them) does not have. The layout is fixed by the wire format.
 */
#ifndef MESHD_ICMP_H
#define MESHD_ICMP_H

#include <linux/types.h>

#define ICMP_ECHOREPLY 0
#define ICMP_DEST_UNREACH 3
#define ICMP_SOURCE_QUENCH 4
#define ICMP_ECHO 8
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12

struct icmphdr {
	__u8 type;
	__u8 code;
	__sum16 checksum;
	union {
		struct {
			__be16 id;
			__be16 sequence;
		} echo;
		__be32 gateway;
		struct {
			__be16 __unused;
			__be16 mtu;
		} frag;
	} un;
};

_Static_assert(sizeof(struct icmphdr) == 8, "ICMP header is 8 bytes on the wire");

#endif /* MESHD_ICMP_H */
