"""The denoising loss: the U-Net predicts the scheduler's target for noised latents."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net should output: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r} in the model's scheduler config")


def diffusion_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32, so low-precision outputs do not lose the small differences."""
    return F.mse_loss(model_pred.float(), target.float(), reduction="mean")
