"""Pyramid (multi-resolution) noise, as HCP-Diffusion v1's PyramidNoiseScheduler and kohya's multires noise.

Plain Gaussian noise has almost no energy at low spatial frequencies, so a model never learns to change an image's
large-scale layout or overall tone much. Adding upsampled coarse noise fields puts energy there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_noise_row(noise: torch.Tensor, levels: int, discount: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample's noise [C, H, W] plus `levels - 1` coarser fields, field i at size (H, W) / r**i (r drawn in
    [2, 4) per level) upsampled bilinearly and weighted `discount ** i`; rescaled to unit std. Draws from
    `generator` (or the global stream when None), so a sample's pyramid depends on its generator alone."""
    channels, height, width = noise.shape
    like = {"device": noise.device, "dtype": noise.dtype}
    pyramid = noise.clone()
    # every level's ratio in one draw: one host sync per sample on a GPU, not one per level
    ratios = (2.0 + 2.0 * torch.rand(levels - 1, generator=generator, device=noise.device)).tolist()
    for level, ratio in enumerate(ratios, start=1):
        coarse_h, coarse_w = max(1, int(height / ratio ** level)), max(1, int(width / ratio ** level))
        coarse = torch.randn(1, channels, coarse_h, coarse_w, generator=generator, **like)
        pyramid += F.interpolate(coarse, size=(height, width), mode="bilinear")[0] * discount ** level
        if coarse_h == 1 or coarse_w == 1:
            break
    return pyramid / pyramid.std()


def pyramid_noise(noise: torch.Tensor, levels: int, discount: float,
                  generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Pyramid noise [B, C, H, W] built on `noise`, sample i drawing from generators[i] (or all from the global
    stream when None); each sample is normalised on its own, so it does not depend on its batch."""
    rows = [pyramid_noise_row(row, levels, discount, None if generators is None else generators[i])
            for i, row in enumerate(noise)]
    return torch.stack(rows)
