#!/usr/bin/env bash
# Makes the lab's base image `meshd-lab-base:bookworm` available to Docker.
#
# Users with a registry get it from `debian:bookworm-slim` (docker pull). Machines without any
# reachable image registry (CI here has none) build the same thing offline from Debian's
# packages: debootstrap a minimal bookworm root file system and `docker import` it.
set -euo pipefail

IMAGE=${MESHD_LAB_BASE_IMAGE:-meshd-lab-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit} /^deb / {print $2; exit}' \
  /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-base: $IMAGE present"
  exit 0
fi

if docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
  docker tag debian:bookworm-slim "$IMAGE"
  echo "build-base: $IMAGE tagged from debian:bookworm-slim"
  exit 0
fi

echo "build-base: no image registry reachable; building $IMAGE offline with debootstrap from $MIRROR"
command -v debootstrap >/dev/null || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
root=$(mktemp -d /tmp/meshd-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || {
  tail -20 "$root.log" >&2
  echo "build-base: debootstrap failed (log above)" >&2
  exit 1
}
rm -f "$root.log"
# Keep the image small: package lists and caches are refetched by `apt-get update` in builds.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$IMAGE" >/dev/null
echo "build-base: $IMAGE imported"
