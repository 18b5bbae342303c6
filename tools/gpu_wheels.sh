#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (it has torch, transformers, peft, accelerate, safetensors; not diffusers,
# omegaconf, hydra-core), downloaded here into .gpu_wheels/ (git-ignored; ~8 MB) for the device tool to carry:
#
#   bash tools/gpu_wheels.sh                       # here, once
#   run(carry=[".gpu_wheels"], command="bash tools/gpu_throughput.sh eager")   # there: installs them, then runs
#
# Versions are the ones this project tests with; the machine's own transformers is kept (shared/FACTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
python_version=${GPU_PYTHON_VERSION:-3.12}
mkdir -p .gpu_wheels
pip download -q --no-deps --only-binary=:all: --python-version "$python_version" --platform manylinux_2_28_x86_64 \
  -d .gpu_wheels diffusers==0.42.1 omegaconf==2.3.1 hydra-core==1.3.8 peft==0.21.2 accelerate==1.16.0 \
  importlib_metadata
pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .gpu_wheels  # an sdist only: built here, pure Python
ls -1 .gpu_wheels
