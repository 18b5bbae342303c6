"""`check_targets` reports every bad `_target_` at once; `instantiate` turns failures into ConfigError."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from hcpdiff.config import ConfigError, check_targets, instantiate, targets
from hcpdiff.errors import DataError


class Bucket:
    """A stand-in for a `_partial_` bucket target."""

    def __init__(self, target_area: int, num_bucket: int = 5, *, image_sizes: dict | None = None) -> None:
        self.target_area, self.num_bucket = target_area, num_bucket

    @classmethod
    def from_files(cls, target_area: int, num_bucket: int, step_size: int = 64) -> "Bucket":
        return cls(target_area, num_bucket)


def refuse(path: str) -> None:
    raise DataError(f"'{path}' has no images.")


def anything(**kwargs) -> dict:
    return kwargs


HERE = __name__


@pytest.fixture(autouse=True)
def trust_this_module(monkeypatch):
    """This module's stand-ins may be targets here, as hcpdiff's own callables are (the allow-list is tested in
    tests/security/test_components.py)."""
    monkeypatch.setattr(targets, "PROJECT_ROOTS", (*targets.PROJECT_ROOTS, HERE))


def test_good_targets_pass():
    cfg = OmegaConf.create({
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 1e-3, "betas": [0.9, 0.99]},
        "bucket": {"_target_": f"{HERE}.Bucket.from_files", "_partial_": True, "target_area": 4096, "num_bucket": 3},
        "free": {"_target_": f"{HERE}.anything", "whatever": 1},
    })
    check_targets(cfg)


def test_all_problems_reported_together_including_nested():
    cfg = OmegaConf.create({
        "train": {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_dcay": 1e-3}},
        "scheduler": {"_target_": "torch.optim.lr_scheduler.NoSuchScheduler"},
        "data": {"bucket": {"_target_": f"{HERE}.Bucket", "_partial_": True,
                            "inner": {"_target_": "hcpdiff.no_such_module.Thing"}}},
    })
    with pytest.raises(ConfigError) as info:
        check_targets(cfg)
    problems = str(info.value).split("; ")
    assert problems[0] == ("`train.optimizer.weight_dcay`: 'torch.optim.AdamW' has no argument 'weight_dcay' "
                           "(did you mean 'weight_decay'?)")
    assert problems[1] == ("`scheduler._target_`: cannot import 'torch.optim.lr_scheduler.NoSuchScheduler' "
                           "('torch.optim.lr_scheduler' has no attribute 'NoSuchScheduler')")
    assert problems[2] == f"`data.bucket.inner`: '{HERE}.Bucket' has no argument 'inner'"
    assert problems[3] == ("`data.bucket.inner._target_`: cannot import 'hcpdiff.no_such_module.Thing' "
                           "('hcpdiff' has no attribute 'no_such_module').")
    assert len(problems) == 4


def test_positional_args_checked_against_signature():
    with pytest.raises(ConfigError, match=r"`b`: arguments do not fit"):
        check_targets({"b": {"_target_": f"{HERE}.Bucket", "_args_": [1, 2, 3]}})


def test_instantiate_builds_and_passes_kwargs():
    cfg = OmegaConf.create({"opt": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1}})
    make_optimizer = instantiate(cfg.opt, "opt")
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["lr"] == 0.1
    bucket = instantiate({"_target_": f"{HERE}.Bucket", "target_area": 64}, "data.bucket", num_bucket=2)
    assert (bucket.target_area, bucket.num_bucket) == (64, 2)


def test_instantiate_failures_name_key_and_target():
    params = [torch.nn.Parameter(torch.zeros(1))]
    with pytest.raises(ConfigError, match=r"^`train.optimizer`: cannot build 'torch.optim.AdamW': "
                                          r"ValueError: Invalid learning rate: -1\.$"):
        instantiate({"_target_": "torch.optim.AdamW", "lr": -1}, "train.optimizer", params=params)
    with pytest.raises(ConfigError, match=r"^`sched._target_`: cannot import 'torch.optim.NoSched'"):
        instantiate({"_target_": "torch.optim.NoSched"}, "sched")
    with pytest.raises(ConfigError, match=r"^`outer.inner._target_`: 'nope.X' is not allowed"):
        instantiate({"_target_": f"{HERE}.anything", "inner": {"_target_": "nope.X"}}, "outer")


def test_instantiate_passes_our_own_errors_through():
    with pytest.raises(DataError, match="'imgs' has no images"):
        instantiate({"_target_": f"{HERE}.refuse", "path": "imgs"}, "data.source")
