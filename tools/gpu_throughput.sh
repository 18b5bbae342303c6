#!/usr/bin/env bash
# The GPU throughput check of issue 16: hcpdiff's trainer against a bare diffusers + peft loop on an SD1.5-shaped U-Net
# (random weights), 512 px, bf16; per run the ms/step of both loops and their ratio, each loop's MFU, peak GPU memory
# and the trainer's host syncs per block (see README, "Throughput").
#
#   bash tools/gpu_throughput.sh [eager|compile|flux|all]     (default all = eager + compile)
#
#   eager:   batch 1 with the default 2 loader workers and with workers 0 (the host-bound case), batch 8
#   compile: batch 8 (against eager: the issue's >= 1.3x) and batch 32 (its >= 35% MFU), both denoisers compiled
#   flux:    FLUX.1's full width (3072) at 1 double + 1 single block, 512 px, batch 1, each loop in its own process
#
# Run from anywhere on a CUDA machine where torch, diffusers, transformers, peft, accelerate, omegaconf and
# hydra-core import, or where .gpu_wheels/ holds the missing ones (tools/gpu_wheels.sh). Figures also go to $OUT (or
# bench_out/), one file per run.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
if ! python -c "import diffusers, omegaconf, hydra" 2>/dev/null; then  # the lent machine: tools/gpu_wheels.sh's
  [[ -d .gpu_wheels ]] || { echo "diffusers / omegaconf / hydra-core missing: run tools/gpu_wheels.sh and carry .gpu_wheels" >&2; exit 2; }
  pip install -q --no-index --no-deps --target /tmp/hcp_site .gpu_wheels/*.whl
  export PYTHONPATH="/tmp/hcp_site:$PYTHONPATH"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--size 512 --mixed_precision bf16 --steps 10 --blocks 5 --warmup 3)
run() {  # run NAME ARGS...: one benchmark, its output also in $out/NAME.txt; a failed one does not stop the rest
  local name=$1
  shift
  echo "== $name: $*"
  python tools/bench_train_step.py "${common[@]}" "$@" > "$out/$name.txt" 2>&1 || echo "== $name failed (status $?)"
  grep -v -i "warn" "$out/$name.txt" | tail -n 40 || true
}
if [[ $which == all || $which == eager ]]; then
  run sd15_b1_eager --sd15-unet --batch 1 --workers 2
  run sd15_b1_eager_workers0 --sd15-unet --batch 1 --workers 0
  run sd15_b8_eager --sd15-unet --batch 8 --workers 2
fi
if [[ $which == all || $which == compile ]]; then
  run sd15_b8_compile --sd15-unet --batch 8 --workers 2 --compile
  run sd15_b32_compile --sd15-unet --batch 32 --workers 2 --compile --blocks 3
fi
if [[ $which == flux ]]; then
  run flux_full_width_b1 --family flux --flux-full-width --batch 1 --steps 5 --blocks 3 --warmup 2
fi
