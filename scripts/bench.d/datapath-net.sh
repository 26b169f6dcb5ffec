#!/usr/bin/env bash
# Endpoint -> endpoint across two nodes: meshd eBPF datapath vs plain kernel VXLAN + routes,
# same topology, measured alternately in one run. TCP throughput (iperf3, 1 and 4 streams,
# goal >= 0.95x) and TCP_RR-style latency (goal <= 1.05x). Needs root and iperf3.
# Args are passed on: --runs N (default 5), --seconds S (default 4), --rr TRANSACTIONS.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench datapath_net -- "$@"
