"""What the trainer needs to know about DeepSpeed and FSDP runs, which accelerate sets up from its own config file.

DeepSpeed ZeRO-1/2 shards optimizer state and gradients only: every process holds every weight, so checkpoints are
written as under DDP. ZeRO-3 also shards the weights: models are loaded whole (the frozen text encoders run outside
the engine), the trained parameters are gathered on every process while a checkpoint is written, and EMA and
previews, which would read or run sharded weights on one process, are refused. FSDP is refused (accelerate needs a
GPU for it, so it cannot be tested here). The optimizer state is sharded under all of them, so the resumable
`state/step-<N>.pt` (one process's optimizer) is not written there.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError

SHARDED = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def zero_stage(deepspeed_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it names none)."""
    return int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)


def check_sharded_run(distributed_type: Any, deepspeed_config: dict | None, trained_parts: list[str],
                      resume: str | None, ema: bool = False, preview: bool = False) -> None:
    """Refuse, in one line, what this trainer cannot do under DeepSpeed / FSDP."""
    if distributed_type == DistributedType.DEEPSPEED:
        if len(trained_parts) > 1:
            raise ConfigError(f"DeepSpeed trains one model per run and this config trains {', '.join(trained_parts)}; "
                              "keep the groups of one part (e.g. drop lora_text_encoder) or launch with DDP")
        if zero_stage(deepspeed_config) >= 3 and ema:
            raise ConfigError("model.ema: an average of ZeRO-3-sharded weights is not supported; set model.ema=null "
                              "or use zero_stage 2")
        if zero_stage(deepspeed_config) >= 3 and preview:
            raise ConfigError("previewer: previews would run ZeRO-3-sharded weights on one process; set "
                              "previewer=null or use zero_stage 2")
    if distributed_type == DistributedType.FSDP:
        raise ConfigError("FSDP is not supported by this trainer yet; use DeepSpeed (ZeRO-2, or ZeRO-3 for "
                          "weights that do not fit one device) or DDP")
    if resume and distributed_type in SHARDED:
        raise ConfigError("train.resume: DeepSpeed runs keep sharded optimizer state, which this trainer does not "
                          "save; continue from the weights with model.init_lora instead")


def align_deepspeed_config(deepspeed_config: dict, batch_size: int, accumulation: int, max_grad_norm: float | None,
                           num_processes: int) -> list[str]:
    """Make DeepSpeed's batch, accumulation and clipping settings those of the hcpdiff config, which drives the loop.

    DeepSpeed wants the micro-batch size up front, and accelerate reads it from prepared DataLoaders, which this
    trainer does not hand over (its bucket sampler is its own). DeepSpeed also accumulates and clips by itself: with
    a gradient_accumulation_steps or gradient_clipping other than train's, the run would silently differ from the
    same config under DDP. Returns one note per explicit value that was replaced ('auto' and missing are filled).
    """
    wanted = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": float(max_grad_norm or 0.0),
        "train_batch_size": batch_size * accumulation * num_processes,
    }
    notes = []
    for key, value in wanted.items():
        current = deepspeed_config.get(key, "auto")
        if current != "auto" and current != value:
            notes.append(f"{key} {current} -> {value}")
        deepspeed_config[key] = value
    return notes


@contextlib.contextmanager
def whole_weights_loading(accelerator: Any) -> Iterator[None]:
    """Load models unpartitioned under a ZeRO-3 run: accelerate registers its DeepSpeed config with transformers
    whatever zero3_init_flag says, and transformers then partitions every model it loads (zero.Init), the frozen
    text encoders included, which run outside DeepSpeed's engine. The engine shards the trained model itself."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def gathered_for_saving(params: list[torch.nn.Parameter], deepspeed_config: dict | None) -> Any:
    """Under ZeRO-3, a context in which every process holds the whole of `params` (all processes must enter it);
    otherwise nothing. Small parameters (LoRA's, below DeepSpeed's persistence threshold) are never sharded."""
    if zero_stage(deepspeed_config) < 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None)


def param_count(param: torch.nn.Parameter) -> int:
    """Elements of a parameter, also when ZeRO-3 has sharded it (its local tensor is then empty)."""
    return int(getattr(param, "ds_numel", param.numel()))
