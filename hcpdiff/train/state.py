"""Resumable training state: `exps/<ts>/state/step-<N>.pt` beside the LoRA checkpoints of that step.

The state file holds the step, optimizer, lr schedule, data positions and every process's RNG states, plus the
SHA-256 of each checkpoint file of that step, so a resumed run finds a corrupt or partial checkpoint and names it
instead of loading it.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcpdiff.errors import ConfigError

STATE_FORMAT = "hcpdiff.train_state"
STATE_NAME = re.compile(r"^step-(\d+)\.pt$")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: Path, state: dict[str, Any], checkpoint_files: list[Path]) -> None:
    """Write the state file atomically, recording the checksum of each checkpoint file it goes with."""
    state = {**state, "format": STATE_FORMAT, "checkpoints": {p.name: file_sha256(p) for p in checkpoint_files}}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp_path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    finally:
        if temp_path.exists():
            temp_path.unlink()


def state_steps(exp_dir: Path) -> list[int]:
    """Steps with a state file in an experiment folder, ascending."""
    folder = exp_dir / "state"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := STATE_NAME.match(p.name)))


def load_checked_state(exp_dir: Path, step: int) -> dict[str, Any]:
    """Load `state/step-<step>.pt` and verify its checkpoint files; a damaged one raises naming the file."""
    path = exp_dir / "state" / f"step-{step}.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise ConfigError(f"train.resume: state file '{path}' is corrupt or partial ({type(err).__name__})") from err
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ConfigError(f"train.resume: '{path}' is not an hcpdiff training state")
    for name, digest in state["checkpoints"].items():
        ckpt = exp_dir / "ckpts" / name
        if not ckpt.is_file():
            raise ConfigError(f"train.resume: checkpoint '{ckpt}' of step {step} is missing")
        if file_sha256(ckpt) != digest:
            raise ConfigError(f"train.resume: checkpoint '{ckpt}' does not match its state (corrupt or partial file)")
    return state


def find_resume_state(resume: str) -> tuple[Path, dict[str, Any]]:
    """The experiment folder and the newest intact state in it (`resume` is the folder or one state file)."""
    target = Path(resume)
    if target.is_file() and STATE_NAME.match(target.name):
        exp_dir = target.parent.parent
        return exp_dir, load_checked_state(exp_dir, int(STATE_NAME.match(target.name).group(1)))
    if not target.is_dir():
        raise ConfigError(f"train.resume: '{resume}' is neither an experiment folder nor a state file")
    steps = state_steps(target)
    if not steps:
        raise ConfigError(f"train.resume: '{resume}' holds no resumable state (state/step-<N>.pt)")
    return target, load_checked_state(target, steps[-1])


def prune_checkpoints(exp_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` steps' checkpoints and states; returns what was removed."""
    steps = sorted({int(m.group(1)) for p in (exp_dir / "ckpts").iterdir()
                    if (m := re.match(r"^.+-(\d+)\.safetensors$", p.name))})
    removed = []
    for step in steps[:-keep] if keep > 0 else []:
        doomed = [p for p in (exp_dir / "ckpts").iterdir() if re.match(rf"^.+-{step}\.safetensors$", p.name)]
        doomed.append(exp_dir / "state" / f"step-{step}.pt")
        for path in doomed:
            if path.exists():
                path.unlink()
                removed.append(path)
    return removed
