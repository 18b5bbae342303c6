"""A training batch on the device: copied without blocking the host, converted there.

Dtype conversions run after the copy, on the device: `.to(device, dtype)` of a host tensor converts on the CPU first,
into pageable memory, and then copies blocking.
"""
from __future__ import annotations

from typing import Any

import torch

from hcpdiff.data.images import unit_range
from hcpdiff.models.transfer import to_device

# batch fields the step reads on the device; the rest (prompts, noise seeds, sizes, condition images) stay on the host
# (a ControlNet's control image goes with floats_on_device when it is used)
DEVICE_FIELDS = ("pixel_values", "latents")


def batch_on_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch with its pixels and latents on `device`: uint8 pixels become floats in [-1, 1] there, latents fp32."""
    moved = dict(batch)
    for name in DEVICE_FIELDS:
        value = batch.get(name)
        if isinstance(value, torch.Tensor):
            moved[name] = floats_on_device(value, device)
    return moved


def floats_on_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`value` on `device` in fp32; uint8 pixels become floats in [-1, 1] there."""
    value = to_device(value, device)
    return unit_range(value) if value.dtype == torch.uint8 else value.float()
