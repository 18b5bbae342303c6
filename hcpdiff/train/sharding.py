"""What the trainer needs to know about DeepSpeed and FSDP runs, which accelerate sets up from its own config file.

DeepSpeed ZeRO-1/2 shards optimizer state and gradients only: every process holds every weight, so checkpoints are
written as under DDP. ZeRO-3 also shards the weights: models are loaded whole (the frozen text encoders run outside
the engine), the trained parameters are gathered on every process while a checkpoint is written, and EMA and
previews, which would read or run sharded weights on one process, are refused. The optimizer state is sharded, so the
resumable `state/step-<N>.pt` (one process's optimizer) is not written under DeepSpeed.

FSDP2 (accelerate's `fsdp_version: 2`, torch's `fully_shard`) shards the one trained model's weights, gradients and
optimizer state, frozen base weights included. Its parameters become DTensors: checkpoints gather each trained
tensor whole on the main process (`gathered_state`), and the resumable state holds the whole optimizer state, keyed
by parameter name (`whole_optimizer_state`), which every process reads back and shards again. accelerate picks FSDP
only for a GPU-like process group (accelerate/state.py, AcceleratorState.__init__): on CPU processes it would
silently train DDP instead, so that case is refused (`check_fsdp_taken`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch
from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError

def zero_stage(deepspeed_config: dict | None) -> int:
    """The ZeRO stage of a DeepSpeed config (0 when it names none)."""
    return int(((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0) or 0)


def check_sharded_run(distributed_type: Any, deepspeed_config: dict | None, trained_parts: list[str],
                      resume: str | None, ema: bool = False, preview: bool = False,
                      fsdp_version: int | None = None, unsupported_under_fsdp: dict[str, bool] | None = None) -> None:
    """Refuse, in one line, what this trainer cannot do under DeepSpeed / FSDP. `unsupported_under_fsdp`:
    {config key: whether this run sets it} for the settings FSDP runs refuse (block swap, quantization, ...)."""
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
        check_fsdp_run(fsdp_version, trained_parts, ema, preview, unsupported_under_fsdp or {})
    if resume and distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("train.resume: DeepSpeed runs keep sharded optimizer state, which this trainer does not "
                          "save; continue from the weights with model.init_lora instead")


def check_fsdp_run(fsdp_version: int | None, trained_parts: list[str], ema: bool, preview: bool,
                   unsupported: dict[str, bool]) -> None:
    """Refuse, in one line, what this trainer cannot do under FSDP."""
    if fsdp_version != 2:
        raise ConfigError(f"FSDP version {fsdp_version} is not supported; use fsdp_version: 2 in the accelerate "
                          "config (fsdp_config), as cfgs/accelerate/fsdp2.yaml does")
    if len(trained_parts) > 1:
        raise ConfigError(f"FSDP shards one trained model per run and this config trains {', '.join(trained_parts)}; "
                          "keep the groups of one part (e.g. drop lora_text_encoder) or launch with DDP")
    if ema:
        raise ConfigError("model.ema: an average of FSDP-sharded weights is not supported; set model.ema=null or "
                          "launch with DDP")
    if preview:
        raise ConfigError("previewer: previews would run FSDP-sharded weights on one process; set previewer=null "
                          "and render the checkpoints with the visualizer")
    for key, used in unsupported.items():
        if used:
            raise ConfigError(f"{key}: not supported with FSDP; remove it or launch with DDP / DeepSpeed")


def check_fsdp_taken(distributed_type: Any) -> None:
    """Refuse an FSDP launch that accelerate turned into another kind of run: it selects FSDP only for GPU-like
    devices, and on CPU processes it would train DDP (every weight on every process) without a word."""
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if asked and distributed_type != DistributedType.FSDP:
        raise ConfigError(f"the accelerate config asks for FSDP, but accelerate runs FSDP only on GPUs and set up "
                          f"this run as {distributed_type.value}; launch on GPUs, or with torchrun / "
                          "cfgs/accelerate/multi_gpu.yaml for plain data parallel")


def gathered_state(state: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors whole: FSDP2-sharded ones (DTensors) gathered one at a time, which every process must
    call in the same order; kept (in CPU memory) only where `keep`, so other processes never hold a whole copy."""
    from torch.distributed.tensor import DTensor

    whole = {}
    for key, tensor in state.items():
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
            if keep:
                tensor = tensor.cpu()
        if keep:
            whole[key] = tensor
    return whole


def whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state of an FSDP2 model, gathered whole on the main process (in CPU memory; {} elsewhere) and
    keyed by parameter name: plain tensors and values, readable with `torch.load(weights_only=True)`. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_whole_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Put a `whole_optimizer_state` back: every process passes the whole state and keeps its own shard. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


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


def local_numel(param: torch.Tensor) -> int:
    """Elements this process holds of a parameter (an FSDP2 DTensor's shard; otherwise all of them)."""
    from torch.distributed.tensor import DTensor

    return param.to_local().numel() if isinstance(param, DTensor) else param.numel()
