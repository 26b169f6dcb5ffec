#!/usr/bin/env bash
# Entry point of a node container: the route to the external network, bpffs, the meshd agent
# (its Prometheus metrics on NODE_IP:METRICS_PORT, 9962 unless given), then this node's endpoints (one app=echo running the echo workload, one app=client), then it
# waits on the agent.
set -euo pipefail
: "${CLUSTER:?}" "${CLUSTER_ID:?}" "${NODE:?}" "${NODE_IP:?}" "${POD_CIDR:?}" "${ETCD:?}" "${REMOTES:=}"
# The external host's network (EXTERNAL_NET) is reached through the lab's router (ROUTER) on the
# underlay, as a datacenter network would route it; the default route (the engine's bridge)
# does not reach it: the engine isolates its networks from each other.
if [ -n "${EXTERNAL_NET:-}" ]; then
  ip route replace "$EXTERNAL_NET" via "${ROUTER:?ROUTER is needed with EXTERNAL_NET}"
fi
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
# The agent writes its links' sysctls (IPv4 forwarding on each endpoint's veth) under
# /proc/sys/net, which the engine mounts read-only (docker-compose 1.x cannot pass
# `systempaths=unconfined`); the values written are this container's network namespace's.
mount -o remount,rw /proc/sys
certs=/certs/$CLUSTER
mkdir -p /etc/meshd/clusters /var/lib/meshd /run/meshd
# REMOTES: space-separated NAME=ENDPOINT pairs; every remote is read with this cluster's own
# `remote` certificate (remote-$CLUSTER), which each remote lets in (`meshd clustermesh connect`).
for r in $REMOTES; do
  name=${r%%=*}
  cat >"/etc/meshd/clusters/$name" <<YAML
endpoints: [${r#*=}]
ca: /certs/$name/ca.pem
cert: $certs/remote.pem
key: $certs/remote-key.pem
YAML
done
dev=$(ip -o -4 addr show | awk -v ip="$NODE_IP" '$4 ~ "^"ip"/" {print $2; exit}')
cat >/etc/meshd/agent.yaml <<YAML
cluster: $CLUSTER
cluster_id: $CLUSTER_ID
node: $NODE
node_ip: $NODE_IP
pod_cidr: $POD_CIDR
etcd:
  endpoints: [$ETCD]
  ca: $certs/$NODE/ca.pem
  cert: $certs/$NODE/node.pem
  key: $certs/$NODE/node-key.pem
remote_clusters_dir: /etc/meshd/clusters
bpffs_dir: /sys/fs/bpf/meshd
underlay_device: ${dev:-eth0}
api_socket: /run/meshd/agent.sock
state_dir: /var/lib/meshd
metrics_addr: $NODE_IP:${METRICS_PORT:-9962}
YAML
# Traces to the lab's collector (OTLP, empty: none), marked with this node's name; only the
# agent's, not every CLI call's below.
OTEL_EXPORTER_OTLP_ENDPOINT="${OTLP:-}" OTEL_RESOURCE_ATTRIBUTES="host.name=$CLUSTER-$NODE" \
  meshd agent --config /etc/meshd/agent.yaml &
agent=$!
for _ in $(seq 1 300); do
  meshd status -o json >/dev/null 2>&1 && break
  kill -0 "$agent" || exit 1
  sleep 0.2
done
# Endpoints survive an agent restart (its state dir), so a restarted container re-adds nothing.
add() { # NAME LABELS
  if ! meshd endpoint list -o json | jq -e --arg n "$1" '.. | objects | select(.name? == $n)' >/dev/null; then
    meshd endpoint add "$1" --labels "$2" -o json >/dev/null
  fi
}
add "echo-$CLUSTER-$NODE" app=echo
add "client-$CLUSTER-$NODE" app=client
add "web-$CLUSTER-$NODE" app=web
# The HTTP echo in echo-* and in web-* (the public endpoints behind the node ports).
for ep in "echo-$CLUSTER-$NODE" "web-$CLUSTER-$NODE"; do
  netns=$(meshd endpoint list -o json \
    | jq -r --arg n "$ep" '[.. | objects | select(.name? == $n) | .netns][0]')
  nsenter --net="$netns" -- meshd workload echo --listen 0.0.0.0:8080 \
    --cluster "$CLUSTER" --node "$NODE" --endpoint "$ep" &
done
touch /tmp/ready
echo "node.sh: $CLUSTER/$NODE ready"
wait "$agent"
