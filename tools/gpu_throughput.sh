#!/usr/bin/env bash
# The GPU throughput check of issue 16: hcpdiff's trainer against a bare diffusers + peft loop on an SD1.5-shaped U-Net
# (random weights), 512 px, bf16, batch 1 and 8; per run the ms/step of both loops and their ratio, each loop's MFU,
# peak GPU memory and the trainer's host syncs per block (see README, "Throughput").
#
#   bash tools/gpu_throughput.sh [eager|compile|all]     (default all; each half takes a few minutes on an H100)
#
# Run from anywhere on a CUDA machine where torch, diffusers, transformers, peft, accelerate, omegaconf and
# hydra-core import (shared/FACTS.md: how the lent GPU got the missing wheels). Figures also go to $OUT (or
# bench_out/), one file per run.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
out=${OUT:-bench_out}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
common=(--sd15-unet --size 512 --mixed_precision bf16 --steps 10 --blocks 5 --warmup 3 --workers 2)
for mode in eager compile; do
  [[ $which == all || $which == "$mode" ]] || continue
  flags=()
  [[ $mode == compile ]] && flags=(--compile)
  for batch in 1 8; do
    echo "== sd15-unet 512 px bf16 batch $batch $mode"
    python tools/bench_train_step.py "${common[@]}" --batch "$batch" "${flags[@]}" 2>&1 \
      | grep -v -i "warn" | tee "$out/sd15_b${batch}_${mode}.txt"
  done
done
