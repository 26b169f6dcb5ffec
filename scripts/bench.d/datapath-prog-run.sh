#!/usr/bin/env bash
# ns per packet of from_endpoint under BPF_PROG_RUN (1e6 repeats per run, median of 9) with
# 100k ipcache and 10k policy entries, vs an empty classifier on the same packet. Needs root.
# Args are passed on: --runs N, --repeat N, --ipcache N.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench datapath_prog_run -- "$@"
