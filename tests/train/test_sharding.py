"""DeepSpeed / FSDP guards: what the trainer refuses up front, and the batch size DeepSpeed needs."""
from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError
from hcpdiff.train.sharding import align_deepspeed_config, check_sharded_run, zero_stage

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


ZERO3 = {"zero_optimization": {"stage": 3}}


def test_zero2_with_one_trained_part_runs():
    check_sharded_run(DistributedType.DEEPSPEED, ZERO2, ["unet"], None, ema=True, preview=True)
    check_sharded_run(DistributedType.DEEPSPEED, ZERO3, ["unet"], None)
    check_sharded_run(DistributedType.MULTI_GPU, None, ["unet", "text_encoder"], "exps/run")  # DDP: anything goes


@pytest.mark.parametrize("kind, config, parts, resume, words", [
    (DistributedType.DEEPSPEED, ZERO2, ["unet", "text_encoder"], None, "unet, text_encoder"),
    (DistributedType.FSDP, None, ["unet"], None, "FSDP"),
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
