"""HCP v1's noise options on the DDPM objective: pyramid noise and zero-terminal-SNR betas."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler, PNDMScheduler

from hcpdiff.errors import ConfigError
from hcpdiff.infer.pipeline import zero_snr_sampler
from hcpdiff.objectives.ddpm import DDPMObjective, sample_noise
from hcpdiff.objectives.flow_matching import flow_matching_objective
from hcpdiff.train.specs import LossSpec

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False}


def low_frequency_energy(noise: torch.Tensor, cell: int = 8) -> float:
    """Mean variance of the noise averaged over cell x cell blocks: ~1 / cell**2 for white noise."""
    return F.avg_pool2d(noise, cell).var(dim=(2, 3)).mean().item()


def generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_pyramid_noise_has_more_low_frequency_energy_and_unit_std():
    latents = torch.zeros(4, 4, 64, 64)
    plain = sample_noise(latents, generators=generators(0, 1, 2, 3))
    pyramid = sample_noise(latents, generators=generators(0, 1, 2, 3), pyramid_levels=6, pyramid_discount=0.8)
    assert low_frequency_energy(plain) < 2 / 64  # white noise: 1 / 64
    assert low_frequency_energy(pyramid) > 5 * low_frequency_energy(plain)
    assert torch.allclose(pyramid.flatten(1).std(dim=1), torch.ones(4), atol=1e-4)  # each sample rescaled to std 1


def test_pyramid_noise_is_per_sample_seeded_and_off_by_default():
    latents = torch.zeros(3, 4, 32, 32)
    batch = sample_noise(latents, 0.1, generators(5, 6, 7), pyramid_levels=6)
    alone = sample_noise(latents[1:2], 0.1, generators(6), pyramid_levels=6)
    assert torch.equal(batch[1:2], alone)  # a sample's noise depends on its generator alone, not on its batch
    # levels 0 or 1 draw nothing more: bit-identical to the plain noise
    assert torch.equal(sample_noise(latents, 0.1, generators(5, 6, 7), pyramid_levels=1),
                       sample_noise(latents, 0.1, generators(5, 6, 7)))


def test_objective_noises_with_pyramid_noise():
    scheduler = DDPMScheduler(**SD_BETAS)
    latents = torch.zeros(2, 4, 32, 32)
    spec = LossSpec(pyramid_noise_levels=6, pyramid_noise_discount=0.8, prediction_type="epsilon")
    noised = DDPMObjective.from_spec(scheduler, spec).noised(latents, generators(0, 1))
    plain = DDPMObjective.from_spec(scheduler, LossSpec()).noised(latents, generators(0, 1))
    assert low_frequency_energy(noised.target) > 5 * low_frequency_energy(plain.target)  # epsilon: target = noise


def test_zero_terminal_snr_trains_on_pure_noise_at_the_last_timestep():
    scheduler = DDPMScheduler(**SD_BETAS, prediction_type="v_prediction")
    spec = LossSpec(zero_terminal_snr=True, timestep_min=999)
    objective = DDPMObjective.from_spec(scheduler, spec)
    assert objective.scheduler.alphas_cumprod[-1].item() == 0.0 and objective.zero_terminal_snr
    assert scheduler.alphas_cumprod[-1].item() > 0.004  # the model's own schedule is left as it was
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noised = objective.noised(latents, generators(1, 2))
    noise = sample_noise(latents, generators=generators(1, 2))
    assert torch.equal(noised.timesteps, torch.tensor([999, 999]))
    assert torch.allclose(noised.noisy_latents, noise, atol=1e-6)  # SNR 0: no signal left
    assert torch.allclose(noised.target, -latents, atol=1e-6)  # v = sqrt(a) * noise - sqrt(1 - a) * x0 = -x0
    plain = DDPMObjective.from_spec(scheduler, LossSpec(timestep_min=999)).noised(latents, generators(1, 2))
    assert not torch.allclose(plain.noisy_latents, noise, atol=1e-2)


def test_zero_terminal_snr_refuses_epsilon_in_one_line():
    with pytest.raises(ConfigError) as err:
        DDPMObjective.from_spec(DDPMScheduler(**SD_BETAS), LossSpec(zero_terminal_snr=True))
    assert "\n" not in str(err.value) and "train.loss.zero_terminal_snr" in str(err.value)
    assert "prediction_type=v_prediction" in str(err.value)


def test_flow_matching_refuses_the_ddpm_noise_options():
    for spec in (LossSpec(pyramid_noise_levels=6), LossSpec(zero_terminal_snr=True)):
        with pytest.raises(ConfigError, match="DDPM option"):
            flow_matching_objective(FlowMatchEulerDiscreteScheduler(), spec, "FLUX.1")


def test_zero_snr_sampler_rescales_trailing_and_turns_pndm_into_ddim():
    sampler = zero_snr_sampler(PNDMScheduler(**{k: v for k, v in SD_BETAS.items() if k != "clip_sample"}), "key")
    assert isinstance(sampler, DDIMScheduler) and sampler.alphas_cumprod[-1].item() == 0.0
    sampler.set_timesteps(4)
    assert sampler.timesteps[0].item() == 999  # trailing: the first step starts from pure noise
    with pytest.raises(ConfigError, match="^key: the sampler FlowMatchEulerDiscreteScheduler"):
        zero_snr_sampler(FlowMatchEulerDiscreteScheduler(), "key")
