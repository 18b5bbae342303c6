#!/usr/bin/env bash
# Install hcpdiff and its dependencies (`bash tools/install.sh test` adds pytest and deepspeed for the tests).
# torch goes first, pinned, so pip takes the local CPU wheel instead of pulling several GB of CUDA packages
# for an unpinned request.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --disable-pip-version-check -q "torch==${HCP_TORCH_VERSION:-2.13.0}"
python -m pip install --disable-pip-version-check -q -e ".${1:+[$1]}"
