#!/usr/bin/env bash
# Issue 15, in a 2-cluster mesh whose clusters run a mirror (clustermesh-apiserver
# --kvstoremesh): remote put -> node map through the cache against direct mode, the same puts
# timed on two nodes of the same cluster (goal p99 <= 2x direct and <= 10 ms); then 253
# simulated clusters x 2,016 endpoints (255 clusters with c1 and c2, 510k entries) mirrored into the local etcd: initial sync of a fresh agent
# against a raw range read of the same keys, RSS and bytes per entry, and propagation p99 under
# 1,000 changes/s. Needs root, etcd and bpffs. Args are passed on: --records N, --rounds K,
# --clusters K, --per-cluster E, --churn-secs S.
set -euo pipefail
cd "$(dirname "$0")/../.."
"${CARGO:-cargo}" build --release -q -p meshd -p clustermesh-apiserver
exec "${CARGO:-cargo}" bench -q -p meshd-e2e --bench cache_mesh -- "$@"
