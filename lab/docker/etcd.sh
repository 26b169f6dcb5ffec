#!/usr/bin/env bash
# Entry point of a cluster's etcd container: etcd with TLS and client-certificate auth against
# the mesh CA, then the cluster's users and roles (`meshd etcd bootstrap`, idempotent): a user
# per node in NODES (comma separated), and read access for each cluster in PEERS (space
# separated, `meshd clustermesh connect`).
set -euo pipefail
: "${CLUSTER:?}" "${IP:?}" "${NODES:?}" "${PEERS:=}"
certs=/certs/$CLUSTER
etcd --name "$CLUSTER" --data-dir /var/lib/etcd \
  --listen-client-urls "https://$IP:2379" --advertise-client-urls "https://$IP:2379" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster "$CLUSTER=http://127.0.0.1:2380" \
  --client-cert-auth --trusted-ca-file "$certs/ca.pem" \
  --cert-file "$certs/server.pem" --key-file "$certs/server-key.pem" \
  --logger zap --log-outputs stderr &
etcd_pid=$!
for _ in $(seq 1 100); do
  admin=(--endpoints "https://$IP:2379" --ca "$certs/ca.pem" --cert "$certs/admin.pem" --key "$certs/admin-key.pem")
  if meshd etcd bootstrap "${admin[@]}" --node "$NODES" >/tmp/bootstrap.log 2>&1; then
    for peer in $PEERS; do
      meshd clustermesh connect "$peer" "${admin[@]}" >>/tmp/bootstrap.log 2>&1
    done
    echo "etcd.sh: $CLUSTER etcd bootstrapped"
    touch /tmp/ready
    break
  fi
  sleep 0.3
done
[ -e /tmp/ready ] || { cat /tmp/bootstrap.log >&2; exit 1; }
wait "$etcd_pid"
