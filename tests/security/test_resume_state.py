"""Resume state files are data, never code: a crafted, random or hand-edited state is refused in one line naming it,
its payload never runs, and a damaged newest state falls back to the previous intact one."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from hcpdiff.errors import ConfigError
from hcpdiff.train.state import (STATE_FORMAT, find_resume_state, prune_checkpoints, read_state_file, rng_state,
                                 save_state, set_rng_state)


class Payload:
    """Unpickling this calls `touch <marker>`: what an attacker's state file would do with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_run(exp_dir: Path, steps: list[int]) -> None:
    """A run folder with a checkpoint and a genuine state per step, as the trainer writes them."""
    (exp_dir / "ckpts").mkdir(parents=True, exist_ok=True)
    for step in steps:
        ckpt = exp_dir / "ckpts" / f"unet-{step}.safetensors"
        ckpt.write_bytes(f"weights of step {step}".encode())
        state = {"step": step, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999),
                                                                           "params": [0]}]},
                 "lr_scheduler": {"last_epoch": step, "base_lrs": [1e-4]},
                 "streams": [{"name": "dataset1", "epoch": 0, "position": step}], "rng": [rng_state()]}
        save_state(exp_dir / "state" / f"step-{step}.pt", state, [ckpt])


def test_state_with_code_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "state" / "step-3.pt"
    path.parent.mkdir()
    torch.save({"format": STATE_FORMAT, "step": 3, "optimizer": Payload(marker)}, path)
    with pytest.raises(ConfigError) as err:
        read_state_file(path)
    assert not marker.exists(), "unpickling the state ran its payload"
    message = str(err.value)
    assert str(path) in message and "posix.system" in message and "\n" not in message


def test_genuine_state_loads_without_unpickling_code(tmp_path):
    """Everything a state holds (RNG states included) is tensors and plain values: torch.load(weights_only=True)."""
    write_run(tmp_path, [2])
    state = torch.load(tmp_path / "state" / "step-2.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)


def test_rng_states_round_trip_exactly():
    saved = rng_state()
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    set_rng_state(saved)
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert first[:3] == again[:3] and torch.equal(first[3], again[3])


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "missing_key", "wrong_type", "not_a_dict"])
def test_damaged_state_is_one_error_naming_the_file(tmp_path, damage):
    write_run(tmp_path, [2])
    path = tmp_path / "state" / "step-2.pt"
    state = torch.load(path, weights_only=True)
    if damage == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    elif damage == "missing_key":
        del state["optimizer"]
        torch.save(state, path)
    elif damage == "wrong_type":
        state["streams"] = [{"name": "dataset1", "epoch": "zero", "position": 2}]
        torch.save(state, path)
    else:
        torch.save([1, 2, 3], path)
    with pytest.raises(ConfigError) as err:
        find_resume_state(str(path))  # named explicitly: refused, no fallback
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_folder_resume_falls_back_past_a_damaged_newest_state(tmp_path, caplog):
    write_run(tmp_path, [2, 4])
    newest = tmp_path / "state" / "step-4.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # a partial write
    with caplog.at_level(logging.WARNING, logger="hcpdiff.train"):
        point = find_resume_state(str(tmp_path))
    assert point.step == 2 and point.skipped == [4] and not point.named_file
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(newest) in warnings[0] and "step 2" in warnings[0]


def test_folder_resume_falls_back_past_a_checkpoint_that_does_not_match(tmp_path, caplog):
    write_run(tmp_path, [2, 4])
    (tmp_path / "ckpts" / "unet-4.safetensors").write_bytes(b"half a file")
    with caplog.at_level(logging.WARNING, logger="hcpdiff.train"):
        point = find_resume_state(str(tmp_path))
    assert point.step == 2
    assert any("unet-4.safetensors" in r.getMessage() for r in caplog.records)


def test_folder_with_no_intact_state_names_the_newest_problem(tmp_path):
    write_run(tmp_path, [2, 4])
    for step in (2, 4):
        (tmp_path / "state" / f"step-{step}.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(ConfigError, match="step-4.pt"):
        find_resume_state(str(tmp_path))


def test_pruning_keeps_what_this_run_just_wrote(tmp_path):
    """A run resumed at step 10 of a 40-step folder, now at step 20 with ckpt_keep=2: its own 15 and 20 stay, and
    the steps above 20 (not this run's writes) are not its to delete."""
    write_run(tmp_path, [5, 10, 15, 20, 35, 40])
    removed = prune_checkpoints(tmp_path, keep=2, up_to=20)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == [
        "unet-15.safetensors", "unet-20.safetensors", "unet-35.safetensors", "unet-40.safetensors"]
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["step-15.pt", "step-20.pt", "step-35.pt",
                                                                      "step-40.pt"]
    assert {p.name for p in removed} == {"unet-5.safetensors", "unet-10.safetensors", "step-5.pt", "step-10.pt"}


# ----------------------------------------------------------------------------------------------- as a user runs it

@pytest.mark.e2e
def test_cli_refuses_a_crafted_state_without_running_it(workdir, demo_args, cli_in_process, error_line):
    """A resume folder whose state file was replaced by one carrying a payload: exit 2, one line, nothing ran."""
    first = cli_in_process([*demo_args, "train.train_steps=2", "exp_dir=exps/run"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    marker = workdir / "payload_ran"
    state = workdir / "exps/run/state/step-2.pt"
    good = torch.load(state, weights_only=True)
    torch.save({**good, "lr_scheduler": Payload(marker)}, state)
    result = cli_in_process([*demo_args, "train.train_steps=4", "train.resume=exps/run"], cwd=workdir)
    assert result.returncode == 2
    assert "step-2.pt" in error_line(result.stderr)
    assert not marker.exists(), "the state's payload ran"
    # Resume still works once the genuine state is back, and bit for bit from the saved RNG tensors.
    torch.save(good, state)
    resumed = cli_in_process([*demo_args, "train.train_steps=3", "train.resume=exps/run"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (workdir / "exps/run/ckpts/unet-3.safetensors").exists()


@pytest.mark.e2e
def test_cli_random_bytes_state_is_one_error_line(workdir, demo_args, cli_in_process, error_line):
    first = cli_in_process([*demo_args, "train.train_steps=1", "exp_dir=exps/run"], cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    (workdir / "exps/run/state/step-1.pt").write_bytes(random.Random(1).randbytes(2048))
    result = cli_in_process([*demo_args, "train.train_steps=2", "train.resume=exps/run"], cwd=workdir)
    assert result.returncode == 2
    assert "exps/run/state/step-1.pt" in error_line(result.stderr)
    assert not (workdir / "exps/run/.hcpdiff.lock").exists()  # the refused resume let go of the folder
