/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Identity policy. A direction of a subject identity is default-allow until the agent writes its
 * marker entry; then only POLICY entries let packets through. Lookups go from the most specific
 * key to the least and the first entry found decides, so the agent compiles deny-over-allow
 * precedence into the entries it writes.
 */
#ifndef MESHD_POLICY_H
#define MESHD_POLICY_H

#include "maps.h"

static __always_inline int policy_verdict(struct policy_key *key)
{
	struct policy_value *v = bpf_map_lookup_elem(&POLICY, key);
	if (!v)
		return 0;
	return v->verdict == MESHD_VERDICT_DENY ? MESHD_DROP_POLICY_DENY : 1;
}

/* Returns 0 if the packet may pass, a MESHD_DROP_POLICY* code otherwise. */
static __always_inline int policy_check(__u32 subject, __u32 peer, const struct pkt_ctx *ctx, __u8 direction)
{
	struct policy_key key = {.subject_identity = subject, .direction = direction | MESHD_POLICY_F_MARKER};
	if (!bpf_map_lookup_elem(&POLICY, &key))
		return 0;

	__u16 dport = 0;
	if (ctx->proto == IPPROTO_TCP || ctx->proto == IPPROTO_UDP)
		dport = bpf_ntohs(ctx->dport);
	key.direction = direction;

	int v;
#pragma unroll
	for (int any_peer = 0; any_peer < 2; any_peer++) {
		key.peer_identity = any_peer ? 0 : peer;
		if (dport) {
			key.proto = ctx->proto;
			key.dport = dport;
			if ((v = policy_verdict(&key)))
				return v < 0 ? v : 0;
		}
		key.proto = ctx->proto;
		key.dport = 0;
		if ((v = policy_verdict(&key)))
			return v < 0 ? v : 0;
		key.proto = 0;
		if ((v = policy_verdict(&key)))
			return v < 0 ? v : 0;
	}
	return MESHD_DROP_POLICY;
}

#endif
