"""Fixtures: one tiny random SD1.x model per test session, and fresh parts loaded from it."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from hcpdiff.tools.make_tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers SD1.x folder, built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture
def tiny_unet_factory(tiny_model_dir: Path) -> Callable[[], Any]:
    """Loads another fresh U-Net each call."""
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")


@pytest.fixture
def tiny_unet(tiny_unet_factory: Callable[[], Any]):
    """A fresh U-Net (tests may attach adapters to it)."""
    return tiny_unet_factory()


@pytest.fixture
def tiny_text_encoder(tiny_model_dir: Path):
    """A fresh CLIP text encoder (tests may attach adapters to it)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
