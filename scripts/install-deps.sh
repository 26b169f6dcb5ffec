#!/usr/bin/env bash
# Installs what building and testing meshd needs, only when missing (idempotent).
# Debian packages: clang/llvm (eBPF objects), libbpf-dev (bpf_helpers.h), protobuf-compiler and
# libprotobuf-dev (gRPC), etcd-server/etcd-client (the real etcd 3.4 every test runs against),
# iproute2 (netns, veth, VXLAN), iperf3 and ethtool (benchmarks), bpftool (inspection), openssl (TLS tests
# against a TLS-1.2-only server).
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have clang || need+=(clang)
have llc || need+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
have protoc || need+=(protobuf-compiler)
# The well-known types (google/protobuf/descriptor.proto, struct.proto) that etcd-client's
# protos import; protoc alone does not ship them and --no-install-recommends skips them.
[ -f /usr/include/google/protobuf/descriptor.proto ] || need+=(libprotobuf-dev)
have etcd || need+=(etcd-server)
have etcdctl || need+=(etcd-client)
have ip || need+=(iproute2)
have iperf3 || need+=(iperf3)
# ethtool: the datapath-net benchmark's --offloads (offload settings of both topologies).
have ethtool || need+=(ethtool)
have bpftool || need+=(bpftool)
have openssl || need+=(openssl)
have jq || need+=(jq)
have ping || need+=(iputils-ping)
have nsenter || need+=(util-linux)
# The lab check's record of which replies pass back through a node (DSR), in the router.
have nft || need+=(nftables)
# The node port benchmark's kube-proxy iptables-mode baseline (scripts/bench.d/nodeport-net.sh).
have iptables-restore || need+=(iptables)
# asm/types.h for -target bpf lives under the multiarch include dir; the i386 headers provide
# the generic asm/ links clang needs on Debian.
[ -e /usr/include/asm/types.h ] || [ -e /usr/include/x86_64-linux-gnu/asm/types.h ] || need+=(linux-libc-dev)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  if [ "$(id -u)" != 0 ]; then
    echo "install-deps: need root to apt-get install ${need[*]}" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# promtool, for `promtool check metrics` in the e2e metrics test, and the Prometheus server the
# namespace lab runs when it is installed (`make lab`: every agent and apiserver scraped). Debian
# ships both only inside the prometheus server package (~96 MB installed with its web assets and
# a service to start); only the two binaries are taken from it (a ~19 MB download; they link
# libc only). The server's API needs no web assets.
if { ! have promtool || ! have prometheus; } && [ "$(id -u)" = 0 ]; then
  tmp=$(mktemp -d)
  fetch() { (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); }
  if { fetch || { apt-get update -qq && fetch; }; } \
    && dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"; then
    for bin in promtool prometheus; do
      have "$bin" || { install -m 0755 "$tmp/x/usr/bin/$bin" /usr/local/bin/$bin \
        && echo "install-deps: installed $bin"; }
    done
  else
    echo "install-deps: promtool and prometheus not installed; the metrics test checks the" \
      "format itself, the namespace lab runs no Prometheus" >&2
  fi
  rm -rf "$tmp"
fi

# bpffs: the datapath pins its maps here.
if ! mountpoint -q /sys/fs/bpf 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    mount -t bpf bpf /sys/fs/bpf
  fi
fi
echo "install-deps: ok"
