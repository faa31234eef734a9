#!/usr/bin/env bash
# One device run: the GPU tests and the benchmark on two model shapes, in one command.
#
#   make device-pack                                  # here, first: fills .devpack/
#   device tool: command "bash bench/device.sh", carry [".devpack"], timeout_s 420
#   CPU rehearsal (.ci/run): bash bench/device.sh --device cpu --rehearse --out DIR
#
# Steps (each timed and logged to steps.tsv; a failed step does not stop the next):
#   1. install the pack's wheels into a temporary target (nothing is fetched);
#   2. start the pack's redis-server on 127.0.0.1:$PORT;
#   3. write random-weight models with the real shapes (e5-small 12x384 and
#      BERT-base 12x768, the real e5 tokenizer; --rehearse: a 2x64 model);
#   4. pytest -m gpu (fp16 vs fp32, a real CUDA OOM halved, --gpus pinning);
#   5. bertstream bench per shape: bare fp16 model, end to end with
#      --procs-per-gpu 1 and 2, the naive peer, the null pipeline, padding;
#   6. the report: report.txt / report.json beside the bench JSONs,
#      nvidia-smi sampled every second into nvidia-smi.csv.
# Everything lands in --out (default $OUT, which the device tool brings back).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DEVICE=cuda
REHEARSE=0
OUTDIR=${OUT:-$ROOT/bench/results/device}
PACK=$ROOT/.devpack
PYTHON=${PYTHON:-python3}
PORT=${PORT:-6399}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --rehearse) REHEARSE=1; shift ;;
    --out) OUTDIR=$2; shift 2 ;;
    --pack) PACK=$2; shift 2 ;;
    *) echo "device.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cuda | cpu) ;; *) echo "device.sh: --device cuda|cpu" >&2; exit 2 ;; esac
[ -d "$PACK/wheels" ] || { echo "device.sh: no pack at $PACK (run make device-pack)" >&2; exit 2; }
# Absolute, since some steps run from the work dir (a venv's python must keep its path).
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
PACK=$(cd "$PACK" && pwd)
rm -f "$OUTDIR"/steps.tsv "$OUTDIR"/bench-*.json "$OUTDIR"/report.* "$OUTDIR"/nvidia-smi.csv
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bertstream-device.XXXXXX")
SMI_PID=

