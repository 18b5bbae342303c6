"""Shared fixtures: one tiny random SD model per test session, datasets made per test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight SD1.x pipeline in diffusers format, built offline once per session."""
    from hcpdiff.tools.make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny_model", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A random-weight SDXL pipeline (two text encoders, text_time conditioning), built offline once per session."""
    from hcpdiff.tools.tiny_sdxl import make_tiny_sdxl

    return make_tiny_sdxl(tmp_path_factory.mktemp("tiny_xl") / "tiny_sdxl", seed=0)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch) -> Path:
    """A working directory where `cfgs/` resolves as in the repository (the guide runs from the repo root)."""
    (tmp_path / "cfgs").symlink_to(REPO_ROOT / "cfgs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python -m ...` (or a console command when args[0] is not '-m') as a user would; capture output."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HCP_DEBUG", None)
    command = [sys.executable, *args] if args[0] == "-m" else args
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    """The `run_cli` helper, as a fixture so test modules need no imports from conftest."""
    return run_cli
