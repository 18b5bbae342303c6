"""Fixtures: one tiny random SD1.x model per test session, and fresh parts loaded from it."""
from __future__ import annotations

from pathlib import Path

import pytest

from hcpdiff.tools.make_tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny diffusers SD1.x folder, built once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sd"), seed=0)


@pytest.fixture
def tiny_unet(tiny_model_dir: Path):
    """A fresh U-Net (tests may attach adapters to it)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_model_dir, subfolder="unet")


@pytest.fixture
def tiny_text_encoder(tiny_model_dir: Path):
    """A fresh CLIP text encoder (tests may attach adapters to it)."""
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder")
