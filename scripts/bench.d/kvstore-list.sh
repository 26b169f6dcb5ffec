#!/usr/bin/env bash
# Issue 2's first figure: list + decode of 100k ipcache records through the kvstore versus a raw
# etcd-client paginated range read of the same keys (median of 5 each, printed as a ratio).
# Starts its own etcd on free loopback ports (crates/testing); needs /usr/bin/etcd.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec cargo run --release --quiet -p meshd-kvstore --example kvstore-list -- "${KVSTORE_LIST_RECORDS:-100000}"
