"""The rectified-flow objective (FLUX.1, SD3): x_t = (1 - s) x0 + s e, and the denoiser predicts e - x0.

Sigma sampling and loss weighting reuse diffusers.training_utils (the SD3 paper's schemes); the resolution shift is
FluxPipeline's own `calculate_shift` fed to the scheduler's own `time_shift`, so training shifts sigmas exactly as
inference does. FlowMatchingObjective is configured by the flow-matching keys of `train.loss` (LossSpec).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from hcpdiff.errors import ConfigError
from hcpdiff.objectives.ddpm import (DDPM_LOSS_KEYS, Generators, Noised, diffusion_loss, draw_rows,
                                     refuse_other_objective_keys, sample_noise)

SIGMA_SAMPLINGS = ("uniform", "logit_normal", "mode", "sigmoid")
SHIFTS = ("none", "static", "resolution")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
# option key -> the sigma_sampling / shift it belongs to; set for another one it would silently do nothing
OPTION_OWNERS = {"logit_mean": ("sigma_sampling", "logit_normal"), "logit_std": ("sigma_sampling", "logit_normal"),
                 "mode_scale": ("sigma_sampling", "mode"), "sigmoid_scale": ("sigma_sampling", "sigmoid"),
                 "shift_value": ("shift", "static")}
FLOW_LOSS_KEYS = ("sigma_sampling", "logit_mean", "logit_std", "mode_scale", "sigmoid_scale", "shift", "shift_value",
                  "weighting", "precondition_outputs")
MAX_REDRAWS = 1000  # draws of one sample's sigma before a range the distribution hardly reaches is an error
PATCH_SIZE = 2  # FLUX packs 2x2 latent cells into one token: the sequence length the shift is computed over


def sample_sigmas(sampling: str, batch_size: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
                  mode_scale: float = 1.29, sigmoid_scale: float = 1.0,
                  device: torch.device | str = "cpu", generators: Generators = None) -> torch.Tensor:
    """Unshifted sigmas [B] in [0, 1]: uniform, logit-normal, SD3's mode sampling, or sigmoid(scale * randn); with
    `generators`, sample i's from generators[i]."""
    if generators is not None:
        return draw_rows(generators, lambda g: draw_sigmas(sampling, 1, logit_mean, logit_std, mode_scale,
                                                           sigmoid_scale, device, g)[0])
    return draw_sigmas(sampling, batch_size, logit_mean, logit_std, mode_scale, sigmoid_scale, device, None)


def draw_sigmas(sampling: str, batch_size: int, logit_mean: float, logit_std: float, mode_scale: float,
                sigmoid_scale: float, device: torch.device | str, generator: torch.Generator | None) -> torch.Tensor:
    """`batch_size` unshifted sigmas from one generator (None: the global stream)."""
    if sampling == "sigmoid":
        return torch.sigmoid(sigmoid_scale * torch.randn(batch_size, device=device, generator=generator))
    # diffusers names its uniform scheme "none"
    scheme = "none" if sampling == "uniform" else sampling
    return compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=logit_mean, logit_std=logit_std,
                                                 mode_scale=mode_scale, device=device, generator=generator)


def logit(p: float) -> float:
    """log(p / (1 - p)), -inf at 0 and inf at 1."""
    return -math.inf if p <= 0.0 else math.inf if p >= 1.0 else math.log(p / (1.0 - p))


def normal_cdf(x: float, mean: float, std: float) -> float:
    """P(N(mean, std^2) <= x)."""
    return 0.5 * (1.0 + math.erf((x - mean) / (std * math.sqrt(2.0))))


