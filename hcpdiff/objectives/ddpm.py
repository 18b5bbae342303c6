"""The DDPM objective (SD 1.x / 2.x / XL): the denoiser predicts the scheduler's target for noised latents.

Pure functions of tensors and plain values, and DDPMObjective, which `train.loss` (LossSpec) configures. With the
defaults every function draws the same random numbers and returns the same values as a plain diffusers training loop.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from hcpdiff.errors import ConfigError
from hcpdiff.models.transfer import to_device
from hcpdiff.objectives.pyramid_noise import pyramid_noise

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DDPM_LOSS_KEYS = ("noise_offset", "min_snr_gamma", "prediction_type", "timestep_min", "timestep_max",
                  "pyramid_noise_levels", "pyramid_noise_discount", "zero_terminal_snr")


def refuse_other_objective_keys(spec: Any, foreign_keys: tuple[str, ...], foreign: str, own: str, family: str) -> None:
    """One error naming the `train.loss` keys of another objective that this config sets (away from their defaults)."""
    defaults = {field.name: field.default for field in dataclasses.fields(spec)}
    written = [key for key in foreign_keys if getattr(spec, key) != defaults[key]]
    if written:
        raise ConfigError(f"train.loss.{written[0]}: {', '.join(written)} {'is a' if len(written) == 1 else 'are'} "
                          f"{foreign} option{'s' * (len(written) > 1)}, but a {family} model trains with {own}; "
                          "remove it")


Generators = list[torch.Generator] | None  # one per sample, or None: the global random stream


def draw_rows(generators: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
    """One draw per sample, each from its own generator, stacked to [B, ...]: a sample's random numbers then depend
    on its generator's seed alone, not on its batch, its place in it or the process that runs it."""
    return torch.stack([draw(generator) for generator in generators])


def sample_noise(latents: torch.Tensor, noise_offset: float = 0.0, generators: Generators = None,
                 pyramid_levels: int = 0, pyramid_discount: float = 0.4) -> torch.Tensor:
    """Gaussian noise like `latents` [B, C, H, W]; with pyramid levels (> 1), plus coarser noise fields (see
    pyramid_noise); with an offset, plus `offset * randn(B, C, 1, 1)` per channel.

    The offset teaches the model to shift whole images' brightness (very dark or light pictures). With offset 0 and
    no pyramid no extra random numbers are drawn, so a run is bit-identical to one without the options. With
    `generators`, sample i draws from generators[i].
    """
    like = {"device": latents.device, "dtype": latents.dtype}
    if generators is None:
        noise = torch.randn_like(latents)
        if pyramid_levels > 1:
            noise = pyramid_noise(noise, pyramid_levels, pyramid_discount)
        if noise_offset:
            noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, **like)
        return noise
    noise = draw_rows(generators, lambda g: torch.randn(latents.shape[1:], generator=g, **like))
    if pyramid_levels > 1:
        noise = pyramid_noise(noise, pyramid_levels, pyramid_discount, generators)
    if noise_offset:
        noise = noise + noise_offset * draw_rows(generators, lambda g: torch.randn(latents.shape[1], 1, 1,
                                                                                  generator=g, **like))
    return noise


def sample_timesteps(batch_size: int, timestep_min: int, timestep_max: int, device: torch.device | str,
                     generators: Generators = None) -> torch.Tensor:
    """Timesteps [B] drawn uniformly from [timestep_min, timestep_max) (the upper bound excluded, as in randint);
    with `generators`, sample i's from generators[i]."""
    if generators is None:
        return torch.randint(timestep_min, timestep_max, (batch_size,), device=device)
    return draw_rows(generators, lambda g: torch.randint(timestep_min, timestep_max, (), generator=g, device=device))


def check_timestep_range(timestep_min: int, timestep_max: int | None, num_train_timesteps: int) -> tuple[int, int]:
    """The (min, max) range to draw from; `timestep_max` None means the scheduler's num_train_timesteps."""
    top = num_train_timesteps if timestep_max is None else timestep_max
    if not 0 <= timestep_min < top <= num_train_timesteps:
        raise ConfigError(f"train.loss.timestep_min / timestep_max: need 0 <= timestep_min < timestep_max <= "
                          f"{num_train_timesteps} (the model's num_train_timesteps), got {timestep_min} and {top}")
    return timestep_min, top


def check_prediction_type(prediction_type: str | None, scheduler_prediction_type: str) -> str:
    """The prediction type to train: the config's, or the scheduler config's when the config says null."""
    chosen = scheduler_prediction_type if prediction_type is None else prediction_type
    if chosen not in PREDICTION_TYPES:
        where = "train.loss.prediction_type" if prediction_type is not None else "the model's scheduler config"
        raise ConfigError(f"{where}: unsupported prediction_type {chosen!r}; use one of {', '.join(PREDICTION_TYPES)}")
    return chosen


