#!/usr/bin/env bash
# One GPU session's checks (issues 3 and 7), in about 6 minutes; run from the repository root:
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# 1. benchmarks/precision.py on CUDA: fp32 / amp / bf16 / half / mixed (+ mixed channels-last) at 64, 96, 128^3.
# 2. benchmarks/train_compare.py: real `python -m medseg.train` runs, +precision=fp32 / amp / mixed on the
#    synthetic data, same seed and steps: validation Dice, step time and peak memory side by side.
# 3. While time is left, at 128^3: norms uncast / fused AdamW / channels-last variants, cuDNN autotuning,
#    DynUNet, torch.compile.
# Logs and JSON land in $OUT (at most 8 files). Missing Python packages come from wheels in .whl/ (see
# /work/.library/device/README.md); W&B is replaced by a stub with `finish()` when absent (logger=csv here).
# A dry run on CPU, seconds long: DRY_RUN=1 OUT=/tmp/gpu_dry PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
if [[ ${DRY_RUN:-0} == 1 ]]; then
  DEV=cpu PATCHES="16" BIG=16 STEPS=2 WARMUP=1 TRAIN="trainer=cpu debug=fast data.num_workers=0"
else
  DEV=cuda PATCHES="64 96 128" BIG=128 STEPS=20 WARMUP=5 TRAIN="trainer=gpu trainer.max_epochs=30 data.num_workers=8"
fi
# The same callbacks for every mode; the new per-layer precision monitor and W&B-only callbacks are left out so
# the step times compare precisions, not telemetry (++key=null also works where the key does not exist).
TRAIN="$TRAIN ++callbacks.precision_monitor=null ++callbacks.val_images=null ++callbacks.wandb_summary=null"
BENCH="--device $DEV --batch 2 --steps $STEPS --warmup $WARMUP"
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if ! $PY -c "import monai, hydra, omegaconf, nibabel" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if ! $PY -c "import wandb" 2>/dev/null; then
  mkdir -p /tmp/stub/wandb
  printf 'def finish(*args, **kwargs):\n    pass\n' >/tmp/stub/wandb/__init__.py
  export PYTHONPATH=$PYTHONPATH:/tmp/stub
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  $PY -c 'import torch, lightning, monai, hydra; print("torch", torch.__version__, "cuda", torch.version.cuda,
"cudnn", torch.backends.cudnn.version(), "lightning", lightning.__version__, "monai", monai.__version__,
"hydra", hydra.__version__, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/env.txt"

echo "== precision table ($SECONDS s)"
timeout 210 $PY benchmarks/precision.py $BENCH --patch $PATCHES --modes fp32 amp bf16 half mixed mixed:cl --json "$OUT/precision.json" 2>&1 | tee "$OUT/precision.log"

echo "== medseg.train fp32 / amp / mixed ($SECONDS s)"
timeout 200 $PY benchmarks/train_compare.py --modes fp32 amp mixed --out /tmp/train_runs --timeout 65 \
  --json "$OUT/train.json" -- $TRAIN test=false seed=42 2>&1 | tee "$OUT/train.log"
for m in fp32 amp mixed; do echo "== $m"; tail -n 25 "/tmp/train_runs/$m.log"; done >"$OUT/train_runs.log" 2>&1

# Extras, each only if the whole script stays under ~6 minutes.
extra() { # seconds needed, then the command
  local need=$1
  shift
  if ((SECONDS + need < 360)); then
    echo "== $* ($SECONDS s)"
    timeout "$need" "$@"
  else
    echo "== skipped (time): $*"
  fi
}
{
  extra 50 $PY benchmarks/precision.py $BENCH --patch $BIG --modes fp32 amp mixed mixed:normlow mixed:fused amp:cl
  extra 45 $PY benchmarks/precision.py $BENCH --patch $BIG --modes fp32 amp mixed mixed:cl --cudnn-benchmark
  extra 45 $PY benchmarks/precision.py $BENCH --patch $BIG --modes fp32 amp mixed --model dynunet
  extra 90 $PY benchmarks/precision.py $BENCH --patch $BIG --modes fp32 mixed mixed:compile
} 2>&1 | tee "$OUT/extra.log"
echo "== done in $SECONDS s"
