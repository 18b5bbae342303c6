"""The benchmark scripts still run against the current code (their figures are not checked: speed is not tested)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("script, args", [
    ("bench_train_step.py", ["--steps", "1", "--blocks", "1", "--warmup", "1", "--size", "64", "--workers", "1"]),
    ("bench_train_step.py", ["--family", "flux", "--steps", "1", "--blocks", "1", "--warmup", "1", "--size", "64",
                             "--workers", "0"]),
    ("bench_data.py", ["--images", "4", "--epochs", "1", "--workers", "0"]),
    ("bench_data.py", ["--transfer", "--transfer_batches", "2"]),
    ("bench_memory.py", ["--double", "1", "--single", "1", "--size", "64", "--max_sequence_length", "16",
                         "--mixed_precision", "no", "--settings", "bf16", "--steps", "1", "--blocks", "1"]),
    ("bench_cache.py", ["--steps", "1", "--blocks", "1", "--warmup", "1", "--size", "64", "--images", "2", "--batch", "1"]),
])
def test_benchmark_script_prints_its_ratio(script, args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ratio" in done.stdout or "speed-up" in done.stdout or "trainer / bare" in done.stdout
