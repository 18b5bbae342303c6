"""train.loss options: each changes what it should and nothing else."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from hcpdiff.errors import ConfigError
from hcpdiff.objectives.ddpm import (check_prediction_type, check_timestep_range, diffusion_loss, diffusion_target,
                                min_snr_weights, sample_noise, sample_timesteps, snr_of)


@pytest.fixture
def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_zero_noise_offset_draws_exactly_what_randn_like_draws():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(3)
    plain = torch.randn_like(latents)
    after_plain = torch.rand(1)
    torch.manual_seed(3)
    assert torch.equal(sample_noise(latents, 0.0), plain)
    assert torch.equal(torch.rand(1), after_plain)  # no extra draws: the rest of the run is unchanged


def test_noise_offset_adds_one_constant_per_sample_and_channel():
    latents = torch.zeros(2, 4, 8, 8)
    torch.manual_seed(3)
    base = torch.randn_like(latents)
    offsets = torch.randn(2, 4, 1, 1)
    torch.manual_seed(3)
    noise = sample_noise(latents, 0.1)
    assert torch.allclose(noise, base + 0.1 * offsets)
    difference = noise - base
    assert torch.allclose(difference, difference[:, :, :1, :1].expand_as(difference))


def test_timesteps_stay_in_the_range(scheduler):
    low, high = check_timestep_range(200, 300, scheduler.config.num_train_timesteps)
    timesteps = sample_timesteps(10_000, low, high, "cpu")
    assert int(timesteps.min()) == 200 and int(timesteps.max()) == 299
    torch.manual_seed(0)
    default = sample_timesteps(16, *check_timestep_range(0, None, 1000), "cpu")
    torch.manual_seed(0)
    assert torch.equal(default, torch.randint(0, 1000, (16,)))  # the defaults are the plain loop's draw


@pytest.mark.parametrize("low, high", [(-1, None), (500, 500), (0, 1001), (900, 100)])
def test_bad_timestep_range_names_the_keys(low, high):
    with pytest.raises(ConfigError, match=r"train\.loss\.timestep_min / timestep_max"):
        check_timestep_range(low, high, 1000)


def test_prediction_type_defaults_to_the_scheduler_and_checks_names():
    assert check_prediction_type(None, "epsilon") == "epsilon"
    assert check_prediction_type("v_prediction", "epsilon") == "v_prediction"
    with pytest.raises(ConfigError, match=r"train\.loss\.prediction_type"):
        check_prediction_type("x0", "epsilon")


def test_targets_per_prediction_type(scheduler):
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    assert torch.equal(diffusion_target(scheduler, latents, noise, timesteps), noise)  # scheduler config: epsilon
    assert torch.equal(diffusion_target(scheduler, latents, noise, timesteps, "sample"), latents)
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(2, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(diffusion_target(scheduler, latents, noise, timesteps, "v_prediction"), velocity, atol=1e-6)


def test_min_snr_weights_match_a_hand_computation(scheduler):
    timesteps = torch.tensor([0, 500, 999])
    snr = snr_of(scheduler, timesteps)
    alpha_bar = scheduler.alphas_cumprod[timesteps].double()
    expected_snr = alpha_bar / (1 - alpha_bar)
    assert torch.allclose(snr.double(), expected_snr, rtol=1e-5)
    gamma = 5.0
    hand = [min(s, gamma) for s in expected_snr.tolist()]
    eps = min_snr_weights(snr, gamma, "epsilon")
    vpred = min_snr_weights(snr, gamma, "v_prediction")
    sample = min_snr_weights(snr, gamma, "sample")
    for i, s in enumerate(expected_snr.tolist()):
        assert float(eps[i]) == pytest.approx(hand[i] / s, rel=1e-5)
        assert float(vpred[i]) == pytest.approx(hand[i] / (s + 1), rel=1e-5)
        assert float(sample[i]) == pytest.approx(hand[i], rel=1e-5)
    assert float(eps[0]) < 1.0 and float(eps[2]) == pytest.approx(1.0)  # low-noise steps are damped, noisy ones not


def test_weighted_loss_is_the_mean_of_weighted_per_sample_errors():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(diffusion_loss(pred, target), torch.nn.functional.mse_loss(pred, target))
    weights = torch.tensor([1.0, 0.5, 0.0])
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(diffusion_loss(pred, target, weights), (per_sample * weights).mean())
    assert torch.allclose(diffusion_loss(pred, target, torch.ones(3)), diffusion_loss(pred, target))