cleanup() {
  [ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
  if [ -f "$WORK/redis.pid" ]; then
    local pid
    pid=$(cat "$WORK/redis.pid")
    kill "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "[device.sh $(date -u +%T)] $*" | tee -a "$OUTDIR/run.log"; }
# step NAME TIMEOUT_S CMD...: run, log its output to run.log, record exit code and seconds.
step() {
  local name=$1 limit=$2 start rc
  shift 2
  log "step $name (at most ${limit} s): $*"
  start=$(date +%s.%N)
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >>"$OUTDIR/run.log" 2>&1
  rc=$?
  printf '%s\t%s\t%.1f\n' "$name" "$rc" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {print b - a}')" >>"$OUTDIR/steps.tsv"
  log "step $name: exit $rc"
  return $rc
}

: >"$OUTDIR/run.log"
log "device=$DEVICE rehearse=$REHEARSE python=$($PYTHON -c 'import sys; print(sys.version.split()[0])') out=$OUTDIR"

# 1. Wheels into a temporary target; the project apart so its bin/ is not shadowed.
SITE=$WORK/site
PROJECT=$WORK/project
PIP="$PYTHON -m pip install -q --no-index --no-compile --disable-pip-version-check"
step install 120 bash -c "$PIP --find-links '$PACK/wheels' --target '$SITE' \
    -c '$PACK/wheels/constraints.txt' -r '$PACK/wheels/requirements.txt' \
  && $PIP --no-deps --target '$PROJECT' '$PACK'/project/*.whl"
export PYTHONPATH=$PROJECT:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$PROJECT/bin:$PATH
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# A GPU host's tokenizer uses its cores, as a deployed worker's does; the rehearsal keeps one.
if [ "$DEVICE" = cuda ]; then export TOKENIZERS_PARALLELISM=true; else export TOKENIZERS_PARALLELISM=false; fi
step imports 60 bash -c "cd '$WORK' && $PYTHON -c 'import celery, kombu, redis, sqlalchemy, celery_batches, torch, transformers, worker
print(\"imports:\", worker.__file__, \"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \"transformers\", transformers.__version__)'"

# 2. redis-server from the pack.
REDIS_LIB=$PACK/redis/lib
step redis 30 bash -c "LD_LIBRARY_PATH='$REDIS_LIB' '$PACK/redis/bin/redis-server' --port $PORT \
    --bind 127.0.0.1 --save '' --appendonly no --daemonize yes --dir '$WORK' \
    --logfile '$WORK/redis.log' --pidfile '$WORK/redis.pid' \
  && for _ in \$(seq 100); do LD_LIBRARY_PATH='$REDIS_LIB' '$PACK/redis/bin/redis-cli' -p $PORT ping \
       2>/dev/null | grep -q PONG && exit 0; sleep 0.1; done; exit 1"
export BERTSTREAM_BROKER_URL=redis://127.0.0.1:$PORT/0
export BERTSTREAM_TEST_REDIS_URL=redis://127.0.0.1:$PORT/9
export BERTSTREAM_CACHE_DIR=$WORK/cache

if command -v nvidia-smi >/dev/null; then
  nvidia-smi -L >>"$OUTDIR/run.log" 2>&1
  nvidia-smi --query-gpu=timestamp,name,utilization.gpu,memory.used,memory.total,power.draw,clocks.current.sm \
    --format=csv -l 1 >"$OUTDIR/nvidia-smi.csv" 2>>"$OUTDIR/run.log" &
  SMI_PID=$!
else
  log "nvidia-smi: not on this machine"
fi

# 3. Models: random weights, real shapes, real tokenizer.
if [ "$REHEARSE" = 1 ]; then SHAPES=tiny; else SHAPES=e5-small,bert-base; fi
step models 120 $PYTHON -m bench.shapes models --tokenizer "$PACK/e5-tokenizer" \
  --out "$WORK/models" --shapes "$SHAPES"

# 3b. What a new batch shape costs, first pass against second (collate, launch, wait).
if [ "$REHEARSE" = 1 ]; then SC_MODEL=tiny SC_ARGS="--shapes 4 --max-rows 8"; else
  SC_MODEL=e5-small SC_ARGS="--shapes 40 --max-rows 256"; fi
# shellcheck disable=SC2086
step shape-cost 90 $PYTHON -m bench.shape_cost "$WORK/models/$SC_MODEL" \
  --device "$([ "$DEVICE" = cuda ] && echo cuda:0 || echo cpu)" $SC_ARGS --out "$OUTDIR/shape-cost.json"

# 4. The GPU tests (skipped, not failed, where there is no CUDA device).
step gpu-tests 120 bash -c "set -o pipefail; $PYTHON -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_gpu.py 2>&1 | tee '$OUTDIR/pytest.log'"

# 5. The benchmark, one run per shape, from the work dir so the installed wheel is what runs.
# Per shape: texts, rounds, skipped stages, and the step's time limit.
if [ "$DEVICE" = cuda ]; then
  COMMON=(--device cuda:0 --texts 8000 --threads 4 --procs-per-gpu 1,2)
  declare -A ARGS=([e5-small]="--rounds 3 --skip openloop,http" [bert-base]="--rounds 2 --skip openloop,naive,http")
  declare -A LIMITS=([e5-small]=200 [bert-base]=140)
else
  COMMON=(--device cpu --quick --texts 48 --threads 2 --procs-per-gpu 1,2)
  declare -A ARGS=([tiny]="--rounds 1 --skip openloop,http")
  declare -A LIMITS=([tiny]=240)
fi
for shape in ${SHAPES//,/ }; do
  step "bench-$shape" "${LIMITS[$shape]}" bash -c "cd '$WORK' && bertstream bench \
    --model '$WORK/models/$shape' ${COMMON[*]} ${ARGS[$shape]} --out '$OUTDIR/bench-$shape.json'"
done

# 6. The report.
[ -n "$SMI_PID" ] && kill "$SMI_PID" 2>/dev/null
SMI_PID=
if (cd "$WORK" && $PYTHON -m bench.device_report "$OUTDIR") | tee -a "$OUTDIR/run.log"; then
  # Both are inside report.json now; the device tool brings back 8 files at most.
  cp "$OUTDIR/steps.tsv" "$WORK/steps.tsv"
  rm -f "$OUTDIR/shape-cost.json" "$OUTDIR/steps.tsv"
  STEPS=$WORK/steps.tsv
else
  STEPS=$OUTDIR/steps.tsv
fi
# Exit non-zero when any step failed, so a rehearsal in CI fails loudly.
! awk -F'\t' '$2 != 0 {bad = 1} END {exit !bad}' "$STEPS"
