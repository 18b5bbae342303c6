"""Resumable training state: `exps/<ts>/state/step-<N>.pt` beside the LoRA checkpoints of that step.

The state file holds the step, optimizer, lr schedule, data positions and every process's RNG states, plus the
SHA-256 of each checkpoint file of that step, so a resumed run finds a corrupt or partial checkpoint and names it
instead of loading it. It holds only tensors and plain Python values (numpy's RNG state is stored as a tensor), so it
is read with `torch.load(weights_only=True)`: a file crafted to run code when unpickled is refused, never executed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hcpdiff.errors import ConfigError

STATE_FORMAT = "hcpdiff.train_state"
STATE_NAME = re.compile(r"^step-(\d+)\.pt$")
CKPT_NAME = re.compile(r"^.+-(\d+)\.safetensors$")  # ckpts/<part>-<N>.safetensors, <part>-ema-<N>.safetensors
PREVIEW_NAME = re.compile(r"^(\d+)-\d+\.(png|mp4)$")  # preview/<N>-<i>.png (a clip: .mp4)

logger = logging.getLogger("hcpdiff.train")

# States written before numpy's RNG state was stored as a tensor hold a numpy array; these are the (code-free)
# reconstructors of one, allowed so such files still resume.
LEGACY_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:
    from numpy._core.multiarray import _reconstruct as _numpy_reconstruct  # numpy >= 2
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _numpy_reconstruct
LEGACY_NUMPY_GLOBALS.append(_numpy_reconstruct)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch (and CUDA) RNG states, as tensors and plain values only."""
    version, internal, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": [version, list(internal), gauss_next],
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned (or the numpy tuple older states hold)."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["bit_generator"], numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)
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


