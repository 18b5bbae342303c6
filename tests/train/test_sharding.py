"""DeepSpeed / FSDP guards: what the trainer refuses up front, and the batch size DeepSpeed needs."""
from __future__ import annotations

import pytest
import torch
from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError
from hcpdiff.train.sharding import (
    align_deepspeed_config, check_fsdp_taken, check_sharded_run, gathered_state, local_numel, zero_stage,
)

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


ZERO3 = {"zero_optimization": {"stage": 3}}


def test_zero2_with_one_trained_part_runs():
    check_sharded_run(DistributedType.DEEPSPEED, ZERO2, ["unet"], None, ema=True, preview=True)
    check_sharded_run(DistributedType.DEEPSPEED, ZERO3, ["unet"], None)
    check_sharded_run(DistributedType.MULTI_GPU, None, ["unet", "text_encoder"], "exps/run")  # DDP: anything goes


@pytest.mark.parametrize("kind, config, parts, resume, words", [
    (DistributedType.DEEPSPEED, ZERO2, ["unet", "text_encoder"], None, "unet, text_encoder"),
    (DistributedType.DEEPSPEED, ZERO2, ["unet"], "exps/run", "train.resume"),
])
def test_unsupported_sharded_runs_are_one_error(kind, config, parts, resume, words):
    with pytest.raises(ConfigError, match=words):
        check_sharded_run(kind, config, parts, resume)


def test_deepspeed_settings_follow_the_hcpdiff_config():
    config = {**ZERO2, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 1,
              "gradient_clipping": 1.0}
    replaced = align_deepspeed_config(config, batch_size=4, accumulation=2, max_grad_norm=1.0, num_processes=2)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 1.0 and config["train_batch_size"] == 16
    assert replaced == ["gradient_accumulation_steps 1 -> 2"]  # 'auto' and equal values are not worth a warning
    assert align_deepspeed_config(config, 4, 2, None, 2) == ["gradient_clipping 1.0 -> 0.0"]
    assert zero_stage(config) == 2 and zero_stage(None) == 0


def test_zero3_refuses_ema_and_previews_in_one_line():
    with pytest.raises(ConfigError, match=r"^model\.ema: .*ZeRO-3"):
        check_sharded_run(DistributedType.DEEPSPEED, ZERO3, ["unet"], None, ema=True)
    with pytest.raises(ConfigError, match=r"^previewer: .*ZeRO-3"):
        check_sharded_run(DistributedType.DEEPSPEED, ZERO3, ["unet"], None, preview=True)


def test_fsdp2_runs_lora_full_finetuning_and_resume():
    check_sharded_run(DistributedType.FSDP, None, ["transformer"], "exps/run", fsdp_version=2,
                      unsupported_under_fsdp={"model.quantize": False, "train.compile": False})


@pytest.mark.parametrize("parts, version, options, unsupported, message", [
    (["unet"], 1, {}, {}, r"^FSDP version 1 is not supported; use fsdp_version: 2 "),
    (["unet", "text_encoder"], 2, {}, {}, r"^FSDP shards one trained model per run .* trains unet, text_encoder;"),
    (["unet"], 2, {"ema": True}, {}, r"^model\.ema: .*FSDP"),
    (["unet"], 2, {"preview": True}, {}, r"^previewer: .*FSDP"),
    (["unet"], 2, {}, {"model.blocks_to_swap": True}, r"^model\.blocks_to_swap: not supported with FSDP"),
    (["unet"], 2, {}, {"model.quantize": False, "train.compile": True}, r"^train\.compile: not supported with FSDP"),
])
def test_what_fsdp_cannot_do_is_one_error(parts, version, options, unsupported, message):
    with pytest.raises(ConfigError, match=message):
        check_sharded_run(DistributedType.FSDP, None, parts, None, fsdp_version=version,
                          unsupported_under_fsdp=unsupported, **options)


def test_an_fsdp_launch_that_accelerate_turned_into_ddp_is_refused(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="accelerate runs FSDP only on GPUs and set up this run as MULTI_CPU"):
        check_fsdp_taken(DistributedType.MULTI_CPU)
    check_fsdp_taken(DistributedType.FSDP)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_fsdp_taken(DistributedType.MULTI_CPU)


def test_unsharded_tensors_pass_through_gathering():
    state = {"a.lora_down.weight": torch.ones(2, 3), "a.alpha": torch.tensor(4.0)}
    assert gathered_state(state, keep=True) == state
    assert gathered_state(state, keep=False) == {}
    assert local_numel(torch.nn.Parameter(torch.ones(2, 3))) == 6
