"""The training target follows the model's scheduler: noise for SD1.x, velocity for SD2.x v-prediction models."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hcpdiff.models import load_model_parts
from hcpdiff.tools.make_tiny_model import make_tiny_model
from hcpdiff.objectives.ddpm import diffusion_target


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD2.x-layout model whose scheduler predicts v."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_sd2"), seed=0, family="sd2")


def test_sd2_target_is_the_velocity(tiny_sd2: Path) -> None:
    scheduler = load_model_parts(str(tiny_sd2)).noise_scheduler
    assert scheduler.config.prediction_type == "v_prediction"
    torch.manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    target = diffusion_target(scheduler, latents, noise, timesteps)
    # v = sqrt(alpha_bar) * noise - sqrt(1 - alpha_bar) * x0 (Salimans & Ho), written out here independently
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(target, velocity)
    assert not torch.allclose(target, noise)


def test_sd1_target_is_the_noise(tiny_model: Path) -> None:
    scheduler = load_model_parts(str(tiny_model)).noise_scheduler
    latents, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(diffusion_target(scheduler, latents, noise, torch.tensor([500])), noise)
