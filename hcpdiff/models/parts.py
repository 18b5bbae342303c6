"""The loaded parts of a base model, as one plain value."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ModelParts:
    """Everything the trainer and visualizer need from one base model."""

    family: str  # "sd" (Stable Diffusion 1.x / 2.x) or "sdxl"
    unet: Any  # diffusers UNet2DConditionModel
    vae: Any  # diffusers AutoencoderKL
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    noise_scheduler: Any  # diffusers DDPMScheduler built from the model's scheduler config (for training)
    name_or_path: str  # as the user gave it
    text_encoder_2: Any = None  # SDXL: transformers CLIPTextModelWithProjection (None for SD1.x / 2.x)
    tokenizer_2: Any = None  # SDXL: its CLIPTokenizer

    @property
    def vae_scale_factor(self) -> int:
        """How many pixels one latent cell covers per side (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def pixel_step(self) -> int:
        """Image sides must be multiples of this so every U-Net level divides evenly (64 for SD)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
