#!/usr/bin/env bash
# Issue 16: agent CPU during 1,000 new connections/s without observers against the same load
# with a scrape of both agents every second and `meshd observe` attached to both (one cluster
# of 2 nodes, release agents). Needs root, etcd and bpffs. Args are passed on: --rate N,
# --secs S, --rounds K.
set -euo pipefail
cd "$(dirname "$0")/../.."
"${CARGO:-cargo}" build --release -q -p meshd
exec "${CARGO:-cargo}" bench -q -p meshd-e2e --bench agent_observe_cpu -- "$@"
