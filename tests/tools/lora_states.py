"""Synthetic native LoRA states for the conversion tests, and the weight change each layer of one adds."""
from __future__ import annotations

import torch

from hcpdiff.lora.state_io import layer_states


def random_lora(model: torch.nn.Module, keep, seed: int) -> dict[str, torch.Tensor]:
    """A native LoRA on every Linear `keep(name)` accepts, ranks 2-4 and alphas 1-4 varying by layer."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for i, (name, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)):
        if keep(name):
            rank = 2 + i % 3
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.3
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.3
            state[f"{name}.alpha"] = torch.tensor(float(1 + i % 4))
    return state


def deltas(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{layer: alpha / rank * B @ A}: what each LoRA layer adds to its weight."""
    return {layer: float(p[".alpha"]) / p[".lora_A.weight"].shape[0] * p[".lora_B.weight"] @ p[".lora_A.weight"]
            for layer, p in layer_states(state).items()}
