#!/usr/bin/env bash
# Runs every benchmark; each prints its figure as a ratio against a baseline measured in the
# same run on the same machine. Results are recorded by hand in BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== meshd benchmarks on $(uname -r), $(nproc) cores =="
for b in scripts/bench.d/*.sh; do
  [ -e "$b" ] || continue
  echo "-- $(basename "$b" .sh)"
  bash "$b"
done
