/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Every map of the datapath, declared once and pinned by name, so both programs (separate
 * objects) and every reload of them share the same maps under the node's bpffs directory
 * (but for CT_CLOCK, a per-program cache, at the end).
 */
#ifndef MESHD_MAPS_H
#define MESHD_MAPS_H

#include "common.h"

#ifndef LIBBPF_PIN_BY_NAME
#define LIBBPF_PIN_BY_NAME 1
#endif

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, MESHD_IPCACHE_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} IPCACHE SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct ipcache_host_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, MESHD_IPCACHE_HOSTS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} IPCACHE_HOSTS SEC(".maps");

/* The ipcache entry covering addr (network byte order): /32 hash first, then the trie. */
static __always_inline struct ipcache_value *ipcache_lookup(__u32 addr)
{
	struct ipcache_host_key hkey = {.addr = addr};
	struct ipcache_value *v = bpf_map_lookup_elem(&IPCACHE_HOSTS, &hkey);
	if (v)
		return v;
	struct ipcache_key key = {.prefixlen = 32, .addr = addr};
	return bpf_map_lookup_elem(&IPCACHE, &key);
}

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
	__uint(max_entries, MESHD_ENDPOINTS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ENDPOINTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct node_key);
	__type(value, struct node_value);
	__uint(max_entries, MESHD_NODES_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} NODES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, MESHD_POLICY_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} POLICY SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, MESHD_CT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_value);
	__uint(max_entries, MESHD_FRAGS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} FRAGS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct service_key);
	__type(value, struct service_value);
	__uint(max_entries, MESHD_SERVICES_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} SERVICES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct backend_key);
	__type(value, struct backend_value);
	__uint(max_entries, MESHD_BACKENDS_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} BACKENDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct nat_value);
	__uint(max_entries, MESHD_NAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} NAT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct no_masq_key);
	__type(value, struct no_masq_value);
	__uint(max_entries, MESHD_NO_MASQ_MAX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} NO_MASQ SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct metrics_value);
	__uint(max_entries, MESHD_METRICS_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} METRICS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct datapath_config);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CONFIG SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MESHD_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} EVENTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct event_limit);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} EVENT_LIMIT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct event_budget);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} EVENT_BUDGET SEC(".maps");

/* The one map that is not pinned: each program object keeps its own per-CPU cache of the coarse
 * clock (ct_now_cached in lib/ct.h), which nothing outside the programs reads and a reload may
 * start afresh. Not part of the ABI. */
struct ct_clock {
	__u64 jiffies; /* bpf_jiffies64() when now_ns was read */
	__u64 now_ns;  /* bpf_ktime_get_coarse_ns() */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct ct_clock);
	__uint(max_entries, 1);
} CT_CLOCK SEC(".maps");

#endif
