#!/usr/bin/env bash
# Issue 6, failover of a global service with affinity local: the last local backend is deleted
# while a client keeps connecting to the VIP; the figure is the time from the deletion command to
# the first answer from the remote cluster, p50 over 20 trials (goal < 200 ms), printed next to
# the deletion command's own time.
# Brings up its own namespace lab (release binaries; root, etcd, bpffs). The measurement is an
# ignored test of crates/lab/tests/services.rs, which reuses the end-to-end tests' lab driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p meshd -p clustermesh-apiserver
exec cargo test --release --quiet -p meshd-lab --test services -- --ignored --exact bench_failover --nocapture --test-threads 1
