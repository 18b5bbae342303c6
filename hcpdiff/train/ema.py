"""An exponential moving average (EMA) of the trained weights, kept in fp32 beside them."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch


class EmaWeights:
    """fp32 shadow copies of `params`, moved towards them after every optimizer step.

    `swapped_in()` puts the averages into the parameters for a moment (to save them with the same code that saves
    the raw weights) and then puts the raw weights back exactly.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.params = list(params)
        self.decay = float(decay)
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.num_updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """shadow = decay * shadow + (1 - decay) * weights (exactly the weights when decay is 0).

        Two foreach kernels over all shadows (grouped by device and dtype) instead of two per parameter; each element
        gets the per-parameter formula's two roundings, so the result is the same bit for bit."""
        weights = [param.detach().float() for param in self.params]  # fp32 weights: themselves, no copy
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, weights, alpha=1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_from_params(self) -> None:
        """Make the shadows equal to the current weights (after loading saved EMA weights into them)."""
        for shadow, param in zip(self.shadow, self.params):
            shadow.copy_(param.detach().float())

    @contextmanager
    @torch.no_grad()
    def swapped_in(self) -> Iterator[None]:
        """Within the block the parameters hold the averages; afterwards their raw values, bit for bit."""
        raw = [param.detach().clone() for param in self.params]
        try:
            for shadow, param in zip(self.shadow, self.params):
                param.copy_(shadow.to(param.dtype))
            yield
        finally:
            for saved, param in zip(raw, self.params):
                param.copy_(saved)
