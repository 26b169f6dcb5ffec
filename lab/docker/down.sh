#!/usr/bin/env bash
# `make lab-docker-down`: removes the docker lab's containers, network and generated files.
set -euo pipefail
cd "$(dirname "$0")/../.."
docker-compose -p meshd-lab down --volumes --remove-orphans --timeout 5
rm -rf lab/docker/run lab/docker/build
echo "lab-docker-down: removed" >&2
