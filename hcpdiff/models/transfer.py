"""Host-to-device copies that do not make the host wait for the GPU.

A blocking `tensor.to("cuda")` waits for every kernel queued before it (PyTorch synchronises the stream after the
copy), so one such copy in a training step stops the host from running ahead of the GPU. A copy from pinned memory
with `non_blocking=True` is queued like a kernel.
"""
from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` on `device`; a host tensor bound for a GPU is pinned (unless it is already) and copied without
    blocking the host. Elsewhere (CPU, MPS) a plain `.to`."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
