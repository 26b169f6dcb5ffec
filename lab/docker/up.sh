#!/usr/bin/env bash
# `make lab-docker`: the docker-compose lab. Builds the binaries and the image (offline base
# image when no registry answers), issues the certificates, starts the containers, applies the
# lab's manifests and runs the same connectivity check as `make lab`.
set -euo pipefail
cd "$(dirname "$0")/../.."
project=meshd-lab
run=lab/docker/run
stage=lab/docker/build
step() { echo "lab-docker: $*" >&2; }

step "building meshd, clustermesh-apiserver and meshd-otlp-collector (release)"
cargo build --release -q -p meshd -p clustermesh-apiserver -p meshd-otlp-collector
meshd=target/release/meshd

step "base image"
lab/docker/build-base.sh
rm -rf "$stage" && mkdir -p "$stage/bin"
cp target/release/meshd target/release/clustermesh-apiserver target/release/meshd-otlp-collector "$stage/bin/"
cp lab/docker/Dockerfile lab/docker/*.sh lab/docker/prometheus.yml "$stage/"
step "building image meshd-lab:latest"
docker build -q -t meshd-lab:latest --build-arg BASE=meshd-lab-base:bookworm "$stage" >/dev/null

# Certificates: one mesh CA; per cluster the etcd/apiserver server certificate (SANs: the etcd
# and apiserver container addresses), the admin (admin-cN) and remote (remote-cN) client
# certificates, and one node certificate per node (node-cN-nM, in cN/nM/).
certs=$run/certs
# Certificates from before per-cluster names (no node certificates) are issued anew.
if [ ! -e "$certs/c1/n1/node.pem" ]; then
  rm -rf "$certs"
  step "certificates in $certs"
  mkdir -p "$certs"
  "$meshd" certs ca create --out-dir "$certs" >/dev/null
  for id in 1 2; do
    "$meshd" certs issue all --cluster "c$id" --ca "$certs/ca.pem" --ca-key "$certs/ca-key.pem" \
      --out-dir "$certs/c$id" --ip "10.78.0.10$id" --ip "10.78.0.11$id" --dns "etcd.c$id" >/dev/null
    for n in n1 n2; do
      "$meshd" certs issue node --cluster "c$id" --node "$n" --ca "$certs/ca.pem" \
        --ca-key "$certs/ca-key.pem" --out-dir "$certs/c$id/$n" >/dev/null
    done
  done
  # The CLI config the node containers use (MESHD_CONFIG): paths as seen inside them.
  {
    echo "contexts:"
    for id in 1 2; do
      echo "  - name: lab-c$id"
      echo "    server: https://10.78.0.11$id:9443"
      echo "    ca: /certs/c$id/ca.pem"
      echo "    cert: /certs/c$id/admin.pem"
      echo "    key: /certs/c$id/admin-key.pem"
    done
    echo "current-context: lab-c1"
  } >"$certs/meshd-cli.yaml"
  chmod -R a+rX "$certs"
fi

step "starting containers (docker-compose -p $project up -d)"
docker-compose -p "$project" up -d --force-recreate >/dev/null

nodes="c1-n1 c1-n2 c2-n1 c2-n2"
container() { docker-compose -p "$project" ps -q "$1"; }
step "waiting for the nodes and the external host"
for n in $nodes external; do
  for i in $(seq 1 180); do
    state=$(docker inspect -f '{{.State.Health.Status}}' "$(container "$n")" 2>/dev/null || echo missing)
    [ "$state" = healthy ] && break
    if [ "$state" = unhealthy ] || [ "$i" = 180 ]; then
      docker-compose -p "$project" logs --tail 40 "$n" >&2
      step "$n did not come up ($state)"
      exit 1
    fi
    sleep 1
  done
done

step "waiting for every node to see both clusters ready"
for n in $nodes; do
  for i in $(seq 1 120); do
    ready=$(docker exec "$(container "$n")" meshd clustermesh status -o json 2>/dev/null \
      | jq '[.. | objects | select(has("ready")) | select(.ready == true)] | length' 2>/dev/null || echo 0)
    [ "${ready:-0}" -ge 2 ] && break
    [ "$i" = 120 ] && { step "node $n does not see both clusters ready"; exit 1; }
    sleep 1
  done
done

step "applying lab/manifests to both clusters"
for id in 1 2; do
  docker exec "$(container "c$id-n1")" meshd apply -f /manifests --context "lab-c$id" >/dev/null
done

step "connectivity check"
# Services need a moment to get their backends from every cluster: retry the check briefly.
for i in 1 2 3 4 5; do
  if "$meshd" lab check --docker "$project" >"$run/check.txt" 2>&1; then
    cat "$run/check.txt"
    step "all checks passed; the lab keeps running (make lab-docker-down removes it)"
    exit 0
  fi
  sleep 3
done
cat "$run/check.txt"
step "some checks failed"
exit 1
