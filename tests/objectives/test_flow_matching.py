"""The flow-matching objective: sigma samplers, FLUX's resolution shift, the target and the loss weights; and both
objectives' per-sample random draws."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from hcpdiff.errors import ConfigError
from hcpdiff.objectives.ddpm import DDPM_LOSS_KEYS, DDPMObjective, refuse_other_objective_keys
from hcpdiff.objectives.flow_matching import FLOW_LOSS_KEYS, FlowMatchingObjective, sample_sigmas
from hcpdiff.train.specs import LossSpec

# FLUX.1-dev's scheduler_config.json (schnell: use_dynamic_shifting false, shift 1.0)
FLUX_DEV_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                      "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


def dev_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)


def logit(x: torch.Tensor) -> torch.Tensor:
    return torch.log(x / (1 - x))


@pytest.mark.parametrize("sampling, check", [
    ("uniform", lambda s: (s.mean(), s.std(), 0.5, 1 / math.sqrt(12))),
    ("logit_normal", lambda s: (logit(s).mean(), logit(s).std(), 0.5, 2.0)),  # mean 0.5, std 2 set below
    ("sigmoid", lambda s: (logit(s).mean(), logit(s).std(), 0.0, 1.5)),  # scale 1.5
])
def test_sigma_samplers_have_their_distributions(sampling, check):
    torch.manual_seed(0)
    sigmas = sample_sigmas(sampling, 200_000, logit_mean=0.5, logit_std=2.0, sigmoid_scale=1.5).double()
    assert sigmas.min() >= 0 and sigmas.max() <= 1
    mean, std, want_mean, want_std = check(sigmas.clamp(1e-12, 1 - 1e-12))
    assert float(mean) == pytest.approx(want_mean, abs=0.02)
    assert float(std) == pytest.approx(want_std, abs=0.02)


def test_mode_sampling_matches_sd3_formula_mean():
    torch.manual_seed(0)
    scale = 1.29
    sigmas = sample_sigmas("mode", 400_000, mode_scale=scale).double()
    # E[1 - u - s (cos^2(pi u / 2) - 1 + u)] over u ~ U(0, 1): 1/2 - s (1/2 - 1 + 1/2) = 1/2
    assert float(sigmas.mean()) == pytest.approx(0.5, abs=0.01)
    # mode sampling with s > 0 concentrates sigmas in the middle: less spread than uniform
    assert float(sigmas.std()) < 1 / math.sqrt(12)


def test_resolution_shift_equals_flux_inference_shift():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    latents = torch.zeros(4, 16, 64, 96)  # 512 x 768 px: 32 x 48 = 1536 packed tokens
    objective = FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="uniform", shift="resolution")
    torch.manual_seed(3)
    shifted = objective.sample_sigmas(latents)
    torch.manual_seed(3)
    unshifted = torch.rand(4)
    mu = calculate_shift(1536, 256, 4096, 0.5, 1.15)
    assert torch.allclose(shifted, math.exp(mu) / (math.exp(mu) + (1 / unshifted - 1)), atol=1e-6)
    # and what the scheduler itself does at inference for that many tokens
    scheduler = dev_scheduler()
    scheduler.set_timesteps(sigmas=unshifted.sort(descending=True).values.numpy(), mu=mu)
    assert torch.allclose(scheduler.sigmas[:-1], shifted.sort(descending=True).values, atol=1e-6)


def test_static_shift_and_no_shift():
    latents = torch.zeros(3, 16, 8, 8)
    torch.manual_seed(1)
    raw = torch.rand(3)
    torch.manual_seed(1)
    static = FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="uniform", shift="static",
                                   shift_value=3.0).sample_sigmas(latents)
    assert torch.allclose(static, 3 * raw / (1 + 2 * raw))
    torch.manual_seed(1)
    assert torch.equal(FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="uniform",
                                             shift="none").sample_sigmas(latents), raw)


def test_noised_latents_target_and_weights_by_hand():
    latents = torch.randn(2, 16, 4, 4)
    objective = FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="uniform", shift="none",
                                      weighting="cosmap")
    torch.manual_seed(5)
    noised = objective.noised(latents)
    torch.manual_seed(5)
    noise = torch.randn_like(latents)
    sigmas = torch.rand(2)
    assert torch.equal(noised.timesteps, sigmas)
    s = sigmas.view(2, 1, 1, 1)
    assert torch.allclose(noised.noisy_latents, (1 - s) * latents + s * noise)
    assert torch.allclose(noised.target, noise - latents)
    assert torch.allclose(noised.weights, 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas ** 2)))
    prediction = torch.zeros_like(latents)
    per_sample = ((noise - latents) ** 2).mean(dim=(1, 2, 3))
    assert float(objective.loss(prediction, noised)) == pytest.approx(float((per_sample * noised.weights).mean()),
                                                                      rel=1e-5)
    sqrt_weights = FlowMatchingObjective(scheduler=dev_scheduler(), weighting="sigma_sqrt").noised(latents)
    assert torch.allclose(sqrt_weights.weights, sqrt_weights.timesteps ** -2.0)
    assert FlowMatchingObjective(scheduler=dev_scheduler()).noised(latents).weights is None


def test_spec_defaults_follow_the_scheduler():
    dev = FlowMatchingObjective.from_spec(dev_scheduler(), LossSpec())
    assert (dev.sigma_sampling, dev.shift, dev.weighting) == ("logit_normal", "resolution", "none")
    schnell = FlowMatchingObjective.from_spec(
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False), LossSpec())
    assert (schnell.shift, schnell.shift_value) == ("static", 1.0)
    custom = FlowMatchingObjective.from_spec(dev_scheduler(), LossSpec(sigma_sampling="mode", mode_scale=0.5,
                                                                       shift="static", shift_value=3.0))
    assert (custom.sigma_sampling, custom.mode_scale, custom.shift, custom.shift_value) == ("mode", 0.5, "static", 3.0)


@pytest.mark.parametrize("spec, message", [
    (LossSpec(sigma_sampling="lognorm"), "train.loss.sigma_sampling: 'lognorm' is not one of"),
    (LossSpec(weighting="snr"), "train.loss.weighting: 'snr' is not one of"),
    (LossSpec(shift="dynamic"), "train.loss.shift: 'dynamic' is not one of"),
    (LossSpec(sigma_sampling="uniform", logit_std=2.0), "train.loss.logit_std: only used with sigma_sampling: logit_normal"),
    (LossSpec(shift="resolution", shift_value=3.0), "train.loss.shift_value: only used with shift: static"),
    (LossSpec(logit_std=0.0), "train.loss.logit_std / shift_value: must be > 0"),
])
def test_bad_flow_options_are_one_error(spec, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")):
        FlowMatchingObjective.from_spec(dev_scheduler(), spec)


def test_keys_of_the_other_objective_are_one_error():
    with pytest.raises(ConfigError, match=r"^train.loss.noise_offset: noise_offset, min_snr_gamma are DDPM options, "
                                          r"but a FLUX.1 model trains with flow matching; remove it"):
        refuse_other_objective_keys(LossSpec(noise_offset=0.1, min_snr_gamma=5.0), DDPM_LOSS_KEYS, "DDPM",
                                    "flow matching", "FLUX.1")
    with pytest.raises(ConfigError, match=r"^train.loss.shift: shift is a flow-matching option"):
        refuse_other_objective_keys(LossSpec(shift="none"), FLOW_LOSS_KEYS, "flow-matching", "the DDPM objective",
                                    "SD")
    refuse_other_objective_keys(LossSpec(noise_offset=0.0), DDPM_LOSS_KEYS, "DDPM", "flow matching", "FLUX.1")


@pytest.mark.parametrize("objective", [
    FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="logit_normal"),
    FlowMatchingObjective(scheduler=dev_scheduler(), sigma_sampling="sigmoid", shift="none"),
    DDPMObjective(scheduler=DDPMScheduler(), prediction_type="epsilon", timestep_range=(0, 1000), noise_offset=0.1),
], ids=["flow-logit-normal", "flow-sigmoid", "ddpm-offset"])
def test_per_sample_generators_make_draws_independent_of_the_batch(objective):
    """With one generator per sample (seeded by the sample, as the trainer does), a sample's noise and timestep are
    the same in a batch of two as alone: what lets N processes train what one process with N x the batch trains."""
    latents = torch.randn(2, 4, 8, 8)
    together = objective.noised(latents, [torch.Generator().manual_seed(seed) for seed in (11, 22)])
    for row, seed in enumerate((11, 22)):
        alone = objective.noised(latents[row:row + 1], [torch.Generator().manual_seed(seed)])
        assert torch.equal(together.noisy_latents[row], alone.noisy_latents[0])
        assert torch.equal(together.timesteps[row], alone.timesteps[0])
    assert not torch.equal(together.timesteps[0], together.timesteps[1])
