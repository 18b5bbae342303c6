"""Small running measurements for the training log: a smoothed loss and the peak memory."""
from __future__ import annotations

import resource
import sys

import torch


class SmoothedValue:
    """An exponential moving average of logged values; the first value starts it (so no warm-up bias)."""

    def __init__(self, momentum: float = 0.9):
        self.momentum = momentum
        self.value: float | None = None

    def update(self, value: float) -> float:
        """Fold in one value and return the smoothed one."""
        self.value = value if self.value is None else self.momentum * self.value + (1 - self.momentum) * value
        return self.value


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far in MiB: allocated CUDA memory on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
