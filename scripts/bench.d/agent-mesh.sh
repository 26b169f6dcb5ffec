#!/usr/bin/env bash
# Issue 5, in a 2-cluster mesh of network namespaces with real etcd and agents:
# propagation (c1 etcd put -> entry in a c2 node's map, p50/p99 over 200 records, vs raw etcd
# put -> watch event; goal p99 <= 50 ms and <= 3x), initial sync of 100k remote ipcache records
# into a freshly started agent (vs raw range read + decode + map writes; goal <= 2x) and the
# agent's resident memory with them (goal <= 100 MB). Needs root, etcd and bpffs.
# Args are passed on: --endpoints N, --records R.
set -euo pipefail
cd "$(dirname "$0")/../.."
"${CARGO:-cargo}" build --release -q -p meshd
exec "${CARGO:-cargo}" bench -q -p meshd-e2e --bench agent_mesh -- "$@"
