#!/usr/bin/env bash
# What one veth hop on each endpoint's egress costs on the kernel's routed path (the hop a
# netkit endpoint pair would remove from meshd's path; issue 18, "netkit measured"): plain vs
# with the hop, measured alternately in one run. TCP throughput (iperf3, 1 and 4 streams) and
# TCP_RR. Needs root, iperf3, tc (u32, mirred). Args: --runs N (default 9), --seconds S, --rr N.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench endpoint_hop -- "$@"
