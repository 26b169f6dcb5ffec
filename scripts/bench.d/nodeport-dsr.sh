#!/usr/bin/env bash
# Issue 14: an external host -> a node port -> a backend on another node, DSR against SNAT in the
# same run and topology (native routing): TCP_RR latency (one connection, 1-byte request and
# answer at a time), medians over runs and the dsr/snat ratio (goal <= 0.9x). Needs root and
# bpffs. Args are passed on: --runs N (default 7), --seconds S (default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${CARGO:-cargo}" bench -q -p meshd-datapath --bench nodeport_dsr -- "$@"
