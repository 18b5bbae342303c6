"""Fold native adapter weights into a plain model's Linear / Conv2d weights (for inference)."""
from __future__ import annotations

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from torch import nn

from hcpdiff.errors import ModelError
from hcpdiff.lora.state_io import adapter_tensors, layer_kind, layer_rank, layer_states

PLAIN_LORA = {".lora_A.weight", ".lora_B.weight", ".alpha"}
MERGE_ADAPTER = "merge"


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """B @ A as a weight: [out, in] for Linear; for Conv2d a k x k conv followed by a 1 x 1 conv is one k x k conv."""
    if lora_a.dim() == 2:
        return lora_b @ lora_a
    return torch.einsum("or,rikl->oikl", lora_b.flatten(1), lora_a)


def merge_lora(model: nn.Module, state: dict[str, torch.Tensor], alpha_scale: float = 1.0, source: str = "") -> None:
    """Merge every layer in `state` into `model` in place (a model without adapters), its scale times alpha_scale.

    Plain LoRA: W += alpha_scale * (alpha / rank) * B @ A. DoRA, LoHa and LoKr: peft's own layer of that type is
    built around the layer, filled with the weights and merged, so the result is exactly what training computed.
    `source` (the file) prefixes errors. Every layer is looked up before any is merged.
    """
    prefix = f"LoRA file '{source}', layer" if source else "LoRA layer"
    by_layer = layer_states(state)
    for name in by_layer:
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ModelError(f"{prefix} '{name}' does not exist in the model.") from err
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            raise ModelError(f"{prefix} '{name}' is a {type(layer).__name__}, not a Linear or Conv2d layer.")
    with torch.no_grad():
        for name, parts in by_layer.items():
            layer = model.get_submodule(name)
            if set(parts) == PLAIN_LORA:
                merge_plain_lora(name, layer, parts, alpha_scale)
            else:
                merge_with_peft(name, layer, parts, alpha_scale)


def merge_plain_lora(name: str, layer: nn.Module, parts: dict[str, torch.Tensor], alpha_scale: float) -> None:
    """W += alpha_scale * (alpha / rank) * B @ A."""
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


def peft_config_for(parts: dict[str, torch.Tensor]) -> LoraConfig | LoHaConfig | LoKrConfig:
    """A one-layer peft config whose adapter has exactly the shapes of these native weights."""
    alpha = float(parts[".alpha"])
    kind = layer_kind(parts)
    rank = layer_rank(parts)
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, target_modules=["target"])
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, decompose_both=".lokr_w1_a" in parts, target_modules=["target"])
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=["target"],
                      use_dora=".lora_magnitude_vector.weight" in parts)


def merge_with_peft(name: str, layer: nn.Module, parts: dict[str, torch.Tensor], alpha_scale: float) -> None:
    """Wrap `layer` in peft's adapter layer (in a throw-away holder), load the weights, merge, drop the wrapper."""
    holder = nn.Module()
    holder.add_module("target", layer)
    inject_adapter_in_model(peft_config_for(parts), holder, adapter_name=MERGE_ADAPTER)
    wrapped = holder.target
    targets = adapter_tensors(wrapped, MERGE_ADAPTER)
    weights = {suffix: tensor for suffix, tensor in parts.items() if suffix not in (".alpha", ".rank")}
    if set(weights) != set(targets) or any(weights[s].shape != targets[s].shape for s in targets):
        raise ModelError(
            f"LoRA layer '{name}': its {layer_kind(parts)} weights "
            f"{ {s: tuple(t.shape) for s, t in weights.items()} } do not fit the layer's weight "
            f"{tuple(layer.weight.shape)}."
        )
    for suffix, target in targets.items():
        target.data = weights[suffix].to(device=target.device, dtype=torch.float32)
    wrapped.scaling[MERGE_ADAPTER] = alpha_scale * wrapped.scaling[MERGE_ADAPTER]
    # peft writes the merged weight into the wrapped layer itself, which is the model's own layer object
    wrapped.merge(adapter_names=[MERGE_ADAPTER])


def merge_full_weights(model: nn.Module, state: dict[str, torch.Tensor], alpha: float, source: str) -> None:
    """Blend fully trained tensors into a plain model: base + alpha * (trained - base); alpha 1 is the trained
    weight exactly, alpha 0 leaves the base untouched."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in params:
                raise ModelError(f"'{source}': tensor '{name}' names no parameter of the model.")
            param = params[name]
            if tensor.shape != param.shape:
                raise ModelError(f"'{source}': tensor '{name}' has shape {tuple(tensor.shape)}, "
                                 f"the model's has {tuple(param.shape)}.")
            trained = tensor.to(device=param.device, dtype=torch.float32)
            param.copy_(torch.lerp(param.float(), trained, float(alpha)).to(param.dtype))