def resolution_mu(scheduler_config: Any, image_seq_len: int) -> float:
    """FLUX's resolution-dependent shift exponent for `image_seq_len` packed tokens (FluxPipeline's calculate_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, scheduler_config.get("base_image_seq_len", 256),
                           scheduler_config.get("max_image_seq_len", 4096), scheduler_config.get("base_shift", 0.5),
                           scheduler_config.get("max_shift", 1.15))


def static_shift(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's constant shift: shift * s / (1 + (shift - 1) * s) (FlowMatchEulerDiscreteScheduler without dynamics)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_loss_weights(weighting: str, sigmas: torch.Tensor) -> torch.Tensor | None:
    """Per-sample loss weights [B] (diffusers' compute_loss_weighting_for_sd3), or None for the plain mean."""
    if weighting == "none":
        return None
    return compute_loss_weighting_for_sd3(weighting, sigmas)


@dataclass
class FlowMatchingObjective:
    """Sigmas from a sampler, shifted; noisy latents interpolate clean latents and noise; target = noise - latents."""

    scheduler: Any  # FlowMatchEulerDiscreteScheduler: its config gives the shift, its time_shift applies it
    sigma_sampling: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sigmoid_scale: float = 1.0
    shift: str = "resolution"
    shift_value: float = 1.0  # the static shift
    # the resolution shift's exponent mu for latents of (height, width) cells; None: FluxPipeline's calculate_shift
    # over 2x2-packed tokens (a family whose pipeline computes mu otherwise passes its own: FLUX.2)
    resolution_mu: Callable[[int, int], float] | None = None
    weighting: str = "none"
    # score x0 = x_t - sigma * prediction against the clean latents instead of the velocity against noise - x0
    # (diffusers' train_dreambooth_lora_sd3 --precondition_outputs); the same minimum, weighted by sigma^2
    precondition_outputs: bool = False
    # the sigmas trained: the distribution above (shift included) truncated to [sigma_min, sigma_max), sigma_max 1
    # included; one denoising expert of a model trains on its own range (restricted_to_sigmas)
    sigma_min: float = 0.0
    sigma_max: float = 1.0

    @classmethod
    def from_spec(cls, scheduler: Any, spec: Any,
                  resolution_mu: Callable[[int, int], float] | None = None) -> "FlowMatchingObjective":
        """From the flow-matching keys of `train.loss` (LossSpec); unset keys take the model's defaults: resolution
        shift when its scheduler shifts dynamically (FLUX-dev), else its static shift (schnell: 1, i.e. none);
        `resolution_mu` as the field."""
        config = scheduler.config
        values = {key: getattr(spec, key) for key in FLOW_LOSS_KEYS if getattr(spec, key) is not None}
        check_choice("sigma_sampling", values.get("sigma_sampling"), SIGMA_SAMPLINGS)
        check_choice("shift", values.get("shift"), SHIFTS)
        check_choice("weighting", values.get("weighting"), WEIGHTINGS)
        if "shift" not in values:
            values["shift"] = "resolution" if config.get("use_dynamic_shifting") else "static"
            if values["shift"] == "static" and "shift_value" not in values:
                values["shift_value"] = float(config.get("shift", 1.0))
        chosen = {"sigma_sampling": values.get("sigma_sampling", cls.sigma_sampling), "shift": values["shift"]}
        for key, (owner, wanted) in OPTION_OWNERS.items():
            if key in values and chosen[owner] != wanted and getattr(spec, key) is not None:
                raise ConfigError(f"train.loss.{key}: only used with {owner}: {wanted}, "
                                  f"but {owner} is {chosen[owner]}")
        if values.get("logit_std", 1.0) <= 0 or values.get("shift_value", 1.0) <= 0:
            raise ConfigError("train.loss.logit_std / shift_value: must be > 0")
        return cls(scheduler=scheduler, resolution_mu=resolution_mu, **values)

    def sample_sigmas(self, latents: torch.Tensor, generators: Generators = None) -> torch.Tensor:
        """Shifted sigmas [B] for latents [B, C, H, W], in [sigma_min, sigma_max): the distribution truncated to the
        range (sample i from generators[i] alone, so a batch draws as its samples one by one)."""
        if (self.sigma_min, self.sigma_max) == (0.0, 1.0):
            return self.shifted_sigmas(latents, generators)
        if self.sigma_sampling in ("uniform", "logit_normal", "sigmoid") and self.shift in ("static", "none"):
            return self.inverse_cdf_sigmas(latents, generators)
        if generators is not None:
            return torch.cat([self.redrawn_sigmas(latents[i : i + 1], [generator])
                              for i, generator in enumerate(generators)])
        return self.redrawn_sigmas(latents, None)

    def inverse_cdf_sigmas(self, latents: torch.Tensor, generators: Generators) -> torch.Tensor:
        """The truncated distribution drawn exactly, without redraws (no host sync on a GPU): a uniform draw mapped
        into the range's share of the unshifted distribution (uniform: uniform over the range's unshifted values, as
        DiffSynth-Studio draws an expert's timesteps; logit-normal and sigmoid: a truncated normal of the logit), then
        shifted."""
        shift = self.shift_value if self.shift == "static" else 1.0
        low, high = (s / (shift - (shift - 1.0) * s) for s in (self.sigma_min, self.sigma_max))  # the shift undone
        if generators is not None:
            uniform = draw_rows(generators, lambda g: torch.rand(1, device=latents.device, generator=g)[0])
        else:
            uniform = torch.rand(latents.shape[0], device=latents.device)
        uniform = uniform.double()
        if self.sigma_sampling == "uniform":
            unshifted = low + (high - low) * uniform
        else:  # sigmoid(mean + std * z), z standard normal: z truncated to the range's logits
            mean, std = (self.logit_mean, self.logit_std) if self.sigma_sampling == "logit_normal" else (
                0.0, self.sigmoid_scale)
            low_cdf, high_cdf = (normal_cdf(logit(bound), mean, std) for bound in (low, high))
            unshifted = torch.sigmoid(mean + std * torch.special.ndtri(low_cdf + (high_cdf - low_cdf) * uniform))
        unshifted = unshifted.float()
        return static_shift(unshifted, shift) if self.shift == "static" else unshifted

    def redrawn_sigmas(self, latents: torch.Tensor, generators: Generators) -> torch.Tensor:
        """Shifted sigmas [B], each drawn again until it falls in [sigma_min, sigma_max) (mode sampling, the
        resolution shift: no inverse at hand)."""
        sigmas = self.shifted_sigmas(latents, generators)
        for _ in range(MAX_REDRAWS):
            outside = (sigmas < self.sigma_min) | ((sigmas >= self.sigma_max) & (self.sigma_max < 1.0))
            if not outside.any():
                return sigmas
            sigmas = torch.where(outside, self.shifted_sigmas(latents, generators), sigmas)
        raise ConfigError(f"train.loss.sigma_sampling: {self.sigma_sampling} sampling with the {self.shift} shift "
                          f"hardly reaches the sigmas [{self.sigma_min:g}, {self.sigma_max:g}) trained here "
                          f"({MAX_REDRAWS} draws fell outside); use sigma_sampling: uniform")

    def shifted_sigmas(self, latents: torch.Tensor, generators: Generators = None) -> torch.Tensor:
        """Shifted sigmas [B] in [0, 1] for latents [B, C, H, W], before any range."""
        sigmas = sample_sigmas(self.sigma_sampling, latents.shape[0], logit_mean=self.logit_mean,
                               logit_std=self.logit_std, mode_scale=self.mode_scale,
                               sigmoid_scale=self.sigmoid_scale, device=latents.device, generators=generators)
        if self.shift == "static":
            return static_shift(sigmas, self.shift_value)
        if self.shift == "resolution" and self.resolution_mu is not None:
            mu = self.resolution_mu(latents.shape[-2], latents.shape[-1])
            return self.scheduler.time_shift(mu, 1.0, sigmas)
        if self.shift == "resolution":
            seq_len = (latents.shape[-2] // PATCH_SIZE) * (latents.shape[-1] // PATCH_SIZE)
            return self.scheduler.time_shift(resolution_mu(self.scheduler.config, seq_len), 1.0, sigmas)
        return sigmas

    def noised(self, latents: torch.Tensor, generators: Generators = None) -> Noised:
        """Draw noise, then sigmas (global stream, or sample i from generators[i]); the denoiser is told sigma in
        [0, 1] (FLUX's transformer scales it by 1000)."""
        noise = sample_noise(latents, 0.0, generators)
        sigmas = self.sample_sigmas(latents, generators)
        expanded = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
        noisy_latents = (1.0 - expanded) * latents + expanded * noise
        target = latents if self.precondition_outputs else noise - latents
        return Noised(noisy_latents, sigmas, target, flow_loss_weights(self.weighting, sigmas))

    def loss(self, prediction: torch.Tensor, noised: Noised) -> torch.Tensor:
        """The weighted mean squared error of the predicted velocity, or with precondition_outputs of the clean
        latents it implies (fp32)."""
        if self.precondition_outputs:
            sigmas = noised.timesteps.float().view(-1, *([1] * (prediction.ndim - 1)))
            prediction = prediction.float() * -sigmas + noised.noisy_latents.float()
        return diffusion_loss(prediction, noised.target, noised.weights)


def check_choice(key: str, value: str | None, choices: tuple[str, ...]) -> None:
    """One error naming `train.loss.<key>` when a value is not one of its choices."""
    if value is not None and value not in choices:
        raise ConfigError(f"train.loss.{key}: {value!r} is not one of {', '.join(choices)}")


def restricted_to_sigmas(objective: Any, sigma_min: float, sigma_max: float, key: str) -> FlowMatchingObjective:
    """The objective drawing its sigmas in [sigma_min, sigma_max) only (one denoising expert's range, which `key`
    chose); an objective that draws no sigmas (DDPM) is one ConfigError."""
    if not isinstance(objective, FlowMatchingObjective):
        raise ConfigError(f"{key}: only a flow-matching objective trains one expert on its sigma range")
    return replace(objective, sigma_min=sigma_min, sigma_max=sigma_max)


def flow_matching_objective(scheduler: Any, spec: Any, family: str,
                            resolution_mu: Callable[[int, int], float] | None = None) -> FlowMatchingObjective:
    """A flow-matching family's objective from `train.loss`; DDPM-only keys set there are one error naming them.
    `resolution_mu`: (latent height, width) -> the resolution shift's mu, for a pipeline that computes its own."""
    refuse_other_objective_keys(spec, DDPM_LOSS_KEYS, "DDPM", "flow matching", family)
    return FlowMatchingObjective.from_spec(scheduler, spec, resolution_mu)