def read_state_file(path: Path) -> dict[str, Any]:
    """Load a state file without running any code it may hold; ConfigError naming the file when it is not a
    well-formed hcpdiff training state."""
    try:
        # weights_only: tensors and plain containers only; a pickled callable (os.system, ...) is refused unrun.
        with torch.serialization.safe_globals(LEGACY_NUMPY_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read untrusted bytes means the file is unusable
        code = re.search(r"(?i)unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(err))
        if code:
            raise ConfigError(f"train.resume: state file '{path}' refers to the Python object '{code.group(1)}' and "
                              "is refused unread (loading it could run code); hcpdiff states hold tensors and plain "
                              "values only") from err
        raise ConfigError(f"train.resume: state file '{path}' is corrupt or partial "
                          f"({type(err).__name__}); it cannot be read") from err
    problem = state_problem(state)
    if problem:
        raise ConfigError(f"train.resume: '{path}' is not an intact hcpdiff training state ({problem})")
    return state


def state_problem(state: Any) -> str:
    """What is wrong with the layout of a loaded state ('' when nothing), so a hand-edited file is named."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return f"no format: {STATE_FORMAT}"
    expected = {"step": int, "optimizer": dict, "lr_scheduler": dict, "streams": list, "rng": list, "checkpoints": dict}
    for key, kind in expected.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            return f"'{key}' is missing or not a {kind.__name__}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in state["checkpoints"].items()):
        return "'checkpoints' must map file names to SHA-256 strings"
    for stream in state["streams"]:
        if not (isinstance(stream, dict) and isinstance(stream.get("epoch"), int)
                and isinstance(stream.get("position"), int)):
            return "'streams' entries need an integer epoch and position"
    for rng in state["rng"]:
        if not (isinstance(rng, dict) and {"python", "numpy", "torch"} <= rng.keys()
                and isinstance(rng["torch"], torch.Tensor)):
            return "'rng' entries need python, numpy and torch states"
    return ""


def load_checked_state(exp_dir: Path, step: int) -> dict[str, Any]:
    """Load `state/step-<step>.pt` and verify its checkpoint files; a damaged one raises naming the file."""
    path = exp_dir / "state" / f"step-{step}.pt"
    state = read_state_file(path)
    if state["step"] != step:
        raise ConfigError(f"train.resume: '{path}' holds step {state['step']}, not {step} as its name says")
    for name, digest in state["checkpoints"].items():
        ckpt = exp_dir / "ckpts" / name
        if Path(name).name != name:  # a hand-edited name must not point outside ckpts/
            raise ConfigError(f"train.resume: '{path}' names checkpoint '{name}' outside the ckpts folder")
        if not ckpt.is_file():
            raise ConfigError(f"train.resume: checkpoint '{ckpt}' of step {step} is missing")
        if file_sha256(ckpt) != digest:
            raise ConfigError(f"train.resume: checkpoint '{ckpt}' does not match its state (corrupt or partial file)")
    return state


@dataclass
class ResumePoint:
    """Where a resumed run starts: its folder, the state it continues, and how that state was chosen."""

    exp_dir: Path
    step: int
    state: dict[str, Any]
    named_file: bool  # the user named this state file (going back on purpose) rather than the folder
    skipped: list[int]  # newer steps whose state or checkpoints were damaged (resuming from the folder)


def resume_dir_of(resume: str) -> Path:
    """The experiment folder that `train.resume` (a folder or one state file) continues."""
    target = Path(resume)
    if target.is_file() and STATE_NAME.match(target.name):
        return target.parent.parent
    if not target.is_dir():
        raise ConfigError(f"train.resume: '{resume}' is neither an experiment folder nor a state file")
    return target


def find_resume_state(resume: str) -> ResumePoint:
    """The state to continue from: the file named, or the folder's newest intact one (damaged newer ones are
    skipped with one warning each)."""
    target = Path(resume)
    exp_dir = resume_dir_of(resume)
    if target.is_file():
        step = int(STATE_NAME.match(target.name).group(1))
        return ResumePoint(exp_dir, step, load_checked_state(exp_dir, step), named_file=True, skipped=[])
    steps = state_steps(exp_dir)
    if not steps:
        raise ConfigError(f"train.resume: '{resume}' holds no resumable state (state/step-<N>.pt)")
    damaged: list[tuple[int, ConfigError]] = []
    for step in reversed(steps):
        try:
            state = load_checked_state(exp_dir, step)
        except ConfigError as err:
            damaged.append((step, err))
            continue
        for bad_step, err in damaged:
            logger.warning("skipping step %d: %s; resuming from step %d", bad_step,
                           str(err).removeprefix("train.resume: "), step)
        return ResumePoint(exp_dir, step, state, named_file=False, skipped=[bad for bad, _ in damaged])
    raise damaged[0][1]  # none is intact: the newest one's problem is the one to fix


def folder_steps(exp_dir: Path) -> list[int]:
    """Steps that have any output (checkpoint, state or preview) in an experiment folder, ascending."""
    steps = set(state_steps(exp_dir))
    for sub, pattern in (("ckpts", CKPT_NAME), ("preview", PREVIEW_NAME)):
        if (exp_dir / sub).is_dir():
            steps |= {int(m.group(1)) for p in (exp_dir / sub).iterdir() if (m := pattern.match(p.name))}
    return sorted(steps)


def step_files(exp_dir: Path, step: int) -> list[Path]:
    """Every file of one step: its checkpoints (EMA too), its state and its preview images."""
    files = []
    if (exp_dir / "ckpts").is_dir():
        files += [p for p in (exp_dir / "ckpts").iterdir() if (m := CKPT_NAME.match(p.name)) and int(m[1]) == step]
    if (exp_dir / "preview").is_dir():
        files += [p for p in (exp_dir / "preview").iterdir() if (m := PREVIEW_NAME.match(p.name)) and int(m[1]) == step]
    state = exp_dir / "state" / f"step-{step}.pt"
    return files + ([state] if state.exists() else [])


def prune_checkpoints(exp_dir: Path, keep: int, up_to: int) -> list[Path]:
    """Delete the checkpoints and states of all but the newest `keep` steps at or below `up_to` (the step just
    written); returns what was removed.

    Steps above `up_to` are not this run's writes (another run's, in a folder resumed with overwriting refused or
    skipped as damaged), so pruning never touches them, and the step just written is always among those kept.
    """
    steps = sorted({int(m.group(1)) for p in (exp_dir / "ckpts").iterdir() if (m := CKPT_NAME.match(p.name))}
                   | set(state_steps(exp_dir)))
    steps = [step for step in steps if step <= up_to]
    removed = []
    for step in steps[:-keep] if keep > 0 else []:
        for path in step_files(exp_dir, step):
            if path.parent.name == "preview":  # previews are small and show the run's history; kept
                continue
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
