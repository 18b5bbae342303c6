"""Every YAML shipped under cfgs/ loads, resolves and names only real `_target_` arguments."""
from __future__ import annotations

from pathlib import Path

import pytest

from hcpdiff.config import check_targets, load_config

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.relative_to(REPO_ROOT) for p in (REPO_ROOT / "cfgs").rglob("*.yaml"))


def test_configs_are_shipped():
    assert Path("cfgs/train/train_base.yaml") in SHIPPED
    assert Path("cfgs/train/examples/lora_conventional.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=str)
def test_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the guide runs from the repository root; `_base_` paths say cfgs/...
    cfg = load_config(path)
    check_targets(cfg)
    assert "_base_" not in cfg


def test_lora_conventional_trains_unet_only_with_unet_lr(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    cfg = load_config("cfgs/train/examples/lora_conventional.yaml", ["unet_lr=3e-4"])
    assert [group.lr for group in cfg.lora_unet] == [3e-4]
    assert list(cfg.lora_text_encoder) == []
