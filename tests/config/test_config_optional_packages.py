"""Optimizers from optional packages: a missing package is one line naming the key and the pip command."""
from __future__ import annotations

import importlib.util

import pytest

from hcpdiff.config import check_targets
from hcpdiff.errors import ConfigError


@pytest.mark.parametrize("target, package", [("came_pytorch.CAME", "came-pytorch"),
                                             ("prodigyopt.Prodigy", "prodigyopt")])
def test_missing_optimizer_package_says_what_to_install(target, package):
    if importlib.util.find_spec(target.split(".")[0]) is not None:
        pytest.skip(f"{package} is installed here")
    cfg = {"train": {"optimizer": {"_target_": target, "_partial_": True, "weight_decay": 0.01}}}
    with pytest.raises(ConfigError) as err:
        check_targets(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("`train.optimizer._target_`:") and f"pip install {package}" in message
