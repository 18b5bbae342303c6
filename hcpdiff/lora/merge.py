"""Fold native LoRA weights into a plain model's Linear / Conv2d weights (for inference)."""
from __future__ import annotations

import torch
from torch import nn

from hcpdiff.errors import ModelError
from hcpdiff.lora.state_io import layer_states


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B @ A as a weight: [out, in] for Linear; for Conv2d a k x k conv followed by a 1 x 1 conv is one k x k conv."""
    if lora_a.dim() == 2:
        return lora_b @ lora_a
    return torch.einsum("or,rikl->oikl", lora_b.flatten(1), lora_a)


def merge_lora(model: nn.Module, state: dict[str, torch.Tensor], alpha_scale: float = 1.0) -> None:
    """W += alpha_scale * (alpha / rank) * B @ A for every layer in `state`, in place, on a model without adapters."""
    with torch.no_grad():
        for name, parts in layer_states(state).items():
            try:
                layer = model.get_submodule(name)
            except AttributeError as err:
                raise ModelError(f"LoRA layer '{name}' does not exist in the model.") from err
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise ModelError(f"LoRA layer '{name}' is a {type(layer).__name__}, not a Linear or Conv2d layer.")
            lora_a = parts[".lora_A.weight"].to(torch.float32)
            lora_b = parts[".lora_B.weight"].to(torch.float32)
            scale = alpha_scale * float(parts[".alpha"]) / lora_a.shape[0]
            delta = scale * lora_delta(lora_a, lora_b)
            if delta.shape != layer.weight.shape:
                raise ModelError(
                    f"LoRA layer '{name}' gives a weight change of shape {tuple(delta.shape)}, "
                    f"the layer's weight is {tuple(layer.weight.shape)}."
                )
            layer.weight += delta.to(device=layer.weight.device, dtype=layer.weight.dtype)
