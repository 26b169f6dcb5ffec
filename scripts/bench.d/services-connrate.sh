#!/usr/bin/env bash
# Issue 6, new-connection rate through a service VIP versus straight to the backend's IP in the
# same run (4 client threads, connect + GET + close, 7 alternating runs, medians; goal >= 0.9x).
# Brings up its own namespace lab (release binaries; root, etcd, bpffs). The measurement is an
# ignored test of crates/lab/tests/services.rs, which reuses the end-to-end tests' lab driver.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet -p meshd -p clustermesh-apiserver
exec cargo test --release --quiet -p meshd-lab --test services -- --ignored --exact bench_connection_rate --nocapture --test-threads 1
