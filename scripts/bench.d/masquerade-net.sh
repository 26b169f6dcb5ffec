#!/usr/bin/env bash
# Issue 12: a masqueraded endpoint -> an external host behind a router, meshd's eBPF masquerade
# (from-endpoint SNAT, from-netdev reverse) against nftables MASQUERADE on a plain node beside
# it (same underlay, router and external host), measured in the same run: TCP throughput
# (iperf3, 1 and 4 streams) and new connections per second (goal >= 1.0x both).
# Needs root, bpffs, iperf3 and nft. Args are passed on: --runs N (default 7), --seconds S
# (default 4), --connections PER_THREAD (default 500), --threads T (default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench masquerade_net -- "$@"
