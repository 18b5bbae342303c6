"""Memory: activation offload, block swap set-up, the start-of-run memory table and the out-of-memory line."""
from __future__ import annotations

import contextlib
import resource
import sys
from typing import Any, Iterator

import torch
from torch import nn

from hcpdiff.errors import ConfigError, HcpError
from hcpdiff.models.block_swap import BlockSwapper


class OutOfMemory(HcpError):
    """An allocation failed while training; the message names the step, the peak and what would lower it."""


@contextlib.contextmanager
def activations_offloaded(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Keep the tensors autograd saves during `model`'s forward in CPU memory until backward needs them.

    With gradient checkpointing these are mostly the checkpointed blocks' inputs (the blocks' own activations are
    recomputed). Weights are left alone: they are on the device anyway. As torch.autograd.graph.save_on_cpu, but
    without copying the weights that non-checkpointed layers save. On a CPU the hooks run and move nothing.
    """
    weights = {param.untyped_storage().data_ptr() for param in model.parameters()}
    pin = device.type == "cuda"

    def pack(tensor: torch.Tensor) -> Any:
        if tensor.device.type == "cpu" or tensor.untyped_storage().data_ptr() in weights:
            return tensor
        saved = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin)
        saved.copy_(tensor, non_blocking=pin)
        return tensor.device, saved

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        tensor_device, saved = packed
        return saved.to(tensor_device, non_blocking=pin)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def setup_block_swap(denoiser: nn.Module, blocks: list[nn.Module], count: int, device: torch.device,
                     family_description: str) -> BlockSwapper:
    """Keep `count` of the denoiser's `blocks` in CPU memory (`model.blocks_to_swap`); one ConfigError if it has
    fewer blocks or none."""
    if not blocks:
        raise ConfigError(f"model.blocks_to_swap: a {family_description} model has no transformer blocks to swap; "
                          "remove blocks_to_swap")
    if count > len(blocks):
        raise ConfigError(f"model.blocks_to_swap: {count}, but this {family_description} transformer has "
                          f"{len(blocks)} blocks; give at most {len(blocks)}")
    return BlockSwapper(denoiser, blocks, count, device)


@contextlib.contextmanager
def on_device(module: nn.Module | None, device: torch.device, parked: bool) -> Iterator[None]:
    """While active, a `parked` module (the VAE, while every latent is cached) is on `device`; afterwards back in CPU
    memory. A module that is not parked is left alone."""
    if module is None or not parked:
        yield
        return
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- reporting
def peak_rss_mib() -> float:
    """The process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def part_memory_rows(components: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per model part: (part, parameters, trainable, dtype(s), device(s), MiB); a part that is None (a
    released text encoder, a dropped T5) is "not in memory"; then a total row. Tokenizers and schedulers are no
    parts."""
    rows, total_params, total_bytes = [], 0, 0
    for name, module in components.items():
        if module is None:
            rows.append((name, "0", "0", "-", "not in memory", "0.0"))
            continue
        if not isinstance(module, nn.Module):
            continue
        tensors = list(module.parameters()) + list(module.buffers())
        count = sum(param.numel() for param in module.parameters())
        trainable = sum(param.numel() for param in module.parameters() if param.requires_grad)
        size = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        dtypes = sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")) for t in tensors})
        devices = sorted({str(t.device) for t in tensors})
        rows.append((name, f"{count:,}", f"{trainable:,}", "+".join(dtypes), "+".join(devices), f"{size / 2**20:.1f}"))
        total_params += count
        total_bytes += size
    rows.append(("total", f"{total_params:,}", "", "", "", f"{total_bytes / 2**20:.1f}"))
    return rows


def memory_table(components: dict[str, Any]) -> str:
    """The model parts' memory as an aligned text table (a header line, then one line per part)."""
    rows = [("part", "parameters", "trainable", "dtype", "device", "MiB"), *part_memory_rows(components)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = (1, 2, 5)
    return "\n".join("  ".join(cell.rjust(width) if i in numeric else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip() for row in rows)


def lowering_options(*, checkpointing: bool | str | dict, blocks_to_swap: int, swappable: int, batch_size: int,
                     latents_cached: bool) -> list[str]:
    """The (at most three) settings that would lower training memory most, in that order, given the current ones."""
    options = []
    if not checkpointing or isinstance(checkpointing, dict):  # off, or only some blocks ({blocks: N})
        options.append("model.gradient_checkpointing=true")
    elif checkpointing != "offload":
        options.append("model.gradient_checkpointing=offload")
    if swappable and blocks_to_swap < swappable:
        options.append(f"model.blocks_to_swap={min(swappable, max(blocks_to_swap * 2, swappable // 2))}")
    options.append("a smaller data.<dataset>.batch_size" if batch_size > 1
                   else "a smaller data.<dataset>.bucket.target_area")
    if not latents_cached:
        options.append("data.<dataset>.cache_latents=true")
    return options[:3]


def out_of_memory(step: int, device: torch.device, options: list[str]) -> OutOfMemory:
    """The one-line error for an allocation that failed while computing optimizer step `step`."""
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated on {device}"
    else:
        peak = f"{peak_rss_mib():.0f} MiB resident"
    return OutOfMemory(f"out of memory at step {step} (peak {peak}); what would lower it most: "
                       + ", ".join(options))
