#!/usr/bin/env bash
# Issue 15: the mirror (clustermesh-apiserver --kvstoremesh): records/s mirrored from a remote
# etcd into the local one (its list into an empty cache, and a burst of rewrites through its
# watch) versus raw etcd writes of the same records in the same run (medians, printed as
# ratios). Starts its own two etcds on free loopback ports (crates/testing); needs /usr/bin/etcd.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo run --release --quiet -p clustermesh-apiserver --example mirror-bench -- "${MIRROR_RECORDS:-50000}"
