"""What the trainer needs to know about DeepSpeed and FSDP runs, which accelerate sets up from its own config file.

DeepSpeed ZeRO-1/2 shards optimizer state and gradients only: every process holds every weight, so checkpoints are
written as under DDP. ZeRO-3 and FSDP shard the weights themselves; saving adapters from them is not supported yet,
and that is said before any model loads rather than discovered as empty checkpoints. The optimizer state is sharded
under all of them, so the resumable `state/step-<N>.pt` (one process's optimizer) is not written there.
"""
from __future__ import annotations

from typing import Any

from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError

SHARDED = (DistributedType.DEEPSPEED, DistributedType.FSDP)


def zero_stage(deepspeed_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it names none)."""
    return int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)


def check_sharded_run(distributed_type: Any, deepspeed_config: dict | None, trained_parts: list[str],
                      resume: str | None) -> None:
    """Refuse, in one line, what this trainer cannot do under DeepSpeed / FSDP."""
    if distributed_type == DistributedType.DEEPSPEED:
        if len(trained_parts) > 1:
            raise ConfigError(f"DeepSpeed trains one model per run and this config trains {', '.join(trained_parts)}; "
                              "keep the groups of one part (e.g. drop lora_text_encoder) or launch with DDP")
        if zero_stage(deepspeed_config) >= 3:
            raise ConfigError("DeepSpeed ZeRO-3 shards the weights, and saving LoRA checkpoints from sharded weights "
                              "is not supported yet; use zero_stage 2 (the LoRA weights are small) or DDP")
    if distributed_type == DistributedType.FSDP:
        raise ConfigError("FSDP shards the weights, and saving LoRA checkpoints from sharded weights is not "
                          "supported yet; use DeepSpeed ZeRO-2 or DDP")
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
