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


def fill_deepspeed_batch(deepspeed_config: dict, batch_size: int) -> None:
    """DeepSpeed wants the micro-batch size up front. accelerate reads it from prepared DataLoaders, which this
    trainer does not hand over (its bucket sampler is its own), so an 'auto' or missing value is filled from the
    dataset's batch_size; accelerate derives train_batch_size and the accumulation from it and its own settings."""
    if deepspeed_config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
