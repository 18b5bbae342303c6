"""Training: the trainer loop, loss, optimizer and scheduler building, experiment folder, logs.

The Trainer is imported on first use, so `python -m hcpdiff.train_ac_single --help` and config errors do not pay
for torch, diffusers and peft.
"""
from __future__ import annotations

from typing import Any

__all__ = ["Trainer", "main", "run_training"]


def __getattr__(name: str) -> Any:
    if name == "Trainer":
        from hcpdiff.train.trainer import Trainer

        return Trainer
    if name in ("main", "run_training"):
        from hcpdiff.train import run

        return getattr(run, name)
    raise AttributeError(f"module 'hcpdiff.train' has no attribute {name!r}")
