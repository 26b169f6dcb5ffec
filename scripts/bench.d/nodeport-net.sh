#!/usr/bin/env bash
# Issue 14: an external host -> a node port -> a backend on another node, meshd's eBPF (from-netdev
# DNAT + SNAT, native routing to the backend's node, replies translated back) against kube-proxy's
# way, nftables DNAT + MASQUERADE on a plain receiving node beside it (same underlay, router and
# external host), measured in the same run: TCP throughput (iperf3, 1 and 4 streams) and new
# connections per second, medians over runs and their ratio. Needs root, bpffs, iperf3 and nft.
# Args are passed on: --runs N (default 7), --seconds S (default 4), --connections PER_THREAD
# (default 500), --threads T (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench nodeport_net -- "$@"
