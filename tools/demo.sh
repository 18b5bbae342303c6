#!/usr/bin/env bash
# Install, build the tiny random model and a small dataset, and train a LoRA on it end to end (CPU, ~1 minute).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python -m hcpdiff.tools.make_tiny_model tiny_model
python -m hcpdiff.tools.make_demo_data demo_data --num 8
accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    -m hcpdiff.train_ac_single --cfg cfgs/train/examples/demo_tiny.yaml "$@"
echo "outputs: $(ls -d exps/*/ | tail -n 1)"
