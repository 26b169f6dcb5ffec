#!/usr/bin/env bash
# Native routing, endpoint -> endpoint across two nodes: meshd eBPF (bpf_fib_lookup redirect to
# the uplink, from_netdev redirect_peer into the endpoint) vs the kernel's own routed path
# (veth, forwarding, routes, no eBPF), same topology, measured alternately in one run. TCP
# throughput (iperf3, 1 and 4 streams, goal >= 1.1x) and TCP_RR-style latency (goal <= 0.9x),
# issue 13. Needs root and iperf3. Args are passed on (see datapath-net.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench datapath_net -- --native 1 "$@"
