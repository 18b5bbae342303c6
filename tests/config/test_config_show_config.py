"""`python -m hcpdiff.tools.show_config` as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def show_config(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HCP_RUN_TIME": "2024-01-02-03-04-05"}
    env.pop("HCP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "hcpdiff.tools.show_config", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def cfg_dir(write, workdir):
    write("cfgs/train/base.yaml", """
        unet_lr: 1e-4
        exp_dir: exps/${hcp.time:}
        train:
          lr: ${unet_lr}
          resolution: ${hcp.eval:"512*768"}
          note: "a: b # not a comment"
    """)
    write("cfgs/train/examples/run.yaml", "_base_: cfgs/train/base.yaml\ntrain: {steps: 10}\n")
    return workdir


def test_prints_resolved_yaml(cfg_dir):
    result = show_config("--cfg", "cfgs/train/examples/run.yaml", "unet_lr=2e-4", cwd=cfg_dir)
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["exp_dir"] == "exps/2024-01-02-03-04-05"
    assert printed["train"] == {"lr": 0.0002, "resolution": 393216, "note": "a: b # not a comment", "steps": 10}


def test_origin_comments(cfg_dir):
    result = show_config("--cfg", "cfgs/train/examples/run.yaml", "--origin", "unet_lr=2e-4", cwd=cfg_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "unet_lr: 0.0002  # command line" in lines
    assert "  lr: 0.0002  # cfgs/train/base.yaml" in lines
    assert "  steps: 10  # cfgs/train/examples/run.yaml" in lines
    # the annotated text is still the same YAML
    assert yaml.safe_load(result.stdout)["train"]["note"] == "a: b # not a comment"


def test_unknown_override_key_is_one_error_line(cfg_dir):
    result = show_config("--cfg", "cfgs/train/examples/run.yaml", "train.lrr=1", cwd=cfg_dir)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert "did you mean 'train.lr'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_traceback(cfg_dir):
    result = show_config("--cfg", "cfgs/train/examples/run.yaml", "train.lrr=1", "--debug", cwd=cfg_dir)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and result.stderr.splitlines()[-1].startswith("error: ")
