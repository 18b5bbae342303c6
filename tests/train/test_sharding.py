"""DeepSpeed / FSDP guards: what the trainer refuses up front, and the batch size DeepSpeed needs."""
from __future__ import annotations

import pytest
from accelerate.utils import DistributedType

from hcpdiff.errors import ConfigError
from hcpdiff.train.sharding import check_sharded_run, fill_deepspeed_batch, zero_stage

ZERO2 = {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto"}


def test_zero2_with_one_trained_part_runs():
    check_sharded_run(DistributedType.DEEPSPEED, ZERO2, ["unet"], None)
    check_sharded_run(DistributedType.MULTI_GPU, None, ["unet", "text_encoder"], "exps/run")  # DDP: anything goes


@pytest.mark.parametrize("kind, config, parts, resume, words", [
    (DistributedType.DEEPSPEED, ZERO2, ["unet", "text_encoder"], None, "unet, text_encoder"),
    (DistributedType.DEEPSPEED, {"zero_optimization": {"stage": 3}}, ["unet"], None, "ZeRO-3"),
    (DistributedType.FSDP, None, ["unet"], None, "FSDP"),
    (DistributedType.DEEPSPEED, ZERO2, ["unet"], "exps/run", "train.resume"),
])
def test_unsupported_sharded_runs_are_one_error(kind, config, parts, resume, words):
    with pytest.raises(ConfigError, match=words):
        check_sharded_run(kind, config, parts, resume)


def test_auto_micro_batch_is_filled_and_set_values_kept():
    config = dict(ZERO2)
    fill_deepspeed_batch(config, 4)
    assert config["train_micro_batch_size_per_gpu"] == 4
    config["train_micro_batch_size_per_gpu"] = 2
    fill_deepspeed_batch(config, 4)
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert zero_stage(config) == 2 and zero_stage(None) == 0
