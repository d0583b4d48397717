#!/usr/bin/env bash
# One GPU session's checks (issue 7, and the CUDA paths of issues 3-4), in about 6-7 minutes; from the repo root:
#   OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# 1. UNet 128^3 x2: fp32 / amp / mixed (norms fed FP16, fused AdamW queued before the skip decision) /
#    mixed:normfp32 (the plugin's earlier FP32 norms), then the same compiled (`model.compile`).
# 2. DynUNet 128^3 x2, the same modes.
# 3. The full table, fp32 / amp / bf16 / half / mixed at 64, 96, 128^3, and DynUNet compiled, while time is left.
# 4. A real `python -m medseg.train +precision=mixed trainer=gpu model.compile=true` run with the precision monitor
#    on (CUDA events, max_memory_allocated), CSV logger.
# Logs land in $OUT (at most 8 files). Missing Python packages come from wheels in .whl/ (see
# /work/.library/device/README.md); W&B is replaced by a stub with `finish()` when absent.
# A dry run on CPU at toy size: DRY_RUN=1 OUT=/tmp/gpu_dry PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail
if [[ ${DRY_RUN:-0} == 1 ]]; then
  DEV=cpu PATCHES="16" BIG=16 STEPS=2 WARMUP=1 TRAIN="trainer=cpu debug=fast data.num_workers=0"
  LIMIT=900
else
  DEV=cuda PATCHES="64 96 128" BIG=128 STEPS=20 WARMUP=5 TRAIN="trainer=gpu trainer.max_epochs=6 data.num_workers=8"
  LIMIT=400
fi
BENCH="--device $DEV --batch 2 --steps $STEPS --warmup $WARMUP --patch $BIG"
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
"hydra", hydra.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} 2>&1 | tee "$OUT/env.txt"

step() { # seconds it may take, log name, then the command; skipped when the script would pass $LIMIT s
  local need=$1 log=$2
  shift 2
  if ((SECONDS + need < LIMIT)); then
    echo "== $* ($SECONDS s)" | tee -a "$OUT/$log"
    timeout "$need" "$@" 2>&1 | tee -a "$OUT/$log"
  else
    echo "== skipped (time, $SECONDS s): $*" | tee -a "$OUT/$log"
  fi
}
step 60 unet.log $PY benchmarks/precision.py $BENCH --modes fp32 amp mixed mixed:normfp32
step 100 unet.log $PY benchmarks/precision.py $BENCH --modes fp32:compile amp:compile mixed:compile
step 60 dynunet.log $PY benchmarks/precision.py $BENCH --model dynunet --modes fp32 amp mixed mixed:normfp32
step 90 train.log $PY -m medseg.train +precision=mixed $TRAIN model.compile=true logger=csv test=false seed=42 \
  hydra.run.dir=/tmp/train_mixed_compile
cp /tmp/train_mixed_compile/csv/metrics.csv "$OUT/train_metrics.csv" 2>/dev/null
step 120 table.log $PY benchmarks/precision.py ${BENCH% --patch*} --patch $PATCHES --modes fp32 amp bf16 half mixed
step 100 dynunet.log $PY benchmarks/precision.py $BENCH --model dynunet --modes amp:compile mixed:compile
echo "== done in $SECONDS s" | tee -a "$OUT/env.txt"
