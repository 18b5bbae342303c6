"""Quantize a model part's frozen Linear weights (torchao, weight-only) after loading and before LoRA attaches.

Only the base weights change storage: int8 (per-row scales), fp8 (e4m3, per-row scales) or nf4 (QLoRA's 4-bit
normal float, blocks of 64). Each Linear still computes in its activation dtype (bf16 or fp32) on dequantized
weights; peft wraps the quantized Linear like any other, so the adapters, their gradients and optimizer state keep
the training dtype and the LoRA file holds the same keys as an unquantized run's.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from hcpdiff.errors import ConfigError

QUANTIZATIONS = ("int8", "fp8", "nf4")
NF4_BLOCK = 64  # torchao's QLoRA default: 64 weights per scale, scales in blocks of 256
NF4_SCALER_BLOCK = 256
INSTALL_HINT = "pip install 'hcpdiff[quantize]' (torchao)"


def check_quantize_values(quantize: Any, where: str = "model.quantize") -> list[str]:
    """Problems with a `model.quantize` mapping's values (part -> int8 | fp8 | nf4), before any model loads."""
    if quantize is None:
        return []
    if not isinstance(quantize, Mapping):
        return [f"{where}: expected a mapping of part -> {' | '.join(QUANTIZATIONS)} (e.g. {{transformer: int8}}), "
                f"got {quantize!r}"]
    return [f"{where}.{part}: '{kind}' is not a quantization; use one of {', '.join(QUANTIZATIONS)} (or remove the key)"
            for part, kind in quantize.items() if kind not in QUANTIZATIONS]


def check_quantize_parts(quantize: Mapping[str, str], parts: Iterable[str], description: str,
                         where: str = "model.quantize") -> list[str]:
    """Problems with the parts `model.quantize` names: each must be one of the model's loaded network parts."""
    parts = tuple(parts)
    return [f"{where}.{part}: a {description} model has no part '{part}' to quantize; its parts are {', '.join(parts)}"
            for part in quantize if part not in parts]


def is_quantized(tensor: torch.Tensor) -> bool:
    """Whether a parameter holds quantized storage (a torchao tensor subclass) rather than a plain tensor."""
    data = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    return type(data) is not torch.Tensor


def torchao_config(kind: str) -> Any:
    """The torchao weight-only config for int8 / fp8 (nf4 is converted tensor by tensor instead)."""
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change torch._inductor's global settings
    if kind == "int8":
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return Float8WeightOnlyConfig(set_inductor_config=False)


def quantizable(layer: nn.Module, kind: str) -> bool:
    """Whether one frozen Linear's weight can take this quantization (nf4: whole blocks of 64 weights and of 256
    scales)."""
    if not isinstance(layer, nn.Linear) or layer.weight.requires_grad or is_quantized(layer.weight):
        return False
    if kind == "nf4":
        numel = layer.weight.numel()
        return numel % NF4_BLOCK == 0 and (numel // NF4_BLOCK) % NF4_SCALER_BLOCK == 0
    return True


def quantize_linear_weights(module: nn.Module, kind: str, where: str,
                            device: torch.device | None = None) -> tuple[int, int]:
    """Quantize every frozen Linear weight in `module` in place (storage `kind`, compute in the weights' dtype), layer
    by layer on `device` (there the layer stays; default: where it is), so a part larger than the device's memory in
    bf16 never has to fit unquantized; returns (quantized, Linear layers in all). A library or device that cannot do
    it (checked by one forward pass of the first quantized layer) is one ConfigError naming `where`, kind and device."""
    if kind not in QUANTIZATIONS:
        raise ConfigError(f"{where}: '{kind}' is not a quantization; use one of {', '.join(QUANTIZATIONS)}")
    linears = [layer for layer in module.modules() if isinstance(layer, nn.Linear)]
    chosen = [layer for layer in linears if quantizable(layer, kind)]
    try:
        import torchao
    except ImportError as err:
        raise ConfigError(f"{where}: {kind} quantization needs torchao, which is not installed; "
                          f"{INSTALL_HINT}") from err
    for index, layer in enumerate(chosen):
        target = device if device is not None else layer.weight.device
        compute_dtype = layer.weight.dtype
        try:
            layer.to(target)
            if kind == "nf4":
                from torchao.quantization import to_nf4

                layer.weight = nn.Parameter(to_nf4(layer.weight.data, NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False)
            else:
                from torchao.quantization import quantize_

                quantize_(layer, torchao_config(kind))
            if index == 0:  # the device's kernels run (or fail) here, not at the first training step
                with torch.no_grad():
                    layer(torch.zeros(1, layer.in_features, device=target, dtype=compute_dtype))
        except (RuntimeError, ImportError, NotImplementedError, AssertionError, ValueError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"{where}: torchao {torchao.__version__} cannot quantize to {kind} on "
                              f"{torch.device(target).type} ({reason}); use another of {', '.join(QUANTIZATIONS)} or "
                              "remove the key") from err
    return len(chosen), len(linears)


def quantize_parts(components: Mapping[str, Any], quantize: Mapping[str, str], dtype: torch.dtype,
                   device: torch.device | None = None, where: str = "model.quantize") -> dict[str, tuple[int, int]]:
    """Freeze each named part, cast its weights to `dtype` (the compute dtype), then quantize its Linear weights
    layer by layer onto `device`; part -> (quantized, Linear layers in all)."""
    counts: dict[str, tuple[int, int]] = {}
    for part, kind in quantize.items():
        module: nn.Module = components[part]
        module.requires_grad_(False)
        for param in module.parameters():
            if not param.requires_grad and not is_quantized(param):
                param.data = param.data.to(dtype)
        counts[part] = quantize_linear_weights(module, kind, f"{where}.{part}", device)
    return counts
