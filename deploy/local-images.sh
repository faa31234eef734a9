#!/usr/bin/env bash
# Stand-ins for python:3.11-slim, redis:7-alpine and postgres:16-alpine, built
# from Debian bookworm packages, for machines that cannot pull from a registry.
# Each image is built once: an existing tag is kept (LOCAL_IMAGES_REBUILD=1 rebuilds).
#
#   deploy/local-images.sh            # prints the three image names it made or found
#
# Needs root (debootstrap) and a running dockerd; apt inside the builds reaches
# Debian over the default bridge network.
set -euo pipefail
cd "$(dirname "$0")/local-images"

PREFIX=${LOCAL_IMAGE_PREFIX:-bertstream-local}
BASE=$PREFIX/debian:bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

have() { [ -z "${LOCAL_IMAGES_REBUILD:-}" ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$BASE"; then
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  echo "debootstrap bookworm (minbase) into $root" >&2
  debootstrap --variant=minbase bookworm "$root" "$MIRROR" >&2
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'CMD ["/bin/bash"]' - "$BASE" >&2
fi

for name in python redis postgres; do
  image=$PREFIX/$name:bookworm
  if ! have "$image"; then
    echo "building $image" >&2
    DOCKER_BUILDKIT=0 docker build -q --build-arg BASE="$BASE" -t "$image" -f "$name.Dockerfile" . >&2
  fi
  echo "$image"
done
