"""Optimizer param groups (one per LoRA group) and the learning-rate schedule."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers.optimization import SchedulerType, get_scheduler

from hcpdiff.errors import ConfigError

SCHEDULER_NAMES = [member.value for member in SchedulerType]


def param_groups(groups: Sequence, lr_scale: float = 1.0) -> list[dict]:
    """One optimizer param group per trained group (`name`, `lr`, `params`), lr multiplied by lr_scale."""
    return [{"params": list(g.params), "lr": float(g.lr) * lr_scale, "name": g.name} for g in groups]


def build_optimizer(make_optimizer: Callable, groups: list[dict]) -> torch.optim.Optimizer:
    """Call the config's `_partial_` optimizer with the param groups."""
    try:
        return make_optimizer(groups)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.optimizer: could not build the optimizer: {err}") from err


def build_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    scheduler_kwargs: dict,
) -> torch.optim.lr_scheduler.LRScheduler:
    """A diffusers learning-rate schedule by name, counted in optimizer steps."""
    if name not in SCHEDULER_NAMES:
        raise ConfigError(f"train.scheduler.name: unknown scheduler {name!r}; choose one of {', '.join(SCHEDULER_NAMES)}")
    try:
        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=num_warmup_steps,
            num_training_steps=num_training_steps,
            **scheduler_kwargs,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"train.scheduler: {err}") from err
