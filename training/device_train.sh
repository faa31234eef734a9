#!/usr/bin/env bash
# The sentiment model's GPU training run: one call on a lent device.
#
#   make device-train-pack                         # here: .devpack-train/ (~32 MiB)
#   run (device tool): bash training/device_train.sh   carry: [".devpack-train"], timeout_s 570
#   or, several full runs side by side (one process each, then their soup):
#     BUDGET_S=400 bash training/device_train.sh --modes full --parallel 8 --reserve-s 70
#
# Arguments after the script go to `python -m training.full_train` (--modes,
# --parallel, --reserve-s, --ranks, --max-runs, --head-seed, --select, --split-mib). One full run of
# the pack (3 epochs, 4,510 steps) takes about 230 s on an H200 by itself, so
# a sequential call of 450 s holds one of them (the next would not fit and is
# skipped); --parallel is what gets a seed soup into one call (four runs side
# by side took as long as one; eight is not measured yet).
#
# Trains every layer of the encoder (full fine-tuning and all-layer LoRA,
# several seeds, a weight soup), picks on dev, calibrates on dev, evaluates
# the pick once on test, the behavioural suite and vader's neutral items, and
# writes adapter/, report.json, train.log (the machine and versions first) and
# reliability.png under $OUT: seven files with a split adapter, of the eight a
# call brings back. With the pack's baseline/ (the bundled adapter) it also applies the
# adoption rule (training/verdict.py) to the pick and, if the pick fails it, to
# the interpolation towards it: report.json "rule", and the verdicts in
# train.log. An adapter file above 15 MiB (a rank-128 pick: ~23 MB) comes back
# in parts (a call returns at most 16 MB per file): `bertstream model join
# OUT/adapter` here. Needs only torch and transformers there; BUDGET_S bounds the wall time.
# `make device-train-rehearsal` runs the same steps on the CPU at toy sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${PACK:-.devpack-train}
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
BUDGET_S=${BUDGET_S:-450}
mkdir -p "$OUT"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PYTHON" -c 'import sys, torch, transformers; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(), "transformers", transformers.__version__)'
} 2>&1 | tee "$OUT/train.log"
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
"$PYTHON" -m training.full_train --pack "$PACK" --out "$OUT" --budget-s "$BUDGET_S" "$@" 2>&1 \
  | tee -a "$OUT/train.log"
ls -la "$OUT" "$OUT/adapter"
