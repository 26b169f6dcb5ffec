// SPDX-License-Identifier: Apache-2.0
/* The cheapest possible tc program: the baseline the per-packet cost of from-endpoint is
 * measured against under BPF_PROG_RUN. */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("classifier")
int baseline(struct __sk_buff *skb)
{
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
