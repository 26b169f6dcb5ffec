#!/usr/bin/env bash
# Issues 5 and 11, in a 2-cluster mesh of network namespaces with real etcd and agents:
# propagation (c2 etcd put -> entry in a c1 node's map, p50/p99 over 200 records, vs raw etcd
# put -> watch event) with an empty view and with 500k remote entries present (goal p99 <= 5 ms
# and <= 1.5x the empty view's), initial sync of the 500k into a freshly started agent (vs raw
# range read + decode + map writes; goal <= 1.3x) and memory per remote endpoint (goal <= 250
# bytes). Needs root, etcd and bpffs.
# Args are passed on: --endpoints N, --records R, --rounds K.
set -euo pipefail
cd "$(dirname "$0")/../.."
"${CARGO:-cargo}" build --release -q -p meshd
exec "${CARGO:-cargo}" bench -q -p meshd-e2e --bench agent_mesh -- "$@"
