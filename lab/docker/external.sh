#!/usr/bin/env bash
# Entry point of the external host container, outside the mesh on a network of its own: its
# default route is the router (ROUTER), not the engine's bridge, so it answers the nodes through
# the router; it runs the lab's HTTP echo on PORT, which answers with the client address it saw.
set -euo pipefail
: "${IP:?}" "${PORT:?}" "${ROUTER:?}"
ip route replace default via "$ROUTER"
meshd workload echo --listen "0.0.0.0:$PORT" --cluster external --node external --endpoint external &
echo_pid=$!
trap 'kill "$echo_pid" 2>/dev/null; exit 0' TERM INT
for _ in $(seq 1 100); do
  ss -Hltn "sport = :$PORT" | grep -q . && break
  kill -0 "$echo_pid" || exit 1
  sleep 0.1
done
touch /tmp/ready
echo "external.sh: echo on $IP:$PORT, default route via $ROUTER"
wait "$echo_pid"
