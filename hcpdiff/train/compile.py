"""`train.compile`: torch.compile the denoiser in place, one graph per batch shape.

`module.compile()` keeps the module (and so its parameter names and checkpoint keys) and compiles its forward on first
use. With `dynamic: false` each batch shape (bucket size x batch size) is its own graph, so the recompile limit is
raised to the number of shapes the data can give; on torch 2.13's CPU inductor, dynamic H/W crashed in backward.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from hcpdiff.config import read_fields
from hcpdiff.errors import ConfigError

logger = logging.getLogger(__name__)

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MANY_GRAPHS = 16  # more batch shapes than this: say that each one compiles on first use


@dataclass
class CompileSpec:
    """`train.compile` as a mapping (`true` is all defaults)."""

    mode: str | None = None  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    dynamic: bool | None = False  # false: one graph per batch shape; true / null: dynamic shapes (torch decides)
    fullgraph: bool = False  # true: fail on a graph break instead of running that part eagerly
    # inductor generates kernels; aot_eager traces forward and backward but runs them as they are; eager only captures
    # the graphs (a quick check that the denoiser compiles: what the tests use)
    backend: str = "inductor"


def read_compile_spec(value: Any) -> CompileSpec | None:
    """`train.compile` (false | true | {mode, dynamic, fullgraph}) -> a CompileSpec, or None when off."""
    if value is None or value is False:
        return None
    if value is True:
        return CompileSpec()
    if not isinstance(value, Mapping):
        raise ConfigError(f"train.compile: give false, true or {{mode, dynamic, fullgraph}}, got {value!r}")
    spec = read_fields(value, "train.compile", CompileSpec)
    if spec.mode is not None and spec.mode not in MODES:
        raise ConfigError(f"train.compile.mode: {spec.mode!r} is not one of {', '.join(MODES)} (or null)")
    if spec.mode is not None and spec.backend != "inductor":
        raise ConfigError(f"train.compile.mode: a mode is inductor's; backend {spec.backend!r} takes none")
    import torch._dynamo

    if spec.backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"train.compile.backend: {spec.backend!r} is not a torch.compile backend; use one of "
                          f"{', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    return spec


def compile_refusal(*, zero_stage: int, blocks_to_swap: int, gradient_checkpointing: Any) -> str | None:
    """Why `train.compile` cannot run with these settings (one line), or None (`zero_stage` 0: no DeepSpeed ZeRO)."""
    if zero_stage >= 3:
        return ("train.compile: DeepSpeed ZeRO-3 gathers each layer's weights in hooks as it runs, which a compiled "
                "graph does not follow; set train.compile=false or use zero_stage 2")
    if blocks_to_swap:
        return ("train.compile: model.blocks_to_swap moves blocks between devices in hooks while the denoiser runs, "
                "which a compiled graph does not follow; set one of them off")
    if gradient_checkpointing == "offload":
        return ("train.compile: model.gradient_checkpointing 'offload' keeps activations in CPU memory through "
                "saved-tensor hooks, which compiled backward graphs do not run; use gradient_checkpointing: true "
                "or train.compile=false")
    return None


def batch_shapes(bucket_sizes: Iterable[tuple[int, int]], batch_size: int) -> int:
    """The most batch shapes one dataset gives: each bucket size at the full batch and at one smaller last batch."""
    return len(set(bucket_sizes)) * (2 if batch_size > 1 else 1)


def compile_denoiser(module: torch.nn.Module, spec: CompileSpec, shapes: int) -> None:
    """Compile `module`'s forward in place, with room for `shapes` graphs before torch stops recompiling."""
    import torch._dynamo

    config = torch._dynamo.config
    needed = shapes + 1  # and one spare: a guard torch adds on the second call (e.g. a parameter's version)
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, needed)
    if spec.dynamic is False and shapes > MANY_GRAPHS:
        logger.warning("train.compile: the data gives up to %d batch shapes (bucket sizes x full / last batch), each "
                       "compiled on first use (minutes each on a large model); fewer buckets or "
                       "train.compile.dynamic=true compile fewer", shapes)
    options = {"backend": spec.backend, "dynamic": spec.dynamic, "fullgraph": spec.fullgraph}
    if spec.mode is not None:
        options["mode"] = spec.mode
    module.compile(**options)
    logger.info("train.compile: %s compiles on its first steps (%s, up to %d graphs)", type(module).__name__,
                ", ".join(f"{key} {value}" for key, value in options.items()), needed)


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules as plain eager code within the block (previews: other shapes, no grad, eval mode)."""
    with torch.compiler.set_stance("force_eager"):
        yield
