#!/bin/bash
# The prepared script for a session that is lent a GPU (about 15 minutes of device time in all):
# the GPU path end to end, the GPU figures of docs/benchmarks.md, and the test suite with the GPU
# present. Run from the repository root, with PYTHONPATH=. (no install needed there):
#
#   BUDGET=480 OUT=/some/dir FMNIST=path/to/idx-gz-folder WEIGHTS=trained.pt bash benchmarks/gpu_check.sh
#
# FMNIST: the four Fashion-MNIST idx .gz files (31 MB; they must travel with the working tree).
# WEIGHTS: a resnet18 (num_classes=10) trained on Fashion-MNIST at 32x32 by `kshare finetune`
# (a float16 copy of its state halves what travels). Each step has a time cap and never runs past
# BUDGET seconds in all; its log goes to $OUT/NAME.log and its last lines to the terminal.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
START=$(date +%s); BUDGET=${BUDGET:-480}; OUT=${OUT:-/tmp/kshare-gpu}; mkdir -p "$OUT"
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
step() {  # step NAME CAP CMD...
  local name=$1 cap=$2; shift 2
  local l; l=$(left); (( l < cap )) && cap=$l
  if (( cap < 10 )); then echo "=== $name skipped: out of time"; return; fi
  echo "=== $name (cap ${cap}s)"
  local t0; t0=$(date +%s)
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n "${TAIL:-20}" "$OUT/$name.log"
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 ))s"
}
nvidia-smi -L
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
if [ -n "${FMNIST:-}" ]; then mkdir -p /usr/share/datasets/fashion-mnist && cp "$FMNIST"/*.gz /usr/share/datasets/fashion-mnist/; fi
K="python3 -m kshare.cli"
if [ -n "${WEIGHTS:-}" ]; then
  W="resnet18 -k num_classes=10 --weights $WEIGHTS --groups stage --data fashion-mnist --image-size 32"
  step must_show 60 bash -c "$K apply $W --fit data --fit-images 512 --device cuda --out /tmp/fit.pt && \
    $K eval /tmp/fit.pt --data fashion-mnist --image-size 32 --device cuda"
  step retrofit 120 $K retrofit $W --fit-images 512 --reconstruct 400 --reconstruct-images 2048 --epochs 1 \
    --limit-train 18048 --lr 3e-4 --warmup 0.25 --feature-weight 10 --device cuda --out /tmp/r.pt
fi
step fit_speed 90 python3 benchmarks/fit_speed.py --device cuda
step finetune_speed 180 python3 benchmarks/finetune_speed.py --device cuda --rounds 2
OMP_NUM_THREADS=1 TAIL=30 step tests 200 python3 -m pytest -q -n 12 -p no:cacheprovider -rf tests
echo "=== done in $(( $(date +%s) - START ))s"
