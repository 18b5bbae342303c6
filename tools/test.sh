#!/usr/bin/env bash
# Install and run the whole test suite (unit + end-to-end CLI tests on the tiny model), CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh test
# pytest exits 5 when it collects no test; set -e makes that a failure, never a silent pass.
# One math thread per process: the workers (and the CLI runs they start) share the cores, and OpenMP threads spinning
# on a busy core made two concurrent tiny trainings 12x slower (276 s vs 23 s wall for 2 x 20 steps on 2 cores).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
# -n: one pytest worker per core (HCP_TEST_WORKERS=0 runs in one process); worksteal keeps both busy to the end
# (loadscope left one worker alone with the last heavy modules for minutes). --durations: the slowest tests, at the
# end of every run, so what grows the suite's time shows in CI's log.
python -m pytest -q -p no:cacheprovider -n "${HCP_TEST_WORKERS:-auto}" --dist worksteal --durations=25 "$@"
