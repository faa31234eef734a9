#!/usr/bin/env bash
# Build the bertstream image on a host that reaches PyPI only through its own
# network settings (a proxy's CA bundle, a local torch wheel):
#
#   deploy/build-image.sh [TAG] [docker build options...]     # TAG: bertstream:latest
#
# PYTHON_IMAGE     base image (default python:3.11-slim)
# PIP_CERT         CA bundle for pip, passed as a build secret (never in a layer)
# PIP_FIND_LINKS   a directory holding a torch wheel (the CPU build): served on
#                  127.0.0.1 for the build, which then runs with --network host
# With none of them set this is `docker build -t TAG .`.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-bertstream:latest}
shift || true

args=(--tag "$tag" --build-arg "PYTHON_IMAGE=${PYTHON_IMAGE:-python:3.11-slim}")
if [ -n "${PIP_CERT:-}" ]; then
  args+=(--secret "id=pip_cert,src=$PIP_CERT")
fi
server=
cleanup() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi; }
trap cleanup EXIT
if [ -n "${PIP_FIND_LINKS:-}" ] && [ -d "$PIP_FIND_LINKS" ]; then
  # A fixed port: the URL is a build argument, and a new value would miss the layer cache.
  port=${WHEELS_PORT:-38517}
  if ! python3 -c "import socket; socket.socket().bind(('127.0.0.1', $port))" 2>/dev/null; then
    echo "port $port is taken: set WHEELS_PORT to a free one" >&2
    exit 1
  fi
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$PIP_FIND_LINKS" >/dev/null 2>&1 &
  server=$!
  for _ in $(seq 50); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/')" \
      2>/dev/null && break
    sleep 0.1
  done
  # The local wheel (2.13.0+cpu) outranks PyPI's plain 2.13.0, so torch's own
  # dependencies come from PyPI and torch from the directory.
  args+=(--network host --build-arg "TORCH_INDEX=https://pypi.org/simple"
         --build-arg "TORCH_FIND_LINKS=http://127.0.0.1:$port/")
fi

# The Dockerfile needs BuildKit: the buildx plugin where it is installed, else
# a client with BuildKit built in (Debian's docker.io 20.10 is /usr/bin/docker;
# a newer client without buildx refuses DOCKER_BUILDKIT=1).
if docker buildx version >/dev/null 2>&1; then
  docker buildx build --load "${args[@]}" "$@" .
else
  classic=docker
  if ! DOCKER_BUILDKIT=1 docker build --help >/dev/null 2>&1; then
    classic=/usr/bin/docker
  fi
  DOCKER_BUILDKIT=1 "$classic" build "${args[@]}" "$@" .
fi
