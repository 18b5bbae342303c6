#!/usr/bin/env bash
# Install and run the whole test suite (unit + end-to-end CLI tests on the tiny model), CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh test
# pytest exits 5 when it collects no test; set -e makes that a failure, never a silent pass.
python -m pytest -q -p no:cacheprovider "$@"
