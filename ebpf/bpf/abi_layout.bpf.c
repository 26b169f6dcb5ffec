// SPDX-License-Identifier: Apache-2.0
/* Never loaded: one global of every ABI struct and enum, so the object's BTF describes all of them and
 * the Rust mirror test can compare sizes and offsets against what clang laid out. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "meshd_abi.h"

struct ipcache_key abi_ipcache_key;
struct ipcache_host_key abi_ipcache_host_key;
struct ipcache_value abi_ipcache_value;
struct endpoint_key abi_endpoint_key;
struct endpoint_value abi_endpoint_value;
struct node_key abi_node_key;
struct node_value abi_node_value;
struct policy_key abi_policy_key;
struct policy_value abi_policy_value;
struct ct_key abi_ct_key;
struct ct_value abi_ct_value;
struct frag_key abi_frag_key;
struct frag_value abi_frag_value;
struct metrics_value abi_metrics_value;
struct datapath_config abi_datapath_config;
struct flow_event abi_flow_event;
struct event_limit abi_event_limit;
struct event_budget abi_event_budget;
struct service_key abi_service_key;
struct service_value abi_service_value;
struct backend_key abi_backend_key;
struct backend_value abi_backend_value;
struct nat_key abi_nat_key;
struct nat_value abi_nat_value;
struct no_masq_key abi_no_masq_key;
struct no_masq_value abi_no_masq_value;
struct dsr_option abi_dsr_option;

enum meshd_limits abi_limits;
enum meshd_identity abi_identity;
enum meshd_dir abi_dir;
enum meshd_reason abi_reason;
enum meshd_metrics_layout abi_metrics_layout;
enum meshd_ipcache_flags abi_ipcache_flags;
enum meshd_policy_flags abi_policy_flags;
enum meshd_verdict abi_verdict;
enum meshd_ct_flags abi_ct_flags;
enum meshd_service_flags abi_service_flags;
enum meshd_event_type abi_event_type;
enum meshd_event_limit_flags abi_event_limit_flags;
enum meshd_config_flags abi_config_flags;
enum meshd_nat abi_nat;
enum meshd_dsr abi_dsr;

char LICENSE[] SEC("license") = "GPL";
