#!/usr/bin/env bash
# Entry point of a cluster's clustermesh-apiserver container (Prometheus metrics on
# IP:METRICS_PORT, 9963 unless given).
set -euo pipefail
: "${CLUSTER:?}" "${CLUSTER_ID:?}" "${IP:?}" "${ETCD:?}" "${SERVICE_CIDR:?}"
certs=/certs/$CLUSTER
# Traces to the lab's collector (OTLP, empty: none), marked with this apiserver's name.
export OTEL_EXPORTER_OTLP_ENDPOINT="${OTLP:-}" OTEL_RESOURCE_ATTRIBUTES="host.name=$CLUSTER-apiserver"
exec clustermesh-apiserver \
  --cluster-name "$CLUSTER" --cluster-id "$CLUSTER_ID" \
  --etcd-endpoints "$ETCD" --etcd-ca "$certs/ca.pem" \
  --etcd-cert "$certs/admin.pem" --etcd-key "$certs/admin-key.pem" \
  --listen "$IP:9443" --health-listen "$IP:9444" --metrics-addr "$IP:${METRICS_PORT:-9963}" \
  --tls-ca "$certs/ca.pem" --tls-cert "$certs/server.pem" --tls-key "$certs/server-key.pem" \
  --service-cidr "$SERVICE_CIDR"
