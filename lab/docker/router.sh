#!/usr/bin/env bash
# Entry point of the router container: on the underlay (IP) and on the external host's network
# (EXTERNAL_IP), forwarding between them (docker-compose.yml sets net.ipv4.ip_forward). It knows
# no pod CIDR: with masquerade on, what leaves the mesh carries node addresses.
set -euo pipefail
: "${IP:?}" "${EXTERNAL_IP:?}"
[ "$(cat /proc/sys/net/ipv4/ip_forward)" = 1 ] || { echo "router.sh: IPv4 forwarding is off" >&2; exit 1; }
for ip in "$IP" "$EXTERNAL_IP"; do
  ip -o -4 addr show | grep -q " $ip/" || { echo "router.sh: no address $ip" >&2; exit 1; }
done
echo "router.sh: forwarding between $IP and $EXTERNAL_IP"
# PID 1 ignores signals it has no handler for: without this trap `docker stop` waits its timeout.
trap 'exit 0' TERM INT
sleep infinity &
wait