def zero_terminal_snr_scheduler(scheduler: DDPMScheduler, prediction_type: str) -> DDPMScheduler:
    """The model's DDPM schedule with its betas rescaled so that the last timestep is pure noise (alphas_cumprod[-1]
    == 0; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"; diffusers'
    `rescale_betas_zero_snr`). The paper pairs it with v-prediction: at SNR 0 an epsilon model's input is its target,
    and the clean image it implies, (x_t - sqrt(1 - alpha_bar) * eps) / sqrt(alpha_bar), divides by zero; so epsilon is
    refused."""
    if prediction_type == "epsilon":
        raise ConfigError("train.loss.zero_terminal_snr: zero terminal SNR needs prediction_type v_prediction (or "
                          "sample): with epsilon the last timestep's clean-image estimate divides by zero (Lin et al. "
                          "2024); set train.loss.prediction_type=v_prediction")
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True)


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, prediction_type: str | None = None) -> torch.Tensor:
    """What the U-Net should output: the noise (epsilon), the velocity (v_prediction) or the clean latents (sample).

    `prediction_type` None reads it from the scheduler's config.
    """
    prediction_type = prediction_type or scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")


def snr_of(scheduler: DDPMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio [B] of each timestep: alpha_bar / (1 - alpha_bar)."""
    # the schedule lives on the host: a blocking copy would sync the step
    alphas_cumprod = to_device(scheduler.alphas_cumprod, timesteps.device).float()[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights [B] (Hang et al. 2023), for the MSE against each prediction type's target.

    The paper's weight min(SNR, gamma) is for the clean-sample loss; the epsilon loss is SNR times smaller and the
    velocity loss (SNR + 1) times smaller, so their weights are divided by that.
    """
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error in fp32, so low-precision outputs do not lose the small differences.

    `weights` [B] scale each sample's mean error before the batch mean; None is the plain mean.
    """
    if weights is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.ndim)))
    return (per_sample * weights.float()).mean()


@dataclass
class Noised:
    """One batch prepared for the denoiser: its input, the timesteps it is told, and what it should predict."""

    noisy_latents: torch.Tensor  # [B, C, H, W]
    timesteps: torch.Tensor  # [B] integer DDPM timesteps, or flow-matching sigmas in [0, 1]
    target: torch.Tensor  # like the latents: noise, velocity or the clean latents
    weights: torch.Tensor | None  # [B] per-sample loss weights, or None for the plain mean


@dataclass
class DDPMObjective:
    """Noise at uniform timesteps of the model's DDPM schedule; MSE against the prediction type's target."""

    scheduler: DDPMScheduler
    prediction_type: str  # epsilon | v_prediction | sample
    timestep_range: tuple[int, int]  # drawn from [min, max)
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    pyramid_levels: int = 0  # > 1: pyramid noise with this many levels (see pyramid_noise)
    pyramid_discount: float = 0.4  # level i's weight is discount ** i
    zero_terminal_snr: bool = False  # the scheduler's betas were rescaled (previews sample with the same schedule)

    @classmethod
    def from_spec(cls, scheduler: DDPMScheduler, spec: Any) -> "DDPMObjective":
        """From `train.loss` (LossSpec), checked against the model's scheduler config."""
        config = scheduler.config
        prediction_type = check_prediction_type(spec.prediction_type, config.prediction_type)
        if spec.zero_terminal_snr:
            scheduler = zero_terminal_snr_scheduler(scheduler, prediction_type)
        return cls(scheduler=scheduler, prediction_type=prediction_type,
                   timestep_range=check_timestep_range(spec.timestep_min, spec.timestep_max,
                                                       config.num_train_timesteps),
                   noise_offset=spec.noise_offset, min_snr_gamma=spec.min_snr_gamma,
                   pyramid_levels=spec.pyramid_noise_levels, pyramid_discount=spec.pyramid_noise_discount,
                   zero_terminal_snr=bool(spec.zero_terminal_snr or config.get("rescale_betas_zero_snr", False)))

    def noised(self, latents: torch.Tensor, generators: Generators = None) -> Noised:
        """Draw noise, then timesteps (in that order, as diffusers' training examples do), and noise the latents;
        from the global random stream, or sample i from generators[i]."""
        noise = sample_noise(latents, self.noise_offset, generators, self.pyramid_levels, self.pyramid_discount)
        timesteps = sample_timesteps(latents.shape[0], *self.timestep_range, latents.device, generators)
        noisy_latents = self.scheduler.add_noise(latents, noise, timesteps)
        target = diffusion_target(self.scheduler, latents, noise, timesteps, self.prediction_type)
        weights = None
        if self.min_snr_gamma is not None:
            weights = min_snr_weights(snr_of(self.scheduler, timesteps), self.min_snr_gamma, self.prediction_type)
        return Noised(noisy_latents, timesteps, target, weights)

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The weighted mean squared error of the prediction (fp32)."""
        return diffusion_loss(prediction, noised.target, noised.weights)
