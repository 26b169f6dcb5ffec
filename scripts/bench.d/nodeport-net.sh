#!/usr/bin/env bash
# Issue 14: an external host -> a node port -> a backend on another node, meshd's eBPF (from-netdev
# DNAT + SNAT, native routing to the backend's node, replies translated back) against kube-proxy's
# way, nftables DNAT + MASQUERADE on a plain receiving node beside it (same underlay, router and
# external host), measured in the same run: TCP throughput (iperf3, 1 and 4 streams) and new
# connections per second, medians over runs and their ratio. Needs root, bpffs, iperf3 and nft.
# Args are passed on: --runs N (default 7), --seconds S (default 4), --connections PER_THREAD
# (default 500), --threads T (default 2), --services N, --baseline B.
#
# At scale: --services N (or env SERVICES=N; default 1, today's single service) installs N - 1
# more services (ClusterIP, a backend each) in both arms before the measured node ports: in
# meshd's maps and in the baseline, laid out as kube-proxy lays them out. --baseline (or env
# BASELINE): nftables (default, one dnat of the node port range, independent of N),
# nftables-map (kube-proxy's nftables mode: verdict maps) or iptables (kube-proxy's iptables
# mode: KUBE-SERVICES, one rule per service walked by each new connection, then KUBE-NODEPORTS;
# needs iptables-restore). E.g. SERVICES=5000 BASELINE=iptables scripts/bench.d/nodeport-net.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
extra=()
[ -n "${SERVICES:-}" ] && extra+=(--services "$SERVICES")
[ -n "${BASELINE:-}" ] && extra+=(--baseline "$BASELINE")
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench nodeport_net -- "${extra[@]}" "$@"
