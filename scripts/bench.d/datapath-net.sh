#!/usr/bin/env bash
# Endpoint -> endpoint across two nodes: meshd eBPF datapath vs plain kernel VXLAN + routes,
# same topology, measured alternately in one run. TCP throughput (iperf3, 1 and 4 streams,
# goal >= 1.1x since issue 18, 0.95x before) and TCP_RR-style latency (goal <= 0.9x, 1.05x before).
# Needs root and iperf3.
# Args are passed on: --runs N (default 9), --seconds S (default 4), --rr TRANSACTIONS,
# --offloads show|gro|bigtcp, --profile 1, --perf 1, --tunnel-encap device|program (see the
# bench's header).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench datapath_net -- "$@"
