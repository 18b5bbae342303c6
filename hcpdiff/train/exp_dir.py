"""The experiment folder: `exps/<timestamp>/{cfg.yaml, ckpts/, tblog/, train.log}`."""
from __future__ import annotations

import os
from pathlib import Path


def claim_exp_dir(requested: str | os.PathLike) -> Path:
    """Create and return a new experiment folder; an existing one is never reused (suffix -1, -2, ...)."""
    base = Path(requested)
    candidate, suffix = base, 0
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base.with_name(f"{base.name}-{suffix}")
