#!/usr/bin/env bash
# Entry point of the lab's Prometheus container: scrapes every agent and apiserver
# (/etc/meshd-lab/prometheus.yml, from lab/docker/prometheus.yml); API and UI on IP:PORT.
set -euo pipefail
: "${IP:?}" "${PORT:?}"
exec prometheus --config.file=/etc/meshd-lab/prometheus.yml \
  --storage.tsdb.path=/tmp/prometheus --storage.tsdb.retention.time=1d \
  --web.listen-address="$IP:$PORT"
